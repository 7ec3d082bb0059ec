"""The built-in default: a tiny random Qwen2.5-VL with the real Qwen2.5 tokenizer, and the built-in
dataset, prepared offline for ``megatron-cppo train`` without ``--hf-dir`` / ``--data-path``.

    hf_dir, data_dir = prepare_builtin(root)   # every rank may call it; rank 0 writes

The model (head dim 64: vLLM's CPU attention needs it; 2 heads and 2 KV heads, so TP 2 splits
them): 2 LM layers of width 128, a 2-block ViT (block 1 full attention) of width 64, untied
embeddings; the output layer has 151,680 rows (the tokenizer's 151,665 padded to a multiple of
64: TP 2 divides it; the rollout never samples the 15 extra rows, see ``valid_vocab``). Every
image is resized to 112 x 112 px (64 patches, 16 merged image tokens; the level-0 images of 56 px
are upscaled 2x). Why: with 4 image tokens among ~80 prompt tokens this model's warm start learnt
the answer template but never to read the image (answer accuracy at chance after 130 steps of 16
rows); with 16 it did (teacher-forced answer accuracy 0.19 -> 0.47 by step 80). The dataset: the
``count`` and ``color`` tasks at level 0 (``python -m megatron_cppo.data.builtin``); in its
warm-start set half of the responses give the (correct) answer without ``\\boxed{}``
(``SFT_FORMAT_NOISE``), which the reward scores 0. What the CPPO phase can learn in a few minutes
is what RL on a pretrained model learns first: to say what it knows in the rewarded form. Raising
the accuracy of a model this small on what it sees takes far more images than 32 steps hold (a
warm start with 30% wrong answers instead, built-in v3, left nothing RL could raise in 32 steps:
benchmarks/RESULTS.md).

Writes are atomic (a temporary sibling renamed into place), so ranks racing on a fresh machine
either see nothing (and wait) or a complete directory.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

MIN_PIXELS = MAX_PIXELS = 112 * 112
MODEL_VOCAB = 151_680
TASKS, LEVELS = ("count", "color"), (0,)
SFT_FORMAT_NOISE = 0.5
VERSION = "v4"  # bump when the model, processor or data change (a new cache directory)
# The seed of the model's initialisation and of the dataset: fixed, not the run's --seed, so a run
# sees the same files whether it wrote the cache or found it (1234: the built-in config's seed).
SEED = 1234

__all__ = ["prepare_builtin", "tiny_hf_config", "default_root"]


def default_root() -> Path:
    return Path(os.environ.get("MEGATRON_CPPO_CACHE", Path.home() / ".cache" / "megatron_cppo")
                ) / f"builtin-{VERSION}"


def tiny_hf_config(*, vocab_size: int = MODEL_VOCAB, special_ids: dict | None = None,
                   intermediate_size: int = 384, vision_intermediate_size: int = 128,
                   max_position_embeddings: int = 2048):
    """The built-in tiny Qwen2.5-VL (module docstring). The keyword arguments let the rollout
    tests build the same architecture around their own small tokenizer (``special_ids``: the
    Qwen2.5-VL special token -> id map, default the real tokenizer's)."""
    from transformers import Qwen2_5_VLConfig

    from megatron_cppo.data.tokenizer import QWEN2_5_VL_SPECIAL_IDS

    ids = special_ids or QWEN2_5_VL_SPECIAL_IDS
    text = dict(vocab_size=vocab_size, hidden_size=128, intermediate_size=intermediate_size,
                num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                rms_norm_eps=1e-6, max_position_embeddings=max_position_embeddings,
                bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                 "mrope_section": [8, 12, 12]},
                tie_word_embeddings=False)
    vision = dict(depth=2, hidden_size=64, intermediate_size=vision_intermediate_size,
                  num_heads=2, in_channels=3, patch_size=14, temporal_patch_size=2,
                  spatial_merge_size=2, window_size=112, fullatt_block_indexes=[1],
                  out_hidden_size=128, hidden_act="silu", tokens_per_second=2)
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision,
                            image_token_id=ids["<|image_pad|>"],
                            video_token_id=ids["<|video_pad|>"],
                            vision_start_token_id=ids["<|vision_start|>"],
                            vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False)


def _write_model(out: Path, seed: int) -> None:
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    from megatron_cppo.data import build_qwen2_5_vl_processor
    from megatron_cppo.data.tokenizer import QWEN2_5_VL_SPECIAL_IDS as ids

    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(tiny_hf_config()).float().eval()
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.save_pretrained(out)
    proc_dir = out.parent / f".{out.name}.processor"
    processor = build_qwen2_5_vl_processor(proc_dir, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    processor.save_pretrained(out)
    processor.tokenizer.save_pretrained(out)
    shutil.rmtree(proc_dir, ignore_errors=True)


def _atomic(dst: Path, write) -> None:
    if dst.exists():
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    try:
        write(tmp)
        os.rename(tmp, dst)
    except OSError:
        if not dst.exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def prepare_builtin(root=None, *, rank: int = 0, seed: int = SEED,
                    timeout_s: float = 900.0) -> tuple[str, str]:
    """(HF model dir, dataset dir) under ``root`` (default: the cache); rank 0 writes what is
    missing, the other ranks wait for it."""
    from megatron_cppo.data.builtin import write_builtin_dataset

    root = Path(root) if root is not None else default_root()
    hf, data = root / "model", root / "data"
    if rank == 0:
        _atomic(hf, lambda d: _write_model(d, seed))
        _atomic(data, lambda d: write_builtin_dataset(d, seed=seed, train_rows=2000,
                                                      validation_rows=64, sft_rows=4096,
                                                      tasks=TASKS, levels=LEVELS,
                                                      sft_format_noise=SFT_FORMAT_NOISE))
    deadline = time.monotonic() + timeout_s
    while not (hf.exists() and data.exists()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank 0 did not prepare {root} in {timeout_s} s")
        time.sleep(1.0)
    return str(hf), str(data)
