"""Shared helpers of the converter CLI tests: tiny HF Qwen2.5-VL directories in either key layout
and dtype, tensors read back by normalised name, and a byte-level corruption of one tensor chunk of
a megatron distributed checkpoint."""

from __future__ import annotations

import glob
import io
import os
from pathlib import Path

import torch

from helpers import tiny_qwen


def write_hf_dir(path: Path, *, tied: bool, layout: str = "old",
                 dtype: torch.dtype = torch.float32, seed: int = 0) -> Path:
    """A tiny random HF checkpoint. ``layout`` "old": what transformers 5.x's save_pretrained
    writes (``model.*``, ``visual.*``); "new": the >= 4.52 names (``model.language_model.*``,
    ``model.visual.*``), rewritten here from the saved file."""
    from safetensors.torch import load_file, save_file

    from megatron_cppo.models.qwen2_5_vl import mapping

    model = tiny_qwen.hf_model(tiny_qwen.hf_config(tied=tied), seed=seed).to(dtype)
    model.save_pretrained(path)
    files = glob.glob(os.path.join(path, "*.safetensors"))
    assert len(files) == 1, files
    sd = load_file(files[0])
    if layout == "new":
        sd = mapping.normalize_hf_state_dict(sd)
        save_file(sd, files[0], metadata={"format": "pt"})
    names = set(sd)
    assert any(k.startswith("model.language_model.") for k in names) == (layout == "new")
    assert ("lm_head.weight" in names) != tied
    return Path(path)


def raw_hf_tensors(path) -> dict[str, torch.Tensor]:
    """Every tensor of an HF directory under the names in its files."""
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
        out.update(load_file(f))
    return out


def hf_tensors(path) -> dict[str, torch.Tensor]:
    """Every tensor of an HF directory under >= 4.52 names (either layout on disk)."""
    from safetensors.torch import load_file

    from megatron_cppo.models.qwen2_5_vl import mapping

    out: dict[str, torch.Tensor] = {}
    for f in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
        out.update(load_file(f))
    return mapping.normalize_hf_state_dict(out)


def assert_bitwise_equal(got: dict, want: dict, where: str) -> None:
    assert set(got) == set(want), (f"{where}: missing {sorted(set(want) - set(got))[:3]}, extra "
                                   f"{sorted(set(got) - set(want))[:3]}")
    for k in want:
        assert got[k].dtype == want[k].dtype, f"{where}: {k} {got[k].dtype} vs {want[k].dtype}"
        assert got[k].shape == want[k].shape, f"{where}: {k} {got[k].shape} vs {want[k].shape}"
        assert torch.equal(got[k].view(torch.uint8), want[k].view(torch.uint8)), \
            f"{where}: {k} differs"


def no_output_left(out: Path) -> bool:
    """Neither ``out`` nor a temporary sibling (``.{name}.partial-*``) exists."""
    return not out.exists() and not list(out.parent.glob(f".{out.name}.*"))


def corrupt_chunk(megatron_dir, key: str, chunk_offset: tuple[int, ...], scale: float = 0.05,
                  seed: int = 0) -> None:
    """Add noise to one stored chunk of ``key`` in the checkpoint's torch_dist files, in place.

    torch.distributed.checkpoint's FileSystemWriter stores each chunk as a torch.save blob at
    (file, offset, length) recorded in the metadata; the blob is re-serialised with the same shape
    and dtype, which gives the same length, and written back over the old one. Nothing else in the
    checkpoint changes (the metadata still describes it), as with a conversion bug in one tensor."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import MetadataIndex

    model_dir = Path(megatron_dir) / "model"
    md = FileSystemReader(str(model_dir)).read_metadata()
    info = md.storage_data[MetadataIndex(key, torch.Size(chunk_offset))]
    path = model_dir / info.relative_path
    with open(path, "rb") as f:
        f.seek(info.offset)
        blob = f.read(info.length)
    chunk = torch.load(io.BytesIO(blob), weights_only=True)
    g = torch.Generator().manual_seed(seed)
    noisy = (chunk.float() + scale * torch.randn(chunk.shape, generator=g)).to(chunk.dtype)
    buf = io.BytesIO()
    torch.save(noisy, buf)
    new = buf.getvalue()
    assert len(new) == len(blob), (len(new), len(blob))
    with open(path, "r+b") as f:
        f.seek(info.offset)
        f.write(new)


def no_debris(out: Path) -> bool:
    """Nothing next to ``out`` but ``out`` itself: no partial, moved-aside or lock sibling."""
    return not list(out.parent.glob(f".{out.name}.*"))


def flip_low_mantissa_bit(megatron_dir, key: str, subdir: str = "model") -> str:
    """Flip the lowest mantissa bit of the first element of one stored chunk of ``key`` (a float
    tensor), in place, leaving every other byte as it was. Returns the chunk's name as the
    checksum table has it ("<key> at offset [...]")."""
    from torch.distributed.checkpoint import FileSystemReader

    model_dir = Path(megatron_dir) / subdir
    md = FileSystemReader(str(model_dir)).read_metadata()
    index, info = next((i, s) for i, s in sorted(md.storage_data.items(),
                                                 key=lambda kv: list(kv[0].offset or []))
                       if i.fqn == key)
    path = model_dir / info.relative_path
    with open(path, "rb") as f:
        f.seek(info.offset)
        blob = f.read(info.length)
    chunk = torch.load(io.BytesIO(blob), weights_only=True)
    raw = chunk.contiguous().view(torch.uint8).numpy().tobytes()
    at = blob.find(raw[:64])
    assert at >= 0 and blob.find(raw[:64], at + 1) < 0, "tensor bytes not found once in the blob"
    with open(path, "r+b") as f:  # little-endian: byte 0 holds the lowest mantissa bits
        f.seek(info.offset + at)
        b = f.read(1)[0]
        f.seek(info.offset + at)
        f.write(bytes([b ^ 1]))
    after = torch.load(io.BytesIO(open(path, "rb").read()[info.offset:info.offset + info.length]),
                       weights_only=True)
    changed = (after.view(torch.uint8) != chunk.view(torch.uint8)).sum()
    assert int(changed) == 1, int(changed)
    return f"{key} at offset {list(index.offset)}"


def refresh_checksums(megatron_dir) -> None:
    """Recompute checksums.json after a deliberate edit: the checkpoint then looks as if it had
    been written with those values (a conversion bug rather than damage on disk)."""
    from megatron_cppo.checkpoint import integrity

    integrity.write(Path(megatron_dir), {"model": integrity.compute(Path(megatron_dir) / "model")})
