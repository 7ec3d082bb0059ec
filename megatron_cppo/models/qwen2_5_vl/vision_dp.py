"""Data parallelism inside the tensor-parallel group for a replicated vision encoder ("dp_in_tp").

Where the ViT cannot (or should not) be sharded over TP (Qwen2.5-VL's MLP width 3420 does not
divide by 8), every TP rank holds the whole ViT, encodes a contiguous share of the micro-batch's
images, and the merged embeddings are all-gathered so that every TP rank splices the same full set
into the sequence.

Gradients (which group, what reduction):
  * ``gather_rows`` forward: all-gather over the TP group. Backward: no collective. The gradient
    reaching the gathered embeddings is already complete and identical on every TP rank (the LM's
    first column-parallel layer all-reduces its input gradient over TP), so each rank keeps the rows
    of its own images.
  * The ViT weights then hold partial gradients (own images only); the true gradient is their SUM
    over TP. megatron's ``finalize_model_grads`` AVG-reduces over TP every parameter tagged
    ``average_gradients_across_tp_domain``; ``gather_rows`` therefore scales the kept gradient by
    ``grad_scale`` = TP size, so that AVG of (TP * partial) = SUM of partials, exactly in binary
    floating point for power-of-two TP. Callers without megatron's finalize use
    ``allreduce_replicated_grads``, which does the same AVG.

Shapes: rows_NH [rows on this rank, hidden], grid_N3 [images, (t, h, w)].
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
import torch.distributed as dist

_SINGLETON_GROUPS: dict[int, dist.ProcessGroup] = {}


def singleton_group() -> dist.ProcessGroup:
    """A process group holding only this rank (TP size 1 for replicated megatron layers).

    Created once per process with local synchronisation: other ranks do not take part."""
    rank = dist.get_rank()
    if rank not in _SINGLETON_GROUPS:
        _SINGLETON_GROUPS[rank] = dist.new_group([rank], use_local_synchronization=True)
    return _SINGLETON_GROUPS[rank]


def split_images(num_patches: Sequence[int], num_ranks: int) -> list[tuple[int, int]]:
    """Contiguous image ranges [start, end) per rank, balanced by patch count.

    Image i goes to the rank whose share of the cumulative patch count holds its midpoint, so the
    ranges are contiguous and in order (the all-gathered rows come back in image order). A rank may
    get no image (fewer images than ranks)."""
    total = sum(num_patches)
    owner = []
    before = 0
    for n in num_patches:
        mid = before + n / 2
        owner.append(min(num_ranks - 1, int(mid * num_ranks // total)) if total else 0)
        before += n
    ranges = []
    for r in range(num_ranks):
        mine = [i for i, o in enumerate(owner) if o == r]
        start = mine[0] if mine else (ranges[-1][1] if ranges else 0)
        ranges.append((start, mine[-1] + 1 if mine else start))
    return ranges


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows_NH, counts, rank, group, grad_scale):
        width = max(counts)
        padded = rows_NH.new_zeros((width,) + tuple(rows_NH.shape[1:]))
        padded[: rows_NH.shape[0]] = rows_NH
        parts = [torch.empty_like(padded) for _ in counts]
        dist.all_gather(parts, padded.contiguous(), group=group)
        ctx.offset = sum(counts[:rank])
        ctx.count = counts[rank]
        ctx.grad_scale = grad_scale
        return torch.cat([p[:c] for p, c in zip(parts, counts)], dim=0)

    @staticmethod
    def backward(ctx, grad_all):
        grad_mine = grad_all[ctx.offset: ctx.offset + ctx.count]
        if ctx.grad_scale != 1:
            grad_mine = grad_mine * ctx.grad_scale
        return grad_mine, None, None, None, None


def gather_rows(rows_NH: torch.Tensor, counts: Sequence[int], group: dist.ProcessGroup, *,
                grad_scale: float = 1.0) -> torch.Tensor:
    """Concatenate every rank's rows (rank order) on every rank of ``group``.

    ``counts[r]`` is the number of rows of rank r (known to all ranks: no size exchange).
    Backward keeps this rank's slice of the gradient times ``grad_scale`` (see module doc)."""
    counts = [int(c) for c in counts]
    rank = dist.get_rank(group)
    if rows_NH.shape[0] != counts[rank]:
        raise ValueError(f"rank {rank} has {rows_NH.shape[0]} rows, counts say {counts[rank]}")
    if len(counts) == 1:
        return rows_NH
    if max(counts) == 0:
        return rows_NH[:0]
    return _GatherRows.apply(rows_NH, counts, rank, group, grad_scale)


def mark_replicated(params: Iterable[torch.nn.Parameter]) -> None:
    """Tag parameters replicated over TP whose gradients megatron must reduce over TP.

    megatron's TP layers mark their weights ``tensor_model_parallel`` even at TP size 1; those
    flags are cleared so that grad-norm and checkpointing count each replicated weight once."""
    for p in params:
        p.tensor_model_parallel = False
        p.partition_dim = -1
        p.partition_stride = 1
        p.average_gradients_across_tp_domain = True


def allreduce_replicated_grads(modules: Iterable[torch.nn.Module],
                               tp_group: dist.ProcessGroup) -> None:
    """AVG-reduce over ``tp_group`` the gradients (``main_grad`` if present, else ``grad``) of
    parameters tagged by ``mark_replicated``: what megatron's ``finalize_model_grads`` does, for
    callers that do not use it. Parameters without a gradient are skipped on every rank alike
    (the ViT always runs, so every rank has the same set)."""
    if dist.get_world_size(tp_group) == 1:
        return
    grads = []
    for module in modules:
        for p in module.parameters():
            if getattr(p, "average_gradients_across_tp_domain", False):
                g = getattr(p, "main_grad", None)
                g = p.grad if g is None else g
                if g is not None:
                    grads.append(g)
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=tp_group)
    flat /= dist.get_world_size(tp_group)
    offset = 0
    for g in grads:
        g.copy_(flat[offset: offset + g.numel()].view_as(g))
        offset += g.numel()
