"""Text to latent without ComfyUI: prompt -> T5 -> binned size -> sampler -> latents.

The latents returned are in the VAE's own latent space (divided by the scaling factor), the
convention of ComfyUI's LATENT and of `.latent` files, so they decode with any SDXL (Σ) or SD1.5 (α)
VAE as they are.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from . import bins, schedule
from .model import PixArt
from .samplers import SAMPLERS, PixArtDenoiser

LATENT_SCALE = {"sigma": 0.13025, "alpha": 0.18215}  # SDXL VAE, sd-vae-ft-ema (spec §5)
NULL_MODES = ("prompt_mask", "own_mask", "y_embedding")


class Interrupted(RuntimeError):
    """Raised from inside sampling when the caller's `should_stop()` returns True."""


@dataclass
class Conditioning:
    """Caption embeddings (B, L, C) with their mask (B, L), 1 = valid."""
    embeds: torch.Tensor
    mask: torch.Tensor


def null_conditioning(mode: str, prompt: Conditioning, negative: Conditioning | None = None,
                      model: PixArt | None = None) -> Conditioning:
    """The unconditional half of classifier-free guidance (spec §4 and §6.3).

    prompt_mask: the official Σ inference: T5(negative or "") attended over the *prompt's* mask.
    own_mask: diffusers: T5(negative) with its own mask.
    y_embedding: the checkpoint's training null caption with the prompt's mask (official α).
    """
    if mode == "own_mask":
        return negative
    if mode == "prompt_mask":
        return Conditioning(negative.embeds, prompt.mask)
    if mode == "y_embedding":
        null = model.y_embedder.y_embedding
        if not null.abs().sum():
            raise ValueError("this checkpoint has no null caption (diffusers files drop y_embedding); "
                             "use null mode prompt_mask or own_mask")
        L = prompt.embeds.shape[1]
        if null.shape[0] < L:
            raise ValueError(f"the checkpoint's null caption has {null.shape[0]} tokens, the prompt {L}")
        embeds = null[:L].to(prompt.embeds).expand(prompt.embeds.shape[0], -1, -1)
        return Conditioning(embeds, prompt.mask)
    raise ValueError(f"unknown null conditioning {mode!r}; choose one of {', '.join(NULL_MODES)}")


@dataclass
class Generated:
    latents: torch.Tensor  # (B, 4, h/8, w/8), VAE latent space
    height: int  # the size generated (the bin)
    width: int
    requested: tuple[int, int]  # resize-and-crop the decoded image to this
    seed: int
    family: str


def initial_noise(seed: int, batch: int, channels: int, height: int, width: int) -> torch.Tensor:
    """Standard-normal latent noise from a CPU generator, so a seed gives the same image on any device."""
    g = torch.Generator("cpu").manual_seed(seed)
    return torch.randn(batch, channels, height // 8, width // 8, generator=g, dtype=torch.float32)


@torch.no_grad()
def generate(model: PixArt, prompt: Conditioning, negative: Conditioning, *, height=None, width=None, steps=20,
             guidance=4.5, sampler="dpmpp_2m", grid="dpm_time_uniform", seed=0, batch=1, null_mode="prompt_mask",
             binning=True, denoise=1.0, init_latents=None, callback: Callable[[int, int], None] | None = None,
             should_stop: Callable[[], bool] | None = None, progress_bar=False) -> Generated:
    """Sample latents for encoded prompts. Sizes are snapped to the model's aspect-ratio bins unless
    binning=False; init_latents (VAE space) with denoise<1 is img2img."""
    cfg = model.config
    height, width = height or cfg.resolution, width or cfg.resolution
    if binning:  # any requested size works: the decoded bin is resized and cropped to it
        if height <= 0 or width <= 0:
            raise ValueError(f"requested size {width}x{height} must be positive")
        gen_h, gen_w = bins.nearest_bin(height, width, cfg.resolution)
    else:
        gen_h, gen_w = bins.check_size(height, width)
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if prompt.embeds.shape[-1] != cfg.caption_channels:
        raise ValueError(f"the prompt embeddings are {prompt.embeds.shape[-1]} wide but the model expects "
                         f"{cfg.caption_channels}: use the T5 encoder that matches the model")
    device = next(model.parameters()).device
    sigmas = schedule.make_sigmas(grid, steps, denoise).to(device)
    noise = initial_noise(seed, batch, cfg.in_channels, gen_h, gen_w).to(device)
    if init_latents is not None:
        x0 = (init_latents.float() * LATENT_SCALE[cfg.family]).to(device)
        if x0.shape[-2:] != noise.shape[-2:]:
            raise ValueError(f"init latents are {tuple(x0.shape[-2:])} but the generation size needs {tuple(noise.shape[-2:])}")
        x = x0 + noise * sigmas[0]
    else:
        x = noise * math.sqrt(1.0 + float(sigmas[0]) ** 2)  # pure noise in VP, expressed in VE scale

    uncond = null_conditioning(null_mode, prompt, negative, model)
    c_size = torch.tensor([[float(gen_h), float(gen_w)]], device=device)
    c_ar = torch.tensor([[gen_h / gen_w]], device=device)
    extra = dict(context=prompt.embeds.to(device), context_mask=prompt.mask.to(device),
                 uncond_context=uncond.embeds.to(device), uncond_mask=uncond.mask.to(device),
                 cfg_scale=guidance, c_size=c_size, c_ar=c_ar)
    total = len(sigmas) - 1

    def on_step(info):
        if should_stop is not None and should_stop():
            raise Interrupted("generation interrupted")
        if callback is not None:
            callback(info["i"] + 1, total)

    kwargs = {}
    if sampler in ("sa_solver", "ddim"):
        kwargs["generator"] = torch.Generator("cpu").manual_seed(seed + 1)
    out = SAMPLERS[sampler](PixArtDenoiser(model), x, sigmas, extra_args=extra, callback=on_step,
                            disable=not progress_bar, **kwargs)
    return Generated(out.float().cpu() / LATENT_SCALE[cfg.family], gen_h, gen_w, (height, width), seed, cfg.family)


def save_latents(path, generated: Generated) -> None:
    """A `.latent` file ComfyUI's Load Latent reads as-is (safetensors, `latent_tensor`)."""
    from safetensors.torch import save_file
    save_file({"latent_tensor": generated.latents.contiguous(), "latent_format_version_0": torch.tensor([])},
              str(path), metadata={"height": str(generated.height), "width": str(generated.width),
                                   "requested": f"{generated.requested[0]}x{generated.requested[1]}",
                                   "seed": str(generated.seed), "family": generated.family})
