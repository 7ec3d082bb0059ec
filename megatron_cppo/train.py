"""megatron_cppo training entry: CPPO for Qwen2.5-VL with Megatron-LM style flags.

    torchrun --nproc-per-node 8 -m megatron_cppo.train --tensor-model-parallel-size 2 \
        --pipeline-model-parallel-size 2 --hf-dir Qwen2.5-VL-7B-Instruct --data-path train.parquet
    megatron-cppo train --config examples/tiny_cpu.yaml

Parse the config, initialise parallelism, build (policy, reference, rollout engine, data), loop
``train_step`` (megatron_cppo/training/trainer.py), save, close. Without torchrun it runs as one
process. Every flag: ``megatron-cppo train --help`` (megatron_cppo/training/config.py).
"""

from __future__ import annotations

import os
import sys
from typing import Optional, Sequence


def default_plugins(cfg, state, hf_config):
    """The vLLM rollout engine, the prompt datasets and the reward of a real run
    (megatron_cppo/training/plugins.py)."""
    from megatron_cppo.training.plugins import build_plugins

    return build_plugins(cfg, state, hf_config)


def use_builtin(cfg) -> None:
    """Without --hf-dir (and --load) the built-in tiny Qwen2.5-VL with the real Qwen2.5
    tokenizer; without --data-path the built-in dataset (megatron_cppo/training/builtin.py)."""
    if cfg.data.data_path is not None and (cfg.model.hf_dir is not None
                                           or cfg.checkpoint.load is not None):
        return
    from megatron_cppo.training.builtin import prepare_builtin

    hf_dir, data_dir = prepare_builtin(rank=int(os.environ.get("RANK", "0")),
                                       seed=cfg.optimizer.seed)
    if cfg.model.hf_dir is None and cfg.checkpoint.load is None:
        cfg.model.hf_dir = hf_dir
    if cfg.data.data_path is None:
        cfg.data.data_path = os.path.join(data_dir, "train.parquet")
        if cfg.data.val_data_path is None:
            cfg.data.val_data_path = os.path.join(data_dir, "validation.parquet")
    if cfg.data.sft_data_path is None:
        cfg.data.sft_data_path = os.path.join(data_dir, "sft.parquet")


def main(argv: Optional[Sequence[str]] = None) -> int:
    from megatron_cppo.training.config import parse_config
    from megatron_cppo.training.loop import run

    for key, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                           MASTER_PORT="29511").items():
        os.environ.setdefault(key, value)  # plain `python -m megatron_cppo.train`: one process
    try:
        cfg = parse_config(argv)
        use_builtin(cfg)
        run(cfg, default_plugins)
    except ValueError as e:  # bad flags or input: one line naming the flag / file
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
