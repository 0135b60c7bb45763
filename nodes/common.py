"""Helpers shared by the nodes: the category, input checks that end in one-sentence errors, UI text.

Input checks, the pattern for every node (new ones too):
- `validate_inputs(cls, <only the inputs it checks>)` returns `queue_check(fn, ...)`: ComfyUI runs it
  when the prompt is queued, refuses the prompt with the message on the node (HTTP 400, nothing runs),
  and reports every node's problem in that one answer. Name only the inputs you check: ComfyUI then
  skips its own min/max/list check for exactly those (check_widgets does it instead) and repeats the
  message once per named input.
- `execute` calls the same checks again (raising): inputs linked to other nodes are unknown (None) at
  queue time, and ComfyUI checks no bounds for linked values at all.
- Numbers: `check_widgets(cls, name=value, ...)` applies the schema's own min/max and refuses NaN
  and infinities (JSON from the API may carry NaN, which passes ComfyUI's min/max checks).
- Anything else (files, text, sizes): a pixart_core function that raises InputError/ValueError.
"""
from __future__ import annotations

import logging

import torch
from comfy_api.latest import io

import comfy.model_base

from ..pixart_core.checks import real_number, whole_number
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


def check_widgets(node_cls, **values) -> None:
    """The node's Int/Float inputs named here, against the min/max its schema declares; floats must be
    finite. Raises InputError; values None (linked inputs at queue time) are skipped."""
    inputs = {i.id: i for i in node_cls.define_schema().inputs}  # (GET_SCHEMA caches: not on a locked clone)
    for name, value in values.items():
        spec = inputs[name]
        if value is None:
            continue
        if isinstance(spec, io.Float.Input):
            real_number(name, value, spec.min, spec.max)
        elif isinstance(spec, io.Int.Input):
            whole_number(name, value, spec.min, spec.max)
        else:
            raise TypeError(f"check_widgets: input {name} of {node_cls.__name__} is not an Int or Float")


def queue_check(check, *fixed, **inputs):
    """The body of a node's validate_inputs: True when `check(*fixed, **inputs)` passes, else its
    message (ComfyUI shows it on the node and runs nothing). Pass the node inputs BY KEYWORD: those
    that are None are linked to another node, unknown until it runs, and are left out (execute checks
    them); when none is known, nothing is checked."""
    if not inputs:
        raise TypeError("queue_check: pass the node's inputs by keyword, e.g. queue_check(fn, ckpt_name=ckpt_name)")
    values = {k: v for k, v in inputs.items() if v is not None}
    if not values:
        return True
    try:
        check(*fixed, **values)
    except ValueError as e:  # InputError, CheckpointError, T5LoadError ...
        return str(e)
    return True
