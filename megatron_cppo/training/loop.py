"""The run: build everything for a ``TrainConfig``, loop ``train_step``, evaluate, save, close.

``run(cfg, make_plugins)`` is what ``megatron_cppo.train`` calls with the real plug-ins (the vLLM
rollout engine, the dataset, the reward); tests call it with recorded ones. ``make_plugins`` is
called once parallelism and the policy exist: ``make_plugins(cfg, state, hf_config) -> Plugins``.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch

from megatron_cppo.training import checkpoint as ckpt
from megatron_cppo.training.config import TrainConfig, check_world
from megatron_cppo.training.monitor import Monitor, run_summary
from megatron_cppo.training.trainer import PromptSource, RewardFn, RolloutSource, Trainer

__all__ = ["Plugins", "run"]


@dataclass
class Plugins:
    rollout: RolloutSource
    prompts: PromptSource
    reward_fn: RewardFn
    valid_vocab: int                             # tokenizer vocabulary size
    val_prompts: Optional[Sequence[Any]] = None  # validation prompt items


def _hf_config(cfg: TrainConfig):
    from megatron_cppo.models.qwen2_5_vl import load_hf_config

    if cfg.model.hf_dir is not None:
        return load_hf_config(cfg.model.hf_dir)
    if cfg.checkpoint.load is not None:
        return load_hf_config(ckpt.read_meta(ckpt.find_checkpoint(cfg.checkpoint.load)).hf_config)
    raise ValueError("--hf-dir: needed (or --load with a checkpoint that records the model)")


def run(cfg: TrainConfig, make_plugins: Callable[..., Plugins]) -> list[dict]:
    """Train; returns the per-step metrics (on every rank)."""
    from megatron_cppo.models.qwen2_5_vl import MRopeIndexConfig, read_hf_state_dict
    from megatron_cppo.parallel import ParallelConfig, destroy_parallel, initialize_parallel
    from megatron_cppo.training.model import build_policy, model_settings

    state = initialize_parallel(ParallelConfig(
        tensor_model_parallel_size=cfg.parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=cfg.parallel.pipeline_model_parallel_size,
        batch_p2p_comm=cfg.parallel.batch_p2p_comm, seed=cfg.optimizer.seed,
        distributed_timeout_minutes=cfg.parallel.distributed_timeout_minutes))
    monitor = None
    plugins = None
    try:
        check_world(cfg, state.world_size)
        torch.manual_seed(cfg.optimizer.seed)
        hf_config = _hf_config(cfg)
        settings = model_settings(cfg)
        total_steps = cfg.optimizer.train_iters * cfg.mini_batches_per_step
        hf_sd = read_hf_state_dict(cfg.model.hf_dir) \
            if cfg.model.hf_dir is not None and cfg.checkpoint.load is None else None
        policy = build_policy(hf_config, state, settings, cfg.optimizer,
                              use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
                              hf_state_dict=hf_sd, total_steps=total_steps)
        # sft's --save must not exist until its checkpoint is complete: logs go elsewhere
        log_dir = cfg.logging.log_dir or (None if cfg.data.sft_only else cfg.checkpoint.save) \
            or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))
        monitor = Monitor(log_dir=log_dir, enabled=state.rank == 0,
                          tensorboard_dir=cfg.logging.tensorboard_dir,
                          wandb_project=cfg.logging.wandb_project,
                          wandb_name=cfg.logging.wandb_exp_name, config=cfg.to_flat_dict(),
                          progress=cfg.logging.progress, total_steps=cfg.optimizer.train_iters)
        if cfg.data.sft_only:
            return _sft_only(cfg, policy, state, hf_config, monitor)
        plugins = make_plugins(cfg, state, hf_config)
        trainer = Trainer(cfg=cfg, state=state, policy=policy, reference=None,
                          rollout=plugins.rollout, prompts=plugins.prompts,
                          reward_fn=plugins.reward_fn, rope_cfg=MRopeIndexConfig.from_hf(hf_config),
                          valid_vocab=plugins.valid_vocab, logger=monitor)
        # the start weights (HF or a megatron checkpoint: converted, warm-started) are also the
        # frozen reference; a resumed run finds them in its checkpoint's record
        start = {"kind": "hf", "path": cfg.model.hf_dir}
        if cfg.checkpoint.load is not None:
            restored = ckpt.load_checkpoint(cfg.checkpoint.load, policy=policy, state=state,
                                            counters=trainer.counters, prompts=plugins.prompts,
                                            load_optimizer=not cfg.checkpoint.no_load_optim)
            start = restored.get("start") or {"kind": "megatron", "path": restored["checkpoint"]}
            monitor.print(f"loaded {restored}")
        trainer.start = start
        if cfg.loss.kl_coef > 0:
            trainer.reference = _build_reference(cfg, start, state, hf_config, settings, hf_sd)
        monitor.print(
            f"Qwen2.5-VL CPPO: world {state.world_size} = tp {state.tp_size} x pp {state.pp_size}"
            f" x dp {state.dp_size}; {cfg.rollout.rollout_batch_size} prompts x "
            f"{cfg.rollout.n_samples_per_prompt} responses per step, "
            f"{cfg.mini_batches_per_step} optimizer step(s) per rollout step")
        if cfg.data.warm_start_iters and cfg.checkpoint.load is None:
            from megatron_cppo.training.warm_start import warm_start

            if cfg.data.sft_data_path is None:
                raise ValueError("--warm-start-iters: needs --sft-data-path")
            warm_start(cfg, policy, state, trainer.ctx, monitor, cfg.model.hf_dir)
        plugins.rollout.refit(policy.raw_chunks(), state, trainer.counters.weight_version)
        if cfg.data.eval_only:
            metrics = trainer.evaluate(list(plugins.val_prompts or [])[:cfg.data.eval_iters])
            monitor.log_step(trainer.counters.step, metrics)
            return [metrics]
        history = _loop(cfg, trainer, plugins, monitor, policy, state, hf_config)
        return history
    finally:
        if monitor is not None:
            summary = run_summary(monitor.history)
            if summary is not None:
                monitor.print(summary)
            png = monitor.close()
            if png is not None:
                monitor.print(f"curves: {png}")
        if plugins is not None:
            plugins.rollout.close()
        destroy_parallel(keep_process_group=True)


def _sft_only(cfg, policy, state, hf_config, monitor) -> list[dict]:
    """``megatron-cppo sft``: the warm start alone (no rollout engine), then the weights as a
    megatron checkpoint in ``--save`` (``megatron-cppo train --load`` starts CPPO from it, and
    it is also that run's reference model)."""
    from megatron_cppo.models.qwen2_5_vl import MRopeIndexConfig
    from megatron_cppo.training.plugins import load_processor
    from megatron_cppo.training.update import UpdateContext
    from megatron_cppo.training.warm_start import warm_start

    if cfg.data.sft_data_path is None:
        raise ValueError("--sft-data-path: needed by --sft-only")
    processor, _ = load_processor(cfg.model.hf_dir)
    ctx = UpdateContext.from_config(cfg, state=state,
                                    rope_cfg=MRopeIndexConfig.from_hf(hf_config),
                                    valid_vocab=len(processor.tokenizer))
    history = warm_start(cfg, policy, state, ctx, monitor, cfg.model.hf_dir)
    ckpt.save_megatron_checkpoint(policy.raw_chunks(), cfg.checkpoint.save, state,
                                  hf_config=hf_config, source_hf_dir=cfg.model.hf_dir)
    monitor.print(f"saved the warm-started weights to {cfg.checkpoint.save}; start CPPO from "
                  f"them with: megatron-cppo train --load {cfg.checkpoint.save} ...")
    return history


def _build_reference(cfg, start, state, hf_config, settings, hf_sd):
    """The frozen reference model with the run's start weights."""
    from megatron_cppo.models.qwen2_5_vl import read_hf_state_dict
    from megatron_cppo.training.model import ReferenceModel, build_reference

    if start["kind"] == "hf":
        if start["path"] is None:
            raise ValueError("--hf-dir: the reference model needs the start weights")
        return build_reference(hf_config, state, settings,
                               hf_state_dict=hf_sd if hf_sd is not None
                               else read_hf_state_dict(start["path"]),
                               cpu_offload=cfg.model.reference_cpu_offload)
    from megatron_cppo.models.qwen2_5_vl import build_qwen2_5_vl

    chunks = build_qwen2_5_vl(hf_config, state, settings)
    ckpt.load_megatron_checkpoint(chunks, start["path"], state)
    return ReferenceModel(chunks, state.device, cpu_offload=cfg.model.reference_cpu_offload)


def _loop(cfg, trainer, plugins, monitor, policy, state, hf_config) -> list[dict]:
    history = []
    val = list(plugins.val_prompts or [])[:cfg.data.eval_iters or None]
    evaluate = val and cfg.data.eval_interval >= 0
    if evaluate and trainer.counters.step == 0:
        monitor.log_step(0, trainer.evaluate(val))
    while trainer.counters.step < cfg.optimizer.train_iters:
        metrics = trainer.train_step()
        step = trainer.counters.step
        exit_now = bool(cfg.checkpoint.exit_interval and step % cfg.checkpoint.exit_interval == 0)
        last = step == cfg.optimizer.train_iters
        final = last or exit_now
        if evaluate and ((cfg.data.eval_interval and step % cfg.data.eval_interval == 0)
                         or last):
            metrics.update(trainer.evaluate(val))
        history.append(metrics)
        if step % cfg.logging.log_interval == 0 or final:
            monitor.log_step(step, metrics)
        k = cfg.logging.sample_log_interval
        if k and (step % k == 0 or step == 1):
            monitor.log_samples(step, trainer.last_samples)
        if cfg.checkpoint.save and ((cfg.checkpoint.save_interval
                                     and step % cfg.checkpoint.save_interval == 0) or final):
            path = ckpt.save_checkpoint(cfg.checkpoint.save, policy=policy, state=state,
                                        counters=trainer.counters, prompts=plugins.prompts,
                                        hf_config=hf_config, source_hf_dir=cfg.model.hf_dir,
                                        start=trainer.start)
            monitor.print(f"saved {path}")
        if exit_now:
            monitor.print(f"exit at step {step} (--exit-interval)")
            break
    return history
