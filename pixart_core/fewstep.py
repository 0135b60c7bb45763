"""Sampling presets for the distilled few-step PixArt models: sampler, step grid, steps and CFG by name.

Each preset is what the model's own card or demo runs, so a user picks "LCM 4 steps" without knowing
the numbers:
- PixArt-LCM (PixArt-alpha/PixArt-LCM-XL-2-1024-MS): diffusers' LCMScheduler, 4 steps (timesteps
  999, 759, 499, 259), no classifier-free guidance; PixArt's linear β schedule, 50 original steps and
  timestep scaling 10, as the official train_scripts/train_pixart_lcm.py validates with.
- PixArt-α-DMD (PixArt-alpha/PixArt-Alpha-DMD-XL-2-512x512): one step at timestep 400 from pure noise,
  returning the x0 prediction (the demo's DDPMScheduler with timesteps=[400] and guidance 1, whose
  one-step pipeline returns `pred_original_sample`).
- Flash-PixArt (jasperai/flash-pixart, a LoRA on PixArt-α 1024): LCMScheduler with
  timestep_spacing="trailing" (which LCMScheduler ignores: the same timesteps as PixArt-LCM),
  4 steps, guidance_scale 0 (no guidance).
"CFG 1" here is "no guidance": the PixArt Sampler runs the prompt alone at cfg 1.0.
"""
from __future__ import annotations

from dataclasses import dataclass

from .checks import InputError


@dataclass(frozen=True)
class SamplingPreset:
    name: str  # CLI name
    label: str  # what the node's preset list shows
    sampler: str  # pixart_core.samplers.SAMPLERS
    grid: str  # pixart_core.schedule.STEP_GRIDS
    steps: int
    cfg: float
    model: str  # what it is for


SAMPLING_PRESETS = {p.name: p for p in (
    SamplingPreset("lcm_4step", "LCM 4 steps", "lcm", "lcm", 4, 1.0, "PixArt-LCM-XL-2-1024-MS"),
    SamplingPreset("dmd_1step", "DMD 1 step", "euler", "dmd", 1, 1.0, "PixArt-Alpha-DMD-XL-2-512x512"),
    SamplingPreset("flash_4step", "Flash 4 steps", "lcm", "lcm", 4, 1.0, "PixArt-α 1024 + the flash-pixart LoRA"),
)}
CUSTOM = "custom"  # the node's "use my widgets" choice
LABELS = [CUSTOM, *(p.label for p in SAMPLING_PRESETS.values())]


def sampling_preset(name: str) -> SamplingPreset:
    """The preset of this CLI name or node label; InputError naming the choices otherwise."""
    for p in SAMPLING_PRESETS.values():
        if name in (p.name, p.label):
            return p
    raise InputError(f"unknown sampling preset {name!r}; choose one of "
                     f"{', '.join(p.name for p in SAMPLING_PRESETS.values())} (node: "
                     f"{', '.join(repr(p.label) for p in SAMPLING_PRESETS.values())})")


__all__ = ["CUSTOM", "LABELS", "SAMPLING_PRESETS", "SamplingPreset", "sampling_preset"]
