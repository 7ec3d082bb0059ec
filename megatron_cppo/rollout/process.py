"""The engine in its own process: an owner handle for generation, an address for refit senders.

Why a process: ``megatron_cppo.platform.activate()`` patches torch process-wide for megatron on CPU
(``torch.cuda.*`` stand-ins, a device mode); vLLM must not run under them. ``EngineProcess`` spawns a
fresh interpreter (never patched) that builds a ``VLLMEngine`` and serves two kinds of peers:

  * the owner (the process that built ``EngineProcess``, e.g. the trainer's rank 0 or a test)
    over a pipe: generate, score, version, digests, shutdown;
  * refit senders (one megatron rank per pipeline stage, refit.py) over a unix socket at
    ``EngineProcess.target`` (picklable: hand it to the ranks). Tensor bytes do not go through the
    socket: each sender owns one shared-memory block of one bucket, writes a bucket into it and
    sends only (name, dtype, shape, offset) entries; the engine copies the tensors out, loads them
    and acks, and the sender reuses the block.

Refit timeline (S senders, one per PP stage; all messages on each sender's own connection):

    sender s                                   engine process
    -------------------------------------      --------------------------------------------------
    ("begin", update_id, S, manifest_s, shm)    wait for all S begins of update_id; check the union
                                                of manifests against the checkpoint's tensors
                                                (missing / extra / misshaped -> ("error", msg) to
                                                all S, weights untouched, version unchanged)
    <- ("go",)                                  initialize_layerwise_reload
    ("bucket", entries)  ...                    copy out of shm_s, model.load_weights
    <- ("ack",)                                 (buckets of different senders interleave)
    ("end",)                                    when all S ended: finalize, reset prefix and
    <- ("done", {"version", "bytes", ...})      encoder caches, version += 1 (to all S)

A sender that fails or disconnects after "go" leaves a partial update: the engine marks itself
broken (generate raises) rather than serve mixed weights. The owner's pipe is served between
messages, but the owner must not generate during a refit (the engine refuses).
"""

from __future__ import annotations

import os
import queue
import tempfile
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Client, Connection, Listener, wait
from typing import Any, Optional, Sequence

import torch

from megatron_cppo.dtypes import to_torch, torch_name
from megatron_cppo.rollout.config import RolloutConfig, SamplingConfig
from megatron_cppo.rollout.engine import RefitError, RolloutGroup, RolloutItem


@dataclass(frozen=True)
class RefitTarget:
    """Where refit senders connect (picklable)."""

    address: str
    authkey: bytes
    dtype: str  # the engine's weight dtype ("bfloat16"): senders cast to it (halves bf16 bytes)

    def connect(self) -> Connection:
        return Client(self.address, family="AF_UNIX", authkey=self.authkey)

    def query(self, what: str, *args):
        """From any process (e.g. a megatron rank): "version", "valid_vocab", "digests",
        "score" or "generate" (the arguments of ``VLLMEngine.score`` / ``generate``). Not during a
        refit by the same process."""
        conn = self.connect()
        try:
            conn.send((what,) + args)
            status, payload = conn.recv()
        finally:
            conn.close()
        if status != "ok":
            raise RuntimeError(payload)
        return payload


