"""The micro-batches the update feeds through the pipeline, made of ``Sample``s.

A ``Sample`` (megatron_cppo/data/types.py) is one response with its prompt, as a rollout source
returns it (token ids, images, the I+/I- pixel views of the prompt's image, the sampler's
log-probs) plus what the trainer adds (reward, advantage, old and reference log-probs).

Micro-batch layout (``collate``). The B clean rows come first; then, for the P rows that need the
perturbed passes (advantage > 0: ``CPPOLoss.samples_needing_perturbed_passes``), P rows of the I+
view and P rows of the I- view. The three views of a sample share input ids and M-RoPE positions
(the perturbations keep the image size, hence the grid and the image-token count) and differ only
in pixels, so one model call gives all three, and with pipeline parallelism the last stage holds
all of them when the loss needs them. ``pixel_values`` lists the images in row order (clean rows,
then I+ rows, then I- rows), as the model's splice expects.

Response alignment: rows are right-padded; the logit at position ``len(prompt) - 1 + t`` scores
response token t. ``logit_index_RT`` holds those positions for every model row (padding entries
point at a valid position and are masked), so the model computes logits at response positions
only (the vocabulary projection is the costliest part of a small model's step, and prompts with
images are long); ``labels_RT`` are the response ids they score.

Packed micro-batch (``collate(..., packed=True)``, the trainer's ``--sequence-packing``): the same R
model rows back to back in one row without padding, ``input_ids`` [1, N] with N = sum of the rows'
lengths, each token keeping its own M-RoPE ids, ``cu_seqlens`` int32 [R + 1] the row boundaries
(attention stays within a row: models/qwen2_5_vl/packing.py), ``logit_index`` [1, R * T] the same
response positions shifted by each row's offset, and ``logit_rows`` = (R, T): the last stage's
[1, R * T, V] logits reach the loss head as [R, T, V] (forward_step.run_pipeline), so loss heads
read both forms alike. Every other field is the same as padded.

Shapes: B clean rows, P rows with perturbed views, R = B + 2P model rows, S padded length, T the
longest response, 3 M-RoPE axes, D patch dim, N images (packed: N tokens).
"""

from __future__ import annotations

from typing import Sequence

import torch

from megatron_cppo.data.types import Sample
from megatron_cppo.models.qwen2_5_vl.packing import pack_samples
from megatron_cppo.models.qwen2_5_vl.rope_index import mrope_position_ids

__all__ = ["collate", "equalize_count", "sample_cost", "split_by_budget", "split_by_size",
           "to_device"]


def sample_cost(sample: Sample, needs_views: bool) -> int:
    """Tokens a sample puts through the model in the update: text tokens plus image patches, for
    each view that runs (1, or 3 with I+ and I-)."""
    return (sample.num_tokens + sample.num_patches) * (3 if needs_views else 1)


def split_by_size(n: int, size: int) -> list[list[int]]:
    return [list(range(i, min(i + size, n))) for i in range(0, n, size)]


def split_by_budget(costs: Sequence[int], budget: int) -> list[list[int]]:
    """Consecutive samples fill a micro-batch until the next would exceed ``budget`` (a sample
    over budget on its own gets a micro-batch of its own)."""
    groups: list[list[int]] = []
    current, used = [], 0
    for i, c in enumerate(costs):
        if current and used + c > budget:
            groups.append(current)
            current, used = [], 0
        current.append(i)
        used += c
    if current:
        groups.append(current)
    return groups


def equalize_count(groups: list[list[int]], costs: Sequence[int], target: int) -> list[list[int]]:
    """Split the costliest multi-sample micro-batches until there are ``target`` (every rank of a
    data-parallel group runs the same number of micro-batches)."""
    groups = [list(g) for g in groups]
    while len(groups) < target:
        splittable = [i for i, g in enumerate(groups) if len(g) > 1]
        if not splittable:
            raise ValueError(f"{sum(map(len, groups))} samples cannot fill {target} micro-batches "
                             "(the other data-parallel ranks need that many)")
        i = max(splittable, key=lambda j: sum(costs[k] for k in groups[j]))
        g = groups.pop(i)
        half = len(g) // 2
        groups[i:i] = [g[:half], g[half:]]
    return groups


def _positions(sample: Sample, rope_cfg) -> torch.Tensor:
    if sample.position_ids is not None:
        return sample.position_ids.long()
    ids = torch.cat([sample.prompt_ids, sample.response_ids]).long()
    pos_3T, _ = mrope_position_ids(ids, rope_cfg, image_grid_N3=sample.image_grid_thw)
    return pos_3T


