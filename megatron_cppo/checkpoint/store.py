"""Collective save / load of a megatron_cppo checkpoint from / into a live model at any layout.

See the package docstring (``megatron_cppo/checkpoint/__init__.py``) for the API and the layout.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Mapping, Optional, Sequence

import torch
import torch.distributed as dist

from megatron_cppo.checkpoint import integrity
from megatron_cppo.checkpoint.atomic import (check_output_dir, make_partial_dir, output_lock,
                                             recover_leftovers, swap_into_place)
from megatron_cppo.checkpoint.meta import (FORMAT_VERSION, HF_LAYOUTS, META_NAME, MODEL_SUBDIR,
                                           RESERVED_SUBDIRS, CheckpointError, CheckpointMeta,
                                           read_meta)
from megatron_cppo.dtypes import short_name
from megatron_cppo.parallel.agree import agree


def _unwrap(chunk):
    from megatron_cppo.models.qwen2_5_vl.builder import unwrap

    return unwrap(chunk)


def model_sharded_state_dict(chunks: Sequence[torch.nn.Module]) -> dict:
    """The sharded state dict stored under ``model/``: ``{"chunk{i}": chunk.sharded_state_dict()}``
    per virtual pipeline chunk of this rank. Pass it to megatron's
    ``optimizer.sharded_state_dict(model_sharded_state_dict(chunks))`` to get the optimizer state
    that matches these parameters."""
    return {f"chunk{i}": c.sharded_state_dict() for i, c in enumerate(chunks)}


def _check_extra_names(names) -> None:
    for name in names:
        if not isinstance(name, str) or not name.isidentifier() or name in RESERVED_SUBDIRS:
            raise ValueError(f"extra_sharded key {name!r} must be an identifier other than "
                             f"{list(RESERVED_SUBDIRS)} (it names a subdirectory)")


def _prepare_on_rank0(out_dir: Path, overwrite: bool, subdirs) -> tuple:
    """Rank 0: refuse a forbidden output, take the output lock, clean leftovers, make the partial
    directory. Returns (lock context or None, tmp dir or None, error message or None)."""
    try:
        check_output_dir(out_dir, overwrite, marker=META_NAME)
        lock = output_lock(out_dir)
        lock.__enter__()
    except (ValueError, OSError) as e:
        return None, None, f"{type(e).__name__}: {e}"
    try:
        recover_leftovers(out_dir)
        check_output_dir(out_dir, overwrite, marker=META_NAME)
        tmp = make_partial_dir(out_dir)
        for sub in subdirs:
            (tmp / sub).mkdir()
        return lock, tmp, None
    except (ValueError, OSError) as e:
        lock.__exit__(None, None, None)
        return None, None, f"{type(e).__name__}: {e}"


def save_megatron_checkpoint(chunks: Sequence[torch.nn.Module], out_dir, state, *, hf_config,
                             source_hf_dir: Optional[str] = None,
                             source_hf_layout: Optional[str] = None,
                             overwrite: bool = False,
                             extra_sharded: Optional[Mapping[str, dict]] = None,
                             extra_metadata: Optional[dict] = None,
                             model_sharded: Optional[dict] = None) -> None:
    """Save this rank's chunks (collective over all ranks) as a megatron_cppo checkpoint.

    ``extra_sharded``: name -> megatron sharded state dict, each saved with megatron's distributed
    save into ``out_dir/<name>/`` (e.g. ``{"optimizer": optimizer.sharded_state_dict(...)}``).
    ``extra_metadata``: JSON-serialisable dict stored as ``meta.extra``. ``model_sharded``: the
    model's sharded state dict if the caller already built it (it must be
    ``model_sharded_state_dict(chunks)``). Checksums of every stored chunk are computed by all
    ranks (each re-reads a share of the files) and written to ``checksums.json``.

    Failure-atomic and non-destructive (atomic.py): rank 0 holds the output lock, all ranks write
    into a temporary sibling which rank 0 swaps in when every rank succeeded; an existing
    ``out_dir`` is replaced only with ``overwrite`` and only if it is a megatron_cppo checkpoint.
    Raises on every rank when any rank failed (the failing rank its own error, the others a
    RuntimeError saying another rank failed); the trainer should print it on rank 0 only."""
    import json

    from megatron.core import dist_checkpointing

    import megatron_cppo
    from megatron_cppo.models.qwen2_5_vl.config import load_hf_config

    extra_sharded = dict(extra_sharded or {})
    _check_extra_names(extra_sharded)
    extra_metadata = dict(extra_metadata or {})
    json.dumps(extra_metadata)  # TypeError now, not after the tensors are written
    if source_hf_layout is not None and source_hf_layout not in HF_LAYOUTS:
        raise ValueError(f"source_hf_layout must be one of {HF_LAYOUTS} or None, got "
                         f"{source_hf_layout!r}")
    out_dir = Path(out_dir).absolute()
    model = _unwrap(chunks[0])
    dtype = short_name(next(chunks[0].parameters()).dtype)
    subdirs = [MODEL_SUBDIR] + list(extra_sharded)
    lock, tmp, prep_error = (None, None, None)
    if state.rank == 0:
        lock, tmp, prep_error = _prepare_on_rank0(out_dir, overwrite, subdirs)
    shared = [str(tmp) if tmp else None, prep_error]
    dist.broadcast_object_list(shared, src=0)
    if shared[1] is not None:
        raise CheckpointError(f"cannot save to {out_dir}: {shared[1]}")
    tmp_dir = Path(shared[0])
    try:
        error = None
        try:
            sharded = (model_sharded if model_sharded is not None
                       else model_sharded_state_dict(chunks))
            dist_checkpointing.save(sharded, str(tmp_dir / MODEL_SUBDIR))
            for name, sd in extra_sharded.items():
                dist_checkpointing.save(sd, str(tmp_dir / name))
        except BaseException as e:  # noqa: BLE001 - every rank must reach the agreement below
            error = e
        agree(error, "saving the checkpoint (nothing was written)")
        tables = integrity.compute_collective(tmp_dir, subdirs)
        error = None
        if state.rank == 0:
            try:  # a full disk can fail these writes too: every rank must learn of it
                integrity.write(tmp_dir, tables)
                layout = model.layout
                CheckpointMeta(
                    format_version=FORMAT_VERSION, converter_version=megatron_cppo.__version__,
                    hf_config=load_hf_config(hf_config).to_dict(), source_hf_dir=source_hf_dir,
                    tp=state.tp_size, pp=state.pp_size,
                    vision_parallel_mode=layout.vision_parallel_mode, dtype=dtype,
                    padded_vocab_size=layout.padded_vocab_size, **layout.pipeline_split,
                    source_hf_layout=source_hf_layout, extra_state=list(extra_sharded),
                    extra=extra_metadata, checksums=integrity.ALGORITHM).write(tmp_dir)
                swap_into_place(tmp_dir, out_dir)
            except Exception as e:  # noqa: BLE001 - reported to every rank below
                error = e
        agree(error, "writing the checkpoint's checksums and metadata")
    finally:
        if state.rank == 0:
            if tmp_dir.exists():
                shutil.rmtree(tmp_dir, ignore_errors=True)
            lock.__exit__(None, None, None)


def _read_meta_collective(checkpoint_dir, subdirs_of,
                          meta: Optional[CheckpointMeta] = None) -> CheckpointMeta:
    """Metadata (read here unless the caller read it already: ``meta``) and checksums checked by
    all ranks (the checksum work divided among them); a CheckpointError on every rank if
    anything is wrong."""
    if meta is None:
        error = None
        try:
            meta = read_meta(checkpoint_dir)
        except CheckpointError as e:
            error = e
        agree(error, f"reading the metadata of {checkpoint_dir}", error_type=CheckpointError)
    integrity.verify_collective(checkpoint_dir, subdirs_of(meta),
                                expected=meta.checksums is not None)
    return meta


def load_megatron_checkpoint(chunks: Sequence[torch.nn.Module], checkpoint_dir, state, *,
                             meta: Optional[CheckpointMeta] = None) -> CheckpointMeta:
    """Load the model weights of a checkpoint into this rank's built chunks (any TP x PP x VPP
    and pipeline split) with megatron-core's distributed loader. Collective over all ranks. The
    metadata (unless given: ``meta``, as ``read_meta`` returned it) and the checksums of
    ``model/`` are verified first (the ranks share the work; a damaged chunk raises
    CheckpointError naming it, on every rank). Returns the metadata (``meta.extra`` holds the
    caller's JSON)."""
    from megatron.core import dist_checkpointing

    meta = _read_meta_collective(checkpoint_dir, lambda m: [MODEL_SUBDIR], meta)
    padded = _unwrap(chunks[0]).layout.padded_vocab_size
    if padded != meta.padded_vocab_size:
        raise CheckpointError(
            f"{checkpoint_dir}: stored with {meta.padded_vocab_size} vocabulary rows (padded for "
            f"tensor-model-parallel-size {meta.tp}); this layout needs {padded}: run "
            f"`megatron-cppo-convert reshard --megatron-dir {checkpoint_dir} --out NEW_DIR --tp "
            f"{state.tp_size} --pp {state.pp_size}` first")
    sharded = model_sharded_state_dict(chunks)
    loaded = dist_checkpointing.load(sharded, str(Path(checkpoint_dir) / MODEL_SUBDIR))
    for i, chunk in enumerate(chunks):
        chunk.load_state_dict(loaded[f"chunk{i}"], strict=True)
    return meta


def load_extra_state(checkpoint_dir, name: str, sharded_state_dict: dict, *,
                     meta: Optional[CheckpointMeta] = None) -> dict:
    """Load the extra sharded state ``name`` (saved via ``extra_sharded``) for this rank's
    ``sharded_state_dict`` (same structure as at save, e.g. the optimizer's); collective, checksums
    verified first (the metadata too unless given: ``meta``). Returns megatron's loaded state dict
    (e.g. for ``optimizer.load_state_dict``)."""
    from megatron.core import dist_checkpointing

    meta = _read_meta_collective(checkpoint_dir, lambda m: [name] if m and name in m.extra_state
                                 else [], meta)
    if name not in meta.extra_state:
        raise CheckpointError(f"{checkpoint_dir}: holds no extra state {name!r} (it has "
                              f"{meta.extra_state})")
    return dist_checkpointing.load(sharded_state_dict, str(Path(checkpoint_dir) / name))
