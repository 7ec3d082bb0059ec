"""Every damaged or hostile input ends the same way (issue 13): exit code 2, exactly one
``error: ...`` line on stderr naming the file (and the tensor / field where known), no traceback,
nothing left next to ``--out`` (no output, partial, moved-aside or lock sibling), and an existing
directory the run must not replace is left as it was.

One tiny HF directory and one checkpoint made from it (TP2: vocabulary padded 1531 -> 1532) per
module; each case damages a copy and runs the command in-process through ``cli.main`` (a
subprocess per case would cost ~10 s of imports each; test_convert_errors.py and
test_interruptions.py run the real process path)."""

from __future__ import annotations

import json
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import convert_fixtures as cf
from megatron_cppo.convert import cli

QKV0 = "model.layers.0.self_attn.q_proj.weight"  # what save_pretrained writes (old layout)
EMB = "model.embed_tokens.weight"
LM_QKV = "language_model.decoder.layers.self_attention.linear_qkv.weight"


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("damaged")
    hf = cf.write_hf_dir(root / "hf", tied=True)
    mc = root / "mc"
    assert cli.main(["hf-to-megatron", "--hf-dir", str(hf), "--out", str(mc), "--tp", "2",
                     "--no-progress"]) == 0
    return dict(hf=hf, mc=mc)


# ----------------------------------------------------------------------------------------------
# damage helpers: each gets the copied directory and returns the file the error must name


def _edit_tensors(edit) -> Callable[[Path], Path]:
    def damage(hf: Path) -> Path:
        path = hf / "model.safetensors"
        save_file(edit(load_file(path)), path, metadata={"format": "pt"})
        return path
    return damage


def _edit_config(edit) -> Callable[[Path], Path]:
    def damage(hf: Path) -> Path:
        path = hf / "config.json"
        raw = json.loads(path.read_text())
        result = edit(raw)
        path.write_text(result if isinstance(result, str) else json.dumps(result))
        return path
    return damage


def _edit_meta(edit) -> Callable[[Path], Path]:
    def damage(mc: Path) -> Path:
        path = mc / "megatron_cppo.json"
        raw = json.loads(path.read_text())
        result = edit(raw)
        path.write_text(result if isinstance(result, str) else json.dumps(result))
        return path
    return damage


def _text(cfg, **kw):
    cfg["text_config"].update(kw)
    return cfg


def _distcp(mc: Path) -> Path:
    (path,) = sorted((mc / "model").glob("*.distcp"))
    return path


def _truncate(fraction: float, name: str | None = None):
    def damage(mc: Path) -> Path:
        path = mc / "model" / name if name else _distcp(mc)
        os.truncate(path, int(path.stat().st_size * fraction))
        return path
    return damage


def _delete(name: str | None = None):
    def damage(mc: Path) -> Path:
        path = mc / "model" / name if name else _distcp(mc)
        path.unlink()
        return path
    return damage


def _overwrite_bytes(at: int, data: bytes, name: str | None = None):
    def damage(mc: Path) -> Path:
        path = mc / "model" / name if name else _distcp(mc)
        with open(path, "r+b") as f:
            f.seek(at)
            f.write(data)
        return path
    return damage


def _index(text: str):
    def damage(hf: Path) -> Path:
        path = hf / "model.safetensors.index.json"
        path.write_text(text)
        return path
    return damage


def _header(raw: bytes):
    def damage(hf: Path) -> Path:
        path = hf / "model.safetensors"
        data = path.read_bytes()
        (n,) = struct.unpack("<Q", data[:8])
        path.write_bytes(raw(data, n) if callable(raw) else raw)
        return path
    return damage


def _dir(damage):
    """The error names the directory (missing / unexpected tensors concern no single file)."""
    return lambda hf: damage(hf).parent


@dataclass
class Case:
    id: str
    kind: str  # "hf": damage a copy of the HF dir, run hf-to-megatron; "mc": a copy of the
    # checkpoint, run `command`; "argv": build argv from (hf, mc, tmp)
    damage: Callable = None
    needles: tuple = ()
    command: str = "reshard"
    argv: Callable = None


def _h2m(hf, out, *extra):
    return ["hf-to-megatron", "--hf-dir", str(hf), "--out", str(out), "--no-progress", *extra]


def _mc_argv(command, mc, out):
    return {"reshard": ["reshard", "--megatron-dir", str(mc), "--out", str(out), "--tp", "1",
                        "--pp", "2", "--no-progress"],
            "megatron-to-hf": ["megatron-to-hf", "--megatron-dir", str(mc), "--out", str(out),
                               "--no-progress"],
            "check": ["check", "--megatron-dir", str(mc)]}[command]


