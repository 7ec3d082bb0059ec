"""PPO clipped policy loss with dual clip, reference-KL loss, and loss aggregation modes.

Follows the reference recipe's arithmetic (verl ``compute_policy_loss_vanilla``, ``kl_penalty``,
``agg_loss``); formulas and the deliberate differences are in docs/cppo-objective.md.

Padding: every function masks with ``torch.where`` on its inputs and outputs, never by
multiplying, so a NaN or inf at a padded position (a filled old log-prob, say) reaches neither the
loss nor any gradient.

Shape suffixes: B sequences of the micro-batch, T response positions (padded).
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron_cppo.algorithms.kl import kl_estimate

__all__ = ["AGG_MODES", "aggregate_loss", "masked_mean", "masked_sum", "ppo_clip_policy_loss",
           "reference_kl_loss"]

AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")

# token-mean denominator: sum(mask) + _MEAN_EPS, as the recipe's ``agg_loss`` and ``masked_mean``
# (KL, entropy and CPL terms, metrics). The PPO term divides by sum(mask) alone, as the vendored
# verl ``agg_loss`` it goes through (``token_mean_eps=0``).
_MEAN_EPS = 1e-8


def masked_sum(x_BT: torch.Tensor, mask_BT: torch.Tensor, dim=None) -> torch.Tensor:
    """Sum of ``x`` over ``mask`` (bool or 0/1); values outside the mask never enter, even NaN."""
    masked_BT = torch.where(mask_BT.bool(), x_BT, torch.zeros((), dtype=x_BT.dtype,
                                                              device=x_BT.device))
    return masked_BT.sum() if dim is None else masked_BT.sum(dim=dim)


def masked_mean(x_BT: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """sum over mask / (count + 1e-8), verl's ``masked_mean`` (0 for an empty mask)."""
    return masked_sum(x_BT, mask_BT) / (mask_BT.bool().sum().to(x_BT.dtype) + _MEAN_EPS)


def aggregate_loss(loss_BT: torch.Tensor, mask_BT: torch.Tensor, mode: str, *,
                   num_rows: Optional[int] = None, token_mean_eps: float = _MEAN_EPS
                   ) -> torch.Tensor:
    """Reduce a per-token loss over the micro-batch (the reference's ``agg_loss``).

    token-mean: sum over valid tokens / (number of valid tokens + ``token_mean_eps``); with
        ``token_mean_eps=0`` the count alone (clamped at 1, so an empty mask gives 0, not NaN).
    seq-mean-token-sum: sum over rows of each row's token sum / R.
    seq-mean-token-mean: sum over rows of (row token sum / (row token count + 1e-8)) / R.
    seq-mean-token-sum-norm: sum over rows of (row token sum / T) / R, T the padded length
        (Dr.GRPO).
    R = ``num_rows``, default the rows of ``loss_BT``: the rows of the micro-batch, rows without
    valid tokens included. A caller aggregating a subset of the micro-batch's rows (CPL over the
    rows that ran perturbed passes) passes the micro-batch's row count.
    """
    mask_BT = mask_BT.bool()
    dtype = loss_BT.dtype
    if mode == "token-mean":
        count = mask_BT.sum().to(dtype)
        count = count + token_mean_eps if token_mean_eps > 0 else count.clamp(min=1)
        return masked_sum(loss_BT, mask_BT) / count
    if mode not in AGG_MODES:
        raise ValueError(f"loss_agg_mode must be one of {AGG_MODES}, got {mode!r}")
    rows = loss_BT.shape[0] if num_rows is None else num_rows
    seq_sum_B = masked_sum(loss_BT, mask_BT, dim=-1)
    if mode == "seq-mean-token-mean":
        seq_sum_B = seq_sum_B / (mask_BT.sum(dim=-1).to(dtype) + _MEAN_EPS)
    elif mode == "seq-mean-token-sum-norm":
        seq_sum_B = seq_sum_B / loss_BT.shape[-1]
    return seq_sum_B.sum() / rows


