"""Rewards for CPPO rollouts.

    from megatron_cppo.rewards import load_reward_fn, score_responses
    fn = load_reward_fn()      # default "megatron_cppo.rewards.boxed_math:cppo_reward"
    scores, metrics = score_responses(fn, responses, ground_truths)

``cppo_reward(response, ground_truth) -> RewardOutput(score, accuracy, format, unparsable,
grader_error)`` is the reference's 0.9 x accuracy + 0.1 x format (``boxed_math.py``). Any function with the
same signature returning a ``RewardOutput`` or a float can be swapped in by dotted path
(docs/cppo-data.md, "Rewards").
"""

from megatron_cppo.rewards.boxed_math import (RewardOutput, accuracy_reward, cppo_reward, format_reward,
                                        last_boxed)
from megatron_cppo.rewards.registry import DEFAULT_REWARD_FN, load_reward_fn, score_responses

__all__ = ["RewardOutput", "accuracy_reward", "cppo_reward", "format_reward", "last_boxed",
           "DEFAULT_REWARD_FN", "load_reward_fn", "score_responses"]
