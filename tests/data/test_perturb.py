"""I+ / I- views: same grid and tokens, seeding, the per-prompt draw, and the reference's transforms.

Proves: the three views of a sample share image_grid_thw, input_ids and positions while their
pixels differ; the same (seed, index, epoch) gives identical pixels, another epoch or index a new
draw; a sample is drawn once and its views are what all n rollouts of the prompt use (processing the
row again gives the same draw); the occlusion and zoom crop (the reference's own transforms, not
torchvision's) equal a transcription of the reference's code fed the same random numbers; the I+ /
I- kinds are chosen uniformly. The three I+ transforms are torchvision's, used as the reference
uses them, so they need no distribution test of their own."""

import numpy as np
import pytest
import torch
from PIL import Image

from helpers.datasets import open_dataset
from megatron_cppo.data.perturb import (MINUS_KINDS, PLUS_KINDS, PerturbationConfig, Perturber,
                                        perturbation_seed)


def test_three_views_share_grid_and_tokens(processor, builtin_dir):
    ds = open_dataset([builtin_dir / "train.parquet"], seed=1, processor=processor)
    for s in ds.next_batch(8):
        # the perturbed passes reuse the clean input_ids / positions: same grid, same patches
        ip = processor.image_processor
        for views in (s.plus_images, s.minus_images):
            out = ip(images=views, return_tensors="pt")
            assert torch.equal(out["image_grid_thw"], s.image_grid_thw)
            text = processor(text=[s.prompt], images=views, return_tensors="pt")
            assert torch.equal(text["input_ids"][0], s.prompt_ids)
        assert s.plus_pixel_values.shape == s.pixel_values.shape == s.minus_pixel_values.shape
        assert not torch.equal(s.minus_pixel_values, s.pixel_values)
        assert [im.size for im in s.plus_images] == [im.size for im in s.images]

    # One draw per (seed, index, epoch): the row processed again (for another rollout of the
    # group, or on another rank) gives the same views; another epoch or seed a new draw.
    idx = s.index
    again = _process(ds, idx, epoch=0)
    assert torch.equal(again.plus_pixel_values, s.plus_pixel_values)
    assert torch.equal(again.minus_pixel_values, s.minus_pixel_values)
    other = _process(ds, idx, epoch=1)
    assert not torch.equal(other.minus_pixel_values, s.minus_pixel_values)
    other_seed = open_dataset([builtin_dir / "train.parquet"], seed=2, processor=processor)
    assert not torch.equal(_process(other_seed, idx, epoch=0).minus_pixel_values,
                           s.minus_pixel_values)


def _process(ds, index, epoch):
    import pyarrow.parquet as pq
    rows = pq.read_table(ds.reader.files[0]).to_pylist()
    return ds.process_row(rows[index], index=index, epoch=epoch)


def test_same_seed_same_pixels_and_new_draws():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (56, 84, 3), dtype=np.uint8))
    p = Perturber(PerturbationConfig())
    a = p([img, img], seed=perturbation_seed(0, 7, 0))
    b = p([img, img], seed=perturbation_seed(0, 7, 0))
    for x, y in zip(a[0] + a[1], b[0] + b[1]):
        assert np.array_equal(np.asarray(x), np.asarray(y))
    assert a[2] == b[2]
    # the global torch RNG is untouched
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    p([img], seed=1)
    assert torch.equal(torch.rand(3), before)
    seeds = {perturbation_seed(s, i, e) for s in range(3) for i in range(50) for e in range(3)}
    assert len(seeds) == 450

    small = img.resize((28, 28))
    kinds = [p([small], seed=s)[2][0] for s in range(300)]
    plus = np.bincount([PLUS_KINDS.index(k[0]) for k in kinds], minlength=3)
    minus = np.bincount([MINUS_KINDS.index(k[1]) for k in kinds], minlength=2)
    # uniform choices: 100 / 150 expected, 5 sigma bounds
    assert np.all(np.abs(plus - 100) < 5 * np.sqrt(300 * (1 / 3) * (2 / 3))), plus
    assert np.all(np.abs(minus - 150) < 5 * np.sqrt(300 * 0.25)), minus


# Transcription of the reference's RandomOcclusion / RandomZoomCrop (vbdi/cppo
# verl/recipe/cppo/cppo_dataset.py), with its random calls routed to `src` so both sides consume
# the same numbers.
class _TorchSource:
    def uniform(self, lo, hi):
        return float(torch.empty(1).uniform_(lo, hi))

    def randint(self, lo, hi):  # inclusive, as random.randint
        return int(torch.randint(lo, hi + 1, (1,)))

    def rand(self, *shape):
        return torch.rand(*shape, dtype=torch.float64).numpy()


def _ref_occlusion(img, src, scale=(0.05, 0.15), iters=50):
    img = img.copy()
    w, h = img.size
    for _ in range(iters):
        occ_w = int(src.uniform(*scale) * w)
        occ_h = int(src.uniform(*scale) * h)
        x = src.randint(0, w - occ_w)
        y = src.randint(0, h - occ_h)
        if occ_w == 0 or occ_h == 0:
            continue  # (the reference would fail on an empty patch; the draws above still happen)
        noise = np.uint8(src.rand(occ_h, occ_w, 3) * 255)
        img.paste(Image.fromarray(noise, mode="RGB"), (x, y))
    return img


def _ref_zoom(img, src, scale=(0.6, 0.7)):
    w, h = img.size
    s = src.uniform(*scale)
    new_w, new_h = int(w * s), int(h * s)
    left = src.randint(0, w - new_w)
    top = src.randint(0, h - new_h)
    return img.crop((left, top, left + new_w, top + new_h)).resize((w, h), Image.BILINEAR)


@pytest.mark.parametrize("size", [(56, 84), (112, 112), (28, 252)])
def test_occlusion_and_zoom_equal_the_reference(size):
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, size[::-1] + (3,),
                                                            dtype=np.uint8))
    p = Perturber(PerturbationConfig())
    for seed in range(5):
        torch.manual_seed(seed)
        ours = p.occlusion(img)
        torch.manual_seed(seed)
        ref = _ref_occlusion(img, _TorchSource())
        assert np.array_equal(np.asarray(ours), np.asarray(ref))
        assert not np.array_equal(np.asarray(ours), np.asarray(img))
        torch.manual_seed(seed)
        ours = p.zoom_crop(img)
        torch.manual_seed(seed)
        assert np.array_equal(np.asarray(ours), np.asarray(_ref_zoom(img, _TorchSource())))
