"""Build this rank's Qwen2.5-VL model chunk(s) and move HF weights in and out of them.

    state = initialize_parallel(ParallelConfig(tensor_model_parallel_size=2, ...))
    chunks = build_qwen2_5_vl("/path/to/Qwen2.5-VL-3B-Instruct", state,
                              Qwen25VLModelConfig(vision_parallel_mode="auto"))
    load_hf_weights(chunks, read_hf_state_dict("/path/to/Qwen2.5-VL-3B-Instruct"), state)

``chunks`` has one module per virtual pipeline stage (one without VPP). In bf16 each chunk is a
``HalfPrecisionModule`` (megatron's Float16Module returning logits in bf16: no fp32 copy of the full
logits). Names and tensor transforms all come from ``mapping.py``.
"""

from __future__ import annotations

import dataclasses
import glob
import os
from typing import Any, Mapping, Optional, Sequence

import torch
import torch.distributed as dist
from megatron.core.transformer.module import Float16Module

from megatron_cppo.models.qwen2_5_vl import mapping
from megatron_cppo.models.qwen2_5_vl.config import (
    Qwen25VLDims,
    Qwen25VLModelConfig,
    language_transformer_config,
    load_hf_config,
    projector_transformer_config,
    validate_layout,
    vision_transformer_config,
)
from megatron_cppo.models.qwen2_5_vl.model import Qwen25VLModel
from megatron_cppo.parallel.state import ParallelState
from megatron_cppo.models.qwen2_5_vl.vision_dp import singleton_group


class HalfPrecisionModule(Float16Module):
    """megatron's Float16Module with ``fp32_output=False`` by default: the loss head reads bf16
    vocab-sharded logits and upcasts chunk by chunk (an fp32 copy of [T, V/TP] is what OOMs)."""

    def forward(self, *inputs, fp32_output: bool = False, **kwargs):
        return super().forward(*inputs, fp32_output=fp32_output, **kwargs)


def unwrap(chunk: torch.nn.Module) -> Qwen25VLModel:
    """The ``Qwen25VLModel`` inside DDP / Float16Module wrappers."""
    while not isinstance(chunk, Qwen25VLModel):
        if not hasattr(chunk, "module"):
            raise TypeError(f"{type(chunk).__name__} does not wrap a Qwen25VLModel")
        chunk = chunk.module
    return chunk


def _vision_pg_collection(state: ParallelState, mode: str):
    if mode == "tp":
        return state.pg_collection
    # dp_in_tp: megatron's TP layers over a one-rank group, i.e. whole (replicated) weights.
    from megatron.core.process_groups_config import ProcessGroupCollection

    pgc = ProcessGroupCollection()
    for f in dataclasses.fields(ProcessGroupCollection):
        if hasattr(state.pg_collection, f.name):
            setattr(pgc, f.name, getattr(state.pg_collection, f.name))
    pgc.tp = singleton_group()
    return pgc


def mark_tensor_parallel_weights(model: torch.nn.Module) -> None:
    """Tag the weights of megatron's TP layers ``tensor_model_parallel`` (with partition_dim).

    megatron sets these attributes only when it initialises a weight itself
    (``perform_initialization``); the builder loads weights instead. Without them the optimizer's
    grad norm counts every TP-sharded weight as a duplicate held by TP rank 0 only (at TP 2 the
    norm came out ~0.71 of the true one, measured) and clipping is wrong. Weights already tagged
    (the replicated ViT in dp_in_tp mode, ``vision_dp.mark_replicated``) are left alone."""
    from megatron.core.tensor_parallel.layers import (
        ColumnParallelLinear,
        RowParallelLinear,
        VocabParallelEmbedding,
        set_tensor_model_parallel_attributes,
    )

    for module in model.modules():
        if isinstance(module, (ColumnParallelLinear, VocabParallelEmbedding)):
            dim = 0
        elif isinstance(module, RowParallelLinear):
            dim = 1
        else:
            continue
        weight = getattr(module, "weight", None)
        if weight is not None and not hasattr(weight, "tensor_model_parallel"):
            set_tensor_model_parallel_attributes(weight, True, dim, 1)


