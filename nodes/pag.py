"""PixArt PAG: perturbed-attention guidance (diffusers' PixArtSigmaPAGPipeline) as a MODEL patch.

Works in every sampler that goes through ComfyUI's sampling_function (PixArt Sampler, KSampler,
SamplerCustom(Advanced) with any guider built on CFGGuider):
- a calc-cond-batch function adds the prompt once more to the conds of each step, marked in
  transformer_options (comfy_model.PAG_OPTION), so ComfyUI batches it with the CFG halves in one model
  call where its memory estimate allows and splits the calls where not; the DiT gives the marked
  chunk identity self-attention in the chosen blocks;
- a post-CFG function adds s_t·(cond − perturbed) (pixart_core.guidance.apply_pag) to the CFG result.
At CFG 1 ComfyUI drops the negative and the call holds [cond, cond perturbed]: PAG alone. Should another
node replace the calc-cond-batch function after this one, the post-CFG function evaluates the perturbed
prompt itself (one more model call, as ComfyUI's own PAG node does).
"""
from __future__ import annotations

import comfy.samplers
import torch
from comfy_api.latest import io

from ..pixart_core.guidance import MAX_ADAPTIVE_SCALE, MAX_PAG_SCALE, PAG, PRESETS, apply_pag, pag_layers
from .comfy_model import PAG_OPTION, PAGRows, pixart_config_of
from .common import CATEGORY, check_widgets, queue_check

CUSTOM = "layers below"
PRESET_NAMES = (CUSTOM, *PRESETS)
PRESET_HINT = "or choose one of the presets"


def _with_pag_rows(model_options: dict, rows: PAGRows) -> dict:
    options = dict(model_options)
    options["transformer_options"] = {**model_options.get("transformer_options", {}), PAG_OPTION: rows}
    return options


def with_pag(model_patcher, pag: PAG):
    """A clone of the MODEL that samples with `pag` (the weights are shared)."""
    if PAG_OPTION in model_patcher.model_options:
        raise ValueError("model already has PixArt PAG applied; use one PixArt PAG node per model (set its layers "
                         "to every block you want perturbed)")
    patched = model_patcher.clone()
    if not pag.active:
        return patched
    patched.model_options[PAG_OPTION] = pag
    previous = patched.model_options.get("sampler_calc_cond_batch_function")
    step = {}  # this step's perturbed prediction, from the batched call to the post-CFG function

    def scales(model, sigma, like):
        t = model.model_sampling.timestep(sigma).reshape(-1).tolist()
        s = torch.tensor([pag.scale_at(v) for v in t], dtype=like.dtype, device=like.device)
        return s.view(-1, *([1] * (like.ndim - 1)))

    def calc_cond_batch(args):
        conds, x, sigma, model, options = args["conds"], args["input"], args["sigma"], args["model"], args["model_options"]
        step.clear()
        if conds[0] is None or not bool((scales(model, sigma, x) > 0).any()):  # adaptive scale spent: plain CFG
            return _calc(previous, dict(args))
        rows = PAGRows(pag.layers, len(conds))
        out = _calc(previous, {**args, "conds": [*conds, conds[0]], "model_options": _with_pag_rows(options, rows)})
        step.update(input=x, perturbed=out[-1])
        return out[:-1]

    def post_cfg(args):
        x, sigma, model = args["input"], args["sigma"], args["model"]
        s = scales(model, sigma, x)
        if args["cond"] is None or not bool((s > 0).any()):
            return args["denoised"]
        if step.get("input") is x:
            perturbed = step.pop("perturbed")
        else:  # our batch function did not run for this step
            rows = PAGRows(pag.layers, 0)
            (perturbed,) = comfy.samplers.calc_cond_batch(model, [args["cond"]], x, sigma,
                                                          _with_pag_rows(args["model_options"], rows))
        step.clear()
        return apply_pag(args["denoised"], args["cond_denoised"], perturbed, s)

    patched.set_model_sampler_calc_cond_batch_function(calc_cond_batch)
    patched.set_model_sampler_post_cfg_function(post_cfg)
    return patched


