"""Per-micro-batch inputs of the CPPO loss.

The trainer fills these from the clean pass (with grad), the old-policy and reference passes (no
grad) and, for the samples that need them, the perturbed-image passes I+ and I- (with grad).

Shape suffixes: B sequences of the micro-batch, T response positions (padded, token t holds the
log-prob of response token t), P samples that ran perturbed passes, V this rank's vocab shard.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

__all__ = ["CPPOMicroBatch", "PerturbedPasses"]


def _check_shape(name: str, t: Optional[torch.Tensor], shape: tuple) -> None:
    if t is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)}")


@dataclass(kw_only=True)
class PerturbedPasses:
    """Outputs of the I+ and I- passes for a subset of the micro-batch.

    ``sample_idx_P`` are the micro-batch rows these passes ran for (any order, no repeats). Passes
    for samples the loss does not need (gated out, see ``CPPOLoss.samples_needing_perturbed_passes``)
    may be given or left out: the loss and every gradient are the same either way.
    """

    sample_idx_P: torch.Tensor
    # log pi(y_t | x, I+) and log pi(y_t | x, I-), with grad: the sampled-token divergences.
    plus_log_probs_PT: Optional[torch.Tensor] = None
    minus_log_probs_PT: Optional[torch.Tensor] = None
    # Full-vocabulary entropy of the I- pass (used detached): the perception-token selection.
    minus_entropy_PT: Optional[torch.Tensor] = None
    # This rank's vocab shard of the I+ / I- logits: only for the full-vocabulary divergence.
    plus_logits_PTV: Optional[torch.Tensor] = None
    minus_logits_PTV: Optional[torch.Tensor] = None

    def __post_init__(self):
        if self.sample_idx_P.dim() != 1 or self.sample_idx_P.dtype.is_floating_point:
            raise ValueError("sample_idx_P must be a 1-D integer tensor of micro-batch rows")
        present = [t for t in (self.plus_log_probs_PT, self.minus_log_probs_PT,
                               self.minus_entropy_PT) if t is not None]
        if present:
            shape = (self.sample_idx_P.numel(), present[0].shape[-1])
            for name in ("plus_log_probs_PT", "minus_log_probs_PT", "minus_entropy_PT"):
                _check_shape(name, getattr(self, name), shape)
        if self.plus_logits_PTV is not None and self.minus_logits_PTV is not None:
            _check_shape("minus_logits_PTV", self.minus_logits_PTV, self.plus_logits_PTV.shape)
        if torch.unique(self.sample_idx_P).numel() != self.sample_idx_P.numel():
            raise ValueError("sample_idx_P has repeated rows")


@dataclass(kw_only=True)
class CPPOMicroBatch:
    """One micro-batch of responses. ``log_probs_BT`` carries the graph to the clean logits."""

    log_probs_BT: torch.Tensor              # a_t, clean pass, with grad
    old_log_probs_BT: torch.Tensor          # policy before the update, no grad
    response_mask_BT: torch.Tensor          # 1 on response tokens, 0 on padding
    advantages_B: torch.Tensor              # GRPO advantage per sequence
    entropy_BT: Optional[torch.Tensor] = None      # H_t of the clean pass (selection, metric, bonus)
    ref_log_probs_BT: Optional[torch.Tensor] = None  # frozen reference, needed if kl_coef > 0
    logits_BTV: Optional[torch.Tensor] = None      # clean logits shard, full-vocab divergence only
    perturbed: Optional[PerturbedPasses] = None

    def __post_init__(self):
        shape = tuple(self.log_probs_BT.shape)
        if len(shape) != 2:
            raise ValueError(f"log_probs_BT must be [B, T], got {shape}")
        for name in ("old_log_probs_BT", "response_mask_BT", "entropy_BT", "ref_log_probs_BT"):
            _check_shape(name, getattr(self, name), shape)
        _check_shape("advantages_B", self.advantages_B, shape[:1])
        if self.logits_BTV is not None and tuple(self.logits_BTV.shape[:2]) != shape:
            raise ValueError(f"logits_BTV has shape {tuple(self.logits_BTV.shape)}, expected "
                             f"{shape} + (V/tp,)")
