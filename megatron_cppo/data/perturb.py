"""CPPO's image perturbations: I+ (information-preserving) and I- (information-removing).

Per image, as in the reference recipe (vbdi/cppo ``verl/recipe/cppo/cppo_dataset.py``; parameters in
docs/cppo-data.md):

* I+: one of three torchvision transforms, chosen uniformly:
  ``ColorJitter(brightness=(0.2, 1.3), contrast=(0.2, 1.8), saturation=(0.2, 1.8))`` (random order,
  no hue), ``RandomPerspective(distortion_scale=0.2, p=0.5)`` (bilinear, fill 0; identity half of the
  time), ``RandomRotation(10)`` (nearest, same size, fill 0).
* I-: one of two, chosen uniformly: random occlusion (50 noise patches, each side U(0.05, 0.15) of
  the image side, fully inside, overlapping allowed, uniform noise ``floor(255 u)``), or a zoom crop
  (side scale U(0.6, 0.7), crop at a random corner, resized back bilinearly).

The draw order per image is: I+ choice, I+ transform, I- choice, I- transform. Every transform keeps
(W, H), so the processor gives the three views the same ``image_grid_thw``.

Seeding: all randomness comes from torch's CPU generator, forked and seeded with
``perturbation_seed(run_seed, sample_index, epoch)`` (the global RNG is restored afterwards). One draw
per prompt: the trainer shares a sample's views among its n rollouts. A new epoch gives a new draw,
as the reference redraws every time it fetches an item.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

PLUS_KINDS = ("color_jitter", "perspective", "rotation")
MINUS_KINDS = ("occlusion", "zoom_crop")


@dataclass(kw_only=True)
class PerturbationConfig:
    """Defaults are the reference recipe's."""
    brightness: tuple[float, float] = (0.2, 1.3)
    contrast: tuple[float, float] = (0.2, 1.8)
    saturation: tuple[float, float] = (0.2, 1.8)
    perspective_distortion: float = 0.2
    perspective_p: float = 0.5
    rotation_degrees: float = 10.0
    occlusion_patches: int = 50
    occlusion_scale: tuple[float, float] = (0.05, 0.15)
    zoom_scale: tuple[float, float] = (0.6, 0.7)

    def __post_init__(self):
        for name in ("brightness", "contrast", "saturation", "occlusion_scale", "zoom_scale"):
            lo, hi = getattr(self, name)
            if not 0 <= lo <= hi:
                raise ValueError(f"{name} must be a range 0 <= lo <= hi, got {(lo, hi)}")
        if not 0 < self.zoom_scale[1] <= 1:
            raise ValueError(f"zoom_scale must lie in (0, 1], got {self.zoom_scale}")
        if not self.occlusion_scale[1] <= 1:
            raise ValueError(f"occlusion_scale must lie in [0, 1], got {self.occlusion_scale}")
        if not 0 <= self.perspective_distortion <= 1:
            raise ValueError(f"perspective_distortion must lie in [0, 1], got "
                             f"{self.perspective_distortion}")
        if not 0 <= self.perspective_p <= 1:
            raise ValueError(f"perspective_p must lie in [0, 1], got {self.perspective_p}")
        if self.rotation_degrees < 0:
            raise ValueError(f"rotation_degrees must be >= 0, got {self.rotation_degrees}")
        if self.occlusion_patches < 0:
            raise ValueError(f"occlusion_patches must be >= 0, got {self.occlusion_patches}")


def perturbation_seed(run_seed: int, sample_index: int, epoch: int) -> int:
    """A 63-bit seed from (run seed, sample index, epoch), well mixed (numpy SeedSequence)."""
    ss = np.random.SeedSequence([int(run_seed) & 0xFFFFFFFF, int(sample_index), int(epoch)])
    return int(ss.generate_state(2, dtype=np.uint32).astype(np.uint64) @ np.array(
        [1 << 31, 1], dtype=np.uint64)) & ((1 << 63) - 1)


