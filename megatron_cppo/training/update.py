"""Log-prob passes and the CPPO update over megatron's pipeline schedule.

    log_probs = compute_log_probs(chunks, samples, ctx)            # old policy / reference
    stats = update_mini_batch(chunks, optimizer, samples, loss_fn, ctx)

Both go through ``run_pipeline`` (models/qwen2_5_vl/forward_step.py). The loss head of the update turns the last stage's
vocab-sharded logits of the stacked views at the response positions (``batch.collate``:
``logit_index_RT``, so no logits are computed for prompt tokens) into per-token log-probs and
entropies with the vocab-parallel head (temperature-scaled, padding rows of the vocabulary beyond
``valid_vocab`` excluded), splits them into the clean pass and the I+/I- passes, and evaluates
``CPPOLoss`` on them. The loss reaches the schedule unscaled; megatron divides it by the number of
micro-batches (models/qwen2_5_vl/forward_step.py) and DDP averages over data-parallel ranks: scaled exactly once.

A step whose loss (on any last stage) or gradient norm is not finite is skipped on every rank
alike: one MIN all-reduce of a finite flag over the world decides.

Process groups come from ``UpdateContext`` (never looked up here): the TP group for the loss head,
the PP group to hand per-token results from the last stage to the others, the DP group for
metrics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist

from megatron_cppo.algorithms import CPPOLoss, CPPOMicroBatch, PerturbedPasses
from megatron_cppo.data.types import Sample
from megatron_cppo.models.qwen2_5_vl.forward_step import run_pipeline
from megatron_cppo.ops.vocab_parallel import log_probs_and_entropy
from megatron_cppo.parallel.agree import all_true
from megatron_cppo.training.batch import (
    collate,
    equalize_count,
    sample_cost,
    split_by_budget,
    split_by_size,
    to_device,
)

__all__ = ["UpdateContext", "compute_log_probs", "micro_batches", "partition",
           "update_mini_batch"]


@dataclass(kw_only=True)
class UpdateContext:
    """What the passes need to know about the layout and the sampler."""

    state: Any                    # megatron_cppo.parallel.ParallelState
    rope_cfg: Any                 # MRopeIndexConfig of the model
    temperature: float = 1.0      # rollout temperature: every log-prob pass divides logits by it
    valid_vocab: Optional[int] = None  # tokenizer vocabulary size (rows beyond never sampled)
    micro_batch_size: int = 1
    max_tokens_per_microbatch: Optional[int] = None
    chunk_size: Optional[int] = None   # tokens per chunk of the vocab-parallel head
    # Pack each micro-batch's model rows into one row without padding (batch.collate); the
    # same losses and gradients as padded rows, up to summation order. The trainer's
    # --sequence-packing (on by default) sets it; the padded rows here are for direct callers.
    sequence_packing: bool = False
    # Run the I+/I- views of every sample, as the reference recipe does (the loss and gradients
    # are the same: gated-out rows contribute nothing). For benchmarks only.
    perturb_all: bool = False

    @classmethod
    def from_config(cls, cfg, *, state, rope_cfg, valid_vocab: int) -> "UpdateContext":
        """The context of a trainer config (``training/config.TrainConfig``: its ``training``
        section's batching, the rollout temperature)."""
        t = cfg.training
        return cls(state=state, rope_cfg=rope_cfg, temperature=cfg.rollout.rollout_temperature,
                   valid_vocab=valid_vocab, micro_batch_size=t.micro_batch_size,
                   max_tokens_per_microbatch=t.max_tokens_per_microbatch,
                   sequence_packing=t.sequence_packing)

    @property
    def last_stage_rank(self) -> int:
        """Global rank of this pipeline's last stage (source of per-token results)."""
        s = self.state
        return dist.get_global_rank(s.pp_group, s.pp_size - 1) if s.pp_size > 1 else s.rank


def partition(samples: Sequence[Sample], needs_views: Sequence[bool], ctx: UpdateContext
              ) -> list[list[int]]:
    """Indices of ``samples`` per micro-batch: ``micro_batch_size`` each, or filling the token
    budget; with a budget, every data-parallel rank ends up with the same number."""
    if ctx.max_tokens_per_microbatch is None:
        return split_by_size(len(samples), ctx.micro_batch_size)
    costs = [sample_cost(s, bool(n)) for s, n in zip(samples, needs_views)]
    groups = split_by_budget(costs, ctx.max_tokens_per_microbatch)
    count = torch.tensor([len(groups)])
    if ctx.state.dp_size > 1:
        dist.all_reduce(count, op=dist.ReduceOp.MAX, group=ctx.state.dp_group)
    return equalize_count(groups, costs, int(count))


def micro_batches(samples: Sequence[Sample], groups: Sequence[Sequence[int]],
                  needs_B: torch.Tensor, ctx: UpdateContext, *, targets: bool = True
                  ) -> list[dict]:
    """The micro-batches of ``groups`` (``partition``) on this rank's device, padded or packed
    as ``ctx`` says; ``needs_B`` bool [len(samples)]: samples whose I+/I- views run."""
    return [to_device(collate([samples[i] for i in g], needs_B[list(g)], ctx.rope_cfg,
                              with_training_targets=targets, packed=ctx.sequence_packing),
                      ctx.state.device)
            for g in groups]


# ----------------------------------------------------------------------------------------------
# forward-only log-prob passes (old policy, reference)


def compute_log_probs(chunks: Sequence[torch.nn.Module], samples: Sequence[Sample],
                      ctx: UpdateContext) -> list[torch.Tensor]:
    """Per-response log-probs ``[Lr]`` (fp32, CPU) of ``samples`` under ``chunks``, forward-only
    through the schedule; returned on every rank (broadcast from the last stage over PP)."""
    s = ctx.state
    groups = partition(samples, [False] * len(samples), ctx)
    mbs = micro_batches(samples, groups, torch.zeros(len(samples), dtype=torch.bool), ctx,
                        targets=False)
    stash: list[torch.Tensor] = []

    def head(mb, logits_RTV):
        lp_RT, _ = log_probs_and_entropy(
            logits_RTV, mb["labels_RT"], group=s.tp_group, temperature=ctx.temperature,
            chunk_size=ctx.chunk_size, valid_vocab=ctx.valid_vocab, with_entropy=False)
        stash.append(lp_RT.float())
        return lp_RT.new_zeros(()), {}

    for c in chunks:
        c.eval()
    run_pipeline(chunks, mbs, head, forward_only=True)
    out: list[Optional[torch.Tensor]] = [None] * len(samples)
    for k, (g, mb) in enumerate(zip(groups, mbs)):
        lp_BT = stash[k] if s.is_last_stage else torch.empty(
            mb["response_index_BT"].shape, dtype=torch.float32, device=s.device)
        if s.pp_size > 1:
            dist.broadcast(lp_BT, src=ctx.last_stage_rank, group=s.pp_group)
        lp_BT = lp_BT.cpu()
        for b, i in enumerate(g):
            out[i] = lp_BT[b, :samples[i].response_ids.numel()].clone()
    return out


# ----------------------------------------------------------------------------------------------
# the update


def cppo_loss_head(loss_fn: CPPOLoss, ctx: UpdateContext
                   ) -> Callable[[dict, torch.Tensor], tuple[torch.Tensor, dict]]:
    """The update's loss head: stacked-view logits -> CPPOMicroBatch -> (unscaled loss, metrics)."""
    cfg = loss_fn.config
    full_vocab = getattr(cfg, "cpl_divergence_kind", None) == "full_vocab"

    def head(mb, logits_RTV):
        # rows: B clean, then P of I+, then P of I- (batch.collate); logits at response positions
        lp_RT, ent_RT = log_probs_and_entropy(
            logits_RTV, mb["labels_RT"], group=ctx.state.tp_group, temperature=ctx.temperature,
            chunk_size=ctx.chunk_size, valid_vocab=ctx.valid_vocab,
            with_entropy=cfg.entropy_coef != 0)
        B = mb["num_clean_rows"]
        rows_P = mb["sample_idx_P"]
        P = rows_P.numel()
        mask_BT = mb["response_mask_BT"].to(lp_RT.dtype)
        perturbed = None
        if P:
            extra = {}
            if full_vocab:
                extra = dict(plus_logits_PTV=logits_RTV[B:B + P],
                             minus_logits_PTV=logits_RTV[B + P:])
            perturbed = PerturbedPasses(
                sample_idx_P=rows_P, plus_log_probs_PT=lp_RT[B:B + P],
                minus_log_probs_PT=lp_RT[B + P:],
                minus_entropy_PT=ent_RT[B + P:].detach(), **extra)
        batch = CPPOMicroBatch(
            log_probs_BT=lp_RT[:B],
            old_log_probs_BT=mb["old_log_probs_BT"], response_mask_BT=mask_BT,
            advantages_B=mb["advantages_B"], entropy_BT=ent_RT[:B],
            ref_log_probs_BT=mb.get("ref_log_probs_BT"),
            logits_BTV=logits_RTV[:B] if full_vocab else None, perturbed=perturbed)
        loss, metrics = loss_fn(batch)  # unscaled: the schedule divides by num micro-batches
        metrics = {k: float(v) for k, v in metrics.items()}
        metrics["response_tokens"] = float(mask_BT.sum())
        metrics["model_tokens"] = float(mb["num_model_tokens"])
        metrics["perturbed_rows"] = float(P)
        metrics["loss_finite"] = float(bool(torch.isfinite(loss.detach())))
        return loss, metrics

    return head


@dataclass
class StepResult:
    stepped: bool
    grad_norm: float
    metrics: dict[str, float]  # mean over micro-batches and data-parallel ranks


def update_mini_batch(chunks: Sequence[torch.nn.Module], optimizer, samples: Sequence[Sample],
                      loss_fn: CPPOLoss, ctx: UpdateContext, *, scheduler=None) -> StepResult:
    """One optimizer step on this data-parallel rank's share of a mini-batch: zero the gradient
    buffers, forward/backward every micro-batch (clean + needed perturbed views), then step unless
    the loss or gradient norm is not finite anywhere."""
    s = ctx.state
    adv_B = torch.tensor([x.advantage for x in samples], dtype=torch.float32)
    has_response_BT = torch.tensor([[x.response_ids.numel() > 0] for x in samples])
    needs_B = loss_fn.samples_needing_perturbed_passes(adv_B, has_response_BT)
    if ctx.perturb_all and loss_fn.config.cpl_coef > 0:
        needs_B = torch.ones_like(needs_B)
    groups = partition(samples, needs_B.tolist(), ctx)
    mbs = micro_batches(samples, groups, needs_B, ctx)
    for c in chunks:
        c.train()
        c.zero_grad_buffer()
    optimizer.zero_grad()
    per_mb = run_pipeline(chunks, mbs, cppo_loss_head(loss_fn, ctx))
    return _step(optimizer, scheduler, per_mb, ctx)


def _step(optimizer, scheduler, per_mb: list[dict], ctx: UpdateContext) -> StepResult:
    s = ctx.state
    loss_ok = all(m.get("loss_finite", 1.0) == 1.0 for m in per_mb)
    optimizer.prepare_grads()  # main_grad -> grad, as step() does first
    grad_norm = optimizer.get_grad_norm()
    grad_norm = float(grad_norm) if grad_norm is not None else 0.0
    # the world votes: every rank steps or skips alike
    stepped = all_true(loss_ok and math.isfinite(grad_norm), device=s.device)
    if stepped:
        optimizer.step()
        if scheduler is not None:
            scheduler.step(increment=1)
    return StepResult(stepped=stepped, grad_norm=grad_norm, metrics=reduce_metrics(per_mb, ctx))


def reduce_metrics(per_mb: list[dict], ctx: UpdateContext) -> dict[str, float]:
    """Mean over micro-batches (last stage), then over data-parallel ranks; on every rank."""
    s = ctx.state
    local: dict[str, list[float]] = {}
    for m in per_mb:
        for k, v in m.items():
            local.setdefault(k, []).append(float(v))
    box = [{k: (sum(v), len(v)) for k, v in local.items()}]
    if s.pp_size > 1:
        dist.broadcast_object_list(box, src=ctx.last_stage_rank, group=s.pp_group)
    parts = [box[0]]
    if s.dp_size > 1:
        parts = [None] * s.dp_size
        dist.all_gather_object(parts, box[0], group=s.dp_group)
    total: dict[str, list[float]] = {}
    for part in parts:
        for k, (sm, n) in part.items():
            acc = total.setdefault(k, [0.0, 0])
            acc[0] += sm / n  # each rank's mean over its micro-batches
            acc[1] += 1
    return {k: sm / n for k, (sm, n) in total.items()}
