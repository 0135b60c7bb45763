"""Text to latent without ComfyUI: prompt -> T5 -> binned size -> sampler -> latents.

The latents returned are in the VAE's own latent space (divided by the scaling factor), the
convention of ComfyUI's LATENT and of `.latent` files, so they decode with any SDXL (Σ) or SD1.5 (α)
VAE as they are.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from . import bins, checks, schedule
from .checks import InputError
from .files import save_result
from .guidance import PAG
from .model import PixArt
from .samplers import SAMPLERS, PixArtDenoiser, per_row_noise_sampler

LATENT_SCALE = {"sigma": 0.13025, "alpha": 0.18215}  # SDXL VAE, sd-vae-ft-ema (spec §5)
NULL_MODES = ("prompt_mask", "own_mask", "y_embedding")
MAX_BATCH = 4096  # as ComfyUI's empty-latent nodes
MAX_GUIDANCE = 100.0
ASPECT_CONDITIONS = ("bin_key", "height_width")  # α micro-condition: official inference, diffusers
STOCHASTIC = ("sa_solver", "ddim", "lcm")  # samplers that draw step noise (seeded with seed + 1)
MAX_REQUESTED_SIDE = 16384  # ComfyUI's MAX_RESOLUTION; with binning any requested size maps to a bin


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
        null = model.y_embedder.y_embedding.weight
        if not null.abs().sum():
            raise InputError("this checkpoint has no null caption (diffusers files drop y_embedding); "
                             "use null mode prompt_mask or own_mask")
        L = prompt.embeds.shape[1]
        if null.shape[0] < L:
            raise InputError(f"the checkpoint's null caption has {null.shape[0]} tokens, the prompt {L}")
        embeds = null[:L].to(prompt.embeds).expand(prompt.embeds.shape[0], -1, -1)
        return Conditioning(embeds, prompt.mask)
    raise InputError(f"unknown null conditioning {mode!r}; choose one of {', '.join(NULL_MODES)}")


@dataclass
class Generated:
    latents: torch.Tensor  # (B, 4, h/8, w/8), VAE latent space
    height: int  # the size generated (the bin)
    width: int
    requested: tuple[int, int]  # resize-and-crop the decoded image to this
    seed: int
    family: str


def sampling_bytes(batch: int, latent_h: int, latent_w: int, hidden_size: int = 1152, patch_size: int = 2) -> int:
    """A lower bound of the memory one denoiser step holds: the residual stream and q/k/v of one block,
    in 16 bit, for both classifier-free-guidance halves. Whatever attention or chunking is used, a step
    needs at least this, so a request above the device's memory can be refused before it starts."""
    tokens = max(1, latent_h // patch_size) * max(1, latent_w // patch_size)
    return 2 * batch * tokens * hidden_size * 4 * 2


def check_sampling_fits(batch: int, latent_h: int, latent_w: int, device="cpu", hidden_size: int = 1152,
                        patch_size: int = 2) -> None:
    """Refuse a batch and size whose sampling could never fit on the device, with the figure."""
    h, w = latent_h * 8, latent_w * 8
    checks.check_fits(f"sampling {batch} image(s) of {w}x{h} px", sampling_bytes(batch, latent_h, latent_w,
                      hidden_size, patch_size), device, "use a smaller batch or size")


def initial_noise(seed: int, batch: int, channels: int, height: int, width: int) -> torch.Tensor:
    """Standard-normal latent noise from a CPU generator, so a seed gives the same image on any device."""
    g = torch.Generator("cpu").manual_seed(seed)
    return torch.randn(batch, channels, height // 8, width // 8, generator=g, dtype=torch.float32)


@torch.no_grad()
def generate(model: PixArt, prompt: Conditioning, negative: Conditioning, *, height=None, width=None, steps=20,
             guidance=4.5, sampler="dpmpp_2m", grid="dpm_time_uniform", seed=0, batch=1, null_mode="prompt_mask",
             binning=True, denoise=1.0, init_latents=None, callback: Callable[[int, int], None] | None = None,
             should_stop: Callable[[], bool] | None = None, progress_bar=False, official_end=False,
             aspect_condition="bin_key", seeds=None, pag=None) -> Generated:
    """Sample latents for encoded prompts. Sizes are snapped to the model's aspect-ratio bins unless
    binning=False; init_latents (VAE space) with denoise<1 is img2img.

    official_end=True stops at t = 1e-3 and returns the VP-scaled sample there, as the official
    DPM-Solver and SA-Solver do (dpm_time_uniform grid only); the default lands on the x0 estimate.
    aspect_condition (PixArt-α 1024 micro-conditions): "bin_key" passes the bin's ratio key as official
    inference does, "height_width" passes height/width as diffusers does.
    seeds (a list, one per sample; replaces seed and batch) gives each sample its own noise generators,
    so a sample is the same whatever else is in the batch (batch jobs: pixart_core.batch).
    pag (guidance.PAG): perturbed-attention guidance, a third batch part per step (see guidance.py).
    """
    cfg = model.config
    height = cfg.resolution if height is None else height
    width = cfg.resolution if width is None else width
    if seeds is not None:
        seeds = [checks.whole_number("seed", s, 0, checks.SEED_MAX) for s in seeds]
        batch, seed = checks.whole_number("number of seeds", len(seeds), 1, MAX_BATCH), seeds[0]
    seed = checks.whole_number("seed", seed, 0, checks.SEED_MAX)
    batch = checks.whole_number("batch", batch, 1, MAX_BATCH)
    guidance = checks.real_number("guidance", guidance, 0.0, MAX_GUIDANCE)
    denoise = checks.real_number("denoise", denoise, 0.0, 1.0)
    if binning:  # any requested size works: the decoded bin is resized and cropped to it
        height = checks.whole_number("height", height, 1, MAX_REQUESTED_SIDE)
        width = checks.whole_number("width", width, 1, MAX_REQUESTED_SIDE)
        gen_h, gen_w = bins.nearest_bin(height, width, cfg.resolution)
    else:
        gen_h, gen_w = bins.check_size(height, width)
    if sampler not in SAMPLERS:
        raise InputError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if aspect_condition not in ASPECT_CONDITIONS:
        raise InputError(f"unknown aspect_condition {aspect_condition!r}; choose one of {', '.join(ASPECT_CONDITIONS)}")
    if official_end and (grid != "dpm_time_uniform" or denoise < 1.0):
        raise InputError("official_end needs the official grid (grid='dpm_time_uniform') and denoise 1, "
                         f"got grid={grid!r}, denoise={denoise:g}")
    if prompt.embeds.shape[-1] != cfg.caption_channels:
        raise InputError(f"the prompt embeddings are {prompt.embeds.shape[-1]} wide but the model expects "
                         f"{cfg.caption_channels}: use the T5 encoder that matches the model")
    device = next(model.parameters()).device
    if pag is not None and not isinstance(pag, PAG):
        raise InputError(f"pag must be a pixart_core.guidance.PAG, got {type(pag).__name__}")
    if pag is not None and pag.layers and max(pag.layers) >= cfg.depth:
        raise InputError(f"PAG layers {list(pag.layers)} name block {max(pag.layers)}, but this model has blocks "
                         f"0-{cfg.depth - 1}")
    # sampling_bytes counts two CFG parts; PAG adds a third
    fit_batch = -(-batch * 3 // 2) if pag is not None and pag.active else batch
    check_sampling_fits(fit_batch, gen_h // 8, gen_w // 8, device, cfg.hidden_size, cfg.patch_size)
    if official_end:
        sigmas = schedule.sigmas_dpm_time_uniform(checks.whole_number("steps", steps, 1, schedule.MAX_STEPS),
                                                  keep_sigma_min=True).to(device)
    else:
        sigmas = schedule.make_sigmas(grid, steps, denoise).to(device)
    if seeds is None:
        noise = initial_noise(seed, batch, cfg.in_channels, gen_h, gen_w).to(device)
    else:
        noise = torch.cat([initial_noise(s, 1, cfg.in_channels, gen_h, gen_w) for s in seeds]).to(device)
    if init_latents is not None:
        x0 = (init_latents.float() * LATENT_SCALE[cfg.family]).to(device)
        if x0.shape[-2:] != noise.shape[-2:]:
            raise InputError(f"init latents are {tuple(x0.shape[-2:])} but the generation size needs {tuple(noise.shape[-2:])}")
        x = x0 + noise * sigmas[0]
    else:
        x = noise * math.sqrt(1.0 + float(sigmas[0]) ** 2)  # pure noise in VP, expressed in VE scale

    uncond = null_conditioning(null_mode, prompt, negative, model)
    c_size = torch.tensor([[float(gen_h), float(gen_w)]], device=device)
    # None: the model's own default, the bin's ratio key (official inference)
    c_ar = torch.tensor([[gen_h / gen_w]], device=device) if aspect_condition == "height_width" else None
    extra = dict(context=prompt.embeds.to(device), context_mask=prompt.mask.to(device),
                 uncond_context=uncond.embeds.to(device), uncond_mask=uncond.mask.to(device),
                 cfg_scale=guidance, c_size=c_size, c_ar=c_ar, pag=pag)
    total = len(sigmas) - 1

    def on_step(info):
        if should_stop is not None and should_stop():
            raise Interrupted("generation interrupted")
        if callback is not None:
            callback(info["i"] + 1, total)

    kwargs = {}
    if sampler in STOCHASTIC and seeds is None:
        kwargs["generator"] = torch.Generator("cpu").manual_seed((seed + 1) % 2 ** 64)
    elif sampler in STOCHASTIC:
        kwargs["noise_sampler"] = per_row_noise_sampler(
            x, [torch.Generator("cpu").manual_seed((s + 1) % 2 ** 64) for s in seeds])
    out = SAMPLERS[sampler](PixArtDenoiser(model), x, sigmas, extra_args=extra, callback=on_step,
                            disable=not progress_bar, **kwargs)
    if official_end:
        out = schedule.vp_scaled(out, sigmas[-1])
    return Generated(out.float().cpu() / LATENT_SCALE[cfg.family], gen_h, gen_w, (height, width), seed, cfg.family)


def save_latents(path, generated: Generated) -> Path:
    """A `.latent` file ComfyUI's Load Latent reads as-is (safetensors, `latent_tensor`), written atomically
    and byte-identical for the same latents; returns where it went (see files.save_result: never lost
    when the path cannot be written)."""
    from .files import safetensors_bytes
    tensors = {"latent_tensor": generated.latents.contiguous(), "latent_format_version_0": torch.tensor([])}
    meta = {"height": str(generated.height), "width": str(generated.width),
            "requested": f"{generated.requested[0]}x{generated.requested[1]}",
            "seed": str(generated.seed), "family": generated.family}
    data = safetensors_bytes(tensors, meta)
    return save_result(path, lambda tmp: tmp.write_bytes(data), "latents")
