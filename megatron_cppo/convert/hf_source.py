"""The Hugging Face side of a conversion: a model directory's config and tensors, validated before
anything is written.

``read_hf_config`` accepts only a Qwen2.5-VL ``config.json`` (every dimension a conversion needs is
checked, ``_dims``); ``expected_hf_shapes`` is every tensor such a config holds, the exact oracle
for missing / extra / misshaped tensors; ``HFSource`` serves the tensors of the safetensors files,
in either HF key layout, by >= 4.52 names. HF input: non-float tensors are refused, non-finite
values unless ``allow_non_finite`` (``_check_finite``, which the conversions also apply to tensors
read back from a megatron checkpoint).

``ConversionError`` (bad input to a conversion) lives here, in the lowest of the converter's
modules, so that all of them raise the same error.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from megatron_cppo.checkpoint import CheckpointError
from megatron_cppo.checkpoint.safetensors_io import CheckpointFileError, SafetensorsDir


class ConversionError(CheckpointError):
    """Bad input to a conversion; the message names the file and tensor."""


def read_hf_config(hf_dir: Path):
    """The HF config of a model directory; ConversionError unless it is a Qwen2.5-VL one."""
    from transformers import AutoConfig

    path = hf_dir / "config.json"
    if not path.is_file():
        raise ConversionError(f"{hf_dir}: no config.json (not a Hugging Face model directory)")
    try:
        raw = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ConversionError(f"{path}: unreadable ({e})") from None
    if not isinstance(raw, dict):
        raise ConversionError(f"{path}: expected a JSON object, found a {type(raw).__name__}")
    if raw.get("model_type") != "qwen2_5_vl":
        raise ConversionError(f"{path}: model_type is {raw.get('model_type')!r}, not "
                              f"'qwen2_5_vl' (only Qwen2.5-VL checkpoints are supported)")
    try:
        config = AutoConfig.from_pretrained(str(hf_dir), local_files_only=True)
        _dims(config)  # every dimension the conversion needs, validated
    except Exception as e:  # noqa: BLE001 - transformers / hub validation errors of a bad file
        raise ConversionError(f"{path}: invalid Qwen2.5-VL config ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:300] if str(e) else ''})") from None
    return config


def _dims(hf_config):
    from megatron_cppo.models.qwen2_5_vl.config import Qwen25VLDims

    return Qwen25VLDims.from_hf(hf_config)


def expected_hf_shapes(hf_config) -> dict[str, tuple[int, ...]]:
    """Every tensor an HF checkpoint of this config holds (>= 4.52 names), from the transformers
    model built on the meta device (no memory): the exact oracle for missing/extra/misshaped."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from megatron_cppo.models.qwen2_5_vl import mapping

    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(hf_config)
    names = mapping.hf_names(_dims(hf_config))
    shapes = {mapping.normalize_hf_key(k): tuple(v.shape) for k, v in model.state_dict().items()}
    return {k: shapes[k] for k in sorted(names)}


class HFSource:
    """Validated HF tensors addressed by >= 4.52 names, whatever layout the files use."""

    def __init__(self, hf_dir: Path, hf_config):
        from megatron_cppo.models.qwen2_5_vl import mapping

        try:
            self.files = SafetensorsDir(hf_dir)
        except CheckpointFileError as e:
            raise ConversionError(str(e)) from None
        self.key = {}  # new-layout name -> name in the files
        for name in self.files.names():
            new = mapping.normalize_hf_key(name)
            if new in self.key:
                raise ConversionError(f"{hf_dir}: tensor {new} appears in both HF key layouts "
                                      f"({self.key[new]} and {name})")
            self.key[new] = name
        names = self.files.names()
        has_new = any(n.startswith((mapping.HF_TEXT, mapping.HF_VISION)) for n in names)
        has_old = any(mapping.normalize_hf_key(n) != n for n in names)
        # the key layout of the files ("transformers": what save_pretrained writes); None if mixed
        self.layout = ("language_model" if has_new and not has_old
                       else "transformers" if has_old and not has_new else None)
        expected = expected_hf_shapes(hf_config)
        missing = sorted(set(expected) - set(self.key))
        extra = sorted(set(self.key) - set(expected))
        if missing:
            raise ConversionError(f"{hf_dir}: missing tensors {missing[:5]}"
                                  + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
        if extra:
            raise ConversionError(f"{hf_dir}: unexpected tensors {extra[:5]}"
                                  + (f" and {len(extra) - 5} more" if len(extra) > 5 else "")
                                  + " (not part of this Qwen2.5-VL config)")
        for name, shape in expected.items():
            info = self.files.tensors[self.key[name]]
            if info.shape != shape:
                raise ConversionError(f"{info.file}: tensor {info.name} has shape "
                                      f"{list(info.shape)}, the config needs {list(shape)}")
            if not info.dtype.is_floating_point:
                raise ConversionError(f"{info.file}: tensor {info.name} has dtype "
                                      f"{str(info.dtype).removeprefix('torch.')}; weights must "
                                      f"be floating point")
        self.hf_dir = hf_dir

    def get(self, name: str, allow_non_finite: bool = False) -> torch.Tensor:
        try:
            t = self.files.get(self.key[name])
        except CheckpointFileError as e:
            raise ConversionError(str(e)) from None
        if not allow_non_finite:
            _check_finite(t, f"{self.files.tensors[self.key[name]].file}: tensor "
                             f"{self.key[name]}")
        return t

    def total_bytes(self) -> int:
        return self.files.total_bytes()


def _check_finite(t: torch.Tensor, what: str) -> None:
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise ConversionError(f"{what} has {bad} non-finite values (NaN / inf); pass "
                              f"--allow-non-finite to convert it anyway")
