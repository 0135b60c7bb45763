"""PixArt Resolution (aspect-ratio bins -> size + empty latent) and PixArt Resize & Crop."""
from __future__ import annotations

import torch
from comfy_api.latest import io

import comfy.model_management as mm

from ..pixart_core import bins
from ..pixart_core.checks import check_fits
from .comfy_model import pixart_config_of
from .common import CATEGORY, MAX_RESOLUTION, check_widgets

FROM_MODEL = "from model"
SIZE_CLASSES = (FROM_MODEL, "256", "512", "1024", "2048", "2880", "4096")
CUSTOM = "custom"
MAX_SIDE = 4096  # largest requested side ('custom'); the 2880/4096 bins themselves go beyond it


def _label(key: str) -> str:
    ratio = float(key)
    shape = "square" if ratio == 1.0 else ("portrait" if ratio > 1.0 else "landscape")
    return f"{ratio:.2f} {shape}"


RATIO_KEYS = list(bins.ASPECT_RATIO_256)  # h/w keys shared by the 256 ... 4096 tables
ASPECT_CHOICES = {_label(k): k for k in RATIO_KEYS}
DEFAULT_ASPECT = _label("1.0")


def model_resolution(model) -> int:
    """The bin table a MODEL generates at: its config's resolution, or ComfyUI's input_size x 8."""
    config = pixart_config_of(model)
    if config is not None:
        return config.resolution
    unet = getattr(getattr(getattr(model, "model", None), "model_config", None), "unet_config", {}) or {}
    if unet.get("input_size"):
        return int(unet["input_size"]) * 8
    raise ValueError("size_class 'from model' cannot tell this model's resolution; choose the size class "
                     "(e.g. 1024) yourself")


def pick_bin(resolution: int, aspect_ratio: str, width: int, height: int) -> tuple[int, int]:
    """(height, width) of the bin for a ratio choice, or the nearest bin to width x height for 'custom'."""
    if aspect_ratio == CUSTOM:
        for name, side in (("width", width), ("height", height)):
            if isinstance(side, int) and side > MAX_SIDE:
                raise ValueError(f"{name} {side} is larger than {MAX_SIDE} px, the largest side PixArt-Σ is made for; "
                                 f"use at most {MAX_SIDE} and upscale the image afterwards")
        bins.check_size(height, width, max_side=MAX_SIDE)
        return bins.nearest_bin(height, width, resolution)
    if aspect_ratio not in ASPECT_CHOICES:
        raise ValueError(f"aspect_ratio {aspect_ratio!r} is not a listed ratio; pick one from the list or 'custom'")
    table = bins.get_table(resolution)
    key = ASPECT_CHOICES[aspect_ratio]
    if key not in table:  # the 2880 table has its own keys: take the closest ratio
        key = min(table, key=lambda k: abs(float(k) - float(ASPECT_CHOICES[aspect_ratio])))
    return table[key]


class PixArtSuiteResolution(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PixArtSuiteResolution",
            display_name="PixArt Resolution",
            category=CATEGORY,
            description="Picks a size PixArt was trained at (its aspect-ratio bins) and makes the empty latent for "
                        "it. For an exact other size, generate at the bin and use 'PixArt Resize & Crop' on the image.",
            inputs=[
                io.Combo.Input("size_class", options=list(SIZE_CLASSES), default="1024",
                               tooltip="Bin table: 'from model' uses the connected model's (1024 for Σ-1024, 2048 "
                                       "for Σ-2K, ...); or pick 256 to 4096 (2880 and 4096 are for KV-compressed 4K)."),
                io.Combo.Input("aspect_ratio", options=[*ASPECT_CHOICES, CUSTOM], default=DEFAULT_ASPECT,
                               tooltip="Height/width of the bin (below 1 landscape, above 1 portrait), or 'custom' "
                                       "to take the bin nearest to width x height."),
                io.Int.Input("width", default=1024, min=16, max=MAX_RESOLUTION, step=16,
                             tooltip="Wanted width in px (custom only; a multiple of 16, at most 4096)."),
                io.Int.Input("height", default=1024, min=16, max=MAX_RESOLUTION, step=16,
                             tooltip="Wanted height in px (custom only; a multiple of 16, at most 4096)."),
                io.Int.Input("batch_size", default=1, min=1, max=4096, tooltip="Number of latents (images) in the batch."),
                io.Model.Input("model", optional=True, tooltip="The PixArt model, needed for size_class 'from model'."),
            ],
            outputs=[
                io.Int.Output("bin_width", display_name="width", tooltip="Width of the chosen bin in px."),
                io.Int.Output("bin_height", display_name="height", tooltip="Height of the chosen bin in px."),
                io.Latent.Output("latent", display_name="latent", tooltip="Empty latent (4 channels, 1/8 size)."),
            ],
        )

    @classmethod
    def execute(cls, size_class, aspect_ratio, width, height, batch_size, model=None) -> io.NodeOutput:
        if size_class == FROM_MODEL:
            if model is None:
                raise ValueError("size_class 'from model' needs the model input connected; connect the PixArt model "
                                 "or choose a size class such as 1024")
            resolution = model_resolution(model)
        elif size_class in SIZE_CLASSES:
            resolution = int(size_class)
        else:
            raise ValueError(f"size_class {size_class!r} is not one of {', '.join(SIZE_CLASSES)}")
        if resolution not in bins.BIN_TABLES:
            raise ValueError(f"the model generates at {resolution} px, which has no bin table; choose a size class")
        check_widgets(cls, batch_size=batch_size)  # width and height: pick_bin, used only for custom
        h, w = pick_bin(resolution, aspect_ratio, width, height)
        device = mm.intermediate_device()
        check_fits(f"an empty latent of {batch_size} x {w}x{h} px", batch_size * 4 * (h // 8) * (w // 8) * 4, device,
                   "use a smaller batch_size")
        latent = torch.zeros([batch_size, 4, h // 8, w // 8], device=device)
        return io.NodeOutput(w, h, {"samples": latent})


class PixArtSuiteResizeCrop(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PixArtSuiteResizeCrop",
            display_name="PixArt Resize & Crop",
            category=CATEGORY,
            description="Scales an image to cover width x height and crops the centre, as diffusers does after "
                        "generating at an aspect-ratio bin: takes a binned image back to the size you asked for.",
            inputs=[
                io.Image.Input("image", tooltip="The decoded image(s)."),
                io.Int.Input("width", default=1024, min=1, max=MAX_RESOLUTION, tooltip="Output width in px."),
                io.Int.Input("height", default=1024, min=1, max=MAX_RESOLUTION, tooltip="Output height in px."),
            ],
            outputs=[io.Image.Output(tooltip="The image at exactly width x height.")],
        )

    @classmethod
    def execute(cls, image, width, height) -> io.NodeOutput:
        check_widgets(cls, width=width, height=height)
        if image.ndim != 4:
            raise ValueError(f"image must be a batch of images (B, H, W, C), got shape {tuple(image.shape)}")
        out = bins.resize_and_center_crop(image.movedim(-1, 1), height, width).movedim(1, -1)
        return io.NodeOutput(out.clamp(0.0, 1.0).contiguous())
