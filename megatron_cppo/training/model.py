"""Build what the trainer trains: policy chunks in megatron DDP with the Megatron optimizer and
its LR schedule, and the frozen reference model.

The policy's gradients live in megatron DDP's buffers (``main_grad``, fp32), are reduced over
data-parallel ranks by ``finalize_model_grads`` at the end of each schedule call (also the tied
embedding over the first/last stage and replicated ViT weights over TP), then clipped and applied
by the Megatron optimizer (plain Adam, or sharded over data parallel with
``use_distributed_optimizer``). The vision tower trains with the language model, as in the
reference recipe.

The reference model is a second set of chunks with the start weights, never updated, not wrapped
in DDP, ``requires_grad=False``; with ``cpu_offload`` its parameters wait in CPU memory between
its passes (a no-op on CPU machines).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig
from megatron.core.optimizer import get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_cppo.models.qwen2_5_vl import (Qwen25VLModelConfig, build_qwen2_5_vl,
                                             load_hf_weights, unwrap)
from megatron_cppo.training.config import OptimizerConfig

__all__ = ["Policy", "ReferenceModel", "build_policy", "build_reference", "lr_scheduler",
           "megatron_optimizer_config", "wrap_ddp"]


@dataclass
class Policy:
    chunks: list            # DDP-wrapped model chunks (one per virtual stage)
    optimizer: Any          # megatron MegatronOptimizer
    scheduler: Any          # megatron OptimizerParamScheduler

    def raw_chunks(self) -> list:
        """The chunks without the DDP wrapper (what checkpoints and the refit read)."""
        return [c.module for c in self.chunks]


def build_policy(hf_config, state, model: Qwen25VLModelConfig, optim: OptimizerConfig, *,
                 hf_state_dict: Optional[dict] = None, total_steps: int = 1) -> Policy:
    """Policy chunks (+ HF start weights if given) in megatron DDP, the Megatron optimizer for
    the run's ``OptimizerConfig`` (training/config.py), and megatron's LR/WD schedule over
    ``total_steps`` optimizer steps."""
    chunks = build_qwen2_5_vl(hf_config, state, model)
    if hf_state_dict is not None:
        load_hf_weights(chunks, hf_state_dict, state)
    ddp = wrap_ddp(chunks, state, use_distributed_optimizer=optim.use_distributed_optimizer)
    # config_overrides: None is megatron's default (no decay of biases and 1-D parameters,
    # i.e. the norms); {} applies the config's weight decay to every parameter
    opt = get_megatron_optimizer(megatron_optimizer_config(optim, bf16=model.bf16), ddp,
                                 config_overrides={} if optim.weight_decay_all_params else None,
                                 use_gloo_process_groups=False,
                                 pg_collection=state.pg_collection)
    return Policy(chunks=ddp, optimizer=opt,
                  scheduler=lr_scheduler(opt, optim, total_steps=total_steps))


def megatron_optimizer_config(optim: OptimizerConfig, *, bf16: bool) -> MegatronOptimizerConfig:
    """megatron-core's optimizer config for the run's (Adam, clipping, bf16 mixed precision)."""
    return MegatronOptimizerConfig(
        optimizer="adam", lr=optim.lr, min_lr=optim.min_lr, weight_decay=optim.weight_decay,
        adam_beta1=optim.adam_beta1, adam_beta2=optim.adam_beta2, adam_eps=optim.adam_eps,
        clip_grad=optim.clip_grad, bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_distributed_optimizer=optim.use_distributed_optimizer)


def lr_scheduler(optimizer, optim: OptimizerConfig, *, total_steps: int
                 ) -> OptimizerParamScheduler:
    """megatron's LR / weight-decay schedule: linear warm-up over ``lr_warmup_iters``, then
    ``lr_decay_style`` over ``lr_decay_iters`` (default: every optimizer step of the run)."""
    decay_steps = optim.lr_decay_iters or total_steps
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0 if optim.lr_warmup_iters else optim.lr, max_lr=optim.lr,
        min_lr=optim.min_lr, lr_warmup_steps=optim.lr_warmup_iters,
        lr_decay_steps=max(decay_steps, optim.lr_warmup_iters + 1),
        lr_decay_style=optim.lr_decay_style, start_wd=optim.weight_decay,
        end_wd=optim.weight_decay, wd_incr_steps=max(total_steps, 1),
        wd_incr_style="constant")


def wrap_ddp(chunks: Sequence[torch.nn.Module], state, *,
             use_distributed_optimizer: bool = False) -> list:
    """The chunks in megatron DDP as the trainer trains them: contiguous fp32 gradient buffers
    (``main_grad``), reduced over data parallel by ``finalize_model_grads`` after the schedule."""
    tconfig = unwrap(chunks[0]).config
    tconfig.finalize_model_grads_func = finalize_model_grads
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False,
        use_distributed_optimizer=use_distributed_optimizer)
    return [DistributedDataParallel(tconfig, ddp_config, c, pg_collection=state.pg_collection,
                                    disable_bucketing=i > 0) for i, c in enumerate(chunks)]


class ReferenceModel:
    """Frozen copy of the start weights for the KL term; optionally parked in CPU memory."""

    def __init__(self, chunks: Sequence[torch.nn.Module], device: torch.device,
                 cpu_offload: bool = False):
        self.chunks = list(chunks)
        self.device = device
        self.cpu_offload = cpu_offload and device.type != "cpu"
        for c in self.chunks:
            c.eval()
            c.requires_grad_(False)
        if self.cpu_offload:
            self._move(torch.device("cpu"))

    def _move(self, device: torch.device) -> None:
        for c in self.chunks:
            c.to(device)

    def __enter__(self) -> list:
        if self.cpu_offload:
            self._move(self.device)
        return self.chunks

    def __exit__(self, *exc) -> None:
        if self.cpu_offload:
            self._move(torch.device("cpu"))
            torch.cuda.empty_cache()


def build_reference(hf_config, state, model: Qwen25VLModelConfig, *,
                    hf_state_dict: Optional[dict] = None,
                    from_chunks: Optional[Sequence[torch.nn.Module]] = None,
                    cpu_offload: bool = False) -> ReferenceModel:
    """The reference model: the HF weights, or a copy of ``from_chunks``' current weights (the
    policy right after loading its start checkpoint: nothing is read again)."""
    chunks = build_qwen2_5_vl(hf_config, state, model)
    if hf_state_dict is not None:
        load_hf_weights(chunks, hf_state_dict, state)
    elif from_chunks is not None:
        with torch.no_grad():
            for dst, src in zip(chunks, from_chunks):
                dst.load_state_dict(src.state_dict(), strict=True)
    else:
        raise ValueError("build_reference needs hf_state_dict or from_chunks")
    return ReferenceModel(chunks, state.device, cpu_offload=cpu_offload)
