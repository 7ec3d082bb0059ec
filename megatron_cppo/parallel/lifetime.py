"""Rank processes that end when the process that launched them dies.

A launcher killed by SIGKILL (``kill -9``, the OOM killer, a lost terminal's process group) cannot
stop its ranks: without this they run on as orphans, holding their GPUs and writing logs and
checkpoints that nobody reads. ``exit_with_parent`` makes a rank exit within a fraction of a second of
its launcher's death (torchrun's agent for the trainer, the verify process for its ranks).

Two triggers, because one is not enough:
  * Linux sends the rank SIGTERM when its parent dies (``PR_SET_PDEATHSIG``). The handler is Python,
    and CPython runs a handler only when the main thread is back in Python bytecode: a rank blocked
    in a C++ call (the TCPStore connect of process-group set-up retries for the whole collective
    timeout, 10 minutes by default; a gloo collective waiting for a peer) would outlive its parent
    by that long.
  * so a daemon thread also polls the parent pid every 0.2 s (blocking torch calls release the GIL)
    and ends the process itself.
Either way the optional cleanup runs once, the message is printed once, and the process ends with
``os._exit(128 + SIGTERM)`` (no atexit handlers, no collective teardown: the peers are going too).
A SIGTERM while the parent lives (torchrun stopping its workers) runs the cleanup and then ends
the process by SIGTERM's default action, as it did without the handler. Checkpoints are written
atomically elsewhere, so a rank ended mid-save leaves only a partial directory that the next run
removes.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from typing import Callable, Optional

__all__ = ["exit_with_parent", "LAUNCHER_PID_ENV"]

# Set by a launcher that runs torchrun's agent in its own process (``megatron-cppo train`` with
# several local ranks): the pid each rank must outlive no longer than a moment.
LAUNCHER_PID_ENV = "MEGATRON_CPPO_LAUNCHER_PID"

POLL_SECONDS = 0.2


def exit_with_parent(parent_pid: int, *, cleanup: Optional[Callable[[], None]] = None,
                     message: Optional[str] = None) -> None:
    """From now on, end this process as soon as ``parent_pid`` is no longer its parent (the parent
    died; the orphan was re-parented). Call it in the rank's main thread, early: if the parent is
    already gone, the process ends here."""
    once = threading.Lock()

    def orphaned(grace: float) -> bool:
        """Whether the parent is gone, waiting up to ``grace`` s to see it: the death signal comes
        when the parent's spawning THREAD exits, and while the rest of a killed parent is still
        exiting this process is re-parented to another of its threads (same pid)."""
        deadline = time.monotonic() + grace
        while os.getppid() == parent_pid:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)
        return True

    def end(signum=signal.SIGTERM, frame=None):
        if not once.acquire(blocking=False):
            return  # the other trigger is already ending the process
        orphaned_now = orphaned(grace=0.0 if frame is None else 1.0)
        try:
            if message and orphaned_now:
                print(message, file=sys.stderr, flush=True)
            if cleanup is not None:
                cleanup()
        finally:
            if not orphaned_now:  # a plain SIGTERM: die of it, as without this handler
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                os.kill(os.getpid(), signal.SIGTERM)
            os._exit(128 + int(signum))

    def watch():
        while os.getppid() == parent_pid:
            time.sleep(POLL_SECONDS)
        end()  # frame None: orphaned, seen

    signal.signal(signal.SIGTERM, end)
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the watchdog alone
        pass
    if os.getppid() != parent_pid:  # the parent died before the line above
        end()
    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()
