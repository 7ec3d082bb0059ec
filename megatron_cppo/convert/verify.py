"""Check a megatron_cppo checkpoint against its Hugging Face model: one probe batch, both logits.

    result = verify("Qwen2.5-VL-7B-Instruct", "ckpt/tp2pp2")
    print(result.summary()); assert result.passed

What runs:
  * the probe batch: ``--inputs`` (processor outputs saved with torch.save), or a built-in batch of
    two samples, a chat-like text with one image (a 168x112 px picture drawn with PIL: wider than
    one ViT attention window, so windowed and full-attention blocks both matter) and a text-only
    one. The built-in batch uses the HF directory's processor (tokenizer + chat template) when it
    has one, else ``Qwen2VLImageProcessor`` configured from the vision config and token ids from
    the model config (random text ids below the special tokens);
  * both sides in full fp32 (``full_fp32_precision``: no TF32 in matmuls nor cuDNN convolutions,
    whose default on CUDA allows it; the patch embedding is a Conv3d, so TF32 there alone showed
    as a 4e-4 logit difference on a correct fp32 checkpoint);
  * transformers' ``Qwen2_5_VLForConditionalGeneration`` in fp32, in this process, with
    ``mm_token_type_ids`` (without them transformers 5.x silently uses 1-D positions);
  * the megatron model on tp x pp ranks of the checkpoint's layout, launched here (spawned
    processes; gloo on CPU, nccl with one GPU per rank), built by ``build_qwen2_5_vl`` and loaded by
    ``load_megatron_checkpoint``; forward through megatron's pipeline schedule (forward only) with
    M-RoPE ids from ``rope_index``; the last stage all-gathers its vocab-sharded logits over TP,
    drops the vocabulary padding and returns fp32 [B, S, V] through a file.

Why the megatron model runs in fp32 whatever the stored dtype: verify checks the conversion (names,
GQA / gate-up layouts, vocab padding, ties), not bf16 kernels. In bf16, kernel-order noise alone
reaches a few % of the logits (Pai-Megatron-Patch #605, slime #215), and a tolerance that admits it
also admits real mapping bugs. With fp32 compute, a bf16 checkpoint of a bf16 HF model has exactly
the HF weights; only an fp32 HF directory converted to bf16 differs by the rounding of the weights,
which is what the looser bf16 default tolerance covers.

Compared over valid (attention-mask) tokens: max |logit difference| and the mean per-token
KL(p_HF || p_megatron) in nats. Left-padded inputs are moved to right padding for both models (the
megatron model is causal without a mask; right padding needs none); dumped logits are put back
into the layout of the inputs.

Shapes: ids_BS [batch, seq], pos_3BS [3, batch, seq], pixel_PD [patches, patch_dim],
grid_N3 [images, (t, h, w)], logits_BSV [batch, seq, vocab].
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from megatron_cppo.platform import quiet_library_warnings

# Defaults by the checkpoint's stored dtype: (max abs logit diff, mean KL in nats). For bf16 /
# fp16 the abs tolerance is a fraction of the largest |HF logit|: rounding the weights moves the
# logits in proportion to their scale. Measured on the tiny test model (fp32 HF directory): a
# correct fp32 checkpoint 2.6e-6 / 1e-13, a correct bf16 one 0.75% of the scale / 7.6e-6, an fp32
# one with one layer's QKV corrupted 55% of the scale / 4e-2.
FP32_TOLERANCE, FP32_KL_TOLERANCE = 1e-4, 1e-6
LOW_PRECISION_REL_TOLERANCE, LOW_PRECISION_KL_TOLERANCE = 0.05, 1e-3

INPUT_KEYS = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")


def precision_flags() -> dict:
    """The fp32 math settings of torch that can trade accuracy for speed (TF32)."""
    import torch.backends.cuda
    import torch.backends.cudnn

    if hasattr(torch.backends.cudnn, "conv") and hasattr(torch.backends.cuda.matmul,
                                                         "fp32_precision"):
        return {"cuda.matmul.fp32_precision": torch.backends.cuda.matmul.fp32_precision,
                "cudnn.conv.fp32_precision": torch.backends.cudnn.conv.fp32_precision,
                "cudnn.rnn.fp32_precision": torch.backends.cudnn.rnn.fp32_precision}
    return {"cuda.matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            "cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
            "float32_matmul_precision": torch.get_float32_matmul_precision()}


# what full_fp32_precision sets, in either API (torch >= 2.9: fp32_precision, before: allow_tf32)
FULL_FP32 = {"cuda.matmul.fp32_precision": "ieee", "cudnn.conv.fp32_precision": "ieee",
             "cudnn.rnn.fp32_precision": "ieee", "cuda.matmul.allow_tf32": False,
             "cudnn.allow_tf32": False, "float32_matmul_precision": "highest"}


def _set_precision_flags(flags: dict) -> None:
    import torch.backends.cuda
    import torch.backends.cudnn

    for key, value in flags.items():
        if key == "float32_matmul_precision":
            torch.set_float32_matmul_precision(value)
            continue
        obj = torch.backends
        *path, attr = key.split(".")
        for part in path:
            obj = getattr(obj, part)
        setattr(obj, attr, value)


@contextlib.contextmanager
def full_fp32_precision():
    """fp32 math without TF32 (matmuls and cuDNN convolutions / RNNs), restored on exit. Only the
    API the installed torch uses is touched (mixing the legacy allow_tf32 flags and the new
    fp32_precision ones makes torch raise)."""
    saved = precision_flags()
    _set_precision_flags({k: FULL_FP32[k] for k in saved})
    try:
        yield
    finally:
        _set_precision_flags(saved)


class VerifyError(ValueError):
    """Bad verify input (the message names the file / key) or a user error on a megatron rank."""


@dataclass(kw_only=True)
class VerifyResult:
    max_abs_diff: float
    mean_kl: float
    max_kl: float  # worst single token
    num_tokens: int  # valid tokens compared
    logit_scale: float  # largest |HF logit| over valid tokens
    tolerance: float  # effective absolute tolerance
    kl_tolerance: float
    tp: int
    pp: int
    dtype: str  # stored dtype of the checkpoint
    probe: str  # where the batch came from
    seconds: float
    notes: list[str] = field(default_factory=list)
    # torch precision flags in force during each side's forward (precision_flags())
    hf_precision: dict = field(default_factory=dict)
    megatron_precision: dict = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        # NaN compares False: a NaN anywhere fails
        return self.max_abs_diff <= self.tolerance and self.mean_kl <= self.kl_tolerance

    def failure(self) -> str:
        """Why it failed ("" if it passed)."""
        parts = []
        if not self.max_abs_diff <= self.tolerance:
            parts.append(f"max abs logit diff {self.max_abs_diff:.3e} > tolerance "
                         f"{self.tolerance:.3e}")
        if not self.mean_kl <= self.kl_tolerance:
            parts.append(f"mean KL {self.mean_kl:.3e} > kl tolerance {self.kl_tolerance:.3e}")
        return "; ".join(parts)

    def summary(self) -> str:
        lines = [
            f"verify: checkpoint tp={self.tp} pp={self.pp} dtype={self.dtype}; probe: {self.probe}",
            f"  valid tokens        {self.num_tokens}",
            f"  max abs logit diff  {self.max_abs_diff:.3e}  (tolerance {self.tolerance:.3e}; "
            f"largest |logit| {self.logit_scale:.3g})",
            f"  mean KL per token   {self.mean_kl:.3e}  (tolerance {self.kl_tolerance:.3e}; "
            f"worst token {self.max_kl:.3e})",
        ]
        if self.hf_precision or self.megatron_precision:
            def fmt(flags):
                return ", ".join(f"{k}={v}" for k, v in flags.items()) or "?"
            lines.append(f"  fp32 math           HF: {fmt(self.hf_precision)}; megatron: "
                         f"{fmt(self.megatron_precision)}")
        lines += [f"  note: {n}" for n in self.notes]
        lines.append(f"  {'PASSED' if self.passed else 'FAILED'} in {self.seconds:.1f} s")
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# probe batch


def _probe_image(width: int, height: int):
    """A deterministic picture with structure at every scale (gradients + a few shapes)."""
    import numpy as np
    from PIL import Image, ImageDraw

    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([255 * x / max(width - 1, 1), 255 * y / max(height - 1, 1),
                    127 + 127 * np.sin((x + y) / 9.0)], axis=-1).astype("uint8")
    image = Image.fromarray(rgb, "RGB")
    draw = ImageDraw.Draw(image)
    draw.ellipse((width // 8, height // 6, width // 2, height * 5 // 6), fill=(220, 30, 30))
    draw.rectangle((width * 5 // 8, height // 4, width * 7 // 8, height * 3 // 4),
                   fill=(20, 40, 200))
    return image


def _has_processor(hf_dir: Path) -> bool:
    return (hf_dir / "preprocessor_config.json").is_file() and any(
        (hf_dir / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json"))


def _image_size(hf_config) -> tuple[int, int]:
    """(width, height): 6 x 4 merged tokens, i.e. wider than one 112 px window at real sizes."""
    vc = hf_config.vision_config
    factor = int(vc.patch_size) * int(vc.spatial_merge_size)
    return 6 * factor, 4 * factor


def _processor_batch(hf_dir: Path, hf_config) -> dict:
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(str(hf_dir), local_files_only=True)
    width, height = _image_size(hf_config)
    image = _probe_image(width, height)
    with_image = [{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": "What is drawn in this picture?"}]}]
    text_only = [{"role": "user", "content": [
        {"type": "text", "text": "Name three primary colours."}]}]
    if getattr(processor, "chat_template", None):
        texts = [processor.apply_chat_template(m, add_generation_prompt=True)
                 for m in (with_image, text_only)]
    else:  # the Qwen2.5-VL chat format by hand
        texts = ["<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is drawn in "
                 "this picture?<|im_end|>\n<|im_start|>assistant\n",
                 "<|im_start|>user\nName three primary colours.<|im_end|>\n"
                 "<|im_start|>assistant\n"]
    pixels = width * height
    out = processor(text=texts, images=[image], padding=True, return_tensors="pt",
                    images_kwargs=dict(min_pixels=pixels, max_pixels=pixels))
    return {k: out[k] for k in INPUT_KEYS if k in out}


def _config_batch(hf_config, seed: int = 0) -> dict:
    """No processor in the HF directory: pixels from ``Qwen2VLImageProcessor`` configured from
    the vision config, token ids from the model config, text ids drawn below the special ids."""
    import warnings

    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    vc = hf_config.vision_config
    width, height = _image_size(hf_config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        processor = Qwen2VLImageProcessorPil(
            patch_size=int(vc.patch_size), temporal_patch_size=int(vc.temporal_patch_size),
            merge_size=int(vc.spatial_merge_size), min_pixels=width * height,
            max_pixels=width * height)
    images = processor(images=[_probe_image(width, height)], return_tensors="pt")
    grid_N3 = images["image_grid_thw"]
    num_image_tokens = int(grid_N3.prod()) // int(vc.spatial_merge_size) ** 2

    vocab = hf_config.text_config.vocab_size
    special = [hf_config.image_token_id, hf_config.video_token_id,
               hf_config.vision_start_token_id, getattr(hf_config, "vision_end_token_id", vocab)]
    top = min([vocab] + [s for s in special if s is not None])
    g = torch.Generator().manual_seed(seed)
    text = lambda n: torch.randint(2, top, (n,), generator=g).tolist()  # noqa: E731
    vision_end = getattr(hf_config, "vision_end_token_id", None)
    if vision_end is None:
        raise VerifyError("the model config has no vision_end_token_id")
    first = (text(7) + [hf_config.vision_start_token_id]
             + [hf_config.image_token_id] * num_image_tokens + [vision_end] + text(12))
    second = text(19)
    S = max(len(first), len(second))
    ids_BS = torch.zeros(2, S, dtype=torch.long)
    mask_BS = torch.zeros(2, S, dtype=torch.long)
    for b, ids in enumerate((first, second)):
        ids_BS[b, :len(ids)] = torch.tensor(ids)
        mask_BS[b, :len(ids)] = 1
    return dict(input_ids=ids_BS, attention_mask=mask_BS, pixel_values=images["pixel_values"],
                image_grid_thw=grid_N3)


def _load_inputs(path: str) -> dict:
    try:
        # weights_only: a data file must not run code; save dict(processor_outputs), not the
        # BatchFeature object
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 - any unreadable file is a user error here
        raise VerifyError(f"{path}: cannot read the --inputs file as a dict of tensors "
                          f"(torch.save(dict(processor_outputs), FILE)): "
                          f"{type(e).__name__}: {str(e).splitlines()[0][:200]}") from None
    if not isinstance(raw, dict):
        raise VerifyError(f"{path}: expected a dict of processor outputs, got "
                          f"{type(raw).__name__}")
    missing = [k for k in ("input_ids",) if k not in raw]
    if missing:
        raise VerifyError(f"{path}: --inputs lacks {missing} (needs input_ids, attention_mask, "
                          f"and for images pixel_values and image_grid_thw)")
    if raw.get("pixel_values_videos") is not None:
        raise VerifyError(f"{path}: videos are not supported by verify (pixel_values_videos)")
    out = {}
    for k in INPUT_KEYS:
        v = raw.get(k)
        if v is not None and not isinstance(v, torch.Tensor):
            v = torch.as_tensor(v)
        out[k] = v
    if out["input_ids"].dim() == 1:
        out["input_ids"] = out["input_ids"][None]
    if out["attention_mask"] is None:
        out["attention_mask"] = torch.ones_like(out["input_ids"])
    elif out["attention_mask"].dim() == 1:
        out["attention_mask"] = out["attention_mask"][None]
    if out["attention_mask"].shape != out["input_ids"].shape:
        raise VerifyError(f"{path}: attention_mask {list(out['attention_mask'].shape)} and "
                          f"input_ids {list(out['input_ids'].shape)} differ in shape")
    if (out["pixel_values"] is None) != (out["image_grid_thw"] is None):
        raise VerifyError(f"{path}: pixel_values and image_grid_thw must be given together")
    return out


def build_probe_batch(hf_dir, hf_config, inputs: Optional[str] = None
                      ) -> tuple[dict, str, list[str]]:
    """(batch, where it came from, notes): ``inputs`` if given, else the built-in probe, made
    with the HF directory's processor when it has one and it loads (transformers' Qwen2.5-VL
    processor needs torchvision for its video part), else from the config."""
    hf_dir = Path(hf_dir)
    if inputs is not None:
        return _load_inputs(inputs), f"--inputs {inputs}", []
    notes = []
    if _has_processor(hf_dir):
        try:
            batch = _processor_batch(hf_dir, hf_config)
            return batch, "built-in (text + image, text only; the HF directory's processor)", []
        except Exception as e:  # noqa: BLE001 - fall back, but say so
            notes.append(f"the HF directory's processor did not load ({type(e).__name__}: "
                         f"{str(e)[:200]}); the probe was built from the config instead")
    probe = ("built-in (text + image, text only; token ids from the config, image processor "
             "from the vision config)")
    return _config_batch(hf_config), probe, notes


def _right_pad(batch: dict) -> tuple[dict, torch.Tensor]:
    """Move every row's valid tokens to the front (right padding). Returns the batch and the
    positions [B, S] (bool) of the valid tokens in the original layout."""
    ids_BS, mask_BS = batch["input_ids"].long(), batch["attention_mask"].bool()
    B, S = ids_BS.shape
    new_ids = torch.zeros_like(ids_BS)
    new_mask = torch.zeros_like(ids_BS)
    for b in range(B):
        row = ids_BS[b][mask_BS[b]]
        new_ids[b, :row.numel()] = row
        new_mask[b, :row.numel()] = 1
    out = dict(batch, input_ids=new_ids, attention_mask=new_mask)
    return out, mask_BS


# ----------------------------------------------------------------------------------------------
# the megatron side: tp x pp ranks


def _megatron_logits(state, chunks, batch: dict, vocab_size: int) -> Optional[torch.Tensor]:
    """Forward-only through megatron's schedule; [B, S, V] fp32 on the last stage (every TP
    rank), None elsewhere."""
    import torch.distributed as dist

    from megatron_cppo.models.qwen2_5_vl.forward_step import run_pipeline

    dev = state.device
    mb = {k: (v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    stash = []

    def keep_logits(_mb, logits_BSV):
        stash.append(logits_BSV.detach())
        return logits_BSV.new_zeros(()), {}

    run_pipeline(chunks, [mb], keep_logits, forward_only=True)
    if not state.is_last_stage:
        return None
    (local_BSV,) = stash
    local_BSV = local_BSV.float().contiguous()
    parts = [torch.empty_like(local_BSV) for _ in range(state.tp_size)]
    dist.all_gather(parts, local_BSV, group=state.tp_group)
    # padding columns (-inf on the rank holding them) are beyond vocab_size: dropped here
    return torch.cat(parts, dim=-1)[..., :vocab_size].cpu()


def _die_with_parent(parent_pid: int, scratch: str) -> None:
    """This rank removes the launch's scratch directory and exits when the verify process dies
    (even by SIGKILL, even while blocked in a C++ call): no orphaned ranks, no temp debris."""
    import shutil

    from megatron_cppo.parallel.lifetime import exit_with_parent

    exit_with_parent(parent_pid, cleanup=lambda: shutil.rmtree(scratch, ignore_errors=True))


def _rank_main(megatron_dir: str, batch: dict, collective_timeout_min: int, parent_pid: int,
               scratch: str):
    """One megatron rank: build the checkpoint's layout, load it, return the full logits (from the
    last stage's TP rank 0; None elsewhere). Teardown only after success (see parallel/launch.py)."""
    _die_with_parent(parent_pid, scratch)
    quiet_library_warnings()
    from megatron_cppo.checkpoint import load_megatron_checkpoint, read_meta
    from megatron_cppo.models.qwen2_5_vl import Qwen25VLModelConfig, build_qwen2_5_vl
    from megatron_cppo.parallel import ParallelConfig, destroy_parallel, initialize_parallel

    meta = read_meta(megatron_dir)
    state = initialize_parallel(ParallelConfig(
        tensor_model_parallel_size=meta.tp, pipeline_model_parallel_size=meta.pp,
        distributed_timeout_minutes=collective_timeout_min, **meta.pipeline_split))
    chunks = build_qwen2_5_vl(meta.hf_config, state, Qwen25VLModelConfig(
        vision_parallel_mode=meta.vision_parallel_mode))
    load_megatron_checkpoint(chunks, megatron_dir, state)
    for c in chunks:
        c.eval()
    vocab = int(meta.hf_config["text_config"]["vocab_size"]) \
        if "text_config" in meta.hf_config else int(meta.hf_config["vocab_size"])
    with full_fp32_precision():
        flags = precision_flags()
        logits_BSV = _megatron_logits(state, chunks, batch, vocab)
    keep = (logits_BSV, flags) if logits_BSV is not None and state.tp_rank == 0 else None
    destroy_parallel()
    return keep


