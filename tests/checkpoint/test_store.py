"""Checkpoints written by the streaming converter load through megatron-core's own distributed
checkpoint loader into the model at every layout: after HF -> megatron (written at TP=1 in one
process, planned for the target layout) the loaded model, exported back to HF names with the model
package's own gather, equals the original HF tensors bit for bit at (tp, pp) = (2, 2), (1, 2),
(2, 1) and after a reshard. This is what proves the on-disk format, not only the round trip through
the converter's own reader."""

import glob
import os

import pytest
import torch

from helpers.distributed import run_on_ranks

pytestmark = pytest.mark.slow  # multi-rank loads and saves

LAYOUTS = [(2, 2), (1, 2), (2, 1)]


def _hf_tensors(path):
    from safetensors.torch import load_file

    from megatron_cppo.models.qwen2_5_vl import mapping

    out = {}
    for f in glob.glob(os.path.join(path, "*.safetensors")):
        out.update(load_file(f))
    return mapping.normalize_hf_state_dict(out)


def _load_and_export(state, cases):
    """One launch, many loads: ``cases`` is a list of (checkpoint dir, vision mode)."""
    from megatron_cppo.checkpoint import load_megatron_checkpoint, read_meta
    from megatron_cppo.models.qwen2_5_vl.builder import build_qwen2_5_vl, export_hf_state_dict
    from megatron_cppo.models.qwen2_5_vl.config import Qwen25VLModelConfig

    out = []
    for ckpt, vision_mode in cases:
        meta = read_meta(ckpt)
        chunks = build_qwen2_5_vl(meta.hf_config, state,
                                  Qwen25VLModelConfig(vision_parallel_mode=vision_mode))
        load_megatron_checkpoint(chunks, ckpt, state)
        sd = export_hf_state_dict(chunks, state)
        out.append(sd if state.rank == 0 else None)
    return out


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    from helpers import tiny_qwen

    from megatron_cppo.convert.conversions import hf_to_megatron, reshard

    root = tmp_path_factory.mktemp("ckpt")
    out = {}
    for tied in (True, False):
        hf = root / f"hf_{tied}"
        tiny_qwen.hf_model(tiny_qwen.hf_config(tied=tied)).save_pretrained(hf)
        for tp, pp in LAYOUTS:
            hf_to_megatron(hf, root / f"mc_{tied}_{tp}{pp}", tp=tp, pp=pp, dtype="fp32",
                           progress=False)
        reshard(root / f"mc_{tied}_21", root / f"rs_{tied}_12", tp=1, pp=2, progress=False)
        out[tied] = (hf, root)
    return out


@pytest.mark.parametrize("layout", LAYOUTS + ["reshard"])
def test_megatron_loader_reads_converted_checkpoint(converted, layout):
    if layout == "reshard":
        (tp, pp), name = (1, 2), "rs_{tied}_12"
    else:
        (tp, pp), name = layout, f"mc_{{tied}}_{layout[0]}{layout[1]}"
    modes = ["tp", "dp_in_tp"] if tp > 1 else ["tp"]
    cases = [(tied, mode) for tied in (True, False) for mode in modes]
    ckpts = [(str(converted[tied][1] / name.format(tied=tied)), mode) for tied, mode in cases]
    results = run_on_ranks(_load_and_export, tp * pp, tp=tp, pp=pp, args=(ckpts,))[0]
    for (tied, mode), got in zip(cases, results):
        want = _hf_tensors(converted[tied][0])
        assert set(got) == set(want), set(got) ^ set(want)
        bad = [k for k in want if not torch.equal(got[k], want[k])]
        assert not bad, f"{layout} tied={tied} {mode}: differ after loading: {bad[:5]}"


def _extra_state(state, step: int) -> dict:
    """A stand-in for a trainer's extra sharded state (optimizer-like): one tensor sharded over
    TP x PP with rank-dependent values, and one replicated over DP."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    rank_in_mp = state.pp_rank * state.tp_size + state.tp_rank
    mine = torch.arange(6, dtype=torch.float32) + 100 * rank_in_mp + step
    return {"moments": ShardedTensor.from_rank_offsets(
        "optimizer.moments", mine, (0, rank_in_mp, state.tp_size * state.pp_size),
        replica_id=0)}


def _save_from_layout(state, src, dst, vision_mode):
    """What training does: load, then save from the live (tp, pp) layout with megatron's save,
    with extra sharded state and JSON; then save again over it (overwrite) and read both back."""
    from megatron_cppo.checkpoint import (load_extra_state, load_megatron_checkpoint, read_meta,
                                          save_megatron_checkpoint)
    from megatron_cppo.models.qwen2_5_vl.builder import build_qwen2_5_vl
    from megatron_cppo.models.qwen2_5_vl.config import Qwen25VLModelConfig

    meta = read_meta(src)
    chunks = build_qwen2_5_vl(meta.hf_config, state,
                              Qwen25VLModelConfig(vision_parallel_mode=vision_mode))
    load_megatron_checkpoint(chunks, src, state)
    for step in (1, 2):  # the second save replaces the first (overwrite)
        save_megatron_checkpoint(chunks, dst, state, hf_config=meta.hf_config,
                                 source_hf_dir=meta.source_hf_dir, overwrite=step == 2,
                                 extra_sharded={"optimizer": _extra_state(state, step)},
                                 extra_metadata={"step": step, "data": {"epoch": 0}})
    meta2 = load_megatron_checkpoint(chunks, dst, state)
    loaded = load_extra_state(dst, "optimizer", _extra_state(state, 0))
    want = _extra_state(state, 2)["moments"].data
    return (meta2.extra, meta2.extra_state, bool(torch.equal(loaded["moments"], want)))


@pytest.mark.parametrize("vision_mode", ["tp", "dp_in_tp"])
def test_checkpoint_saved_by_training_layout_exports_and_reshards(converted, tmp_path,
                                                                  vision_mode):
    """A checkpoint saved from a live TP2 x PP2 model (replicated or sharded ViT, tied embeddings
    on both pipeline ends) exports to the original HF tensors bit for bit, also after a reshard
    to TP1 x PP2 (which strips the TP2 vocabulary padding)."""
    from megatron_cppo.checkpoint import read_meta
    from megatron_cppo.convert.conversions import megatron_to_hf, reshard

    hf, root = converted[True]
    saved = tmp_path / "saved"
    results = run_on_ranks(_save_from_layout, 4, tp=2, pp=2,
                           args=(str(root / "mc_True_22"), str(saved), vision_mode))
    for extra, extra_state, same in results:  # every rank read the second save's state back
        assert extra == {"step": 2, "data": {"epoch": 0}} and extra_state == ["optimizer"]
        assert same
    meta = read_meta(saved)
    assert (meta.tp, meta.pp, meta.padded_vocab_size) == (2, 2, 1532)
    assert (saved / "optimizer" / ".metadata").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".saved")]
    reshard(saved, tmp_path / "rs", tp=1, pp=2, progress=False)
    want = _hf_tensors(hf)
    for ckpt in (saved, tmp_path / "rs"):
        out = tmp_path / f"hf_{ckpt.name}"
        megatron_to_hf(ckpt, out, progress=False)
        got = _hf_tensors(out)
        assert set(got) == set(want)
        bad = [k for k in want if not torch.equal(got[k], want[k])]
        assert not bad, f"{ckpt.name}: {bad[:5]}"