def ppo_clip_policy_loss(log_probs_BT: torch.Tensor, old_log_probs_BT: torch.Tensor,
                         advantages_BT: torch.Tensor, mask_BT: torch.Tensor, *,
                         clip_ratio_low: float = 0.2, clip_ratio_high: float = 0.2,
                         clip_ratio_c: float = 3.0, agg_mode: str = "token-mean"
                         ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate with dual clip (Ye et al. 2020) for negative advantages.

    rho = exp(clamp(logp - old, -20, 20)); L = max(-A rho, -A clip(rho, 1-eps_lo, 1+eps_hi));
    for A < 0: L = min(L, -A c). ``advantages_BT`` may be ``[B, 1]`` (broadcast per sequence).
    Token-mean divides by the token count without an epsilon, as the reference's PPO term.
    Returns the aggregated loss and detached metrics: ``pg_clipfrac`` (the clipped branch is
    active), ``pg_clipfrac_lower`` (the dual clip is active), ``ppo_kl`` (masked mean of old - new).
    """
    mask_BT = mask_BT.bool()
    zero = torch.zeros((), dtype=log_probs_BT.dtype, device=log_probs_BT.device)
    # Padded positions become 0 before any arithmetic, so their gradient is exactly 0, not NaN.
    log_probs_BT = torch.where(mask_BT, log_probs_BT, zero)
    old_log_probs_BT = torch.where(mask_BT, old_log_probs_BT.to(log_probs_BT.dtype), zero)
    advantages_BT = torch.where(mask_BT, advantages_BT.to(log_probs_BT.dtype), zero)
    log_ratio_BT = torch.clamp(log_probs_BT - old_log_probs_BT, min=-20.0, max=20.0)
    ratio_BT = torch.exp(log_ratio_BT)
    loss1_BT = -advantages_BT * ratio_BT
    loss2_BT = -advantages_BT * torch.clamp(ratio_BT, 1.0 - clip_ratio_low, 1.0 + clip_ratio_high)
    clipped_BT = torch.maximum(loss1_BT, loss2_BT)
    loss3_BT = -advantages_BT * clip_ratio_c
    dual_BT = torch.minimum(loss3_BT, clipped_BT)
    negative_BT = advantages_BT < 0
    pg_loss_BT = torch.where(negative_BT, dual_BT, clipped_BT)
    loss = aggregate_loss(pg_loss_BT, mask_BT, agg_mode, token_mean_eps=0.0)
    with torch.no_grad():
        metrics = {
            "pg_loss": loss.detach(),
            "pg_clipfrac": masked_mean((loss2_BT > loss1_BT).to(loss.dtype), mask_BT),
            "pg_clipfrac_lower": masked_mean(((clipped_BT > loss3_BT) & negative_BT
                                              ).to(loss.dtype), mask_BT),
            "ppo_kl": masked_mean(-log_ratio_BT.detach(), mask_BT),
        }
    return loss, metrics


def reference_kl_loss(log_probs_BT: torch.Tensor, ref_log_probs_BT: torch.Tensor,
                      mask_BT: torch.Tensor, *, kind: str = "low_var_kl",
                      agg_mode: str = "token-mean") -> torch.Tensor:
    """KL to the frozen reference policy as a loss term: the sampled-token estimator ``kind``
    (k1, k2, k3 = low_var_kl) of KL(pi || pi_ref), aggregated like the policy loss."""
    mask_BT = mask_BT.bool()
    zero = torch.zeros((), dtype=log_probs_BT.dtype, device=log_probs_BT.device)
    log_probs_BT = torch.where(mask_BT, log_probs_BT, zero)
    ref_log_probs_BT = torch.where(mask_BT, ref_log_probs_BT.to(log_probs_BT.dtype), zero)
    return aggregate_loss(kl_estimate(log_probs_BT, ref_log_probs_BT, kind), mask_BT, agg_mode)
