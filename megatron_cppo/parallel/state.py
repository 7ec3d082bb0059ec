"""Parallel setup in one place: torch.distributed + megatron-core model parallelism.

``initialize_parallel(ParallelConfig)`` is the only function in megatron_cppo that reads megatron's
global ``parallel_state``; it returns a ``ParallelState`` holding every process group the rest of the
code needs, which is passed explicitly (helpers never look groups up themselves).

Backend: gloo without CUDA (the CPU platform layer is activated first), nccl with CUDA.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist

from megatron_cppo import platform
from megatron_cppo.options import bad, check_int, option


@dataclass(kw_only=True)
class ParallelConfig:
    """Model-parallel layout (Megatron-LM's flag names). Data parallel size is what is left of the
    world size. The option fields are trainer and converter flags; the others are set by code."""

    tensor_model_parallel_size: int = option(1, "tensor-parallel ranks (Megatron TP)")
    pipeline_model_parallel_size: int = option(1, "pipeline stages (Megatron PP)")
    # Uneven pipeline split: the first stage also runs the ViT, so it may hold fewer LM layers.
    # Both None and PP not dividing the layers: the model chooses a split and says which
    # (models/qwen2_5_vl/config.validate_layout).
    decoder_first_pipeline_num_layers: Optional[int] = option(
        None, "language-model layers on the first stage (which also runs the ViT)")
    decoder_last_pipeline_num_layers: Optional[int] = option(
        None, "language-model layers on the last stage")
    # Pipeline p2p: megatron batches the sends/receives of one step into one call by default.
    batch_p2p_comm: bool = option(True, "batch the pipeline send/receive calls of one step")
    distributed_timeout_minutes: int = option(30, "collective timeout")
    virtual_pipeline_model_parallel_size: Optional[int] = None
    context_parallel_size: int = 1
    sequence_parallel: bool = False
    overlap_p2p_comm: bool = False

    def __post_init__(self):
        for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size",
                     "distributed_timeout_minutes"):
            check_int(self, name, 1)
        for name in ("decoder_first_pipeline_num_layers", "decoder_last_pipeline_num_layers"):
            check_int(self, name, 1, optional=True)
            if getattr(self, name) is not None and self.pipeline_model_parallel_size == 1:
                raise bad(name, "needs --pipeline-model-parallel-size > 1")
        # the settings below are not flags: their errors name the field
        vpp = self.virtual_pipeline_model_parallel_size
        if vpp is not None:
            if not isinstance(vpp, int) or isinstance(vpp, bool) or vpp < 1:
                raise ValueError(f"virtual_pipeline_model_parallel_size must be a positive integer "
                                 f"or None, got {vpp!r}")
            if self.pipeline_model_parallel_size == 1:
                raise ValueError("virtual_pipeline_model_parallel_size needs "
                                 "pipeline_model_parallel_size > 1")
            if self.decoder_first_pipeline_num_layers is not None \
                    or self.decoder_last_pipeline_num_layers is not None:
                raise ValueError("an uneven pipeline split (decoder_first/last_pipeline_num_layers) "
                                 "is not supported with virtual pipeline parallelism")
            if self.pipeline_model_parallel_size == 2 and self.batch_p2p_comm \
                    and not self.overlap_p2p_comm:
                # At PP=2 the previous and next stage are the same peer: one batched p2p call then
                # holds two sends and two receives between the same two ranks, which megatron-core
                # matches in the wrong order, giving silently wrong gradients (measured on gloo;
                # docs/cpu-platform.md). megatron.training refuses it; megatron.core does not.
                raise ValueError(
                    "virtual_pipeline_model_parallel_size with pipeline_model_parallel_size 2 and "
                    "batch_p2p_comm=True gives silently wrong gradients in megatron-core; set "
                    "batch_p2p_comm=False (--no-batch-p2p-comm), or use "
                    "pipeline_model_parallel_size > 2")
        if self.context_parallel_size != 1:
            raise ValueError("context_parallel_size > 1 is not supported: image tokens would be "
                             "split from their sequence before the vision features are spliced in")
        if self.sequence_parallel and self.tensor_model_parallel_size == 1:
            raise ValueError("sequence_parallel needs tensor_model_parallel_size > 1")

    @property
    def pipeline_split(self) -> dict:
        """The split as keyword arguments of this config (for ``dataclasses.replace``)."""
        return dict(decoder_first_pipeline_num_layers=self.decoder_first_pipeline_num_layers,
                    decoder_last_pipeline_num_layers=self.decoder_last_pipeline_num_layers)

    @property
    def model_parallel_size(self) -> int:
        return self.tensor_model_parallel_size * self.pipeline_model_parallel_size


@dataclass
class ParallelState:
    """Process groups and coordinates of this rank. Built by ``initialize_parallel``."""

    config: ParallelConfig
    world_size: int
    rank: int
    device: torch.device
    tp_group: dist.ProcessGroup
    pp_group: dist.ProcessGroup
    dp_group: dist.ProcessGroup
    dp_group_gloo: Optional[dist.ProcessGroup]
    mp_group: dist.ProcessGroup
    embedding_group: Optional[dist.ProcessGroup]
    tp_rank: int
    tp_size: int
    pp_rank: int
    pp_size: int
    dp_rank: int
    dp_size: int
    vpp_size: Optional[int]
    # megatron-core's own collection of the same groups, for modules that take `pg_collection`.
    pg_collection: object = field(default=None, repr=False)

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1


def check_model_divisibility(parallel: ParallelConfig, *, num_layers: int,
                             num_attention_heads: int, num_query_groups: int,
                             ffn_hidden_size: Optional[int] = None, what: str = "model") -> None:
    """Raise ValueError naming the setting when a model cannot be split into this layout."""
    tp, pp = parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size
    vpp = parallel.virtual_pipeline_model_parallel_size or 1
    checks = [
        (num_query_groups, "num_query_groups"),
        (num_attention_heads, "num_attention_heads"),
    ]
    if ffn_hidden_size is not None:
        checks.append((ffn_hidden_size, "ffn_hidden_size"))
    for value, name in checks:
        if value % tp:
            raise ValueError(f"tensor-model-parallel-size {tp} does not divide {name} {value} "
                             f"of the {what}")
    if num_layers < pp * vpp:
        raise ValueError(f"pipeline-model-parallel-size {pp} (x virtual {vpp}) is larger than "
                         f"num_layers {num_layers} of the {what}")


def _init_process_group(timeout_minutes: int) -> None:
    if dist.is_initialized():
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend,
                            timeout=datetime.timedelta(minutes=timeout_minutes))


def initialize_parallel(config: ParallelConfig, *, seed: int = 1234) -> ParallelState:
    """Initialise torch.distributed (from the torchrun env:// variables) and megatron-core model
    parallelism for ``config``; seed megatron's RNG tracker with ``seed`` (the run's). Returns the
    explicit groups."""
    platform.activate()  # no-op with CUDA
    _init_process_group(config.distributed_timeout_minutes)
    world = dist.get_world_size()
    if world % config.model_parallel_size:
        raise ValueError(
            f"world size {world} is not divisible by tensor-model-parallel-size "
            f"{config.tensor_model_parallel_size} x pipeline-model-parallel-size "
            f"{config.pipeline_model_parallel_size}")

    from megatron.core import parallel_state as mpu
    from megatron.core import tensor_parallel
    from megatron.core.process_groups_config import ProcessGroupCollection

    mpu.initialize_model_parallel(
        tensor_model_parallel_size=config.tensor_model_parallel_size,
        pipeline_model_parallel_size=config.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=config.virtual_pipeline_model_parallel_size,
        distributed_timeout_minutes=config.distributed_timeout_minutes,
    )
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    device = (torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available()
              else torch.device("cpu"))
    return ParallelState(
        config=config,
        world_size=world,
        rank=dist.get_rank(),
        device=device,
        tp_group=mpu.get_tensor_model_parallel_group(),
        pp_group=mpu.get_pipeline_model_parallel_group(),
        dp_group=mpu.get_data_parallel_group(),
        dp_group_gloo=mpu.get_data_parallel_group_gloo(),
        mp_group=mpu.get_model_parallel_group(),
        embedding_group=mpu.get_embedding_group(check_initialized=False),
        tp_rank=mpu.get_tensor_model_parallel_rank(),
        tp_size=mpu.get_tensor_model_parallel_world_size(),
        pp_rank=mpu.get_pipeline_model_parallel_rank(),
        pp_size=mpu.get_pipeline_model_parallel_world_size(),
        dp_rank=mpu.get_data_parallel_rank(),
        dp_size=mpu.get_data_parallel_world_size(),
        vpp_size=config.virtual_pipeline_model_parallel_size,
        pg_collection=ProcessGroupCollection.use_mpu_process_groups(),
    )


def destroy_parallel(*, keep_process_group: bool = False) -> None:
    """Tear down megatron's groups and, unless ``keep_process_group`` (to initialise another
    layout in the same processes), the default process group. Safe to call twice."""
    from megatron.core import parallel_state as mpu

    mpu.destroy_model_parallel()
    if dist.is_initialized() and not keep_process_group:
        dist.barrier()
        dist.destroy_process_group()
