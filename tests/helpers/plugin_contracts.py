"""The contracts of the trainer's plug-ins (megatron_cppo/training/plugins.py), as assertions any
implementation must pass (after THUDM/slime's tests/plugin_contracts). Run on the real
implementations and the recorded ones by tests/training/test_plugin_contracts.py, on the vLLM
rollout source by tests/training/test_vllm_run.py.

    assert_prompt_source_contract(make_source)        # make_source() -> a fresh PromptSource
    assert_rollout_source_contract(source, prompts, sampling, refit=None)
    assert_reward_contract(reward_fn, samples)
"""

from __future__ import annotations

import copy
import inspect
import json
import math
import pickle

import torch

from megatron_cppo.data.types import PromptItem, Sample
from megatron_cppo.training.plugins import PromptSource, RolloutSource


def _same_signature(impl, protocol, name: str) -> None:
    want = list(inspect.signature(getattr(protocol, name)).parameters)[1:]  # without self
    got = list(inspect.signature(getattr(impl, name)).parameters)
    assert got == want, f"{type(impl).__name__}.{name}{tuple(got)}: the protocol has {want}"


def _key(item: PromptItem) -> tuple:
    return item.index, item.epoch, tuple(item.prompt_ids.tolist())


def assert_prompt_source_contract(make_source, *, batch: int = 3) -> None:
    """``make_source()`` builds a fresh source (same data, same seed) each call."""
    a = make_source()
    assert isinstance(a, PromptSource), "next_batch / state_dict / load_state_dict"
    _same_signature(a, PromptSource, "next_batch")
    first = a.next_batch(batch)
    assert isinstance(first, list) and len(first) == batch
    assert all(isinstance(x, PromptItem) for x in first), "prompt items are PromptItem records"
    assert all(x.prompt_ids.dim() == 1 and not x.prompt_ids.dtype.is_floating_point
               and x.prompt_position_ids.shape == (3, x.prompt_ids.numel()) for x in first)
    stats, reports = a.stats(), a.reports()
    assert isinstance(stats, dict) and all(isinstance(k, str) and isinstance(v, float)
                                           for k, v in stats.items()), "stats: {name: float}"
    assert isinstance(reports, list) and all(isinstance(x, str) for x in reports)
    # every rank builds its own source: the same stream from the same construction
    assert [_key(x) for x in make_source().next_batch(batch)] == [_key(x) for x in first]
    # the position survives a checkpoint (pickled with the trainer state) and resumes exactly
    state = pickle.loads(pickle.dumps(a.state_dict()))
    following = [_key(x) for _ in range(2) for x in a.next_batch(batch)]
    b = make_source()
    b.load_state_dict(state)
    assert [_key(x) for _ in range(2) for x in b.next_batch(batch)] == following, \
        "resume is not exact"


def assert_rollout_source_contract(source, prompts: list[PromptItem], sampling, *,
                                   refit=None) -> None:
    """``sampling``: a SamplingConfig with n >= 2. ``refit(source, version)`` (optional): bring
    the source to weight version ``version`` (the real one needs the policy's chunks)."""
    assert isinstance(source, RolloutSource), "generate / refit / close"
    for name in ("generate", "refit"):
        _same_signature(source, RolloutSource, name)
    if refit is not None:
        refit(source, 7)
    samples = source.generate(prompts, sampling)
    assert isinstance(samples, list) and len(samples) == len(prompts) * sampling.n
    for k, s in enumerate(samples):
        p = k // sampling.n  # prompt-major: the n responses of a prompt are consecutive
        assert isinstance(s, Sample)
        assert s.group_id == p, f"sample {k}: group_id {s.group_id}, expected {p}"
        assert torch.equal(s.prompt_ids, prompts[p].prompt_ids)
        assert s.index == prompts[p].index and s.ground_truth == prompts[p].ground_truth
        assert s.rollout_log_probs is not None and s.rollout_log_probs.shape == \
            s.response_ids.shape
        assert torch.isfinite(s.rollout_log_probs).all() and (s.rollout_log_probs <= 0).all()
        assert s.response_ids.numel() <= sampling.max_new_tokens
        if refit is not None:
            assert s.weight_version == 7, "samples carry the refitted weight version"
        assert (s.pixel_values is None) == (not prompts[p].has_image)


def assert_reward_contract(reward_fn, samples: list[Sample]) -> None:
    before = copy.deepcopy(samples)
    scores = reward_fn(samples)
    assert isinstance(scores, list) and len(scores) == len(samples)
    for d in scores:
        assert isinstance(d, dict) and "reward" in d, "one dict with a reward per sample"
        assert all(isinstance(v, float) and math.isfinite(v) for v in d.values()), d
        for key in ("acc", "format"):
            assert key not in d or 0.0 <= d[key] <= 1.0, (key, d)
    json.dumps(scores)  # logged as is
    assert reward_fn(samples) == scores, "a reward is a pure function of the samples"
    assert all(a.reward_extra == b.reward_extra and a.reward == b.reward
               for a, b in zip(samples, before)), "the reward must not write into the samples"
