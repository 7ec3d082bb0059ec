"""The reference reward (0.9 accuracy + 0.1 format) on a table of graded responses.

Proves: last-box extraction (nesting, several boxes, none, unbalanced), mathruler's equivalences
as the reference uses them, the format regex, that grading never raises, and swapping by dotted path.
Does not prove mathruler's grader is right beyond these cases."""

import pytest

from megatron_cppo.rewards import (cppo_reward, last_boxed, load_reward_fn, score_responses)

T = "<think>reasoning</think> "
# (response, ground truth, accuracy, format, unparsable)
CASES = [
    (T + r"\boxed{3}", "3", 1, 1, False),
    (T + r"\boxed{4}", "3", 0, 1, False),
    (r"\boxed{3}", "3", 1, 0, False),                          # no think block
    (T + "the answer is 3", "3", 0, 0, True),                  # no box
    ("", "3", 0, 0, True),
    (T + r"\boxed{0.5}", r"\frac{1}{2}", 1, 1, False),
    (T + r"\boxed{1/2}", "0.5", 1, 1, False),
    (T + r"\boxed{\frac12}", "0.5", 1, 1, False),
    (T + r"\boxed{\dfrac{3}{4}}", "3/4", 1, 1, False),
    (T + r"\boxed{\frac{2}{4}}", r"\frac{1}{2}", 0, 1, False),   # unreduced fraction: not equal
    (T + r"\boxed{3.0}", "3", 1, 1, False),
    (T + r"\boxed{1,000}", "1000", 1, 1, False),
    (T + r"\boxed{10\text{ cm}}", "10", 1, 1, False),          # units
    (T + r"\boxed{10 cm}", "10", 1, 1, False),
    (T + r"\boxed{90^\circ}", "90", 1, 1, False),
    (T + r"\boxed{50\%}", "50", 1, 1, False),
    (T + r"\boxed{\sqrt{2}/2}", r"\frac{\sqrt{2}}{2}", 1, 1, False),  # nested braces
    (T + r"\boxed{\frac{\sqrt{3}}{2}}", r"\frac{\sqrt{3}}{2}", 1, 1, False),
    (T + r"\boxed{x=3}", "3", 1, 1, False),
    (T + r"\boxed{(1,2)}", "(1, 2)", 1, 1, False),
    (T + r"\boxed{(2,1)}", "(1, 2)", 0, 1, False),
    (T + r"\boxed{red}", "red", 1, 1, False),
    (T + r"\boxed{Red}", "red", 1, 1, False),
    (T + r"\boxed{left}", "right", 0, 1, False),
    (T + r"\boxed{\text{(A)}}", "A", 1, 1, False),
    (T + r"\boxed{1} then \boxed{2}", "2", 1, 1, False),      # the last box counts
    (T + r"\boxed{2} then \boxed{1}", "2", 0, 1, False),
    (T + r"\boxed{2} then \boxed{1", "2", 0, 1, True),        # last box unbalanced: unparsable
    # malformed LaTeX, unbalanced: no complete box, but the reference's format regex still matches
    (T + r"\boxed{\frac{1}{2}", "0.5", 0, 1, True),
    (T + r"\boxed{\frac{1}{}}", "0.5", 0, 1, False),          # malformed LaTeX, balanced
    (T + r"\boxed{\sqrt{}}", "2", 0, 1, False),
    (T + r"\boxed{}", "3", 0, 1, False),                      # empty box
    (T + r"\boxed{\boxed{7}}", "7", 1, 1, False),  # box in a box: the last one opened counts
    ("<think>a</think>" + r"\boxed{5}" + " trailing text", "5", 1, 1, False),
    ("<think>multi\nline</think>\n" + r"\boxed{5}", "5", 1, 1, False),  # DOTALL
    ("</think><think>" + r"\boxed{5}", "5", 1, 0, False),     # tags out of order
    (T + r"\boxed{2\pi}", r"2\pi", 1, 1, False),
    (T + r"\boxed{6.28}", r"2\pi", 0, 1, False),
]


@pytest.mark.parametrize("response,gt,acc,fmt,unparsable", CASES)
def test_reward_table(response, gt, acc, fmt, unparsable):
    out = cppo_reward(response, gt)
    assert (out.accuracy, out.format, out.unparsable) == (acc, fmt, unparsable)
    assert out.score == pytest.approx(0.9 * acc + 0.1 * fmt)
    assert not out.grader_error


def test_last_boxed_and_batch_scoring():
    assert last_boxed(r"\boxed{a{b}c} x \boxed{\frac{1}{2}}") == r"\frac{1}{2}"
    assert last_boxed("no box") is None
    fn = load_reward_fn()
    scores, m = score_responses(fn, [T + r"\boxed{1}", "nothing", 123], ["1", "1", "1"])
    assert scores == [1.0, 0.0, 0.0]
    assert m["reward/unparsable"] == 2 and m["reward/accuracy"] == pytest.approx(1 / 3)


def test_swap_by_dotted_path():
    fn = load_reward_fn("megatron_cppo.rewards.boxed_math.format_reward")
    scores, _ = score_responses(lambda r, g: fn(r), [T + r"\boxed{1}"], ["2"])
    assert scores == [1.0]

    def boom(r, g):
        raise RuntimeError("grader bug")
    scores, m = score_responses(boom, ["x"], ["y"])
    assert scores == [0.0] and m["reward/grader_error"] == 1
    with pytest.raises(ValueError, match="cannot be imported"):
        load_reward_fn("megatron_cppo.rewards.boxed_math:nope")
    with pytest.raises(ValueError, match="dotted path"):
        load_reward_fn("nodots")