def run_megatron(megatron_dir: str, batch: dict, world_size: int, *, timeout: float = 3600.0,
                 collective_timeout_min: int = 10) -> tuple[torch.Tensor, dict]:
    """Launch ``world_size`` ranks that load the checkpoint; returns the logits [B, S, V] and the
    precision flags in force during their forward."""
    from megatron_cppo.parallel.launch import RanksFailed, run_local_ranks

    if torch.cuda.is_available() and torch.cuda.device_count() < world_size:
        raise VerifyError(f"the checkpoint's layout needs {world_size} ranks (one GPU each), "
                          f"{torch.cuda.device_count()} GPUs are visible")
    import os
    import shutil
    import tempfile

    # the launcher's rank directory goes into a scratch directory the ranks remove if this
    # process dies (_die_with_parent); removed here otherwise
    scratch = tempfile.mkdtemp(prefix="mcppo_verify_")
    saved_tempdir = tempfile.tempdir
    tempfile.tempdir = scratch
    try:
        results = run_local_ranks(_rank_main, world_size, timeout=timeout,
                                  what="verify: megatron ranks failed",
                                  args=(str(megatron_dir), batch, collective_timeout_min,
                                        os.getpid(), scratch))
    except RanksFailed as e:
        reported = [err for err in e.errors if err.traceback]
        if reported and all(err.user_error for err in reported):
            raise VerifyError(f"megatron rank {reported[0].rank}: {reported[0].message}") \
                from None
        raise RuntimeError(str(e)) from None
    finally:
        tempfile.tempdir = saved_tempdir
        shutil.rmtree(scratch, ignore_errors=True)
    ((logits_BSV, flags),) = [r for r in results if r is not None]
    return logits_BSV, flags


