"""PixArt Validation Loss: a readable training-progress number for ComfyUI's stock Train LoRA.

The stock node reports its loss at one random noise level per step (in x0 space, so it swings over
orders of magnitude). This node measures ε-MSE at fixed noise levels with fixed seeds over the
training latents (pixart_core.training.validation_terms), through ComfyUI's own sampling machinery, so
LoRA patches, Train LoRA's trained MODEL, KV compression and offloading all apply, and the same
weights give the same number before and after a run.
"""
from __future__ import annotations

import comfy.model_management as mm
import comfy.samplers
import comfy.utils
import torch
from comfy_api.latest import io, ui
from comfy_extras.nodes_custom_sampler import Guider_Basic

from ..pixart_core import schedule
from ..pixart_core.training import VALIDATION_LEVELS, Validation, validation_terms, validation_timesteps
from .common import CATEGORY, check_conditioning, require_pixart, show_text

MAX_LEVELS = 100


class _ValidationSampler(comfy.samplers.Sampler):
    """Not a sampler: ComfyUI hands it the prepared model and the latent in model space, and it measures."""

    def __init__(self, index: int, seed: int, levels: int, on_step):
        self.index, self.seed, self.levels, self.on_step = index, seed, levels, on_step
        self.terms: list[float] = []

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        def denoiser(x, sigma):
            return model_wrap(x, sigma, **extra_args)

        self.terms = validation_terms(denoiser, latent_image, self.index, self.seed, self.levels, self.on_step)
        return latent_image


def _latent_items(latents: list) -> list[torch.Tensor]:
    """Every latent (1, C, H, W) from a list of LATENTs (each may be a batch)."""
    out = []
    for i, latent in enumerate(latents):
        samples = latent.get("samples") if isinstance(latent, dict) else None
        if not isinstance(samples, torch.Tensor) or samples.ndim != 4:
            raise ValueError(f"latents item {i} is not a LATENT of images; connect the VAE Encode (or Rebatch "
                             "Latents) output that feeds Train LoRA")
        out += [samples[j:j + 1] for j in range(samples.shape[0])]
    return out


def _conditioning_items(positive: list) -> list[list]:
    """Every single-prompt CONDITIONING from a list of CONDITIONINGs (as Train LoRA flattens them)."""
    out = []
    for cond in positive:
        out += [[entry] for entry in cond] if isinstance(cond, list) else [cond]
    return out


def measure(model, latents: list[torch.Tensor], conds: list[list], seed: int, levels: int) -> Validation:
    """The validation loss of a MODEL over latents (VAE space, as LATENTs hold them) with one caption each."""
    pbar = comfy.utils.ProgressBar(len(latents) * levels)
    sigmas = schedule.discrete_sigmas()[validation_timesteps(levels)].float()

    def on_step():
        mm.throw_exception_if_processing_interrupted()
        pbar.update(1)

    terms = []
    for i, (latent, cond) in enumerate(zip(latents, conds)):
        guider = Guider_Basic(model)
        guider.set_conds(cond)
        sampler = _ValidationSampler(i, seed, levels, on_step)
        guider.sample(torch.zeros_like(latent), latent, sampler, sigmas, seed=seed, disable_pbar=True)
        terms.append(sampler.terms)
    return Validation.from_terms(terms)


class PixArtSuiteValidationLoss(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PixArtSuiteValidationLoss",
            display_name="PixArt Validation Loss",
            category=CATEGORY,
            description="Measures how well a PixArt model denoises its training latents: ε-MSE at fixed noise "
                        "levels with fixed seeds, so the number before and after Train LoRA (or between runs) is "
                        "directly comparable; lower is better. Unlike Train LoRA's own loss it does not jump "
                        "with the random noise level of each step.",
            is_input_list=True,
            is_output_node=True,
            inputs=[
                io.Model.Input("model", tooltip="The model to measure: the base model, Train LoRA's model output, "
                                                "or a model with the trained LoRA loaded."),
                io.Latent.Input("latents", tooltip="The training latents (what feeds Train LoRA)."),
                io.Conditioning.Input("positive", tooltip="The training captions (what feeds Train LoRA): one per "
                                                          "latent, or one for all."),
                io.Int.Input("noise_levels", default=VALIDATION_LEVELS, min=1, max=MAX_LEVELS,
                             tooltip="How many fixed noise levels, spread evenly over the training timesteps."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF,
                             tooltip="Seed of the fixed noise; keep it the same to compare runs."),
            ],
            outputs=[io.Float.Output(tooltip="Mean ε-MSE over latents and noise levels (lower is better).")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, latents, positive, noise_levels, seed) -> io.NodeOutput:
        model, levels, seed = model[0], noise_levels[0], seed[0]
        require_pixart(model)
        if not isinstance(levels, int) or not 1 <= levels <= MAX_LEVELS:
            raise ValueError(f"noise_levels must be a whole number from 1 to {MAX_LEVELS}, got {levels!r}")
        items = _latent_items(latents)
        conds = _conditioning_items(positive)
        if not conds:
            raise ValueError("positive is empty; connect the captions' T5 Text Encode (PixArt) output")
        for cond in conds:
            check_conditioning(model, cond, "positive")
        if len(conds) == 1:
            conds = conds * len(items)
        elif len(conds) != len(items):
            raise ValueError(f"positive has {len(conds)} captions for {len(items)} latents; give one per latent "
                             "or one for all, as Train LoRA takes them")
        result = measure(model, items, conds, seed, levels)
        text = result.describe()
        show_text(cls, text)
        return io.NodeOutput(result.loss, ui=ui.PreviewText(text))
