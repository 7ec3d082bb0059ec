"""The supervised warm start, as its own phase before CPPO (``--warm-start-iters``).

    warm_start(cfg, policy, state, ctx, monitor, hf_dir)   # collective; loop.run calls it

Each of ``--warm-start-iters`` steps takes the next ``--global-batch-size`` rows of
``--sft-data-path`` (the built-in dataset's ``sft.parquet``: prompt + target response), this
data-parallel rank's contiguous share, and makes one ``sft_step`` (training/sft.py: response NLL,
same layout, forward step and optimizer as the CPPO update) at the constant ``--warm-start-lr``;
one console line and one ``warm_start.jsonl`` line (in the log dir) per step.
The LR schedule is not advanced (it spans the CPPO steps) and the Adam state is reset afterwards
(``reset_optimizer_state``), so a run with a warm start continues like ``megatron-cppo sft``
followed by ``megatron-cppo train --load``. Skipped
when resuming (``--load``): a checkpoint already holds warm-started weights. With the KL term the
reference would have to be the warm-started model, so ``--kl-coef`` must be 0 with a warm start
(checked in the config).
"""

from __future__ import annotations

import dataclasses
import json
import time

import torch

__all__ = ["warm_start"]


def _training_sample(item, tokenizer, group_id: int):
    from megatron_cppo.data import warm_start_tokens
    from megatron_cppo.training.batch import Sample

    ids_T, pos_3T, _ = warm_start_tokens(item, tokenizer)
    has_image = item.pixel_values is not None and item.pixel_values.numel() > 0
    return Sample(prompt_ids=item.input_ids.long(), response_ids=ids_T[item.input_ids.numel():],
                  group_id=group_id, pixel_values=item.pixel_values if has_image else None,
                  image_grid_thw=item.image_grid_thw if has_image else None, position_ids=pos_3T)


def warm_start(cfg, policy, state, ctx, monitor, hf_dir: str) -> list[dict]:
    from megatron_cppo.data import DataConfig, PromptDataset
    from megatron_cppo.training.plugins import load_processor
    from megatron_cppo.training.sft import sft_step

    ctx = dataclasses.replace(ctx, temperature=1.0)  # plain NLL, whatever the rollout samples at
    processor, (min_pixels, max_pixels) = load_processor(hf_dir)
    data = PromptDataset(DataConfig(files=[cfg.data.sft_data_path],
                                    max_prompt_length=cfg.rollout.max_prompt_length,
                                    min_pixels=min_pixels, max_pixels=max_pixels,
                                    seed=cfg.optimizer.seed, perturb=False), processor)
    gbs, dp, r = cfg.optimizer.global_batch_size, state.dp_size, state.dp_rank
    share = gbs // dp
    lrs = [g["lr"] for g in policy.optimizer.param_groups]
    for g in policy.optimizer.param_groups:
        g["lr"] = cfg.data.warm_start_lr
    history = []
    monitor.print(f"warm start: {cfg.data.warm_start_iters} steps of {gbs} rows of "
                  f"{cfg.data.sft_data_path} at lr {cfg.data.warm_start_lr}")
    try:
        for step in range(1, cfg.data.warm_start_iters + 1):
            t0 = time.perf_counter()
            items = data.next_batch(gbs)[r * share:(r + 1) * share]
            samples = [_training_sample(x, processor.tokenizer, i) for i, x in enumerate(items)]
            res = sft_step(policy.chunks, policy.optimizer, samples, ctx)
            m = {"warm_start_step": step, "sft_loss": res.metrics.get("sft_loss", float("nan")),
                 "grad_norm": res.grad_norm, "time": time.perf_counter() - t0}
            history.append(m)
            if monitor.enabled and monitor.log_dir is not None:  # rank 0: its own JSONL
                with open(monitor.log_dir / "warm_start.jsonl", "a") as fh:
                    fh.write(json.dumps(m) + "\n")
            monitor.print(f"warm start {step}/{cfg.data.warm_start_iters} | sft_loss "
                          f"{m['sft_loss']:.4f} | gnorm {res.grad_norm:.3f} | s/step {m['time']:.1f}")
    finally:
        for g, lr in zip(policy.optimizer.param_groups, lrs):
            g["lr"] = lr
    reset_optimizer_state(policy.optimizer)
    return history


def reset_optimizer_state(optimizer) -> None:
    """Drop the Adam moments and step counts (torch's Adam re-creates them at the next step):
    CPPO starts with a fresh optimizer after the warm start, exactly as ``megatron-cppo train
    --load <megatron-cppo sft output>`` does. The warm start's moments describe another
    objective (supervised NLL, 10x the learning rate); carried over, they would scale the first
    RL steps by gradients of that objective."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        opt.optimizer.state.clear()
