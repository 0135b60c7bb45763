"""PixArt Sampler, PixArt Sampler Select, PixArt Step Grid and PixArt CFG Guider.

Sampling runs on ComfyUI's own machinery: comfy.sample.prepare_noise + a CFGGuider (PixArtGuider, which
applies the official Σ null conditioning) with a comfy.samplers.KSAMPLER around pixart_core's
k-diffusion-style samplers. So model management, LoRA and other model patches, previews
(latent_preview) and interrupts (the progress hook) all apply, and the same samplers/grids/guider are
usable from SamplerCustomAdvanced through the SAMPLER / SIGMAS / GUIDER nodes.
"""
from __future__ import annotations

import inspect
import logging

import torch
from comfy_api.latest import io, ui

import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview

from ..pixart_core import fewstep
from ..pixart_core import samplers as core_samplers
from ..pixart_core import schedule
from ..pixart_core.model import caption_mask, masked_captions
from ..pixart_core.pipeline import check_sampling_fits
from .common import CATEGORY, check_conditioning, check_widgets, queue_check, require_pixart, show_text
from .comfy_model import pixart_config_of
from .text_encoder import OUTPUTS_KEY

log = logging.getLogger("PixArt-Σ")

SAMPLER_NAMES = ("dpmpp_2m", "sa_solver", "euler", "ddim", "lcm")
STEP_GRIDS = ("dpm_time_uniform", "linspace", "leading", "trailing", "karras", "lcm", "dmd")
# SamplerCustom scales the start noise by σ below σ_max, so the one-step dmd grid runs in the PixArt Sampler only
SIGMAS_GRIDS = tuple(g for g in STEP_GRIDS if g not in schedule.FIXED_GRIDS)
NULL_OFFICIAL = "prompt's mask (official Σ)"
NULL_OWN = "own mask (diffusers)"
DEFAULT_ETA = {"sa_solver": 1.0, "ddim": 0.0}  # official SA-Solver τ=1 in its window; deterministic DDIM

_GRID_TOOLTIP = ("Where the steps fall. dpm_time_uniform: the official PixArt-Σ DPM-Solver grid (uniform in "
                 "continuous time); linspace/leading/trailing: diffusers' timestep spacings; karras: Karras et al. "
                 "over the full training range; lcm: diffusers' LCMScheduler timesteps (PixArt-LCM, Flash-PixArt; "
                 "4 steps: 999, 759, 499, 259); dmd: the one step at timestep 400 of PixArt-α-DMD (steps 1).")
_PRESET_TOOLTIP = ("A distilled model's own settings, overriding steps, cfg, sampler_name and step_grid: 'LCM 4 steps' "
                   "for PixArt-LCM, 'DMD 1 step' for PixArt-α-DMD, 'Flash 4 steps' for PixArt-α 1024 with the "
                   "flash-pixart LoRA (all without guidance). custom: use the widgets.")


def make_sigmas(step_grid: str, steps: int, denoise: float) -> torch.Tensor:
    """pixart_core's grid (which checks steps and denoise: whole, finite, in range, bounded schedule)."""
    if step_grid not in STEP_GRIDS:
        raise ValueError(f"step_grid {step_grid!r} is not one of {', '.join(STEP_GRIDS)}")
    return schedule.make_sigmas(step_grid, steps, denoise).float().cpu()


class PriorStartKSAMPLER(comfy.samplers.KSAMPLER):
    """A KSAMPLER whose starting noise is the VP prior at sigmas[0] (noise·√(1+σ²)) even below σ_max, where
    ComfyUI would scale it by σ: a one-step distilled model (PixArt-α-DMD, timestep 400) starts from pure
    noise at its distilled timestep, as its pipeline does."""

    def max_denoise(self, model_wrap, sigmas):
        return True


