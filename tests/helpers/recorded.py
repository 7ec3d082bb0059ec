"""Recorded plug-ins for trainer tests: replay a fixed rollout instead of sampling.

``RecordedRollout`` returns, for each prompt (by its row index), the same recorded responses every
time (it cannot sample: the policy's weights do not change them), so these tests prove the update,
the bookkeeping and the checkpoints, never learning. ``RecordedPrompts`` walks the recorded prompts
(``PromptItem``s made from the table) with a position that checkpoints save. ``parity_reward`` is
a deterministic function of the response. All three pass the plug-in contract tests
(test_plugin_contracts.py).
"""

from __future__ import annotations

import copy

import torch

from megatron_cppo.data.types import PromptItem, Sample

VISION_START, VISION_END, IMAGE = 1500, 1501, 1502
PATCH_DIM = 3 * 2 * 14 * 14


def record_rollout(num_prompts: int = 4, n: int = 4, seed: int = 0) -> dict[int, list[Sample]]:
    """Prompt index -> n responses. Even prompts carry a 4x6-patch image and its I+/I- views."""
    g = torch.Generator().manual_seed(seed)
    text = lambda k: torch.randint(2, 1400, (k,), generator=g)  # noqa: E731
    table = {}
    for p in range(num_prompts):
        image = {}
        if p % 2 == 0:
            ids = torch.cat([text(3), torch.tensor([VISION_START]), torch.full((6,), IMAGE),
                             torch.tensor([VISION_END]), text(2 + p)])
            pixels = torch.randn(24, PATCH_DIM, generator=g)
            image = dict(pixel_values=pixels, image_grid_thw=torch.tensor([[1, 4, 6]]),
                         plus_pixel_values=0.9 * pixels,
                         minus_pixel_values=torch.randn(24, PATCH_DIM, generator=g))
        else:
            ids = text(8 + p)
        rows = []
        for i in range(n):
            resp = text(2 + (3 * i + p) % 5)
            rows.append(Sample(prompt_ids=ids, response_ids=resp, group_id=p,
                               rollout_log_probs=-7.0 - torch.rand(resp.numel(), generator=g),
                               response_text=f"prompt {p} response {i}", **image))
        table[p] = rows
    return table


def prompt_item(table: dict[int, list[Sample]], p: int, epoch: int = 0) -> PromptItem:
    """The recorded prompt ``p`` as the data reader would hand it over (no text, no images)."""
    first = table[p][0]
    T = first.prompt_ids.numel()
    image = first.pixel_values is not None
    return PromptItem(
        index=p, epoch=epoch, data_source="recorded", prompt=f"prompt {p}",
        prompt_ids=first.prompt_ids, prompt_position_ids=torch.arange(T).expand(3, -1),
        rope_delta=0,
        image_grid_thw=first.image_grid_thw if image else torch.zeros(0, 3, dtype=torch.long),
        pixel_values=first.pixel_values if image else torch.zeros(0, PATCH_DIM),
        plus_pixel_values=first.plus_pixel_values, minus_pixel_values=first.minus_pixel_values,
        images=[], plus_images=[], minus_images=[], perturbation_kinds=[],
        ground_truth=str(p % 3))


class RecordedPrompts:
    def __init__(self, table: dict[int, list[Sample]]):
        self.table, self.num_prompts, self.position = table, len(table), 0

    def next_batch(self, num_prompts: int) -> list[PromptItem]:
        out = [prompt_item(self.table, (self.position + i) % self.num_prompts,
                           epoch=(self.position + i) // self.num_prompts)
               for i in range(num_prompts)]
        self.position += num_prompts
        return out

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = state["position"]

    def stats(self) -> dict[str, float]:
        return {"data/epoch": float(self.position // self.num_prompts)}

    def reports(self) -> list[str]:
        return []


class RecordedRollout:
    def __init__(self, table: dict[int, list[Sample]]):
        self.table, self.version, self.refits = table, 0, 0

    def generate(self, prompts, sampling):
        out = []
        for group, item in enumerate(prompts):
            for smp in self.table[item.index][:sampling.n]:
                smp = copy.deepcopy(smp)
                smp.group_id, smp.weight_version = group, self.version
                smp.index, smp.ground_truth = item.index, item.ground_truth
                out.append(smp)
        return out

    def refit(self, chunks, state, weight_version):
        self.version, self.refits = weight_version, self.refits + 1

    def close(self):
        pass


def parity_reward(samples):
    """Fraction of even token ids in the response (acc: more than half even; format: always)."""
    out = []
    for s in samples:
        frac = float((s.response_ids % 2 == 0).float().mean()) if s.response_ids.numel() else 0.0
        out.append({"reward": frac, "acc": float(frac > 0.5), "format": 1.0})
    return out
