"""The row schema shared by the reader and the built-in generator (verl's parquet schema).

A row gives a question, its images and a string answer; ``row_question`` / ``row_images`` /
``row_answer`` read them from the keys described in ``megatron_cppo.data.dataset`` and raise
``SkipRow(reason)`` for a row that cannot be used.
"""

from __future__ import annotations

import re
from typing import Any

INSTRUCTION = ("You FIRST think about the reasoning process as an internal monologue and then "
               "provide the final answer. The reasoning process MUST BE enclosed within <think> "
               "</think> tags. The final answer MUST BE put in \\boxed{}.")

SKIP_REASONS = (
    "bad_record",              # a JSONL line that is not a JSON object
    "question_missing",        # no prompt / question, or an empty one
    "answer_not_string",       # the answer is missing or not a string
    "image_missing",           # no image, or a path that does not exist
    "image_undecodable",       # bytes PIL cannot decode
    "image_aspect_ratio",      # longer side / shorter side > 200 (the resize cannot keep it)
    "image_over_pixel_limit",  # source image larger than max_image_pixels
    "too_many_images",         # more images than max_images_per_prompt
    "image_token_mismatch",    # the number of <image> markers differs from the number of images
    "prompt_too_long",         # more than max_prompt_length tokens after image-token expansion
)


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
    rm = row.get("reward_model")
    ans = rm.get("ground_truth") if isinstance(rm, dict) else row.get("answer")
    if not isinstance(ans, str):
        raise SkipRow("answer_not_string", f"answer is {type(ans).__name__}")
    return ans


def row_images(row: dict) -> list[Any]:
    imgs = row.get("images", row.get("image"))
    if imgs is None:
        return []
    if isinstance(imgs, (list, tuple)):
        return list(imgs)
    return [imgs]


def messages(question: str) -> list[dict]:
    """Split ``<image>`` markers into the processor's content list."""
    content = []
    for seg in re.split(r"(<image>)", question):
        if seg == "<image>":
            content.append({"type": "image"})
        elif seg:
            content.append({"type": "text", "text": seg})
    return [{"role": "user", "content": content}]


