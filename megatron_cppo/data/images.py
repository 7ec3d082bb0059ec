"""Image decoding and the reference's resize (before any perturbation).

The reference loads each image with qwen-vl-utils' ``fetch_image``: RGBA is composited on white, other
modes converted to RGB, then the image is resized (PIL's default bicubic) to the nearest sides that
are multiples of 28 (patch 14 x merge 2) with the pixel count kept within [min_pixels, max_pixels]
(``smart_resize``; short sides under 28 become 28). The perturbations run on this resized image, so
the clean, I+ and I- views share (W, H), the processor's grid and every token position.
"""

from __future__ import annotations

import io
import math
import os
from pathlib import Path
from typing import Any, Optional

import numpy as np
from PIL import Image

IMAGE_FACTOR = 28  # patch_size 14 x spatial_merge_size 2
MAX_ASPECT_RATIO = 200  # smart_resize refuses longer/shorter ratios


class ImageError(ValueError):
    """An image that cannot be used; ``reason`` is a skip-count key."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def smart_resize(height: int, width: int, *, min_pixels: int, max_pixels: int,
                 factor: int = IMAGE_FACTOR) -> tuple[int, int]:
    """(height, width) rounded to multiples of ``factor`` with min_pixels <= h*w <= max_pixels.

    Same arithmetic as qwen-vl-utils' and transformers' Qwen2-VL ``smart_resize``."""
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ImageError("image_aspect_ratio",
                         f"aspect ratio {max(height, width) / min(height, width):.1f} exceeds "
                         f"{MAX_ASPECT_RATIO}")
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB, as the reference's loader converts (RGBA composited on white, every other mode
    through PIL's ``convert``), except for high-bit-depth grayscale: PIL clips 16-bit values
    to 255 (a 16-bit PNG turns almost all white), so those are scaled to 8 bits first: 16-bit
    values v / 257; a 32-bit integer image the same when a value exceeds 255 (16-bit content, as
    older PIL opens 16-bit PNGs), else as it is; a float image clipped to [0, 255]."""
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        v = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16") or (img.mode == "I" and v.max() > 255):
            v = np.clip(v, 0, 65535) / 257.0
        v = np.clip(v, 0, 255)
        return Image.fromarray(np.rint(v).astype(np.uint8), mode="L").convert("RGB")
    if img.mode == "RGBA":
        out = Image.new("RGB", img.size, (255, 255, 255))
        out.paste(img, mask=img.split()[3])
        return out
    return img.convert("RGB")


def resolve_image_path(path: Any, base_dir: Optional[Path]) -> tuple[Optional[Path], list[Path]]:
    """(the file, the candidates tried) of an image path of a row. An absolute path is itself. A
    relative one is looked up as ``datasets`` and verl read it: against the current directory
    (where the preprocessing script that wrote it ran: the reference's ViRL39K parquet stores
    every image it did not resize as ``{bytes: None, path: <relative path>}``), then against the
    data file's folder (raw ViRL39K's ``image`` column, files written with paths next to them)."""
    p = Path(str(path).removeprefix("file://"))
    tried = [p] if p.is_absolute() else [Path.cwd() / p] + ([base_dir / p] if base_dir else [])
    return next((c for c in tried if c.is_file()), None), tried


def image_source(entry: Any, base_dir: Optional[Path]) -> Any:
    """Where one image entry of a row (``{"bytes": b, "path": p}``, raw bytes, a path string or a
    PIL image) is read from: the PIL image itself, its bytes (a BytesIO) or its file (relative
    paths: ``resolve_image_path``), nothing opened. Raises ImageError("image_missing") for an
    entry with neither bytes nor a path, or a file found at none of the places tried."""
    if isinstance(entry, Image.Image):
        return entry
    data, path = None, None
    if isinstance(entry, dict):
        data, path = entry.get("bytes"), entry.get("path") or entry.get("image")
    elif isinstance(entry, (bytes, bytearray, memoryview)):
        data = entry
    elif isinstance(entry, (str, os.PathLike)):
        path = entry
    if isinstance(data, (bytes, bytearray, memoryview)) and len(data):
        return io.BytesIO(bytes(data))
    if isinstance(path, (str, os.PathLike)) and str(path):
        found, tried = resolve_image_path(path, base_dir)
        if found is None:
            raise ImageError("image_missing", f"image file {path} not found (tried "
                             f"{' and '.join(map(str, tried))})")
        return found
    raise ImageError("image_missing", "image entry holds neither bytes nor a path")


