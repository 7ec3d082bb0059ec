"""The one forward step of Qwen2.5-VL under megatron's pipeline schedule.

    outputs = run_pipeline(chunks, microbatches, loss_head, forward_only=False)

Each micro-batch is a dict with ``input_ids`` [B, S], ``position_ids`` [3, B, S] (M-RoPE, every
stage), and optionally ``pixel_values`` [P, patch_dim] / ``image_grid_thw`` [N, 3] (the images of
the micro-batch's rows in row order; the first stage only), optionally ``cu_seqlens`` [N + 1] for a
packed micro-batch (B = 1, sequences back to back; models/qwen2_5_vl/packing.py), plus whatever
the loss head reads; with ``logit_index_RT`` [B, T] the last stage computes logits at those
positions only (the trainer's micro-batches: response positions, training/batch.py; packed, with
``logit_rows`` = (R, T), the [1, R * T] positions' logits reach the loss head as [R, T, V]).
Per stage: the first stage takes ids and pixels, later stages only positions (hidden states arrive
through the pipeline); the last stage's chunk returns vocab-sharded logits [B, S|T, Vp/TP] that go to
``loss_head(microbatch, logits_BSV) -> (loss, metrics)``.

The loss rule (megatron-core's schedule, ``forward_step_calc_loss``): a loss head returning two
values has its loss divided by the number of micro-batches by the schedule, so the gradient of one
call equals the gradient of ``mean over micro-batches of loss``. Loss heads therefore return the
plain per-micro-batch loss and never scale it themselves. Across data-parallel ranks megatron's DDP
averages the gradients (each rank's schedule-mean, then the mean over ranks).

Used by the trainer (log-prob passes and the update), the converter's verify, the model tests and
the model-step benchmark; it lives next to the model because it is the model's step (what the
model chunks take and return), whoever drives it.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from megatron_cppo.models.qwen2_5_vl.builder import unwrap
from megatron_cppo.models.qwen2_5_vl.model import stage_inputs

__all__ = ["LossHead", "chunk_forward", "run_pipeline"]

# (micro-batch, logits_BSV) -> (loss 0-d tensor, metrics dict); called on the last stage only.
LossHead = Callable[[dict, torch.Tensor], "tuple[torch.Tensor, dict[str, Any]]"]


def chunk_forward(chunk: torch.nn.Module, mb: dict) -> torch.Tensor:
    """One model chunk on one micro-batch: this stage's inputs, then the model call. Returns
    logits [B, S, Vp/TP] on the last stage, hidden states [S, B, E] elsewhere."""
    inputs = stage_inputs(
        {k: mb.get(k) for k in ("input_ids", "pixel_values", "image_grid_thw")},
        pre_process=unwrap(chunk).pre_process)
    return chunk(inputs.get("input_ids"), mb["position_ids"],
                 pixel_values=inputs.get("pixel_values"),
                 image_grid_thw=inputs.get("image_grid_thw"),
                 cu_seqlens=mb.get("cu_seqlens"), logit_index=mb.get("logit_index_RT"))


def _logit_rows(mb: dict, logits_BSV: torch.Tensor) -> torch.Tensor:
    """A packed micro-batch's logits [1, R * T, V] as the [R, T, V] rows its loss head reads
    (``logit_rows``, training/batch.py); any other micro-batch's unchanged."""
    rows = mb.get("logit_rows")
    return logits_BSV if rows is None else logits_BSV.reshape(*rows, logits_BSV.shape[-1])


def run_pipeline(chunks: Sequence[torch.nn.Module], microbatches: Sequence[dict],
                 loss_head: LossHead, *, forward_only: bool = False) -> list[dict]:
    """Megatron's schedule (1F1B, interleaved with VPP, or no pipelining) over ``microbatches``.

    Returns the loss heads' metrics per micro-batch on the last pipeline stage, [] elsewhere. With
    ``forward_only`` nothing is kept for backward (old / reference log-prob passes); otherwise the
    gradients are accumulated into the chunks (megatron DDP: ``main_grad``) and reduced by the
    config's ``finalize_model_grads_func``. Every rank of a pipeline must pass the same number of
    micro-batches; sequence lengths and batch sizes may differ between micro-batches (megatron
    exchanges shapes, ``variable_seq_lengths``)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    if not microbatches:
        raise ValueError("run_pipeline needs at least one micro-batch")

    def forward_step(data_iterator, chunk):
        mb = next(data_iterator)
        output = chunk_forward(chunk, mb)
        return output, lambda logits_BSV: loss_head(mb, _logit_rows(mb, logits_BSV))

    iterator = ([iter(microbatches) for _ in chunks] if len(chunks) > 1 else iter(microbatches))
    with torch.no_grad() if forward_only else torch.enable_grad():
        return get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iterator, model=list(chunks),
            num_microbatches=len(microbatches),
            seq_length=max(int(mb["input_ids"].shape[1]) for mb in microbatches),
            micro_batch_size=max(int(mb["input_ids"].shape[0]) for mb in microbatches),
            forward_only=forward_only)