def collate(samples: Sequence[Sample], needs_views_B: torch.Tensor, rope_cfg,
            *, with_training_targets: bool = True, packed: bool = False) -> dict:
    """One micro-batch (see the module docstring). ``needs_views_B`` bool [B]: rows whose I+/I-
    views run. With ``with_training_targets`` the trainer-filled fields (advantage, old and
    reference log-probs) are collated too; with ``packed`` the model rows are packed into one."""
    B = len(samples)
    need = needs_views_B.bool().tolist()
    if len(need) != B:
        raise ValueError(f"needs_views_B has {len(need)} entries for {B} samples")
    for i, s in enumerate(samples):
        # a text-only sample's views are its clean input (nothing to perturb): rows without pixels
        if need[i] and s.pixel_values is not None and not s.has_perturbed_views:
            raise ValueError(f"micro-batch row {i} needs its I+/I- views, but the sample has "
                             "no plus_pixel_values / minus_pixel_values")
    rows_P = [i for i in range(B) if need[i]]
    P = len(rows_P)
    S = max(s.num_tokens for s in samples)
    T = max(max(s.response_ids.numel() for s in samples), 1)
    ids_BS = torch.zeros(B, S, dtype=torch.long)
    pos_3BS = torch.zeros(3, B, S, dtype=torch.long)
    index_BT = torch.zeros(B, T, dtype=torch.long)
    mask_BT = torch.zeros(B, T, dtype=torch.bool)
    for b, s in enumerate(samples):
        n, lp, lr = s.num_tokens, s.prompt_ids.numel(), s.response_ids.numel()
        ids_BS[b, :n] = torch.cat([s.prompt_ids, s.response_ids])
        pos_3BS[:, b, :n] = _positions(s, rope_cfg)
        index_BT[b, :lr] = torch.arange(lp - 1, lp - 1 + lr)
        index_BT[b, lr:] = lp - 1  # padding entries: the prompt's last position (masked)
        mask_BT[b, :lr] = True
    labels_BS = torch.zeros_like(ids_BS)
    labels_BS[:, :-1] = ids_BS[:, 1:]

    rows = list(range(B)) + rows_P + rows_P  # model rows: clean, I+, I-
    index_RT = index_BT[rows]
    pixels, grids = [], []
    for view, row_list in (("clean", range(B)), ("plus", rows_P), ("minus", rows_P)):
        for b in row_list:
            s = samples[b]
            if s.pixel_values is None:
                continue
            pixels.append({"clean": s.pixel_values, "plus": s.plus_pixel_values,
                           "minus": s.minus_pixel_values}[view])
            grids.append(s.image_grid_thw)
    mb = dict(
        input_ids=ids_BS[rows], position_ids=pos_3BS[:, rows],
        logit_index_RT=index_RT, labels_RT=labels_BS[rows].gather(1, index_RT),
        pixel_values=torch.cat(pixels) if pixels else None,
        image_grid_thw=torch.cat(grids).long() if grids else None,
        num_clean_rows=B, sample_idx_P=torch.tensor(rows_P, dtype=torch.long),
        response_index_BT=index_BT, response_mask_BT=mask_BT,
        num_model_tokens=int(sum(sample_cost(s, need[i]) for i, s in enumerate(samples))),
    )
    if packed:
        _pack_rows(mb, [samples[b].num_tokens for b in rows])
    if with_training_targets:
        def pad(name):
            out = torch.zeros(B, T, dtype=torch.float32)
            for b, s in enumerate(samples):
                t = getattr(s, name)
                if t is None:
                    raise ValueError(f"sample {b} of the micro-batch has no {name}")
                out[b, :t.numel()] = t
            return out

        mb["advantages_B"] = torch.tensor([s.advantage for s in samples], dtype=torch.float32)
        mb["old_log_probs_BT"] = pad("old_log_probs")
        if all(s.ref_log_probs is not None for s in samples):
            mb["ref_log_probs_BT"] = pad("ref_log_probs")
    return mb


def _pack_rows(mb: dict, lengths_R: list[int]) -> None:
    """Padded model rows of ``mb`` -> one packed row (``packing.pack_samples``), in place, with
    the logit positions shifted by each row's offset (the module docstring's layout)."""
    ids_RS, pos_3RS = mb["input_ids"], mb["position_ids"]
    packed = pack_samples([dict(input_ids=ids_RS[r, :n], position_ids=pos_3RS[:, r, :n])
                           for r, n in enumerate(lengths_R)])
    R, T = mb["logit_index_RT"].shape
    offset_R1 = packed.cu_seqlens[:-1, None].long()
    mb.update(input_ids=packed.input_ids, position_ids=packed.position_ids,
              cu_seqlens=packed.cu_seqlens,
              logit_index_RT=(mb["logit_index_RT"] + offset_R1).reshape(1, R * T),
              logit_rows=(R, T))


def to_device(mb: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v)
            for k, v in mb.items()}
