"""HF <-> Megatron checkpoint conversion, streaming one parameter at a time.

The checkpoint format itself (metadata, atomic directories, the collective save / load used by
training) lives in ``megatron_cppo.checkpoint``; docs/checkpoints.md describes it. In short:

    megatron_cppo.json   metadata: HF model config, layout (incl. pipeline split), source HF
                         directory and key layout, converter version
    model/               megatron-core distributed checkpoint (torch_dist) of the model's
                         ``sharded_state_dict()``: reshardable, loads at any TP x PP

How it streams. The global tensors of a torch_dist checkpoint do not depend on the layout that wrote
them (per-layer chunks of [layers, ...] tensors, gate/up stored separately), except the vocabulary
rows, which are padded for TP. So every operation runs in ONE process on a TP=1, PP=1 model built on
the ``meta`` device: megatron's own ``sharded_state_dict()`` of it fixes the keys, shapes and chunking
exactly as training will load them, and no parameter memory is allocated.
  * writing: a save strategy hands torch.distributed.checkpoint a planner whose ``resolve_data``
    materialises each meta chunk on demand (HF tensors -> mapping.py transform -> this chunk), and
    the writer stores one chunk at a time;
  * reading: each parameter's chunks are read from the checkpoint's storage into a buffer of that
    parameter's size, then mapped to HF tensors and streamed into safetensors shards.
Peak memory does not grow with the model: writing holds about one parameter (the largest: the
embedding) plus the HF tensors it is made of; reading holds about three copies of one parameter
(the storage bytes, the deserialised chunk, the assembled buffer). benchmarks/RESULTS.md has the
measurements.

Training saves and loads the same format from its live layout with
``megatron_cppo.checkpoint.save_megatron_checkpoint`` / ``load_megatron_checkpoint`` (re-exported
here; megatron-core's own distributed save and load, collective).

Integrity (docs/checkpoints.md): every read starts with ``open_checkpoint`` (metadata validated
against the model it describes, checksums of every stored chunk verified), and the stored shapes and
dtypes are compared with the metadata's model before any tensor is read; every write ends with the
checksums of what was written. HF input: non-float tensors are refused, non-finite values unless
``allow_non_finite``. ``check_checkpoint`` does the reading checks alone.

Pipeline splits: the stored tensors use global layer indices, so a checkpoint does not depend on
the split; the split it was written for (given, or chosen when PP does not divide the layers) is
recorded in the metadata, and reshard moves between splits like between layouts.

Names and transforms all come from ``megatron_cppo.models.qwen2_5_vl.mapping`` (one source of truth).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist

import megatron_cppo
from megatron_cppo.checkpoint import (FORMAT_VERSION, HF_LAYOUTS, META_NAME,  # noqa: F401
                                      MODEL_SUBDIR, CheckpointError, CheckpointMeta,
                                      atomic_output_dir, check_output_dir, integrity,
                                      load_megatron_checkpoint, read_meta,
                                      save_megatron_checkpoint)
from megatron_cppo.convert.safetensors_io import (CheckpointFileError, SafetensorsDir,
                                                  ShardedSafetensorsWriter)

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Files of an HF model directory that are not weights and travel with an export.
# written into every HF export: marks the directory as ours (what --overwrite may replace)
EXPORT_MARKER = "megatron_cppo_export.json"
_AUX_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json",
              "merges.txt", "special_tokens_map.json", "added_tokens.json",
              "preprocessor_config.json", "video_preprocessor_config.json",
              "processor_config.json", "chat_template.json", "chat_template.jinja",
              "generation_config.json")


class ConversionError(CheckpointError):
    """Bad input to a conversion; the message names the file and tensor."""


@dataclass
class ConversionReport:
    num_tensors: int
    bytes: int
    seconds: float
    notes: list = dataclasses.field(default_factory=list)  # e.g. the pipeline split chosen

    @property
    def mb_per_s(self) -> float:
        return self.bytes / 1e6 / max(self.seconds, 1e-9)

    def __str__(self) -> str:
        return (f"{self.num_tensors} tensors, {self.bytes / 1e6:.1f} MB in {self.seconds:.1f} s "
                f"({self.mb_per_s:.1f} MB/s)")


# ----------------------------------------------------------------------------------------------
# HF side: config and tensors, validated before anything is written


def read_hf_config(hf_dir: Path):
    """The HF config of a model directory; ConversionError unless it is a Qwen2.5-VL one."""
    from transformers import AutoConfig

    path = hf_dir / "config.json"
    if not path.is_file():
        raise ConversionError(f"{hf_dir}: no config.json (not a Hugging Face model directory)")
    try:
        raw = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ConversionError(f"{path}: unreadable ({e})") from None
    if not isinstance(raw, dict):
        raise ConversionError(f"{path}: expected a JSON object, found a {type(raw).__name__}")
    if raw.get("model_type") != "qwen2_5_vl":
        raise ConversionError(f"{path}: model_type is {raw.get('model_type')!r}, not "
                              f"'qwen2_5_vl' (only Qwen2.5-VL checkpoints are supported)")
    try:
        config = AutoConfig.from_pretrained(str(hf_dir), local_files_only=True)
        _dims(config)  # every dimension the conversion needs, validated
    except Exception as e:  # noqa: BLE001 - transformers / hub validation errors of a bad file
        raise ConversionError(f"{path}: invalid Qwen2.5-VL config ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:300] if str(e) else ''})") from None
    return config


def _dims(hf_config):
    from megatron_cppo.models.qwen2_5_vl.config import Qwen25VLDims

    return Qwen25VLDims.from_hf(hf_config)


def expected_hf_shapes(hf_config) -> dict[str, tuple[int, ...]]:
    """Every tensor an HF checkpoint of this config holds (>= 4.52 names), from the transformers
    model built on the meta device (no memory): the exact oracle for missing/extra/misshaped."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from megatron_cppo.models.qwen2_5_vl import mapping

    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(hf_config)
    names = mapping.hf_names(_dims(hf_config))
    shapes = {mapping.normalize_hf_key(k): tuple(v.shape) for k, v in model.state_dict().items()}
    return {k: shapes[k] for k in sorted(names)}


