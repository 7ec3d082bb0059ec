"""Streaming safetensors I/O (the converter's HF side, the rollout engine's weight files):
validated lazy reads, bounded-memory sharded writes.

Reading: ``SafetensorsDir`` opens a directory of ``*.safetensors`` files (with or without
``model.safetensors.index.json``), checks every file's header against its size before anything is
converted (a truncated download fails here with the file named, not halfway through a conversion),
and returns one tensor at a time.

Writing: ``ShardedSafetensorsWriter`` is given every tensor's name, shape and dtype up front, plans
the shards, writes each shard's header first and then streams tensor bytes as they are produced, so at
most one tensor is held in memory. It writes ``model.safetensors.index.json`` like ``save_pretrained``.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch

from megatron_cppo.dtypes import SAFETENSORS_DTYPES, safetensors_code

INDEX_NAME = "model.safetensors.index.json"


class CheckpointFileError(ValueError):
    """A checkpoint file is unreadable, truncated or inconsistent (the message names the file)."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * torch.empty((), dtype=self.dtype).element_size()


def read_header(path: Path) -> tuple[dict, int]:
    """(header dict, byte offset of the data section); validates the file size."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointFileError(f"{path}: not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8:
            raise CheckpointFileError(f"{path}: truncated or not a safetensors file (header "
                                      f"length {n} exceeds the file size {size})")
        try:
            header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError) as e:
            raise CheckpointFileError(f"{path}: unreadable safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointFileError(f"{path}: safetensors header is not a JSON object")
    data_start = 8 + n
    for name, v in header.items():
        if name == "__metadata__":
            continue
        ok = (isinstance(v, dict) and isinstance(v.get("dtype"), str)
              and isinstance(v.get("shape"), list)
              and all(isinstance(d, int) and d >= 0 for d in v["shape"])
              and isinstance(v.get("data_offsets"), list) and len(v["data_offsets"]) == 2
              and all(isinstance(o, int) and o >= 0 for o in v["data_offsets"])
              and v["data_offsets"][0] <= v["data_offsets"][1])
        if not ok:
            raise CheckpointFileError(f"{path}: tensor {name} has a malformed header entry")
        if v["dtype"] in SAFETENSORS_DTYPES:
            numel = 1
            for d in v["shape"]:
                numel *= d
            nbytes = numel * torch.empty((), dtype=SAFETENSORS_DTYPES[v["dtype"]]).element_size()
            if v["data_offsets"][1] - v["data_offsets"][0] != nbytes:
                raise CheckpointFileError(f"{path}: tensor {name}: data_offsets span "
                                          f"{v['data_offsets'][1] - v['data_offsets'][0]} bytes, "
                                          f"its shape and dtype need {nbytes}")
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"),
              default=0)
    if data_start + end > size:
        raise CheckpointFileError(
            f"{path}: truncated safetensors file: its header declares {data_start + end} bytes, "
            f"the file has {size}")
    return header, data_start


class SafetensorsDir:
    """All tensors of a Hugging Face checkpoint directory, read lazily, one at a time."""

    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory)
        files = sorted(self.dir.glob("*.safetensors"))
        if not files:
            raise CheckpointFileError(f"{self.dir}: no *.safetensors files")
        index = self.dir / INDEX_NAME
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                if not isinstance(weight_map, dict) or not all(
                        isinstance(v, str) for v in weight_map.values()):
                    raise ValueError("weight_map is not a mapping of tensor name -> file")
            except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
                raise CheckpointFileError(f"{index}: unreadable index ({type(e).__name__}: "
                                          f"{e})") from None
            missing = sorted({f for f in weight_map.values() if not (self.dir / f).exists()})
            if missing:
                raise CheckpointFileError(f"{index}: lists files that do not exist: {missing}")
        self.tensors: dict[str, TensorInfo] = {}
        for path in files:
            header, _ = read_header(path)
            for name, meta in header.items():
                if name == "__metadata__":
                    continue
                if meta["dtype"] not in SAFETENSORS_DTYPES:
                    raise CheckpointFileError(f"{path}: tensor {name} has unsupported dtype "
                                              f"{meta['dtype']}")
                if name in self.tensors:
                    raise CheckpointFileError(f"{path}: tensor {name} also appears in "
                                              f"{self.tensors[name].file}")
                self.tensors[name] = TensorInfo(name, tuple(meta["shape"]),
                                                SAFETENSORS_DTYPES[meta["dtype"]], path)
        self._open: dict[Path, object] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def names(self) -> list[str]:
        return list(self.tensors)

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        info = self.tensors.get(name)
        if info is None:
            raise CheckpointFileError(f"{self.dir}: tensor {name} not found")
        try:
            handle = self._open.get(info.file)
            if handle is None:
                handle = self._open[info.file] = safe_open(str(info.file), framework="pt")
            return handle.get_tensor(name)
        except Exception as e:  # noqa: BLE001 - a file changed or damaged since validation
            raise CheckpointFileError(f"{info.file}: cannot read tensor {name} "
                                      f"({type(e).__name__}: {str(e)[:200]})") from None

    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


def tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().contiguous().cpu()
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


class ShardedSafetensorsWriter:
    """Writes tensors, in the declared order, into shards of at most ``max_shard_bytes`` each."""

    def __init__(self, out_dir: str | os.PathLike,
                 specs: Iterable[tuple[str, tuple[int, ...], torch.dtype]],
                 max_shard_bytes: int = 5 * 1024**3, metadata: dict | None = None):
        self.out = Path(out_dir)
        self.specs = [TensorInfo(n, tuple(s), d, Path()) for n, s, d in specs]
        shards: list[list[TensorInfo]] = [[]]
        size = 0
        for spec in self.specs:
            if shards[-1] and size + spec.nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(spec)
            size += spec.nbytes
        n = len(shards)
        self.files = ([f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)] if n > 1
                      else ["model.safetensors"])
        self._plan = [(f, s) for f, s in zip(self.files, shards)]
        self._metadata = {"format": "pt", **(metadata or {})}
        self._shard = -1
        self._pending: list[TensorInfo] = []
        self._fh = None
        self.bytes_written = 0

    def _next_shard(self):
        if self._fh is not None:
            self._fh.close()
        self._shard += 1
        fname, specs = self._plan[self._shard]
        header, offset = {"__metadata__": self._metadata}, 0
        for s in specs:
            header[s.name] = {"dtype": safetensors_code(s.dtype), "shape": list(s.shape),
                              "data_offsets": [offset, offset + s.nbytes]}
            offset += s.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # keep the data section 8-byte aligned, as safetensors does
        self._fh = open(self.out / fname, "wb")
        self._fh.write(struct.pack("<Q", len(raw)) + raw)
        self._pending = list(specs)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if not self._pending:
            if self._shard + 1 >= len(self._plan):
                raise ValueError(f"tensor {name} was not declared to the writer")
            self._next_shard()
        spec = self._pending.pop(0)
        if spec.name != name or tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
            raise ValueError(f"writer expected {spec.name} {list(spec.shape)} {spec.dtype}, got "
                             f"{name} {list(tensor.shape)} {tensor.dtype}")
        data = tensor_bytes(tensor)
        try:
            self._fh.write(data)
        except OSError as e:  # disk full, quota, I/O error: name the file
            raise CheckpointFileError(f"{self._fh.name}: writing tensor {name} failed ({e})") \
                from None
        self.bytes_written += len(data)

    def close(self) -> None:
        if self._pending or self._shard + 1 < len(self._plan):
            raise ValueError("writer closed before every declared tensor was written")
        if self._fh is not None:
            self._fh.close()
        if len(self.files) > 1:
            weight_map = {s.name: f for f, specs in self._plan for s in specs}
            total = sum(s.nbytes for s in self.specs)
            (self.out / INDEX_NAME).write_text(json.dumps(
                {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