def pixart_ksampler(sampler_name: str, eta: float | None = None, prior_start: bool = False) -> comfy.samplers.KSAMPLER:
    """A ComfyUI SAMPLER running pixart_core's sampler `sampler_name` (prior_start: see PriorStartKSAMPLER).

    Stochastic samplers (sa_solver, ddim with eta > 0, lcm) draw their step noise from a CPU generator seeded
    with the sampling seed + 1 (not the seed itself, whose first draw is the initial noise), so results
    are reproducible per seed and identical on every device.
    """
    if sampler_name not in SAMPLER_NAMES:
        raise ValueError(f"sampler_name {sampler_name!r} is not one of {', '.join(SAMPLER_NAMES)}")
    fn = core_samplers.SAMPLERS[sampler_name]
    eta = DEFAULT_ETA.get(sampler_name) if eta is None else float(eta)
    options = {}
    if sampler_name == "sa_solver":
        options["tau"] = core_samplers.tau_window(eta)
    elif sampler_name == "ddim":
        options["eta"] = eta
    takes_generator = "generator" in inspect.signature(fn).parameters

    def sampler_function(model, x, sigmas, extra_args=None, callback=None, disable=None, **kwargs):
        if takes_generator and kwargs.get("generator") is None and kwargs.get("noise_sampler") is None:
            seed = int((extra_args or {}).get("seed") or 0)
            kwargs["generator"] = torch.Generator("cpu").manual_seed((seed + 1) % 2 ** 64)
        return fn(model, x, sigmas, extra_args=extra_args, callback=callback, disable=disable, **kwargs)

    sampler_function.__name__ = f"pixart_{sampler_name}"
    return (PriorStartKSAMPLER if prior_start else comfy.samplers.KSAMPLER)(sampler_function, extra_options=options)


def share_prompt_mask(positive, negative) -> tuple[list, list[str]]:
    """Official Σ CFG (spec §6.3): the negative attended over the prompt's tokens, i.e. its T5 outputs
    (OUTPUTS_KEY) at the positions where the first positive entry is no padding, zero elsewhere (the
    mask travels in the tensor, as everywhere). Returns (negative, notes): a negative that cannot
    take the prompt's mask keeps its own, and a note says why."""
    prompt = caption_mask(positive[0][0])  # (b, L)
    out, notes = [], []
    for cond, d in negative:
        outputs = d.get(OUTPUTS_KEY)
        note = None
        if not cond.any():
            pass  # all zeros (ConditioningZeroOut): every mask gives the same attention
        elif outputs is None:
            note = ("the negative carries no padded T5 outputs (encode it with 'T5 Text Encode (PixArt)' on "
                    "'Load T5 Encoder (PixArt)' for the official null)")
        elif outputs.shape != cond.shape or not torch.equal(masked_captions(outputs, caption_mask(cond)), cond):
            note = ("a conditioning node changed the negative after T5 Text Encode (PixArt), so its padding "
                    "outputs are unknown")
        elif prompt.shape[1] != cond.shape[1]:
            note = (f"the negative has {cond.shape[1]} tokens and the prompt {prompt.shape[1]} (encode both with "
                    "'T5 Text Encode (PixArt)' at the same max_length)")
        else:
            cond = masked_captions(outputs, prompt)
        if note:
            notes.append(f"{note}; the negative attends its own tokens (diffusers), not the prompt's (official).")
        out.append([cond, d])
    return out, notes


