"""Console scripts return an int exit status (never a list: the console-script wrapper would turn
it into status 1), and the ``megatron-cppo`` command dispatches its subcommands. In-process."""

import re
from pathlib import Path

import pytest

from megatron_cppo import cli, train


def test_train_bad_flag_is_exit_2_naming_the_flag(capsys):
    assert train.main(["--lr", "0"]) == 2
    assert re.search(r"^error: --lr: ", capsys.readouterr().err, re.M)


def test_a_failed_engine_is_exit_1_with_one_error_line(capsys, monkeypatch):
    """A runtime failure (here the engine's, as VLLMRolloutSource raises it on every rank) is
    status 1, not the bad-input status 2: one error line, no traceback."""
    from megatron_cppo.rollout.source import EngineFailure
    from megatron_cppo.training import run as run_module
    from megatron_cppo.training import start as start_module

    def died(cfg, start):
        raise EngineFailure("rollout: RuntimeError: the vLLM engine process died (exit code -9)")

    monkeypatch.setattr(start_module, "resolve_start", lambda cfg: (cfg, None))
    monkeypatch.setattr(run_module, "run", died)
    assert train.main(["--train-iters", "1", "--tensor-model-parallel-size", "1"]) == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == ("error: rollout: RuntimeError: the vLLM engine "
                                           "process died (exit code -9)")
    assert "Traceback" not in err


def test_megatron_cppo_dispatch(capsys, tmp_path):
    assert cli.main(["--help"]) == 0
    assert "train" in capsys.readouterr().out
    assert cli.main([]) == 2
    assert cli.main(["bogus"]) == 2
    assert cli.main(["train", "--cpl-tau", "0"]) == 2
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:  # eval needs a model and benchmark files
        cli.main(["eval"])
    assert e.value.code == 2 and "--hf-dir" in capsys.readouterr().err
    assert cli.main(["eval", "--hf-dir", str(tmp_path), "--data-path", str(tmp_path / "x")]) == 2
    assert "error: --data-path: " in capsys.readouterr().err
    status = cli.main(["convert", "hf-to-megatron", "--hf-dir", str(tmp_path / "missing"),
                       "--out", str(tmp_path / "out")])
    assert isinstance(status, int) and status == 2
    with pytest.raises(SystemExit) as e:  # argparse's own --help exits 0
        cli.main(["train", "--help"])
    assert e.value.code == 0


def test_console_scripts_point_at_int_returning_mains():
    setup = (Path(__file__).resolve().parents[2] / "setup.py").read_text()
    for name, target in (("megatron-cppo", "megatron_cppo.cli:main"),
                         ("megatron-cppo-train", "megatron_cppo.train:main"),
                         ("megatron-cppo-convert", "megatron_cppo.convert.cli:main")):
        assert f'"{name}={target}"' in setup
    for fn in (cli.main, train.main):
        assert fn.__annotations__.get("return") in ("int", int)
