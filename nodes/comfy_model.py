"""pixart_core's DiT as a real ComfyUI MODEL.

Subclasses of ComfyUI's own PixArt classes, so model management, latent formats, previews, LoRA key
mapping (`comfy/lora.py` checks `isinstance(model, model_base.PixArt)`) and stock samplers all apply.
What we change: the network (ours: fixed PE base size, caption masks, KV compression), the σ↔t
mapping (the reference's continuous one instead of snapping to integer timesteps) and the loader
(every dimension from the weights, clear errors).
"""
from __future__ import annotations

import functools
import logging

import comfy.conds
import comfy.latent_formats
import comfy.model_base
import comfy.model_management as mm
import comfy.model_patcher
import comfy.model_sampling
import comfy.ops
import comfy.supported_models

from ..pixart_core import KVCompress, PixArt, PixArtConfig, schedule
from ..pixart_core.ops import gemm_dtype
from ..pixart_core.loading import (CheckpointError, check_state_dict, config_from_preset, detect_config,
                                   read_checkpoint)

log = logging.getLogger(__name__)

KV_OPTION = "pixart_kv_compress"  # transformer_options key read by ComfyPixArtDiT
CONTROL_KEY = "pixart_controlnet"  # the entry of ComfyUI's `control` dict our ControlNets fill (nodes/controlnet.py)


@functools.cache
def with_readable_linears(operations):
    """ComfyUI's plain op sets, with Linears that hand out their weights the way their own forward
    casts them (device, dtype, LoRA weight functions under low-VRAM), so the model's folded
    cross-attention can use them. Other sets (scaled fp8, quantized, cuBLAS) scale or quantize
    inside forward: they stay as they are and the model calls those layers as black boxes."""
    if operations not in (comfy.ops.disable_weight_init, comfy.ops.manual_cast):
        return operations

    class Linear(operations.Linear):
        def params_for(self, like):
            return comfy.ops.cast_bias_weight(self, like, dtype=gemm_dtype(like))

    return type(operations.__name__, (operations,), {"Linear": Linear})


class ComfyPixArtDiT(PixArt):
    """The DiT as ComfyUI calls it: config from unet_config, ε-only output, options per call."""

    def __init__(self, pixart_config=None, dtype=None, device=None, operations=None, **_unet_config):
        super().__init__(PixArtConfig.from_dict(pixart_config), dtype=dtype, device=device,
                         operations=with_readable_linears(operations), init_weights=False)
        self.dtype = dtype  # ComfyUI reads the weight dtype from here

    def forward(self, x, timesteps, context, context_mask=None, c_size=None, c_ar=None, control=None,
                transformer_options={}, **kwargs):
        self.compute_dtype = x.dtype  # ComfyUI has already cast the input to the compute dtype
        out = super().forward(x, timesteps, context, context_mask, c_size, c_ar,
                              kv_compress=transformer_options.get(KV_OPTION), controls=controls_of(control))
        return out[:, : self.config.in_channels]  # ε; ComfyUI has no use for the learned variance


def controls_of(control) -> list:
    """Our ControlNets' inputs from ComfyUI's `control` dict (residual lists come from other model families,
    which PixArtSuiteModel.extra_conds refuses before sampling starts)."""
    if not control:
        return []
    if any(control.get(k) for k in ("input", "middle", "output")):
        raise ValueError("a ControlNet made for another model family reached the PixArt model; apply a PixArt "
                         "ControlNet from 'Load PixArt ControlNet' instead")
    return control.get(CONTROL_KEY, [])


class PixArtModelSampling(comfy.model_sampling.EPS, comfy.model_sampling.ModelSamplingDiscrete):
    """The training schedule with the reference's continuous σ↔t mapping (spec §6.2)."""

    def timestep(self, sigma):
        return schedule.sigma_to_timestep(sigma.float().cpu()).to(sigma.device)

    def sigma(self, timestep):
        return schedule.timestep_to_sigma(timestep.float().cpu()).to(timestep.device)


