"""The multi-rank harness itself: results come back in rank order, a failure on one rank surfaces
with that rank's traceback (and does not hang the others), groups match megatron's layout."""

import pytest
import torch
import torch.distributed as dist

from helpers.distributed import DistributedTestFailure, run_on_ranks

pytestmark = pytest.mark.slow  # spawned ranks


def _allreduce_and_layout(state):
    t = torch.tensor([float(state.rank)])
    dist.all_reduce(t)
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    with get_cuda_rng_tracker().fork():  # the tensor-parallel-region stream (dropout inside TP)
        tp_region = torch.rand(4)
    return dict(rank=state.rank, sum=t.item(), tp_region=tp_region, tp=state.tp_rank, pp=state.pp_rank,
                dp=state.dp_rank, tp_ranks=dist.get_process_group_ranks(state.tp_group),
                pp_ranks=dist.get_process_group_ranks(state.pp_group))


def _fail_on_rank_1(state):
    if state.rank == 1:
        raise ValueError("boom on rank one")
    t = torch.zeros(1)
    dist.all_reduce(t)  # rank 0 blocks here until it is stopped
    return "unreachable"


def test_results_and_megatron_layout():
    res = run_on_ranks(_allreduce_and_layout, 4, tp=2, pp=2)
    assert [r["rank"] for r in res] == [0, 1, 2, 3]
    assert all(r["sum"] == 6.0 for r in res)
    assert [r["tp_ranks"] for r in res] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert [r["pp_ranks"] for r in res] == [[0, 2], [1, 3], [0, 2], [1, 3]]
    assert [(r["tp"], r["pp"]) for r in res] == [(0, 0), (1, 0), (0, 1), (1, 1)]
    # the CPU RNG tracker: TP-region streams differ across TP ranks, agree across PP ranks
    assert not torch.equal(res[0]["tp_region"], res[1]["tp_region"])
    assert torch.equal(res[0]["tp_region"], res[2]["tp_region"])
    assert torch.equal(res[1]["tp_region"], res[3]["tp_region"])


def test_failure_names_rank_and_traceback():
    with pytest.raises(DistributedTestFailure) as info:
        run_on_ranks(_fail_on_rank_1, 2, megatron=False, timeout=120)
    msg = str(info.value)
    assert "rank 1" in msg and "boom on rank one" in msg and "_fail_on_rank_1" in msg
