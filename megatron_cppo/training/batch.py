"""Rollout samples and the micro-batches the update feeds through the pipeline.

A ``Sample`` is one response with its prompt, as a rollout source returns it (token ids, images,
the I+/I- pixel views of the prompt's image, the sampler's log-probs) plus what the trainer adds
(reward, advantage, old and reference log-probs).

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

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch

__all__ = ["Sample", "collate", "sample_cost", "split_by_budget", "split_by_size"]


@dataclass(kw_only=True)
class Sample:
    """One prompt + response. Tensors on the CPU; ids int64."""

    prompt_ids: torch.Tensor                        # [Lp], image tokens expanded
    response_ids: torch.Tensor                      # [Lr]
    group_id: int                                   # the prompt the response was sampled for
    pixel_values: Optional[torch.Tensor] = None     # [P, D] patches of the prompt's images
    image_grid_thw: Optional[torch.Tensor] = None   # [N, 3]
    plus_pixel_values: Optional[torch.Tensor] = None   # I+ (information-preserving), same grid
    minus_pixel_values: Optional[torch.Tensor] = None  # I- (information-removing), same grid
    position_ids: Optional[torch.Tensor] = None     # [3, Lp + Lr] M-RoPE ids (else computed)
    rollout_log_probs: Optional[torch.Tensor] = None  # [Lr] the sampler's log-probs
    weight_version: int = 0                         # policy version that sampled it
    # filled by the trainer
    reward: float = 0.0
    reward_extra: dict = field(default_factory=dict)  # e.g. acc, format
    advantage: float = 0.0
    old_log_probs: Optional[torch.Tensor] = None    # [Lr]
    ref_log_probs: Optional[torch.Tensor] = None    # [Lr]
    response_text: Optional[str] = None

    def __post_init__(self):
        for name in ("prompt_ids", "response_ids"):
            t = getattr(self, name)
            if t.dim() != 1 or t.dtype.is_floating_point:
                raise ValueError(f"Sample.{name} must be a 1-D integer tensor, got "
                                 f"{tuple(t.shape)} {t.dtype}")
        if self.prompt_ids.numel() == 0:
            raise ValueError("Sample.prompt_ids is empty")
        if (self.pixel_values is None) != (self.image_grid_thw is None):
            raise ValueError("Sample.pixel_values and image_grid_thw go together")
        for name in ("plus_pixel_values", "minus_pixel_values"):
            t = getattr(self, name)
            if t is not None and (self.pixel_values is None or t.shape != self.pixel_values.shape):
                raise ValueError(f"Sample.{name} must have the clean pixel_values' shape "
                                 f"(the perturbations keep the image size)")
        n = self.num_tokens
        if self.position_ids is not None and tuple(self.position_ids.shape) != (3, n):
            raise ValueError(f"Sample.position_ids must be [3, {n}], got "
                             f"{tuple(self.position_ids.shape)}")
        if self.rollout_log_probs is not None and self.rollout_log_probs.shape \
                != self.response_ids.shape:
            raise ValueError("Sample.rollout_log_probs must have one entry per response token")

    @classmethod
    def from_prompt(cls, prompt: Any, response_ids: torch.Tensor, *, group_id: int,
                    rollout_log_probs: Optional[torch.Tensor] = None, weight_version: int = 0,
                    response_text: Optional[str] = None) -> "Sample":
        """A response to a prompt item of ``megatron_cppo.data`` (``PromptDataset.next_batch``):
        its ids, pixels and I+/I- views, M-RoPE ids extended over the response, ground truth.
        What a rollout engine builds for each generated response."""
        response_ids = torch.as_tensor(response_ids, dtype=torch.long)
        pixels = prompt.pixel_values
        has_image = pixels is not None and pixels.numel() > 0
        return cls(
            prompt_ids=prompt.input_ids.long(), response_ids=response_ids, group_id=group_id,
            pixel_values=pixels if has_image else None,
            image_grid_thw=prompt.image_grid_thw if has_image else None,
            plus_pixel_values=prompt.pixel_values_plus if has_image else None,
            minus_pixel_values=prompt.pixel_values_minus if has_image else None,
            position_ids=prompt.position_ids_with_response(response_ids.numel()),
            rollout_log_probs=rollout_log_probs, weight_version=weight_version,
            response_text=response_text,
            reward_extra={"ground_truth": prompt.ground_truth, "index": prompt.index})

    @property
    def num_tokens(self) -> int:
        return self.prompt_ids.numel() + self.response_ids.numel()

    @property
    def num_patches(self) -> int:
        return 0 if self.pixel_values is None else int(self.pixel_values.shape[0])

    @property
    def has_perturbed_views(self) -> bool:
        return self.plus_pixel_values is not None and self.minus_pixel_values is not None


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
    from megatron_cppo.models.qwen2_5_vl import mrope_position_ids

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
    from megatron_cppo.models.qwen2_5_vl import pack_samples

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
