"""Random-weight TAESD-XL files for ComfyUI's ``VAELoader("taesdxl")``: a cheap VAE for e2e tests.

ComfyUI (``nodes.py`` ``VAELoader.load_taesd``) reads ``vae_approx/taesdxl_encoder.*`` and
``vae_approx/taesdxl_decoder.*``, prefixes their keys with ``taesd_encoder.``/``taesd_decoder.``
and builds ``comfy.taesd.taesd.TAESD``: two ``nn.Sequential`` stacks of 3x3 convolutions and
residual blocks (64 channels, 4 latent channels, x8 down/up-sampling). The modules below only
rebuild that parameter layout (names and shapes); they never run inside ComfyUI.

The weights are fan-in scaled and the biases small but non-zero, so decoding even an all-zero
latent gives a finite, non-constant image (zero padding makes the borders differ), and
different latents give visibly different images.
Also usable as a script: ``python tests/e2e/vae_fixtures.py MODELS_DIR``.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

ENCODER_FILE = "taesdxl_encoder.safetensors"
DECODER_FILE = "taesdxl_decoder.safetensors"
LATENT_CHANNELS = 4
WIDTH = 64


def _conv(n_in: int, n_out: int, stride: int = 1, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, stride=stride, padding=1, bias=bias)


class _Block(nn.Module):
    """Residual block: ``conv`` = [conv, relu, conv, relu, conv] (params at 0, 2, 4); 64 -> 64
    needs no ``skip`` weights (identity)."""

    def __init__(self, n: int = WIDTH):
        super().__init__()
        self.conv = nn.Sequential(_conv(n, n), nn.ReLU(), _conv(n, n), nn.ReLU(), _conv(n, n))


def _encoder(latent_channels: int = LATENT_CHANNELS) -> nn.Sequential:
    layers: list[nn.Module] = [_conv(3, WIDTH), _Block()]
    for _ in range(3):  # three stride-2 stages of one conv and three blocks
        layers += [_conv(WIDTH, WIDTH, stride=2, bias=False), _Block(), _Block(), _Block()]
    layers.append(_conv(WIDTH, latent_channels))
    return nn.Sequential(*layers)


def _decoder(latent_channels: int = LATENT_CHANNELS) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Identity(), _conv(latent_channels, WIDTH), nn.ReLU()]  # Identity = Clamp
    for _ in range(3):  # three blocks, upsample x2, conv
        layers += [_Block(), _Block(), _Block(), nn.Upsample(scale_factor=2), _conv(WIDTH, WIDTH, bias=False)]
    layers += [_Block(), _conv(WIDTH, 3)]
    return nn.Sequential(*layers)


def _init_(module: nn.Module, gen: torch.Generator, gain: float, bias_std: float) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            fan_in = m.in_channels * m.kernel_size[0] * m.kernel_size[1]
            with torch.no_grad():
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * (gain / math.sqrt(fan_in)))
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * bias_std)


def tiny_taesdxl_state_dicts(seed: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(encoder, decoder) state dicts in ComfyUI's TAESD key layout, deterministic in ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    enc, dec = _encoder(), _decoder()
    # Unit gain keeps activations O(1) through the ~20 residual blocks of each stack (He's
    # sqrt(2) blows up there). The decoder's first conv is 4x stronger so that latents (which
    # TAESD-XL scales by 0.13) visibly change the image; its last conv is gentler with a
    # mid-grey bias: outputs land around 0.6 +- 0.05 (zero latent) / 0.17 (unit-normal latent).
    _init_(enc, gen, gain=1.0, bias_std=0.05)
    _init_(dec, gen, gain=1.0, bias_std=0.05)
    enc_convs = [m for m in enc.modules() if isinstance(m, nn.Conv2d)]
    dec_convs = [m for m in dec.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        enc_convs[-1].weight.mul_(0.6)
        dec_convs[0].weight.mul_(4.0)
        dec_convs[-1].weight.mul_(0.6)
        dec_convs[-1].bias.fill_(0.5)
    return ({k: v.contiguous().float() for k, v in enc.state_dict().items()},
            {k: v.contiguous().float() for k, v in dec.state_dict().items()})


def decode_reference(decoder_sd: dict[str, torch.Tensor], latent: torch.Tensor, scale: float = 0.13025) -> torch.Tensor:
    """What ComfyUI's TAESD-XL decode computes with these weights, as an image in [0, 1]
    (NCHW): clamp(tanh(z*scale/3)*3) -> decoder -> ((x-0.5)*2+1)/2 clamped."""
    dec = _decoder()
    dec.load_state_dict(decoder_sd)
    with torch.no_grad():
        z = torch.tanh(latent * scale / 3) * 3
        x = z
        for layer in dec:
            x = layer(x) if not isinstance(layer, _Block) else torch.relu(layer.conv(x) + x)
        return ((x - 0.5) * 2 + 1).div(2).clamp(0, 1)


def write_tiny_taesdxl(vae_approx_dir: str | Path, seed: int = 0) -> tuple[Path, Path]:
    """Write ``taesdxl_encoder.safetensors`` and ``taesdxl_decoder.safetensors`` (about 2 MB each)
    into ``vae_approx_dir``; returns their paths."""
    out = Path(vae_approx_dir)
    out.mkdir(parents=True, exist_ok=True)
    enc, dec = tiny_taesdxl_state_dicts(seed)
    save_file(enc, str(out / ENCODER_FILE), metadata={"format": "pt"})
    save_file(dec, str(out / DECODER_FILE), metadata={"format": "pt"})
    return out / ENCODER_FILE, out / DECODER_FILE


def write_models(models_dir: str | Path) -> None:
    """Model-fixture hook (see tests/e2e/conftest.py): adds the TAESD-XL pair to models/."""
    write_tiny_taesdxl(Path(models_dir) / "vae_approx")


if __name__ == "__main__":
    for p in write_tiny_taesdxl(Path(sys.argv[1] if len(sys.argv) > 1 else "models") / "vae_approx"):
        print(p)
