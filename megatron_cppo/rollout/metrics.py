"""Rollout-vs-trainer agreement metric."""

from __future__ import annotations

from typing import Optional

import torch


def rollout_vs_train_logprob_diff(rollout_logprobs: torch.Tensor, train_logprobs: torch.Tensor,
                                  mask: Optional[torch.Tensor] = None) -> float:
    """``rollout_vs_train_logprob_diff``: mean |vLLM sampling log-prob - trainer clean-pass
    log-prob| over the response tokens (``mask`` > 0; all tokens when None). Both [B, T] (or any
    equal shapes); the trainer's log-probs must use the same temperature and ``valid_vocab``.
    Near 1e-3 in bf16 is normal; a jump means the engine and the trainer disagree (a bad refit,
    a masking or temperature mismatch)."""
    if rollout_logprobs.shape != train_logprobs.shape:
        raise ValueError(f"rollout log-probs {tuple(rollout_logprobs.shape)} and trainer "
                         f"log-probs {tuple(train_logprobs.shape)} differ in shape")
    diff = (rollout_logprobs.double() - train_logprobs.double()).abs()
    if mask is None:
        return float(diff.mean()) if diff.numel() else 0.0
    if mask.shape != diff.shape:
        raise ValueError(f"mask {tuple(mask.shape)} does not match log-probs {tuple(diff.shape)}")
    weight = mask.double()
    total = float(weight.sum())
    return float((diff * weight).sum() / total) if total > 0 else 0.0