def build_qwen2_5_vl(hf_config: Any, state: ParallelState,
                     settings: Optional[Qwen25VLModelConfig] = None) -> list[torch.nn.Module]:
    """This rank's model chunks (one per virtual pipeline stage) for an HF Qwen2.5-VL config
    (directory, config.json, dict or ``Qwen2_5_VLConfig``). Raises ValueError for unsupported
    layouts before building anything."""
    settings = settings or Qwen25VLModelConfig()
    dims = Qwen25VLDims.from_hf(load_hf_config(hf_config))
    layout = validate_layout(dims, settings, state.config)
    if layout.split_note and state.rank == 0:
        print(f"note: {layout.split_note}", flush=True)
    lm_config = language_transformer_config(dims, settings, state.config, layout)
    vit_config = projector_config = vision_pgc = None
    if state.is_first_stage:
        vit_config = vision_transformer_config(dims, settings, state.config, layout)
        projector_config = projector_transformer_config(dims, settings, state.config, layout)
        vision_pgc = _vision_pg_collection(state, layout.vision_parallel_mode)
    vpp = state.vpp_size or 1
    chunks = []
    for vp in range(vpp):
        pre = state.is_first_stage and vp == 0
        post = state.is_last_stage and vp == vpp - 1
        model = Qwen25VLModel(
            dims=dims, layout=layout, lm_config=lm_config,
            vit_config=vit_config if pre else None,
            projector_config=projector_config if pre else None,
            pre_process=pre, post_process=post, pg_collection=state.pg_collection,
            vision_pg_collection=vision_pgc if pre else None,
            vp_stage=vp if state.vpp_size else None, attention=settings.attention)
        # megatron allocates TP layers on the GPU unless use_cpu_initialization; the torch norms
        # and the patch embedding follow here (as megatron's get_model does)
        model.to(state.device)
        if not settings.perform_initialization:
            mark_tensor_parallel_weights(model)
        if settings.dtype == "bf16":
            model = HalfPrecisionModule(lm_config, model)
        chunks.append(model)
    return chunks


# ----------------------------------------------------------------------------------------------
# weights in


def read_hf_state_dict(path: str) -> dict[str, torch.Tensor]:
    """All tensors of an HF checkpoint directory (safetensors shards, or pytorch_model*.bin)."""
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    out: dict[str, torch.Tensor] = {}
    if files:
        from safetensors.torch import load_file

        for f in files:
            out.update(load_file(f))
        return out
    for f in sorted(glob.glob(os.path.join(path, "pytorch_model*.bin"))):
        out.update(torch.load(f, map_location="cpu", weights_only=True))
    if not out:
        raise FileNotFoundError(f"no *.safetensors or pytorch_model*.bin under {path}")
    return out


def load_hf_weights(chunks: Sequence[torch.nn.Module], hf_state_dict: Mapping[str, torch.Tensor],
                    state: ParallelState) -> set[str]:
    """Copy this rank's shard of every parameter from a full HF state dict (either key layout).

    Every parameter of the chunks must be covered (KeyError naming it otherwise). Returns the HF
    names used (>= 4.52 layout): the union over all ranks is the whole checkpoint."""
    hf_sd = mapping.normalize_hf_state_dict(hf_state_dict)
    used: set[str] = set()
    for chunk in chunks:
        model = unwrap(chunk)
        params = {model.global_param_name(local): p for local, p in model.named_parameters()}
        tensors = mapping.hf_to_mcore(hf_sd, model.dims, tp_rank=state.tp_rank,
                                      tp_size=state.tp_size,
                                      vision_tp_size=model.layout.vision_tp_size,
                                      names=list(params))
        table = mapping.rule_table(model.dims)
        for name, param in params.items():
            tensor = tensors[name]
            if tensor.shape != param.shape:
                raise ValueError(f"{name}: HF gives shape {tuple(tensor.shape)}, the parameter is "
                                 f"{tuple(param.shape)}")
            with torch.no_grad():
                param.copy_(tensor)
            used.update(table[name].hf)
    return used


# ----------------------------------------------------------------------------------------------
# weights (or gradients) out


def local_mcore_tensors(chunks: Sequence[torch.nn.Module], *, grads: bool = False
                        ) -> dict[str, torch.Tensor]:
    """This rank's parameters (or gradients: ``main_grad`` if present, else ``grad``) under
    global megatron names, detached on the CPU."""
    out = {}
    for chunk in chunks:
        model = unwrap(chunk)
        for local, param in model.named_parameters():
            t = param
            if grads:
                t = getattr(param, "main_grad", None)
                t = param.grad if t is None else t
                if t is None:
                    raise ValueError(f"parameter {local!r} has no gradient")
            out[model.global_param_name(local)] = t.detach().cpu()
    return out


def export_hf_state_dict(chunks: Sequence[torch.nn.Module], state: ParallelState, *,
                         grads: bool = False) -> dict[str, torch.Tensor]:
    """The full HF state dict (>= 4.52 layout) on every rank: TP shards gathered and merged, PP
    stages joined. For tests and small models (every rank holds everything; the converter streams
    instead). With ``grads``: gradients in HF layout; reduce them first as training would (tied
    embedding copies over the embedding group, replicated ViT over TP)."""
    mine = local_mcore_tensors(chunks, grads=grads)
    dims = unwrap(chunks[0]).dims
    vision_tp = unwrap(chunks[0]).layout.vision_tp_size
    per_tp: list = [None] * state.tp_size
    dist.all_gather_object(per_tp, mine, group=state.tp_group)
    stage = mapping.mcore_to_hf(per_tp, dims, vision_tp_size=vision_tp)
    per_pp: list = [None] * state.pp_size
    dist.all_gather_object(per_pp, stage, group=state.pp_group)
    out: dict[str, torch.Tensor] = {}
    for part in per_pp:
        out.update(part)
    return out
