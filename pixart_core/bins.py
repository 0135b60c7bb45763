"""Aspect-ratio bins (../shared/pixart_spec.md §7), bin lookup, resize-and-crop back, and size checks.

Keys are h/w rounded to two decimals (strings, as in PixArt's diffusion/data/datasets/utils.py);
values are (height, width) in pixels.
"""
from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F

from . import checks
from .checks import InputError

# The 256 table; 512/1024/2048 are 2/4/8 times it, key for key.
ASPECT_RATIO_256 = {
    "0.25": (128, 512), "0.26": (128, 496), "0.27": (128, 480), "0.28": (128, 464),
    "0.32": (144, 448), "0.33": (144, 432), "0.35": (144, 416), "0.4": (160, 400),
    "0.42": (160, 384), "0.48": (176, 368), "0.5": (176, 352), "0.52": (176, 336),
    "0.57": (192, 336), "0.6": (192, 320), "0.68": (208, 304), "0.72": (208, 288),
    "0.78": (224, 288), "0.82": (224, 272), "0.88": (240, 272), "0.94": (240, 256),
    "1.0": (256, 256), "1.07": (256, 240), "1.13": (272, 240), "1.21": (272, 224),
    "1.29": (288, 224), "1.38": (288, 208), "1.46": (304, 208), "1.67": (320, 192),
    "1.75": (336, 192), "2.0": (352, 176), "2.09": (368, 176), "2.4": (384, 160),
    "2.5": (400, 160), "2.89": (416, 144), "3.0": (432, 144), "3.11": (448, 144),
    "3.62": (464, 128), "3.75": (480, 128), "3.88": (496, 128), "4.0": (512, 128),
}


def _scaled(table: dict, factor: int) -> dict:
    return {k: (h * factor, w * factor) for k, (h, w) in table.items()}


def _subset(table: dict, keys) -> dict:
    return {k: table[k] for k in keys}


ASPECT_RATIO_512 = _scaled(ASPECT_RATIO_256, 2)
ASPECT_RATIO_1024 = _scaled(ASPECT_RATIO_256, 4)
ASPECT_RATIO_2048 = _scaled(ASPECT_RATIO_256, 8)
# No 4K checkpoint exists; this is 4 x the 1024 table over all 40 keys (PixArt's ASPECT_RATIO_2880_TEST,
# despite its name, is the same 4096-base table restricted to the 2048 TEST keys).
ASPECT_RATIO_4096 = _scaled(ASPECT_RATIO_1024, 4)

ASPECT_RATIO_2880 = {
    "0.25": (1408, 5760), "0.26": (1408, 5568), "0.27": (1408, 5376), "0.28": (1408, 5184),
    "0.32": (1600, 4992), "0.33": (1600, 4800), "0.34": (1600, 4672), "0.4": (1792, 4480),
    "0.42": (1792, 4288), "0.47": (1920, 4096), "0.49": (1920, 3904), "0.51": (1920, 3776),
    "0.55": (2112, 3840), "0.59": (2112, 3584), "0.68": (2304, 3392), "0.72": (2304, 3200),
    "0.78": (2496, 3200), "0.83": (2496, 3008), "0.89": (2688, 3008), "0.93": (2688, 2880),
    "1.0": (2880, 2880), "1.07": (2880, 2688), "1.12": (3008, 2688), "1.21": (3008, 2496),
    "1.28": (3200, 2496), "1.39": (3200, 2304), "1.47": (3392, 2304), "1.7": (3584, 2112),
    "1.82": (3840, 2112), "2.03": (3904, 1920), "2.13": (4096, 1920), "2.39": (4288, 1792),
    "2.5": (4480, 1792), "2.92": (4672, 1600), "3.0": (4800, 1600), "3.12": (4992, 1600),
    "3.68": (5184, 1408), "3.82": (5376, 1408), "3.95": (5568, 1408), "4.0": (5760, 1408),
}

# "T1024" in the spec: the 33 keys of ASPECT_RATIO_{256,512,1024}_TEST (also diffusers' *_BIN tables).
TEST_KEYS_1024 = (
    "0.25", "0.28", "0.32", "0.33", "0.35", "0.4", "0.42", "0.48", "0.5", "0.52", "0.57", "0.6",
    "0.68", "0.72", "0.78", "0.82", "0.88", "0.94", "1.0", "1.07", "1.13", "1.21", "1.29", "1.38",
    "1.46", "1.67", "1.75", "2.0", "2.09", "2.4", "2.5", "3.0", "4.0",
)
# "T2048": ASPECT_RATIO_2048_TEST keeps 0.26 where the smaller tables keep 0.28.
TEST_KEYS_2048 = ("0.25", "0.26") + TEST_KEYS_1024[2:]

ASPECT_RATIO_256_TEST = _subset(ASPECT_RATIO_256, TEST_KEYS_1024)
ASPECT_RATIO_512_TEST = _subset(ASPECT_RATIO_512, TEST_KEYS_1024)
ASPECT_RATIO_1024_TEST = _subset(ASPECT_RATIO_1024, TEST_KEYS_1024)
ASPECT_RATIO_2048_TEST = _subset(ASPECT_RATIO_2048, TEST_KEYS_2048)
ASPECT_RATIO_4096_TEST = _subset(ASPECT_RATIO_4096, TEST_KEYS_2048)  # = PixArt's ASPECT_RATIO_2880_TEST