# ----------------------------------------------------------------------------------------------
# the HF side and the comparison


def _hf_logits(hf_dir: Path, batch: dict, device: torch.device) -> tuple[torch.Tensor, dict]:
    """transformers' logits [B, S, V] in full fp32, and the precision flags in force."""
    with full_fp32_precision():
        return _hf_logits_fp32(hf_dir, batch, device), precision_flags()


def _hf_logits_fp32(hf_dir: Path, batch: dict, device: torch.device) -> torch.Tensor:
    from transformers import Qwen2_5_VLForConditionalGeneration

    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # one bar per tensor group would bury the report
    try:
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            str(hf_dir), dtype=torch.float32, local_files_only=True).to(device).eval()
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    cfg = model.config
    ids_BS = batch["input_ids"].to(device)
    mm_BS = torch.zeros_like(ids_BS)
    mm_BS[ids_BS == cfg.image_token_id] = 1
    mm_BS[ids_BS == cfg.video_token_id] = 2
    kwargs = dict(input_ids=ids_BS, attention_mask=batch["attention_mask"].to(device),
                  mm_token_type_ids=mm_BS)
    if batch["pixel_values"] is not None:
        kwargs.update(pixel_values=batch["pixel_values"].to(device, torch.float32),
                      image_grid_thw=batch["image_grid_thw"].to(device))
    with torch.no_grad():
        logits_BSV = model(**kwargs).logits.float().cpu()
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the megatron ranks need the memory next
    return logits_BSV


