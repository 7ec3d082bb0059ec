"""Run a function on N local ranks, one spawned process each, the way torchrun would.

For tools that launch their own ranks (``megatron-cppo-convert verify``) and for the multi-rank test
harness. Each rank gets the env:// variables (MASTER_ADDR/PORT on a free loopback port, RANK,
LOCAL_RANK, WORLD_SIZE) and, without CUDA, one CPU thread (the ranks share the cores). ``fn`` does its
own process-group set-up and, on success, its teardown; its return value comes back per rank.

Failure handling: as soon as one rank fails, its peers (likely blocked in a collective with it) are
stopped, and ``RanksFailed`` carries every failed rank's exception and traceback. A rank that neither
finishes nor fails within ``timeout`` seconds is killed and reported as such.
"""

from __future__ import annotations

import os
import pickle
import socket
import tempfile
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Optional


@dataclass
class RankError:
    rank: int
    exit_code: Optional[int]
    message: str  # "ExceptionType: text", or why there is no result
    traceback: str
    user_error: bool  # a ValueError / OSError: bad input rather than a bug


class RanksFailed(RuntimeError):
    def __init__(self, what: str, errors: list[RankError], timed_out: bool):
        self.errors, self.timed_out = errors, timed_out
        lines = [what + (" (timed out)" if timed_out else "")]
        for e in errors:
            lines.append(f"--- rank {e.rank} (exit code {e.exit_code}): {e.message}")
            if e.traceback:
                lines.append(e.traceback)
        super().__init__("\n".join(lines))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(local_rank, world_size, port, outdir, fn, args, kwargs):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(local_rank),
                      LOCAL_RANK=str(local_rank), WORLD_SIZE=str(world_size))
    import torch

    if not torch.cuda.is_available():
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)
    path = os.path.join(outdir, f"rank{local_rank}")
    try:
        report = ("ok", fn(*args, **kwargs))
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        report = ("error", (f"{type(e).__name__}: {e}", traceback.format_exc(),
                            isinstance(e, (ValueError, OSError))))
    with open(path + ".tmp", "wb") as f:
        pickle.dump(report, f)
    os.replace(path + ".tmp", path)
    if report[0] != "ok":
        os._exit(1)  # skip interpreter teardown: peers may be blocked in a collective with us


def run_local_ranks(fn: Callable, world_size: int, *, args: tuple = (),
                    kwargs: Optional[dict] = None, timeout: float = 3600.0,
                    what: Optional[str] = None) -> list[Any]:
    """``fn(*args, **kwargs)`` on ``world_size`` spawned ranks; the per-rank results in rank order.
    ``fn`` must be picklable (a module-level function)."""
    import torch.multiprocessing as mp

    what = what or f"{getattr(fn, '__name__', fn)} on {world_size} ranks"
    with tempfile.TemporaryDirectory(prefix="mcppo_ranks_") as outdir:
        ctx = mp.start_processes(_entry, args=(world_size, free_port(), outdir, fn, args,
                                               kwargs or {}),
                                 nprocs=world_size, join=False, start_method="spawn")
        procs = ctx.processes
        deadline = time.monotonic() + timeout
        timed_out = False
        while any(p.is_alive() for p in procs):
            if any(p.exitcode not in (None, 0) for p in procs):
                # give the other ranks that fail on the same input a moment to report it
                grace = time.monotonic() + 2.0
                while any(p.is_alive() for p in procs) and time.monotonic() < grace:
                    time.sleep(0.05)
                break
            if time.monotonic() > deadline:
                timed_out = True
                break
            time.sleep(0.05)
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join()

        results, errors = [], []
        for rank, p in enumerate(procs):
            path = os.path.join(outdir, f"rank{rank}")
            report = None
            if os.path.exists(path):
                with open(path, "rb") as f:
                    report = pickle.load(f)
            if report is not None and report[0] == "ok" and p.exitcode == 0:
                results.append(report[1])
            elif report is not None and report[0] == "error":
                message, tb, user = report[1]
                errors.append(RankError(rank, p.exitcode, message, tb, user))
            elif report is not None:
                errors.append(RankError(rank, p.exitcode, "finished, then failed at exit", "",
                                        False))
            else:
                why = "killed after the timeout" if timed_out else "stopped without a result"
                errors.append(RankError(rank, p.exitcode, why, "", False))
        if errors:
            raise RanksFailed(what, errors, timed_out)
        return results
