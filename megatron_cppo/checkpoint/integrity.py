"""Per-chunk checksums of a checkpoint's stored bytes: written with every checkpoint, verified
before every read.

``checksums.json`` (next to ``megatron_cppo.json``) holds, per distributed-checkpoint subdirectory
(``model/`` and any extra state), the CRC-32 (zlib) of

  * every stored tensor chunk: the byte range (file, offset, length) that torch's FileSystemWriter
    recorded for it in ``.metadata``, named "<tensor key> at offset [...]";
  * every other file of the subdirectory as a whole (``.metadata`` itself, ``common.pt``,
    ``metadata.json``): ``.metadata`` is verified before it is unpickled.

Computing them re-reads what was just written (from the page cache, usually); with several ranks the
files are divided among them. ``verify`` re-reads and compares, naming the first chunk that differs;
a checkpoint written before checksums existed (no ``checksums.json``, ``meta.checksums`` null)
still loads, with a warning. benchmarks/convert.py measures the cost.

Pickled files outside the distributed checkpoints (a training checkpoint's ``trainer_state.pt`` and
``rng/rankNNNNN.pt``) are not in this table: each carries a CRC-32 record of its own, in a sidecar
written and verified by megatron_cppo/checkpoint/torch_file.py with the same algorithm.
"""

from __future__ import annotations

import json
import sys
import zlib
from pathlib import Path
from typing import Optional

from megatron_cppo.checkpoint.meta import CheckpointError

ALGORITHM = "crc32"
CHECKSUM_NAME = "checksums.json"
_BLOCK = 16 * 1024 * 1024


def crc_of_range(path: Path, offset: int, length: int) -> int:
    crc = 0
    with open(path, "rb") as f:
        f.seek(offset)
        left = length
        while left > 0:
            block = f.read(min(_BLOCK, left))
            if not block:
                raise CheckpointError(f"{path}: truncated (ends before byte {offset + length})")
            crc = zlib.crc32(block, crc)
            left -= len(block)
    return crc


def _file_crc(path: Path) -> int:
    return crc_of_range(path, 0, path.stat().st_size)


def _storage_entries(dist_dir: Path) -> list[tuple[str, str, int, int]]:
    """(name, relative file, offset, length) of every stored chunk, from ``.metadata``."""
    from torch.distributed.checkpoint import FileSystemReader

    try:
        md = FileSystemReader(str(dist_dir)).read_metadata()
    except Exception as e:  # noqa: BLE001 - any unreadable metadata is a damaged checkpoint
        raise CheckpointError(f"{dist_dir / '.metadata'}: unreadable distributed-checkpoint "
                              f"metadata ({type(e).__name__}: {str(e)[:200]})") from None
    out = []
    for index, info in (md.storage_data or {}).items():
        offset = list(index.offset) if index.offset is not None else []
        out.append((f"{index.fqn} at offset {offset}", str(info.relative_path),
                    int(info.offset), int(info.length)))
    return sorted(out, key=lambda e: (e[1], e[2]))


def _mine(files: list[str], share: tuple[int, int]) -> set[str]:
    rank, world = share
    return {f for i, f in enumerate(sorted(files)) if i % world == rank}


def compute(dist_dir: Path, share: tuple[int, int] = (0, 1)) -> dict:
    """This rank's part of the table of one distributed-checkpoint directory."""
    dist_dir = Path(dist_dir)
    entries = _storage_entries(dist_dir)
    files = sorted(p.name for p in dist_dir.iterdir() if p.is_file())
    mine = _mine(files, share)
    chunk_files = {e[1] for e in entries}
    table = {"chunks": {}, "files": {}}
    for name, rel, offset, length in entries:
        if rel in mine:
            table["chunks"][name] = [rel, offset, length, crc_of_range(dist_dir / rel, offset,
                                                                       length)]
    for f in files:
        if f in mine and f not in chunk_files:
            table["files"][f] = _file_crc(dist_dir / f)
    return table


def merge(parts: list[dict]) -> dict:
    out = {"chunks": {}, "files": {}}
    for p in parts:
        out["chunks"].update(p["chunks"])
        out["files"].update(p["files"])
    return out


def write(checkpoint_dir: Path, tables: dict) -> None:
    """``tables``: subdirectory -> merged table."""
    (Path(checkpoint_dir) / CHECKSUM_NAME).write_text(
        json.dumps({"algorithm": ALGORITHM, "subdirs": tables}, sort_keys=True) + "\n")


