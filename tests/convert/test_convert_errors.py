"""Every bad input the issue lists gives exit code 2, one ``error: ...`` line on stderr naming the
file and tensor (or setting), no traceback, and leaves no output directory (nor a temporary
sibling) behind: not a Qwen2.5-VL config, missing / extra / misshaped tensors, a truncated
safetensors file, TP or PP the model cannot be split into, an existing output directory (unless
--overwrite), and a directory that is not a megatron_cppo checkpoint. All in-process through
``cli.main``; one case also through ``tools/convert/convert.py`` as a real process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import convert_fixtures as cf
from megatron_cppo.convert import cli

ROOT = Path(__file__).resolve().parents[2]
QKV0 = "model.layers.0.self_attn.q_proj.weight"  # old layout: what save_pretrained writes


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    return cf.write_hf_dir(tmp_path_factory.mktemp("errors") / "hf", tied=True)


def _variant(good: Path, tmp_path: Path, edit) -> Path:
    """A copy of the good HF directory with its tensors edited by ``edit(dict) -> dict``."""
    bad = tmp_path / "hf_bad"
    shutil.copytree(good, bad)
    if edit is not None:
        path = bad / "model.safetensors"
        save_file(edit(load_file(path)), path, metadata={"format": "pt"})
    return bad


def _run_error(capsys, argv, out: Path, *needles: str) -> str:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: "), err
    assert "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[-1], f"{needle!r} not in {lines[-1]!r}"
    assert cf.no_output_left(out), list(out.parent.iterdir())
    return lines[-1]


def _h2m(hf, out, *extra):
    return ["hf-to-megatron", "--hf-dir", str(hf), "--out", str(out), "--no-progress", *extra]


def test_not_a_qwen2_5_vl_config(good, tmp_path, capsys):
    bad = _variant(good, tmp_path, None)
    config = json.loads((bad / "config.json").read_text())
    config["model_type"] = "qwen2"
    (bad / "config.json").write_text(json.dumps(config))
    _run_error(capsys, _h2m(bad, tmp_path / "out"), tmp_path / "out",
               str(bad / "config.json"), "qwen2")


def test_missing_tensor(good, tmp_path, capsys):
    bad = _variant(good, tmp_path, lambda sd: {k: v for k, v in sd.items() if k != QKV0})
    _run_error(capsys, _h2m(bad, tmp_path / "out"), tmp_path / "out",
               str(bad), "missing", "model.language_model.layers.0.self_attn.q_proj.weight")


def test_extra_tensor(good, tmp_path, capsys):
    bad = _variant(good, tmp_path, lambda sd: {**sd, "model.layers.0.mlp.extra.weight":
                                               torch.zeros(2, 2)})
    _run_error(capsys, _h2m(bad, tmp_path / "out"), tmp_path / "out",
               str(bad), "unexpected", "layers.0.mlp.extra.weight")


def test_misshaped_tensor(good, tmp_path, capsys):
    bad = _variant(good, tmp_path, lambda sd: {**sd, QKV0: sd[QKV0][:, :-1].contiguous()})
    _run_error(capsys, _h2m(bad, tmp_path / "out"), tmp_path / "out",
               str(bad / "model.safetensors"), QKV0, "shape")


def test_truncated_safetensors(good, tmp_path, capsys):
    bad = _variant(good, tmp_path, None)
    path = bad / "model.safetensors"
    os.truncate(path, path.stat().st_size - 1000)
    _run_error(capsys, _h2m(bad, tmp_path / "out"), tmp_path / "out", str(path), "truncated")


@pytest.mark.parametrize("tp,pp,extra,needle", [
    (3, 1, (), "tensor-model-parallel-size 3"),  # 4 heads, 2 query groups, MLP 128
    (1, 5, (), "pipeline-model-parallel-size 5"),  # 4 layers
    (1, 3, ("--decoder-first-pipeline-num-layers", "1"), "leave 3 of 4"),
    (1, 1, ("--decoder-last-pipeline-num-layers", "2"),
     "--decoder-last-pipeline-num-layers: needs --pipeline-model-parallel-size > 1"),
    (2, 1, ("--vision-parallel-mode", "sharded"), "--vision-parallel-mode: must be one of"),
])
def test_layout_the_model_cannot_be_split_into(good, tmp_path, capsys, tp, pp, extra, needle):
    _run_error(capsys, _h2m(good, tmp_path / "out", "--tp", str(tp), "--pp", str(pp), *extra),
               tmp_path / "out", needle)


def test_existing_output_directory_then_overwrite(good, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert cli.main(_h2m(good, out)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(out) in err and "--overwrite" in err
    assert (out / "keep.txt").read_text() == "mine"  # untouched
    assert not list(tmp_path.glob(".out.*"))

    # --overwrite replaces only a previous output: a directory of other files is refused
    assert cli.main(_h2m(good, out, "--overwrite")) == 2
    assert "not a previous output" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()  # an empty directory may be replaced
    assert cli.main(_h2m(good, out, "--overwrite")) == 0
    assert (out / "megatron_cppo.json").is_file()
    first = (out / "megatron_cppo.json").stat().st_ino
    assert cli.main(_h2m(good, out, "--overwrite")) == 0  # a previous output is replaced
    assert (out / "megatron_cppo.json").stat().st_ino != first
    assert not list(tmp_path.glob(".out.*"))  # neither the partial nor the swapped-out old dir

    # reshard: a layout the model cannot take, then an existing output
    target = tmp_path / "resharded"
    _run_error(capsys, ["reshard", "--megatron-dir", str(out), "--out", str(target), "--tp", "3",
                        "--pp", "1"], target, "tensor-model-parallel-size 3")
    target.mkdir()
    assert cli.main(["reshard", "--megatron-dir", str(out), "--out", str(target), "--tp", "1",
                     "--pp", "2", "--no-progress"]) == 2
    assert "already exists" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["megatron-to-hf", "reshard", "verify"])
def test_not_a_megatron_checkpoint(good, tmp_path, capsys, command):
    out = tmp_path / "out"
    argv = {"megatron-to-hf": ["megatron-to-hf", "--megatron-dir", str(good), "--out", str(out)],
            "reshard": ["reshard", "--megatron-dir", str(good), "--out", str(out), "--tp", "1",
                        "--pp", "1"],
            "verify": ["verify", "--hf-dir", str(good), "--megatron-dir", str(good)]}[command]
    _run_error(capsys, argv, out, str(good), "megatron_cppo.json")


def test_missing_hf_directory(tmp_path, capsys):
    _run_error(capsys, _h2m(tmp_path / "nowhere", tmp_path / "out"), tmp_path / "out",
               str(tmp_path / "nowhere"))


def test_bad_flag_values_are_usage_errors(capsys):
    for argv in (["hf-to-megatron", "--hf-dir", "a", "--out", "b", "--tp", "0"],
                 ["reshard", "--megatron-dir", "a", "--out", "b", "--tp", "2"],  # --pp missing
                 ["megatron-to-hf", "--megatron-dir", "a", "--out", "b", "--max-shard-size", "x"],
                 ["megatron-to-hf", "--megatron-dir", "a", "--out", "b", "--max-shard-size",
                  "inf"],
                 ["verify", "--hf-dir", "a", "--megatron-dir", "b", "--tolerance", "-1"]):
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        assert e.value.code == 2
        assert "error:" in capsys.readouterr().err
    # names checked against the dtype table (megatron_cppo/dtypes.py) before anything is read
    assert cli.main(["hf-to-megatron", "--hf-dir", "a", "--out", "b", "--dtype", "int8"]) == 2
    assert "error: --dtype: must be one of fp32, bf16, fp16, got 'int8'" in \
        capsys.readouterr().err


@pytest.mark.slow
def test_real_process_prints_one_line_and_exits_2(good, tmp_path):
    """tools/convert/convert.py as a user runs it (no package import path tricks by pytest)."""
    bad = _variant(good, tmp_path, lambda sd: {k: v for k, v in sd.items() if k != QKV0})
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "convert" / "convert.py"),
                           "hf-to-megatron", "--hf-dir", str(bad), "--out", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "q_proj.weight" in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert cf.no_output_left(out)
