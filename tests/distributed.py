"""Multi-rank test harness: run a function on N gloo ranks from a pytest test.

    results = run_on_ranks(check_fn, world_size=4, tp=2, pp=2, args=(...))

``check_fn(state, *args)`` must be a module-level (picklable) function. It receives a
``megatron_cppo.parallel.ParallelState`` (megatron parallelism initialised for (tp, pp, vpp), data
parallel = the rest) or, with ``megatron=False``, a ``Ranks`` object (rank, world_size, group=WORLD).
Its return value (picklable) is collected per rank; the list is returned in rank order.

One launch costs 5-15 s of process start-up on a 2-core machine, so a launch should run many checks.

Failures: an exception on any rank stops every rank and becomes one pytest failure carrying each
failed rank's traceback. A rank that neither finishes nor fails within ``timeout`` seconds (a hang in a
collective) fails the test as well; collectives themselves time out after ``collective_timeout_min``.
Process groups are always destroyed (megatron's and the default group), also after a failure.
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

import torch.multiprocessing as mp


@dataclass
class Ranks:
    rank: int
    world_size: int
    group: Any


class DistributedTestFailure(AssertionError):
    pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(local_rank, world_size, port, outdir, fn, args, kwargs, megatron, parallel_kwargs,
            collective_timeout_min):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(local_rank),
                      LOCAL_RANK=str(local_rank), WORLD_SIZE=str(world_size), OMP_NUM_THREADS="1")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    status_path = os.path.join(outdir, f"rank{local_rank}")
    try:
        if megatron:
            from megatron_cppo.parallel import ParallelConfig, initialize_parallel

            cfg = ParallelConfig(distributed_timeout_minutes=collective_timeout_min,
                                 **parallel_kwargs)
            state = initialize_parallel(cfg)
        else:
            import datetime

            from megatron_cppo import platform

            platform.activate()
            dist.init_process_group("gloo", timeout=datetime.timedelta(
                minutes=collective_timeout_min))
            state = Ranks(rank=local_rank, world_size=world_size, group=dist.group.WORLD)
        result = fn(state, *args, **kwargs)
        with open(status_path + ".tmp", "wb") as f:
            pickle.dump(("ok", result), f)
        os.replace(status_path + ".tmp", status_path)
    except BaseException:
        with open(status_path + ".tmp", "wb") as f:
            pickle.dump(("error", traceback.format_exc()), f)
        os.replace(status_path + ".tmp", status_path)
        os._exit(1)  # skip teardown: peers may be blocked in a collective with us
    finally:
        pass
    try:
        if megatron:
            from megatron_cppo.parallel import destroy_parallel

            destroy_parallel()
        elif dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
    except BaseException:
        os._exit(2)


def run_on_ranks(fn: Callable, world_size: int, *, args: tuple = (),
                 kwargs: Optional[dict] = None, megatron: bool = True, tp: int = 1, pp: int = 1,
                 vpp: Optional[int] = None, timeout: float = 300.0,
                 collective_timeout_min: int = 3, **parallel_kwargs) -> list:
    """Run ``fn`` on ``world_size`` spawned gloo ranks; return the per-rank results."""
    if megatron:
        parallel_kwargs.update(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                               virtual_pipeline_model_parallel_size=vpp)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory(prefix="mcppo_ranks_") as outdir:
        ctx = mp.start_processes(
            _worker,
            args=(world_size, _free_port(), outdir, fn, args, kwargs or {}, megatron,
                  parallel_kwargs, collective_timeout_min),
            nprocs=world_size, join=False, start_method="spawn")
        procs = ctx.processes
        deadline = time.monotonic() + timeout
        timed_out = False
        while any(p.is_alive() for p in procs):
            if any(p.exitcode not in (None, 0) for p in procs):
                break
            if time.monotonic() > deadline:
                timed_out = True
                break
            time.sleep(0.05)
        # A rank that failed makes its peers hang in the next collective: stop them.
        grace = time.monotonic() + 5
        while any(p.is_alive() for p in procs) and time.monotonic() < grace and not timed_out:
            time.sleep(0.05)
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join()

        results, errors = [], []
        for rank, p in enumerate(procs):
            path = os.path.join(outdir, f"rank{rank}")
            if os.path.exists(path):
                with open(path, "rb") as f:
                    status, payload = pickle.load(f)
            else:
                status, payload = "missing", None
            if status == "ok" and p.exitcode == 0:
                results.append(payload)
            elif status == "error":
                errors.append(f"--- rank {rank} (exit code {p.exitcode}) raised:\n{payload}")
            elif status == "ok":
                errors.append(f"--- rank {rank} finished but failed at teardown "
                              f"(exit code {p.exitcode})")
            else:
                why = "was killed after the timeout" if timed_out else "was stopped"
                errors.append(f"--- rank {rank} {why} (exit code {p.exitcode}) without a result")
        if errors:
            head = (f"{fn.__name__} on {world_size} ranks"
                    + (f" (tp={tp}, pp={pp}, vpp={vpp})" if megatron else ""))
            if timed_out:
                head += f": timed out after {timeout:.0f} s"
            raise DistributedTestFailure(head + "\n" + "\n".join(errors))
        return results
