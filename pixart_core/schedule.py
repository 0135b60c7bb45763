"""PixArt-Σ training noise schedule, sigma <-> timestep conversion, and sampling step grids.

Sigmas are in the k-diffusion VE parameterisation, x = x0 + σ·ε, with σ = sqrt((1 - ᾱ) / ᾱ); the
network sees x / sqrt(1 + σ²) and a timestep in the 0..999 training scale (../shared/pixart_spec.md §6).
Every step grid returns float32 sigmas, high to low, ending in 0 (the one opt-out is
sigmas_dpm_time_uniform(..., keep_sigma_min=True), the official end point t = 1e-3).
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch

from .checks import InputError, real_number, whole_number

NUM_TRAIN_TIMESTEPS = 1000
MAX_STEPS = 10_000  # the most steps any entry point (nodes, CLI, library) takes
MAX_SCHEDULE = 1_000_000  # the longest schedule a denoise < 1 may cut its tail from
BETA_START = 1e-4
BETA_END = 0.02
T_EPS = 1.0 / NUM_TRAIN_TIMESTEPS  # DPM-Solver's t_0 = 1/N for a discrete-time model


def betas() -> torch.Tensor:
    """Linear β schedule of the training run (iDDPM "linear", float64)."""
    return torch.linspace(BETA_START, BETA_END, NUM_TRAIN_TIMESTEPS, dtype=torch.float64)


def alphas_cumprod() -> torch.Tensor:
    """ᾱ_k = ∏_{j≤k} (1 - β_j), float64."""
    return torch.cumprod(1.0 - betas(), dim=0)


def discrete_sigmas() -> torch.Tensor:
    """σ_k = sqrt((1 - ᾱ_k) / ᾱ_k) for the 1000 training timesteps, float64."""
    ac = alphas_cumprod()
    return ((1.0 - ac) / ac).sqrt()


@functools.lru_cache(maxsize=None)
def _log_alphas() -> torch.Tensor:
    # log α_k = ½ log ᾱ_k, summed in log space as NoiseScheduleVP('discrete', betas) does.
    # Private and cached: never hand this tensor out, callers could modify it in place.
    return 0.5 * torch.log1p(-betas()).cumsum(0)


def _as_float64_cpu(v) -> tuple[torch.Tensor, torch.dtype, torch.device]:
    v = torch.as_tensor(v)
    out_dtype = v.dtype if v.is_floating_point() else torch.float64
    # float64 on the CPU because some accelerators (MPS) have no float64; the sync is negligible.
    return v.detach().to("cpu", torch.float64), out_dtype, v.device


def timestep_to_sigma(t) -> torch.Tensor:
    """σ at a (possibly non-integer) timestep; log α is piecewise-linear between integers (DPM-Solver 'discrete')."""
    t, dtype, device = _as_float64_cpu(t)
    la = _log_alphas()
    # Outside 0..999 the end segments are extended linearly, as DPM-Solver's interpolate_fn does.
    k = t.floor().clamp(0, NUM_TRAIN_TIMESTEPS - 2).long()
    log_alpha = la[k] + (t - k) * (la[k + 1] - la[k])
    sigma = torch.expm1(-2.0 * log_alpha).clamp_min(0.0).sqrt()
    return sigma.to(device, dtype)


def sigma_to_timestep(sigma) -> torch.Tensor:
    """Inverse of timestep_to_sigma: the model's timestep input 1000·t - 1 for a VE sigma."""
    sigma, dtype, device = _as_float64_cpu(sigma)
    la = _log_alphas()
    log_alpha = -0.5 * torch.log1p(sigma * sigma)
    # log α decreases with t, so search on -log α.
    k = torch.searchsorted(-la, -log_alpha.contiguous()) - 1
    k = k.clamp(0, NUM_TRAIN_TIMESTEPS - 2)
    t = k + (log_alpha - la[k]) / (la[k + 1] - la[k])
    return t.to(device, dtype)


