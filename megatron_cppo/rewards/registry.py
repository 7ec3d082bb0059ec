"""Reward functions by dotted path, and batch scoring with counts for logging.

A reward function takes ``(response: str, ground_truth: str)`` and returns a ``RewardOutput`` or a
number. ``load_reward_fn("package.module:function")`` (or ``"package.module.function"``) imports
one; the default is ``megatron_cppo.rewards.boxed_math:cppo_reward``.
"""

from __future__ import annotations

import importlib
from collections import Counter
from typing import Callable, Sequence

from megatron_cppo.rewards.boxed_math import RewardOutput

DEFAULT_REWARD_FN = "megatron_cppo.rewards.boxed_math:cppo_reward"
RewardFn = Callable[[str, str], "RewardOutput | float"]


def load_reward_fn(path: str = DEFAULT_REWARD_FN) -> RewardFn:
    """Import ``module:attr`` or ``module.attr``; ValueError naming the path if it is not there."""
    if ":" in path:
        module, _, attr = path.partition(":")
    else:
        module, _, attr = path.rpartition(".")
    if not module or not attr:
        raise ValueError(f"reward function {path!r} is not a dotted path 'package.module:function'")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"reward function {path!r} cannot be imported: {e}") from e
    if not callable(fn):
        raise ValueError(f"reward function {path!r} is not callable")
    return fn


def score_responses(fn: RewardFn, responses: Sequence[str], ground_truths: Sequence[str]
                    ) -> tuple[list[float], dict[str, float]]:
    """Scores, and metrics: counts of unparsable / grader_error responses, mean accuracy and format.

    Never raises for a response: an exception from ``fn`` scores 0 and counts as grader_error."""
    if len(responses) != len(ground_truths):
        raise ValueError(f"{len(responses)} responses but {len(ground_truths)} ground truths")
    scores, counts, acc, fmt = [], Counter(), 0.0, 0.0
    for r, gt in zip(responses, ground_truths):
        try:
            out = fn(r, gt)
        except Exception:
            out = RewardOutput(score=0.0, grader_error=True)
        if not isinstance(out, RewardOutput):
            out = RewardOutput(score=float(out))
        scores.append(float(out.score))
        counts["unparsable"] += out.unparsable
        counts["grader_error"] += out.grader_error
        acc += out.accuracy
        fmt += out.format
    n = max(len(scores), 1)
    metrics = {"reward/unparsable": float(counts["unparsable"]),
               "reward/grader_error": float(counts["grader_error"]),
               "reward/accuracy": acc / n, "reward/format": fmt / n,
               "reward/mean": sum(scores) / n}
    return scores, metrics
