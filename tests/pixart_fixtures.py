"""Tiny random-weight PixArt models for tests, written in the real checkpoint layouts."""
import torch

from pixart_core import PixArt
from pixart_core.config import tiny


@torch.no_grad()
def randomize(model: PixArt, seed: int = 0) -> PixArt:
    """Every parameter and buffer non-zero (the reference init zeroes several), scaled to keep activations O(1)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in list(model.named_parameters()) + list(model.named_buffers()):
        if p.dtype.is_floating_point:
            std = p.shape[-1] ** -0.5 if p.ndim >= 2 else 0.1
            if "scale_shift_table" in name:
                std = 0.2
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).mul_(std).to(p.dtype))
    return model


def random_model(config=None, seed=0, **changes) -> PixArt:
    config = config or tiny(**changes)
    return randomize(PixArt(config), seed)


def inputs(config, batch=2, height=16, width=24, length=None, seed=1, masked=True):
    """Latent, timesteps, caption embeddings and a mask with different valid lengths per sample."""
    g = torch.Generator().manual_seed(seed)
    length = length or config.model_max_length
    x = torch.randn(batch, config.in_channels, height, width, generator=g)
    t = torch.linspace(37.5, 911.0, batch)
    y = torch.randn(batch, length, config.caption_channels, generator=g)
    mask = None
    if masked:
        mask = torch.zeros(batch, length, dtype=torch.long)
        for b in range(batch):
            mask[b, : max(1, length // (b + 2))] = 1
    return x, t, y, mask


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def random_controlnet(base_config, num_blocks=1, seed=5):
    """A PixArt ControlNet for `base_config` with every weight non-zero, before/after_proj included
    (their official initialisation is zero, which would make the branch a no-op)."""
    from pixart_core.controlnet import PixArtControlNet
    return randomize(PixArtControlNet(base_config.replace(depth=num_blocks, kv_compress_layers=())), seed).eval()