def read(checkpoint_dir: Path) -> Optional[dict]:
    path = Path(checkpoint_dir) / CHECKSUM_NAME
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text())
        if raw.get("algorithm") != ALGORITHM or not isinstance(raw.get("subdirs"), dict):
            raise ValueError(f"algorithm {raw.get('algorithm')!r}")
        return raw["subdirs"]
    except (ValueError, UnicodeDecodeError, AttributeError) as e:
        raise CheckpointError(f"{path}: unreadable checksum table ({e})") from None


def verify(checkpoint_dir, subdirs, *, expected: bool, share: tuple[int, int] = (0, 1),
           warn: bool = True) -> int:
    """Check this rank's share of the stored bytes of ``subdirs`` against ``checksums.json``.
    Raises CheckpointError naming the first file / tensor chunk that differs; returns the number of
    chunks and files checked. ``expected``: the metadata says checksums were written (their absence
    is then an error; otherwise a warning on stderr, once)."""
    checkpoint_dir = Path(checkpoint_dir)
    tables = read(checkpoint_dir)
    if tables is None:
        if expected:
            raise CheckpointError(f"{checkpoint_dir / CHECKSUM_NAME}: missing (the metadata says "
                                  f"the checkpoint was written with checksums)")
        if warn and share[0] == 0:
            print(f"warning: {checkpoint_dir}: written without checksums (an older version): its "
                  f"tensors cannot be verified", file=sys.stderr, flush=True)
        return 0
    checked = 0
    for sub in subdirs:
        table = tables.get(sub)
        dist_dir = checkpoint_dir / sub
        if not isinstance(table, dict) or not isinstance(table.get("chunks"), dict):
            raise CheckpointError(f"{checkpoint_dir / CHECKSUM_NAME}: no checksums for {sub}/")
        present = sorted(p.name for p in dist_dir.iterdir() if p.is_file())
        listed = set(table["files"]) | {c[0] for c in table["chunks"].values()}
        missing = sorted(listed - set(present))
        if missing:
            raise CheckpointError(f"{dist_dir / missing[0]}: missing (listed in "
                                  f"{CHECKSUM_NAME})")
        mine = _mine(sorted(listed), share)
        # .metadata first: it is unpickled to find the chunks
        for f in sorted(table["files"], key=lambda n: n != ".metadata"):
            if f in mine:
                if _file_crc(dist_dir / f) != table["files"][f]:
                    raise CheckpointError(f"{dist_dir / f}: checksum mismatch (the file is "
                                          f"damaged)")
                checked += 1
        for name, (rel, offset, length, crc) in table["chunks"].items():
            if rel not in mine:
                continue
            path = dist_dir / rel
            if path.stat().st_size < offset + length:
                raise CheckpointError(f"{path}: truncated (tensor {name} needs bytes up to "
                                      f"{offset + length}, the file has {path.stat().st_size})")
            if crc_of_range(path, offset, length) != crc:
                raise CheckpointError(f"{path}: checksum mismatch in tensor {name} (the stored "
                                      f"bytes are damaged)")
            checked += 1
    return checked


def verify_collective(checkpoint_dir, subdirs, *, expected: bool, group=None) -> None:
    """``verify`` with the work divided among the ranks of ``group``; every rank raises the same
    CheckpointError (the first failure in rank order) if any share failed."""
    import torch.distributed as dist

    rank, world = dist.get_rank(group), dist.get_world_size(group)
    error = None
    try:
        verify(checkpoint_dir, subdirs, expected=expected, share=(rank, world))
    except CheckpointError as e:
        error = str(e)
    errors: list = [None] * world
    dist.all_gather_object(errors, error, group=group)
    first = next((e for e in errors if e), None)
    if first:
        raise CheckpointError(first)


def compute_collective(checkpoint_dir: Path, subdirs, *, group=None) -> Optional[dict]:
    """Tables of ``subdirs`` computed by all ranks of ``group``; the merged result on rank 0."""
    import torch.distributed as dist

    rank, world = dist.get_rank(group), dist.get_world_size(group)
    mine = {sub: compute(Path(checkpoint_dir) / sub, (rank, world)) for sub in subdirs}
    parts: list = [None] * world
    dist.all_gather_object(parts, mine, group=group)
    if rank != 0:
        return None
    return {sub: merge([p[sub] for p in parts]) for sub in subdirs}


def total_bytes(checkpoint_dir) -> int:
    return sum(p.stat().st_size for p in Path(checkpoint_dir).rglob("*") if p.is_file())


__all__ = ["ALGORITHM", "CHECKSUM_NAME", "compute", "merge", "write", "read", "verify",
           "verify_collective", "compute_collective", "total_bytes", "crc_of_range"]
