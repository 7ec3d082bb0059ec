"""PPO clipped policy loss with dual clip, reference-KL loss, and loss aggregation modes.

Follows verl ``trainer/ppo/core_algos.py`` (``compute_policy_loss`` vanilla, ``kl_penalty``,
``agg_loss``) as described in cppo-method.md.

Shape suffixes: B sequences of the micro-batch, T response positions (padded).
"""

from __future__ import annotations

import torch

from megatron_cppo.ops.vocab_parallel import kl_estimate

__all__ = ["AGG_MODES", "aggregate_loss", "masked_mean", "ppo_clip_policy_loss",
           "reference_kl_loss"]

AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def masked_mean(x_BT: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """sum(x * mask) / (sum(mask) + 1e-8), verl's ``masked_mean`` (0 for an empty mask)."""
    mask_BT = mask_BT.to(x_BT.dtype)
    return (x_BT * mask_BT).sum() / (mask_BT.sum() + 1e-8)


def aggregate_loss(loss_BT: torch.Tensor, mask_BT: torch.Tensor, mode: str) -> torch.Tensor:
    """Reduce a per-token loss over the micro-batch.

    token-mean: sum over all valid tokens / number of valid tokens.
    seq-mean-token-sum: mean over sequences of each sequence's token sum.
    seq-mean-token-mean: mean over sequences of each sequence's token mean (a sequence without
        valid tokens contributes 0 and still counts).
    seq-mean-token-sum-norm: sum of all valid tokens / T (the padded response length), Dr.GRPO.
    """
    mask_BT = mask_BT.to(loss_BT.dtype)
    if mode == "token-mean":
        return masked_mean(loss_BT, mask_BT)
    seq_sum_B = (loss_BT * mask_BT).sum(dim=-1)
    if mode == "seq-mean-token-sum":
        return seq_sum_B.mean()
    if mode == "seq-mean-token-mean":
        return (seq_sum_B / (mask_BT.sum(dim=-1) + 1e-8)).mean()
    if mode == "seq-mean-token-sum-norm":
        return seq_sum_B.sum() / loss_BT.shape[-1]
    raise ValueError(f"loss_agg_mode must be one of {AGG_MODES}, got {mode!r}")


def ppo_clip_policy_loss(log_probs_BT: torch.Tensor, old_log_probs_BT: torch.Tensor,
                         advantages_BT: torch.Tensor, mask_BT: torch.Tensor, *,
                         clip_ratio_low: float = 0.2, clip_ratio_high: float = 0.2,
                         clip_ratio_c: float = 3.0, agg_mode: str = "token-mean"
                         ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate with dual clip (Ye et al. 2020) for negative advantages.

    rho = exp(clamp(logp - old, -20, 20)); L = max(-A rho, -A clip(rho, 1-eps_lo, 1+eps_hi));
    for A < 0: L = min(L, -A c). ``advantages_BT`` may be ``[B, 1]`` (broadcast per sequence).
    Returns the aggregated loss and detached metrics: ``pg_clipfrac`` (the clipped branch is
    active), ``pg_clipfrac_lower`` (the dual clip is active), ``ppo_kl`` (masked mean of old - new).
    """
    log_ratio_BT = torch.clamp(log_probs_BT - old_log_probs_BT, min=-20.0, max=20.0)
    ratio_BT = torch.exp(log_ratio_BT)
    advantages_BT = advantages_BT.expand_as(ratio_BT)
    loss1_BT = -advantages_BT * ratio_BT
    loss2_BT = -advantages_BT * torch.clamp(ratio_BT, 1.0 - clip_ratio_low, 1.0 + clip_ratio_high)
    clipped_BT = torch.maximum(loss1_BT, loss2_BT)
    loss3_BT = -advantages_BT * clip_ratio_c
    dual_BT = torch.minimum(loss3_BT, clipped_BT)
    negative_BT = advantages_BT < 0
    pg_loss_BT = torch.where(negative_BT, dual_BT, clipped_BT)
    loss = aggregate_loss(pg_loss_BT, mask_BT, agg_mode)
    with torch.no_grad():
        metrics = {
            "pg_loss": loss.detach(),
            "pg_clipfrac": masked_mean((loss2_BT > loss1_BT).float(), mask_BT),
            "pg_clipfrac_lower": masked_mean(((clipped_BT > loss3_BT) & negative_BT).float(),
                                             mask_BT),
            "ppo_kl": masked_mean(-log_ratio_BT, mask_BT),
        }
    return loss, metrics


def reference_kl_loss(log_probs_BT: torch.Tensor, ref_log_probs_BT: torch.Tensor,
                      mask_BT: torch.Tensor, *, kind: str = "low_var_kl",
                      agg_mode: str = "token-mean") -> torch.Tensor:
    """KL to the frozen reference policy as a loss term: the sampled-token estimator ``kind``
    (k1, k2, k3 = low_var_kl) of KL(pi || pi_ref), aggregated like the policy loss."""
    return aggregate_loss(kl_estimate(log_probs_BT, ref_log_probs_BT, kind), mask_BT, agg_mode)