class HFSource:
    """Validated HF tensors addressed by >= 4.52 names, whatever layout the files use."""

    def __init__(self, hf_dir: Path, hf_config):
        from megatron_cppo.models.qwen2_5_vl import mapping

        try:
            self.files = SafetensorsDir(hf_dir)
        except CheckpointFileError as e:
            raise ConversionError(str(e)) from None
        self.key = {}  # new-layout name -> name in the files
        for name in self.files.names():
            new = mapping.normalize_hf_key(name)
            if new in self.key:
                raise ConversionError(f"{hf_dir}: tensor {new} appears in both HF key layouts "
                                      f"({self.key[new]} and {name})")
            self.key[new] = name
        names = self.files.names()
        has_new = any(n.startswith((mapping.HF_TEXT, mapping.HF_VISION)) for n in names)
        has_old = any(mapping.normalize_hf_key(n) != n for n in names)
        # the key layout of the files ("transformers": what save_pretrained writes); None if mixed
        self.layout = ("language_model" if has_new and not has_old
                       else "transformers" if has_old and not has_new else None)
        expected = expected_hf_shapes(hf_config)
        missing = sorted(set(expected) - set(self.key))
        extra = sorted(set(self.key) - set(expected))
        if missing:
            raise ConversionError(f"{hf_dir}: missing tensors {missing[:5]}"
                                  + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
        if extra:
            raise ConversionError(f"{hf_dir}: unexpected tensors {extra[:5]}"
                                  + (f" and {len(extra) - 5} more" if len(extra) > 5 else "")
                                  + " (not part of this Qwen2.5-VL config)")
        for name, shape in expected.items():
            info = self.files.tensors[self.key[name]]
            if info.shape != shape:
                raise ConversionError(f"{info.file}: tensor {info.name} has shape "
                                      f"{list(info.shape)}, the config needs {list(shape)}")
            if not info.dtype.is_floating_point:
                raise ConversionError(f"{info.file}: tensor {info.name} has dtype "
                                      f"{str(info.dtype).removeprefix('torch.')}; weights must "
                                      f"be floating point")
        self.hf_dir = hf_dir

    def get(self, name: str, allow_non_finite: bool = False) -> torch.Tensor:
        try:
            t = self.files.get(self.key[name])
        except CheckpointFileError as e:
            raise ConversionError(str(e)) from None
        if not allow_non_finite:
            _check_finite(t, f"{self.files.tensors[self.key[name]].file}: tensor "
                             f"{self.key[name]}")
        return t

    def total_bytes(self) -> int:
        return self.files.total_bytes()


def _check_finite(t: torch.Tensor, what: str) -> None:
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise ConversionError(f"{what} has {bad} non-finite values (NaN / inf); pass "
                              f"--allow-non-finite to convert it anyway")


# ----------------------------------------------------------------------------------------------
# the meta model: megatron's own keys and chunking, no memory


@contextlib.contextmanager
def _single_process_parallel():
    """megatron parallel state for one process (TP = PP = 1), torn down afterwards. Refused
    inside a multi-rank job: conversion is a single-process tool."""
    from megatron_cppo.parallel import ParallelConfig, destroy_parallel, initialize_parallel
    from megatron_cppo.parallel.launch import free_port

    if dist.is_initialized():
        if dist.get_world_size() != 1:
            raise RuntimeError("run the converter as a single process, not inside a "
                               "distributed job")
        from megatron.core import parallel_state as mpu

        if mpu.model_parallel_is_initialized():
            raise RuntimeError("megatron parallel state is already initialised in this process")
    saved = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                            "MASTER_PORT")}
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(free_port()))
    try:
        state = initialize_parallel(ParallelConfig())
        try:
            yield state
        finally:
            destroy_parallel()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@dataclass
