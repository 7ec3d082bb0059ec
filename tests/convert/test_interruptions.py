"""No debris (issue 13, items 0 and 3): interrupted, racing and crashed runs leave nothing behind
and never lose an existing output.

  * a conversion killed with SIGKILL while writing leaves its partial directory; the next run to
    the same --out removes it (and says so) and succeeds, leaving nothing else;
  * SIGTERM while writing: exit 128 + 15, one ``error:`` line, nothing left, no rerun needed;
  * a second run to an --out that a live run is writing (the lock held here) refuses, exit 2;
  * a replacement interrupted between its two renames (a leftover ``.out.old-*``) is undone by the
    next run, which says so;
  * verify's rank processes die with a SIGKILLed verify, and take its scratch directory along.
The real process path (tools/convert/convert.py) is used where a signal must hit it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from helpers import convert_fixtures as cf
from megatron_cppo.checkpoint import output_lock, read_meta
from megatron_cppo.convert import cli

pytestmark = pytest.mark.slow  # signals to real converter processes

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def hf(tmp_path_factory) -> Path:
    return cf.write_hf_dir(tmp_path_factory.mktemp("interrupt") / "hf", tied=True)


def _start(argv, cwd) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "tools" / "convert" / "convert.py"),
                             *argv], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))


def _wait_for(predicate, proc, timeout=240.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"finished before the signal: {proc.communicate()}"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def _partials(out: Path) -> list:
    return list(out.parent.glob(f".{out.name}.partial-*"))


def _writing(out: Path):
    # the partial directory exists and megatron's writer has started on model/
    return lambda: any((p / "model").is_dir() for p in _partials(out))


def test_sigkill_mid_write_then_rerun_leaves_nothing(hf, tmp_path, capsys):
    out = tmp_path / "ckpt"
    proc = _start(["hf-to-megatron", "--hf-dir", str(hf), "--out", str(out), "--no-progress"],
                  tmp_path)
    _wait_for(_writing(out), proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert not out.exists() and _partials(out)  # what a crash leaves

    assert cli.main(["hf-to-megatron", "--hf-dir", str(hf), "--out", str(out),
                     "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "removed" in err and "partial output of a run that did not finish" in err
    assert read_meta(out).checksums == "crc32"
    assert cf.no_debris(out), list(tmp_path.iterdir())


def test_sigterm_mid_write_leaves_nothing(hf, tmp_path):
    out = tmp_path / "ckpt"
    proc = _start(["hf-to-megatron", "--hf-dir", str(hf), "--out", str(out), "--no-progress"],
                  tmp_path)
    _wait_for(_writing(out), proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert lines == ["error: interrupted by SIGTERM; partial output removed"], err
    assert "Traceback" not in err
    assert cf.no_output_left(out) and cf.no_debris(out), list(tmp_path.iterdir())


def test_second_run_to_a_busy_output_refuses(hf, tmp_path, capsys):
    out = tmp_path / "ckpt"
    with output_lock(out):  # a live run writing `out` (this process)
        assert cli.main(["hf-to-megatron", "--hf-dir", str(hf), "--out", str(out),
                         "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert err.count("error:") == 1 and "another run is writing it" in err
        assert f"pid {os.getpid()}" in err
        assert not out.exists() and not _partials(out)
    assert cf.no_debris(out)


def test_interrupted_replacement_is_restored(hf, tmp_path, capsys):
    out = tmp_path / "ckpt"
    assert cli.main(["hf-to-megatron", "--hf-dir", str(hf), "--out", str(out),
                     "--no-progress"]) == 0
    # a crash between "old out -> .ckpt.old-x/d" and "partial -> out"
    aside = tmp_path / ".ckpt.old-x1y2"
    aside.mkdir()
    os.replace(out, aside / "d")
    assert cli.main(["hf-to-megatron", "--hf-dir", str(hf), "--out", str(out),
                     "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"restored {out}" in err and "already exists" in err
    assert read_meta(out).tp == 1 and cf.no_debris(out)
    assert cli.main(["check", "--megatron-dir", str(out)]) == 0


def test_verify_ranks_die_with_their_parent(hf, tmp_path):
    ckpt = tmp_path / "ckpt"
    assert cli.main(["hf-to-megatron", "--hf-dir", str(hf), "--out", str(ckpt), "--tp", "2",
                     "--no-progress"]) == 0
    before = set(Path("/tmp").glob("mcppo_verify_*"))
    proc = _start(["verify", "--hf-dir", str(hf), "--megatron-dir", str(ckpt)], tmp_path)
    parent = psutil.Process(proc.pid)
    _wait_for(lambda: len([c for c in parent.children(recursive=True)
                           if "spawn" in " ".join(c.cmdline())]) >= 2, proc)
    ranks = [c for c in parent.children(recursive=True) if "spawn" in " ".join(c.cmdline())]
    scratch = set(Path("/tmp").glob("mcppo_verify_*")) - before
    time.sleep(3)  # let the ranks get past their start-up
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    gone, alive = psutil.wait_procs(ranks, timeout=60)
    assert not alive, [p.pid for p in alive]
    assert scratch and not any(p.exists() for p in scratch), scratch


_BLOCKED_RANK = """
import datetime, os, sys
from megatron_cppo.convert.verify import _die_with_parent
_die_with_parent(os.getppid(), sys.argv[1])
import torch.distributed as dist
print("connecting", flush=True)
# no server on this port: the client retries inside C++ for the whole timeout
dist.TCPStore("127.0.0.1", int(sys.argv[2]), is_master=False,
              timeout=datetime.timedelta(seconds=300))
"""
_PARENT = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2], sys.argv[3]])
print(child.pid, flush=True)
time.sleep(600)
"""


def test_rank_blocked_in_cpp_dies_with_parent(tmp_path):
    """A rank inside a blocking C++ call (process-group set-up, here a TCPStore connect that
    retries for 300 s) when its parent is SIGKILLed: a Python SIGTERM handler cannot run until
    the call returns; the watchdog thread ends it within seconds and removes the scratch."""
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    scratch = tmp_path / "mcppo_verify_scratch"
    scratch.mkdir()
    parent = subprocess.Popen([sys.executable, "-c", _PARENT, _BLOCKED_RANK, str(scratch),
                               str(port)], stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONPATH=str(ROOT)))
    child = psutil.Process(int(parent.stdout.readline()))
    assert parent.stdout.readline().strip() == "connecting"
    time.sleep(1.0)  # inside the C++ connect loop
    parent.send_signal(signal.SIGKILL)
    parent.wait(timeout=30)
    t0 = time.monotonic()
    try:
        child.wait(timeout=30)
    except psutil.TimeoutExpired:
        child.kill()
        pytest.fail("the rank outlived its parent by 30 s")
    assert time.monotonic() - t0 < 10
    assert not scratch.exists()


def test_full_disk_is_refused_before_work(hf, tmp_path, capsys):
    """A 300 kB tmpfs (needs root and mount; skipped where unavailable): refused up front with
    the free and the needed space, nothing left behind."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here")
    try:
        out = mnt / "ckpt"
        assert cli.main(["hf-to-megatron", "--hf-dir", str(hf), "--out", str(out),
                         "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert err.count("error:") == 1 and "free, the output needs about" in err
        assert list(mnt.iterdir()) == []
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
