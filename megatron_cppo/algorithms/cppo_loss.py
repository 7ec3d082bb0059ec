"""The CPPO micro-batch loss: GRPO policy loss + reference KL + Contrastive Perception Loss.

    loss = L_pg - entropy_coef * L_H + kl_coef * L_KL + cpl_coef * L_CPL

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
from megatron_cppo.options import bad, check_bool, check_choice, check_float, option

__all__ = ["CPPOLoss", "CPPOLossConfig", "build_perception_term",
           "samples_needing_perturbed_passes"]

FULL_VOCAB = "full_vocab"


@dataclass(kw_only=True)
class CPPOLossConfig:
    """Loss settings; defaults reproduce the reference CPPO recipe (docs/cppo-objective.md). Every
    field is a trainer flag of the same name (``--kl-coef``, ``--no-cpl-gating``, ...)."""

    # PPO clip and dual clip
    clip_ratio_low: float = option(0.2, "PPO clip, lower")
    clip_ratio_high: float = option(0.2, "PPO clip, upper")
    clip_ratio_c: float = option(3.0, "PPO dual clip for negative advantages")
    loss_agg_mode: str = option("token-mean", "token-mean, seq-mean-token-sum, "
                                              "seq-mean-token-mean or seq-mean-token-sum-norm")
    # KL to the frozen reference model as a loss term
    kl_coef: float = option(0.01, "coefficient of the KL-to-reference loss term (0: no "
                                  "reference model is built)")
    kl_estimator: str = option("low_var_kl", "k1, k2, k3 or low_var_kl (= k3)")
    # entropy bonus (entropy is still computed for selection and logging)
    entropy_coef: float = option(0.0, "entropy bonus coefficient")
    # Contrastive Perception Loss; cpl_coef = 0 is plain GRPO (no perturbed passes)
    cpl_coef: float = option(0.01, "Contrastive Perception Loss coefficient (0: plain GRPO, no "
                                   "perturbed passes)")
    cpl_tau: float = option(0.1, "CPL temperature")
    cpl_top_percent: float = option(0.5, "fraction of the tokens with an entropy increase kept "
                                         "as perception tokens")
    cpl_entropy_eps: float = option(1e-6, "epsilon of the relative entropy increase "
                                          "(H(I-) - H) / (H + eps) that selects the tokens")
    perception_mask: bool = option(True, "CPL on the selected perception tokens only")
    cpl_gating: bool = option(True, "CPL only for responses with advantage > 0")
    # CPL divergence: None follows kl_estimator; or k1 | k2 | k3 | low_var_kl | "full_vocab"
    # (exact KL over the TP-sharded vocabulary, beyond the reference; needs the logits).
    cpl_divergence: Optional[str] = option(
        None, "divergence of the CPL terms: k1, k2, k3, low_var_kl or full_vocab (the exact KL "
              "over the whole vocabulary, beyond the reference); default: --kl-estimator's")
    # Opt-in clamp of the sampled-token CPL divergences to [-c, c] (beyond the reference, which
    # clamps only inside k3); None: no extra clamp.
    cpl_divergence_clamp: Optional[float] = option(
        None, "clamp the sampled-token CPL divergences to [-c, c] (beyond the reference, which "
              "clamps only inside k3); default: none")

    def __post_init__(self):
        check_float(self, "clip_ratio_low", 0.0, 1.0, hi_open=True)
        check_float(self, "clip_ratio_high", 0.0)
        check_float(self, "clip_ratio_c", 1.0, lo_open=True)
        check_choice(self, "loss_agg_mode", AGG_MODES)
        check_float(self, "kl_coef", 0.0)
        try:
            canonical_kl_kind(self.kl_estimator)
        except ValueError as e:
            raise bad("kl_estimator", str(e)) from None
        check_float(self, "entropy_coef")
        check_float(self, "cpl_coef", 0.0)
        check_float(self, "cpl_tau", 0.0, lo_open=True)
        check_float(self, "cpl_top_percent", 0.0, 1.0, lo_open=True)
        check_float(self, "cpl_entropy_eps", 0.0, lo_open=True)
        check_bool(self, "perception_mask")
        check_bool(self, "cpl_gating")
        if self.cpl_divergence is not None and self.cpl_divergence != FULL_VOCAB:
            try:
                canonical_kl_kind(self.cpl_divergence)
            except ValueError:
                raise bad("cpl_divergence", f"must be 'k1', 'k2', 'k3', 'low_var_kl' or "
                          f"'{FULL_VOCAB}', got {self.cpl_divergence!r}") from None
        check_float(self, "cpl_divergence_clamp", 0.0, lo_open=True, optional=True)
        # settings that would be silently ignored
        defaults = CPPOLossConfig.__dataclass_fields__
        cpl_fields = ("cpl_tau", "cpl_top_percent", "cpl_entropy_eps", "perception_mask",
                      "cpl_gating", "cpl_divergence", "cpl_divergence_clamp")
        changed = [f for f in cpl_fields if getattr(self, f) != defaults[f].default]
        if self.cpl_coef == 0 and changed:
            warnings.warn(f"CPPOLossConfig: {', '.join(changed)} ignored because cpl_coef = 0",
                          stacklevel=3)
        if self.cpl_divergence == FULL_VOCAB and self.cpl_divergence_clamp is not None:
            warnings.warn("CPPOLossConfig: cpl_divergence_clamp ignored because "
                          "cpl_divergence='full_vocab'", stacklevel=3)
        if not self.perception_mask:
            unused = [f for f in ("cpl_top_percent", "cpl_entropy_eps")
                      if getattr(self, f) != defaults[f].default]
            if unused:
                warnings.warn(f"CPPOLossConfig: {', '.join(unused)} ignored because "
                              "perception_mask=False", stacklevel=3)

    @property
    def cpl_divergence_kind(self) -> str:
        """'k1' | 'k2' | 'k3' | 'full_vocab' after resolving None to the KL-loss estimator."""
        if self.cpl_divergence == FULL_VOCAB:
            return FULL_VOCAB
        return canonical_kl_kind(self.cpl_divergence or self.kl_estimator)


def build_perception_term(config: CPPOLossConfig, *, tp_group: Optional[dist.ProcessGroup] = None,
                          temperature: float = 1.0, chunk_size: Optional[int] = None,
                          valid_vocab: Optional[int] = None) -> PerceptionTerm:
    """The CPL term the config describes. ``tp_group``, ``temperature``, ``chunk_size`` and
    ``valid_vocab`` describe the logits and are used only by the full-vocabulary divergence."""
    if config.cpl_coef == 0:
        return NoPerceptionTerm()
    if config.perception_mask:
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
                                     advantage_gating=config.cpl_gating,
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

        if cfg.kl_coef > 0:
            if batch.ref_log_probs_BT is None:
                raise ValueError("kl_coef > 0 needs batch.ref_log_probs_BT")
            kl_loss = reference_kl_loss(batch.log_probs_BT, batch.ref_log_probs_BT.detach(),
                                        mask_BT, kind=cfg.kl_estimator, agg_mode=cfg.loss_agg_mode)
            loss = loss + cfg.kl_coef * kl_loss
            metrics["kl_loss"] = kl_loss.detach()

        cpl_loss, cpl_metrics = self.perception(batch)
        if cfg.cpl_coef > 0:
            loss = loss + cfg.cpl_coef * cpl_loss
        metrics.update(cpl_metrics)
        metrics["loss"] = loss.detach()
        return loss, metrics
