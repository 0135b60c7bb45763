"""pixart_core: a standalone PyTorch implementation of PixArt-Σ / PixArt-α (no ComfyUI imports)."""
from .config import PRESETS, PixArtConfig, preset
from .model import KVCompress, PixArt

__all__ = ["PixArt", "PixArtConfig", "KVCompress", "PRESETS", "preset"]
