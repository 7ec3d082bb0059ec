"""What plugs into the trainer: the prompt source, the rollout source and the reward.

    Plugins(prompts=..., rollout=..., reward_fn=..., valid_vocab=..., val_prompts=...)

The real ones (training/builder.default_plugins): ``megatron_cppo.data.PromptDataset``, the
vLLM engine behind ``megatron_cppo.rollout.VLLMRolloutSource``, and ``reward_fn_from`` of
``megatron_cppo.rewards.load_reward_fn()``. Tests plug in recorded ones
(tests/helpers/recorded.py). Any implementation must pass the contract tests
(tests/training/test_plugin_contracts.py); the records they exchange are
``megatron_cppo.data.PromptItem`` and ``Sample`` (data/types.py).

Every rank of the job holds the same plug-ins and calls them alike: prompt sources are seeded by
the run seed (the same stream everywhere), a rollout source returns the same samples on every
rank, and a reward is a pure function of the samples.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol, Sequence, runtime_checkable

import torch

from megatron_cppo.data.types import PromptItem, Sample
from megatron_cppo.rollout.config import SamplingConfig

__all__ = ["Plugins", "PromptSource", "RewardFn", "RolloutSource", "reward_fn_from"]


@runtime_checkable
class PromptSource(Protocol):
    """Training or validation prompts, the same stream on every rank (seeded by the run seed)."""

    def next_batch(self, num_prompts: int) -> list[PromptItem]:
        """The next ``num_prompts`` prompts in the epoch order (wraps to a new, reshuffled
        epoch)."""
        ...

    def state_dict(self) -> dict:
        """The data position (picklable): saved in every checkpoint. ``load_state_dict`` of it in
        a source built alike gives the same following prompts."""
        ...

    def load_state_dict(self, state: dict) -> None:
        ...

    def stats(self) -> dict[str, float]:
        """Numbers for the run's metrics (the data reader's: epoch, rows kept and skipped by
        reason); may be empty."""
        ...

    def reports(self) -> list[str]:
        """Console lines not reported yet (the data reader's account of what it kept and
        skipped, at open and per epoch); may be empty."""
        ...


@runtime_checkable
class RolloutSource(Protocol):
    """The engine that samples responses with the current policy (vLLM in its own process)."""

    def generate(self, prompts: Sequence[PromptItem], sampling: SamplingConfig) -> list[Sample]:
        """``sampling.n`` responses per prompt, prompt-major (the n responses of prompt p are
        consecutive with ``group_id`` = p), the same list on EVERY rank. Each ``Sample`` is
        ``Sample.from_prompt(prompts[p], ...)``: the prompt's ids, pixels, I+/I- views, ground
        truth and row index, the response ids, the sampler's per-token log-probs
        (``rollout_log_probs``), ``weight_version`` = the engine's weights, ``response_text``
        and ``finish_reason``. ``sampling.seed`` is the caller's (None: the source chooses a
        reproducible one)."""
        ...

    def refit(self, chunks: Sequence[torch.nn.Module], state: Any, weight_version: int) -> None:
        """Load the policy's current weights (this rank's TP/PP shards of ``chunks``); collective
        over all training ranks. Afterwards ``generate`` samples from ``weight_version``."""
        ...

    def close(self) -> None:
        ...


class RewardFn(Protocol):
    def __call__(self, samples: Sequence[Sample]) -> list[dict[str, float]]:
        """One dict per sample with at least ``reward``; ``acc`` and ``format`` if known."""
        ...


@dataclass
class Plugins:
    prompts: PromptSource
    rollout: RolloutSource
    reward_fn: RewardFn
    valid_vocab: int                             # tokenizer vocabulary size
    val_prompts: Optional[Sequence[PromptItem]] = None  # validation prompts
    processor: Any = None  # the data processor, where the prompts have one (the warm start's)
    reports: list = field(default_factory=list)  # console lines of the other datasets (validation)

    def close(self) -> None:
        self.rollout.close()


def reward_fn_from(fn: Callable[[str, str], Any]) -> RewardFn:
    """A ``RewardFn`` from a ``megatron_cppo.rewards`` function ``fn(response_text,
    ground_truth) -> RewardOutput | float`` (e.g. ``rewards.load_reward_fn()``). A grader
    exception scores 0 (and is counted as ``grader_error``)."""

    def score(samples: Sequence[Sample]) -> list[dict[str, float]]:
        out = []
        for s in samples:
            if s.ground_truth is None:
                raise ValueError("a sample without ground_truth (the rollout source must build "
                                 "samples with Sample.from_prompt)")
            try:
                r = fn(s.response_text or "", s.ground_truth)
            except Exception:  # noqa: BLE001 - any grader failure scores 0, counted
                out.append({"reward": 0.0, "acc": 0.0, "format": 0.0, "grader_error": 1.0})
                continue
            if isinstance(r, (int, float)):
                out.append({"reward": float(r)})
            else:
                out.append({"reward": float(r.score), "acc": float(r.accuracy),
                            "format": float(r.format), "unparsable": float(r.unparsable)})
        return out

    return score
