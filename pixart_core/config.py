"""Model configuration: one dataclass for every PixArt-Σ/α variant, and the released presets.

Numbers come from ../shared/pixart_spec.md §1 (configs of PixArt-sigma and PixArt-alpha).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .checks import InputError

KV_COMPRESS_MODES = ("conv", "ave", "uniform", "avgpool")


@dataclass(frozen=True)
class PixArtConfig:
    depth: int = 28
    hidden_size: int = 1152
    num_heads: int = 16
    patch_size: int = 2
    in_channels: int = 4
    out_channels: int = 8  # ε plus the learned-range variance channels
    mlp_ratio: float = 4.0
    caption_channels: int = 4096  # T5-XXL width
    model_max_length: int = 300  # T5 tokens: 300 for Σ, 120 for α
    sample_size: int = 128  # training latent side (image px / 8); fixes the PE's base_size
    pe_interpolation: float = 2.0
    micro_condition: bool = False  # α-1024-MS size / aspect-ratio embedders
    qk_norm: bool = False
    kv_compress_layers: tuple[int, ...] = ()
    kv_compress_ratio: int = 2
    kv_compress_mode: str = "conv"
    resolution: int = 1024  # aspect-ratio bin table the model generates at (256 ... 4096)
    family: str = "sigma"  # "sigma" (SDXL VAE) or "alpha" (SD1.5 VAE)

    def __post_init__(self):
        for name in ("depth", "hidden_size", "num_heads", "patch_size", "in_channels", "out_channels",
                     "caption_channels", "model_max_length", "sample_size", "kv_compress_ratio", "resolution"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InputError(f"{name} must be a whole number of at least 1, got {v!r}")
        for name in ("mlp_ratio", "pe_interpolation"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < float("inf"):
                raise InputError(f"{name} must be a positive finite number, got {v!r}")
        if self.hidden_size % self.num_heads:
            raise InputError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.micro_condition and self.hidden_size % 3:
            raise InputError(f"micro-conditioning needs hidden_size divisible by 3, got {self.hidden_size}")
        if self.kv_compress_mode not in KV_COMPRESS_MODES:
            raise InputError(f"kv_compress_mode must be one of {KV_COMPRESS_MODES}, got {self.kv_compress_mode!r}")
        if self.kv_compress_ratio < 1:
            raise InputError(f"kv_compress_ratio must be >= 1, got {self.kv_compress_ratio}")
        bad = [i for i in self.kv_compress_layers if not 0 <= i < self.depth]
        if bad:
            raise InputError(f"kv_compress_layers {bad} are outside 0..{self.depth - 1}")
        object.__setattr__(self, "kv_compress_layers", tuple(sorted(set(self.kv_compress_layers))))

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def base_size(self) -> int:
        """Token-grid side the position embedding is normalised to (fixed at build time, as in the reference)."""
        return self.sample_size // self.patch_size

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    def replace(self, **changes) -> "PixArtConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["kv_compress_layers"] = list(self.kv_compress_layers)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "PixArtConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise InputError(f"unknown PixArtConfig fields {sorted(unknown)}")
        d = dict(d)
        if "kv_compress_layers" in d:
            d["kv_compress_layers"] = tuple(d["kv_compress_layers"])
        return cls(**d)


_SIGMA = PixArtConfig()
_ALPHA = PixArtConfig(model_max_length=120, family="alpha")
DEEP_LAYERS = tuple(range(14, 28))  # the reference KV-compression config: the deeper half

PRESETS: dict[str, PixArtConfig] = {
    "sigma-256": _SIGMA.replace(sample_size=32, pe_interpolation=0.5, resolution=256),
    "sigma-512": _SIGMA.replace(sample_size=64, pe_interpolation=1.0, resolution=512),
    "sigma-1024-ms": _SIGMA.replace(sample_size=128, pe_interpolation=2.0, resolution=1024),
    "sigma-2k-ms": _SIGMA.replace(sample_size=256, pe_interpolation=4.0, resolution=2048),
    # No 4K weights exist: the 2K weights (same PE range) at the 4096-px bins, with the deep
    # half's keys/values average-pooled 2x2 so attention stays tractable.
    "sigma-4k": _SIGMA.replace(
        sample_size=256, pe_interpolation=4.0, resolution=4096,
        kv_compress_layers=DEEP_LAYERS, kv_compress_mode="avgpool",
    ),
    # α-256 follows PixArt-alpha's own config (1.0); diffusers' converter says 0.5 (spec §1).
    "alpha-256": _ALPHA.replace(sample_size=32, pe_interpolation=1.0, resolution=256),
    "alpha-512": _ALPHA.replace(sample_size=64, pe_interpolation=1.0, resolution=512),
    "alpha-1024-ms": _ALPHA.replace(sample_size=128, pe_interpolation=2.0, resolution=1024, micro_condition=True),
}


def preset(name: str) -> PixArtConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise InputError(f"unknown PixArt preset {name!r}; choose one of {', '.join(PRESETS)}") from None


def tiny(**changes) -> PixArtConfig:
    """A small model on the same code path, for tests: hidden 64, depth 2, caption width 32, Σ-256 geometry."""
    base = PixArtConfig(depth=2, hidden_size=64, num_heads=4, caption_channels=32, model_max_length=16,
                        sample_size=32, pe_interpolation=0.5, resolution=256)
    return base.replace(**changes)