def compare_logits(hf_BSV: torch.Tensor, meg_BSV: torch.Tensor, valid_BS: torch.Tensor,
                   chunk_tokens: int = 256) -> tuple[float, float, float, float, int]:
    """(max abs diff, mean KL(HF || megatron), max KL, max |HF logit|, tokens) over valid
    tokens. In float64 (the KL of nearly equal distributions would drown in fp32 rounding), a
    chunk of tokens at a time (a float64 [T, 152k] copy of a long batch would not fit)."""
    if hf_BSV.shape != meg_BSV.shape:
        raise RuntimeError(f"logits shapes differ: HF {list(hf_BSV.shape)}, megatron "
                           f"{list(meg_BSV.shape)}")
    hf_TV, meg_TV = hf_BSV[valid_BS], meg_BSV[valid_BS]
    tokens = hf_TV.shape[0]
    if tokens == 0:
        raise VerifyError("the probe batch has no valid tokens (attention_mask is all 0)")
    max_abs = max_kl = scale = kl_sum = 0.0
    for i in range(0, tokens, chunk_tokens):
        hf_CV = hf_TV[i:i + chunk_tokens].double()
        meg_CV = meg_TV[i:i + chunk_tokens].double()
        if not bool(torch.isfinite(meg_CV).all()):
            return float("nan"), float("nan"), float("nan"), scale, tokens  # fails any tolerance
        max_abs = max(max_abs, float((hf_CV - meg_CV).abs().max()))
        scale = max(scale, float(hf_CV.abs().max()))
        logp_hf = torch.log_softmax(hf_CV, dim=-1)
        kl_C = (logp_hf.exp() * (logp_hf - torch.log_softmax(meg_CV, dim=-1))).sum(-1)
        kl_sum += float(kl_C.sum())
        max_kl = max(max_kl, float(kl_C.max()))
    return max_abs, kl_sum / tokens, max_kl, scale, tokens


