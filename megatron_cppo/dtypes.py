"""The dtype table of the house: one name per dtype for each place a dtype is written down.

    short name   "fp32" "bf16" "fp16"           checkpoint metadata, the converter's --dtype
    torch name   "float32" "bfloat16" "float16"  vLLM's ``dtype``, HF ``torch_dtype``, the refit
    safetensors  "F32" "BF16" "F16" ...          safetensors headers (integers and bool too)

``to_torch`` reads any of the float spellings (also ``"torch.bfloat16"`` and torch dtypes), so a
value written by one side is read by the other without a second table.
"""

from __future__ import annotations

from typing import Union

import torch

__all__ = ["FLOAT_DTYPES", "SAFETENSORS_DTYPES", "SHORT_NAMES", "safetensors_code", "short_name",
           "to_torch", "torch_name"]

# the floating-point dtypes checkpoints and engines hold, by short name
FLOAT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SHORT_NAMES = tuple(FLOAT_DTYPES)
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
_SAFETENSORS_CODES = {v: k for k, v in SAFETENSORS_DTYPES.items()}
_SHORT = {v: k for k, v in FLOAT_DTYPES.items()}


def torch_name(dtype: Union[str, torch.dtype]) -> str:
    """"bfloat16" for torch.bfloat16 (or any spelling of it)."""
    return str(to_torch(dtype)).removeprefix("torch.")


def short_name(dtype: Union[str, torch.dtype]) -> str:
    """"bf16" for torch.bfloat16 (or any spelling of it); ValueError for a non-float dtype."""
    d = to_torch(dtype)
    if d not in _SHORT:
        raise ValueError(f"{d} is not one of the floating-point dtypes {list(FLOAT_DTYPES)}")
    return _SHORT[d]


def to_torch(dtype: Union[str, torch.dtype]) -> torch.dtype:
    """The torch dtype of a short name, a torch name ("bfloat16", "torch.bfloat16") or a torch
    dtype; ValueError naming the value otherwise."""
    if isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).removeprefix("torch.")
    if name in FLOAT_DTYPES:
        return FLOAT_DTYPES[name]
    found = getattr(torch, name, None)
    if isinstance(found, torch.dtype):
        return found
    raise ValueError(f"unknown dtype {dtype!r} (expected one of {list(FLOAT_DTYPES)} or a torch "
                     f"dtype name such as 'bfloat16')")


def safetensors_code(dtype: torch.dtype) -> str:
    """The safetensors header code of ``dtype`` ("BF16"); KeyError for one safetensors lacks."""
    return _SAFETENSORS_CODES[dtype]
