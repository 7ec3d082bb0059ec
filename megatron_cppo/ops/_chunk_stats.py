"""The loss heads' shared part: per-chunk combination across TP ranks, autograd bookkeeping.

The two implementations (megatron_cppo/ops/vocab_parallel.py, megatron_cppo/ops/triton_loss_head.py)
differ only in how a rank computes its shard's per-token statistics (torch ops over a fp32 scratch
chunk, or one streaming kernel with an online max). Everything after that is the same and lives
here, so that the two cannot drift apart:

- the collectives: per chunk exactly one MAX all-reduce (of the per-token maxima) and one SUM
  all-reduce (of the stacked sums, already shifted to the group-wide max), on the group passed in;
- the finishing formulas from the reduced sums to log p(y), entropy, KL and the log-sum-exp that
  backward reads;
- the autograd ctx bookkeeping: what forward saves (logits by reference, a few fp32 numbers per
  token, temperature, chunk size, valid columns, ``with_entropy``) and how backward reads it back,
  with an unused output's gradient arriving as None and the 1/T of d(z/T)/dz folded into the
  per-token upstream gradients.

Numerics are those both paths had before they shared this module: the same ops in the same order.

Shape suffixes: N tokens, C tokens of one chunk, K stacked statistics.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch
import torch.distributed as dist

__all__ = ["NO_GRADS_LOG_PROB", "NO_GRADS_KL", "KLSaved", "LogProbEntropySaved", "all_reduce_",
           "fp32_per_token", "reduce_kl", "reduce_log_prob_entropy", "saved_kl",
           "saved_log_prob_entropy", "save_kl", "save_log_prob_entropy", "target_columns"]

# Gradients of the non-tensor arguments of the autograd functions' forward (after the logits):
# labels, group, temperature, chunk_size, vocab_start, num_valid, with_entropy / group,
# temperature, chunk_size, num_valid.
NO_GRADS_LOG_PROB = (None,) * 7
NO_GRADS_KL = (None,) * 4


def all_reduce_(t: torch.Tensor, op, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """In-place all-reduce on ``group`` (None: not sharded, nothing to do). Only ever called on
    tensors the heads allocated themselves, never on the caller's."""
    if group is not None:
        dist.all_reduce(t, op=op, group=group)
    return t


def fp32_per_token(num_tokens: int, device: torch.device, count: int) -> list[torch.Tensor]:
    """``count`` uninitialised fp32 ``[N]`` outputs (written chunk by chunk)."""
    first = torch.empty(num_tokens, dtype=torch.float32, device=device)
    return [first] + [torch.empty_like(first) for _ in range(count - 1)]


