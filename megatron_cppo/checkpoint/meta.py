"""The metadata file of a megatron_cppo checkpoint (``megatron_cppo.json``): what it records, and
reading it back validated before any tensor is read."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from megatron_cppo.dtypes import SHORT_NAMES

META_NAME = "megatron_cppo.json"
MODEL_SUBDIR = "model"
FORMAT_VERSION = 2
# Format 1 (converter 0.x before the config rebuild) spelled three fields differently; it still
# loads: its fields are renamed on reading (``parse_meta``).
_V1_NAMES = {"vision_parallel": "vision_parallel_mode",
             "num_layers_in_first_pipeline_stage": "decoder_first_pipeline_num_layers",
             "num_layers_in_last_pipeline_stage": "decoder_last_pipeline_num_layers"}
READABLE_VERSIONS = (1, FORMAT_VERSION)
VISION_PARALLEL_MODES = ("tp", "dp_in_tp")  # as resolved for the layout (never "auto")
# HF key layouts an export can be written in (docs/checkpoints.md):
#   "transformers":   model.embed_tokens / model.layers.* / model.norm / visual.* / lm_head
#                     (what transformers' save_pretrained and the released checkpoints write)
#   "language_model": model.language_model.* / model.visual.* / lm_head (the module names of
#                     transformers >= 4.52 in memory)
HF_LAYOUTS = ("transformers", "language_model")
RESERVED_SUBDIRS = (MODEL_SUBDIR,)


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable or inconsistent (the message names the file)."""


@dataclass(kw_only=True)
class CheckpointMeta:
    format_version: int
    converter_version: str
    hf_config: dict
    source_hf_dir: Optional[str]
    tp: int
    pp: int
    vision_parallel_mode: str
    dtype: str
    padded_vocab_size: int
    # uneven pipeline split the checkpoint was written for (None: even split)
    decoder_first_pipeline_num_layers: Optional[int] = None
    decoder_last_pipeline_num_layers: Optional[int] = None
    # HF key layout of the source directory (HF_LAYOUTS); None: not converted from HF
    source_hf_layout: Optional[str] = None
    # extra distributed-checkpoint subdirectories saved alongside model/ (optimizer, ...)
    extra_state: list = field(default_factory=list)
    # free JSON of the caller (trainer: step, data position, ...)
    extra: dict = field(default_factory=dict)
    # algorithm of checksums.json (integrity.py); None: written before checksums existed
    checksums: Optional[str] = None

    def write(self, directory: Path) -> None:
        (Path(directory) / META_NAME).write_text(
            json.dumps(dataclasses.asdict(self), indent=2) + "\n")

    @property
    def pipeline_split(self) -> dict:
        """Keyword arguments for ``ParallelConfig`` reproducing the recorded split."""
        return dict(decoder_first_pipeline_num_layers=self.decoder_first_pipeline_num_layers,
                    decoder_last_pipeline_num_layers=self.decoder_last_pipeline_num_layers)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


_CHECKS: dict[str, tuple[Any, str]] = {
    "format_version": (_is_int, "an integer"),
    "converter_version": (lambda v: isinstance(v, str), "a string"),
    "hf_config": (lambda v: isinstance(v, dict) and v.get("model_type") == "qwen2_5_vl",
                  "a Qwen2.5-VL config (model_type 'qwen2_5_vl')"),
    "source_hf_dir": (lambda v: v is None or isinstance(v, str), "a path or null"),
    "tp": (lambda v: _is_int(v) and v >= 1, "a positive integer"),
    "pp": (lambda v: _is_int(v) and v >= 1, "a positive integer"),
    "vision_parallel_mode": (lambda v: v in VISION_PARALLEL_MODES,
                             f"one of {list(VISION_PARALLEL_MODES)}"),
    "dtype": (lambda v: v in SHORT_NAMES, f"one of {list(SHORT_NAMES)}"),
    "padded_vocab_size": (lambda v: _is_int(v) and v >= 1, "a positive integer"),
    "decoder_first_pipeline_num_layers": (lambda v: v is None or (_is_int(v) and v >= 1),
                                          "a positive integer or null"),
    "decoder_last_pipeline_num_layers": (lambda v: v is None or (_is_int(v) and v >= 1),
                                         "a positive integer or null"),
    "source_hf_layout": (lambda v: v is None or v in HF_LAYOUTS,
                         f"one of {list(HF_LAYOUTS)} or null"),
    "extra_state": (lambda v: isinstance(v, list) and all(isinstance(s, str) for s in v),
                    "a list of subdirectory names"),
    "extra": (lambda v: isinstance(v, dict), "a JSON object"),
    "checksums": (lambda v: v is None or v == "crc32", "'crc32' or null"),
}


def parse_meta(raw: Any, path: Path) -> CheckpointMeta:
    """Validate the decoded JSON field by field (CheckpointError naming file and field)."""
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: checkpoint metadata must be a JSON object")
    if raw.get("format_version") == 1:  # the old spellings, read as today's
        raw = {_V1_NAMES.get(k, k): v for k, v in raw.items()}
        raw["format_version"] = FORMAT_VERSION
    fields = {f.name: f for f in dataclasses.fields(CheckpointMeta)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise CheckpointError(f"{path}: unknown metadata fields {unknown} (written by a newer "
                              f"version?)")
    required = [n for n, f in fields.items() if f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING]
    missing = [n for n in required if n not in raw]
    if missing:
        raise CheckpointError(f"{path}: metadata lacks {missing}")
    if raw["format_version"] != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {raw['format_version']!r} is not "
                              f"supported (this version reads {list(READABLE_VERSIONS)})")
    for name, value in raw.items():
        ok, what = _CHECKS[name]
        if not ok(value):
            shown = repr(value)
            shown = shown if len(shown) <= 80 else shown[:77] + "..."
            raise CheckpointError(f"{path}: metadata field {name} is {shown}, expected {what}")
    for name in raw["extra_state"] if "extra_state" in raw else ():
        if name in RESERVED_SUBDIRS or not name.isidentifier():
            raise CheckpointError(f"{path}: extra_state name {name!r} is not allowed")
    return CheckpointMeta(**raw)


def read_meta(checkpoint_dir: str | os.PathLike) -> CheckpointMeta:
    """The validated metadata of a checkpoint directory; CheckpointError naming the file when it
    is not a complete megatron_cppo checkpoint."""
    directory = Path(checkpoint_dir)
    path = directory / META_NAME
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: no such checkpoint directory")
    if not path.is_file():
        raise CheckpointError(f"{directory}: not a megatron_cppo checkpoint ({META_NAME} is "
                              f"missing)")
    try:
        raw = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable checkpoint metadata ({e})") from None
    meta = parse_meta(raw, path)
    for sub in [MODEL_SUBDIR] + list(meta.extra_state):
        for name in (".metadata", "metadata.json"):
            if not (directory / sub / name).is_file():
                raise CheckpointError(f"{directory / sub / name}: missing (the distributed "
                                      f"checkpoint {directory / sub} is incomplete)")
    return meta
