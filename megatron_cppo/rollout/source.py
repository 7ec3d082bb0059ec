"""The trainer's ``RolloutSource`` over a vLLM engine process (training/plugins.py protocols).

    source = VLLMRolloutSource(RolloutConfig(model_path=hf_dir, ...), state)   # collective
    samples = source.generate(prompts, config.sampling())                     # list[Sample]
    source.refit(policy.raw_chunks(), state, weight_version)                 # collective
    source.close()

Who talks to the engine: global rank 0 owns it (``EngineProcess``, spawned by rank 0, or an engine
someone else started, reached through its ``RefitTarget``). Rank 0 generates; the other ranks hold
the same prompt items (every rank's dataset has the same seed), so only the responses travel:
(prompt index, response ids, sampling log-probs, text, finish reason) per response, broadcast over
WORLD. Every rank then builds the same ``Sample`` list (data/types.py) with ``Sample.from_prompt``.
Refit is rollout/refit.py: collective over WORLD, one sender per pipeline stage (its TP rank 0 of
data-parallel rank 0).

Checks that catch a silent mismatch: the token ids vLLM saw for a prompt must equal the dataset's
``input_ids`` (the same tokenizer, chat template and image resize on both sides), else every rank
raises one ValueError naming the prompt.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import torch
import torch.distributed as dist

from megatron_cppo.data.types import PromptItem, Sample
from megatron_cppo.rollout.config import RolloutConfig, SamplingConfig
from megatron_cppo.rollout.engine import RolloutItem
from megatron_cppo.rollout.process import EngineProcess
from megatron_cppo.rollout.refit import refit_from_chunks

__all__ = ["EngineFailure", "VLLMRolloutSource"]


class EngineFailure(RuntimeError):
    """The rollout engine failed (it did not start, died, or a request failed), raised on
    every rank alike: a runtime failure of the run, not bad input (the CLI exits 1, not 2)."""


class _TargetClient:
    """An engine started elsewhere (e.g. a test's), driven through its refit socket."""

    def __init__(self, target):
        self.target = target
        self.valid_vocab = target.query("valid_vocab")

    def generate(self, items, sampling):
        return self.target.query("generate", list(items), sampling)

    def shutdown(self):
        pass  # not ours


class VLLMRolloutSource:
    """See the module docstring. ``engine_target``: use that running engine instead of spawning
    one (rank 0 only reads it; the caller shuts the engine down). ``config.seed`` (the run seed)
    seeds the engine and every generate call's sampling."""

    def __init__(self, config: RolloutConfig, state, *, engine_target=None, group=None):
        self.config, self.state, self.seed = config, state, config.seed
        self.group = group if group is not None else dist.group.WORLD
        self.rank = dist.get_rank()
        self.src = dist.get_global_rank(self.group, 0)
        self.version = 0
        self._calls = 0  # generate calls since the last refit: part of the sampling seed
        self.engine = None
        info: list[Any] = [None]
        if self.rank == self.src:
            try:
                if engine_target is not None:
                    self.engine = _TargetClient(engine_target)
                    target = engine_target
                else:
                    self.engine = EngineProcess(config)
                    target = self.engine.target
                info = [{"target": target, "valid_vocab": self.engine.valid_vocab}]
            except Exception as e:  # noqa: BLE001 - every rank raises it below
                info = [{"error": f"{type(e).__name__}: {e}"}]
        # the other ranks wait here while rank 0 starts vLLM (tens of seconds on CPU)
        dist.broadcast_object_list(info, src=self.src, group=self.group)
        if "error" in info[0]:
            raise EngineFailure(f"the vLLM engine did not start: {info[0]['error']}")
        self.target = info[0]["target"]
        self.valid_vocab: int = info[0]["valid_vocab"]

    # ---- generate

    def generate(self, prompts: Sequence[PromptItem], sampling: SamplingConfig) -> list[Sample]:
        if sampling.seed is None:
            # a fixed function of (run seed, weight version, call): reruns sample the same
            sampling = dataclasses.replace(sampling, seed=(
                self.seed * 1_000_003 + self.version * 10_007 + self._calls * 101) % (2 ** 31))
        self._calls += 1
        payload: list[Any] = [None]
        if self.rank == self.src:
            try:
                payload = [self._generate_on_owner(prompts, sampling)]
            except Exception as e:  # noqa: BLE001 - every rank raises it below
                payload = [{"error": f"{type(e).__name__}: {e}"}]
        dist.broadcast_object_list(payload, src=self.src, group=self.group)
        if isinstance(payload[0], dict):
            raise EngineFailure(f"rollout: {payload[0]['error']}")
        samples = []
        for p, ids, logprobs, text, finish in payload[0]:
            samples.append(Sample.from_prompt(
                prompts[p], torch.tensor(ids, dtype=torch.long), group_id=p,
                rollout_log_probs=torch.tensor(logprobs, dtype=torch.float32),
                weight_version=self.version, response_text=text, finish_reason=finish))
        return samples

    def _generate_on_owner(self, prompts, sampling) -> list[tuple]:
        items = [RolloutItem(prompt=p.prompt, image=(p.images[0] if p.images else None))
                 for p in prompts]
        if any(len(p.images) > 1 for p in prompts):
            raise ValueError("prompts with more than one image are not supported by the rollout")
        groups = self.engine.generate(items, sampling)
        out = []
        for p, (prompt, group) in enumerate(zip(prompts, groups)):
            for s in group.samples:
                if s.prompt_token_ids != prompt.prompt_ids.tolist():
                    raise ValueError(
                        f"prompt {p} (row {prompt.index}): vLLM tokenized it to "
                        f"{len(s.prompt_token_ids)} ids, the dataset to {prompt.prompt_ids.numel()}"
                        " (or to different ids); the model directory's tokenizer, chat template "
                        "and image size must match the data processor's")
                out.append((p, s.response_token_ids, s.logprobs, s.text, s.finish_reason))
        return out

    # ---- refit

    def refit(self, chunks: Sequence[torch.nn.Module], state, weight_version: int) -> None:
        refit_from_chunks(chunks, state, self.target, self.config)
        self.version, self._calls = weight_version, 0

    def close(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None

