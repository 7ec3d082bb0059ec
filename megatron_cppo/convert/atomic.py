"""Failure-atomic output directories: nothing at the destination looks complete until it is.

    with atomic_output_dir(out, overwrite=False) as tmp:
        ...write everything into tmp...
    # renamed to `out` here, only if the block finished without an exception

The temporary directory is a sibling of ``out`` (same filesystem, so the rename is atomic) whose name
starts with ``.{name}.partial-``; an interrupted run leaves at most such a directory, never ``out``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path


class OutputExistsError(ValueError):
    pass


def check_output_dir(out: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse an existing output directory unless ``overwrite``; call before any expensive work."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise OutputExistsError(f"output directory {out} already exists (pass --overwrite to "
                                f"replace it)")
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"output path {out} exists and is not a directory")
    return out


@contextlib.contextmanager
def atomic_output_dir(out: str | os.PathLike, overwrite: bool = False):
    out = check_output_dir(out, overwrite).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():  # overwrite: move the old one aside first, delete it after the rename
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / "d")
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