def open_image(entry: Any, *, base_dir: Optional[Path], max_image_pixels: int) -> Image.Image:
    """One image entry of a row (``image_source``) opened lazily: its header read (size, mode),
    its pixels not decoded. Raises ImageError with a skip reason (missing, undecodable header,
    over ``max_image_pixels``: a huge image is refused before it is decompressed)."""
    source = image_source(entry, base_dir)
    if isinstance(source, Image.Image):
        img = source
    else:
        try:
            img = Image.open(source)
        except Image.DecompressionBombError as e:
            raise ImageError("image_over_pixel_limit", str(e)) from e
        except Exception as e:  # PIL raises many types for corrupt data
            raise ImageError("image_undecodable", f"cannot decode image: {e}") from e
    if img.width * img.height > max_image_pixels:
        img.close() if img is not entry else None
        raise ImageError("image_over_pixel_limit",
                         f"image of {img.width}x{img.height} pixels exceeds "
                         f"max_image_pixels={max_image_pixels}")
    if img.width < 1 or img.height < 1:
        raise ImageError("image_undecodable", "image has no pixels")
    return img


def min_side_size(width: int, height: int, min_side: int) -> tuple[int, int]:
    """(width, height) after the reference's ViRL39K preprocessing (``virl39k.py``'s
    ``resize_min_side``): an image whose shorter side is under ``min_side`` is scaled up, aspect
    kept, until it is ``min_side``; any other is unchanged. ``min_side`` 0: unchanged."""
    if min(width, height) >= min_side:
        return width, height
    scale = max(min_side / width, min_side / height)
    return int(round(width * scale)), int(round(height * scale))


def image_size(entry: Any, *, base_dir: Optional[Path], max_image_pixels: int,
               min_side: int = 0) -> tuple[int, int]:
    """(width, height) of an image entry from its header alone (``open_image``'s checks), after
    ``min_side_size``."""
    img = open_image(entry, base_dir=base_dir, max_image_pixels=max_image_pixels)
    size = img.size
    if img is not entry:
        img.close()
    return min_side_size(*size, min_side)


def decode_image(entry: Any, *, base_dir: Optional[Path], max_image_pixels: int,
                 min_side: int = 0) -> Image.Image:
    """One image entry of a row -> an RGB PIL image (``open_image``, then the pixels decoded;
    with ``min_side``, a shorter side under it scaled up as ``min_side_size`` says, LANCZOS, in
    the file's own mode as the reference's preprocessing does, before the conversion to RGB).
    Raises ImageError with a skip reason."""
    img = open_image(entry, base_dir=base_dir, max_image_pixels=max_image_pixels)
    if img is not entry:
        try:
            img.load()
        except Image.DecompressionBombError as e:
            raise ImageError("image_over_pixel_limit", str(e)) from e
        except Exception as e:  # truncated or corrupt pixel data
            raise ImageError("image_undecodable", f"cannot decode image: {e}") from e
    size = min_side_size(img.width, img.height, min_side)
    if size != img.size:
        img = img.resize(size, Image.LANCZOS)
    return _to_rgb(img)


def image_tokens(width: int, height: int, *, min_pixels: int, max_pixels: int) -> int:
    """The language-model tokens of an image of (width, height): one per 28 x 28 block (patch 14,
    2 x 2 patches merged) of the size the processor's grid has. That is the reference's resize
    followed by the processor's own ``smart_resize`` of the resized image: the identity when the
    first lands inside the pixel bounds, but not always when they are close (min = max = 112^2
    takes 90x60 to 140x112, above max_pixels, which the processor then takes to 112x84)."""
    h, w = smart_resize(height, width, min_pixels=min_pixels, max_pixels=max_pixels)
    h, w = smart_resize(h, w, min_pixels=min_pixels, max_pixels=max_pixels)
    return (h // IMAGE_FACTOR) * (w // IMAGE_FACTOR)


def resize_for_qwen(img: Image.Image, *, min_pixels: int, max_pixels: int) -> Image.Image:
    """The reference's resize: sides multiples of 28 within the pixel bounds (bicubic)."""
    h, w = smart_resize(img.height, img.width, min_pixels=min_pixels, max_pixels=max_pixels)
    if (w, h) == img.size:
        return img
    return img.resize((w, h), Image.BICUBIC)
