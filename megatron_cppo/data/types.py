"""The records both sides of the trainer's seams use, one name per field end to end.

    PromptItem   one prompt, processed: what the data reader makes (data/dataset.py) and the
                 rollout engine samples for (rollout/source.py)
    Sample       one response with its prompt: what a rollout source returns (built from a
                 PromptItem by ``Sample.from_prompt``) and the trainer fills in (reward,
                 advantage, old and reference log-probs) and batches (training/batch.py)

A field keeps its name across the seam: ``PromptItem.prompt_ids`` is ``Sample.prompt_ids``,
``PromptItem.plus_pixel_values`` is ``Sample.plus_pixel_values``, ``PromptItem.ground_truth`` is
``Sample.ground_truth``, ``PromptItem.index`` is ``Sample.index``.

Shapes: T prompt tokens (image tokens expanded), R response tokens, N images, P patches (sum of
t*h*w over the images), D values per patch (3 * 2 * 14 * 14 = 1176), 3 M-RoPE axes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch

__all__ = ["PromptItem", "Sample"]


@dataclass
class PromptItem:
    """One prompt with its three image views. The I+ / I- views share ``prompt_ids``,
    ``prompt_position_ids`` and ``image_grid_thw`` with the clean view (the perturbations keep the
    image size); only the pixels differ. The n rollouts of the prompt share these views: one
    perturbation draw per prompt, seeded by (run seed, row index, epoch)."""

    index: int                       # global row index in the concatenated files (stable)
    epoch: int
    data_source: str
    prompt: str                      # chat-templated text, one <|image_pad|> per image (vLLM input)
    prompt_ids: torch.Tensor         # [T] int64, image tokens expanded
    prompt_position_ids: torch.Tensor  # [3, T] int64 M-RoPE ids
    rope_delta: int                  # max position + 1 - T (generation offset)
    image_grid_thw: torch.Tensor     # [N, 3] int64
    pixel_values: torch.Tensor       # [P, D] float32, clean
    plus_pixel_values: Optional[torch.Tensor]   # [P, D] I+ (None without perturbations)
    minus_pixel_values: Optional[torch.Tensor]  # [P, D] I-
    images: list                     # resized clean RGB PIL images (what the processor saw)
    plus_images: list
    minus_images: list
    perturbation_kinds: list[tuple[str, str]]  # per image: (I+ kind, I- kind)
    ground_truth: str
    response: Optional[str] = None   # warm-start target, if the row has one
    extra_info: dict = field(default_factory=dict)

    def position_ids_with_response(self, num_response_tokens: int) -> torch.Tensor:
        """[3, T + R] M-RoPE ids of the prompt followed by R response (text) tokens.

        Text after the prompt continues at ``T + rope_delta`` in all three rows; this equals
        ``mrope_position_ids`` of the concatenated ids (tested)."""
        T = self.prompt_ids.numel()
        tail_3R = (T + self.rope_delta + torch.arange(num_response_tokens)).expand(3, -1)
        return torch.cat([self.prompt_position_ids, tail_3R], dim=1)

    @property
    def has_image(self) -> bool:
        return self.pixel_values is not None and self.pixel_values.numel() > 0


@dataclass(kw_only=True)
class Sample:
    """One prompt + response. Tensors on the CPU; ids int64."""

    prompt_ids: torch.Tensor                        # [T], image tokens expanded
    response_ids: torch.Tensor                      # [R]
    group_id: int                                   # the prompt the response was sampled for
    pixel_values: Optional[torch.Tensor] = None     # [P, D] patches of the prompt's images
    image_grid_thw: Optional[torch.Tensor] = None   # [N, 3]
    plus_pixel_values: Optional[torch.Tensor] = None   # I+ (information-preserving), same grid
    minus_pixel_values: Optional[torch.Tensor] = None  # I- (information-removing), same grid
    position_ids: Optional[torch.Tensor] = None     # [3, T + R] M-RoPE ids (else computed)
    rollout_log_probs: Optional[torch.Tensor] = None  # [R] the sampler's log-probs
    weight_version: int = 0                         # policy version that sampled it
    response_text: Optional[str] = None
    finish_reason: Optional[str] = None             # "stop" or "length" (the sampler's)
    ground_truth: Optional[str] = None              # the prompt's answer, for the reward
    index: Optional[int] = None                     # the prompt's row index (PromptItem.index)
    # filled by the trainer
    reward: float = 0.0
    reward_extra: dict = field(default_factory=dict)  # the reward's other outputs: acc, format
    advantage: float = 0.0
    old_log_probs: Optional[torch.Tensor] = None    # [R]
    ref_log_probs: Optional[torch.Tensor] = None    # [R]

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
    def from_prompt(cls, prompt: PromptItem, response_ids: Any, *, group_id: int,
                    rollout_log_probs: Optional[torch.Tensor] = None, weight_version: int = 0,
                    response_text: Optional[str] = None,
                    finish_reason: Optional[str] = None) -> "Sample":
        """A response to ``prompt``: its ids, pixels and I+/I- views, M-RoPE ids extended over
        the response, ground truth and row index. What a rollout source builds for each
        generated response (and the warm start for each target response)."""
        response_ids = torch.as_tensor(response_ids, dtype=torch.long)
        image = prompt.has_image
        return cls(
            prompt_ids=prompt.prompt_ids.long(), response_ids=response_ids, group_id=group_id,
            pixel_values=prompt.pixel_values if image else None,
            image_grid_thw=prompt.image_grid_thw if image else None,
            plus_pixel_values=prompt.plus_pixel_values if image else None,
            minus_pixel_values=prompt.minus_pixel_values if image else None,
            position_ids=prompt.position_ids_with_response(response_ids.numel()),
            rollout_log_probs=rollout_log_probs, weight_version=weight_version,
            response_text=response_text, finish_reason=finish_reason,
            ground_truth=prompt.ground_truth, index=prompt.index)

    @property
    def num_tokens(self) -> int:
        return self.prompt_ids.numel() + self.response_ids.numel()

    @property
    def num_patches(self) -> int:
        return 0 if self.pixel_values is None else int(self.pixel_values.shape[0])

    @property
    def has_perturbed_views(self) -> bool:
        return self.plus_pixel_values is not None and self.minus_pixel_values is not None
