"""megatron_cppo training entry: CPPO for Qwen2.5-VL with Megatron-LM style flags.

    torchrun --nproc-per-node 8 -m megatron_cppo.train --tensor-model-parallel-size 2 \
        --pipeline-model-parallel-size 2 --hf-dir Qwen2.5-VL-7B-Instruct --data-path train.parquet
    megatron-cppo train                  # the built-in default (configs/tiny_cpu.yaml), 2 ranks
    megatron-cppo train --train-iters 8  # the same with a flag overridden

Launch (the local ranks, when started outside torchrun), parse the flags (training/config.py;
every flag: ``megatron-cppo train --help``), resolve the start point (training/start.py), run
the phases (training/run.py: warm start, evaluate, train; ``train_step`` is
training/trainer.py).

Without ``--config``, ``--hf-dir`` and ``--data-path`` the run is the built-in default:
``megatron_cppo/configs/tiny_cpu.yaml`` under the given flags, with the tiny Qwen2.5-VL and the
built-in dataset prepared offline on first use (training/builtin.py, from resolve_start).
Started outside torchrun (no ``LOCAL_RANK`` in the environment), a run that needs tp x pp > 1
processes launches itself on this machine with that many (``torch.distributed.run
--standalone``, one data-parallel replica).

Exit status: 0; 2 for bad flags or input (one ``error:`` line naming the flag or file); 1 for a
runtime failure: the rollout engine did not start, died or failed a request, or a checkpoint
could not be written (one ``error:`` line from rank 0 naming the directory, the cause and the
last complete checkpoint); 128 + N when the launcher was stopped by signal N.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Optional, Sequence

BUILTIN_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs",
                              "tiny_cpu.yaml")
_RUN_SOURCES = ("--config", "--hf-dir", "--data-path")


def with_builtin_defaults(argv: Sequence[str]) -> list[str]:
    """``argv`` with ``--config <the built-in default>`` in front when it names no config, HF
    model or data of its own (flags win over the YAML; ``--load`` alone continues a built-in
    run, e.g. from ``megatron-cppo sft``)."""
    argv = list(argv)
    named = {a.split("=", 1)[0] for a in argv if a.startswith("--")}
    if named & set(_RUN_SOURCES):
        return argv
    return ["--config", BUILTIN_CONFIG] + argv


def _exit_with_launcher() -> None:
    """A rank under torchrun: end it when the launcher dies (kill -9, the OOM killer) instead of
    training on as an orphan. The launcher is ``megatron-cppo train`` itself when it launched the
    local ranks (its pid in the environment), else torchrun's agent (this process's parent)."""
    from megatron_cppo.parallel.lifetime import LAUNCHER_PID_ENV, exit_with_parent

    pid = os.environ.get(LAUNCHER_PID_ENV)
    if pid is None and "TORCHELASTIC_RUN_ID" not in os.environ:
        return  # not started by torchrun (e.g. srun per rank): the launcher handles its ranks
    launcher = int(pid) if pid else os.getppid()
    exit_with_parent(launcher, message=f"error: rank {os.environ.get('RANK', '?')}: its "
                     f"launcher (pid {launcher}) is gone; stopping")


def _launch_local(argv: list[str], nproc: int) -> int:
    """Run this entry under torchrun's launcher (in this process) with ``nproc`` local ranks;
    returns the exit status. A rank that exits with 1 or 2 has printed its own one-line error
    (or, for a bug, its traceback); for a rank killed by a signal or another status the launcher
    prints one line naming it. Never torchrun's failure table."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser
    from torch.distributed.run import run as torchrun

    from megatron_cppo.parallel.lifetime import LAUNCHER_PID_ENV

    os.environ.setdefault("OMP_NUM_THREADS", "1")  # ranks share the cores: no oversubscription
    os.environ[LAUNCHER_PID_ENV] = str(os.getpid())  # the ranks end if this process dies
    args = get_args_parser().parse_args(["--standalone", f"--nproc-per-node={nproc}", "-m",
                                         "megatron_cppo.train", *argv])
    # torchrun's own log lines (ranks being stopped, "failed (exitcode: 1)") would come after the
    # failing rank's one error line; each of its modules has its own logger and level
    for name, log in list(logging.root.manager.loggerDict.items()):
        if name.startswith("torch.distributed.elastic") and isinstance(log, logging.Logger):
            log.setLevel(logging.CRITICAL)
    print(f"launching {nproc} local ranks: torchrun --standalone --nproc-per-node={nproc} "
          f"-m megatron_cppo.train {' '.join(argv)}", flush=True)
    try:
        torchrun(args)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        code = failure.exitcode
        status = 128 - code if code < 0 else code  # a negative exit code is a signal number
        if code < 0 or code not in (1, 2):  # 1 and 2: the rank printed its own error line
            how = f"signal {-code}" if code < 0 else f"status {code}"
            print(f"error: rank {rank} exited with {how}", file=sys.stderr, flush=True)
        return status if 0 < status < 256 else 1
    except SignalException as e:  # SIGINT / SIGTERM to the launcher: the ranks were stopped
        return 128 + int(e.sigval)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    from megatron_cppo.platform import quiet_library_warnings

    quiet_library_warnings()  # before megatron-core is imported (launcher and every rank)
    from megatron_cppo.rollout.source import EngineFailure
    from megatron_cppo.training.checkpoint import CheckpointSaveError
    from megatron_cppo.training.config import parse_config
    from megatron_cppo.training.run import run
    from megatron_cppo.training.start import resolve_start

    argv = with_builtin_defaults(sys.argv[1:] if argv is None else argv)
    launched = "LOCAL_RANK" in os.environ
    if launched:
        _exit_with_launcher()
    try:
        cfg = parse_config(argv)
        nproc = cfg.parallel.model_parallel_size
        if not launched and nproc > 1:
            return _launch_local(argv, nproc)
        for key, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1",
                               MASTER_ADDR="127.0.0.1", MASTER_PORT="29511").items():
            os.environ.setdefault(key, value)  # one process without torchrun
        cfg, start = resolve_start(cfg)
        run(cfg, start)
    except ValueError as e:  # bad flags or input: one line naming the flag / file
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except (EngineFailure, CheckpointSaveError) as e:  # runtime failures, raised on every rank
        if os.environ.get("RANK", "0") == "0":  # alike: one line, from rank 0
            print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
