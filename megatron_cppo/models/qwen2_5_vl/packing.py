"""Packed (THD) micro-batches: several samples back to back in one row, no padding.

    packed = pack_samples([dict(input_ids=ids_S, position_ids=pos_3S, labels=..., loss_mask=...,
                                pixel_values=pix_PD, image_grid_thw=grid_N3), ...])
    logits_1TV = chunk(packed.input_ids, packed.position_ids, pixel_values=packed.pixel_values,
                       image_grid_thw=packed.image_grid_thw, cu_seqlens=packed.cu_seqlens)
    per_sample = unpack(logits_1TV, packed.cu_seqlens)      # [S_k, V] each

Every sample keeps its own M-RoPE ids [3, S_k] (``rope_index.mrope_position_ids``): the ids of a
token depend on the images before it in its own sample, not on its offset in the packed row
(docs/qwen2_5_vl-model.md). Images are concatenated in sample order, which is also the order of the
``<|image_pad|>`` slots in the packed row, so the model splices them as for a padded batch.

Any other per-token tensor of the samples (labels, loss_mask, old log-probs, advantages per token)
is packed the same way: the key's tensors [S_k, ...] become [1, T, ...].

Shapes: T = sum of S_k; cu_K1 int32 [K + 1] (0, S_0, S_0 + S_1, ..., T); position_ids [3, 1, T].
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

VISION_KEYS = ("pixel_values", "image_grid_thw")


@dataclass(kw_only=True)
class PackedBatch:
    """One packed micro-batch (batch dimension 1)."""

    input_ids: torch.Tensor  # [1, T]
    position_ids: torch.Tensor  # [3, 1, T]
    cu_seqlens: torch.Tensor  # int32 [K + 1]
    pixel_values: Optional[torch.Tensor] = None  # [P, patch_dim], samples' images in order
    image_grid_thw: Optional[torch.Tensor] = None  # [N, 3]
    # other per-token keys (labels, loss_mask, ...) [1, T, ...]
    tokens: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def num_samples(self) -> int:
        return self.cu_seqlens.numel() - 1

    @property
    def max_seqlen(self) -> int:
        return int((self.cu_seqlens[1:] - self.cu_seqlens[:-1]).max())

    def model_inputs(self) -> dict:
        """Keyword inputs of ``Qwen25VLModel.forward`` (plus ``input_ids``, ``position_ids``)."""
        return dict(input_ids=self.input_ids, position_ids=self.position_ids,
                    pixel_values=self.pixel_values, image_grid_thw=self.image_grid_thw,
                    cu_seqlens=self.cu_seqlens)

    def to(self, device) -> "PackedBatch":
        def move(t):
            return None if t is None else t.to(device)

        return PackedBatch(input_ids=move(self.input_ids), position_ids=move(self.position_ids),
                           cu_seqlens=move(self.cu_seqlens), pixel_values=move(self.pixel_values),
                           image_grid_thw=move(self.image_grid_thw),
                           tokens={k: move(v) for k, v in self.tokens.items()})


def pack_samples(samples: Sequence[dict]) -> PackedBatch:
    """Pack samples (each: ``input_ids`` [S], ``position_ids`` [3, S], optional ``pixel_values``
    [P, patch_dim] with ``image_grid_thw`` [N, 3], and any other per-token tensors [S, ...]) into
    one row. Every sample must have the same per-token keys (images are optional per sample).
    Raises ValueError naming the sample and key."""
    if not samples:
        raise ValueError("pack_samples needs at least one sample")
    keys = set(samples[0]) - set(VISION_KEYS)
    for k in ("input_ids", "position_ids"):
        if k not in keys:
            raise ValueError(f"sample 0 has no {k!r}")
    lengths = []
    for i, s in enumerate(samples):
        if set(s) - set(VISION_KEYS) != keys:
            raise ValueError(f"sample {i} has keys {sorted(set(s) - set(VISION_KEYS))}, sample 0 "
                             f"has {sorted(keys)}")
        ids, pos = s["input_ids"], s["position_ids"]
        if ids.dim() != 1 or ids.numel() == 0:
            raise ValueError(f"sample {i}: input_ids must be 1-D and non-empty, got shape "
                             f"{tuple(ids.shape)}")
        if tuple(pos.shape) != (3, ids.numel()):
            raise ValueError(f"sample {i}: position_ids must be [3, {ids.numel()}], got "
                             f"{tuple(pos.shape)}")
        for k in keys - {"input_ids", "position_ids"}:
            if s[k].shape[:1] != ids.shape:
                raise ValueError(f"sample {i}: {k!r} has {s[k].shape[0]} rows, input_ids "
                                 f"{ids.numel()}")
        if (s.get("pixel_values") is None) != (s.get("image_grid_thw") is None):
            raise ValueError(f"sample {i}: pixel_values and image_grid_thw go together")
        lengths.append(ids.numel())
    cu = torch.zeros(len(samples) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lengths), 0)
    pixels = [s["pixel_values"] for s in samples if s.get("pixel_values") is not None]
    grids = [s["image_grid_thw"] for s in samples if s.get("image_grid_thw") is not None]
    tokens = {k: torch.cat([s[k] for s in samples]).unsqueeze(0)
              for k in sorted(keys - {"input_ids", "position_ids"})}
    return PackedBatch(
        input_ids=torch.cat([s["input_ids"] for s in samples]).unsqueeze(0),
        position_ids=torch.cat([s["position_ids"] for s in samples], dim=1).unsqueeze(1),
        cu_seqlens=cu,
        pixel_values=torch.cat(pixels) if pixels else None,
        image_grid_thw=torch.cat(grids) if grids else None,
        tokens=tokens)


def unpack(x_1T: torch.Tensor, cu_seqlens: torch.Tensor) -> list[torch.Tensor]:
    """Per-sample views [S_k, ...] of a packed per-token tensor [1, T, ...] (logits, log-probs)."""
    if x_1T.shape[0] != 1:
        raise ValueError(f"a packed tensor has batch dimension 1, got shape {tuple(x_1T.shape)}")
    bounds = cu_seqlens.tolist()
    if bounds[-1] != x_1T.shape[1]:
        raise ValueError(f"cu_seqlens ends at {bounds[-1]}, the tensor has {x_1T.shape[1]} tokens")
    return [x_1T[0, a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def samples_from_padded(batch: dict, lengths: Sequence[int], *, image_token_id: int,
                        merge_unit: int) -> list[dict]:
    """Split a right-padded batch (``input_ids`` [B, S], ``position_ids`` [3, B, S], other
    per-token [B, S, ...] tensors, ``pixel_values`` / ``image_grid_thw`` of all samples in order)
    into samples of the given valid lengths: the inverse of padding (tests and benchmarks)."""
    grid = batch.get("image_grid_thw")
    patches = [] if grid is None else (grid[:, 0] * grid[:, 1] * grid[:, 2]).tolist()
    out, image, row = [], 0, 0
    for b, n in enumerate(lengths):
        s = {"input_ids": batch["input_ids"][b, :n],
             "position_ids": batch["position_ids"][:, b, :n]}
        for k, v in batch.items():
            if k not in ("input_ids", "position_ids", *VISION_KEYS) and v is not None:
                s[k] = v[b, :n]
        slots = int((s["input_ids"] == image_token_id).sum())
        first, rows = image, 0
        while slots > 0:
            if image >= len(patches):
                raise ValueError(f"sample {b} has more image tokens than image_grid_thw gives")
            slots -= patches[image] // merge_unit
            rows += patches[image]
            image += 1
        if image > first:
            s["pixel_values"] = batch["pixel_values"][row:row + rows]
            s["image_grid_thw"] = grid[first:image]
        row += rows
        out.append(s)
    return out