class EngineProcess:
    """Owner handle of an engine process (see the module docstring)."""

    def __init__(self, config: RolloutConfig):
        import torch.multiprocessing as mp

        self.config = config
        ctx = mp.get_context("spawn")
        self._dir = tempfile.mkdtemp(prefix="mcppo_vllm_")
        address = os.path.join(self._dir, "refit.sock")
        self.target = RefitTarget(address=address, authkey=os.urandom(16),
                                  dtype=torch_name(config.dtype))
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(config, child, self.target),
                                 name="megatron_cppo-vllm-engine", daemon=True)
        self._proc.start()
        child.close()
        deadline = time.monotonic() + config.start_timeout_s
        while not self._conn.poll(0.5):
            if not self._proc.is_alive():
                raise RuntimeError(f"the vLLM engine process exited with code "
                                   f"{self._proc.exitcode} while starting")
            if time.monotonic() > deadline:
                self._proc.kill()
                raise TimeoutError(f"the vLLM engine did not start in {config.start_timeout_s} s")
        info = self._receive()
        self.valid_vocab: int = info["valid_vocab"]
        self.load_seconds: float = info["load_seconds"]

    def _receive(self):
        try:
            status, payload = self._conn.recv()
        except EOFError:
            self._proc.join(timeout=5)  # reap it: its exit code says how it ended
            code = self._proc.exitcode
            how = (f"killed by signal {-code}" if code is not None and code < 0 else
                   f"exit code {code}" if code is not None else "still running, its pipe closed")
            raise RuntimeError(f"the vLLM engine process (pid {self._proc.pid}) died ({how})"
                               ) from None
        if status == "ok":
            return payload
        kind, message = payload
        raise (RefitError if kind == "RefitError" else RuntimeError)(message)

    def _call(self, method: str, *args):
        self._conn.send((method, args))
        return self._receive()

    def generate(self, items: Sequence[RolloutItem],
                 sampling: Optional[SamplingConfig] = None) -> list[RolloutGroup]:
        return self._call("generate", list(items), sampling)

    def score(self, items, prompt_token_ids, continuations) -> list[list[float]]:
        return self._call("score", list(items), list(prompt_token_ids), list(continuations))

    @property
    def version(self) -> int:
        return self._call("version")

    def weight_digests(self) -> dict[str, str]:
        return self._call("weight_digests")

    def shutdown(self) -> None:
        if self._proc.is_alive():
            try:
                self._call("shutdown")
            except (RuntimeError, OSError, BrokenPipeError):
                pass
            self._proc.join(timeout=30)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join()
        self._conn.close()
        try:
            os.rmdir(self._dir)
        except OSError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()


# ----------------------------------------------------------------------------------------------
# engine process side


class _RefitSession:
    """State of the update in progress (engine process)."""

    def __init__(self, engine):
        self.engine = engine
        self.reset()

    def reset(self):
        self.update_id = None
        self.expected_senders = 0
        self.begins: dict[Connection, dict] = {}
        self.shm: dict[Connection, Any] = {}
        self.ended: set[Connection] = set()
        self.started = False

    def _close_shm(self):
        for shm in self.shm.values():
            shm.close()
        self.shm.clear()

    def _to_all(self, message):
        for conn in self.begins:
            try:
                conn.send(message)
            except OSError:
                pass

    def _fail(self, message: str):
        self._to_all(("error", message))
        self._close_shm()
        self.reset()

    def handle(self, conn: Connection, msg: tuple) -> None:
        kind = msg[0]
        if kind == "digests":
            conn.send(("ok", self.engine.weight_digests()))
        elif kind == "version":
            conn.send(("ok", self.engine.version))
        elif kind == "valid_vocab":
            conn.send(("ok", self.engine.valid_vocab))
        elif kind in ("score", "generate"):  # a trainer rank using an engine it does not own
            try:
                conn.send(("ok", getattr(self.engine, kind)(*msg[1:])))
            except Exception as e:  # noqa: BLE001 - reported to the caller
                conn.send(("error", f"{type(e).__name__}: {e}"))
        elif kind == "begin":
            _, info = msg
            if self.update_id is None:
                self.update_id, self.expected_senders = info["update_id"], info["num_senders"]
            elif info["update_id"] != self.update_id:
                conn.send(("error", f"refit {info['update_id']} began while refit "
                                    f"{self.update_id} is in progress"))
                return
            self.begins[conn] = info
            self.shm[conn] = _attach(info["shm"])
            if len(self.begins) < self.expected_senders:
                return
            manifest = {}
            for b in self.begins.values():
                for name, entry in b["manifest"].items():
                    if name in manifest:
                        return self._fail(f"refit tensor {name!r} is sent by two pipeline stages")
                    manifest[name] = entry
            omitted = tuple(p for b in self.begins.values() for p in b.get("omitted", ()))
            try:
                self.engine.begin_update(manifest, omitted=omitted)
            except (RefitError, RuntimeError) as e:
                return self._fail(str(e))
            self.started = True
            self._to_all(("go",))
        elif kind in ("bucket", "shm", "end") and conn not in self.begins:
            # this sender's update was already aborted (it has been sent the reason)
            conn.send(("error", "no refit in progress on this connection"))
        elif kind == "bucket":
            _, entries = msg
            buf = self.shm[conn].buf
            tensors = []
            for name, dtype, shape, offset, nbytes in entries:
                raw = torch.frombuffer(buf, dtype=torch.uint8, count=nbytes, offset=offset)
                # a copy: vLLM's layerwise reload keeps the tensors of a layer until the layer
                # is complete, possibly after the sender has reused the block
                tensors.append((name, raw.clone().view(to_torch(dtype)).reshape(shape)))
                del raw
            try:
                self.engine.load_bucket(tensors)
            except Exception as e:  # noqa: BLE001 - reported to every sender
                return self._fail(f"{type(e).__name__}: {e}")
            conn.send(("ack",))
        elif kind == "shm":  # the sender replaced its block (a tensor larger than the bucket)
            self.shm.pop(conn).close()
            self.shm[conn] = _attach(msg[1])
        elif kind == "end":
            self.ended.add(conn)
            if len(self.ended) < self.expected_senders:
                return
            try:
                info = self.engine.finish_update()
            except Exception as e:  # noqa: BLE001
                return self._fail(f"{type(e).__name__}: {e}")
            self._to_all(("done", info))
            self._close_shm()
            self.reset()
        else:
            conn.send(("error", f"unknown refit message {kind!r}"))

    def lost(self, conn: Connection) -> None:
        if conn in self.begins:
            if self.started:
                self.engine.abort_update("a refit sender disconnected during the update")
            self.begins.pop(conn)
            self._fail("another refit sender disconnected")