def _uniform(lo: float, hi: float) -> float:
    return float(torch.empty(1).uniform_(lo, hi))


def _randint_inclusive(lo: int, hi: int) -> int:
    """Uniform integer in [lo, hi] (Python's random.randint semantics, as the reference)."""
    return int(torch.randint(lo, hi + 1, (1,)))


class Perturber:
    """Builds the I+ and I- views of a prompt's images."""

    def __init__(self, cfg: PerturbationConfig):
        # torchvision only here: the perturbations need it (vLLM brings it), the records and the
        # rest of megatron_cppo.data do not (the megatron-core 0.19 job has no torchvision)
        import torchvision.transforms as T

        self.cfg = cfg
        self.plus = {
            "color_jitter": T.ColorJitter(brightness=cfg.brightness, contrast=cfg.contrast,
                                          saturation=cfg.saturation),
            "perspective": T.RandomPerspective(distortion_scale=cfg.perspective_distortion,
                                               p=cfg.perspective_p),
            "rotation": T.RandomRotation(degrees=cfg.rotation_degrees),
        }

    def occlusion(self, img: Image.Image) -> Image.Image:
        """``occlusion_patches`` uniform-noise rectangles pasted at random positions."""
        out = np.array(img)  # a copy; writing the array equals PIL's paste of an RGB patch
        w, h = img.size
        for _ in range(self.cfg.occlusion_patches):
            ow = int(_uniform(*self.cfg.occlusion_scale) * w)
            oh = int(_uniform(*self.cfg.occlusion_scale) * h)
            x = _randint_inclusive(0, w - ow)
            y = _randint_inclusive(0, h - oh)
            if ow == 0 or oh == 0:
                continue  # an empty patch changes nothing
            out[y:y + oh, x:x + ow] = (torch.rand(oh, ow, 3, dtype=torch.float64) * 255).to(
                torch.uint8).numpy()
        return Image.fromarray(out)  # uint8 [H, W, 3] -> RGB

    def zoom_crop(self, img: Image.Image) -> Image.Image:
        """Crop a (s W, s H) window at a random position, resize back to (W, H) bilinearly."""
        w, h = img.size
        s = _uniform(*self.cfg.zoom_scale)
        cw, ch = int(w * s), int(h * s)
        left = _randint_inclusive(0, w - cw)
        top = _randint_inclusive(0, h - ch)
        import torchvision.transforms.functional as TF  # see __init__

        return TF.resized_crop(img, top, left, ch, cw, [h, w],
                               interpolation=TF.InterpolationMode.BILINEAR)

    def _one(self, img: Image.Image) -> tuple[Image.Image, Image.Image, str, str]:
        plus_kind = PLUS_KINDS[int(torch.randint(len(PLUS_KINDS), (1,)))]
        plus = self.plus[plus_kind](img)
        minus_kind = MINUS_KINDS[int(torch.randint(len(MINUS_KINDS), (1,)))]
        minus = self.occlusion(img) if minus_kind == "occlusion" else self.zoom_crop(img)
        assert plus.size == img.size and minus.size == img.size, "perturbations keep (W, H)"
        return plus, minus, plus_kind, minus_kind

    def __call__(self, images: list[Image.Image], *, seed: int
                 ) -> tuple[list[Image.Image], list[Image.Image], list[tuple[str, str]]]:
        """(I+ images, I- images, [(plus kind, minus kind)] per image); same seed, same output."""
        plus, minus, kinds = [], [], []
        with torch.random.fork_rng(devices=[]):
            # the CPU generator only (torch.manual_seed would also seed accelerators, and its
            # compile wrapper costs ~2 ms a call)
            torch.default_generator.manual_seed(seed)
            for img in images:
                p, m, pk, mk = self._one(img)
                plus.append(p)
                minus.append(m)
                kinds.append((pk, mk))
        return plus, minus, kinds
