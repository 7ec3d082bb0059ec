"""M-RoPE position ids (megatron_cppo.models.qwen2_5_vl.rope_index) equal transformers'
``Qwen2_5_VLModel.get_rope_index`` on mixed batches: text-only samples, one and several images of
different sizes per sample, right padding, videos with frame timing. Single process, no ranks.

Also guards the parity reference: without ``mm_token_type_ids`` transformers 5.x silently uses 1-D
positions, and the logits then differ (so the parity tests would catch a reference built that way).
"""

from __future__ import annotations

import pytest
import torch

from helpers import tiny_qwen
from megatron_cppo.models.qwen2_5_vl.rope_index import (
    MRopeIndexConfig,
    mrope_position_ids,
    mrope_position_ids_batch,
)


@pytest.fixture(scope="module")
def hf():
    return tiny_qwen.hf_model(tiny_qwen.hf_config(tied=False))


@pytest.fixture(scope="module")
def cfg(hf):
    return MRopeIndexConfig.from_hf(hf.config)


def test_mixed_batches_equal_hf(hf, cfg):
    for mb in tiny_qwen.make_batch(seed=3):
        ours, deltas = mrope_position_ids_batch(
            mb["input_ids"], cfg, attention_mask_BS=mb["attention_mask"],
            image_grid_N3=mb["image_grid_thw"])
        ref, ref_deltas = hf.model.get_rope_index(
            mb["input_ids"], mm_token_type_ids=mb["mm_token_type_ids"],
            image_grid_thw=mb["image_grid_thw"], attention_mask=mb["attention_mask"])
        assert torch.equal(ours, ref)
        assert torch.equal(deltas, ref_deltas.flatten())


def test_single_sample_function_and_known_values(cfg):
    """Text 0, 1, 2; a 1x8x12-patch image (4x6 merged) at t=3; text resumes at 3 + 6 = 9."""
    ids = torch.tensor([5, 6, 7] + [tiny_qwen.IMAGE] * 24 + [8, 9])
    pos, delta = mrope_position_ids(ids, cfg, image_grid_N3=torch.tensor([[1, 8, 12]]))
    assert pos[:, :3].tolist() == [[0, 1, 2]] * 3
    assert pos[0, 3:27].unique().tolist() == [3]
    assert pos[1, 3:27].view(4, 6)[:, 0].tolist() == [3, 4, 5, 6]
    assert pos[2, 3:27].view(4, 6)[0].tolist() == [3, 4, 5, 6, 7, 8]
    assert pos[:, 27:].tolist() == [[9, 10]] * 3
    assert delta == 11 - 29


def test_video_equals_hf(hf, cfg):
    """Videos: temporal ids spaced by tokens_per_second * seconds per grid step."""
    v = tiny_qwen.VIDEO
    ids = torch.tensor([[3, 4, tiny_qwen.VISION_START] + [v] * 12 + [tiny_qwen.VISION_END, 5,
                         tiny_qwen.VISION_START] + [tiny_qwen.IMAGE] * 4 + [6]])
    types = torch.zeros_like(ids)
    types[ids == tiny_qwen.IMAGE] = 1
    types[ids == v] = 2
    video_grid = torch.tensor([[3, 4, 4]])
    image_grid = torch.tensor([[1, 4, 4]])
    ref, ref_delta = hf.model.get_rope_index(ids, mm_token_type_ids=types,
                                             image_grid_thw=image_grid, video_grid_thw=video_grid,
                                             second_per_grid_ts=torch.tensor([1.5]))
    ours, delta = mrope_position_ids_batch(ids, cfg, image_grid_N3=image_grid,
                                           video_grid_N3=video_grid, second_per_grid_t=[1.5])
    assert torch.equal(ours, ref)
    assert torch.equal(delta, ref_delta.flatten())


def test_adjacent_images_are_split_by_grid(cfg):
    """Two images with no text between (HF would fail): the second starts where text would."""
    ids = torch.tensor([1] + [tiny_qwen.IMAGE] * (4 + 6) + [2])
    pos, _ = mrope_position_ids(ids, cfg, image_grid_N3=torch.tensor([[1, 4, 4], [1, 4, 6]]))
    assert pos[:, 1].tolist() == [1, 1, 1]
    assert pos[:, 5].tolist() == [3, 3, 3]  # after a 2x2 merged grid at 1: 1 + 2
    assert pos[:, -1].tolist() == [6, 6, 6]  # after a 2x3 grid at 3: 3 + 3


@pytest.mark.parametrize("grids,match", [
    (torch.tensor([[1, 4, 4], [1, 4, 4]]), "grids given"),
    (torch.tensor([[1, 4, 6]]), "needs 6 tokens"),
    (None, "more image tokens"),
])
def test_grid_mismatch_is_an_error(cfg, grids, match):
    ids = torch.tensor([1] + [tiny_qwen.IMAGE] * 4 + [2])
    with pytest.raises(ValueError, match=match):
        mrope_position_ids(ids, cfg, image_grid_N3=grids)


def test_hf_without_mm_token_type_ids_differs(hf):
    """The parity reference must pass mm_token_type_ids: without it HF's logits change."""
    mb = tiny_qwen.make_batch(seed=3)[0]
    common = dict(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"],
                  pixel_values=mb["pixel_values"], image_grid_thw=mb["image_grid_thw"])
    with torch.no_grad():
        hf.model.rope_deltas = None
        with_types = hf(**common, mm_token_type_ids=mb["mm_token_type_ids"]).logits
        hf.model.rope_deltas = None
        without = hf(**common).logits
    assert float((with_types - without).abs().max()) > 1e-3
