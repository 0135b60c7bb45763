"""Load PixArt LoRA: any trainer's PixArt LoRA/LyCORIS (and its T5 part) through ComfyUI's own patching.

pixart_core.lora reads the file and rewrites it to diffusers/PEFT names with alpha; here each
module becomes one of ComfyUI's weight adapters (LoRA, LoHa, LoKr from comfy.weight_adapter) on
the native weight, or on its q/k/v slice, and goes into ModelPatcher.add_patches, so offloading,
stacking with other LoRA nodes and unpatching are ComfyUI's. Every key that is not applied is
counted and listed with its reason.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from comfy_api.latest import io, ui

import comfy.weight_adapter as weight_adapter
import folder_paths

from ..pixart_core.lora import (TEXT_ENCODER, TRANSFORMER, LoraError, Target, delta_shape, module_tensors,
                                read_lora, transformer_targets)
from .common import CATEGORY, check_widgets, queue_check, require_pixart, show_text
from .loaders import resolve_choice

log = logging.getLogger("PixArt-Σ")

_T5_ANCHOR = "encoder.block.0.layer.0.layer_norm.weight"  # dense in every T5, GGUF ones too
_SHOWN = 8  # unapplied keys listed on the node; the log has all of them
_cache: dict = {}  # path -> ((mtime, size), LoraFile): the last file read, as stock LoraLoader keeps it


def _read(path: str):
    stamp = (os.path.getmtime(path), os.path.getsize(path))
    hit = _cache.get(path)
    if hit is None or hit[0] != stamp:
        _cache.clear()
        _cache[path] = hit = (stamp, read_lora(path))
    return hit[1]


def _leaf_parameter(root, key: str) -> bool:
    """ComfyUI patches parameters of modules without parameterised children only (model_patcher._load_list)."""
    module_name, _, name = key.rpartition(".")
    try:
        module = root.get_submodule(module_name)
    except AttributeError:
        return False
    own = dict(module.named_parameters(recurse=False))
    return name in own and all(n in own for n, _ in module.named_parameters())


def _adapter(sd: dict, module: str):
    """ComfyUI's own adapter (LoRA, LoHa, LoKr, ...) for one converted module, or a plain diff patch."""
    alpha = sd.get(module + ".alpha")
    alpha = float(alpha) if alpha is not None else None
    for cls in weight_adapter.adapters:
        adapter = cls.load(module, sd, alpha, sd.get(module + ".dora_scale"), set())
        if adapter is not None:
            return adapter
    if module + ".diff" in sd:
        return ("diff", (sd[module + ".diff"],))
    return None


def _patches(lora, component: str, targets: dict, patcher, prefix: str):
    """(patch dict for add_patches, module -> reason for the modules that cannot be applied)."""
    state = patcher.model.state_dict()
    patches, refused = {}, {}
    for module, target in targets.items():
        full = f"{component}.{module}"
        key = prefix + target.key
        if key not in state and key + ".weight" in state:  # a table (ops.Table): ComfyUI patches it as a leaf weight
            key += ".weight"
        if key not in state:
            quantized = key[: -len("weight")] + "qweight" in state
            refused[full] = ("GGUF-quantized T5 weights cannot take a LoRA; load a .safetensors T5 for T5 LoRAs"
                             if quantized else f"this model has no {target.key}")
            continue
        if not _leaf_parameter(patcher.model, key):
            refused[full] = (f"ComfyUI patches only weights of leaf layers and {target.key} is not one, "
                             "so this key cannot take effect")
            continue
        tensors = module_tensors(lora, full)
        start, rows = target.rows(state[key].shape[0])
        want = (rows, state[key][0].numel())
        have = delta_shape(tensors)
        if have is not None and tuple(have) != want:
            refused[full] = f"shape {tuple(have)} does not fit {target.key} {want} (a LoRA for another model size)"
            continue
        offset = (0, start, rows) if target.parts > 1 else None
        adapter = _adapter(lora.state_dict, full)
        if adapter is not None:
            patches[(key, offset) if offset else key] = adapter
        bias = prefix + target.bias_key if target.bias_key else None
        if "diff_b" in tensors:
            if bias not in state:
                refused[full] = f"{target.key} has no bias for its diff_b"
                continue
            patches[(bias, offset) if offset else bias] = ("diff", (tensors["diff_b"],))
    return patches, refused


def _t5_prefix(clip) -> str | None:
    for key in clip.patcher.model.state_dict():
        if key.endswith(_T5_ANCHOR):
            return key[: -len(_T5_ANCHOR)]
    return None


