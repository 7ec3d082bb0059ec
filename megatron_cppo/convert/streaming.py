"""Streaming writes and reads of a checkpoint's ``model/`` (megatron-core torch_dist distributed
checkpoint), one chunk or one parameter at a time, for the meta model of ``convert.meta_model``.

  * writing: a save strategy hands torch.distributed.checkpoint a planner whose ``resolve_data``
    materialises each meta chunk on demand (HF tensors -> mapping.py transform -> this chunk), and
    the writer stores one chunk at a time;
  * reading: each parameter's chunks are read from the checkpoint's storage into a buffer of that
    parameter's size, then mapped to HF tensors and streamed into safetensors shards.
Peak memory does not grow with the model: writing holds about one parameter (the largest: the
embedding) plus the HF tensors it is made of; reading holds about three copies of one parameter
(the storage bytes, the deserialised chunk, the assembled buffer). benchmarks/RESULTS.md has the
measurements.

Integrity (docs/checkpoints.md): every read starts with ``open_checkpoint`` (metadata validated
against the model it describes, checksums of every stored chunk verified), and the stored shapes and
dtypes are compared with the metadata's model before any tensor is read
(``_DistCheckpointReader.check_against``); every write ends with the checksums of what was written
(``_save_model``), and a write that fails for lack of space or an I/O error raises CheckpointError
(``original_exception`` unwraps what torch.distributed.checkpoint wraps).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from megatron_cppo.checkpoint import (META_NAME, MODEL_SUBDIR, CheckpointError, CheckpointMeta,
                                      integrity, read_meta)
from megatron_cppo.convert.hf_source import ConversionError, _dims
from megatron_cppo.convert.meta_model import _MetaModel, _resolve_layout, _sid
from megatron_cppo.dtypes import FLOAT_DTYPES


# ----------------------------------------------------------------------------------------------
# writing: a torch_dist save strategy that materialises one chunk at a time


def _streaming_strategy(materialize: Callable[[torch.Tensor], torch.Tensor]):
    """A megatron SaveShardedStrategy producing the torch_dist format, whose tensors are meta
    views materialised by ``materialize(meta_view)`` when the writer reaches them."""
    # megatron-core 0.19 accepts only (subclasses of) its torch_dist strategy; 0.16 any strategy
    from megatron.core.dist_checkpointing.strategies.torch import (
        MCoreSavePlanner, TorchDistSaveShardedStrategy, _replace_state_dict_keys_with_sharded_keys,
        mcore_to_pyt_state_dict)
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint import save as dcp_save

    class LazyPlanner(MCoreSavePlanner):
        def resolve_data(self, write_item):
            obj = super().resolve_data(write_item)
            if isinstance(obj, torch.Tensor) and obj.is_meta:
                return materialize(obj)
            return obj

    class StreamingTorchDistStrategy(TorchDistSaveShardedStrategy):
        def save(self, sharded_state_dict, checkpoint_dir):
            sd, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict, True)
            pyt_sd = mcore_to_pyt_state_dict(sd, False)
            dcp_save(pyt_sd, storage_writer=FileSystemWriter(str(checkpoint_dir),
                                                             thread_count=1),
                     planner=LazyPlanner(can_run_decentralized_global_plan=False,
                                         flatten_state_dict=False))

    return StreamingTorchDistStrategy("torch_dist", 1)


class _Materializer:
    """meta view -> real tensor, computing each parameter once (gate/up and per-layer chunks of
    one parameter arrive one after another) and keeping only the last one."""

    def __init__(self, mm: _MetaModel, make: Callable[[str], torch.Tensor],
                 progress: bool, desc: str):
        from tqdm import tqdm

        self.mm, self.make = mm, make
        self.cached: tuple[int, torch.Tensor] | None = None
        self.bytes = 0
        self.count = 0
        self.bar = tqdm(total=len(mm.pieces), desc=desc, unit="tensor", disable=not progress)

    def __call__(self, view: torch.Tensor) -> torch.Tensor:
        sid = _sid(view)
        if self.cached is None or self.cached[0] != sid:
            name = self.mm.name_of[sid]
            param = self.mm.params[name]
            full = self.make(name)
            if tuple(full.shape) != tuple(param.shape):
                raise ConversionError(f"{name}: conversion gives shape {list(full.shape)}, the "
                                      f"megatron parameter is {list(param.shape)}")
            self.cached = (sid, full.to(param.dtype).contiguous())
            self.bytes += self.cached[1].numel() * self.cached[1].element_size()  # as stored
            self.count += 1
            self.bar.update(1)
        return torch.as_strided(self.cached[1], view.size(), view.stride(),
                                view.storage_offset())


def original_exception(e: BaseException) -> BaseException:
    """The exception a rank raised, out of torch.distributed.checkpoint's CheckpointException
    (which wraps every failure inside save / load, ours included)."""
    from torch.distributed.checkpoint.api import CheckpointException

    while isinstance(e, CheckpointException) and e.failures:
        failure = next(iter(e.failures.values()))
        inner = failure[0] if isinstance(failure, tuple) else failure
        if not isinstance(inner, BaseException):
            break
        e = inner
    return e


def _is_write_failure(e: BaseException) -> bool:
    if isinstance(e, OSError) and not isinstance(e, FileNotFoundError):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and any(
        s in text for s in ("inline_container", "file write failed", "No space left",
                            "Disk quota", "PytorchStreamWriter"))


def _save_model(mm: _MetaModel, make, directory: Path, progress: bool, desc: str,
                checksums: bool = True):
    """Stream the meta model's tensors (``make(name)``) into a torch_dist checkpoint at
    ``directory``, then the checksums of what was written."""
    from megatron.core import dist_checkpointing

    directory.mkdir()
    mat = _Materializer(mm, make, progress, desc)
    try:
        dist_checkpointing.save(mm.sharded, str(directory),
                                sharded_strategy=_streaming_strategy(mat),
                                validate_access_integrity=False)
    except BaseException as e:
        inner = original_exception(e)
        if _is_write_failure(inner):  # disk full, quota, I/O error: torch reports RuntimeError
            raise CheckpointError(f"{directory}: writing the checkpoint failed "
                                  f"({type(inner).__name__}: {str(inner).splitlines()[0][:200]})"
                                  ) from None
        if inner is e:
            raise
        raise inner from None
    finally:
        mat.bar.close()
    if mat.count != len(mm.pieces):
        raise AssertionError(f"wrote {mat.count} of {len(mm.pieces)} parameters")
    t0 = time.perf_counter()
    mat.checksums = {MODEL_SUBDIR: integrity.compute(directory)} if checksums else None
    mat.checksum_seconds = time.perf_counter() - t0
    return mat


# ----------------------------------------------------------------------------------------------
# reading: one parameter at a time from a torch_dist checkpoint


class _DistCheckpointReader:
    def __init__(self, model_dir: Path):
        from torch.distributed.checkpoint import FileSystemReader

        self.dir = model_dir
        self.reader = FileSystemReader(str(model_dir))
        try:
            self.metadata = self.reader.read_metadata()
            self.reader.set_up_storage_reader(self.metadata, is_coordinator=True)
        except Exception as e:  # noqa: BLE001 - a damaged .metadata
            raise CheckpointError(f"{model_dir / '.metadata'}: unreadable distributed-checkpoint "
                                  f"metadata ({type(e).__name__})") from None

    def read_into(self, key: str, offsets: Sequence[int], out: torch.Tensor) -> None:
        """Fill ``out`` with the region of global tensor ``key`` starting at ``offsets``."""
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
        from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner
        from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

        md = self.metadata.state_dict_metadata.get(key)
        if md is None:
            raise ConversionError(f"{self.reader.path}: the checkpoint has no tensor {key}")
        items = create_read_items_for_chunk_list(
            key, md, [ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=out.shape)])
        covered = sum(int(torch.tensor(i.lengths).prod()) for i in items)
        if covered != out.numel():
            raise ConversionError(f"{self.reader.path}: tensor {key} does not cover the region "
                                  f"at {list(offsets)} of size {list(out.shape)}")

        class Into(LoadPlanner):
            def set_up_planner(self, *a, **k): ...
            def create_local_plan(self): ...
            def create_global_plan(self, plans): ...
            def finish_plan(self, plan): ...
            def load_bytes(self, read_item, value): ...

            def resolve_tensor(self, read_item):
                t = out
                for d, (o, n) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
                    t = t.narrow(d, o, n)
                return t

            def commit_tensor(self, read_item, tensor): ...

        try:
            self.reader.read_data(LoadPlan(items), Into()).wait()
        except Exception as e:  # noqa: BLE001 - a damaged or missing data file
            files = sorted({str(self.metadata.storage_data[i.storage_index].relative_path)
                            for i in items if i.storage_index in self.metadata.storage_data})
            raise CheckpointError(f"{self.dir / (files[0] if files else '')}: cannot read tensor "
                                  f"{key} ({type(e).__name__}: {str(e)[:200]})") from None

    def check_against(self, mm: "_MetaModel", meta: CheckpointMeta, path: Path) -> None:
        """Every tensor the model needs is stored with the global shape and the dtype the
        metadata says (a wrong dtype or vocabulary in megatron_cppo.json is caught here, before
        any tensor is read)."""
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        want = FLOAT_DTYPES[meta.dtype]
        for pieces in mm.pieces.values():
            for st in pieces:
                md = self.metadata.state_dict_metadata.get(st.key)
                if not isinstance(md, TensorStorageMetadata):
                    raise CheckpointError(f"{self.dir}: the checkpoint has no tensor {st.key}")
                if tuple(md.size) != tuple(st.global_shape):
                    raise CheckpointError(
                        f"{path}: tensor {st.key} is stored with shape {list(md.size)}, the "
                        f"metadata's model needs {list(st.global_shape)} (padded_vocab_size / "
                        f"hf_config do not describe this checkpoint)")
                if md.properties.dtype != want:
                    raise CheckpointError(
                        f"{path}: dtype is {meta.dtype}, but tensor {st.key} is stored as "
                        f"{str(md.properties.dtype).removeprefix('torch.')}")


def _read_param(reader: _DistCheckpointReader, mm: _MetaModel, name: str) -> torch.Tensor:
    """One megatron parameter (TP=1 layout, padded vocab as stored) from the checkpoint."""
    param = mm.params[name]
    buf = torch.empty(param.shape, dtype=param.dtype)
    for st in mm.pieces[name]:
        view = torch.as_strided(buf, st.data.size(), st.data.stride(), st.data.storage_offset())
        view = view.reshape((1,) * st.prepend_axis_num + tuple(st.local_shape))
        reader.read_into(st.key, st.global_offset, view)
    return buf


@dataclass
class _Source:
    """A megatron_cppo checkpoint opened for reading: metadata validated against the model it
    describes, checksums verified."""

    dir: Path
    meta: CheckpointMeta
    hf_config: object
    reader: "_DistCheckpointReader"
    checked: int  # chunks + files whose checksums were verified
    seconds: float  # spent verifying checksums


def open_checkpoint(src_dir, *, checksums: bool = True) -> _Source:
    """Read a checkpoint's metadata and validate it (fields, layout against the model, padded
    vocabulary), verify its checksums, open its tensors; CheckpointError naming the file / field /
    tensor otherwise. Stored shapes and dtypes are checked by ``reader.check_against`` once the
    meta model exists."""
    from megatron_cppo.models.qwen2_5_vl.config import load_hf_config, padded_vocab_size

    src_dir = Path(src_dir)
    meta = read_meta(src_dir)
    meta_path = src_dir / META_NAME
    try:
        hf_config = load_hf_config(meta.hf_config)
        dims = _dims(hf_config)
    except Exception as e:  # noqa: BLE001 - transformers validation of a damaged hf_config
        first_line = str(e).splitlines()[0][:200] if str(e) else ""
        raise CheckpointError(f"{meta_path}: hf_config is not a valid Qwen2.5-VL config "
                              f"({type(e).__name__}: {first_line})") from None
    try:
        _resolve_layout(hf_config, meta.tp, meta.pp, meta.vision_parallel_mode,
                        meta.decoder_first_pipeline_num_layers,
                        meta.decoder_last_pipeline_num_layers)
    except ValueError as e:
        raise CheckpointError(f"{meta_path}: the recorded layout does not fit the model ({e})") \
            from None
    want = padded_vocab_size(dims.text.vocab_size, meta.tp)
    if meta.padded_vocab_size != want:
        raise CheckpointError(f"{meta_path}: padded_vocab_size {meta.padded_vocab_size} does not "
                              f"match vocab_size {dims.text.vocab_size} at tp {meta.tp} (expected "
                              f"{want})")
    t0 = time.perf_counter()
    checked = 0
    if checksums:
        checked = integrity.verify(src_dir, [MODEL_SUBDIR], expected=meta.checksums is not None)
    seconds = time.perf_counter() - t0
    return _Source(src_dir, meta, hf_config, _DistCheckpointReader(src_dir / MODEL_SUBDIR),
                   checked, seconds)