BIN_TABLES = {
    256: ASPECT_RATIO_256, 512: ASPECT_RATIO_512, 1024: ASPECT_RATIO_1024,
    2048: ASPECT_RATIO_2048, 2880: ASPECT_RATIO_2880, 4096: ASPECT_RATIO_4096,
}
TEST_BIN_TABLES = {
    256: ASPECT_RATIO_256_TEST, 512: ASPECT_RATIO_512_TEST, 1024: ASPECT_RATIO_1024_TEST,
    2048: ASPECT_RATIO_2048_TEST, 4096: ASPECT_RATIO_4096_TEST,
}


def get_table(resolution: int, table: str = "full") -> dict:
    """The bin table for a base resolution; table="test" picks the reduced inference set."""
    tables = {"full": BIN_TABLES, "test": TEST_BIN_TABLES}.get(table)
    if tables is None:
        raise InputError(f"table must be 'full' or 'test', got {table!r}")
    if resolution not in tables:
        raise InputError(f"no {table} aspect-ratio table for resolution {resolution}; "
                         f"available: {sorted(tables)}")
    return tables[resolution]


def nearest_bin_key(height: float, width: float, resolution: int, table: str = "full") -> str:
    """The ratio key (e.g. "0.57") of the bin closest to height/width (diffusers' classify_height_width_bin)."""
    if checks.real_number("height", height) <= 0 or checks.real_number("width", width) <= 0:
        raise InputError(f"height and width must be positive, got {height}x{width}")
    ar = float(height / width)
    # min() keeps the first of equal candidates, which is diffusers' tie rule (dict order).
    return min(get_table(resolution, table), key=lambda k: abs(float(k) - ar))


def nearest_bin(height: int, width: int, resolution: int, table: str = "full") -> tuple[int, int]:
    """(bin_h, bin_w) whose ratio key is closest to height/width."""
    return get_table(resolution, table)[nearest_bin_key(height, width, resolution, table)]


def resize_and_center_crop(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Scale (B, C, H, W) to cover height x width, then centre-crop (diffusers' resize_and_crop_tensor)."""
    height, width = checks.whole_number("height", height, 1), checks.whole_number("width", width, 1)
    if images.ndim != 4 or 0 in images.shape:
        raise InputError(f"images must be a non-empty batch (B, C, H, W), got shape {tuple(images.shape)}")
    h, w = images.shape[-2:]
    if (h, w) == (height, width):
        return images
    ratio = max(height / h, width / w)
    # int() truncates like diffusers; max() guards the rare case where h * (height / h) rounds below height.
    new_h, new_w = max(int(h * ratio), height), max(int(w * ratio), width)
    scaled_bytes = images.shape[0] * images.shape[1] * new_h * new_w * images.element_size()
    checks.check_fits(f"covering {width}x{height} px from {w}x{h} px images (scaled to {new_w}x{new_h} before "
                      "the crop)", scaled_bytes, images.device,
                      "crop the images closer to the wanted aspect ratio first")
    images = F.interpolate(images, size=(new_h, new_w), mode="bilinear", align_corners=False)
    top, left = (new_h - height) // 2, (new_w - width) // 2
    return images[..., top:top + height, left:left + width]


def _nearest_multiples(v: int, m: int = 16) -> str:
    lo = v // m * m
    return f"{lo + m}" if lo <= 0 else f"{lo} or {lo + m}"


def check_size(height: int, width: int, max_side: int = 4096, allow_larger: bool = False) -> tuple[int, int]:
    """Validate an image size in pixels: positive, a multiple of 16 (VAE /8, patch 2), at most max_side."""
    for name, v in (("height", height), ("width", width)):
        if not isinstance(v, numbers.Integral) or isinstance(v, bool):
            raise InputError(f"{name} must be an integer number of pixels, got {v!r}")
        if v <= 0:
            raise InputError(f"{name} must be positive, got {v}; use a multiple of 16 such as 16, 512 or 1024")
        if v % 16:
            raise InputError(f"{name} {v} is not a multiple of 16 (8 for the VAE x 2 for the patch); "
                             f"use {_nearest_multiples(v)}")
        if v > max_side and not allow_larger:
            raise InputError(f"{name} {v} is larger than the maximum side {max_side}; use at most {max_side}, "
                             f"or pass allow_larger=True to go beyond it")
    return int(height), int(width)


__all__ = [
    "ASPECT_RATIO_256", "ASPECT_RATIO_256_TEST", "ASPECT_RATIO_512", "ASPECT_RATIO_512_TEST", "ASPECT_RATIO_1024",
    "ASPECT_RATIO_1024_TEST", "ASPECT_RATIO_2048", "ASPECT_RATIO_2048_TEST", "ASPECT_RATIO_2880", "ASPECT_RATIO_4096",
    "ASPECT_RATIO_4096_TEST", "BIN_TABLES", "TEST_BIN_TABLES", "check_size", "get_table", "nearest_bin",
    "resize_and_center_crop",
]