def native_size_error(model, latent: torch.Tensor) -> str | None:
    """ComfyUI's own PixArt derives its position-embedding base size from the latent, round((h + w) / 128)
    · 32 tokens (comfy/ldm/pixart/pixartms.py), which is 0, and a division by zero, below 264 px."""
    lat_h, lat_w = latent.shape[-2:]
    if pixart_config_of(model) is not None or round((lat_h + lat_w) // 2 / 64):
        return None
    return (f"ComfyUI's own PixArt model cannot sample {lat_w * 8}x{lat_h * 8}: it derives its position embedding "
            "from the size and divides by zero below (width + height) / 2 = 264 px; use a larger size, or load the "
            "model with 'Load PixArt-Σ Model', which samples any size")


def attended_tokens_only(conditioning) -> list:
    """ComfyUI's own PixArt model has no caption mask: it attends every token it is given. Given only
    the tokens the mask keeps (one entry at a time), its attention is the masked one."""
    out = []
    for cond, d in conditioning:
        keep = caption_mask(cond)
        if cond.shape[0] == 1 and not keep.all():
            cond = cond[:, keep[0]]
        out.append([cond, d])
    return out


class PixArtGuider(comfy.samplers.CFGGuider):
    """ComfyUI's CFG guider with PixArt's conditioning rules: the official Σ null conditioning
    (share_prompt_mask), the padding dropped for ComfyUI's own PixArt model, and its size limit refused
    in one sentence. `notes` says what could not be applied."""
    notes: list[str] = []

    def set_conds(self, positive, negative, null_mask=NULL_OFFICIAL):
        self.notes = []
        if null_mask == NULL_OFFICIAL:
            negative, self.notes = share_prompt_mask(positive, negative)
        if pixart_config_of(self.model_patcher) is None:
            positive, negative = attended_tokens_only(positive), attended_tokens_only(negative)
        super().set_conds(positive, negative)

    def sample(self, noise, latent_image, *args, **kwargs):
        problem = native_size_error(self.model_patcher, latent_image)
        if problem:
            raise ValueError(problem)
        return super().sample(noise, latent_image, *args, **kwargs)


def check_guidance_inputs(model, positive, negative, null_mask) -> None:
    require_pixart(model)
    check_conditioning(model, positive, "positive")
    check_conditioning(model, negative, "negative")
    if null_mask not in (NULL_OFFICIAL, NULL_OWN):
        raise ValueError(f"null_mask {null_mask!r} is not one of {NULL_OFFICIAL!r}, {NULL_OWN!r}")


def tell(node_cls, notes: list[str]) -> str:
    """The notes, on the node and in the log; the text for the node's ui."""
    text = " ".join(dict.fromkeys(notes))
    if text:
        log.warning("%s: %s", node_cls.define_schema().display_name, text)
        show_text(node_cls, text)
    return text


def guidance_inputs() -> dict:
    """The inputs the PixArt Sampler and the PixArt CFG Guider share, by name."""
    return {
        "model": io.Model.Input("model", tooltip="A PixArt model: 'Load PixArt-Σ Model' (or ComfyUI's own PixArt)."),
        "positive": io.Conditioning.Input("positive", tooltip="The prompt, from 'T5 Text Encode (PixArt)'."),
        "negative": io.Conditioning.Input("negative", tooltip="The negative prompt, usually 'T5 Text Encode (PixArt)' "
                                                              "with an empty text (the official setup)."),
        "cfg": io.Float.Input("cfg", default=4.5, min=0.0, max=100.0, step=0.1, round=0.01,
                              tooltip="Classifier-free guidance scale: 4.5 is the official default; 1.0 disables "
                                      "the negative."),
        "null_mask": io.Combo.Input("null_mask", options=[NULL_OFFICIAL, NULL_OWN], default=NULL_OFFICIAL,
                                    tooltip="Which tokens the negative attends to. Official Σ: the prompt's mask (the "
                                            "empty prompt's padding outputs count too); diffusers: the negative's own "
                                            "mask (what the stock CFGGuider does). The two give slightly different "
                                            "images."),
    }


class PixArtSuiteSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        shared = guidance_inputs()
        return io.Schema(
            node_id="PixArtSuiteSampler",
            display_name="PixArt Sampler",
            category=CATEGORY,
            description="Samples a PixArt model the way the official PixArt-Σ inference does by default "
                        "(DPM-Solver++ 2M on its time-uniform grid, 20 steps, CFG 4.5, the negative attended over "
                        "the prompt's tokens), through ComfyUI's sampling so previews, LoRAs and offloading work.",
            inputs=[
                shared["model"], shared["positive"], shared["negative"],
                io.Latent.Input("latent_image", tooltip="The latent to start from: 'PixArt Resolution' for text to "
                                                         "image, a VAE-encoded image with denoise < 1 for image to image."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seed of the starting noise (and of the step noise of sa_solver / ddim with eta)."),
                io.Int.Input("steps", default=20, min=1, max=10000, tooltip="Number of model evaluations (20 official)."),
                shared["cfg"],
                io.Combo.Input("sampler_name", options=list(SAMPLER_NAMES), default="dpmpp_2m",
                               tooltip="dpmpp_2m: the official DPM-Solver++(2M); sa_solver: PixArt's SA-Solver "
                                       "(stochastic, official τ window); euler; ddim (deterministic); lcm: the "
                                       "Latent Consistency Model sampler (PixArt-LCM, Flash-PixArt)."),
                io.Combo.Input("step_grid", options=list(STEP_GRIDS), default="dpm_time_uniform",
                               tooltip=_GRID_TOOLTIP),
                shared["null_mask"],
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="1.0 starts from pure noise; lower keeps more of latent_image (image to image)."),
                io.Combo.Input("preset", options=list(fewstep.LABELS), default=fewstep.CUSTOM, optional=True,
                               tooltip=_PRESET_TOOLTIP),
            ],
            outputs=[io.Latent.Output(tooltip="The sampled latent, for VAE Decode (SDXL VAE for Σ).")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, cfg, denoise):
        return queue_check(check_widgets, cls, cfg=cfg, denoise=denoise)

    @classmethod
    def execute(cls, model, positive, negative, latent_image, seed, steps, cfg, sampler_name, step_grid, null_mask,
                denoise, preset=fewstep.CUSTOM) -> io.NodeOutput:
        check_widgets(cls, seed=seed, steps=steps, cfg=cfg, denoise=denoise)
        if preset != fewstep.CUSTOM:
            p = fewstep.sampling_preset(preset)
            steps, cfg, sampler_name, step_grid = p.steps, p.cfg, p.sampler, p.grid
        check_guidance_inputs(model, positive, negative, null_mask)
        sampler = pixart_ksampler(sampler_name, prior_start=step_grid in schedule.FIXED_GRIDS)
        sigmas = make_sigmas(step_grid, steps, denoise)

        latent = latent_image.copy()
        samples = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
        problem = native_size_error(model, samples)
        if problem:
            raise ValueError(problem)
        config = pixart_config_of(model)
        check_sampling_fits(samples.shape[0], samples.shape[-2], samples.shape[-1], model.load_device,
                            *((config.hidden_size, config.patch_size) if config else ()))
        latent["samples"] = samples
        if sigmas.numel() == 0:  # denoise 0: nothing to do
            return io.NodeOutput(latent)
        guider = PixArtGuider(model)
        guider.set_conds(positive, negative, null_mask)
        guider.set_cfg(cfg)
        text = tell(cls, guider.notes)
        noise = comfy.sample.prepare_noise(samples, seed, latent.get("batch_index"))
        callback = latent_preview.prepare_callback(model, sigmas.shape[-1] - 1)
        out = guider.sample(noise, samples, sampler, sigmas, denoise_mask=latent.get("noise_mask"), callback=callback,
                            disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
        latent["samples"] = out.to(comfy.model_management.intermediate_device())
        return io.NodeOutput(latent, ui=ui.PreviewText(text) if text else None)


class PixArtSuiteSamplerSelect(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PixArtSuiteSamplerSelect",
            display_name="PixArt Sampler Select",
            category=CATEGORY,
            description="PixArt's samplers (official DPM-Solver++ 2M, SA-Solver, Euler, DDIM, LCM) as a SAMPLER for "
                        "SamplerCustom / SamplerCustomAdvanced.",
            inputs=[
                io.Combo.Input("sampler_name", options=list(SAMPLER_NAMES), default="dpmpp_2m",
                               tooltip="dpmpp_2m: DPM-Solver++(2M) as in the official code; sa_solver: SA-Solver; "
                                       "euler; ddim; lcm: diffusers' LCMScheduler (PixArt-LCM, Flash-PixArt; use "
                                       "the lcm step grid)."),
                io.Float.Input("eta", default=1.0, min=0.0, max=10.0, step=0.01,
                               tooltip="Step noise. sa_solver: τ inside its 200-800 timestep window (1.0 official); "
                                       "ddim: 0 = deterministic DDIM (what PixArt Sampler uses), 1 = DDPM-like. "
                                       "Ignored by dpmpp_2m and euler."),
            ],
            outputs=[io.Sampler.Output(tooltip="Connect to SamplerCustom's sampler input.")],
        )

    @classmethod
    def validate_inputs(cls, eta):
        return queue_check(check_widgets, cls, eta=eta)

    @classmethod
    def execute(cls, sampler_name, eta) -> io.NodeOutput:
        check_widgets(cls, eta=eta)
        return io.NodeOutput(pixart_ksampler(sampler_name, eta))


class PixArtSuiteSigmas(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PixArtSuiteSigmas",
            display_name="PixArt Step Grid",
            category=CATEGORY,
            description="The noise levels (SIGMAS) of PixArt's step grids, for SamplerCustom / SamplerCustomAdvanced.",
            inputs=[
                io.Model.Input("model", tooltip="The PixArt model the sigmas are for (checked to be PixArt)."),
                io.Combo.Input("step_grid", options=list(SIGMAS_GRIDS), default="dpm_time_uniform",
                               tooltip=_GRID_TOOLTIP.replace("; dmd: the one step at timestep 400 of PixArt-α-DMD "
                                                             "(steps 1).", ". (PixArt-α-DMD: the PixArt Sampler's "
                                                             "'DMD 1 step' preset.)")),
                io.Int.Input("steps", default=20, min=1, max=10000, tooltip="Number of steps."),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Below 1.0 keeps only the last part of a longer schedule (image to image)."),
            ],
            outputs=[io.Sigmas.Output(tooltip="steps+1 noise levels, high to low, ending in 0.")],
        )

    @classmethod
    def validate_inputs(cls, denoise):
        return queue_check(check_widgets, cls, denoise=denoise)

    @classmethod
    def execute(cls, model, step_grid, steps, denoise) -> io.NodeOutput:
        check_widgets(cls, steps=steps, denoise=denoise)
        if step_grid in schedule.FIXED_GRIDS:
            raise ValueError(f"step_grid {step_grid!r} is a one-step schedule that SamplerCustom would start from the "
                             "wrong noise level; use the PixArt Sampler with the 'DMD 1 step' preset")
        require_pixart(model)
        return io.NodeOutput(make_sigmas(step_grid, steps, denoise))


class PixArtSuiteCFGGuider(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PixArtSuiteCFGGuider",
            display_name="PixArt CFG Guider",
            category=CATEGORY,
            description="Classifier-free guidance as the PixArt Sampler does it (by default the official Σ one: the "
                        "negative attended over the prompt's tokens), as a GUIDER for SamplerCustomAdvanced. The "
                        "stock CFGGuider gives the negative its own tokens (the diffusers variant).",
            inputs=list(guidance_inputs().values()),
            outputs=[io.Guider.Output(tooltip="Connect to SamplerCustomAdvanced's guider input.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, cfg):
        return queue_check(check_widgets, cls, cfg=cfg)

    @classmethod
    def execute(cls, model, positive, negative, cfg, null_mask) -> io.NodeOutput:
        check_widgets(cls, cfg=cfg)
        check_guidance_inputs(model, positive, negative, null_mask)
        guider = PixArtGuider(model)
        guider.set_conds(positive, negative, null_mask)
        guider.set_cfg(cfg)
        text = tell(cls, guider.notes)
        return io.NodeOutput(guider, ui=ui.PreviewText(text) if text else None)
