"""The CPPO micro-batch loss: GRPO policy loss + reference KL + Contrastive Perception Loss.

    loss = L_pg - entropy_coef * L_H + kl_loss_coef * L_KL + cpl_coef * L_CPL

each term aggregated over the micro-batch with ``loss_agg_mode``; every default and formula follows
the reference CPPO recipe (docs/cppo-objective.md, which also lists the deliberate differences).

Loss scale, one rule: ``CPPOLoss`` returns the loss of ONE micro-batch and never scales it. The
average over the micro-batches of a mini-batch is taken exactly once, by whoever accumulates the
gradients: megatron's pipeline schedule (``forward_backward_func``) divides the loss our loss
function returns by ``num_microbatches`` (a loss function returning ``(loss, metrics)`` gets
``loss * cp_size / num_microbatches``), so the trainer passes this loss on unchanged. A loop that
calls ``backward`` itself over n micro-batches divides by n itself, as the reference does.

Usage per micro-batch (the trainer owns the model passes; the vocab-parallel head gives the
per-token tensors, see megatron_cppo/ops/vocab_parallel.py):

    loss_fn = CPPOLoss(CPPOLossConfig(), tp_group=tp_group)
    need_B = loss_fn.samples_needing_perturbed_passes(advantages_B, response_mask_BT)
    ... run I+ / I- only for rows need_B.nonzero() ...
    loss, metrics = loss_fn(CPPOMicroBatch(...))
    return loss, metrics          # from megatron's loss function: the schedule divides once

Shape suffixes: B sequences of the micro-batch, T response positions.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from megatron_cppo.algorithms.batch import CPPOMicroBatch
from megatron_cppo.algorithms.kl import canonical_kl_kind
from megatron_cppo.algorithms.perception import (
    AllResponseTokens,
    ContrastivePerceptionLoss,
    FullVocabDivergence,
    NoPerceptionTerm,
    PerceptionTerm,
    SampledDivergence,
    TopRelativeEntropyIncrease,
)
from megatron_cppo.algorithms.policy_loss import (
    AGG_MODES,
    aggregate_loss,
    masked_mean,
    ppo_clip_policy_loss,
    reference_kl_loss,
)

__all__ = ["CPPOLoss", "CPPOLossConfig", "build_perception_term",
           "samples_needing_perturbed_passes"]

FULL_VOCAB = "full_vocab"


@dataclass(kw_only=True)
class CPPOLossConfig:
    """Loss settings; defaults reproduce the reference CPPO recipe (docs/cppo-objective.md)."""

    # PPO clip and dual clip
    clip_ratio_low: float = 0.2
    clip_ratio_high: float = 0.2
    clip_ratio_c: float = 3.0
    loss_agg_mode: str = "token-mean"
    # KL to the frozen reference model as a loss term (estimator k1 | k2 | k3 = low_var_kl)
    kl_loss_coef: float = 0.01
    kl_loss_type: str = "low_var_kl"
    # entropy bonus (entropy is still computed for selection and logging)
    entropy_coef: float = 0.0
    # Contrastive Perception Loss; cpl_coef = 0 is plain GRPO (no perturbed passes)
    cpl_coef: float = 0.01
    cpl_tau: float = 0.1
    cpl_top_percent: float = 0.5
    cpl_entropy_eps: float = 1e-6
    use_perception_mask: bool = True
    advantage_gating: bool = True
    # CPL divergence: None follows kl_loss_type; or k1 | k2 | k3 | low_var_kl | "full_vocab"
    # (exact KL over the TP-sharded vocabulary, beyond the reference; needs the logits).
    cpl_divergence: Optional[str] = None
    # Opt-in clamp of the sampled-token CPL divergences to [-c, c] (beyond the reference, which
    # clamps only inside k3); None: no extra clamp.
    cpl_divergence_clamp: Optional[float] = None

    def __post_init__(self):
        if not 0.0 <= self.clip_ratio_low < 1.0:
            raise ValueError(f"clip_ratio_low must be in [0, 1), got {self.clip_ratio_low!r}")
        if not self.clip_ratio_high >= 0.0:
            raise ValueError(f"clip_ratio_high must be >= 0, got {self.clip_ratio_high!r}")
        if not self.clip_ratio_c > 1.0:
            raise ValueError(f"clip_ratio_c must be > 1 (dual clip lower bound), "
                             f"got {self.clip_ratio_c!r}")
        if self.loss_agg_mode not in AGG_MODES:
            raise ValueError(f"loss_agg_mode must be one of {AGG_MODES}, got {self.loss_agg_mode!r}")
        try:
            canonical_kl_kind(self.kl_loss_type)
        except ValueError as e:
            raise ValueError(f"kl_loss_type: {e}") from None
        for name in ("kl_loss_coef", "cpl_coef", "entropy_coef"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        for name in ("kl_loss_coef", "cpl_coef"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if not self.cpl_tau > 0:
            raise ValueError(f"cpl_tau must be > 0, got {self.cpl_tau!r}")
        if not 0.0 < self.cpl_top_percent <= 1.0:
            raise ValueError(f"cpl_top_percent must be in (0, 1], got {self.cpl_top_percent!r}")
        if self.cpl_divergence_clamp is not None and not (
                isinstance(self.cpl_divergence_clamp, (int, float))
                and self.cpl_divergence_clamp > 0):
            raise ValueError(f"cpl_divergence_clamp must be None or > 0, "
                             f"got {self.cpl_divergence_clamp!r}")
        if not self.cpl_entropy_eps >= 0:
            raise ValueError(f"cpl_entropy_eps must be >= 0, got {self.cpl_entropy_eps!r}")
        if self.cpl_divergence is not None and self.cpl_divergence != FULL_VOCAB:
            try:
                canonical_kl_kind(self.cpl_divergence)
            except ValueError:
                raise ValueError(f"cpl_divergence must be None, 'k1', 'k2', 'k3', 'low_var_kl' or "
                                 f"'{FULL_VOCAB}', got {self.cpl_divergence!r}") from None
        # settings that would be silently ignored
        defaults = CPPOLossConfig.__dataclass_fields__
        cpl_fields = ("cpl_tau", "cpl_top_percent", "cpl_entropy_eps", "use_perception_mask",
                      "advantage_gating", "cpl_divergence", "cpl_divergence_clamp")
        changed = [f for f in cpl_fields if getattr(self, f) != defaults[f].default]
        if self.cpl_coef == 0 and changed:
            warnings.warn(f"CPPOLossConfig: {', '.join(changed)} ignored because cpl_coef = 0",
                          stacklevel=3)
        if self.cpl_divergence == FULL_VOCAB and self.cpl_divergence_clamp is not None:
            warnings.warn("CPPOLossConfig: cpl_divergence_clamp ignored because "
                          "cpl_divergence='full_vocab'", stacklevel=3)
        if not self.use_perception_mask:
            unused = [f for f in ("cpl_top_percent", "cpl_entropy_eps")
                      if getattr(self, f) != defaults[f].default]
            if unused:
                warnings.warn(f"CPPOLossConfig: {', '.join(unused)} ignored because "
                              "use_perception_mask=False", stacklevel=3)

    @property
    def cpl_divergence_kind(self) -> str:
        """'k1' | 'k2' | 'k3' | 'full_vocab' after resolving None to the KL-loss estimator."""
        if self.cpl_divergence == FULL_VOCAB:
            return FULL_VOCAB
        return canonical_kl_kind(self.cpl_divergence or self.kl_loss_type)


def build_perception_term(config: CPPOLossConfig, *, tp_group: Optional[dist.ProcessGroup] = None,
                          temperature: float = 1.0, chunk_size: Optional[int] = None,
                          valid_vocab: Optional[int] = None) -> PerceptionTerm:
    """The CPL term the config describes. ``tp_group``, ``temperature``, ``chunk_size`` and
    ``valid_vocab`` describe the logits and are used only by the full-vocabulary divergence."""
    if config.cpl_coef == 0:
        return NoPerceptionTerm()
    if config.use_perception_mask:
        selector = TopRelativeEntropyIncrease(top_percent=config.cpl_top_percent,
                                              eps=config.cpl_entropy_eps)
    else:
        selector = AllResponseTokens()
    if config.cpl_divergence_kind == FULL_VOCAB:
        divergence = FullVocabDivergence(group=tp_group, temperature=temperature,
                                         chunk_size=chunk_size, valid_vocab=valid_vocab)
    else:
        divergence = SampledDivergence(kind=config.cpl_divergence_kind,
                                       clamp=config.cpl_divergence_clamp)
    return ContrastivePerceptionLoss(selector=selector, divergence=divergence, tau=config.cpl_tau,
                                     advantage_gating=config.advantage_gating,
                                     agg_mode=config.loss_agg_mode)


def samples_needing_perturbed_passes(config: CPPOLossConfig, advantages_B: torch.Tensor,
                                     response_mask_BT: torch.Tensor) -> torch.Tensor:
    """bool ``[B]``: the samples whose I+ and I- passes the loss needs. Gating on: advantage > 0
    (a sample at or below its group mean contributes nothing to CPL); gating off: every sample with
    a response token; cpl_coef = 0: none."""
    return build_perception_term(config).samples_needing_passes(advantages_B, response_mask_BT)


class CPPOLoss:
    """The per-micro-batch CPPO loss. ``perception`` replaces the CPL term built from the config
    (any ``PerceptionTerm``); the policy-loss part knows nothing about it."""

    def __init__(self, config: CPPOLossConfig, *, tp_group: Optional[dist.ProcessGroup] = None,
                 temperature: float = 1.0, chunk_size: Optional[int] = None,
                 valid_vocab: Optional[int] = None,
                 perception: Optional[PerceptionTerm] = None):
        self.config = config
        self.perception = perception or build_perception_term(
            config, tp_group=tp_group, temperature=temperature, chunk_size=chunk_size,
            valid_vocab=valid_vocab)

    def samples_needing_perturbed_passes(self, advantages_B: torch.Tensor,
                                         response_mask_BT: torch.Tensor) -> torch.Tensor:
        """bool ``[B]``; the trainer runs the I+/I- passes for exactly these rows."""
        return self.perception.samples_needing_passes(advantages_B, response_mask_BT)

    def __call__(self, batch: CPPOMicroBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Returns ``(loss, metrics)`` of this micro-batch, unscaled (see the module docstring);
        metrics are detached 0-d tensors."""
        cfg = self.config
        mask_BT = batch.response_mask_BT.bool()
        advantages_B1 = batch.advantages_B.detach().to(batch.log_probs_BT.dtype).unsqueeze(-1)
        pg_loss, metrics = ppo_clip_policy_loss(
            batch.log_probs_BT, batch.old_log_probs_BT.detach(), advantages_B1, mask_BT,
            clip_ratio_low=cfg.clip_ratio_low, clip_ratio_high=cfg.clip_ratio_high,
            clip_ratio_c=cfg.clip_ratio_c, agg_mode=cfg.loss_agg_mode)
        loss = pg_loss

        # Terms in the reference's order: entropy bonus, reference KL, CPL.
        if batch.entropy_BT is not None:
            entropy_BT = torch.where(mask_BT, batch.entropy_BT,
                                     torch.zeros((), dtype=batch.entropy_BT.dtype,
                                                 device=batch.entropy_BT.device))
            if cfg.entropy_coef != 0:
                entropy = aggregate_loss(entropy_BT, mask_BT, cfg.loss_agg_mode)
                loss = loss - cfg.entropy_coef * entropy
            metrics["entropy"] = masked_mean(entropy_BT.detach(), mask_BT)
        elif cfg.entropy_coef != 0:
            raise ValueError("entropy_coef != 0 needs batch.entropy_BT (with grad)")

        if cfg.kl_loss_coef > 0:
            if batch.ref_log_probs_BT is None:
                raise ValueError("kl_loss_coef > 0 needs batch.ref_log_probs_BT")
            kl_loss = reference_kl_loss(batch.log_probs_BT, batch.ref_log_probs_BT.detach(),
                                        mask_BT, kind=cfg.kl_loss_type, agg_mode=cfg.loss_agg_mode)
            loss = loss + cfg.kl_loss_coef * kl_loss
            metrics["kl_loss"] = kl_loss.detach()

        cpl_loss, cpl_metrics = self.perception(batch)
        if cfg.cpl_coef > 0:
            loss = loss + cfg.cpl_coef * cpl_loss
        metrics.update(cpl_metrics)
        metrics["loss"] = loss.detach()
        return loss, metrics