CASES = [
    # ---- HF config
    Case("config-missing", "hf", lambda hf: (hf / "config.json").unlink() or hf,
         ("no config.json",)),
    Case("config-not-json", "hf", _edit_config(lambda c: "{not json"), ("unreadable",)),
    Case("config-json-list", "hf", _edit_config(lambda c: "[1, 2]"), ("JSON object",)),
    Case("config-not-qwen", "hf", _edit_config(lambda c: {**c, "model_type": "qwen2"}),
         ("qwen2",)),
    Case("config-zero-heads", "hf", _edit_config(lambda c: _text(c, num_attention_heads=0)),
         ("invalid Qwen2.5-VL config",)),
    Case("config-wrong-type", "hf", _edit_config(lambda c: _text(c, hidden_size="wide")),
         ("invalid Qwen2.5-VL config",)),
    Case("config-no-mrope", "hf", _edit_config(lambda c: _text(
        c, rope_parameters={"rope_type": "default", "rope_theta": 1e6})), ("mrope_section",)),
    Case("config-fullatt-out-of-range", "hf", _edit_config(lambda c: {
        **c, "vision_config": {**c["vision_config"], "fullatt_block_indexes": [7]}}),
         ("fullatt_block_indexes",)),
    # ---- HF safetensors files
    Case("no-safetensors", "hf", lambda hf: (hf / "model.safetensors").unlink() or hf,
         ("no *.safetensors",)),
    Case("truncated-safetensors", "hf",
         lambda hf: os.truncate(hf / "model.safetensors", 5000) or hf / "model.safetensors",
         ("truncated",)),
    Case("safetensors-8-bytes", "hf", _header(b"\x01\x02\x03"), ("not a safetensors file",)),
    Case("safetensors-huge-header", "hf",
         _header(lambda d, n: struct.pack("<Q", 2**40) + d[8:]), ("header length",)),
    Case("safetensors-header-not-json", "hf",
         _header(lambda d, n: d[:8] + b"!" * n + d[8 + n:]), ("unreadable safetensors header",)),
    Case("safetensors-header-bad-offsets", "hf",
         _header(lambda d, n: d[:8] + d[8:8 + n].replace(b'"data_offsets":[0,',
                                                         b'"data_offsets":[9,', 1) + d[8 + n:]),
         ("data_offsets",)),
    Case("index-without-weight-map", "hf", _index('{"metadata": {}}'), ("unreadable index",)),
    Case("index-lists-missing-file", "hf",
         _index('{"weight_map": {"x": "model-00002-of-00002.safetensors"}}'),
         ("do not exist",)),
    # ---- HF tensors
    Case("missing-tensor", "hf", _dir(_edit_tensors(lambda sd: {k: v for k, v in sd.items()
                                                           if k != QKV0})),
         ("missing", "q_proj.weight")),
    Case("extra-tensor", "hf", _dir(_edit_tensors(lambda sd: {**sd, "model.layers.0.mlp.x.weight":
                                                              torch.zeros(2)})),
         ("unexpected", "mlp.x.weight")),
    Case("misshaped-tensor", "hf", _edit_tensors(lambda sd: {**sd, QKV0: sd[QKV0][:, :-1]
                                                             .contiguous()}),
         (QKV0, "shape")),
    Case("int32-tensor", "hf", _edit_tensors(lambda sd: {**sd, QKV0: sd[QKV0].int()}),
         (QKV0, "int32", "floating point")),
    Case("bool-tensor", "hf", _edit_tensors(lambda sd: {**sd, QKV0: sd[QKV0] > 0}),
         (QKV0, "bool")),
    Case("nan-weights", "hf", _edit_tensors(lambda sd: {**sd, QKV0: sd[QKV0].index_fill(
        0, torch.tensor([3]), float("nan"))}), (QKV0, "non-finite", "--allow-non-finite")),
    Case("inf-weights", "hf", _edit_tensors(lambda sd: {**sd, EMB: sd[EMB].index_fill(
        0, torch.tensor([0]), float("inf"))}), (EMB, "non-finite")),
    Case("tensor-in-both-layouts", "hf", _dir(_edit_tensors(lambda sd: {
        **sd, "model.language_model.layers.0.self_attn.q_proj.weight": sd[QKV0].clone()})),
         ("both HF key layouts",)),
    # ---- layouts the model cannot take
    Case("tp-3", "argv", argv=lambda hf, mc, out: _h2m(hf, out, "--tp", "3"),
         needles=("tensor-model-parallel-size 3",)),
    Case("pp-5", "argv", argv=lambda hf, mc, out: _h2m(hf, out, "--pp", "5"),
         needles=("pipeline-model-parallel-size 5",)),
    Case("split-impossible", "argv", argv=lambda hf, mc, out: _h2m(
        hf, out, "--pp", "3", "--decoder-first-pipeline-num-layers", "1"),
         needles=("leave 3 of 4",)),
    Case("hf-dir-missing", "argv", argv=lambda hf, mc, out: _h2m(hf.parent / "nowhere", out),
         needles=("nowhere",)),
    # ---- megatron_cppo.json
    Case("meta-missing", "mc", lambda mc: (mc / "megatron_cppo.json").unlink() or mc,
         ("megatron_cppo.json is missing",)),
    Case("meta-not-json", "mc", _edit_meta(lambda m: "{"), ("unreadable checkpoint metadata",)),
    Case("meta-tp-0", "mc", _edit_meta(lambda m: {**m, "tp": 0}), ("tp", "positive")),
    Case("meta-dtype-bf16-over-fp32", "mc", _edit_meta(lambda m: {**m, "dtype": "bf16"}),
         ("dtype is bf16", "float32"), "megatron-to-hf"),
    Case("meta-dtype-unknown", "mc", _edit_meta(lambda m: {**m, "dtype": "fp8"}), ("dtype",)),
    Case("meta-padded-vocab", "mc", _edit_meta(lambda m: {**m, "padded_vocab_size": 1600}),
         ("padded_vocab_size 1600",)),
    Case("meta-vocab-in-hf-config", "mc", _edit_meta(lambda m: {**m, "padded_vocab_size": 1540,
                                                                "hf_config": _text(
        m["hf_config"], vocab_size=1539)}), ("word_embeddings", "shape"), "check"),
    Case("meta-unknown-field", "mc", _edit_meta(lambda m: {**m, "surprise": 1}), ("surprise",)),
    Case("meta-format-version", "mc", _edit_meta(lambda m: {**m, "format_version": 99}),
         ("format_version 99",)),
    Case("meta-split-impossible", "mc", _edit_meta(
        lambda m: {**m, "pp": 2, "decoder_first_pipeline_num_layers": 4}),
         ("recorded layout",)),
    Case("meta-hf-config-not-qwen", "mc", _edit_meta(
        lambda m: {**m, "hf_config": {**m["hf_config"], "model_type": "llama"}}),
         ("hf_config",), "check"),
    # ---- the distributed checkpoint's files
    Case("dcp-metadata-missing", "mc", _delete(".metadata"), (".metadata",)),
    Case("dcp-metadata-truncated", "mc", _truncate(0.5, ".metadata"), ("checksum mismatch",)),
    Case("dcp-metadata-garbage", "mc", _overwrite_bytes(0, b"garbage!", ".metadata"),
         ("checksum mismatch",), "check"),
    Case("distcp-deleted", "mc", _delete(), ("missing",)),
    Case("distcp-truncated-half", "mc", _truncate(0.5), ("truncated",)),
    Case("distcp-truncated-zero", "mc", _truncate(0.0), ("truncated",), "megatron-to-hf"),
    Case("distcp-zip-header-flip", "mc", _overwrite_bytes(0, b"QK"), ("checksum mismatch",)),
    Case("common-pt-deleted", "mc", _delete("common.pt"), ("common.pt",)),
    Case("megatron-metadata-json-deleted", "mc", _delete("metadata.json"), ("metadata.json",)),
    Case("checksums-missing", "mc", lambda mc: (mc / "checksums.json").unlink() or mc,
         ("checksums.json", "missing")),
    Case("checksums-garbage", "mc", lambda mc: (mc / "checksums.json").write_text("[") or
         mc / "checksums.json", ("unreadable checksum table",), "check"),
    Case("bit-flip-low-mantissa", "mc",
         lambda mc: (cf.flip_low_mantissa_bit(mc, LM_QKV), _distcp(mc))[1],
         ("checksum mismatch", LM_QKV)),
    # ---- outputs that must not be written
    Case("out-is-input", "argv", argv=lambda hf, mc, out: _h2m(hf, hf, "--overwrite"),
         needles=("is the input directory",)),
    Case("out-is-ancestor-of-input", "argv",
         argv=lambda hf, mc, out: _h2m(hf, hf.parent, "--overwrite"),
         needles=("contains the input",)),
    Case("out-inside-input", "argv",
         argv=lambda hf, mc, out: _h2m(hf, hf / "sub" / "ckpt"),
         needles=("inside the input directory",)),
    Case("out-is-reshard-input", "argv",
         argv=lambda hf, mc, out: _mc_argv("reshard", mc, mc) + ["--overwrite"],
         needles=("is the input directory",)),
    Case("out-unrelated-dir-overwrite", "argv", argv=lambda hf, mc, out: (
        out.mkdir(), (out / "thesis.tex").write_text("mine"), _h2m(hf, out, "--overwrite"))[2],
         needles=("not a previous output", "megatron_cppo.json")),
    Case("out-hf-model-overwrite-by-export", "argv", argv=lambda hf, mc, out: (
        shutil.copytree(hf, out), _mc_argv("megatron-to-hf", mc, out) + ["--overwrite"])[1],
         needles=("not a previous output", "megatron_cppo_export.json")),
    Case("out-exists", "argv", argv=lambda hf, mc, out: (out.mkdir(), _h2m(hf, out))[1],
         needles=("already exists",)),
    Case("out-is-a-file", "argv", argv=lambda hf, mc, out: (
        out.write_text("x"), _h2m(hf, out, "--overwrite"))[1], needles=("not a directory",)),
    # ---- verify
    Case("verify-empty-batch", "argv", argv=lambda hf, mc, out: (
        torch.save({"input_ids": torch.zeros(1, 0, dtype=torch.long)}, out.parent / "in.pt"),
        ["verify", "--hf-dir", str(hf), "--megatron-dir", str(mc), "--inputs",
         str(out.parent / "in.pt")])[1], needles=("in.pt", "non-empty")),
    Case("verify-inputs-not-torch", "argv", argv=lambda hf, mc, out: (
        (out.parent / "in.pt").write_text("hello"),
        ["verify", "--hf-dir", str(hf), "--megatron-dir", str(mc), "--inputs",
         str(out.parent / "in.pt")])[1], needles=("in.pt", "cannot read")),
    Case("verify-dump-logits-dir", "argv", argv=lambda hf, mc, out: (
        out.mkdir(), ["verify", "--hf-dir", str(hf), "--megatron-dir", str(mc),
                      "--dump-logits", str(out)])[1], needles=("is a directory",)),
    Case("verify-truncated-hf", "argv", argv=lambda hf, mc, out: (
        shutil.copytree(hf, out.parent / "hf_t"),
        os.truncate(out.parent / "hf_t" / "model.safetensors", 4000),
        ["verify", "--hf-dir", str(out.parent / "hf_t"), "--megatron-dir", str(mc)])[2],
         needles=("model.safetensors", "truncated")),
]


