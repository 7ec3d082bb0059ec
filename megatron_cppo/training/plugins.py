"""The real plug-ins of a run: vLLM rollouts, the prompt datasets, the reward (loop.Plugins).

    run(cfg, default_plugins)                   # megatron_cppo/train.py
    run(cfg, lambda c, s, h: build_plugins(c, s, h, engine_target=target))   # a shared engine

* prompts: ``megatron_cppo.data.PromptDataset`` over ``--data-path`` with the processor of the
  model directory (``--hf-dir``: its tokenizer, chat template and image-size bounds are what vLLM
  uses too, so the prompt ids agree; the rollout checks it), seeded by ``--seed`` (every rank
  builds the same stream);
* validation: the first ``--eval-iters`` rows (default all) of ``--val-data-path``, clean views;
* reward: ``megatron_cppo.rewards.load_reward_fn()`` (0.9 x accuracy + 0.1 x format);
* rollout: ``megatron_cppo.rollout.source.VLLMRolloutSource`` (rank 0 owns the engine process).
"""

from __future__ import annotations

from typing import Optional

__all__ = ["build_plugins", "load_processor"]


def load_processor(hf_dir: str):
    """The model directory's Qwen2.5-VL processor and its (min_pixels, max_pixels)."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(hf_dir)
    size = processor.image_processor.size
    get = (lambda k: getattr(size, k, None)) if not isinstance(size, dict) else size.get
    return processor, (int(get("shortest_edge")), int(get("longest_edge")))


def build_plugins(cfg, state, hf_config, *, engine_target=None):
    from megatron_cppo.data import DataConfig, PromptDataset
    from megatron_cppo.rewards import load_reward_fn
    from megatron_cppo.rollout.source import VLLMRolloutSource, rollout_config_for
    from megatron_cppo.training.loop import Plugins
    from megatron_cppo.training.trainer import reward_fn_from

    hf_dir: Optional[str] = cfg.model.hf_dir
    if hf_dir is None:
        raise ValueError("--hf-dir: the vLLM rollout engine needs the model's Hugging Face "
                         "directory (tokenizer, processor, architecture)")
    if cfg.data.data_path is None:
        raise ValueError("--data-path: needed (python -m megatron_cppo.data.builtin --out DIR "
                         "writes the built-in dataset)")
    processor, (min_pixels, max_pixels) = load_processor(hf_dir)

    def dataset(path, *, shuffle, perturb):
        return PromptDataset(DataConfig(files=[path], max_prompt_length=cfg.rollout.max_prompt_length,
                                        min_pixels=min_pixels, max_pixels=max_pixels,
                                        seed=cfg.optimizer.seed, shuffle=shuffle,
                                        perturb=perturb), processor)

    prompts = dataset(cfg.data.data_path, shuffle=True, perturb=cfg.loss.cpl_coef > 0)
    val_prompts = None
    if cfg.data.val_data_path is not None:
        val = dataset(cfg.data.val_data_path, shuffle=False, perturb=False)
        val_prompts = val.next_batch(min(cfg.data.eval_iters or val.num_rows, val.num_rows))
    n_seqs = max(cfg.rollout.rollout_batch_size * cfg.rollout.n_samples_per_prompt,
                 len(val_prompts or []) * cfg.rollout.eval_n_samples)
    rollout = VLLMRolloutSource(
        rollout_config_for(hf_dir, max_prompt_length=cfg.rollout.max_prompt_length,
                           max_response_length=cfg.rollout.max_response_length,
                           bf16=cfg.model.bf16, max_num_seqs=min(n_seqs, 256),
                           seed=cfg.optimizer.seed),
        state, engine_target=engine_target, seed=cfg.optimizer.seed)
    return Plugins(rollout=rollout, prompts=prompts, reward_fn=reward_fn_from(load_reward_fn()),
                   valid_vocab=rollout.valid_vocab, val_prompts=val_prompts)
