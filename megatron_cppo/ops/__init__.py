"""Numerical kernels on tensor-parallel-sharded tensors (pure torch, groups passed explicitly)."""

from megatron_cppo.ops.vocab_parallel import (
    DEFAULT_CHUNK_ELEMENTS,
    canonical_kl_kind,
    default_chunk_size,
    full_kl,
    kl_estimate,
    log_probs_and_entropy,
)

__all__ = ["DEFAULT_CHUNK_ELEMENTS", "canonical_kl_kind", "default_chunk_size", "full_kl",
           "kl_estimate", "log_probs_and_entropy"]
