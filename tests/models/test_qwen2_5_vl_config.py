"""Unsupported layouts and configs are refused up front with a ValueError naming the setting (not a
shape traceback deep in megatron). Single process: validation needs no process group; the builder
calls it before building anything."""

from __future__ import annotations

import pytest

from helpers import tiny_qwen
from megatron_cppo.models.qwen2_5_vl.config import (
    Qwen25VLDims,
    Qwen25VLModelConfig,
    reference_hf_config,
    validate_layout,
)
from megatron_cppo.parallel.state import ParallelConfig


def _dims(**kwargs):
    return Qwen25VLDims.from_hf(tiny_qwen.hf_config(tied=True, **kwargs))


def _layout(dims, tp=1, pp=1, vpp=None, first=None, **settings):
    par = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                         virtual_pipeline_model_parallel_size=vpp,
                         decoder_first_pipeline_num_layers=first, batch_p2p_comm=vpp is None)
    return validate_layout(dims, Qwen25VLModelConfig(**settings), par)


def test_tp_must_divide_query_groups():
    with pytest.raises(ValueError, match="tensor-model-parallel-size 4 does not divide "
                                         "num_query_groups 2"):
        _layout(_dims(), tp=4)
    with pytest.raises(ValueError, match="num_query_groups 2"):
        _layout(Qwen25VLDims.from_hf(reference_hf_config("3B")), tp=4)


def test_vision_tp_mode_needs_divisible_mlp_width():
    # like Qwen2.5-VL's 3420 at TP 8: the LM and the ViT heads split 4 ways, the ViT MLP (42) not
    dims = _dims(vision_intermediate=42, kv_heads=4)
    with pytest.raises(ValueError, match=r"vision_config\.intermediate_size 42.*dp_in_tp"):
        _layout(dims, tp=4, vision_parallel_mode="tp")
    assert _layout(dims, tp=4).vision_parallel_mode == "dp_in_tp"  # auto
    assert _layout(dims, tp=4, vision_parallel_mode="dp_in_tp").vision_tp_size == 1


def test_vision_modes_resolve():
    dims = _dims()
    assert _layout(dims, tp=2).vision_parallel_mode == "tp"
    assert _layout(dims, tp=2).vision_tp_size == 2
    assert _layout(dims, tp=2, vision_parallel_mode="dp_in_tp").vision_tp_size == 1
    assert _layout(dims, tp=1).vision_parallel_mode == "tp"


def test_pp_larger_than_layers():
    with pytest.raises(ValueError, match="pipeline-model-parallel-size 8 .*larger than "
                                         "num_layers 4"):
        _layout(_dims(), pp=8)


def test_pipeline_split():
    # PP 3 does not divide 4 layers and no split is given: one is chosen, and said
    chosen = _layout(_dims(), pp=3)
    assert chosen.pipeline_split == dict(decoder_first_pipeline_num_layers=1,
                                         decoder_last_pipeline_num_layers=1)
    assert "[1, 2, 1]" in chosen.split_note
    even = _layout(_dims(), pp=2)
    assert even.decoder_first_pipeline_num_layers is None and even.split_note is None
    given = _layout(_dims(), pp=3, first=2)
    assert given.decoder_first_pipeline_num_layers == 2 and given.split_note is None
    with pytest.raises(ValueError, match="virtual pipeline"):
        _layout(_dims(num_layers=6), pp=2, vpp=2, variable_seq_lengths=False)
    with pytest.raises(ValueError, match="leave 3 of 4"):
        _layout(_dims(), pp=3, first=1)
    with pytest.raises(ValueError, match="--decoder-first-pipeline-num-layers: needs "
                                         "--pipeline-model-parallel-size > 1"):
        _layout(_dims(), pp=1, first=1)
    with pytest.raises(ValueError, match="variable_seq_lengths=False"):
        _layout(_dims(), pp=2, vpp=2)
    assert _layout(_dims(), pp=2, vpp=2, variable_seq_lengths=False)


def test_vocab_padding():
    assert _layout(_dims(), tp=2).padded_vocab_size == 1532  # 1531 rows
    assert _layout(_dims(), tp=1).padded_vocab_size == 1531


def test_sequence_parallel_refused():
    par = ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True)
    with pytest.raises(ValueError, match="sequence_parallel"):
        validate_layout(_dims(), Qwen25VLModelConfig(), par)


def test_bad_hf_configs():
    cfg = tiny_qwen.hf_config(tied=True)
    cfg.text_config.rope_parameters.pop("mrope_section")
    with pytest.raises(ValueError, match="mrope_section"):
        Qwen25VLDims.from_hf(cfg)
    with pytest.raises(ValueError, match=r"fullatt_block_indexes \[5\]"):
        _dims(fullatt=(1, 5))


def test_settings_validation():
    with pytest.raises(ValueError, match="--vision-parallel-mode"):
        Qwen25VLModelConfig(vision_parallel_mode="sharded")
    with pytest.raises(ValueError, match="--bf16"):
        Qwen25VLModelConfig(bf16="fp16")
    with pytest.raises(ValueError, match="--decoder-first-pipeline-num-layers"):
        ParallelConfig(pipeline_model_parallel_size=2, decoder_first_pipeline_num_layers=0)
    # --recompute-granularity full alone recomputes every layer (Megatron-LM needs both others)
    full = Qwen25VLModelConfig(recompute_granularity="full")
    assert (full.recompute_method, full.recompute_num_layers) == ("uniform", 1)
