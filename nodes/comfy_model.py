"""pixart_core's DiT as a real ComfyUI MODEL.

Subclasses of ComfyUI's own PixArt classes, so model management, latent formats, previews, LoRA key
mapping (`comfy/lora.py` checks `isinstance(model, model_base.PixArt)`) and stock samplers all apply.
What we change: the network (ours: fixed PE base size, caption masks, KV compression), the σ↔t
mapping (the reference's continuous one instead of snapping to integer timesteps) and the loader
(every dimension from the weights, clear errors).
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import sys

import comfy.conds
import comfy.latent_formats
import comfy.model_base
import comfy.model_management as mm
import comfy.model_patcher
import comfy.model_sampling
import comfy.ops
import comfy.supported_models

import torch

from ..pixart_core import KVCompress, PixArt, PixArtConfig, schedule
from ..pixart_core.model import BlockInputs, PerturbedAttention, sincos_pos_embed
from ..pixart_core.ops import CastOps, gemm_dtype
from ..pixart_core.loading import (CheckpointError, check_state_dict, config_from_preset, detect_config,
                                   read_checkpoint)

log = logging.getLogger(__name__)

KV_OPTION = "pixart_kv_compress"  # transformer_options key read by ComfyPixArtDiT
PAG_OPTION = "pixart_pag"  # transformer_options key read by ComfyPixArtDiT: a PAGRows (nodes/pag.py sets it)
CONTROL_KEY = "pixart_controlnet"  # the entry of ComfyUI's `control` dict our ControlNets fill (nodes/controlnet.py)


class ComfyTable(CastOps.Table, comfy.ops.CastWeightBiasOp):
    """pixart_core's Table as a ComfyUI cast layer: when ComfyUI loads the model partially (low VRAM)
    it hands the table out with its patches (LoRA, merges) applied on the fly, as for any weight."""

    def get(self, like):
        if not (self.comfy_cast_weights or self.weight_function):
            return super().get(like)
        return comfy.ops.cast_bias_weight(self, like)[0]


@functools.cache
def with_readable_linears(operations):
    """ComfyUI's op set with ComfyTable, and for the plain sets Linears that hand out their weights
    the way their own forward casts them (device, dtype, LoRA weight functions under low-VRAM), so the
    model's folded cross-attention can use them. Other sets' Linears (scaled fp8, quantized, cuBLAS)
    scale or quantize inside forward: the model calls those layers as black boxes."""
    layers = {"Table": ComfyTable}
    if operations in (comfy.ops.disable_weight_init, comfy.ops.manual_cast):
        class Linear(operations.Linear):
            def params_for(self, like):
                return comfy.ops.cast_bias_weight(self, like, dtype=gemm_dtype(like))

        layers["Linear"] = Linear
    return type(operations.__name__, (operations,), layers)


class ComfyPixArtDiT(PixArt):
    """The DiT as ComfyUI calls it: config from unet_config, ε-only output, options per call."""

    def __init__(self, pixart_config=None, dtype=None, device=None, operations=None, **_unet_config):
        super().__init__(PixArtConfig.from_dict(pixart_config), dtype=dtype, device=device,
                         operations=with_readable_linears(operations), init_weights=False)
        self.dtype = dtype  # ComfyUI reads the weight dtype from here

    def forward(self, x, timesteps, context, context_mask=None, c_size=None, c_ar=None, control=None,
                transformer_options={}, **kwargs):
        self.compute_dtype = x.dtype  # ComfyUI has already cast the input to the compute dtype
        refuse_unet_patches(transformer_options)
        out = super().forward(x, timesteps, context, context_mask, c_size, c_ar,
                              kv_compress=transformer_options.get(KV_OPTION), controls=controls_of(control),
                              block_replace=block_replacements(transformer_options, self.config.depth),
                              perturb=perturbed_rows(transformer_options, x.shape[0]))
        return out[:, : self.config.in_channels]  # ε; ComfyUI has no use for the learned variance


@dataclasses.dataclass(frozen=True)
class PAGRows:
    """Perturbed-attention guidance inside one of ComfyUI's batched model calls: the chunks whose entry in
    transformer_options["cond_or_uncond"] is `index` (the extra copy of the prompt PixArt PAG adds to
    the conds) run with identity self-attention in blocks `layers`."""
    layers: tuple[int, ...]
    index: int


def perturbed_rows(transformer_options, batch: int) -> PerturbedAttention | None:
    """The batch rows of this call that PixArt PAG perturbs (calc_cond_batch stacks equal-sized chunks,
    one per cond entry, in the order cond_or_uncond lists them), or None."""
    pag = transformer_options.get(PAG_OPTION)
    chunks = transformer_options.get("cond_or_uncond") or []
    if pag is None or pag.index not in chunks:
        return None
    per = batch // len(chunks)
    rows = tuple(r for k, c in enumerate(chunks) if c == pag.index for r in range(k * per, (k + 1) * per))
    return PerturbedAttention(pag.layers, rows)


# ComfyUI's UNet patch points (comfy/ldm/modules/diffusionmodules/openaimodel.py): a DiT has none of them
UNET_PATCHES = ("input_block_patch", "input_block_patch_after_skip", "middle_patch", "output_block_patch",
                "attn1_patch", "attn1_output_patch", "attn2_patch", "attn2_output_patch")
UNET_REPLACES = ("attn1", "attn2")


def _node_of(fn) -> str:
    """The node class a patch function was made in ('HyperTile.execute.<locals>.hypertile_in' -> HyperTile)."""
    name = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    return name.split(".")[0] if ".<locals>." in name else "a node"


def refuse_unet_patches(transformer_options) -> None:
    """One sentence naming the node when a MODEL carries UNet-only patches (TomePatchModel, HyperTile,
    PatchModelAddDownscale, FreeU, PAG/SAG's middle-block attention ...), which would change nothing here."""
    patches = transformer_options.get("patches", {})
    found = [(kind, fns[0]) for kind in UNET_PATCHES if (fns := patches.get(kind))]
    found += [(f"{kind} replace", next(iter(r.values()))) for kind in UNET_REPLACES
              if (r := transformer_options.get("patches_replace", {}).get(kind))]
    if found:
        kind, fn = found[0]
        node = _node_of(fn)
        instead = ("; for perturbed-attention guidance on PixArt use this pack's 'PixArt PAG' node instead"
                   if node == "PerturbedAttentionGuidance" else " (UNet-only nodes work on SD1.x/SDXL models)")
        raise ValueError(f"{node} patches a UNet ({kind}), which PixArt, a DiT, does not have, so it would "
                         f"change nothing; remove it from the graph{instead}")


def block_replacements(transformer_options, depth: int) -> dict:
    """ComfyUI's DiT block patches (transformer_options["patches_replace"]["dit"], set by skip-layer
    guidance and other block-level nodes) as pixart_core block replacements. PixArt has one kind of
    block (self-attention, cross-attention, MLP): it answers to ("double_block", i), the key ComfyUI's
    other cross-attention DiTs use (WAN, LTXV, HunyuanDiT), and to ("single_block", i), so either
    layer list of SkipLayerGuidanceDiT names it. The patch gets {"img", "txt", "vec",
    "transformer_options"} (image tokens, projected captions, the 6·D modulation) and returns "img"."""
    dit = transformer_options.get("patches_replace", {}).get("dit")
    if not dit:
        return {}
    out = {}
    for i in range(depth):
        patch = dit.get(("double_block", i)) or dit.get(("single_block", i))
        if patch is not None:
            out[i] = _comfy_block_patch(patch, transformer_options)
    return out


def _comfy_block_patch(patch, transformer_options):
    def run(tokens, inputs: BlockInputs, original):
        def original_block(args):
            given = inputs
            if args["txt"] is not inputs.y or args["vec"] is not inputs.t0:
                t0 = args["vec"]
                given = dataclasses.replace(inputs, y=args["txt"], t0=t0,
                                            shared=t0.shape[0] == 1 or bool((t0 == t0[:1]).all()))
            return {"img": original(args["img"], given)}

        args = {"img": tokens, "txt": inputs.y, "vec": inputs.t0, "transformer_options": transformer_options}
        return patch(args, {"original_block": original_block})["img"]

    return run


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

    def state_dict(self, *args, **kwargs):
        """The model's Tables (ops.Table) under their leaf-layer names, `<owner>.<name>.weight`:
        ComfyUI's ModelPatcher takes the keys it may patch (merges, LoRAs) from here and applies
        them as `<leaf layer>.<parameter>`. Files keep the official names: saving reads the DiT's own
        state dict (BaseModel.state_dict_for_saving)."""
        sd = super().state_dict(*args, **kwargs)
        prefix = kwargs.get("prefix", "")
        for name, module in self.named_modules():
            if isinstance(module, CastOps.Table) and prefix + name in sd:
                sd[prefix + name + ".weight"] = sd.pop(prefix + name)
        return sd

    def extra_conds(self, **kwargs):
        out = super().extra_conds(**kwargs)
        mask = kwargs.get("attention_mask")  # our T5 encodings carry their mask inside (zero rows); others may not
        if mask is not None:
            cond = kwargs.get("cross_attn")
            if cond is not None and mask.shape[-1] != cond.shape[1]:
                raise ValueError(f"the conditioning's attention_mask covers {mask.shape[-1]} tokens but its embeddings "
                                 f"have {cond.shape[1]} (a node such as ConditioningConcat joined embeddings without "
                                 "their masks); encode the prompts with 'T5 Text Encode (PixArt)', whose masks travel "
                                 "inside the embeddings")
            out["context_mask"] = comfy.conds.CONDRegular(mask)
        if kwargs.get("control") is not None:  # here every sampler passes each cond once, before the first step
            from .controlnet import check_control_chain
            check_control_chain(kwargs["control"])
        return out


class UNetOnlyError(KeyError):
    """A UNet setting asked of a DiT's unet_config (a KeyError, for code that catches those)."""

    def __str__(self):
        return str(self.args[0])


class DiTUnetConfig(dict):
    """unet_config of a DiT: a UNet-only node reading a UNet setting (FreeU, FreeU_V2: model_channels)
    gets one sentence naming it instead of a bare KeyError."""

    def __missing__(self, key):
        code = sys._getframe(1).f_code  # the reader (dict.__getitem__ is C: frame 1 is its caller)
        node = getattr(code, "co_qualname", code.co_name).split(".")[0]
        raise UNetOnlyError(f"{node} reads the UNet setting {key!r}, which PixArt, a DiT, does not have: it works "
                            "on UNet models (SD1.x/SDXL) only; remove it from the graph")


class PixArtSuiteConfig(comfy.supported_models.PixArtSigma):
    """A ComfyUI model config built from a PixArtConfig (never matched by ComfyUI's own detection)."""

    def __init__(self, config: PixArtConfig):
        # depth/hidden_size are what comfy.utils.pixart_to_diffusers needs to map diffusers-style LoRA keys
        super().__init__({"image_model": "pixart_suite", "depth": config.depth, "hidden_size": config.hidden_size,
                          "pixart_config": config.to_dict()})
        self.unet_config = DiTUnetConfig(self.unet_config)
        if config.family == "alpha":
            self.latent_format = comfy.latent_formats.SD15()
        self.pixart = config

    def get_model(self, state_dict, prefix="", device=None):
        return PixArtSuiteModel(self, device=device).eval()

    def process_unet_state_dict_for_saving(self, state_dict):
        """With the `pos_embed` the released files carry ((1, (sample_size/p)², D), the training grid):
        ComfyUI's detection and our loader read the model's grid and PE scale from it, so a saved
        model loads as the file it came from did, in both."""
        c = self.pixart
        side = c.sample_size // c.patch_size
        dtype = state_dict["x_embedder.proj.weight"].dtype
        pe = sincos_pos_embed(side, side, c.hidden_size, c.base_size, c.pe_interpolation)[None]
        pe = pe.to(dtype if dtype.itemsize > 1 else torch.float32)
        return super().process_unet_state_dict_for_saving({**state_dict, "pos_embed": pe})


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
        model.diffusion_model.y_embedder.y_embedding.weight.zero_()
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


__all__ = ["CONTROL_KEY", "CheckpointError", "ComfyPixArtDiT", "KV_OPTION", "PAG_OPTION", "PAGRows", "PixArtSuiteModel",
           "load_model", "pixart_config_of", "with_kv_compression"]