class _MetaModel:
    """A TP=1, PP=1 model on the meta device and its post-factory sharded state dict."""

    model: torch.nn.Module
    sharded: dict  # megatron sharded state dict (factories applied)
    name_of: dict  # storage id of a meta parameter -> global megatron name
    pieces: dict  # global megatron name -> [ShardedTensor] whose data views that parameter
    params: dict  # global megatron name -> meta parameter (padded vocab where stored padded)
    dims: object


def _meta_model(hf_config, state, dtype: str, padded_vocab: int) -> _MetaModel:
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    from megatron_cppo.models.qwen2_5_vl.builder import build_qwen2_5_vl, unwrap
    from megatron_cppo.models.qwen2_5_vl.config import Qwen25VLModelConfig

    meta_state = dataclasses.replace(state, device=torch.device("meta"))
    with torch.device("meta"):
        (chunk,) = build_qwen2_5_vl(hf_config, meta_state,
                                    Qwen25VLModelConfig(dtype="fp32", vision_parallel_mode="tp"))
    model = unwrap(chunk).to(_DTYPES[dtype])  # the stored dtype (meta tensors: no memory)
    name_of = {_sid(p): model.global_param_name(n) for n, p in model.named_parameters()}
    sharded = model.sharded_state_dict()
    params = {model.global_param_name(n): p for n, p in model.named_parameters()}
    # Vocabulary rows are padded for the target TP; at TP=1 the meta model has none.
    vocab_keys = {"language_model.embedding.word_embeddings.weight",
                  "language_model.output_layer.weight"}
    for path, value in list(_flat_items(sharded)):
        if isinstance(value, ShardedTensor) and value.key in vocab_keys \
                and value.global_shape[0] != padded_vocab:
            data = torch.empty((padded_vocab,) + tuple(value.data.shape[1:]),
                               dtype=value.data.dtype, device="meta")
            name_of[_sid(data)] = name = name_of[_sid(value.data)]
            params[name] = data
            _set_path(sharded, path, ShardedTensor.from_rank_offsets(
                value.key, data, replica_id=value.replica_id))
    apply_factories(sharded)
    pieces: dict[str, list] = {}
    for value in nested_values(sharded):
        if isinstance(value, ShardedTensor):
            pieces.setdefault(name_of[_sid(value.data)], []).append(value)
    return _MetaModel(model, sharded, name_of, pieces, params, model.dims)


def _flat_items(d, path=()):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _flat_items(v, path + (k,))
        else:
            yield path + (k,), v


def _set_path(d, path, value):
    for k in path[:-1]:
        d = d[k]
    d[path[-1]] = value


def _sid(t: torch.Tensor) -> int:
    """Identity of a tensor's storage: every view or detached alias of a parameter (megatron's
    factories and its conversion to torch ShardedTensors make both) shares it."""
    return t.untyped_storage()._cdata


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

        want = _DTYPES[meta.dtype]
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


# ----------------------------------------------------------------------------------------------
# the three conversions


def _resolve_layout(hf_config, tp: int, pp: int, vision_parallel: str,
                    first: Optional[int] = None, last: Optional[int] = None):
    from megatron_cppo.models.qwen2_5_vl.config import Qwen25VLModelConfig, validate_layout
    from megatron_cppo.parallel import ParallelConfig

    mode = {"replicated": "dp_in_tp"}.get(vision_parallel, vision_parallel)
    return validate_layout(_dims(hf_config),
                           Qwen25VLModelConfig(vision_parallel_mode=mode,
                                               num_layers_in_first_pipeline_stage=first,
                                               num_layers_in_last_pipeline_stage=last),
                           ParallelConfig(tensor_model_parallel_size=tp,
                                          pipeline_model_parallel_size=pp))


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
        _resolve_layout(hf_config, meta.tp, meta.pp, meta.vision_parallel,
                        meta.num_layers_in_first_pipeline_stage,
                        meta.num_layers_in_last_pipeline_stage)
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


