"""Failure-atomic, non-destructive output directories.

    with atomic_output_dir(out, overwrite=False, marker="megatron_cppo.json", inputs=[src]) as tmp:
        ...write everything into tmp...
    # swapped in as `out` here, only if the block finished without an exception

Guarantees (docs/checkpoints.md):
  * nothing at ``out`` looks complete until it is: writing goes to a sibling
    ``.{name}.partial-*`` (same filesystem) that is renamed in at the end;
  * an existing ``out`` is replaced only with ``overwrite``, only if it is recognisably a previous
    output of the same kind (it holds ``marker``; an empty directory too), and never when it is,
    contains, or lies inside one of the command's ``inputs``;
  * replacing is atomic: Linux's renameat2(RENAME_EXCHANGE) swaps old and new in one step; where
    the filesystem lacks it the old one is first renamed to ``.{name}.old-*``, and a later run
    that finds such a leftover restores it (``out`` missing) or removes it (``out`` complete) and
    says so;
  * one run per ``out`` at a time: a lock file ``.{name}.lock`` (flock, with the owner's pid, host
    and command line) makes a second run refuse; holding it, a run removes ``.{name}.partial-*``
    directories left by dead runs (SIGKILL, power loss) and says so;
  * SIGTERM / SIGINT during the block (the CLI turns SIGTERM into an exception) remove the partial
    directory and the lock on the way out.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable, Optional


class OutputExistsError(ValueError):
    pass


class OutputBusyError(ValueError):
    """Another live run holds the output's lock."""


def _note(message: str) -> None:
    print(f"note: {message}", file=sys.stderr, flush=True)


def _is_within(path: Path, ancestor: Path) -> bool:
    return path == ancestor or ancestor in path.parents


def _first_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_output_dir(out: str | os.PathLike, overwrite: bool, *, marker: Optional[str] = None,
                     inputs: Iterable[str | os.PathLike] = (),
                     needed_bytes: int = 0) -> Path:
    """Refuse, before any expensive work, an output the run must not (or cannot) write."""
    out = Path(out)
    real_out = Path(os.path.realpath(out))
    for src in inputs:
        real_in = Path(os.path.realpath(src))
        if real_out == real_in:
            raise OutputExistsError(f"--out {out} is the input directory of this command: "
                                    f"refusing to replace it")
        if _is_within(real_in, real_out):
            raise OutputExistsError(f"--out {out} contains the input {src}: refusing to replace "
                                    f"it")
        if _is_within(real_out, real_in):
            raise OutputExistsError(f"--out {out} is inside the input directory {src}: choose a "
                                    f"directory outside it")
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"output path {out} exists and is not a directory")
    if out.exists() and not overwrite:
        raise OutputExistsError(f"output directory {out} already exists (pass --overwrite to "
                                f"replace it)")
    if out.exists() and marker is not None and any(out.iterdir()) \
            and not (out / marker).is_file():
        raise OutputExistsError(f"--overwrite: {out} is not a previous output of this command "
                                f"(it has no {marker}); refusing to delete it")
    base = _first_existing(real_out.parent)
    if not os.access(base, os.W_OK | os.X_OK):
        raise OutputExistsError(f"{base}: not writable (cannot create {out})")
    if needed_bytes:
        free = shutil.disk_usage(base).free
        if free < needed_bytes:
            raise OutputExistsError(f"{base}: {_size(free)} free, the output needs about "
                                    f"{_size(needed_bytes)} (disk full?)")
    return out


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.2f} MB"


def make_partial_dir(out: Path) -> Path:
    """A fresh temporary sibling of ``out`` to write into."""
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, f"renameat2({a}, {b}): {os.strerror(err)}")


def swap_into_place(tmp: Path, out: Path) -> None:
    """Put the complete ``tmp`` at ``out``. An existing ``out`` is exchanged atomically and then
    deleted; without renameat2 it is moved aside first (``recover_leftovers`` finishes the job if
    the process dies in between)."""
    if out.exists():
        if _exchange(tmp, out):
            shutil.rmtree(tmp, ignore_errors=True)
            return
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / "d")
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
        return
    os.replace(tmp, out)


def recover_leftovers(out: Path, log: Callable[[str], None] = _note) -> list[str]:
    """Call with the output's lock held: remove partial directories of dead runs, and finish or
    undo a replacement that was interrupted between its two renames. Returns what was done."""
    done = []
    for p in sorted(out.parent.glob(f".{glob_escape(out.name)}.old-*")):
        if not out.exists() and (p / "d").is_dir():
            os.replace(p / "d", out)
            done.append(f"restored {out} from {p} (an earlier replacement was interrupted)")
        else:
            done.append(f"removed {p} (left by an earlier replacement of {out})")
        shutil.rmtree(p, ignore_errors=True)
    for p in sorted(out.parent.glob(f".{glob_escape(out.name)}.partial-*")):
        size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
        shutil.rmtree(p, ignore_errors=True)
        done.append(f"removed {p} ({size / 1e6:.1f} MB, a partial output of a run that did not "
                    f"finish)")
    for message in done:
        log(message)
    return done


def glob_escape(name: str) -> str:
    import glob

    return glob.escape(name)


def lock_path(out: Path) -> Path:
    return out.parent / f".{out.name}.lock"


@contextlib.contextmanager
def output_lock(out: str | os.PathLike):
    """Hold ``.{name}.lock`` next to ``out`` (OutputBusyError if a live run holds it)."""
    import fcntl

    out = Path(out).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    path = lock_path(out)
    while True:
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                owner = json.loads(os.read(fd, 65536) or b"{}")
            except ValueError:
                owner = {}
            os.close(fd)
            raise OutputBusyError(
                f"{out}: another run is writing it (pid {owner.get('pid', '?')} on "
                f"{owner.get('host', '?')}: {owner.get('command', '?')}); wait for it or stop "
                f"it") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the previous holder removed it between our open and lock: retry
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "started": time.time(),
                             "command": " ".join(sys.argv)[:500]}).encode())
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)


@contextlib.contextmanager
def atomic_output_dir(out: str | os.PathLike, overwrite: bool = False, *,
                      marker: Optional[str] = None, inputs: Iterable[str | os.PathLike] = (),
                      log: Callable[[str], None] = _note):
    out = Path(out).absolute()
    inputs = list(inputs)
    check_output_dir(out, overwrite, marker=marker, inputs=inputs)
    with output_lock(out):
        recover_leftovers(out, log)
        check_output_dir(out, overwrite, marker=marker, inputs=inputs)  # a restore may change it
        tmp = make_partial_dir(out)
        try:
            yield tmp
            swap_into_place(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
