"""Sampled-token KL estimators (Schulman's k1, k2, k3) used by the reference-KL loss and by the
CPL divergences. Element-wise on per-token log-probs; no process group involved.
"""

from __future__ import annotations

import torch

__all__ = ["canonical_kl_kind", "kl_estimate"]

_KL_KINDS = {"k1": "k1", "kl": "k1", "k2": "k2", "mse": "k2", "k3": "k3", "low_var_kl": "k3"}


def canonical_kl_kind(kind: str) -> str:
    """'k1' | 'k2' | 'k3' for the accepted spellings (verl's 'kl', 'mse', 'low_var_kl' included)."""
    try:
        return _KL_KINDS[kind]
    except (KeyError, TypeError):
        raise ValueError(f"unknown KL estimator {kind!r}; expected one of {sorted(_KL_KINDS)}") \
            from None


def kl_estimate(log_p: torch.Tensor, log_q: torch.Tensor, kind: str) -> torch.Tensor:
    """Sampled-token estimator of KL(p || q) from the log-probs of tokens sampled from p.

    k1 = log_p - log_q; k2 = 0.5 (log_p - log_q)^2; k3 ("low_var_kl"):
    d = clamp(log_q - log_p, -20, 20), k3 = clamp(e^d - d - 1, -10, 10). Only k3 is clamped, as in
    the reference recipe (docs/cppo-objective.md).
    """
    kind = canonical_kl_kind(kind)
    if kind == "k1":
        return log_p - log_q
    if kind == "k2":
        return 0.5 * (log_p - log_q).square()
    d = torch.clamp(log_q - log_p, min=-20.0, max=20.0)
    return torch.clamp(torch.exp(d) - d - 1.0, min=-10.0, max=10.0)