class _Attached:
    """A sender's shared-memory block, mapped read-only-by-convention. Opened through /dev/shm
    rather than ``SharedMemory(name)``: attaching that way registers the block with this process's
    resource tracker (Python < 3.13), which then unlinks or double-unregisters blocks the sender
    owns and removes itself."""

    def __init__(self, name: str):
        import mmap

        with open(os.path.join("/dev/shm", name.lstrip("/")), "r+b") as f:
            self.buf = mmap.mmap(f.fileno(), 0)

    def close(self) -> None:
        self.buf.close()


def _attach(name: str) -> _Attached:
    return _Attached(name)


def _serve(config: RolloutConfig, owner: Connection, target: RefitTarget) -> None:
    """Engine process main loop."""
    try:
        from megatron_cppo.platform import quiet_library_warnings  # importing activates nothing

        quiet_library_warnings()
        from megatron_cppo.rollout.engine import VLLMEngine

        engine = VLLMEngine(config)
        listener = Listener(target.address, family="AF_UNIX", authkey=target.authkey)
    except BaseException as e:  # noqa: BLE001 - the owner reports it
        owner.send(("error", (type(e).__name__, f"{type(e).__name__}: {e}")))
        raise
    accepted: "queue.Queue[Connection]" = queue.Queue()

    def accept_loop():
        while True:
            try:
                accepted.put(listener.accept())
            except (OSError, EOFError):
                return
            except Exception:  # noqa: BLE001 - a peer with a wrong key: ignore it
                continue

    threading.Thread(target=accept_loop, daemon=True).start()
    owner.send(("ok", {"valid_vocab": engine.valid_vocab, "load_seconds": engine.load_seconds}))
    session = _RefitSession(engine)
    peers: list[Connection] = []
    running = True
    while running:
        while not accepted.empty():
            peers.append(accepted.get())
        for conn in wait([owner] + peers, timeout=0.1):
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                if conn is owner:
                    running = False
                    break
                peers.remove(conn)
                session.lost(conn)
                continue
            if conn is not owner:
                try:
                    session.handle(conn, msg)
                except Exception as e:  # noqa: BLE001 - never let a bad peer stop the server
                    session.lost(conn)
                    try:
                        conn.send(("error", f"{type(e).__name__}: {e}"))
                    except OSError:
                        pass
                continue
            method, args = msg
            if method == "shutdown":
                owner.send(("ok", None))
                running = False
                break
            try:
                if method == "version":
                    result = engine.version
                else:
                    result = getattr(engine, method)(*args)
                owner.send(("ok", result))
            except Exception as e:  # noqa: BLE001 - reported to the owner
                owner.send(("error", (type(e).__name__, f"{type(e).__name__}: {e}")))
    listener.close()
    engine.shutdown()
    owner.close()
    # vLLM's exit handlers can stall an interpreter that ran an in-process engine (measured: the
    # process outlived a 30 s join); everything of ours is closed, so leave at once
    os._exit(0)
