"""The row schema shared by the reader and the built-in generator (verl's parquet schema).

A row gives a question, its images and a string answer; ``row_question`` / ``row_images`` /
``row_answer`` read them from the keys described in ``megatron_cppo.data.dataset`` and raise
``SkipRow(reason)`` for a row that cannot be used.
"""

from __future__ import annotations

import re
from typing import Any

from megatron_cppo.rewards.boxed_math import last_boxed

INSTRUCTION = ("You FIRST think about the reasoning process as an internal monologue and then "
               "provide the final answer. The reasoning process MUST BE enclosed within <think> "
               "</think> tags. The final answer MUST BE put in \\boxed{}.")

SKIP_REASONS = (
    "bad_record",              # a JSONL line that is not a JSON object
    "question_missing",        # no prompt / question, or an empty one
    "answer_not_string",       # the answer is missing or not a string
    "answer_empty",            # the answer (or its \boxed{} content) is empty or blank
    "image_missing",           # no image, or a path that does not exist
    "image_undecodable",       # bytes PIL cannot decode
    "image_aspect_ratio",      # longer side / shorter side > 200 (the resize cannot keep it)
    "image_over_pixel_limit",  # source image larger than max_image_pixels
    "too_many_images",         # more images than max_images_per_prompt
    "image_token_mismatch",    # the number of <image> markers differs from the number of images
    "prompt_too_long",         # more than max_prompt_length tokens after image-token expansion
)

# Rows the reference's own filters drop by design (ViRL39K's at-most-one-image rule, verl's
# ``filter_overlong_prompts``): counted and reported like the others, but not held against
# ``max_skip_fraction``, which guards against data that is broken or misplaced.
FILTER_REASONS = ("too_many_images", "prompt_too_long")


class SkipRow(Exception):
    def __init__(self, reason: str, message: str = ""):
        super().__init__(message or reason)
        self.reason = reason


# ----------------------------------------------------------------------------------------------
# Row -> question, images, answer.

def row_question(row: dict) -> tuple[str, bool]:
    """(text, is_verbatim_prompt)."""
    prompt = row.get("prompt")
    if isinstance(prompt, (list, tuple)):
        users = [m.get("content") for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
        if len(users) == 1 and isinstance(users[0], str) and users[0].strip():
            return users[0], True
    elif isinstance(prompt, str) and prompt.strip():
        return prompt, True
    for key in ("question", "problem"):
        q = row.get(key)
        if isinstance(q, str) and q.strip():
            return q, False
    raise SkipRow("question_missing")


def row_answer(row: dict) -> str:
    """The ground truth: ``reward_model.ground_truth`` (verl rows: already the bare answer), else
    ``answer``. A raw ViRL39K ``answer`` keeps its ``\\boxed{...}`` wrapper; its content is the
    ground truth, as the reference's preprocessing extracts it (mathruler's
    ``extract_boxed_content``: the last box)."""
    rm = row.get("reward_model")
    ans = rm.get("ground_truth") if isinstance(rm, dict) else row.get("answer")
    if not isinstance(ans, str):
        raise SkipRow("answer_not_string", f"answer is {type(ans).__name__}")
    if not isinstance(rm, dict) and "\\boxed{" in ans:
        boxed = last_boxed(ans)
        if boxed is not None:
            ans = boxed
    if not ans.strip():
        raise SkipRow("answer_empty", f"the answer is {ans!r}")
    return ans


def row_images(row: dict) -> list[Any]:
    imgs = row.get("images", row.get("image"))
    if imgs is None:
        return []
    if isinstance(imgs, (list, tuple)):
        return list(imgs)
    return [imgs]


# The reference's ViRL39K preprocessing (``virl39k.py``) scales an image whose shorter side is
# under 28 pixels up to 28 before it stores the row; a raw row read directly gets the same.
VIRL39K_MIN_SIDE = 28


def row_min_side(row: dict) -> int:
    """The shorter-side minimum the row's images are scaled up to before use: 28 for a raw
    ViRL39K row (its images in the ``image`` column of paths, no verl ``prompt``), 0 (none)
    for every other row: verl files were written by preprocessing that applied it already."""
    raw_virl39k = "prompt" not in row and "images" not in row and "image" in row
    return VIRL39K_MIN_SIDE if raw_virl39k else 0


def prompt_question(question: str, verbatim: bool, num_images: int) -> str:
    """The user turn of the prompt: ``"<image>\\n"`` per image in front when the text has no
    marker (the reference puts the image first) and, unless the row's prompt is used verbatim
    (verl preprocessors appended it already), ``" " + INSTRUCTION`` behind."""
    if "<image>" not in question:
        question = "<image>\n" * num_images + question
    return question if verbatim else question + " " + INSTRUCTION


def messages(question: str) -> list[dict]:
    """Split ``<image>`` markers into the processor's content list."""
    content = []
    for seg in re.split(r"(<image>)", question):
        if seg == "<image>":
            content.append({"type": "image"})
        elif seg:
            content.append({"type": "text", "text": seg})
    return [{"role": "user", "content": content}]


