"""Checksummed ``torch.save`` / ``torch.load`` of the small pickled files of a training checkpoint.

A training checkpoint also holds files that are not distributed checkpoints and so are not in
``checksums.json`` (integrity.py): ``trainer_state.pt`` (counters, LR schedule, data position) and
``rng/rankNNNNN.pt`` (one per rank, written by every rank at once). A flipped byte in one of them
would either fail somewhere inside unpickling with an unhelpful message or, worse, resume with a
silently wrong data position or RNG stream. So each such file gets a CRC-32 record of its own:

    trainer_state.pt
    trainer_state.pt.checksum.json      {"algorithm": "crc32", "crc32": ..., "size": ...}

A sidecar per file rather than an entry in a shared table, because the RNG files are written by all
ranks concurrently and a shared table would need a gather; a sidecar needs no coordination.

``save_torch_file`` writes the data to a hidden temporary file in the same directory, flushes it to
disk, computes the CRC by re-reading it (from the page cache, usually), then renames it into place
and writes the record the same way. A writer killed at any point leaves either no file, the old
file, or a complete file; a file whose record was not (yet) replaced is refused as mismatching
rather than loaded.

``load_torch_file`` reads the file once, checks size and CRC against the record, and unpickles the
verified bytes (no second read that could differ). A damaged or truncated file, or a record that is
unreadable, raises ``CheckpointError`` (a ValueError) naming the file. A file without a record
loads with a warning when it was written before records existed; when the caller passes the
checkpoint directory and some other file there has a record (the same save wrote them all), the
missing record is an error instead.

Intended for small files (read whole into memory): megabytes, not model weights.
"""

from __future__ import annotations

import io
import json
import os
import secrets
import sys
import zlib
from pathlib import Path
from typing import Any, Optional

import torch

from megatron_cppo.checkpoint.integrity import ALGORITHM, crc_of_range
from megatron_cppo.checkpoint.meta import CheckpointError

__all__ = ["RECORD_SUFFIX", "has_checksum", "load_torch_file", "record_path", "save_torch_file"]

RECORD_SUFFIX = ".checksum.json"
_warned: set[str] = set()


def record_path(path: str | os.PathLike) -> Path:
    """The sidecar holding ``path``'s checksum record."""
    path = Path(path)
    return path.with_name(path.name + RECORD_SUFFIX)


def has_checksum(path: str | os.PathLike) -> bool:
    """Whether ``path`` has a checksum record (written by ``save_torch_file``)."""
    return record_path(path).is_file()


def _fsync_dir(directory: Path) -> None:
    """Make the renames in ``directory`` durable (best effort: not every platform can open a
    directory)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _temp_beside(path: Path) -> Path:
    """A new empty hidden file next to ``path`` (same filesystem, so the rename is atomic).
    Created with mode 0o666 less the umask, as ``torch.save`` would create ``path`` itself
    (``tempfile.mkstemp`` would leave the published file readable by its owner only)."""
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return tmp
    raise FileExistsError(f"{path.parent}: no free temporary name for {path.name}")


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def save_torch_file(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj, path)`` atomically, with a CRC-32 record in ``path + RECORD_SUFFIX``.

    Local (no collective). Returns ``path``. Any error (disk full, an unpicklable object) leaves
    ``path`` and its record as they were and propagates; the temporary files are removed.
    """
    path = Path(path)
    data_tmp = _temp_beside(path)
    record_tmp = None
    try:
        torch.save(obj, str(data_tmp))
        _fsync_file(data_tmp)
        size = data_tmp.stat().st_size
        record = {"algorithm": ALGORITHM, "crc32": crc_of_range(data_tmp, 0, size),
                  "size": size}
        record_tmp = _temp_beside(record_path(path))
        record_tmp.write_text(json.dumps(record, sort_keys=True) + "\n")
        _fsync_file(record_tmp)
        # data first: in between, the old record does not match the new data and is refused
        os.replace(data_tmp, path)
        os.replace(record_tmp, record_path(path))
    except BaseException:
        for tmp in (data_tmp, record_tmp):
            if tmp is not None:
                tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def _read_record(path: Path) -> Optional[dict]:
    """The validated record of ``path``, or None when it has none."""
    rec_path = record_path(path)
    try:
        text = rec_path.read_text()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise CheckpointError(f"{rec_path}: unreadable checksum record ({e})") from None
    try:
        record = json.loads(text)
        if not isinstance(record, dict):
            raise ValueError("not a JSON object")
        if record.get("algorithm") != ALGORITHM:
            raise ValueError(f"algorithm {record.get('algorithm')!r}, expected {ALGORITHM!r}")
        for key in ("crc32", "size"):
            if not isinstance(record.get(key), int) or isinstance(record.get(key), bool) \
                    or record[key] < 0:
                raise ValueError(f"field {key!r} must be a non-negative integer, got "
                                 f"{record.get(key)!r}")
    except ValueError as e:  # json.JSONDecodeError is a ValueError
        raise CheckpointError(f"{rec_path}: unreadable checksum record ({e})") from None
    return record


def _others_have_records(checkpoint_dir: Path, path: Path) -> bool:
    own = record_path(path).resolve()
    return any(p.resolve() != own for p in checkpoint_dir.rglob("*" + RECORD_SUFFIX))


def load_torch_file(path: str | os.PathLike, what: str, *,
                    checkpoint_dir: Optional[str | os.PathLike] = None,
                    weights_only: bool = False) -> Any:
    """``torch.load(path)`` after verifying the bytes against the record ``save_torch_file`` wrote.

    Args:
        path: the file.
        what: what it holds, for messages ("trainer state", "RNG state").
        checkpoint_dir: the checkpoint directory ``path`` belongs to. When given and another file
            under it has a record, a missing record here is an error (the same save wrote them
            all, so this one was lost); otherwise a missing record means a checkpoint written
            before records existed: loaded unverified, with a warning on stderr.
        weights_only: passed to ``torch.load`` (the trainer's files hold numpy and Python RNG
            states, which need False).

    Raises:
        CheckpointError (a ValueError) naming the file: missing, truncated, damaged (CRC
        mismatch), an unreadable record, a missing record where one is expected, or bytes that
        do not unpickle.
    """
    path = Path(path)
    label = f"{path} ({what})"
    record = _read_record(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{label}: missing") from None
    except OSError as e:
        raise CheckpointError(f"{label}: unreadable ({e})") from None
    if record is not None:
        if len(data) != record["size"]:
            state = "truncated" if len(data) < record["size"] else "longer than recorded"
            raise CheckpointError(f"{label}: {state} ({len(data)} bytes, its checksum record "
                                  f"{record_path(path).name} says {record['size']})")
        if zlib.crc32(data) != record["crc32"]:
            raise CheckpointError(f"{label}: checksum mismatch (the file is damaged)")
    elif checkpoint_dir is not None and _others_have_records(Path(checkpoint_dir), path):
        raise CheckpointError(f"{label}: its checksum record {record_path(path).name} is "
                              f"missing (other files of {checkpoint_dir} have theirs)")
    elif str(path) not in _warned:
        _warned.add(str(path))
        print(f"warning: {label}: no checksum record {record_path(path).name} (written by an "
              f"older version): loaded unverified", file=sys.stderr, flush=True)
    try:
        return torch.load(io.BytesIO(data), weights_only=weights_only)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a damaged file
        raise CheckpointError(f"{label}: unreadable ({type(e).__name__}: "
                              f"{str(e)[:200]})") from None
