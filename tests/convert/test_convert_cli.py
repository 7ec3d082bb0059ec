"""The converter's command-line surface: the five subcommands with exactly the issues' flags (plus
--overwrite, --no-progress, --max-shard-size, --debug and verify's tolerances), every flag
documented, the
installed console script and tools/convert/convert.py both answer --help. Freezing the surface here
makes a new or renamed flag a deliberate change (docs/checkpoints.md lists the commands)."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_cppo.convert import cli

ROOT = Path(__file__).resolve().parents[2]

SPLIT = {"--decoder-first-pipeline-num-layers", "--decoder-last-pipeline-num-layers"}
WRITE = {"--overwrite", "--no-progress", "--allow-non-finite", "--debug"}
# the trainer's (Megatron-LM's) names, with --tp / --pp as short aliases
LAYOUT = {"--tensor-model-parallel-size", "--tp", "--pipeline-model-parallel-size", "--pp",
          "--vision-parallel-mode"}
SURFACE = {
    "hf-to-megatron": {"--hf-dir", "--out", "--dtype"} | LAYOUT | SPLIT | WRITE,
    "megatron-to-hf": {"--megatron-dir", "--out", "--max-shard-size", "--hf-layout"} | WRITE,
    "reshard": {"--megatron-dir", "--out"} | LAYOUT | SPLIT | WRITE,
    "check": {"--megatron-dir", "--debug"},
    "verify": {"--hf-dir", "--megatron-dir", "--inputs", "--dump-logits", "--tolerance",
               "--kl-tolerance", "--debug"},
}


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def test_surface_is_frozen_and_every_flag_has_help():
    subs = _subparsers(cli.build_parser())
    assert set(subs) == set(SURFACE)
    for name, sub in subs.items():
        flags = {s for a in sub._actions for s in a.option_strings} - {"--help", "-h"}
        assert flags == SURFACE[name], name
        assert sub.description and len(sub.description) > 80, name
        for action in sub._actions:
            if action.option_strings and action.dest != "help":
                assert action.help and len(action.help) > 15, (name, action.option_strings)


def test_choices_and_defaults_follow_the_issue():
    p = cli.build_parser()
    a = p.parse_args(["hf-to-megatron", "--hf-dir", "h", "--out", "o"])
    assert (a.tp, a.pp, a.vision_parallel_mode, a.dtype, a.overwrite) == (1, 1, "auto", None,
                                                                           False)
    a = p.parse_args(["hf-to-megatron", "--hf-dir", "h", "--out", "o", "--tp", "2", "--pp", "4",
                      "--vision-parallel-mode", "dp_in_tp", "--dtype", "fp16"])
    assert (a.tp, a.pp, a.vision_parallel_mode, a.dtype) == (2, 4, "dp_in_tp", "fp16")
    a = p.parse_args(["hf-to-megatron", "--hf-dir", "h", "--out", "o",
                      "--tensor-model-parallel-size", "4", "--pipeline-model-parallel-size", "2"])
    assert (a.tp, a.pp) == (4, 2)
    with pytest.raises(SystemExit):  # the old flag name is no prefix of the new one
        p.parse_args(["hf-to-megatron", "--hf-dir", "h", "--out", "o", "--vision-parallel", "tp"])
    a = p.parse_args(["verify", "--hf-dir", "h", "--megatron-dir", "m"])
    assert (a.inputs, a.dump_logits, a.tolerance, a.kl_tolerance) == (None, None, None, None)
    a = p.parse_args(["megatron-to-hf", "--megatron-dir", "m", "--out", "o",
                      "--max-shard-size", "2GiB"])
    assert a.max_shard_size == 2 * 2**30 and a.hf_layout == "source"
    a = p.parse_args(["reshard", "--megatron-dir", "m", "--out", "o", "--tp", "1", "--pp", "3",
                      "--decoder-first-pipeline-num-layers", "1",
                      "--decoder-last-pipeline-num-layers", "2"])
    assert cli._split(a) == dict(decoder_first_pipeline_num_layers=1,
                                 decoder_last_pipeline_num_layers=2)


@pytest.mark.slow
def test_console_script_and_tools_entry_answer_help():
    exe = Path(sys.executable).parent / "megatron-cppo-convert"
    outputs = []
    for cmd in ([str(exe), "--help"], [sys.executable, str(ROOT / "tools/convert/convert.py"),
                                      "verify", "--help"]):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert "usage: megatron-cppo-convert" in proc.stdout
        outputs.append(proc.stdout)
    assert all(name in outputs[0] for name in SURFACE)
    assert "--dump-logits" in outputs[1] and "default tolerances" in outputs[1]
