"""Training checkpoints: save every --save-interval steps and at the end, resume with --load.

Layout under ``--save``::

    latest                       "iter_0000004" (replaced atomically, after the directory is whole)
    iter_0000004/
        megatron_cppo.json       the converter's metadata: megatron-to-hf exports this directory
        model/                   megatron-core distributed checkpoint of the model chunks
        optimizer/               distributed checkpoint of the Megatron optimizer's state (extra
                                 state of the model checkpoint: checksummed like model/)
        trainer_state.pt         step, optimizer steps, weight version, LR schedule, data position
        rng/rank00000.pt ...     RNG states of every rank (torch, python, numpy, megatron tracker)
        *.pt.checksum.json       CRC-32 and size of each .pt file, verified before unpickling
                                 (checkpoint/torch_file.py)

Failure atomicity: everything is written into a hidden sibling ``.iter_0000004.partial-*``; only
when every rank has finished does rank 0 rename it into place and then replace ``latest``. A save
killed at any point leaves ``latest`` naming the previous whole checkpoint (and a partial
directory that the next save removes). Older checkpoints than the last ``keep`` are deleted
after a new one is published.

Model weights reload at any TP/PP layout (megatron-core's distributed checkpointing reshards);
the optimizer state is stored against the same sharded model tensors, so it reshards too.
"""

from __future__ import annotations

import glob
import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

# The one place the trainer gets the model-checkpoint format from.
from megatron_cppo.checkpoint import (  # noqa: I001
    META_NAME,
    load_extra_state,
    load_megatron_checkpoint,
    read_meta,
    save_megatron_checkpoint,
    swap_into_place,
)
from megatron_cppo.checkpoint.torch_file import load_torch_file, save_torch_file
from megatron_cppo.parallel.agree import agree

__all__ = ["CheckpointSaveError", "find_checkpoint", "load_checkpoint", "read_meta",
           "read_trainer_state", "save_checkpoint"]

LATEST = "latest"
OPTIMIZER_SUBDIR = "optimizer"
TRAINER_STATE = "trainer_state.pt"
_ITER = re.compile(r"^iter_(\d{7})$")
# Distributed optimizer: "dp_reshardable" (reshardable over data parallel). megatron-core 0.16.1
# fails on the other formats with torch's Adam: "fully_sharded_model_space" needs
# ShardedTensor.flattened_range (refused), "fully_reshardable" loads a 'step' key it never saved.
_DIST_OPT_FORMAT = {"distrib_optim_sharding_type": "dp_reshardable"}


class CheckpointSaveError(RuntimeError):
    """A training checkpoint could not be written (raised on every rank alike, after the
    partial directory was removed): the message names the directory, the step, the cause and
    the last complete checkpoint, which ``--load`` still resumes from."""


_ERRNO = re.compile(r"\[Errno (\d+)\]")


def _cause(error: BaseException) -> str:
    """What went wrong, in words: the OS error (no space left on device, permission denied,
    ...) found anywhere in the exception, its causes, the per-rank failures torch's
    CheckpointException carries, or their messages, else the first line of the exception."""
    seen, todo = [], [error]
    while todo:
        e = todo.pop(0)
        if e is None or any(e is s for s in seen):
            continue
        seen.append(e)
        todo += [e.__cause__, e.__context__]
        for failure in (getattr(e, "failures", None) or {}).values():  # rank -> (exc, tb)
            todo.append(failure[0] if isinstance(failure, tuple) else failure)
    for e in seen:
        if isinstance(e, OSError) and e.errno:
            return f"{os.strerror(e.errno).lower()} (errno {e.errno})"
    for e in seen:
        m = _ERRNO.search(str(e))
        if m:
            return f"{os.strerror(int(m.group(1))).lower()} (errno {m.group(1)})"
    first = str(error).strip().splitlines()
    return f"{type(error).__name__}: {first[0] if first else ''}"


_FULL_BYTES = 1 << 20  # a write that failed on a disk with less free than this: a full disk


def _with_disk_state(cause: str, directory: Path) -> str:
    """``cause``, or "no space left on device" when the exception did not say so but the disk
    of ``directory`` is full (torch's zip writer reports a short write on a full disk as
    "unexpected pos ...", without an OS error)."""
    if "(errno " in cause:
        return cause
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        return cause
    if free < _FULL_BYTES:
        return f"no space left on device ({free} bytes free on its disk; {cause})"
    return cause


def iter_name(step: int) -> str:
    return f"iter_{step:07d}"