def _write_meta(tmp: Path, meta: CheckpointMeta, mat) -> None:
    checksums = getattr(mat, "checksums", None)
    if checksums is not None:
        integrity.write(tmp, checksums)
    dataclasses.replace(meta, checksums=integrity.ALGORITHM if checksums is not None
                        else None).write(tmp)


def hf_to_megatron(hf_dir, out_dir, *, tp: int = 1, pp: int = 1, vision_parallel: str = "auto",
                   dtype: Optional[str] = None, overwrite: bool = False, progress: bool = True,
                   num_layers_in_first_pipeline_stage: Optional[int] = None,
                   num_layers_in_last_pipeline_stage: Optional[int] = None,
                   allow_non_finite: bool = False, checksums: bool = True) -> ConversionReport:
    """Write a megatron_cppo checkpoint of an HF Qwen2.5-VL directory, loadable at (tp, pp).
    ``dtype`` (bf16, fp16, fp32) defaults to the HF config's dtype (bf16 if it names none). The
    pipeline split (first / last stage layer counts) is validated and recorded; when PP does not
    divide the layers and none is given one is chosen (the report's notes say which). Non-float
    tensors are refused; non-finite values too unless ``allow_non_finite``."""
    from megatron_cppo.models.qwen2_5_vl import mapping

    t0 = time.perf_counter()
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    check_output_dir(out_dir, overwrite, marker=META_NAME, inputs=[hf_dir])
    hf_config = read_hf_config(hf_dir)
    if dtype is None:
        stored = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
        dtype = {v: k for k, v in _DTYPES.items()}.get(
            getattr(torch, str(stored).removeprefix("torch."), None)
            if isinstance(stored, str) else stored, "bf16")
    if dtype not in _DTYPES:
        raise ConversionError(f"--dtype must be one of {list(_DTYPES)}, got {dtype!r}")
    layout = _resolve_layout(hf_config, tp, pp, vision_parallel,
                             num_layers_in_first_pipeline_stage,
                             num_layers_in_last_pipeline_stage)
    source = HFSource(hf_dir, hf_config)
    check_output_dir(out_dir, overwrite, marker=META_NAME, inputs=[hf_dir],
                     needed_bytes=_estimate(source.total_bytes(), dtype))
    dims = _dims(hf_config)
    table = mapping.rule_table(dims)

    def make(name):
        rule = table[name]
        hf = [source.get(h, allow_non_finite) for h in rule.hf]
        if rule.kind == mapping.VOCAB:  # padded for the target TP, whole (TP=1) here
            return mapping.pad_vocab(hf[0], layout.padded_vocab_size)
        return mapping.mcore_from_hf(rule, hf, dims, tp_rank=0, tp_size=1)

    with atomic_output_dir(out_dir, overwrite, marker=META_NAME, inputs=[hf_dir]) as tmp, \
            _single_process_parallel() as state:
        mm = _meta_model(hf_config, state, dtype, layout.padded_vocab_size)
        mat = _save_model(mm, make, tmp / MODEL_SUBDIR, progress, "hf -> megatron",
                          checksums=checksums)
        _write_meta(tmp, CheckpointMeta(
            format_version=FORMAT_VERSION, converter_version=megatron_cppo.__version__,
            hf_config=hf_config.to_dict(), source_hf_dir=str(hf_dir.resolve()), tp=tp, pp=pp,
            vision_parallel=layout.vision_parallel_mode, dtype=dtype,
            padded_vocab_size=layout.padded_vocab_size, source_hf_layout=source.layout,
            **layout.pipeline_split), mat)
    return ConversionReport(mat.count, mat.bytes, time.perf_counter() - t0,
                            notes=[layout.split_note] if layout.split_note else [])


def _estimate(hf_bytes: int, dtype: str) -> int:
    """Bytes a checkpoint of ``hf_bytes`` of HF tensors needs at ``dtype`` (fp32 sources may be
    stored in bf16 and vice versa: the larger of the two, plus 5% for the format)."""
    return int(hf_bytes * (2 if dtype == "fp32" else 1) * 1.05)


