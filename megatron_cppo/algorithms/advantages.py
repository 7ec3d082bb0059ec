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
    be contiguous). Two deliberate differences from the reference (docs/cppo-objective.md):
    - a group whose rewards are all equal gets exactly 0. Computed literally, the rounding of the
      group mean leaves a residue of one ulp that, divided by a std of the same size plus eps,
      becomes an advantage of up to ~0.1 in fp32 (n = 8 or 16), enough to pass the CPL gate;
    - a group of size 1 gets 0 (the reference divides the raw reward by 1 + eps there).
    ``normalize_by_std=False`` gives Dr.GRPO-style mean-centred advantages.
    Computed in the rewards' dtype promoted to at least fp32; returns ``[N]``, no grad;
    broadcast to response tokens by the caller.
    """
    if rewards_N.dim() != 1 or group_ids_N.shape != rewards_N.shape:
        raise ValueError(f"rewards {tuple(rewards_N.shape)} and group_ids "
                         f"{tuple(group_ids_N.shape)} must be 1-D of the same length")
    dtype = torch.promote_types(rewards_N.dtype, torch.float32)
    rewards_N = rewards_N.detach().to(dtype)
    _, group_N = torch.unique(group_ids_N, return_inverse=True)
    num_groups = int(group_N.max()) + 1 if group_N.numel() else 0
    zeros_G = torch.zeros(num_groups, dtype=dtype, device=rewards_N.device)
    count_G = zeros_G.index_add(0, group_N, torch.ones_like(rewards_N))
    mean_G = zeros_G.index_add(0, group_N, rewards_N) / count_G
    centred_N = rewards_N - mean_G[group_N]
    if not normalize_by_std:
        adv_N = centred_N
    else:
        sq_G = zeros_G.index_add(0, group_N, centred_N.square())
        std_G = torch.sqrt(sq_G / (count_G - 1).clamp(min=1))
        adv_N = centred_N / (std_G[group_N] + eps)
    # Exact zero for singleton groups and for groups without reward spread (max == min).
    max_G = zeros_G.scatter_reduce(0, group_N, rewards_N, "amax", include_self=False)
    min_G = zeros_G.scatter_reduce(0, group_N, rewards_N, "amin", include_self=False)
    informative_N = (count_G > 1)[group_N] & (max_G > min_G)[group_N]
    return torch.where(informative_N, adv_N, torch.zeros_like(adv_N))
