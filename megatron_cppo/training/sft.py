"""Supervised warm start: next-token cross-entropy on the response tokens of prompt + response
samples, through the same micro-batch layout, forward step and optimizer as the CPPO update.

    samples = [Sample.from_prompt(item, response_ids, group_id=i) for ...]   # or recorded
    result = sft_step(policy.chunks, policy.optimizer, samples, ctx, scheduler=policy.scheduler)

The loss of a micro-batch is the mean negative log-likelihood over its response tokens (logits
divided by ``ctx.temperature``, normally 1 here; vocabulary rows beyond ``ctx.valid_vocab``
excluded); the schedule averages micro-batches, DDP averages ranks (models/qwen2_5_vl/forward_step.py).
"""

from __future__ import annotations

from typing import Sequence

import torch

from megatron_cppo.data.types import Sample
from megatron_cppo.models.qwen2_5_vl.forward_step import run_pipeline
from megatron_cppo.ops.vocab_parallel import log_probs_and_entropy
from megatron_cppo.training.update import (
    StepResult,
    UpdateContext,
    _step,
    micro_batches,
    partition,
)

__all__ = ["sft_loss_head", "sft_step"]


def sft_loss_head(ctx: UpdateContext):
    def head(mb, logits_BTV):  # logits at the response positions only (batch.collate)
        lp_BT, _ = log_probs_and_entropy(
            logits_BTV, mb["labels_RT"], group=ctx.state.tp_group, temperature=ctx.temperature,
            chunk_size=ctx.chunk_size, valid_vocab=ctx.valid_vocab, with_entropy=False)
        mask_BT = mb["response_mask_BT"]
        count = mask_BT.sum().clamp(min=1)
        nll = -torch.where(mask_BT, lp_BT, torch.zeros_like(lp_BT)).sum() / count
        return nll, {"sft_loss": float(nll.detach()), "response_tokens": float(mask_BT.sum()),
                     "loss_finite": float(bool(torch.isfinite(nll.detach())))}

    return head


def sft_step(chunks: Sequence[torch.nn.Module], optimizer, samples: Sequence[Sample],
             ctx: UpdateContext, *, scheduler=None) -> StepResult:
    """One optimizer step of supervised fine-tuning on this data-parallel rank's samples."""
    groups = partition(samples, [False] * len(samples), ctx)
    mbs = micro_batches(samples, groups, torch.zeros(len(samples), dtype=torch.bool), ctx,
                        targets=False)
    for c in chunks:
        c.train()
        c.zero_grad_buffer()
    optimizer.zero_grad()
    per_mb = run_pipeline(chunks, mbs, sft_loss_head(ctx))
    return _step(optimizer, scheduler, per_mb, ctx)