def _damaged_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_damaged_input(base, tmp_path, capsys, case: Case):
    out = tmp_path / "out"
    named = None
    if case.kind == "hf":
        hf = _damaged_copy(base["hf"], tmp_path / "hf")
        named = case.damage(hf)
        argv = _h2m(hf, out)
    elif case.kind == "mc":
        mc = _damaged_copy(base["mc"], tmp_path / "mc")
        named = case.damage(mc)
        argv = _mc_argv(case.command, mc, out)
    else:
        hf = _damaged_copy(base["hf"], tmp_path / "hf")
        mc = _damaged_copy(base["mc"], tmp_path / "mc")
        argv = case.argv(hf, mc, out)
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}

    rc = cli.main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err, err
    for needle in case.needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    if named is not None:
        assert str(named) in lines[0], f"{named} not named in {lines[0]!r}"
    for p in (out, tmp_path / "hf", tmp_path / "mc"):
        assert cf.no_debris(p), list(p.parent.glob(f".{p.name}.*"))
    # nothing that existed was changed or removed (inputs, pre-existing outputs)
    after = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    assert {p: t for p, t in after.items() if p in before} == before
    assert set(before) <= set(after)
    if case.kind != "argv":
        assert not out.exists()


def test_case_count():
    assert len(CASES) >= 40


def test_debug_adds_the_traceback(base, tmp_path, capsys, monkeypatch):
    argv = ["check", "--megatron-dir", str(tmp_path / "nowhere")]
    for extra, env in (([], "1"), (["--debug"], "")):
        monkeypatch.setenv("MEGATRON_CPPO_DEBUG", env)
        assert cli.main(argv + extra) == 2
        err = capsys.readouterr().err
        assert "Traceback" in err and err.count("error: ") == 1 and "nowhere" in err
