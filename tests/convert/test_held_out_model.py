"""A Qwen2.5-VL shape the rest of the suite never uses, converted at a layout whose pipeline split
is uneven: 3 language layers at TP2 x PP2.

The held-out config differs from tiny_qwen in every dimension: hidden 96 / 6 heads / 2 KV groups /
MLP 160 / 3 layers / untied, vocabulary 1601 (odd: padded to 1602 at TP2); ViT 4 blocks of width 48
with 3 heads (TP2 cannot shard them: the replicated ViT mode is chosen), GELU, window 112 px with
full attention in blocks 1 and 3.
Proven here:
  * hf-to-megatron --tp 2 --pp 2 chooses the split [1, 2] (the first stage also runs the ViT),
    prints it, and records it in the metadata;
  * verify (4 ranks) matches transformers within the fp32 tolerance (1e-4 max abs logit diff);
  * megatron-to-hf gives back every tensor bitwise under the same names (the source's key layout,
    what save_pretrained writes);
  * reshard to TP1 x PP2 with --decoder-first-pipeline-num-layers 2 (split [2, 1]) records the new
    split, verifies (2 ranks) and exports bitwise.
"""

from __future__ import annotations

import re

import pytest

from helpers import convert_fixtures as cf
from helpers import tiny_qwen
from megatron_cppo.checkpoint import read_meta
from megatron_cppo.convert import cli

pytestmark = pytest.mark.slow  # conversions and a launched verify of a second model

VISION_START, VISION_END, IMAGE, VIDEO = 1590, 1591, 1592, 1593


def held_out_config():
    from transformers import Qwen2_5_VLConfig

    text = dict(vocab_size=1601, hidden_size=96, intermediate_size=160, num_hidden_layers=3,
                num_attention_heads=6, num_key_value_heads=2, rms_norm_eps=1e-5,
                max_position_embeddings=1024, bos_token_id=0, eos_token_id=1,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                 "mrope_section": [2, 3, 3]},
                tie_word_embeddings=False)
    vision = dict(depth=4, hidden_size=48, intermediate_size=80, num_heads=3, in_channels=3,
                  patch_size=14, temporal_patch_size=2, spatial_merge_size=2, window_size=112,
                  fullatt_block_indexes=[1, 3], out_hidden_size=96, hidden_act="gelu",
                  tokens_per_second=2)
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=IMAGE,
                            video_token_id=VIDEO, vision_start_token_id=VISION_START,
                            vision_end_token_id=VISION_END, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("held_out") / "hf"
    tiny_qwen.hf_model(held_out_config(), seed=7).save_pretrained(path)
    return path


def _verify(capsys, hf, ckpt) -> float:
    rc = cli.main(["verify", "--hf-dir", str(hf), "--megatron-dir", str(ckpt)])
    captured = capsys.readouterr()
    assert rc == 0, captured.out + captured.err[-3000:]
    assert "PASSED" in captured.out
    diff = float(re.search(r"max abs logit diff\s+(\S+)", captured.out).group(1))
    assert diff <= 1e-4
    return diff


def _export_is_bitwise(tmp, ckpt, hf, name):
    out = tmp / f"back_{name}"
    assert cli.main(["megatron-to-hf", "--megatron-dir", str(ckpt), "--out", str(out),
                     "--no-progress"]) == 0
    got, want = cf.raw_hf_tensors(out), cf.raw_hf_tensors(hf)
    assert any(k.startswith("visual.") for k in want)  # save_pretrained's layout
    cf.assert_bitwise_equal(got, want, name)


def test_held_out_model_tp2pp2_uneven_split(hf_dir, tmp_path, capsys):
    ckpt = tmp_path / "tp2pp2"
    assert cli.main(["hf-to-megatron", "--hf-dir", str(hf_dir), "--out", str(ckpt), "--tp", "2",
                     "--pp", "2", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "note: pipeline-model-parallel-size 2 does not divide the language model's 3 " \
           "layers: using layers per stage [1, 2]" in out, out
    meta = read_meta(ckpt)
    assert (meta.tp, meta.pp, meta.dtype, meta.padded_vocab_size) == (2, 2, "fp32", 1602)
    assert (meta.decoder_first_pipeline_num_layers,
            meta.decoder_last_pipeline_num_layers) == (1, None)
    assert meta.vision_parallel_mode == "dp_in_tp" and meta.source_hf_layout == "transformers"
    _verify(capsys, hf_dir, ckpt)
    _export_is_bitwise(tmp_path, ckpt, hf_dir, "tp2pp2")

    # another split: [2, 1] at TP1 x PP2
    other = tmp_path / "tp1pp2_first2"
    assert cli.main(["reshard", "--megatron-dir", str(ckpt), "--out", str(other), "--tp", "1",
                     "--pp", "2", "--decoder-first-pipeline-num-layers", "2",
                     "--no-progress"]) == 0
    capsys.readouterr()
    meta = read_meta(other)
    assert (meta.tp, meta.pp, meta.padded_vocab_size) == (1, 2, 1601)
    assert (meta.decoder_first_pipeline_num_layers,
            meta.decoder_last_pipeline_num_layers) == (2, None)
    _verify(capsys, hf_dir, other)
    _export_is_bitwise(tmp_path, other, hf_dir, "tp1pp2_first2")
