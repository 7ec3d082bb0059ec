"""Perception-token selection and the Contrastive Perception Loss (CPL) of CPPO.

CPL pulls the policy on perception tokens towards its prediction on an information-preserving image
I+ and away from an information-removing image I-: with per-token divergences D+ = D(pi(.|I), pi(.|I+))
and D- = D(pi(.|I), pi(.|I-)), CPL_t = softplus((D+ - D-) / tau), a two-candidate InfoNCE with
similarity -D/tau. Perception tokens are those whose entropy rises most (relatively) when the image
information is removed. Only samples with advantage > 0 take part (advantage gating), so the I+/I-
passes of the other samples can be skipped exactly.

The pieces sit behind two small interfaces so that variants are configuration, not flags in the
policy-loss code:
- ``PerceptionTerm``: the whole extra loss term (``ContrastivePerceptionLoss``, or
  ``NoPerceptionTerm`` for plain GRPO) and which samples need perturbed passes;
- ``TokenSelector`` (``TopRelativeEntropyIncrease`` / ``AllResponseTokens``) and ``Divergence``
  (``SampledDivergence`` k1/k2/k3 / ``FullVocabDivergence``) inside it.

Shape suffixes: B sequences of the micro-batch, T response positions, P samples taking part in CPL,
V this rank's vocab shard.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_cppo.algorithms.batch import CPPOMicroBatch
from megatron_cppo.algorithms.kl import canonical_kl_kind, kl_estimate
from megatron_cppo.algorithms.policy_loss import AGG_MODES, aggregate_loss, masked_mean
from megatron_cppo.ops.vocab_parallel import full_kl

__all__ = ["AllResponseTokens", "ContrastivePerceptionLoss", "Divergence", "FullVocabDivergence",
           "NoPerceptionTerm", "PerceptionTerm", "SampledDivergence", "TokenSelector",
           "TopRelativeEntropyIncrease", "cpl_per_token", "select_perception_tokens"]



# ----------------------------------------------------------------------------------------------
# selection


def select_perception_tokens(entropy_BT: torch.Tensor, minus_entropy_BT: torch.Tensor,
                             response_mask_BT: torch.Tensor, *, top_percent: float = 0.5,
                             eps: float = 1e-6) -> torch.Tensor:
    """Perception tokens per sequence (no grad), docs/cppo-objective.md.

    dH = H- - H; s = max(dH, 0) / (H- + eps); c = #{response t: dH > 0}; k = max(1, floor(p c))
    with p c rounded to fp32 as the reference computes it (p = 0.29, c = 100 gives 29, not the
    28 of exact arithmetic); theta = the k-th largest score of the sequence;
    m = (s >= theta) & (dH > 0) & response, with ties kept (more than k tokens may be selected)
    and nothing selected when c = 0. Padding positions are neither counted in c nor scored, so
    they never move k or theta (the reference counts the position after EOS: a deliberate
    difference). Entropies are used in their dtype promoted to at least fp32.
    Returns a bool ``[B, T]`` mask.
    """
    with torch.no_grad():
        dtype = torch.promote_types(entropy_BT.dtype, torch.float32)
        entropy_BT = entropy_BT.detach().to(dtype)
        minus_entropy_BT = minus_entropy_BT.detach().to(dtype)
        increase_BT = minus_entropy_BT - entropy_BT
        candidate_BT = (increase_BT > 0) & response_mask_BT.bool()
        score_BT = torch.where(candidate_BT, increase_BT.clamp(min=0) / (minus_entropy_BT + eps),
                               torch.zeros_like(increase_BT))
        count_B = candidate_BT.sum(dim=-1)
        # k = floor(p * c) with the product rounded to fp32, as the reference's
        # (counts.float() * p).clamp(min=1).long(); c <= T keeps k <= T.
        k_B = (count_B.float() * top_percent).clamp(min=1).long()
        k_B = torch.minimum(k_B, torch.full_like(k_B, max(1, score_BT.shape[-1])))
        sorted_BT = torch.sort(score_BT, dim=-1, descending=True).values
        theta_B1 = sorted_BT.gather(-1, (k_B - 1).unsqueeze(-1))
        return candidate_BT & (score_BT >= theta_B1) & (count_B > 0).unsqueeze(-1)


class TokenSelector(Protocol):
    """Which response tokens of the CPL samples enter CPL (bool ``[P, T]``)."""

    needs_minus_entropy: bool

    def __call__(self, entropy_PT: Optional[torch.Tensor], minus_entropy_PT: Optional[torch.Tensor],
                 response_mask_PT: torch.Tensor) -> torch.Tensor: ...


@dataclass(kw_only=True)
class TopRelativeEntropyIncrease:
    """The CPPO selection: top ``top_percent`` of tokens by relative entropy increase under I-."""

    top_percent: float = 0.5
    eps: float = 1e-6
    needs_minus_entropy: bool = True

    def __call__(self, entropy_PT, minus_entropy_PT, response_mask_PT):
        return select_perception_tokens(entropy_PT, minus_entropy_PT, response_mask_PT,
                                        top_percent=self.top_percent, eps=self.eps)


@dataclass(kw_only=True)
class AllResponseTokens:
    """Ablation ``perception_mask=False``: every response token enters CPL."""

    needs_minus_entropy: bool = False

    def __call__(self, entropy_PT, minus_entropy_PT, response_mask_PT):
        return response_mask_PT.bool()


# ----------------------------------------------------------------------------------------------
# divergences


class Divergence(Protocol):
    """Per-token D+ and D- ``[P, T]`` for micro-batch rows ``rows_P`` whose perturbed passes are at
    ``pass_rows_P`` of ``batch.perturbed``; differentiable w.r.t. all three passes."""

    def __call__(self, batch: CPPOMicroBatch, rows_P: torch.Tensor,
                 pass_rows_P: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


@dataclass(kw_only=True)
class SampledDivergence:
    """Sampled-token estimator of KL(pi(.|I) || pi(.|I+-)) from a = log pi(y|I), b (I+), c (I-),
    the reference's ``kl_penalty(a, b)``: k3: D = e^(b-a) - (b-a) - 1 with the low_var_kl clamps;
    k1: a - b; k2: 0.5 (a - b)^2, both unclamped as in the reference. ``clamp`` (opt-in, beyond
    the reference) bounds D to [-clamp, clamp] for every estimator.
    Positions outside the response are set to a = b = c = 0 first (gradient 0, never NaN)."""

    kind: str = "k3"
    clamp: Optional[float] = None

    def __post_init__(self):
        self.kind = canonical_kl_kind(self.kind)
        if self.clamp is not None and not self.clamp > 0:
            raise ValueError(f"clamp must be None or > 0, got {self.clamp!r}")

    def _d(self, a_PT: torch.Tensor, b_PT: torch.Tensor) -> torch.Tensor:
        d_PT = kl_estimate(a_PT, b_PT, self.kind)
        if self.clamp is not None:
            d_PT = torch.clamp(d_PT, min=-self.clamp, max=self.clamp)
        return d_PT

    def __call__(self, batch, rows_P, pass_rows_P):
        passes = batch.perturbed
        if passes.plus_log_probs_PT is None or passes.minus_log_probs_PT is None:
            raise ValueError("the sampled-token CPL divergence needs perturbed.plus_log_probs_PT "
                             "and perturbed.minus_log_probs_PT")
        response_PT = batch.response_mask_BT[rows_P].bool()
        a_PT = batch.log_probs_BT[rows_P]
        zero = torch.zeros((), dtype=a_PT.dtype, device=a_PT.device)

        def valid(x_PT):
            return torch.where(response_PT, x_PT.to(a_PT.dtype), zero)

        a_PT = valid(a_PT)
        return (self._d(a_PT, valid(passes.plus_log_probs_PT[pass_rows_P])),
                self._d(a_PT, valid(passes.minus_log_probs_PT[pass_rows_P])))


@dataclass(kw_only=True)
class FullVocabDivergence:
    """Opt-in (beyond the reference): exact KL(pi(.|I) || pi(.|I+-)) over the whole vocabulary from
    the TP-sharded logits (``full_kl`` on ``group``), differentiable w.r.t. all three passes. Rows
    are processed one sample at a time so that no rows of the clean logits are copied."""

    group: Optional[dist.ProcessGroup] = None   # the TP group the logits are sharded over
    temperature: float = 1.0
    chunk_size: Optional[int] = None
    valid_vocab: Optional[int] = None

    def __call__(self, batch, rows_P, pass_rows_P):
        passes = batch.perturbed
        if batch.logits_BTV is None or passes.plus_logits_PTV is None \
                or passes.minus_logits_PTV is None:
            raise ValueError("the full-vocabulary CPL divergence needs batch.logits_BTV, "
                             "perturbed.plus_logits_PTV and perturbed.minus_logits_PTV")
        kw = dict(group=self.group, temperature=self.temperature, chunk_size=self.chunk_size,
                  valid_vocab=self.valid_vocab)
        d_plus, d_minus = [], []
        for row, pass_row in zip(rows_P.tolist(), pass_rows_P.tolist()):
            clean_TV = batch.logits_BTV[row]
            d_plus.append(full_kl(clean_TV, passes.plus_logits_PTV[pass_row], **kw))
            d_minus.append(full_kl(clean_TV, passes.minus_logits_PTV[pass_row], **kw))
        return torch.stack(d_plus), torch.stack(d_minus)


# ----------------------------------------------------------------------------------------------
# the loss term


def cpl_per_token(d_plus: torch.Tensor, d_minus: torch.Tensor, tau: float) -> torch.Tensor:
    """softplus((D+ - D-) / tau) = -log(e^(-D+/tau) / (e^(-D+/tau) + e^(-D-/tau))).

    Written as -logsigmoid(-x), exact for every x (F.softplus returns x itself above x = 20)."""
    return -F.logsigmoid((d_minus - d_plus) / tau)


class PerceptionTerm(Protocol):
    """An extra loss term computed from perturbed-image passes."""

    def samples_needing_passes(self, advantages_B: torch.Tensor,
                               response_mask_BT: torch.Tensor) -> torch.Tensor:
        """bool ``[B]``: samples whose I+/I- passes can change the loss or a gradient."""
        ...

    def __call__(self, batch: CPPOMicroBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        ...


class NoPerceptionTerm:
    """Plain GRPO: no perturbed passes, no term."""

    def samples_needing_passes(self, advantages_B, response_mask_BT):
        return torch.zeros(advantages_B.shape, dtype=torch.bool, device=advantages_B.device)

    def __call__(self, batch):
        return torch.zeros((), device=batch.log_probs_BT.device), {}


@dataclass(kw_only=True)
class ContrastivePerceptionLoss:
    """L_CPL = agg(CPL_t, M_t) over the micro-batch with the policy loss's aggregation mode, M =
    selected tokens of samples with advantage > 0 (or of all samples with
    ``advantage_gating=False``). token-mean: sum_t CPL_t M_t / (sum_t M_t + 1e-8); the seq-mean
    modes divide by the micro-batch's row count, gated-out rows included (as the reference).

    Samples outside ``samples_needing_passes`` have M = 0 and are dropped before any arithmetic, so
    giving their perturbed passes or not yields bitwise the same loss and gradients (theirs are 0).
    """

    selector: TokenSelector
    divergence: Divergence
    tau: float = 0.1
    advantage_gating: bool = True
    agg_mode: str = "token-mean"

    def __post_init__(self):
        if self.agg_mode not in AGG_MODES:
            raise ValueError(f"agg_mode must be one of {AGG_MODES}, got {self.agg_mode!r}")

    def samples_needing_passes(self, advantages_B, response_mask_BT):
        needed_B = response_mask_BT.bool().any(dim=-1)
        if self.advantage_gating:
            needed_B = needed_B & (advantages_B > 0)
        return needed_B

    def _pass_rows(self, batch: CPPOMicroBatch, rows_P: torch.Tensor) -> torch.Tensor:
        passes = batch.perturbed
        if passes is None:
            raise ValueError(f"perturbed passes are needed for micro-batch rows {rows_P.tolist()} "
                             "(batch.perturbed is None)")
        position_B = torch.full(batch.advantages_B.shape, -1, dtype=torch.long,
                                device=rows_P.device)
        position_B[passes.sample_idx_P.to(rows_P.device)] = torch.arange(
            passes.sample_idx_P.numel(), device=rows_P.device)
        pass_rows_P = position_B[rows_P]
        missing = rows_P[pass_rows_P < 0]
        if missing.numel():
            raise ValueError(f"perturbed passes are missing for micro-batch rows {missing.tolist()},"
                             " which take part in CPL")
        return pass_rows_P

    def __call__(self, batch):
        needed_B = self.samples_needing_passes(batch.advantages_B, batch.response_mask_BT)
        response_B = batch.response_mask_BT.bool().any(dim=-1)
        rows_P = torch.nonzero(needed_B).squeeze(-1)
        device = batch.log_probs_BT.device
        zero = torch.zeros((), device=device)
        metrics = {
            "cpl_samples": needed_B.sum().float(),
            "cpl_gated_sample_frac": ((response_B & ~needed_B).sum() / response_B.sum().clamp(min=1)
                                      ).float(),
        }
        if rows_P.numel() == 0:
            metrics.update(cpl_loss=zero, perception_tokens=zero, perception_token_frac=zero,
                           perception_token_frac_all=zero)
            return zero, metrics

        pass_rows_P = self._pass_rows(batch, rows_P)
        passes = batch.perturbed
        response_PT = batch.response_mask_BT[rows_P].bool()
        if self.selector.needs_minus_entropy:
            if batch.entropy_BT is None or passes.minus_entropy_PT is None:
                raise ValueError("perception-token selection needs batch.entropy_BT and "
                                 "perturbed.minus_entropy_PT")
            select_PT = self.selector(batch.entropy_BT[rows_P].detach(),
                                      passes.minus_entropy_PT[pass_rows_P].detach(), response_PT)
        else:
            select_PT = self.selector(None, None, response_PT)

        d_plus_PT, d_minus_PT = self.divergence(batch, rows_P, pass_rows_P)
        cpl_PT = cpl_per_token(d_plus_PT, d_minus_PT, self.tau)
        # Rows outside rows_P have M = 0 everywhere; the seq-mean modes still count them.
        loss = aggregate_loss(cpl_PT, select_PT, self.agg_mode,
                              num_rows=batch.response_mask_BT.shape[0])
        num_selected = select_PT.sum().to(cpl_PT.dtype)
        with torch.no_grad():
            metrics.update(
                cpl_loss=loss.detach(),
                perception_tokens=num_selected,
                perception_token_frac=num_selected / response_PT.sum().clamp(min=1),
                perception_token_frac_all=num_selected
                / batch.response_mask_BT.bool().sum().clamp(min=1),
                cpl_d_plus=masked_mean(d_plus_PT.detach(), select_PT),
                cpl_d_minus=masked_mean(d_minus_PT.detach(), select_PT),
            )
        return loss, metrics
