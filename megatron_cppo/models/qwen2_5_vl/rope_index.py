"""M-RoPE position ids of Qwen2.5-VL, computed once per sample on the data side.

Same semantics as transformers' ``Qwen2_5_VLModel.get_rope_index`` (5.x: text 0, image 1, video 2 by
token id): a text token gets the same position p in all three rows (p += 1 per token); a vision
block starting at p gets (p + t * interval, p + h, p + w) over its merged grid
(t, h / merge, w / merge), interval 1 for images and ``tokens_per_second * second_per_grid_t`` for
videos; the text after it resumes at p + max(h, w) / merge. ``delta = max + 1 - length`` carries
the offset into generation.

One difference on purpose: two vision blocks of the same kind with no text token between them are
split by their grid sizes (HF would treat them as one block and fail on the length); real prompts
always have ``<|vision_end|><|vision_start|>`` between images.

The ids are computed from input_ids and the grids only (never from embeddings), shipped with the
batch, and reused by every forward pass and every HF comparison.

Shapes: ids_T [tokens of one sample], pos_3T [3 (t, h, w), tokens], pos_3BS [3, batch, seq],
grid_N3 [images, (t, h, w) in patches].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch


@dataclass(frozen=True, kw_only=True)
class MRopeIndexConfig:
    image_token_id: int
    video_token_id: int
    spatial_merge_size: int
    tokens_per_second: float = 1.0

    def __post_init__(self):
        if self.spatial_merge_size < 1:
            raise ValueError(f"spatial_merge_size must be >= 1, got {self.spatial_merge_size}")
        if self.image_token_id == self.video_token_id:
            raise ValueError("image_token_id and video_token_id must differ")

    @classmethod
    def from_hf(cls, hf_config: Any) -> "MRopeIndexConfig":
        vc = hf_config.vision_config
        return cls(image_token_id=hf_config.image_token_id,
                   video_token_id=hf_config.video_token_id,
                   spatial_merge_size=vc.spatial_merge_size,
                   tokens_per_second=float(getattr(vc, "tokens_per_second", 1)))


def _runs(kind_T: torch.Tensor) -> list[tuple[int, int, int]]:
    """(kind, start, end) of maximal runs of equal values."""
    n = kind_T.numel()
    if n == 0:
        return []
    change = torch.nonzero(kind_T[1:] != kind_T[:-1]).flatten() + 1
    bounds = [0] + change.tolist() + [n]
    kinds = kind_T[bounds[:-1]].tolist()
    return [(k, s, e) for k, s, e in zip(kinds, bounds[:-1], bounds[1:])]


def mrope_position_ids(ids_T: torch.Tensor, cfg: MRopeIndexConfig, *,
                       image_grid_N3: Optional[torch.Tensor] = None,
                       video_grid_N3: Optional[torch.Tensor] = None,
                       second_per_grid_t: Optional[Sequence[float]] = None,
                       ) -> tuple[torch.Tensor, int]:
    """[3, T] int64 M-RoPE ids and the rope delta of one unpadded sample.

    ``image_grid_N3`` / ``video_grid_N3`` hold this sample's images / videos in order of appearance;
    each must be used exactly once (ValueError otherwise)."""
    if ids_T.dim() != 1:
        raise ValueError(f"ids_T must be 1-D (one unpadded sample), got shape {tuple(ids_T.shape)}")
    m = cfg.spatial_merge_size
    kind_T = torch.zeros_like(ids_T)
    kind_T[ids_T == cfg.image_token_id] = 1
    kind_T[ids_T == cfg.video_token_id] = 2
    grids = {1: [] if image_grid_N3 is None else [tuple(g) for g in image_grid_N3.tolist()],
             2: [] if video_grid_N3 is None else [tuple(g) for g in video_grid_N3.tolist()]}
    used = {1: 0, 2: 0}
    seconds = list(second_per_grid_t) if second_per_grid_t is not None else None

    pieces, pos = [], 0
    for kind, start, end in _runs(kind_T):
        if kind == 0:
            n = end - start
            pieces.append(torch.arange(pos, pos + n).expand(3, n))
            pos += n
            continue
        left = end - start
        while left > 0:  # one or more grids of this kind back to back
            name = "image" if kind == 1 else "video"
            if used[kind] >= len(grids[kind]):
                raise ValueError(f"more {name} tokens in the sample than {name} grids given")
            t, h, w = grids[kind][used[kind]]
            if h % m or w % m:
                raise ValueError(f"{name} grid {(t, h, w)} is not divisible by the merge size {m}")
            lh, lw = h // m, w // m
            num = t * lh * lw
            if num > left:
                raise ValueError(f"{name} grid {(t, h, w)} needs {num} tokens, the sample has "
                                 f"{left} consecutive {name} tokens left")
            if kind == 1:
                interval = 1.0
            else:
                sec = seconds[used[kind]] if seconds is not None else 1.0
                interval = cfg.tokens_per_second * float(sec)
            tt = (torch.arange(t) * interval).long()
            t_ids, h_ids, w_ids = torch.meshgrid(tt, torch.arange(lh), torch.arange(lw),
                                                 indexing="ij")
            pieces.append(torch.stack([t_ids, h_ids, w_ids]).reshape(3, -1) + pos)
            pos += max(lh, lw)
            used[kind] += 1
            left -= num
    for kind, name in ((1, "image"), (2, "video")):
        if used[kind] != len(grids[kind]):
            raise ValueError(f"{len(grids[kind])} {name} grids given, {used[kind]} used by the "
                             f"sample's {name} tokens")
    if not pieces:
        return torch.zeros(3, 0, dtype=torch.long), 0
    pos_3T = torch.cat(pieces, dim=1).long()
    delta = int(pos_3T.max()) + 1 - ids_T.numel()
    return pos_3T, delta


def mrope_position_ids_batch(ids_BS: torch.Tensor, cfg: MRopeIndexConfig, *,
                             attention_mask_BS: Optional[torch.Tensor] = None,
                             image_grid_N3: Optional[torch.Tensor] = None,
                             video_grid_N3: Optional[torch.Tensor] = None,
                             second_per_grid_t: Optional[Sequence[float]] = None,
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """[3, B, S] ids of a padded batch (padding positions 0, as HF) and deltas [B].

    Grids are given for the whole batch in sample order (the layout of ``image_grid_thw``)."""
    B, S = ids_BS.shape
    pos_3BS = torch.zeros(3, B, S, dtype=torch.long)
    deltas = torch.zeros(B, dtype=torch.long)
    img = 0 if image_grid_N3 is None else image_grid_N3.shape[0]
    vid = 0 if video_grid_N3 is None else video_grid_N3.shape[0]
    i_used = v_used = 0
    for b in range(B):
        keep_S = (attention_mask_BS[b].bool() if attention_mask_BS is not None
                  else torch.ones(S, dtype=torch.bool))
        ids_T = ids_BS[b][keep_S]
        n_img = _count_grids(ids_T, cfg.image_token_id, image_grid_N3, i_used, cfg)
        n_vid = _count_grids(ids_T, cfg.video_token_id, video_grid_N3, v_used, cfg)
        pos_3T, delta = mrope_position_ids(
            ids_T, cfg,
            image_grid_N3=None if image_grid_N3 is None else image_grid_N3[i_used:i_used + n_img],
            video_grid_N3=None if video_grid_N3 is None else video_grid_N3[v_used:v_used + n_vid],
            second_per_grid_t=(None if second_per_grid_t is None
                               else list(second_per_grid_t)[v_used:v_used + n_vid]))
        pos_3BS[:, b, keep_S] = pos_3T
        deltas[b] = delta
        i_used, v_used = i_used + n_img, v_used + n_vid
    if i_used != img or v_used != vid:
        raise ValueError(f"grids left over: {img - i_used} image, {vid - v_used} video")
    return pos_3BS, deltas


def _count_grids(ids_T: torch.Tensor, token_id: int, grid_N3: Optional[torch.Tensor], first: int,
                 cfg: MRopeIndexConfig) -> int:
    """How many grids, starting at ``first``, this sample's ``token_id`` tokens consume."""
    need = int((ids_T == token_id).sum())
    if need == 0:
        return 0
    if grid_N3 is None:
        raise ValueError(f"the batch has tokens {token_id} but no grids for them")
    per = (grid_N3[:, 0] * grid_N3[:, 1] * grid_N3[:, 2] // cfg.spatial_merge_size ** 2).tolist()
    n, total = 0, 0
    while total < need and first + n < len(per):
        total += per[first + n]
        n += 1
    if total != need:
        raise ValueError(f"a sample has {need} tokens {token_id}; the grids from index {first} "
                         f"give {total}")
    return n