def target_columns(labels_N: torch.Tensor, vocab_start: int,
                   num_valid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Column of each token's target on this shard, and whether this shard owns it.

    Returns ``(index_N, owned_N)``: ``index_N`` is the local column (0 where not owned, so that a
    gather stays in bounds), ``owned_N`` is True where the target is one of this shard's valid
    columns. Tokens whose target lives on another shard (or outside the valid vocabulary)
    contribute 0 to the SUM of the target logit."""
    local_N = labels_N - vocab_start
    owned_N = (local_N >= 0) & (local_N < num_valid)
    index_N = torch.where(owned_N, local_N, torch.zeros_like(local_N))
    return index_N, owned_N


# ----------------------------------------------------------------------------------------------
# per-chunk combination across the TP group


def reduce_log_prob_entropy(m_C: torch.Tensor,
                            shifted_stats: Callable[[torch.Tensor], torch.Tensor],
                            group: Optional[dist.ProcessGroup], log_probs_C: torch.Tensor,
                            entropy_C: torch.Tensor, lse_C: torch.Tensor) -> None:
    """Log p(y), entropy and lse of one chunk from this shard's statistics; writes the outputs.

    ``m_C`` [C]: this shard's per-token max of w = z/T over its valid columns, a tensor the caller
    owns (MAX all-reduced in place to the group max). ``shifted_stats(m_C)`` then returns this
    shard's ``[3, C]`` = [S, A, w_y] in the shifted variable w - m_C with the GROUP max:
    S = sum e^w, A = sum e^w w, w_y the target's shifted logit or 0 where another shard owns it.
    One SUM all-reduce of that stack, then log p(y) = w_y - log S, H = log S - A/S,
    lse = m + log S.
    """
    all_reduce_(m_C, dist.ReduceOp.MAX, group)  # TP group: global max per token
    stats_KC = shifted_stats(m_C)
    all_reduce_(stats_KC, dist.ReduceOp.SUM, group)  # TP group: [S, A, w_y] in one call
    log_sum_C = torch.log(stats_KC[0])
    log_probs_C.copy_(stats_KC[2] - log_sum_C)
    entropy_C.copy_(log_sum_C - stats_KC[1] / stats_KC[0])
    lse_C.copy_(m_C + log_sum_C)


def reduce_kl(max_KC: torch.Tensor, shifted_stats: Callable[[torch.Tensor], torch.Tensor],
              group: Optional[dist.ProcessGroup], kl_C: torch.Tensor, lse_p_C: torch.Tensor,
              lse_q_C: torch.Tensor) -> None:
    """KL(p || q) and both lse of one chunk from this shard's statistics; writes the outputs.

    ``max_KC`` [2, C]: this shard's per-token maxima [m_p, m_q] of w_p = z_p/T, w_q = z_q/T, a
    tensor the caller owns (MAX all-reduced in place). ``shifted_stats(max_KC)`` then returns this
    shard's ``[3, C]`` = [S_p, S_q, B] with each pass shifted by its GROUP max: S = sum e^w,
    B = sum e^{w_p} (w_p - w_q). One SUM all-reduce, then KL = B/S_p - log S_p + log S_q.
    """
    all_reduce_(max_KC, dist.ReduceOp.MAX, group)  # TP group: [m_p, m_q] in one call
    stats_KC = shifted_stats(max_KC)
    all_reduce_(stats_KC, dist.ReduceOp.SUM, group)  # TP group: [S_p, S_q, B] in one call
    log_s_p_C, log_s_q_C = torch.log(stats_KC[0]), torch.log(stats_KC[1])
    kl_C.copy_(stats_KC[2] / stats_KC[0] - log_s_p_C + log_s_q_C)
    lse_p_C.copy_(max_KC[0] + log_s_p_C)
    lse_q_C.copy_(max_KC[1] + log_s_q_C)


# ----------------------------------------------------------------------------------------------
# autograd ctx bookkeeping


class LogProbEntropySaved(NamedTuple):
    """What backward of a log-prob/entropy head reads. ``entropy_N`` is None without
    ``with_entropy``; ``g_lp_N`` / ``g_h_N`` are the upstream gradients divided by T (fp32), None
    where that output got no gradient (or entropy is not differentiable)."""

    logits_NV: torch.Tensor
    index_N: torch.Tensor
    owned_N: torch.Tensor
    lse_N: torch.Tensor
    entropy_N: Optional[torch.Tensor]
    g_lp_N: Optional[torch.Tensor]
    g_h_N: Optional[torch.Tensor]


def save_log_prob_entropy(ctx, logits_NV, index_N, owned_N, lse_N, entropy_N, *, group,
                          temperature: float, chunk_size: int, num_valid: int,
                          with_entropy: bool) -> None:
    """Forward's bookkeeping: the logits are saved by reference (never copied), plus three or four
    numbers per token. Without ``with_entropy`` the entropy output is non-differentiable and not
    saved. Grads are not materialised, so an unused output's gradient reaches backward as None and
    its term is skipped."""
    ctx.group, ctx.temperature, ctx.chunk_size = group, temperature, chunk_size
    ctx.num_valid, ctx.with_entropy = num_valid, with_entropy
    ctx.set_materialize_grads(False)
    if with_entropy:
        ctx.save_for_backward(logits_NV, index_N, owned_N, lse_N, entropy_N)
    else:
        ctx.mark_non_differentiable(entropy_N)
        ctx.save_for_backward(logits_NV, index_N, owned_N, lse_N)


def saved_log_prob_entropy(ctx, grad_log_probs_N: Optional[torch.Tensor],
                           grad_entropy_N: Optional[torch.Tensor]) -> LogProbEntropySaved:
    """Backward's view of what ``save_log_prob_entropy`` stored, with d(z/T)/dz = 1/T folded into
    the per-token upstream gradients."""
    logits_NV, index_N, owned_N, lse_N = ctx.saved_tensors[:4]
    entropy_N = ctx.saved_tensors[4] if ctx.with_entropy else None
    if not ctx.with_entropy:
        grad_entropy_N = None
    T = ctx.temperature
    g_lp_N = grad_log_probs_N.float() / T if grad_log_probs_N is not None else None
    g_h_N = grad_entropy_N.float() / T if grad_entropy_N is not None else None
    return LogProbEntropySaved(logits_NV, index_N, owned_N, lse_N, entropy_N, g_lp_N, g_h_N)


class KLSaved(NamedTuple):
    """What backward of a KL head reads; ``g_N`` is the upstream gradient divided by T (fp32)."""

    logits_p_NV: torch.Tensor
    logits_q_NV: torch.Tensor
    lse_p_N: torch.Tensor
    lse_q_N: torch.Tensor
    kl_N: torch.Tensor
    g_N: torch.Tensor
    need_p: bool
    need_q: bool


def save_kl(ctx, logits_p_NV, logits_q_NV, lse_p_N, lse_q_N, kl_N, *, temperature: float,
            chunk_size: int, num_valid: int) -> None:
    """Forward's bookkeeping: both logits by reference, three numbers per token."""
    ctx.temperature, ctx.chunk_size, ctx.num_valid = temperature, chunk_size, num_valid
    ctx.save_for_backward(logits_p_NV, logits_q_NV, lse_p_N, lse_q_N, kl_N)


def saved_kl(ctx, grad_kl_N: torch.Tensor) -> KLSaved:
    """Backward's view of what ``save_kl`` stored, with 1/T folded into the upstream gradient and
    which of the two logits need a gradient."""
    logits_p_NV, logits_q_NV, lse_p_N, lse_q_N, kl_N = ctx.saved_tensors
    return KLSaved(logits_p_NV, logits_q_NV, lse_p_N, lse_q_N, kl_N,
                   grad_kl_N.float() / ctx.temperature, ctx.needs_input_grad[0],
                   ctx.needs_input_grad[1])
