"""``megatron-cppo-convert verify`` passes on good conversions and fails on a checkpoint with one
corrupted tensor.

Three launches of the megatron ranks (the cost of this file: ~20 s each on 2 cores):
  * TP2 PP2 (4 ranks), fp32, tied embeddings with vocab padding, ``--inputs`` holding a LEFT-padded
    batch of two samples with three images (two back to back in one sample), ``--dump-logits``:
    passes at the fp32 tolerance; the dumped logits are [B, S, V] in the layout of the inputs
    (padding 0) and equal transformers' logits of the same inputs within 1e-4;
  * TP1 PP2 (2 ranks), bf16 untied checkpoint of a bf16 HF directory, built-in probe (text + a
    PIL image wider than one ViT window, and a text-only sample): passes with the bf16 defaults;
  * TP2 PP1 (2 ranks), fp32, one stored chunk (layer 1's fused QKV) overwritten with noise in the
    torch_dist files: refused by the checksums (exit 2, naming the chunk); with the checksums
    recomputed (a conversion bug, not damage): exit code 1 and a message naming the exceeded
    tolerance.
Cheap checks without a launch: inputs whose image tokens do not match their grids, and an HF
directory of another model, are bad input (exit 2). Not proven here: GPU/nccl, real model sizes,
a processor (tokenizer + chat template) in the HF directory (none can be built offline).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch

from helpers import convert_fixtures as cf
from helpers import tiny_qwen
from megatron_cppo.convert import cli

pytestmark = pytest.mark.slow  # verify launches its ranks


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("verify")
    hf_tied = cf.write_hf_dir(root / "hf_tied", tied=True)
    hf_untied = cf.write_hf_dir(root / "hf_untied", tied=False, layout="new",
                                dtype=torch.bfloat16)
    out = dict(root=root, hf_tied=hf_tied, hf_untied=hf_untied)
    for name, hf, tp, pp in (("tied22", hf_tied, 2, 2), ("tied21", hf_tied, 2, 1),
                             ("untied12", hf_untied, 1, 2)):
        out[name] = root / name
        assert cli.main(["hf-to-megatron", "--hf-dir", str(hf), "--out", str(out[name]),
                         "--tp", str(tp), "--pp", str(pp), "--no-progress"]) == 0
    return out


def _numbers(stdout: str) -> tuple[float, float]:
    diff = float(re.search(r"max abs logit diff\s+(\S+)", stdout).group(1))
    kl = float(re.search(r"mean KL per token\s+(\S+)", stdout).group(1))
    return diff, kl


def _left_padded_inputs(path: Path) -> dict:
    mb = tiny_qwen.make_batch()[1]  # sample 0: two images back to back; sample 1: one image
    ids_BS, mask_BS = mb["input_ids"], mb["attention_mask"]
    assert not bool(mask_BS.all()), "the batch must have padding"
    left_ids, left_mask = torch.zeros_like(ids_BS), torch.zeros_like(mask_BS)
    for b in range(ids_BS.shape[0]):
        n = int(mask_BS[b].sum())
        left_ids[b, -n:], left_mask[b, -n:] = ids_BS[b, :n], 1
    inputs = dict(input_ids=left_ids, attention_mask=left_mask,
                  pixel_values=mb["pixel_values"], image_grid_thw=mb["image_grid_thw"])
    torch.save(inputs, path)
    return inputs


def test_verify_tp2pp2_inputs_file_and_dump_logits(ckpts, capsys):
    from transformers import Qwen2_5_VLForConditionalGeneration

    root = ckpts["root"]
    inputs = _left_padded_inputs(root / "inputs.pt")
    dump = root / "logits.pt"
    rc = cli.main(["verify", "--hf-dir", str(ckpts["hf_tied"]), "--megatron-dir",
                   str(ckpts["tied22"]), "--inputs", str(root / "inputs.pt"),
                   "--dump-logits", str(dump)])
    captured = capsys.readouterr()
    assert rc == 0, captured.out + captured.err[-3000:]
    assert "PASSED" in captured.out and "tp=2 pp=2" in captured.out
    diff, kl = _numbers(captured.out)
    assert diff <= 1e-4 and kl <= 1e-6  # the fp32 defaults, measured 2.6e-6 / 1e-13
    # both sides ran in full fp32 (no TF32): the flags as seen inside each forward
    assert "fp32 math" in captured.out and captured.out.count("=ieee") == 6

    logits_BSV = torch.load(dump, weights_only=True)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        ckpts["hf_tied"], local_files_only=True).float().eval()
    ids_BS, mask_BS = inputs["input_ids"], inputs["attention_mask"].bool()
    with torch.no_grad():
        ref_BSV = model(**inputs, mm_token_type_ids=(ids_BS == tiny_qwen.IMAGE).long()).logits
    assert logits_BSV.dtype == torch.float32
    assert logits_BSV.shape == ref_BSV.shape == ids_BS.shape + (1531,)  # unpadded vocabulary
    assert float((logits_BSV[mask_BS] - ref_BSV[mask_BS]).abs().max()) <= 1e-4
    assert bool((logits_BSV[~mask_BS] == 0).all())


def test_verify_tp1pp2_bf16_builtin_probe(ckpts, capsys):
    rc = cli.main(["verify", "--hf-dir", str(ckpts["hf_untied"]), "--megatron-dir",
                   str(ckpts["untied12"])])
    captured = capsys.readouterr()
    assert rc == 0, captured.out + captured.err[-3000:]
    assert "dtype=bf16" in captured.out and "built-in" in captured.out
    diff, kl = _numbers(captured.out)
    # a bf16 HF directory: the stored weights are exactly HF's, compute is fp32 on both sides
    assert diff <= 1e-4 and kl <= 1e-6


def test_verify_fails_on_one_corrupted_tensor(ckpts, capsys, tmp_path):
    bad = tmp_path / "corrupted"
    shutil.copytree(ckpts["tied21"], bad)
    cf.corrupt_chunk(bad, "language_model.decoder.layers.self_attention.linear_qkv.weight",
                     (1, 0, 0))
    # as damage on disk, the checksums refuse it before any rank starts
    assert cli.main(["verify", "--hf-dir", str(ckpts["hf_tied"]), "--megatron-dir",
                     str(bad)]) == 2
    assert "checksum mismatch in tensor language_model.decoder.layers.self_attention." \
           "linear_qkv.weight at offset [1, 0, 0]" in capsys.readouterr().err
    # as a conversion bug (checksums of the wrong values), the logits catch it
    cf.refresh_checksums(bad)
    rc = cli.main(["verify", "--hf-dir", str(ckpts["hf_tied"]), "--megatron-dir", str(bad)])
    captured = capsys.readouterr()
    assert rc == 1, captured.out + captured.err[-3000:]
    assert "FAILED" in captured.out
    assert "error: verify failed: max abs logit diff" in captured.err
    diff, kl = _numbers(captured.out)
    assert diff > 1e-2 and kl > 1e-4


def test_verify_bad_inputs_are_exit_2_without_a_launch(ckpts, capsys):
    root = ckpts["root"]
    inputs = _left_padded_inputs(root / "inputs_bad.pt")
    inputs["image_grid_thw"] = inputs["image_grid_thw"][:-1]  # one grid fewer than images
    torch.save(inputs, root / "inputs_bad.pt")
    assert cli.main(["verify", "--hf-dir", str(ckpts["hf_tied"]), "--megatron-dir",
                     str(ckpts["tied22"]), "--inputs", str(root / "inputs_bad.pt")]) == 2
    assert "image_grid_thw" in capsys.readouterr().err
    # another model: the untied HF directory has vocab 1536, the checkpoint 1531
    assert cli.main(["verify", "--hf-dir", str(ckpts["hf_untied"]), "--megatron-dir",
                     str(ckpts["tied22"])]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "other dimensions" in err and "vocab_size" in err


def test_builtin_probe_batch(ckpts, tmp_path):
    """The built-in probe: a sample with one image 6 x 4 merged tokens wide (wider than the tiny
    config's 2 x 2-token window) and a text-only sample, right-padded; an HF directory whose
    processor does not load gives the same batch and says so."""
    from megatron_cppo.convert.hf_source import read_hf_config
    from megatron_cppo.convert.verify import build_probe_batch

    hf = ckpts["hf_tied"]
    config = read_hf_config(hf)
    batch, probe, notes = build_probe_batch(hf, config)
    assert "built-in" in probe and not notes
    ids_BS, mask_BS = batch["input_ids"], batch["attention_mask"]
    assert ids_BS.shape[0] == 2 and batch["image_grid_thw"].tolist() == [[1, 8, 12]]
    assert tuple(batch["pixel_values"].shape) == (96, 3 * 2 * 14 * 14)
    assert int((ids_BS[0] == tiny_qwen.IMAGE).sum()) == 24 and not bool(
        (ids_BS[1] == tiny_qwen.IMAGE).any())
    for b in range(2):  # right padding: the valid tokens come first
        n = int(mask_BS[b].sum())
        assert bool(mask_BS[b, :n].all()) and not bool(mask_BS[b, n:].any())
    assert int(ids_BS.max()) < config.text_config.vocab_size

    broken = tmp_path / "hf_broken_processor"
    shutil.copytree(hf, broken)
    (broken / "preprocessor_config.json").write_text("{not json")
    (broken / "tokenizer.json").write_text("{}")
    batch2, _, notes = build_probe_batch(broken, config)
    assert notes and "processor did not load" in notes[0]
    assert torch.equal(batch2["input_ids"], ids_BS)


def test_a_failing_rank_surfaces_its_traceback(ckpts):
    """An unexpected exception on a megatron rank (here: a batch without M-RoPE ids) stops all
    ranks and comes back as a RuntimeError carrying the rank's traceback; no hang."""
    from megatron_cppo.convert.hf_source import read_hf_config
    from megatron_cppo.convert.verify import build_probe_batch, run_megatron

    batch, _, _ = build_probe_batch(ckpts["hf_tied"], read_hf_config(ckpts["hf_tied"]))
    with pytest.raises(RuntimeError) as e:
        run_megatron(str(ckpts["tied21"]), batch, world_size=2, timeout=300)
    message = str(e.value)
    assert "Traceback" in message and "KeyError" in message and "position_ids" in message


def test_full_fp32_precision_sets_and_restores_the_tf32_flags():
    """The flags verify's forwards run under (CPU: they are plain settings, read back here): TF32
    off for matmuls and cuDNN convolutions / RNNs inside, the caller's values restored after, also
    when the block raises."""
    from megatron_cppo.convert.verify import FULL_FP32, full_fp32_precision, precision_flags

    before = precision_flags()
    assert "cudnn.conv.fp32_precision" in before or "cudnn.allow_tf32" in before
    # what CUDA users commonly set for speed; verify must override it
    tf32 = {k: {"ieee": "tf32", False: True, "highest": "high"}[FULL_FP32[k]] for k in before}
    from megatron_cppo.convert.verify import _set_precision_flags

    _set_precision_flags(tf32)
    try:
        assert precision_flags() == tf32
        with full_fp32_precision():
            assert precision_flags() == {k: FULL_FP32[k] for k in before}
        assert precision_flags() == tf32
        with pytest.raises(KeyError):
            with full_fp32_precision():
                raise KeyError("boom")
        assert precision_flags() == tf32
    finally:
        _set_precision_flags(before)
    assert precision_flags() == before
