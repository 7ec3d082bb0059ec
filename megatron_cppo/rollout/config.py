"""Rollout settings: what a rollout step samples, where the vLLM engine lives, how it is built.

Placements (docs/rollout.md):
  * "process": the engine runs in its own spawned process (never under megatron_cppo.platform's
    CPU patches), driven over a pipe; weights arrive from the megatron ranks through shared
    memory. CPU default; on GPU the same for an engine on its own GPUs.
  * "inprocess": the engine lives in the calling process. Only where the platform patches are not
    active (tools, benchmarks, a GPU colocated with its training rank: vLLM sleeps around refits).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megatron_cppo.dtypes import FLOAT_DTYPES, torch_name
from megatron_cppo.options import check_float, check_int, option

PLACEMENTS = ("process", "inprocess")
DTYPES = tuple(torch_name(d) for d in FLOAT_DTYPES.values())  # "float32", "bfloat16", "float16"


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
    """How rollouts are made: what a step samples (the option fields, trainer flags) and how the
    engine is built (the other fields: set by the run from the model and data, or by a direct
    user). ``model_path`` must be set before an engine is built."""

    rollout_batch_size: int = option(8, "prompts per rollout step")
    n_samples_per_prompt: int = option(5, "responses sampled per prompt (the GRPO group)")
    rollout_temperature: float = option(1.0, "sampling temperature; every log-prob pass divides "
                                             "the logits by it")
    rollout_top_p: float = option(
        1.0, "nucleus sampling of the rollout (1: off). As in the reference (verl), only the "
             "sampler truncates: the trainer's log-probs and losses are of the full "
             "temperature-scaled distribution, so below 1 the samples are slightly off-policy "
             "(rollout_vs_train_logprob_diff shows by how much)")
    max_response_length: int = option(1024, "response tokens per sample")
    rollout_gpu_memory_utilization: float = option(
        0.5, "fraction of a GPU's memory the vLLM engine may use (weights and KV cache; GPU "
             "only: on CPU the KV cache is cpu_kvcache_gb)")
    model_path: Optional[str] = None  # HF-format directory (converter export or original)
    placement: str = "process"
    dtype: str = "bfloat16"          # the engine's weights (megatron_cppo.dtypes spellings)
    max_model_len: int = 4096
    max_num_seqs: int = 64
    max_images_per_prompt: int = 1
    seed: int = 0  # engine seed (vLLM's default randomness when a request has no seed)
    enforce_eager: bool = True
    cpu_kvcache_gb: int = 1  # CPU only: VLLM_CPU_KVCACHE_SPACE
    # Compiled-kernel caches (torch inductor, vLLM); default: a folder under the system tmp dir.
    cache_dir: Optional[str] = None
    refit_bucket_mb: int = 256  # bound on the extra memory of a refit (one bucket per sender)
    verify_refit: bool = False  # per-tensor checksums on both sides after every refit
    start_timeout_s: float = 600.0

    def __post_init__(self):
        check_int(self, "rollout_batch_size", 1)
        check_int(self, "n_samples_per_prompt", 1)
        check_float(self, "rollout_temperature", 0.0, lo_open=True)
        check_float(self, "rollout_top_p", 0.0, 1.0, lo_open=True)
        check_int(self, "max_response_length", 1)
        check_float(self, "rollout_gpu_memory_utilization", 0.0, 1.0, lo_open=True)
        # the settings below are not flags: their errors name the field
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {PLACEMENTS}, got {self.placement!r}")
        try:
            self.dtype = torch_name(self.dtype)
        except ValueError:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}") from None
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        for name in ("max_model_len", "max_num_seqs", "max_images_per_prompt", "cpu_kvcache_gb",
                     "refit_bucket_mb"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

    def sampling(self, *, seed: Optional[int] = None) -> SamplingConfig:
        """One rollout step's sampling: ``n_samples_per_prompt`` responses per prompt at
        ``rollout_temperature`` / ``rollout_top_p``, up to ``max_response_length`` tokens."""
        return SamplingConfig(n=self.n_samples_per_prompt, temperature=self.rollout_temperature,
                              top_p=self.rollout_top_p, max_new_tokens=self.max_response_length,
                              seed=seed)
