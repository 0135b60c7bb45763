"""Perturbed-Attention Guidance (PAG, Ahn et al. 2024) for PixArt, as diffusers' PixArtSigmaPAGPipeline does it.

A third batch part runs the prompt with the self-attention of chosen blocks replaced by the identity
(model.PerturbedAttention), and the guided prediction moves away from it:

    guided = uncond + cfg·(cond − uncond) + s_t·(cond − perturbed)      (CFG 1: cond + s_t·(cond − perturbed))
    s_t = max(0, scale − adaptive_scale·(1000 − t))                      (adaptive_scale 0: s_t = scale)

The combination is linear, so it is the same on ε and on x0 = x − σ·ε predictions: the CLI's denoiser
(samplers.PixArtDenoiser) and the ComfyUI post-CFG function both call `apply_pag`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from .checks import InputError, real_number
from .model import parse_layers

MAX_PAG_SCALE = 100.0
MAX_ADAPTIVE_SCALE = 1.0  # per timestep: at 1 the scale is gone one timestep after t = 1000

# Layer presets, as diffusers' `pag_applied_layers` patterns: the pipeline's default and the value its
# documentation's PixArt-Σ example uses (with pag_scale 4.0, guidance_scale 1.0).
DIFFUSERS_DEFAULT = "blocks.1"
DIFFUSERS_DOCS = "blocks.14"
PRESETS = {"diffusers default (blocks.1)": DIFFUSERS_DEFAULT, "diffusers docs (blocks.14)": DIFFUSERS_DOCS}
PRESET_WORDS = {"diffusers-default": DIFFUSERS_DEFAULT, "diffusers-docs": DIFFUSERS_DOCS}  # for the CLI


def diffusers_layers(patterns: str | list[str], depth: int) -> tuple[int, ...]:
    """The blocks diffusers' PAGMixin perturbs for `pag_applied_layers` on a `depth`-block PixArt.

    Each pattern is a regex searched in the self-attention names `transformer_blocks.<i>.attn1`, and its
    "not a fake integral match" rule only compares the names' last dotted parts (`attn1` is never
    numeric), so "blocks.1" also matches blocks 10-19: diffusers' default perturbs 11 blocks of a
    28-block PixArt-Σ, not one. Reproduced here as diffusers runs it."""
    out = set()
    for pattern in [patterns] if isinstance(patterns, str) else patterns:
        try:
            found = {i for i in range(depth) if re.search(pattern, f"transformer_blocks.{i}.attn1")}
        except re.error as e:
            raise InputError(f"PAG layer pattern {pattern!r} is not a regular expression ({e})") from None
        if not found:
            raise InputError(f"PAG layer pattern {pattern!r} matches no block of this {depth}-block model")
        out |= found
    return tuple(sorted(out))


def _preset_pattern(text) -> str | None:
    if not isinstance(text, str):
        return None
    return PRESETS.get(text) or PRESET_WORDS.get(text.strip().lower())


def pag_layers(text: str, depth: int | None) -> tuple[int, ...]:
    """A layer list ('14', '10-19', 'all': the KV layer syntax) or a preset (a PRESETS name, or the
    CLI's words diffusers-default / diffusers-docs) -> block indices of a `depth`-block model.
    depth None checks the syntax only (returns ()), as ComfyUI's queue-time check does."""
    pattern = _preset_pattern(text)
    if pattern is not None:
        return () if depth is None else diffusers_layers(pattern, depth)
    try:
        return parse_layers(text, depth)
    except InputError as e:
        raise InputError(f"PAG {e}; or a preset: {', '.join(PRESET_WORDS)}") from None


def pag_layers_syntax(text: str) -> str:
    """`text` when it is a PAG layer list or preset (syntax only), else InputError; for CLI options."""
    pag_layers(text, None)
    return text


@dataclass(frozen=True)
class PAG:
    """What PAG does: which blocks are perturbed, its scale and its adaptive scale (per timestep)."""
    layers: tuple[int, ...]
    scale: float = 3.0
    adaptive_scale: float = 0.0

    def __post_init__(self):
        object.__setattr__(self, "scale", real_number("PAG scale", self.scale, 0.0, MAX_PAG_SCALE))
        object.__setattr__(self, "adaptive_scale",
                           real_number("PAG adaptive scale", self.adaptive_scale, 0.0, MAX_ADAPTIVE_SCALE))
        object.__setattr__(self, "layers", tuple(sorted(set(int(i) for i in self.layers))))

    @property
    def active(self) -> bool:
        """diffusers' do_perturbed_attention_guidance: a positive scale and at least one layer."""
        return self.scale > 0 and bool(self.layers)

    def scale_at(self, timestep: float) -> float:
        """s_t at the model's timestep t (0..1000 scale; PixArt's continuous timestep here)."""
        if self.adaptive_scale > 0 and self.active:
            return max(0.0, self.scale - self.adaptive_scale * (1000.0 - float(timestep)))
        return self.scale


def apply_pag(guided, cond, perturbed, scale):
    """guided + scale·(cond − perturbed): the PAG term on top of the CFG result (or on cond at CFG 1).
    scale: a number, or a tensor broadcasting over the batch (one s_t per sample)."""
    if isinstance(scale, (int, float)) and scale == 0:
        return guided
    return guided + scale * (cond - perturbed)


__all__ = ["DIFFUSERS_DEFAULT", "DIFFUSERS_DOCS", "PAG", "PRESETS", "PRESET_WORDS", "apply_pag", "diffusers_layers",
           "pag_layers", "pag_layers_syntax"]
