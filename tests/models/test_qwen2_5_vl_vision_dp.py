"""The dp_in_tp primitive (megatron_cppo/models/qwen2_5_vl/vision_dp.py): image split and the row
all-gather.

``split_images`` is pure. ``gather_rows`` runs on 2 gloo ranks against the single-process
computation: forward = rows of all ranks in rank order (uneven counts, a rank with no rows);
backward = each rank's slice of the (identical) upstream gradient times grad_scale, so that the
AVG over TP of a replicated weight's gradient equals the full-batch gradient (checked with a
linear "encoder" whose weight is replicated). fp32, exact up to summation order (1e-6).
"""

from __future__ import annotations

import pytest
import torch

from helpers.distributed import run_on_ranks
from megatron_cppo.models.qwen2_5_vl.vision_dp import split_images


def test_split_images_contiguous_and_balanced():
    assert split_images([96, 24, 24, 16], 2) == [(0, 1), (1, 4)]
    assert split_images([10, 10, 10, 10], 4) == [(0, 1), (1, 2), (2, 3), (3, 4)]
    assert split_images([50], 2) == [(0, 0), (0, 1)]  # one image: the first rank gets none
    assert split_images([4], 4) == [(0, 0), (0, 0), (0, 1), (1, 1)]
    for sizes, ranks in (([3, 7, 1, 9, 4, 4], 3), ([1] * 7, 4), ([5, 100, 5], 2)):
        ranges = split_images(sizes, ranks)
        assert ranges[0][0] == 0 and ranges[-1][1] == len(sizes)
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))


def _gather_check(ranks):
    import torch.distributed as dist

    from megatron_cppo.models.qwen2_5_vl.vision_dp import (
        allreduce_replicated_grads,
        gather_rows,
        mark_replicated,
    )

    torch.manual_seed(0)
    images = [torch.randn(n, 8) for n in (3, 5, 2)]  # per image: rows of "patch features"
    weight_ref = torch.randn(8, 4)
    upstream = torch.randn(10, 4)  # dL/d(all rows), the same on every rank (as after the LM)

    # single-process reference: encode all images, loss = <all rows, upstream>
    w = weight_ref.clone().requires_grad_(True)
    (torch.cat(images) @ w * upstream).sum().backward()
    ref_grad = w.grad.clone()

    ranges = [(0, 2), (2, 3)]  # images 0-1 on rank 0, image 2 on rank 1
    start, end = ranges[ranks.rank]
    enc = torch.nn.Linear(8, 4, bias=False)
    with torch.no_grad():
        enc.weight.copy_(weight_ref.t())
    mark_replicated(enc.parameters())
    local = enc(torch.cat(images[start:end]))
    counts = [sum(x.shape[0] for x in images[s:e]) for s, e in ranges]
    rows = gather_rows(local, counts, ranks.group, grad_scale=2)
    fwd_err = float((rows - torch.cat(images) @ weight_ref).abs().max())
    (rows * upstream).sum().backward()
    allreduce_replicated_grads([enc], ranks.group)
    grad_err = float((enc.weight.grad.t() - ref_grad).abs().max())

    # a rank with no rows still takes part and gets a zero gradient
    enc.weight.grad = None
    empty = enc(torch.zeros(1, 8))[:0] if ranks.rank == 1 else enc(torch.cat(images))
    rows = gather_rows(empty, [10, 0], ranks.group, grad_scale=2)
    (rows * upstream).sum().backward()
    zero_ok = ranks.rank == 0 or float(enc.weight.grad.abs().max()) == 0.0
    dist.barrier()
    return fwd_err, grad_err, zero_ok


@pytest.mark.slow
def test_gather_rows_forward_backward():
    for fwd_err, grad_err, zero_ok in run_on_ranks(_gather_check, 2, megatron=False, timeout=120):
        assert fwd_err <= 1e-6 and grad_err <= 1e-6 and zero_ok
