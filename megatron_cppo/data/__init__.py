"""CPPO data: prompts with three image views, the offline Qwen2.5-VL processor, the built-in dataset.

Files
  types.py      PromptItem (one processed prompt) and Sample (one response with its prompt): the
                records the data reader, the rollout and the trainer share
  tokenizer.py  build_qwen2_5_vl_processor (the real Qwen2_5_VLProcessor built offline),
                load_processor, pixel_bounds
  schema.py     the row schema (verl parquet), INSTRUCTION, SKIP_REASONS
  images.py     decode + the reference's resize (multiples of 28 within min/max pixels)
  perturb.py    I+ / I- perturbations (torchvision + the reference's occlusion / zoom crop), seeding
  dataset.py    DataConfig (the data flags), RowReader (row group at a time), PromptDataset
  builtin.py    python -m megatron_cppo.data.builtin --out DIR (train / validation / sft parquet)

Typical use (the trainer)::

    from megatron_cppo.data import DataConfig, PromptDataset, build_qwen2_5_vl_processor
    processor = build_qwen2_5_vl_processor(out_dir, min_pixels=28 * 28, max_pixels=112 * 112)
    ds = PromptDataset("DIR/train.parquet", processor, DataConfig(max_prompt_length=512),
                       seed=run_seed)
    prompts = ds.next_batch(num_prompts)           # list[PromptItem]
    metrics = ds.skip_counts()                     # {reason: rows skipped so far}
    state = ds.state_dict()                        # JSON-serialisable; store in the checkpoint
    ds.load_state_dict(state)                      # resume: the same following prompts

A ``PromptItem`` (data/types.py; shapes: T prompt tokens, N images, P patches) holds
``prompt_ids`` [T], ``prompt_position_ids`` [3, T] (M-RoPE, from
models/qwen2_5_vl/rope_index.py) and ``rope_delta``, ``image_grid_thw`` [N, 3], ``pixel_values``
/ ``plus_pixel_values`` / ``minus_pixel_values`` [P, 1176] (clean, I+, I-: same grid, so the
perturbed passes reuse the ids and positions), ``prompt`` (chat-templated text with one
``<|image_pad|>`` per image) and ``images`` (resized PIL images) for the rollout engine,
``ground_truth`` for the reward, ``response`` (warm-start rows only), ``index`` / ``epoch`` /
``data_source`` / ``extra_info``. The n rollouts of a prompt share its item: one perturbation
draw per prompt, seeded by (run seed, row index, epoch). ``item.position_ids_with_response(R)``
gives the [3, T + R] ids of prompt + response; ``warm_start_tokens(item, tokenizer)`` the ids,
positions and loss mask of a warm-start row (``DIR/sft.parquet``); ``Sample.from_prompt(item,
response_ids, group_id=...)`` the trainer's record of a response.

Rewards live in ``megatron_cppo.rewards`` (``load_reward_fn``, ``score_responses``).
"""

from megatron_cppo.data.dataset import DataConfig, PromptDataset, RowReader, warm_start_tokens
from megatron_cppo.data.perturb import PerturbationConfig, Perturber, perturbation_seed
from megatron_cppo.data.schema import INSTRUCTION, SKIP_REASONS
from megatron_cppo.data.tokenizer import build_qwen2_5_vl_processor, load_processor, pixel_bounds
from megatron_cppo.data.types import PromptItem, Sample

__all__ = ["DataConfig", "INSTRUCTION", "PerturbationConfig", "Perturber", "PromptDataset",
           "PromptItem", "RowReader", "SKIP_REASONS", "Sample", "build_qwen2_5_vl_processor",
           "load_processor", "perturbation_seed", "pixel_bounds", "warm_start_tokens"]
