"""The reference reward: 0.9 x accuracy + 0.1 x format.

* accuracy: the content of the LAST ``\\boxed{...}`` (nested braces allowed) graded against the
  ground truth by mathruler's ``grade_answer`` (string normalisation, then sympy equivalence; the
  reference's grader);
* format: the whole response matches ``<think>.*</think>.*\\boxed{.*}.*`` (DOTALL).

Grading never raises. A response without a complete ``\\boxed{...}`` scores accuracy 0 and is marked
``unparsable`` (mathruler would return the string "None" and could match a ground truth "None"); an
exception inside the grader scores 0 and is marked ``grader_error``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

FORMAT_PATTERN = re.compile(r"<think>.*</think>.*\\boxed\{.*\}.*", re.DOTALL)
ACCURACY_WEIGHT = 0.9
FORMAT_WEIGHT = 0.1


@dataclass(frozen=True)
class RewardOutput:
    score: float
    accuracy: float = 0.0
    format: float = 0.0
    unparsable: bool = False      # no complete \boxed{...} in the response
    grader_error: bool = False    # the grader raised (scored 0)


def last_boxed(text: str) -> str | None:
    """Content of the last complete ``\\boxed{...}`` (brace-balanced), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i0 = 0, start + len("\\boxed{")
    for i in range(i0, len(text)):
        c = text[i]
        if c == "{":
            depth += 1
        elif c == "}":
            if depth == 0:
                return text[i0:i].strip()
            depth -= 1
    return None


def format_reward(response: str) -> float:
    return 1.0 if FORMAT_PATTERN.fullmatch(response) else 0.0


def accuracy_reward(response: str, ground_truth: str) -> tuple[float, bool, bool]:
    """(accuracy, unparsable, grader_error)."""
    answer = last_boxed(response)
    if answer is None:
        return 0.0, True, False
    try:
        from mathruler.grader import grade_answer
        return (1.0 if grade_answer(answer, ground_truth) else 0.0), False, False
    except Exception:  # sympy / pylatexenc can raise on malformed LaTeX: never fail a step
        return 0.0, False, True


def cppo_reward(response: str, ground_truth: str) -> RewardOutput:
    """The reference's ``compute_score``: 0.9 * accuracy + 0.1 * format."""
    if not isinstance(response, str) or not isinstance(ground_truth, str):
        return RewardOutput(score=0.0, unparsable=True)
    acc, unparsable, err = accuracy_reward(response, ground_truth)
    fmt = format_reward(response)
    return RewardOutput(score=ACCURACY_WEIGHT * acc + FORMAT_WEIGHT * fmt, accuracy=acc,
                        format=fmt, unparsable=unparsable, grader_error=err)
