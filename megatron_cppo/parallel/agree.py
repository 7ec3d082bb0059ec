"""All ranks agree on an outcome: the one place the job decides together whether something worked.

    stepped = all_true(loss_finite and grad_finite, device=state.device)   # a vote
    agree(error, "saving the checkpoint")                                 # errors: raise everywhere
    payloads = agree(error, "refitting", payload=status, group=group)      # ... and gather results

A rank that fails must still reach the agreement (catch, then agree): the collective is what keeps
the other ranks from waiting forever in their next one, and every rank then raises, so the job
ends with the cause rather than a hang. Used by the update (skip a non-finite step everywhere),
the training checkpoint and the checkpoint store (save and metadata checks) and the refit.
"""

from __future__ import annotations

from typing import Any, Union

import torch
import torch.distributed as dist

__all__ = ["agree", "all_true"]


def all_true(flag: bool, *, group=None, device=None) -> bool:
    """True on every rank iff ``flag`` is True on every rank of ``group`` (MIN all-reduce of one
    integer on ``device``, the backend's device: a CUDA tensor for NCCL)."""
    t = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group)
    return bool(t.item())


def agree(error: Union[None, str, BaseException], what: str, *, payload: Any = None,
          group=None, error_type: type = RuntimeError) -> list:
    """Collective over ``group`` (default: every rank). ``error``: this rank's failure (an
    exception or a message), None if it succeeded. When no rank failed, returns every rank's
    ``payload`` in rank order. Otherwise raises on every rank: its own exception where it had one
    (a message becomes ``error_type(message)``), else ``error_type`` naming the first rank that
    failed, what it was doing and its message."""
    message = None
    if error is not None:
        message = str(error) if isinstance(error, str) else f"{type(error).__name__}: {error}"
    out: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, (message, payload), group=group)
    failed = [(r, m) for r, (m, _) in enumerate(out) if m is not None]
    if failed:
        if isinstance(error, BaseException):
            raise error
        if error is not None:
            raise error_type(error)
        r, m = failed[0]
        rank = dist.get_global_rank(group, r) if group is not None else r
        raise error_type(f"rank {rank} failed while {what}: {m}")
    return [p for _, p in out]