def reshard(megatron_dir, out_dir, *, tp: int, pp: int, vision_parallel: Optional[str] = None,
            overwrite: bool = False, progress: bool = True,
            num_layers_in_first_pipeline_stage: Optional[int] = None,
            num_layers_in_last_pipeline_stage: Optional[int] = None,
            allow_non_finite: bool = False, checksums: bool = True) -> ConversionReport:
    """Rewrite a checkpoint for another (tp, pp) and pipeline split: the layout is validated and
    the vocabulary padding adjusted; everything else is copied chunk by chunk. Without a split,
    the source's split is kept when ``pp`` is the source's, else one is chosen if PP does not
    divide the layers. The source's checksums are verified; new ones are written."""
    from megatron_cppo.models.qwen2_5_vl import mapping

    t0 = time.perf_counter()
    src_dir, out_dir = Path(megatron_dir), Path(out_dir)
    check_output_dir(out_dir, overwrite, marker=META_NAME, inputs=[src_dir])
    src = open_checkpoint(src_dir, checksums=checksums)
    meta, hf_config = src.meta, src.hf_config
    check_output_dir(out_dir, overwrite, marker=META_NAME, inputs=[src_dir],
                     needed_bytes=integrity.total_bytes(src_dir / MODEL_SUBDIR))
    first, last = num_layers_in_first_pipeline_stage, num_layers_in_last_pipeline_stage
    if first is None and last is None and pp == meta.pp:
        first, last = meta.num_layers_in_first_pipeline_stage, \
            meta.num_layers_in_last_pipeline_stage
    layout = _resolve_layout(hf_config, tp, pp, vision_parallel or "auto", first, last)
    vocab = _dims(hf_config).text.vocab_size

    with atomic_output_dir(out_dir, overwrite, marker=META_NAME, inputs=[src_dir]) as tmp, \
            _single_process_parallel() as state:
        smm = _meta_model(hf_config, state, meta.dtype, meta.padded_vocab_size)
        src.reader.check_against(smm, meta, src_dir / META_NAME)
        dst = _meta_model(hf_config, state, meta.dtype, layout.padded_vocab_size)

        def make(name):
            t = _read_param(src.reader, smm, name)
            if not allow_non_finite:
                _check_finite(t, f"{src_dir / MODEL_SUBDIR}: tensor {name}")
            if name.endswith(("word_embeddings.weight", "output_layer.weight")):
                t = mapping.pad_vocab(mapping.unpad_vocab(t, vocab), layout.padded_vocab_size)
            return t

        mat = _save_model(dst, make, tmp / MODEL_SUBDIR, progress, "reshard",
                          checksums=checksums)
        _write_meta(tmp, dataclasses.replace(
            meta, tp=tp, pp=pp, vision_parallel=layout.vision_parallel_mode,
            padded_vocab_size=layout.padded_vocab_size,
            converter_version=megatron_cppo.__version__, extra_state=[],
            **layout.pipeline_split), mat)
    return ConversionReport(mat.count, mat.bytes, time.perf_counter() - t0,
                            notes=[layout.split_note] if layout.split_note else [])


def hf_export_name(name: str, layout: str) -> str:
    """A >= 4.52 HF name in the key layout of an export (meta.HF_LAYOUTS)."""
    from megatron_cppo.models.qwen2_5_vl import mapping

    if layout == "transformers":
        return mapping.to_old_layout(name)
    if layout == "language_model":
        return name
    raise ValueError(f"HF key layout must be one of {list(HF_LAYOUTS)}, got {layout!r}")


