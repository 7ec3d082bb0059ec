"""Build a complete run: ``build_run(cfg, start, state, make_plugins, rollout=...) -> Run``.

The run's pieces are built once, in this order (the order fixes every random draw of a run, so it
is part of the numerics contract):

    seed -> policy (+ the HF start weights) -> monitor -> plug-ins (datasets, the rollout
    engine; not for ``megatron-cppo sft``) -> the checkpoint of ``--load`` (weights, optimizer,
    counters, data position, RNG) -> the reference model (with --kl-coef > 0) -> the Trainer

``make_plugins(cfg, start, state) -> Plugins`` gives the plug-ins: ``default_plugins`` (the
vLLM engine, the prompt datasets, the reward) for real runs, recorded ones in tests. Nothing here
reads the start point again: ``start`` (training/start.py) carries the metadata and trainer
state, and a reference that starts from the loaded checkpoint is a copy of the loaded policy.
"""

from __future__ import annotations

import dataclasses
import os
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from megatron_cppo.checkpoint import load_megatron_checkpoint
from megatron_cppo.data import PromptDataset, load_processor
from megatron_cppo.models.qwen2_5_vl import (MRopeIndexConfig, build_qwen2_5_vl,
                                             read_hf_state_dict)
from megatron_cppo.rewards import load_reward_fn
from megatron_cppo.rollout.config import RolloutConfig
from megatron_cppo.rollout.source import VLLMRolloutSource
from megatron_cppo.training import checkpoint as ckpt
from megatron_cppo.training.config import TrainConfig
from megatron_cppo.training.model import Policy, ReferenceModel, build_policy, build_reference
from megatron_cppo.training.monitor import Monitor, run_summary
from megatron_cppo.training.plugins import Plugins, reward_fn_from
from megatron_cppo.training.start import Start
from megatron_cppo.training.trainer import Trainer, TrainerState
from megatron_cppo.training.update import UpdateContext

__all__ = ["Run", "build_run", "default_plugins", "engine_config"]

MakePlugins = Callable[[TrainConfig, Start, Any], Plugins]


@dataclass
class Run:
    """Everything a run's phases use (training/run.py). ``plugins`` and ``trainer`` are None for
    ``megatron-cppo sft`` (no rollout engine)."""

    cfg: TrainConfig
    start: Start
    state: Any                      # ParallelState
    policy: Policy
    monitor: Monitor
    ctx: UpdateContext
    processor: Any                  # the model directory's processor (None if nothing needs it)
    plugins: Optional[Plugins] = None
    reference: Optional[ReferenceModel] = None
    trainer: Optional[Trainer] = None
    counters: TrainerState = dataclasses.field(default_factory=TrainerState)

    def close(self) -> None:
        """The closing summary line and curves, then the engine."""
        try:
            summary = run_summary(self.monitor.history)
            if summary is not None:
                self.monitor.print(summary)
            png = self.monitor.close()
            if png is not None:
                self.monitor.print(f"curves: {png}")
        finally:
            if self.plugins is not None:
                self.plugins.close()


def build_run(cfg: TrainConfig, start: Start, state, make_plugins: MakePlugins, *,
              rollout: bool = True) -> Run:
    """Collective. ``rollout``: build the plug-ins and the Trainer (False: the warm start alone,
    for ``megatron-cppo sft``). See the module docstring for the order."""
    torch.manual_seed(cfg.training.seed)
    hf_sd = read_hf_state_dict(start.hf_dir) if start.checkpoint is None else None
    policy = build_policy(start.hf_config, state, cfg.model, cfg.optimizer, hf_state_dict=hf_sd,
                          total_steps=cfg.training.train_iters * cfg.mini_batches_per_step)
    monitor = _monitor(cfg, state)
    plugins = None
    try:
        plugins = make_plugins(cfg, start, state) if rollout else None
        processor = plugins.processor if plugins is not None else None
        warm_start = cfg.warm_start.warm_start_iters and start.checkpoint is None
        if processor is None and (warm_start or plugins is None):
            processor = load_processor(start.hf_dir)
        valid_vocab = plugins.valid_vocab if plugins is not None else len(processor.tokenizer)
        ctx = UpdateContext.from_config(cfg, state=state,
                                        rope_cfg=MRopeIndexConfig.from_hf(start.hf_config),
                                        valid_vocab=valid_vocab)
        run = Run(cfg=cfg, start=start, state=state, policy=policy, monitor=monitor, ctx=ctx,
                  processor=processor, plugins=plugins)
        for line in start.notes + (plugins.prompts.reports() + plugins.reports if plugins else []):
            monitor.print(line)
        if start.checkpoint is not None:
            restored = ckpt.load_checkpoint(start, policy=policy, state=state,
                                            counters=run.counters,
                                            prompts=plugins.prompts if plugins else None)
            monitor.print(f"loaded {restored}")
        if plugins is None:
            return run
        if cfg.loss.kl_coef > 0:
            run.reference = _reference(cfg, start, state, policy, hf_sd)
        run.trainer = Trainer(cfg=cfg, state=state, policy=policy, reference=run.reference,
                              plugins=plugins, ctx=ctx, counters=run.counters,
                              start=start.reference, logger=monitor)
        monitor.print(
            f"Qwen2.5-VL CPPO: world {state.world_size} = tp {state.tp_size} x pp {state.pp_size}"
            f" x dp {state.dp_size}; {cfg.rollout.rollout_batch_size} prompts x "
            f"{cfg.rollout.n_samples_per_prompt} responses per step, "
            f"{cfg.mini_batches_per_step} optimizer step(s) per rollout step")
        return run
    except BaseException:
        monitor.close()
        if plugins is not None:
            plugins.close()
        raise