def _calc(previous, args):
    if previous is not None:
        return previous(args)
    return comfy.samplers.calc_cond_batch(args["model"], args["conds"], args["input"], args["sigma"],
                                          args["model_options"])


class PixArtSuitePAG(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PixArtSuitePAG",
            display_name="PixArt PAG",
            category=CATEGORY,
            description="Perturbed-attention guidance for PixArt, as diffusers' PixArtSigmaPAGPipeline: the prompt "
                        "runs once more per step with the self-attention of the chosen blocks replaced by the "
                        "identity, and the result is pushed away from it (uncond + cfg·(cond − uncond) + "
                        "scale·(cond − perturbed)). Works with the PixArt Sampler, KSampler and "
                        "SamplerCustomAdvanced, with KV compression, and at CFG 1 (PAG alone).",
            inputs=[
                io.Model.Input("model", tooltip="A model from 'Load PixArt-Σ Model' (after LoRA / KV compression "
                                                "nodes, if any)."),
                io.Combo.Input("preset", options=list(PRESET_NAMES), default=CUSTOM,
                               tooltip="Which blocks to perturb. 'layers below': the layers input. diffusers' "
                                       "default pattern 'blocks.1' matches blocks 1 and 10-19 of a 28-block "
                                       "model (its regex also finds blocks.1x); its documentation's PixArt-Σ "
                                       "example uses 'blocks.14' (block 14 alone) with scale 4 at CFG 1."),
                io.String.Input("layers", default="14",
                                tooltip="Blocks whose self-attention becomes the identity, when preset is "
                                        "'layers below': numbers and ranges such as 14, 10-19 or 0,2,5-9 "
                                        "(the KV compression syntax), or all."),
                io.Float.Input("scale", default=3.0, min=0.0, max=MAX_PAG_SCALE, step=0.01, round=0.01,
                               tooltip="PAG scale (diffusers' pag_scale, default 3.0); 0 = off."),
                io.Float.Input("adaptive_scale", default=0.0, min=0.0, max=MAX_ADAPTIVE_SCALE, step=0.0001,
                               round=0.0001,
                               tooltip="Lowers the scale as sampling proceeds: scale − adaptive_scale·(1000 − t) "
                                       "at timestep t, never below 0 (diffusers' pag_adaptive_scale); 0 = constant."),
            ],
            outputs=[io.Model.Output(tooltip="The same model with PAG; connect it to the sampler.")],
        )

    @classmethod
    def validate_inputs(cls, preset, layers, scale, adaptive_scale):
        def check(preset=None, layers=None, **numbers):
            if preset is not None and preset not in PRESET_NAMES:
                raise ValueError(f"preset {preset!r} is not one of {', '.join(PRESET_NAMES)}")
            if layers is not None and preset in (None, CUSTOM):
                pag_layers(layers, None, PRESET_HINT)
            check_widgets(cls, **numbers)
        return queue_check(check, preset=preset, layers=layers, scale=scale, adaptive_scale=adaptive_scale)

    @classmethod
    def execute(cls, model, preset, layers, scale, adaptive_scale) -> io.NodeOutput:
        config = pixart_config_of(model)
        if config is None:
            raise ValueError("model is not from 'Load PixArt-Σ Model'; PixArt PAG needs this pack's PixArt model "
                             "(ComfyUI's native PixArt has no perturbed attention) - load it with that node")
        if preset not in PRESET_NAMES:
            raise ValueError(f"preset {preset!r} is not one of {', '.join(PRESET_NAMES)}")
        check_widgets(cls, scale=scale, adaptive_scale=adaptive_scale)
        blocks = pag_layers(layers if preset == CUSTOM else preset, config.depth, PRESET_HINT)
        return io.NodeOutput(with_pag(model, PAG(blocks, scale, adaptive_scale)))