class PixArtSuiteModel(comfy.model_base.PixArt):
    def __init__(self, model_config, model_type=comfy.model_base.ModelType.EPS, device=None):
        comfy.model_base.BaseModel.__init__(self, model_config, model_type, device=device, unet_model=ComfyPixArtDiT)
        self.model_sampling = PixArtModelSampling(model_config)

    def extra_conds(self, **kwargs):
        out = super().extra_conds(**kwargs)
        mask = kwargs.get("attention_mask")
        if mask is not None:  # our T5 encoder pads to the model's length and sends the mask along
            out["context_mask"] = comfy.conds.CONDRegular(mask)
        if kwargs.get("control") is not None:  # here every sampler passes each cond once, before the first step
            from .controlnet import check_control_chain
            check_control_chain(kwargs["control"])
        return out


class PixArtSuiteConfig(comfy.supported_models.PixArtSigma):
    """A ComfyUI model config built from a PixArtConfig (never matched by ComfyUI's own detection)."""

    def __init__(self, config: PixArtConfig):
        # depth/hidden_size are what comfy.utils.pixart_to_diffusers needs to map diffusers-style LoRA keys
        super().__init__({"image_model": "pixart_suite", "depth": config.depth, "hidden_size": config.hidden_size,
                          "pixart_config": config.to_dict()})
        if config.family == "alpha":
            self.latent_format = comfy.latent_formats.SD15()
        self.pixart = config

    def get_model(self, state_dict, prefix="", device=None):
        return PixArtSuiteModel(self, device=device).eval()


def pixart_config_of(model_patcher) -> PixArtConfig | None:
    """The PixArtConfig of a MODEL, or None when it is not one of ours."""
    dm = getattr(getattr(model_patcher, "model", None), "diffusion_model", None)
    return dm.config if isinstance(dm, PixArt) else None


def load_model(path, preset="auto", weight_dtype=None, **overrides) -> comfy.model_patcher.ModelPatcher:
    """Load any supported checkpoint as a MODEL. weight_dtype None lets ComfyUI choose, as its loaders do."""
    raw = read_checkpoint(path)
    if preset in (None, "auto"):
        config, _ = detect_config(raw, **overrides)
        what = "the detected configuration"
    else:
        config, what = config_from_preset(preset, raw, **overrides), f"preset {preset}"
    sd = {k: v for k, v in raw.state_dict.items() if k != "pos_embed"}
    load_device, offload_device = mm.get_torch_device(), mm.unet_offload_device()
    model_config = PixArtSuiteConfig(config)
    supported = list(model_config.supported_inference_dtypes)
    if weight_dtype is None:
        params = sum(v.numel() for v in sd.values())
        file_dtype = next(iter(sd.values())).dtype
        weight_dtype = mm.unet_dtype(model_params=params, supported_dtypes=supported, weight_dtype=file_dtype)
    manual_cast = mm.unet_manual_cast(weight_dtype, load_device, supported)
    model_config.set_inference_dtype(weight_dtype, manual_cast)
    model = model_config.get_model(sd)
    kv_missing = check_state_dict(sd, model.diffusion_model, raw.path, what)
    model = model.to(offload_device)
    model.load_model_weights(sd, "")
    if "y_embedder.y_embedding" not in raw.state_dict:
        model.diffusion_model.y_embedder.y_embedding.zero_()
    for block in model.diffusion_model.blocks:
        if kv_missing and block.attn.sr is not None:
            block.attn.reset_kv_compress_weights()
    log.info("PixArt: loaded %s (%s layout) as %s, weights %s, compute %s", raw.path.name, raw.layout,
             what, weight_dtype, manual_cast or weight_dtype)
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=offload_device)
    patcher.pixart_source = raw.path  # shown in errors and by the inspect node
    return patcher


def with_kv_compression(model_patcher, kv: KVCompress):
    """A MODEL whose self-attention compresses keys/values as `kv` says (the shared weights are untouched)."""
    patched = model_patcher.clone()
    patched.model_options.setdefault("transformer_options", {})[KV_OPTION] = kv
    return patched


__all__ = ["CONTROL_KEY", "CheckpointError", "ComfyPixArtDiT", "KV_OPTION", "PixArtSuiteModel", "load_model",
           "pixart_config_of", "with_kv_compression"]