def megatron_to_hf(megatron_dir, out_dir, *, overwrite: bool = False, progress: bool = True,
                   max_shard_bytes: int = 5 * 1024**3, hf_layout: Optional[str] = None,
                   allow_non_finite: bool = False, checksums: bool = True) -> ConversionReport:
    """Export a checkpoint as an HF directory (sharded safetensors + index, config, generation
    config, tokenizer/processor files from the recorded source directory, and
    ``megatron_cppo_export.json`` naming the source). ``hf_layout``: key layout of the tensor names
    (meta.HF_LAYOUTS); default the source's recorded layout, else "transformers" (what
    save_pretrained and the released checkpoints write). The source's checksums are verified."""
    from tqdm import tqdm
    from transformers import GenerationConfig

    from megatron_cppo.models.qwen2_5_vl import mapping

    t0 = time.perf_counter()
    src_dir, out_dir = Path(megatron_dir), Path(out_dir)
    check_output_dir(out_dir, overwrite, marker=EXPORT_MARKER, inputs=[src_dir])
    src = open_checkpoint(src_dir, checksums=checksums)
    meta, hf_config = src.meta, src.hf_config
    layout = hf_layout or meta.source_hf_layout or "transformers"
    if layout not in HF_LAYOUTS:
        raise ConversionError(f"--hf-layout must be one of {list(HF_LAYOUTS)}, got {layout!r}")
    check_output_dir(out_dir, overwrite, marker=EXPORT_MARKER, inputs=[src_dir],
                     needed_bytes=integrity.total_bytes(src_dir / MODEL_SUBDIR))
    dims = _dims(hf_config)
    dtype = _DTYPES[meta.dtype]
    shapes = expected_hf_shapes(hf_config)
    rules = list(mapping.iter_rules(dims))
    specs = [(hf_export_name(h, layout), shapes[h], dtype) for r in rules for h in r.hf]
    written = 0

    with atomic_output_dir(out_dir, overwrite, marker=EXPORT_MARKER, inputs=[src_dir]) as tmp, \
            _single_process_parallel() as state:
        mm = _meta_model(hf_config, state, meta.dtype, meta.padded_vocab_size)
        src.reader.check_against(mm, meta, src_dir / META_NAME)
        writer = ShardedSafetensorsWriter(tmp, specs, max_shard_bytes=max_shard_bytes)
        for rule in tqdm(rules, desc="megatron -> hf", unit="tensor", disable=not progress):
            param = _read_param(src.reader, mm, rule.mcore)
            if not allow_non_finite:
                _check_finite(param, f"{src_dir / MODEL_SUBDIR}: tensor {rule.mcore}")
            for h, t in zip(rule.hf, mapping.hf_from_mcore(rule, [param], dims)):
                writer.write(hf_export_name(h, layout), t.to(dtype).contiguous())
                written += 1
        writer.close()
        hf_config.dtype = dtype  # transformers 5 (older versions read torch_dtype)
        if hasattr(hf_config, "torch_dtype") and not hasattr(type(hf_config), "torch_dtype"):
            hf_config.torch_dtype = dtype
        hf_config.save_pretrained(tmp)
        _copy_aux_files(meta.source_hf_dir, tmp)
        if not (tmp / "generation_config.json").exists():
            GenerationConfig.from_model_config(hf_config).save_pretrained(tmp)
        (tmp / EXPORT_MARKER).write_text(json.dumps(
            {"exported_from": str(src_dir.resolve()), "hf_layout": layout,
             "converter_version": megatron_cppo.__version__}, indent=2) + "\n")
    return ConversionReport(written, writer.bytes_written, time.perf_counter() - t0)


@dataclass
class CheckReport:
    directory: Path
    meta: CheckpointMeta
    checked: int  # chunks + files verified against checksums (0: the checkpoint has none)
    tensors: int  # tensors read back (without checksums: every one is deserialised)
    seconds: float


def check_checkpoint(megatron_dir, *, read_tensors: Optional[bool] = None) -> CheckReport:
    """Verify a checkpoint without building a model: metadata against the model it describes,
    stored shapes and dtypes, and the checksums of every stored chunk (all of ``model/`` and of
    extra state). A checkpoint without checksums has every tensor read back instead (which finds
    damaged files, not changed values). CheckpointError naming the first problem."""
    t0 = time.perf_counter()
    src = open_checkpoint(megatron_dir, checksums=True)
    meta = src.meta
    checked = src.checked
    if meta.extra_state:
        checked += integrity.verify(src.dir, list(meta.extra_state),
                                    expected=meta.checksums is not None, warn=False)
    tensors = 0
    with _single_process_parallel() as state:
        mm = _meta_model(src.hf_config, state, meta.dtype, meta.padded_vocab_size)
        src.reader.check_against(mm, meta, src.dir / META_NAME)
        if read_tensors or (read_tensors is None and meta.checksums is None):
            for name in mm.pieces:
                _read_param(src.reader, mm, name)
                tensors += 1
    return CheckReport(src.dir, meta, checked, tensors, time.perf_counter() - t0)


def _copy_aux_files(source: Optional[str], dest: Path) -> None:
    if not source or not Path(source).is_dir():
        print(f"note: source HF directory {source!r} is not available: tokenizer and processor "
              f"files were not copied")
        return
    for name in _AUX_FILES:
        if (Path(source) / name).is_file():
            shutil.copy2(Path(source) / name, dest / name)