def _check_same_model(hf_config, meta, hf_dir: Path, megatron_dir) -> None:
    """The checkpoint must come from this HF model (same dimensions), or the comparison is
    meaningless: say so instead of reporting a huge logit difference."""
    from megatron_cppo.models.qwen2_5_vl.config import Qwen25VLDims, load_hf_config

    ours = Qwen25VLDims.from_hf(hf_config)
    theirs = Qwen25VLDims.from_hf(load_hf_config(meta.hf_config))
    if ours != theirs:
        diffs = []
        for part in ("text", "vision"):
            a, b = getattr(ours, part), getattr(theirs, part)
            diffs += [f"{part}.{k}: {getattr(b, k)} vs {getattr(a, k)}"
                      for k in a.__dataclass_fields__ if getattr(a, k) != getattr(b, k)]
        for k in ("image_token_id", "video_token_id", "vision_start_token_id"):
            if getattr(ours, k) != getattr(theirs, k):
                diffs.append(f"{k}: {getattr(theirs, k)} vs {getattr(ours, k)}")
        raise VerifyError(f"{megatron_dir} was converted from a model with other dimensions than "
                          f"{hf_dir}/config.json ({'; '.join(diffs[:4])})")


def verify(hf_dir, megatron_dir, *, inputs: Optional[str] = None,
           dump_logits: Optional[str] = None, tolerance: Optional[float] = None,
           kl_tolerance: Optional[float] = None, timeout: float = 3600.0) -> VerifyResult:
    """Compare the megatron checkpoint with the HF model on a probe batch (module docstring).

    Raises ValueError subclasses for bad input (not a checkpoint, not a Qwen2.5-VL directory,
    another model, unreadable --inputs); returns the result whether or not it passed."""
    from megatron_cppo.convert.hf_source import HFSource, read_hf_config
    from megatron_cppo.convert.streaming import open_checkpoint
    from megatron_cppo.models.qwen2_5_vl import (MRopeIndexConfig, Qwen25VLDims,
                                                 mrope_position_ids_batch)

    t0 = time.perf_counter()
    hf_dir = Path(hf_dir)
    if dump_logits is not None and Path(dump_logits).is_dir():
        raise VerifyError(f"--dump-logits {dump_logits} is a directory; give a file name")
    # metadata against the model, checksums of every stored chunk: a damaged checkpoint is named
    # here, not as a traceback on a rank
    meta = open_checkpoint(megatron_dir).meta
    hf_config = read_hf_config(hf_dir)  # ConversionError unless a Qwen2.5-VL config.json
    _check_same_model(hf_config, meta, hf_dir, megatron_dir)
    HFSource(hf_dir, hf_config)  # every HF tensor present, well-formed, of the right shape

    batch, probe, notes = build_probe_batch(hf_dir, hf_config, inputs)
    ids = batch["input_ids"]
    if ids.dim() != 2 or ids.numel() == 0 or not bool(batch["attention_mask"].bool().any()):
        raise VerifyError(f"{inputs or 'probe batch'}: input_ids must be a non-empty [batch, seq] "
                          f"tensor with at least one valid (attention_mask 1) token, got shape "
                          f"{list(ids.shape)}")
    if ids.is_floating_point() or ids.dtype == torch.bool:
        raise VerifyError(f"{inputs or 'probe batch'}: input_ids must be integers, got "
                          f"{ids.dtype}")
    vocab = hf_config.text_config.vocab_size
    if int(batch["input_ids"].max()) >= vocab or int(batch["input_ids"].min()) < 0:
        raise VerifyError(f"{inputs or 'probe batch'}: input_ids outside the vocabulary "
                          f"[0, {vocab})")
    batch, valid_orig_BS = _right_pad(batch)
    valid_BS = batch["attention_mask"].bool()
    if batch["pixel_values"] is not None:
        batch["pixel_values"] = batch["pixel_values"].float()
        batch["image_grid_thw"] = batch["image_grid_thw"].long()
    try:
        batch["position_ids"], _ = mrope_position_ids_batch(
            batch["input_ids"], MRopeIndexConfig.from_hf(hf_config),
            attention_mask_BS=batch["attention_mask"], image_grid_N3=batch["image_grid_thw"])
    except ValueError as e:
        raise VerifyError(f"{inputs or 'probe batch'}: image tokens and image_grid_thw disagree "
                          f"({e})") from None

    if batch["pixel_values"] is not None:
        grid_N3, pixel_PD = batch["image_grid_thw"], batch["pixel_values"]
        patches = int((grid_N3[:, 0] * grid_N3[:, 1] * grid_N3[:, 2]).sum())
        patch_dim = Qwen25VLDims.from_hf(hf_config).vision.patch_dim
        if pixel_PD.dim() != 2 or tuple(pixel_PD.shape) != (patches, patch_dim):
            raise VerifyError(f"{inputs or 'probe batch'}: pixel_values has shape "
                              f"{list(pixel_PD.shape)}, image_grid_thw needs [{patches}, "
                              f"{patch_dim}]")

    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    hf_BSV, hf_flags = _hf_logits(hf_dir, batch, device)
    meg_BSV, meg_flags = run_megatron(str(megatron_dir), batch, meta.tp * meta.pp,
                                      timeout=timeout)
    max_abs, mean_kl, max_kl, scale, tokens = compare_logits(hf_BSV, meg_BSV, valid_BS)

    if tolerance is None:
        tolerance = (FP32_TOLERANCE if meta.dtype == "fp32"
                     else LOW_PRECISION_REL_TOLERANCE * max(scale, 1e-6))
    if kl_tolerance is None:
        kl_tolerance = FP32_KL_TOLERANCE if meta.dtype == "fp32" else LOW_PRECISION_KL_TOLERANCE

    if dump_logits is not None:
        # back into the layout of the given inputs (left padding stays left), padding rows 0
        out_BSV = torch.zeros(valid_orig_BS.shape + (meg_BSV.shape[-1],), dtype=torch.float32)
        out_BSV[valid_orig_BS] = meg_BSV[valid_BS]
        Path(dump_logits).parent.mkdir(parents=True, exist_ok=True)
        torch.save(out_BSV, dump_logits)
    return VerifyResult(max_abs_diff=max_abs, mean_kl=mean_kl, max_kl=max_kl, num_tokens=tokens,
                        logit_scale=scale, tolerance=float(tolerance),
                        kl_tolerance=float(kl_tolerance), tp=meta.tp, pp=meta.pp,
                        dtype=meta.dtype, probe=probe, seconds=time.perf_counter() - t0,
                        notes=notes, hf_precision=hf_flags, megatron_precision=meg_flags)