def apply_lora(model, clip, path, strength_model: float, strength_clip: float):
    """(patched MODEL, patched CLIP or the one given, report text). Raises ValueError for unusable files."""
    try:
        lora = _read(path)
    except LoraError as e:
        raise ValueError(f"lora_name: {e}") from None
    refused: dict = {}
    applied: set = set()
    new_model, new_clip = model, clip

    t_targets = transformer_targets(lora)
    if t_targets and strength_model != 0:
        patches, why = _patches(lora, TRANSFORMER, t_targets, model, "diffusion_model.")
        new_model = model.clone()
        accepted = set(new_model.add_patches(patches, strength_model))
        refused.update(why)
        applied.update(f"{TRANSFORMER}.{m}" for m in t_targets if f"{TRANSFORMER}.{m}" not in why)
        if len(accepted) != len(patches):
            raise RuntimeError(f"ComfyUI refused {len(patches) - len(accepted)} patches of {path}")
    else:
        refused.update({f"{TRANSFORMER}.{m}": "strength_model is 0" for m in t_targets})

    t5_modules = lora.modules(TEXT_ENCODER)
    prefix = _t5_prefix(clip) if clip is not None else None
    if t5_modules and clip is not None and prefix is None:
        reason = "the connected clip is not a T5 encoder"
    elif t5_modules and prefix is None:
        reason = "no T5 clip is connected"
    elif strength_clip == 0:
        reason = "strength_clip is 0"
    else:
        reason = None
    if t5_modules and reason is None:
        targets = {m: Target(m + ".weight") for m in t5_modules}
        patches, why = _patches(lora, TEXT_ENCODER, targets, clip.patcher, prefix)
        new_clip = clip.clone()
        new_clip.add_patches(patches, strength_clip)
        refused.update(why)
        applied.update(f"{TEXT_ENCODER}.{m}" for m in t5_modules if f"{TEXT_ENCODER}.{m}" not in why)
    elif t5_modules:
        refused.update({f"{TEXT_ENCODER}.{m}": reason for m in t5_modules})

    return new_model, new_clip, _report(lora, applied, refused)


def _report(lora, applied: set, refused: dict) -> str:
    applied_keys = lora.keys_of(applied)
    reasons = dict(lora.unmatched)
    for module, why in refused.items():
        for key in lora.sources[module]:
            reasons.setdefault(key, why)
    reasons = {k: v for k, v in reasons.items() if k not in applied_keys}
    counts = {c: (sum(f"{c}.{m}" in applied for m in lora.modules(c)), len(lora.modules(c)))
              for c in (TRANSFORMER, TEXT_ENCODER)}
    text = (f"{lora.path.name}: applied {len(applied_keys)} of {lora.file_keys} keys "
            f"({', '.join(lora.formats)}; {'/'.join(lora.kinds)}; transformer {counts[TRANSFORMER][0]} of "
            f"{counts[TRANSFORMER][1]} modules, T5 {counts[TEXT_ENCODER][0]} of {counts[TEXT_ENCODER][1]}); "
            f"{lora.alpha_note}.")
    if reasons:
        listed = "; ".join(f"{k} ({v})" for k, v in sorted(reasons.items())[:_SHOWN])
        more = f"; and {len(reasons) - _SHOWN} more (see the log)" if len(reasons) > _SHOWN else ""
        text += f" NOT applied ({len(reasons)}): {listed}{more}."
        log.warning("Load PixArt LoRA: %d keys of %s not applied:\n%s", len(reasons), lora.path,
                    "\n".join(f"  {k}: {v}" for k, v in sorted(reasons.items())))
    else:
        log.info("Load PixArt LoRA: %s", text)
    return text


def _check_inputs(cls, lora_name=None, **strengths) -> Path | None:
    check_widgets(cls, **strengths)
    return None if lora_name is None else resolve_choice(lora_name, "lora_name", ("loras",))


class PixArtSuiteLoraLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        loras = folder_paths.get_filename_list("loras")
        return io.Schema(
            node_id="PixArtSuiteLoraLoader",
            display_name="Load PixArt LoRA",
            category=CATEGORY,
            description="Applies a PixArt LoRA or LyCORIS (LoRA, LoHa, LoKr) from any trainer - diffusers/PEFT "
                        "(alpha from adapter_config.json), SimpleTuner, OneTrainer, OMI, ComfyUI names - to the "
                        "model and, for T5 LoRAs, the T5 clip. Shows how many keys were applied and lists any that "
                        "were not.",
            inputs=[
                io.Model.Input("model", tooltip="A PixArt model ('Load PixArt-Σ Model' or ComfyUI's own)."),
                io.Combo.Input("lora_name", options=loras, default=loras[0] if loras else "",
                               tooltip="The LoRA file in models/loras. A PEFT LoRA's adapter_config.json may sit "
                                       "next to it (as adapter_config.json or <name>.json) for its alpha."),
                io.Float.Input("strength_model", default=1.0, min=-100.0, max=100.0, step=0.01,
                               tooltip="How strongly to change the transformer (negative inverts)."),
                io.Clip.Input("clip", optional=True,
                              tooltip="The T5 from 'Load T5 Encoder (PixArt)' or CLIPLoader, for LoRAs that also "
                                      "train T5; leave empty otherwise."),
                io.Float.Input("strength_clip", default=1.0, min=-100.0, max=100.0, step=0.01,
                               tooltip="How strongly to change T5 (only used when clip is connected)."),
            ],
            outputs=[io.Model.Output(tooltip="The model with the LoRA patched in (ComfyUI applies it on load)."),
                     io.Clip.Output(tooltip="The T5 with the LoRA's T5 part, or the clip as given.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, lora_name, strength_model, strength_clip):
        return queue_check(_check_inputs, cls, lora_name=lora_name, strength_model=strength_model,
                           strength_clip=strength_clip)

    @classmethod
    def execute(cls, model, lora_name, strength_model, clip=None, strength_clip=1.0) -> io.NodeOutput:
        require_pixart(model)
        path = _check_inputs(cls, lora_name=lora_name, strength_model=strength_model, strength_clip=strength_clip)
        new_model, new_clip, text = apply_lora(model, clip, path, strength_model, strength_clip)
        show_text(cls, text)
        return io.NodeOutput(new_model, new_clip, ui=ui.PreviewText(text))
