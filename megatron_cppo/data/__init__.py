"""CPPO data: prompts with three image views, the offline Qwen2.5-VL processor, the built-in dataset.

Files
  tokenizer.py  build_qwen2_5_vl_processor: the real Qwen2_5_VLProcessor built offline (saved dir)
  schema.py     the row schema (verl parquet), INSTRUCTION, SKIP_REASONS
  images.py     decode + the reference's resize (multiples of 28 within min/max pixels)
  perturb.py    I+ / I- perturbations (torchvision + the reference's occlusion / zoom crop), seeding
  dataset.py    DataConfig, RowReader (row group at a time), PromptDataset -> Sample
  builtin.py    python -m megatron_cppo.data.builtin --out DIR (train / validation / sft parquet)

Typical use (the trainer)::

    from megatron_cppo.data import DataConfig, PromptDataset, build_qwen2_5_vl_processor
    processor = build_qwen2_5_vl_processor(out_dir, min_pixels=28 * 28, max_pixels=112 * 112)
    ds = PromptDataset(DataConfig(files=["DIR/train.parquet"], min_pixels=28 * 28,
                                  max_pixels=112 * 112, max_prompt_length=512, seed=run_seed),
                       processor)
    prompts = ds.next_batch(num_prompts)           # list[Sample], one per prompt
    metrics = ds.skip_counts()                     # {reason: rows skipped so far}
    state = ds.state_dict()                        # JSON-serialisable; store in the checkpoint
    ds.load_state_dict(state)                      # resume: the same following samples

A ``Sample`` (shapes: T prompt tokens, N images, P patches) holds ``input_ids`` [T],
``position_ids`` [3, T] (M-RoPE, from models/qwen2_5_vl/rope_index.py) and ``rope_delta``,
``image_grid_thw`` [N, 3], ``pixel_values`` / ``pixel_values_plus`` / ``pixel_values_minus``
[P, 1176] (clean, I+, I-: same grid, so the perturbed passes reuse input_ids and position_ids),
``prompt`` (chat-templated text with one ``<|image_pad|>`` per image) and ``images`` (resized PIL
images) for the rollout engine, ``ground_truth`` for the reward, ``response`` (warm-start rows
only), ``index`` / ``epoch`` / ``data_source`` / ``extra_info``. The n rollouts of a prompt share
its sample: one perturbation draw per prompt, seeded by (run seed, row index, epoch).
``sample.position_ids_with_response(R)`` gives the [3, T + R] ids of prompt + response;
``warm_start_tokens(sample, tokenizer)`` the ids, ids positions and loss mask of a warm-start row
(``DIR/sft.parquet``).

Rewards live in ``megatron_cppo.rewards`` (``load_reward_fn``, ``score_responses``).
"""

from megatron_cppo.data.dataset import (DataConfig, PromptDataset, RowReader, Sample,
                                        warm_start_tokens)
from megatron_cppo.data.perturb import PerturbationConfig, Perturber, perturbation_seed
from megatron_cppo.data.schema import INSTRUCTION, SKIP_REASONS
from megatron_cppo.data.tokenizer import build_qwen2_5_vl_processor

__all__ = ["DataConfig", "PromptDataset", "RowReader", "Sample", "warm_start_tokens",
           "PerturbationConfig",
           "Perturber", "perturbation_seed", "INSTRUCTION", "SKIP_REASONS",
           "build_qwen2_5_vl_processor"]
