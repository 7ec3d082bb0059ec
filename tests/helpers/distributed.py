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

from dataclasses import dataclass
from typing import Any, Callable, Optional

from megatron_cppo.parallel.launch import RanksFailed, run_local_ranks


@dataclass
class Ranks:
    rank: int
    world_size: int
    group: Any


class DistributedTestFailure(AssertionError):
    pass


def _rank(fn, args, kwargs, megatron, parallel_kwargs, collective_timeout_min):
    """One rank: set up the groups, run the check, tear down (only reached on success)."""
    import datetime

    import torch.distributed as dist

    if megatron:
        from megatron_cppo.parallel import ParallelConfig, destroy_parallel, initialize_parallel

        state = initialize_parallel(ParallelConfig(
            distributed_timeout_minutes=collective_timeout_min, **parallel_kwargs))
    else:
        from megatron_cppo import platform

        platform.activate()
        dist.init_process_group("gloo", timeout=datetime.timedelta(
            minutes=collective_timeout_min))
        state = Ranks(rank=dist.get_rank(), world_size=dist.get_world_size(),
                      group=dist.group.WORLD)
    result = fn(state, *args, **kwargs)
    if megatron:
        destroy_parallel()
    else:
        dist.barrier()
        dist.destroy_process_group()
    return result


def run_on_ranks(fn: Callable, world_size: int, *, args: tuple = (),
                 kwargs: Optional[dict] = None, megatron: bool = True, tp: int = 1, pp: int = 1,
                 vpp: Optional[int] = None, timeout: float = 300.0,
                 collective_timeout_min: int = 3, **parallel_kwargs) -> list:
    """Run ``fn`` on ``world_size`` spawned gloo ranks; return the per-rank results."""
    if megatron:
        parallel_kwargs.update(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                               virtual_pipeline_model_parallel_size=vpp)
    what = (f"{fn.__name__} on {world_size} ranks"
            + (f" (tp={tp}, pp={pp}, vpp={vpp})" if megatron else ""))
    try:
        return run_local_ranks(_rank, world_size, timeout=timeout, what=what,
                               args=(fn, args, kwargs or {}, megatron, parallel_kwargs,
                                     collective_timeout_min))
    except RanksFailed as e:
        raise DistributedTestFailure(str(e)) from None
