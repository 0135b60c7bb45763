"""Helpers shared by the nodes: the category, input checks that end in one-sentence errors, UI text."""
from __future__ import annotations

import logging

import torch

import comfy.model_base

from .comfy_model import pixart_config_of

log = logging.getLogger("PixArt-Σ")

CATEGORY = "PixArt-Σ"
MAX_RESOLUTION = 16384  # ComfyUI's nodes.MAX_RESOLUTION (not imported: `nodes` is also this package's name)


def is_pixart(model) -> bool:
    """A MODEL from our loader, or ComfyUI's own PixArt (UNETLoader / checkpoint)."""
    inner = getattr(model, "model", None)
    return pixart_config_of(model) is not None or isinstance(inner, comfy.model_base.PixArt)


def require_pixart(model, what: str = "model") -> None:
    if not is_pixart(model):
        kind = type(getattr(model, "model", model)).__name__
        raise ValueError(f"{what} is a {kind}, not a PixArt model; load a PixArt-Σ checkpoint with "
                         "'Load PixArt-Σ Model' (or ComfyUI's Load Diffusion Model) and connect that")


def caption_width(model) -> int:
    """Width of the caption embeddings the model takes (4096 = T5-XXL for every released model)."""
    config = pixart_config_of(model)
    if config is not None:
        return config.caption_channels
    dm = getattr(getattr(model, "model", None), "diffusion_model", None)
    fc1 = getattr(getattr(getattr(dm, "y_embedder", None), "y_proj", None), "fc1", None)
    return int(getattr(fc1, "in_features", 4096))


def check_conditioning(model, conditioning, name: str) -> None:
    """One-sentence error when a CONDITIONING cannot feed this model (wrong encoder)."""
    if not isinstance(conditioning, (list, tuple)) or not conditioning:
        raise ValueError(f"{name} is empty; connect the output of 'T5 Text Encode (PixArt)' or CLIPTextEncode")
    want = caption_width(model)
    for cond, _ in conditioning:
        if not isinstance(cond, torch.Tensor) or cond.ndim != 3:
            raise ValueError(f"{name} holds no text embeddings; connect the output of 'T5 Text Encode (PixArt)'")
        if cond.shape[-1] != want:
            raise ValueError(f"{name} embeddings are {cond.shape[-1]} wide but this model takes {want}-wide T5 "
                             f"embeddings; encode the prompt with the T5 encoder that belongs to this model "
                             f"(T5-XXL for every released PixArt), not a CLIP or other text encoder")


def show_text(node_cls, text: str) -> None:
    """Text on the node in the UI while it runs (the same call ComfyUI's Get Image Size uses)."""
    node_id = getattr(getattr(node_cls, "hidden", None), "unique_id", None)
    if node_id is None:
        return
    try:
        from server import PromptServer
        PromptServer.instance.send_progress_text(text, node_id)
    except Exception:  # noqa: BLE001 - no server (tests, scripts): the log line and ui text remain
        pass
