"""Per-chunk checksums (issue 13, item 2): every checkpoint written records them, every read
verifies them.

  * one flipped low-mantissa bit in one stored tensor (a change no shape or dtype check and no
    logits tolerance would see) is refused by reshard, megatron-to-hf, check and a training
    checkpoint load on 2 ranks, each naming that tensor;
  * reshard verifies its input and writes new checksums (check passes on its output); a training
    save (2 ranks) writes them for model/ and extra state;
  * a checkpoint written before checksums existed (no checksums.json, ``checksums`` null) still
    loads and converts, with one warning."""

from __future__ import annotations

import json
import shutil

import pytest

from helpers import convert_fixtures as cf
from helpers.distributed import run_on_ranks
from megatron_cppo.checkpoint import read_meta
from megatron_cppo.convert import cli

LM_FC2 = "language_model.decoder.layers.mlp.linear_fc2.weight"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("integrity")
    hf = cf.write_hf_dir(root / "hf", tied=False)
    mc = root / "mc"
    assert cli.main(["hf-to-megatron", "--hf-dir", str(hf), "--out", str(mc), "--tp", "2",
                     "--pp", "2", "--no-progress"]) == 0
    flipped = root / "flipped"
    shutil.copytree(mc, flipped)
    chunk = cf.flip_low_mantissa_bit(flipped, LM_FC2)
    old = root / "old"  # as written before checksums existed
    shutil.copytree(mc, old)
    (old / "checksums.json").unlink()
    meta = json.loads((old / "megatron_cppo.json").read_text())
    meta.pop("checksums")
    (old / "megatron_cppo.json").write_text(json.dumps(meta))
    return dict(root=root, hf=hf, mc=mc, flipped=flipped, chunk=chunk, old=old)


def _one_error(capsys, argv) -> str:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("command", ["reshard", "megatron-to-hf", "check"])
def test_bit_flip_is_refused_naming_the_tensor(ckpt, tmp_path, capsys, command):
    out = tmp_path / "out"
    argv = {"reshard": ["reshard", "--megatron-dir", str(ckpt["flipped"]), "--out", str(out),
                        "--tp", "1", "--pp", "1", "--no-progress"],
            "megatron-to-hf": ["megatron-to-hf", "--megatron-dir", str(ckpt["flipped"]),
                               "--out", str(out), "--no-progress"],
            "check": ["check", "--megatron-dir", str(ckpt["flipped"])]}[command]
    line = _one_error(capsys, argv)
    assert "checksum mismatch" in line and ckpt["chunk"] in line, line
    assert str(ckpt["flipped"] / "model") in line
    assert cf.no_output_left(out)


def test_checksums_carried_through_reshard_and_check(ckpt, tmp_path, capsys):
    assert cli.main(["check", "--megatron-dir", str(ckpt["mc"])]) == 0
    out = capsys.readouterr().out
    assert "ok" in out and "match their checksums" in out
    rs = tmp_path / "rs"
    assert cli.main(["reshard", "--megatron-dir", str(ckpt["mc"]), "--out", str(rs), "--tp",
                     "1", "--pp", "1", "--no-progress"]) == 0
    assert read_meta(rs).checksums == "crc32" and (rs / "checksums.json").is_file()
    assert cli.main(["check", "--megatron-dir", str(rs)]) == 0
    cf.flip_low_mantissa_bit(rs, "language_model.embedding.word_embeddings.weight")
    line = _one_error(capsys, ["check", "--megatron-dir", str(rs)])
    assert "language_model.embedding.word_embeddings.weight at offset [0, 0]" in line


def test_old_checkpoint_without_checksums_converts_with_a_warning(ckpt, tmp_path, capsys):
    assert cli.main(["check", "--megatron-dir", str(ckpt["old"])]) == 0
    captured = capsys.readouterr()
    assert "no checksums" in captured.out and "tensors read back" in captured.out
    assert captured.err.count("warning:") == 1 and "without checksums" in captured.err
    out = tmp_path / "hf"
    assert cli.main(["megatron-to-hf", "--megatron-dir", str(ckpt["old"]), "--out", str(out),
                     "--no-progress"]) == 0
    assert "without checksums" in capsys.readouterr().err
    cf.assert_bitwise_equal(cf.raw_hf_tensors(out), cf.raw_hf_tensors(ckpt["hf"]), "old")


def _load(state, cases):
    """Training-side loads (2 ranks): the error message, or the metadata's checksum field."""
    from megatron_cppo.checkpoint import CheckpointError, load_megatron_checkpoint, read_meta
    from megatron_cppo.models.qwen2_5_vl.builder import build_qwen2_5_vl
    from megatron_cppo.models.qwen2_5_vl.config import Qwen25VLModelConfig

    out = []
    for ckpt in cases:
        chunks = build_qwen2_5_vl(read_meta(ckpt).hf_config, state, Qwen25VLModelConfig())
        try:
            meta = load_megatron_checkpoint(chunks, ckpt, state)
            out.append(("ok", meta.checksums))
        except CheckpointError as e:
            out.append(("error", str(e)))
    return out


@pytest.mark.slow
def test_training_load_refuses_a_flipped_bit_and_loads_an_old_checkpoint(ckpt, capfd):
    results = run_on_ranks(_load, 2, tp=2, pp=1,
                           args=([str(ckpt["flipped"]), str(ckpt["old"]), str(ckpt["mc"])],))
    for flipped, old, good in results:  # the same answer on every rank
        assert flipped[0] == "error" and "checksum mismatch" in flipped[1], flipped
        assert ckpt["chunk"] in flipped[1]
        assert old == ("ok", None) and good == ("ok", "crc32")


def _as_format_1(meta: dict) -> dict:
    """The metadata as format 1 wrote it (before the layout fields took the flags' names)."""
    names = {"vision_parallel_mode": "vision_parallel",
             "decoder_first_pipeline_num_layers": "num_layers_in_first_pipeline_stage",
             "decoder_last_pipeline_num_layers": "num_layers_in_last_pipeline_stage"}
    return {names.get(k, k): v for k, v in {**meta, "format_version": 1}.items()}


def test_format_1_checkpoints_still_load_and_convert(ckpt, tmp_path, capsys):
    """A checkpoint whose metadata uses format 1's field names reads as today's (the mode and the
    split carried over), passes check, and reshards into a format-2 checkpoint; a newer format
    is refused naming the ones this version reads."""
    old = tmp_path / "v1"
    shutil.copytree(ckpt["mc"], old)
    path = old / "megatron_cppo.json"
    current = json.loads(path.read_text())
    path.write_text(json.dumps(_as_format_1(current)))
    meta = read_meta(old)
    assert meta.format_version == 2
    assert meta.vision_parallel_mode == current["vision_parallel_mode"] == "tp"
    assert meta.pipeline_split == read_meta(ckpt["mc"]).pipeline_split
    assert cli.main(["check", "--megatron-dir", str(old)]) == 0
    out = tmp_path / "v2"
    assert cli.main(["reshard", "--megatron-dir", str(old), "--out", str(out),
                     "--tensor-model-parallel-size", "1", "--pipeline-model-parallel-size", "2",
                     "--no-progress"]) == 0
    written = json.loads((out / "megatron_cppo.json").read_text())
    assert written["format_version"] == 2 and "vision_parallel_mode" in written
    assert "vision_parallel" not in written
    path.write_text(json.dumps({**current, "format_version": 3}))
    assert "format_version 3 is not supported (this version reads [1, 2])" in _one_error(
        capsys, ["check", "--megatron-dir", str(old)])
