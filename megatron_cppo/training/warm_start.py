"""The supervised warm start, as its own phase before CPPO (``--warm-start-iters``).

    warm_start(cfg, policy, state, ctx, monitor, processor)   # collective; a phase of run.py

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

from megatron_cppo.data import PromptDataset, warm_start_tokens
from megatron_cppo.data.types import PromptItem, Sample
from megatron_cppo.training.sft import sft_step

__all__ = ["reset_optimizer_state", "warm_start"]


def _training_sample(item: PromptItem, tokenizer, group_id: int) -> Sample:
    """The target response of a warm-start row as a ``Sample`` (prompt, response, positions)."""
    ids_T, _, _ = warm_start_tokens(item, tokenizer)
    return Sample.from_prompt(item, ids_T[item.prompt_ids.numel():], group_id=group_id)


def warm_start(cfg, policy, state, ctx, monitor, processor) -> list[dict]:
    """``cfg.warm_start.warm_start_iters`` steps on ``cfg.data.sft_data_path`` (module
    docstring); ``processor``: the model directory's (its tokenizer encodes the targets)."""
    ws, data_cfg = cfg.warm_start, cfg.data
    if data_cfg.sft_data_path is None:
        raise ValueError("--warm-start-iters: needs --sft-data-path")
    ctx = dataclasses.replace(ctx, temperature=1.0)  # plain NLL, whatever the rollout samples at
    data = PromptDataset(data_cfg.sft_data_path, processor, data_cfg, seed=cfg.training.seed,
                         perturb=False)
    for line in data.reports():
        monitor.print(line)
    gbs, dp, r = cfg.training.global_batch_size, state.dp_size, state.dp_rank
    share = gbs // dp
    lrs = [g["lr"] for g in policy.optimizer.param_groups]
    for g in policy.optimizer.param_groups:
        g["lr"] = ws.warm_start_lr
    history = []
    monitor.print(f"warm start: {ws.warm_start_iters} steps of {gbs} rows of "
                  f"{data_cfg.sft_data_path} at lr {ws.warm_start_lr}")
    try:
        for step in range(1, ws.warm_start_iters + 1):
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
            monitor.print(f"warm start {step}/{ws.warm_start_iters} | sft_loss "
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
