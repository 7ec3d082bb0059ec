"""The model every conversion runs on: one process, TP=1, PP=1, built on the ``meta`` device.

The global tensors of a torch_dist checkpoint do not depend on the layout that wrote them
(per-layer chunks of [layers, ...] tensors, gate/up stored separately), except the vocabulary rows,
which are padded for TP. So every operation runs in ONE process on a TP=1, PP=1 model built on the
``meta`` device: megatron's own ``sharded_state_dict()`` of it fixes the keys, shapes and chunking
exactly as training will load them, and no parameter memory is allocated.

``_single_process_parallel`` sets up megatron's parallel state for that one process (and tears it
down); ``_meta_model`` builds the model and its sharded state dict, vocabulary rows padded as
stored for the target TP; ``_resolve_layout`` validates a layout (tp, pp, vision parallel mode,
pipeline split) against the model, for the layout a checkpoint is written for or records.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from megatron_cppo.convert.hf_source import _dims
from megatron_cppo.dtypes import FLOAT_DTYPES


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
                                    Qwen25VLModelConfig(vision_parallel_mode="tp"))
    model = unwrap(chunk).to(FLOAT_DTYPES[dtype])  # the stored dtype (meta tensors: no memory)
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


def _resolve_layout(hf_config, tp: int, pp: int, vision_parallel_mode: str,
                    first: Optional[int] = None, last: Optional[int] = None):
    from megatron_cppo.models.qwen2_5_vl.config import Qwen25VLModelConfig, validate_layout
    from megatron_cppo.parallel import ParallelConfig

    return validate_layout(_dims(hf_config),
                           Qwen25VLModelConfig(vision_parallel_mode=vision_parallel_mode),
                           ParallelConfig(tensor_model_parallel_size=tp,
                                          pipeline_model_parallel_size=pp,
                                          decoder_first_pipeline_num_layers=first,
                                          decoder_last_pipeline_num_layers=last))
