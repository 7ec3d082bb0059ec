"""Rollout settings: where the vLLM engine lives, how it is built, how it samples.

Placements (docs/rollout.md):
  * "process": the engine runs in its own spawned process (never under megatron_cppo.platform's
    CPU patches), driven over a pipe; weights arrive from the megatron ranks through shared
    memory. CPU default; on GPU the same for an engine on its own GPUs.
  * "inprocess": the engine lives in the calling process. Only where the platform patches are not
    active (tools, benchmarks, a GPU colocated with its training rank: vLLM sleeps around refits).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

PLACEMENTS = ("process", "inprocess")
DTYPES = ("bfloat16", "float16", "float32")


@dataclass(kw_only=True)
class SamplingConfig:
    """Sampling of one generate call. ``top_k`` -1 and ``top_p`` 1 mean off."""

    n: int = 1  # samples per prompt
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 256
    seed: Optional[int] = None  # None: vLLM's own randomness; an int: reproducible samples

    def __post_init__(self):
        if not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"n must be a positive integer, got {self.n!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.top_k != -1 and self.top_k < 1:
            raise ValueError(f"top_k must be -1 (off) or >= 1, got {self.top_k!r}")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got "
                             f"{self.max_new_tokens!r}")


@dataclass(kw_only=True)
class RolloutConfig:
    model_path: str  # HF-format directory (converter export or original checkpoint)
    placement: str = "process"
    dtype: str = "bfloat16"
    max_model_len: int = 4096
    max_num_seqs: int = 64
    max_images_per_prompt: int = 1
    seed: int = 0  # engine seed (vLLM's default randomness when a request has no seed)
    enforce_eager: bool = True
    gpu_memory_utilization: float = 0.5  # GPU only
    cpu_kvcache_gb: int = 1  # CPU only: VLLM_CPU_KVCACHE_SPACE
    # Compiled-kernel caches (torch inductor, vLLM); default: a folder under the system tmp dir.
    cache_dir: Optional[str] = None
    refit_bucket_mb: int = 256  # bound on the extra memory of a refit (one bucket per sender)
    verify_refit: bool = False  # per-tensor checksums on both sides after every refit
    start_timeout_s: float = 600.0
    sampling: SamplingConfig = field(default_factory=SamplingConfig)

    def __post_init__(self):
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {PLACEMENTS}, got {self.placement!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        for name in ("max_model_len", "max_num_seqs", "max_images_per_prompt", "cpu_kvcache_gb",
                     "refit_bucket_mb"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got "
                             f"{self.gpu_memory_utilization!r}")
        if isinstance(self.sampling, dict):
            self.sampling = SamplingConfig(**self.sampling)
