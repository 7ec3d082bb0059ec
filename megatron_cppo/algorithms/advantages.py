"""GRPO outcome advantages: each response's reward standardised within its prompt group.

Shape suffixes: N responses (flattened over prompts), G groups.
"""

from __future__ import annotations

import torch

__all__ = ["grpo_advantages"]


def grpo_advantages(rewards_N: torch.Tensor, group_ids_N: torch.Tensor, *, eps: float = 1e-6,
                    normalize_by_std: bool = True) -> torch.Tensor:
    """A_i = (r_i - mean_group(r)) / (std_group(r) + eps), std unbiased (n - 1).

    ``group_ids_N`` labels the prompt each response was sampled for (any integers; groups need not
    be contiguous). A group of size 1 gets A = 0 (cppo-method.md; verl instead divides the raw reward
    by 1 + eps there). ``normalize_by_std=False`` gives Dr.GRPO-style mean-centred advantages.
    Returns fp32 ``[N]``, no grad; broadcast to response tokens by the caller.
    """
    if rewards_N.dim() != 1 or group_ids_N.shape != rewards_N.shape:
        raise ValueError(f"rewards {tuple(rewards_N.shape)} and group_ids "
                         f"{tuple(group_ids_N.shape)} must be 1-D of the same length")
    rewards_N = rewards_N.detach().float()
    _, group_N = torch.unique(group_ids_N, return_inverse=True)
    num_groups = int(group_N.max()) + 1 if group_N.numel() else 0
    count_G = torch.zeros(num_groups, device=rewards_N.device).index_add_(
        0, group_N, torch.ones_like(rewards_N))
    mean_G = torch.zeros(num_groups, device=rewards_N.device).index_add_(
        0, group_N, rewards_N) / count_G
    centred_N = rewards_N - mean_G[group_N]
    if not normalize_by_std:
        adv_N = centred_N
    else:
        sq_G = torch.zeros(num_groups, device=rewards_N.device).index_add_(
            0, group_N, centred_N.square())
        std_G = torch.sqrt(sq_G / (count_G - 1).clamp(min=1))
        adv_N = centred_N / (std_G[group_N] + eps)
    return torch.where(count_G[group_N] > 1, adv_N, torch.zeros_like(adv_N))
