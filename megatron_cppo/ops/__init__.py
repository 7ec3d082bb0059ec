"""Numerical kernels on tensor-parallel-sharded tensors (pure torch, groups passed explicitly)."""

from megatron_cppo.ops.vocab_parallel import (
    DEFAULT_CHUNK_ELEMENTS,
    IMPLS,
    default_chunk_size,
    full_kl,
    log_probs_and_entropy,
    triton_available,
)

__all__ = ["DEFAULT_CHUNK_ELEMENTS", "IMPLS", "default_chunk_size", "full_kl",
           "log_probs_and_entropy", "triton_available"]