def _monitor(cfg: TrainConfig, state) -> Monitor:
    # sft's --save must not exist until its checkpoint is complete: logs go elsewhere
    log_dir = cfg.logging.log_dir or (None if cfg.warm_start.sft_only else cfg.checkpoint.save) \
        or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))
    return Monitor(log_dir=log_dir, enabled=state.rank == 0,
                   tensorboard_dir=cfg.logging.tensorboard_dir,
                   wandb_project=cfg.logging.wandb_project,
                   wandb_name=cfg.logging.wandb_exp_name, config=cfg.to_flat_dict(),
                   progress=cfg.logging.progress, total_steps=cfg.training.train_iters)


def _reference(cfg: TrainConfig, start: Start, state, policy: Policy,
               hf_sd: Optional[dict]) -> ReferenceModel:
    """The frozen reference model with the run's start weights (``start.reference``)."""
    where, offload = start.reference, cfg.training.reference_cpu_offload
    if where["kind"] == "hf":
        if where["path"] is None:
            raise ValueError("--hf-dir: the reference model needs the start weights")
        return build_reference(start.hf_config, state, cfg.model,
                               hf_state_dict=hf_sd if hf_sd is not None
                               else read_hf_state_dict(where["path"]), cpu_offload=offload)
    if start.reference_is_loaded_checkpoint:  # the policy holds exactly these weights
        return build_reference(start.hf_config, state, cfg.model,
                               from_chunks=policy.raw_chunks(), cpu_offload=offload)
    chunks = build_qwen2_5_vl(start.hf_config, state, cfg.model)  # a resumed run's start
    load_megatron_checkpoint(chunks, where["path"], state)
    return ReferenceModel(chunks, state.device, cpu_offload=offload)


# ----------------------------------------------------------------------------------------------
# the real plug-ins


def engine_config(cfg: TrainConfig, hf_dir: str, *, max_num_seqs: int) -> RolloutConfig:
    """The rollout config of a run with what the run implies filled in: the model directory, the
    weights' dtype (--bf16 or fp32), the longest sequence (prompt + response) and the seed."""
    default_share = RolloutConfig.__dataclass_fields__["rollout_gpu_memory_utilization"].default
    if cfg.rollout.rollout_gpu_memory_utilization != default_share \
            and not torch.cuda.is_available():
        warnings.warn("--rollout-gpu-memory-utilization has no effect without a GPU (vLLM's CPU "
                      "KV cache is sized by VLLM_CPU_KVCACHE_SPACE)", stacklevel=2)
    return dataclasses.replace(
        cfg.rollout, model_path=hf_dir, dtype="bfloat16" if cfg.model.bf16 else "float32",
        max_model_len=cfg.data.max_prompt_length + cfg.rollout.max_response_length,
        max_num_seqs=max_num_seqs, seed=cfg.training.seed)


def default_plugins(cfg: TrainConfig, start: Start, state, *, engine_target=None) -> Plugins:
    """The plug-ins of a real run.

    * prompts: ``PromptDataset`` over ``--data-path`` with the processor of the model directory
      (its tokenizer, chat template and image-size bounds are what vLLM uses too, so the prompt
      ids agree; the rollout checks it), seeded by ``--seed`` (every rank builds the same
      stream), with the I+ / I- views when the CPL is on;
    * validation: the first ``--eval-iters`` usable rows (default all) of ``--val-data-path``,
      clean views, each row once;
    * reward: ``megatron_cppo.rewards.load_reward_fn()`` (0.9 x accuracy + 0.1 x format);
    * rollout: ``VLLMRolloutSource`` (rank 0 owns the engine process), or the running engine at
      ``engine_target`` (tests share one engine between runs).
    """
    if start.hf_dir is None:
        raise ValueError("--hf-dir: the vLLM rollout engine needs the model's Hugging Face "
                         "directory (tokenizer, processor, architecture)")
    data, seed = cfg.data, cfg.training.seed
    if data.data_path is None:
        raise ValueError("--data-path: needed (python -m megatron_cppo.data.builtin --out DIR "
                         "writes the built-in dataset)")
    processor = load_processor(start.hf_dir)
    prompts = PromptDataset(data.data_path, processor, data, seed=seed, shuffle=True,
                            perturb=cfg.loss.cpl_coef > 0, scan=start.train_scan)
    if prompts.num_kept < cfg.rollout.rollout_batch_size:
        raise ValueError(f"--rollout-batch-size: {cfg.rollout.rollout_batch_size} exceeds the "
                         f"{prompts.num_kept} usable rows of {data.data_path}")
    val_prompts, reports = None, []
    if data.val_data_path is not None:
        val = PromptDataset(data.val_data_path, processor, data, seed=seed, shuffle=False,
                            perturb=False)
        val_prompts = val.epoch_items(cfg.eval.eval_iters)  # each row once, skips not refilled
        reports = val.reports()
    n_seqs = max(cfg.rollout.rollout_batch_size * cfg.rollout.n_samples_per_prompt,
                 len(val_prompts or []) * cfg.eval.eval_n_samples)
    rollout = VLLMRolloutSource(engine_config(cfg, start.hf_dir, max_num_seqs=min(n_seqs, 256)),
                                state, engine_target=engine_target)
    return Plugins(prompts=prompts, rollout=rollout, reward_fn=reward_fn_from(load_reward_fn()),
                   valid_vocab=rollout.valid_vocab, val_prompts=val_prompts, processor=processor,
                   reports=reports)