def _rng_state() -> dict:
    from megatron.core import tensor_parallel

    out = {"torch": torch.get_rng_state(), "python": random.getstate(),
           "numpy": np.random.get_state(),
           "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def _set_rng_state(rng: dict) -> None:
    from megatron.core import tensor_parallel

    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    tensor_parallel.get_cuda_rng_tracker().set_states(rng["tracker"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])


def _model_sharded(chunks: Sequence[torch.nn.Module]) -> dict:
    return {f"chunk{i}": c.sharded_state_dict() for i, c in enumerate(chunks)}


def _optimizer_sharded(optimizer, chunks, is_loading: bool) -> dict:
    return {"optimizer": optimizer.sharded_state_dict(_model_sharded(chunks), is_loading=is_loading,
                                                      metadata=_DIST_OPT_FORMAT)}


def save_checkpoint(save_dir: str, *, policy, state, counters, prompts, hf_config,
                    source_hf_dir: Optional[str] = None, start: Optional[dict] = None,
                    keep: int = 2) -> Path:
    """Collective over all ranks. Returns the published ``iter_*`` directory. A failure on any
    rank (a full disk, a directory that became unwritable, ...) raises CheckpointSaveError on
    every rank after rank 0 removed the partial directory: ``latest`` and the checkpoints
    under ``save_dir`` are as they were."""
    save_dir = Path(save_dir).absolute()
    name = iter_name(counters.step)
    box: list = [None, None]
    if state.rank == 0:
        try:
            save_dir.mkdir(parents=True, exist_ok=True)
            for stale in save_dir.glob(f".{name}.partial-*"):  # an earlier interrupted save
                shutil.rmtree(stale, ignore_errors=True)
            box = [tempfile.mkdtemp(prefix=f".{name}.partial-", dir=save_dir), None]
        except OSError as e:
            box = [None, _cause(e)]
    dist.broadcast_object_list(box, src=0)
    if box[1] is not None:
        raise CheckpointSaveError(_save_failed(save_dir, counters.step, box[1]))
    partial = Path(box[0])
    try:
        _write_checkpoint(partial, policy=policy, state=state, counters=counters,
                          prompts=prompts, hf_config=hf_config, source_hf_dir=source_hf_dir,
                          start=start)
    except BaseException as e:  # noqa: BLE001 - every rank raised (the writes agree)
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        # one account on every rank: the first rank's cause that names an OS error (only the
        # coordinator of megatron-core's checkpoint exception holds the ranks' failures)
        causes: list = [None] * state.world_size
        dist.all_gather_object(causes, _with_disk_state(_cause(e), partial))
        cause = next((c for c in causes if c.startswith("no space") or "(errno " in c),
                     causes[0])
        if state.rank == 0:
            shutil.rmtree(partial, ignore_errors=True)
        dist.barrier()
        raise CheckpointSaveError(_save_failed(save_dir, counters.step, cause)) from e
    final, error = save_dir / name, None
    if state.rank == 0:
        try:
            swap_into_place(partial, final)  # the same step saved again: old or new, not neither
            tmp_latest = save_dir / f".{LATEST}.tmp"
            tmp_latest.write_text(name + "\n")
            os.replace(tmp_latest, save_dir / LATEST)
        except OSError as e:  # latest still names the previous checkpoint
            shutil.rmtree(partial, ignore_errors=True)
            error = _cause(e)
    published: list = [error]
    dist.broadcast_object_list(published, src=0)
    if published[0] is not None:
        raise CheckpointSaveError(_save_failed(save_dir, counters.step, published[0]))
    if state.rank == 0:
        done = sorted(p for p in save_dir.iterdir() if _ITER.match(p.name))
        for old in done[:-keep] if keep > 0 else []:
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def _save_failed(save_dir: Path, step: int, cause: str) -> str:
    latest = save_dir / LATEST
    last = latest.read_text().strip() if latest.is_file() else None
    return (f"--save {save_dir}: the checkpoint of step {step} was not written: {cause}; "
            + (f"the last complete checkpoint is {save_dir / last}" if last else
               "there is no complete checkpoint yet") + " (nothing partial is left behind)")


def _write_checkpoint(partial: Path, *, policy, state, counters, prompts, hf_config,
                      source_hf_dir, start) -> None:
    """Every file of the checkpoint into ``partial`` (collective; raises on every rank alike)."""
    model_dir = partial / "ckpt"  # save_megatron_checkpoint publishes its own directory
    raw = policy.raw_chunks()
    # the optimizer state is saved as extra sharded state of the model checkpoint, so its chunks
    # get checksums too and are verified on load
    save_megatron_checkpoint(
        raw, model_dir, state, hf_config=hf_config, source_hf_dir=source_hf_dir,
        extra_sharded={OPTIMIZER_SUBDIR: _optimizer_sharded(policy.optimizer, raw,
                                                            is_loading=False)})
    error = None
    if state.rank == 0:
        try:
            for item in model_dir.iterdir():  # model/ and the metadata at the top level
                os.replace(item, partial / item.name)
            model_dir.rmdir()
            (partial / "rng").mkdir()
        except OSError as e:
            error = e
    agree(error, "laying out the checkpoint")
    try:
        save_torch_file(_rng_state(), partial / "rng" / f"rank{state.rank:05d}.pt")
        if state.rank == 0:
            save_torch_file({"counters": vars(counters).copy(),
                             "scheduler": policy.scheduler.state_dict(),
                             "prompts": prompts.state_dict() if prompts is not None else None,
                             "start": start,  # where the start (= reference) weights came from
                             "world_size": state.world_size, "tp": state.tp_size,
                             "pp": state.pp_size}, partial / TRAINER_STATE)
    except Exception as e:  # noqa: BLE001 - every rank must reach the agreement
        error = e
    agree(error, "saving the checkpoint")


def find_checkpoint(load_dir: str) -> Path:
    """``--load`` may name a save directory (follow ``latest``), an ``iter_*`` directory, or a
    converted model checkpoint (weights only)."""
    path = Path(load_dir)
    latest = path / LATEST
    if latest.is_file():
        target = path / latest.read_text().strip()
        if not (target / META_NAME).is_file():
            raise ValueError(f"--load: {latest} names {target.name}, which is not a whole "
                             "checkpoint")
        return target
    if (path / META_NAME).is_file():
        return path
    raise ValueError(f"--load: {load_dir} has neither a '{LATEST}' file nor {META_NAME}")


def _prepare_optimizer_for_loading(optimizer) -> None:
    """megatron's distributed optimizer builds its sharded state dict from existing Adam states
    (it asserts one common step); a fresh one has none, so it takes one zero-gradient step
    first, as megatron-core does for the purpose. That step may move the weights (decoupled
    weight decay): the caller loads the model after the optimizer."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        init = getattr(opt, "_init_optimizer_states_with_dummy_values", None)
        if init is not None and not opt.optimizer.state:
            init()


def _restore_adam_steps(optimizer, num_steps: int) -> None:
    """megatron-core 0.16.1's distributed optimizer with torch's Adam does not restore the per-
    parameter Adam ``step`` from a dp_reshardable checkpoint (measured: it kept the value of the
    state-initialising step, 1, after 2 saved steps) and, where it sets one, shares a single tensor
    that torch's Adam then advances once per parameter. Either breaks the bias correction after a
    resume. The step count is the number of optimizer steps taken (skipped steps do not step
    Adam): give every parameter its own tensor with that value."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not hasattr(opt, "_init_optimizer_states_with_dummy_values"):
            continue  # the plain optimizer restores its steps itself
        for st in opt.optimizer.state.values():
            if "step" in st:
                old = st["step"]
                st["step"] = (torch.tensor(float(num_steps), dtype=old.dtype, device=old.device)
                              if torch.is_tensor(old) else num_steps)


def read_trainer_state(checkpoint: Path) -> Optional[dict]:
    """The trainer state of a training checkpoint (counters, LR schedule, data position, where
    the start weights came from), checksum verified; None for a weights-only checkpoint (a
    conversion, ``megatron-cppo sft``)."""
    path = Path(checkpoint) / TRAINER_STATE
    if not path.is_file():
        return None
    return load_torch_file(path, "trainer state", checkpoint_dir=checkpoint)


def load_checkpoint(start, *, policy, state, counters, prompts) -> dict[str, Any]:
    """Collective. Loads the model of ``start.checkpoint`` (any layout); with its trainer state
    (``start.trainer_state``: a training checkpoint, without --no-load-optim) also optimizer, LR
    schedule, counters, data position and this rank's RNG states. The metadata and trainer state
    come from ``start`` (read once, training/start.py). Returns what was restored (the log)."""
    path, meta = start.checkpoint, start.meta
    raw = policy.raw_chunks()
    restored = {"checkpoint": str(path), "model": True}
    trainer = start.trainer_state
    if trainer is None:  # weights only
        load_megatron_checkpoint(raw, path, state, meta=meta)
        policy.optimizer.reload_model_params()  # bf16: the fp32 main copies follow the weights
        return restored
    _prepare_optimizer_for_loading(policy.optimizer)
    loaded = load_extra_state(path, OPTIMIZER_SUBDIR,
                              _optimizer_sharded(policy.optimizer, raw, is_loading=True),
                              meta=meta)
    with torch.no_grad():  # fp32 main params of the distributed optimizer are views of weights
        policy.optimizer.load_state_dict(loaded["optimizer"])
    _restore_adam_steps(policy.optimizer, int(trainer["counters"]["optimizer_steps"]))
    # the model last: the weights exactly as saved, whatever preparing the optimizer touched
    load_megatron_checkpoint(raw, path, state, meta=meta)
    policy.scheduler.load_state_dict(trainer["scheduler"])
    for k, v in trainer["counters"].items():
        setattr(counters, k, v)
    if prompts is not None and trainer["prompts"] is not None:
        prompts.load_state_dict(trainer["prompts"])
    rng_file = path / "rng" / f"rank{state.rank:05d}.pt"
    same_world = trainer["world_size"] == state.world_size
    if same_world and rng_file.is_file():
        _set_rng_state(load_torch_file(rng_file, "RNG state", checkpoint_dir=path))
    restored.update(optimizer=True, scheduler=True, step=counters.step,
                    weight_version=counters.weight_version, rng=same_world,
                    data_position=trainer["prompts"] is not None)
    return restored


def list_partial(save_dir: str) -> list[str]:
    return glob.glob(os.path.join(save_dir, ".iter_*.partial-*"))