def _append_zero(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def sigmas_dpm_time_uniform(steps: int, keep_sigma_min: bool = False) -> torch.Tensor:
    """The official PixArt DPM-Solver grid: continuous t uniform from 1 to 1e-3 (skip_type='time_uniform').

    The official solver takes `steps` model evaluations at t_0..t_{steps-1} and stops at t = 1e-3
    (σ ≈ 0.0100) without denoising, so its output still holds σ_min·ε̂ of noise. By default that
    last point is replaced by σ = 0: the same model calls at the same timesteps, and the final
    first-order step lands on the x0 estimate instead (official x = ours + σ_min·ε̂_last).
    keep_sigma_min=True keeps σ(1e-3) as the last sigma with NO trailing zero: the samplers then end on
    the official solver's last state, x = x0 + σ_min·ε̂ in VE scale, while the official solver returns
    that state VP-scaled, x / √(1 + σ_min²) (vp_scaled; generate(official_end=True) applies it). It is
    the one grid here that does not end in 0.
    """
    if steps < 1:
        raise InputError(f"steps must be >= 1, got {steps}")
    t = torch.linspace(1.0, T_EPS, steps + 1, dtype=torch.float64)
    sigmas = timestep_to_sigma(t * NUM_TRAIN_TIMESTEPS - 1.0)
    if keep_sigma_min:
        return sigmas.float()
    return _append_zero(sigmas[:-1]).float()


def vp_scaled(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """A VE-scale sample at σ in the VP scale the official solvers return: x / √(1 + σ²)."""
    return x / math.sqrt(1.0 + float(sigma) ** 2)


def diffusers_timesteps(steps: int, spacing: str = "linspace") -> np.ndarray:
    """Integer timesteps of diffusers' DPMSolverMultistepScheduler.set_timesteps for its default config."""
    if steps < 1:
        raise InputError(f"steps must be >= 1, got {steps}")
    n = NUM_TRAIN_TIMESTEPS
    # numpy on purpose: np.linspace/np.arange/np.round reproduce diffusers' rounding bit for bit.
    if spacing == "linspace":
        ts = np.linspace(0, n - 1, steps + 1).round()[::-1][:-1]
    elif spacing == "leading":
        ts = (np.arange(0, steps + 1) * (n // (steps + 1))).round()[::-1][:-1]
    elif spacing == "trailing":
        # np.arange with a float step gives steps+1 points for a few step counts (61, 103, ...), as in diffusers.
        ts = np.arange(n, 0, -n / steps).round() - 1
    else:
        raise InputError(f"spacing must be 'linspace', 'leading' or 'trailing', got {spacing!r}")
    return ts.astype(np.int64)


def sigmas_diffusers(steps: int, spacing: str = "linspace") -> torch.Tensor:
    """σ at diffusers' DPMSolverMultistepScheduler timesteps (default config, final_sigmas_type='zero')."""
    ts = torch.from_numpy(diffusers_timesteps(steps, spacing).copy())
    # "trailing" can end at timestep -1; diffusers' np.interp clamps that to σ_0.
    ts = ts.clamp(0, NUM_TRAIN_TIMESTEPS - 1)
    # Exact float64 σ at integer timesteps; diffusers builds ᾱ in float32, which is off by up to
    # 8e-5 relative near t = 0 (cancellation in 1 - ᾱ), so the two agree to float32-schedule precision.
    return _append_zero(discrete_sigmas()[ts]).float()


def sigmas_karras(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. (2022) noise levels, eq. (5): uniform in σ^(1/ρ)."""
    if steps < 1:
        raise InputError(f"steps must be >= 1, got {steps}")
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return _append_zero((hi + ramp * (lo - hi)) ** rho).float()


LCM_ORIGINAL_STEPS = 50  # original_inference_steps of diffusers' LCMScheduler (PixArt-LCM, Flash-PixArt)
DMD_TIMESTEP = 400  # the timestep PixArt-α-DMD was distilled at (its demo: DDPMScheduler, timesteps=[400])


def lcm_timesteps(steps: int, original_steps: int = LCM_ORIGINAL_STEPS, strength: float = 1.0) -> np.ndarray:
    """Integer timesteps of diffusers' LCMScheduler.set_timesteps(steps) (which ignores timestep_spacing):
    `steps` evenly spaced indices into the distillation grid k·(1000 // original_steps) - 1, from the top."""
    steps = whole_number("steps", steps, 1, MAX_STEPS)
    usable = int(original_steps * strength)
    if steps > usable:
        raise InputError(f"steps {steps} is more than the LCM grid holds ({usable} distillation timesteps); "
                         f"use at most {usable} steps (4 is what PixArt-LCM and Flash-PixArt use)")
    k = NUM_TRAIN_TIMESTEPS // original_steps
    origin = (np.arange(1, usable + 1) * k - 1)[::-1]
    # numpy floor of a float linspace, as diffusers does it, so every step count picks the same indices
    return origin[np.floor(np.linspace(0, usable, num=steps, endpoint=False)).astype(np.int64)].astype(np.int64)


def sigmas_at_timesteps(timesteps) -> torch.Tensor:
    """float32 σ at integer training timesteps (high to low), plus the trailing 0."""
    ts = torch.as_tensor(np.asarray(timesteps, dtype=np.int64))
    if ts.numel() == 0 or ts.min() < 0 or ts.max() >= NUM_TRAIN_TIMESTEPS:
        raise InputError(f"timesteps must lie in 0..{NUM_TRAIN_TIMESTEPS - 1}, got {ts.tolist()}")
    return _append_zero(discrete_sigmas()[ts]).float()


def sigmas_lcm(steps: int) -> torch.Tensor:
    """σ at diffusers' LCMScheduler timesteps (4 steps: 999, 759, 499, 259), ending in 0."""
    return sigmas_at_timesteps(lcm_timesteps(steps))


def sigmas_dmd(steps: int = 1) -> torch.Tensor:
    """The one step of PixArt-α-DMD: σ at timestep 400, then 0 (x0 straight from pure noise)."""
    if steps != 1:
        raise InputError(f"the dmd grid is one step at timestep {DMD_TIMESTEP}, got steps {steps}; set steps to 1")
    return sigmas_at_timesteps([DMD_TIMESTEP])


def _karras_full_range(steps: int) -> torch.Tensor:
    s = discrete_sigmas()
    return sigmas_karras(steps, float(s[0]), float(s[-1]))


STEP_GRIDS = {
    "dpm_time_uniform": sigmas_dpm_time_uniform,
    "linspace": functools.partial(sigmas_diffusers, spacing="linspace"),
    "leading": functools.partial(sigmas_diffusers, spacing="leading"),
    "trailing": functools.partial(sigmas_diffusers, spacing="trailing"),
    "karras": _karras_full_range,
    "lcm": sigmas_lcm,
    "dmd": sigmas_dmd,
}
FIXED_GRIDS = {"dmd"}  # one fixed schedule: no longer schedule to cut a denoise < 1 tail from


def make_sigmas(grid: str, steps: int, denoise: float = 1.0) -> torch.Tensor:
    """Sigmas for `steps` steps of a named grid; denoise < 1 keeps the tail of a steps/denoise schedule (as ComfyUI)."""
    if grid not in STEP_GRIDS:
        raise InputError(f"unknown step grid {grid!r}; choose one of {sorted(STEP_GRIDS)}")
    steps = whole_number("steps", steps, 1, MAX_STEPS)
    denoise = real_number("denoise", denoise, 0.0, 1.0)
    if denoise > 0.0 and steps / denoise > MAX_SCHEDULE:  # the full schedule the tail is cut from
        raise InputError(f"denoise {denoise:g} with {steps} steps would need a {steps / denoise:,.0f}-step schedule; "
                         f"use a denoise of at least {steps / MAX_SCHEDULE:g} or fewer steps")
    if denoise > 0.9999:
        return STEP_GRIDS[grid](steps)
    if grid in FIXED_GRIDS:
        raise InputError(f"the {grid} grid is a single fixed step and takes denoise 1, got {denoise:g}; "
                         "use another grid for image to image")
    if denoise <= 0.0:
        # Nothing to do: an empty schedule makes every sampler return its input unchanged.
        return torch.zeros(0)
    total = int(steps / denoise)
    return STEP_GRIDS[grid](total)[-(steps + 1):]


def sigma_min() -> float:
    """Smallest training σ (timestep 0), ≈ 0.0100."""
    return float(discrete_sigmas()[0])


def sigma_max() -> float:
    """Largest training σ (timestep 999), ≈ 157.4."""
    return float(discrete_sigmas()[-1])


__all__ = [
    "DMD_TIMESTEP", "LCM_ORIGINAL_STEPS", "NUM_TRAIN_TIMESTEPS", "STEP_GRIDS", "lcm_timesteps", "sigmas_at_timesteps",
    "sigmas_dmd", "sigmas_lcm", "alphas_cumprod", "betas", "diffusers_timesteps", "discrete_sigmas",
    "make_sigmas", "sigma_max", "sigma_min", "sigma_to_timestep", "sigmas_diffusers", "sigmas_dpm_time_uniform",
    "sigmas_karras", "timestep_to_sigma",
]
