"""The image VAE, through diffusers' AutoencoderKL (optional: without diffusers the batch runner writes
`.latent` files and training reads `.latent` files).

PixArt-Σ latents decode with the SDXL VAE, PixArt-α latents with the SD1.5 one (sd-vae-ft-ema); both are
diffusers AutoencoderKL folders (config.json + diffusion_pytorch_model.safetensors). Latents here are
in the VAE's own space (pipeline.LATENT_SCALE already divided out), so they go to decode() as they are.
"""
from __future__ import annotations

from pathlib import Path

import torch

from . import bins
from .files import save_result


def available() -> bool:
    """Whether diffusers' AutoencoderKL can be imported."""
    try:
        from diffusers import AutoencoderKL  # noqa: F401
    except ImportError:
        return False
    return True


def load_vae(path, device="cpu", dtype=torch.float32, need="decoding images", instead=""):
    """A diffusers AutoencoderKL folder, in eval mode on `device`. ValueError with one sentence when
    diffusers is missing (saying what `need`s it and, in `instead`, what works without it) or the
    folder is not a VAE."""
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        raise ValueError(f"{need} needs diffusers (pip install diffusers){instead}") from None
    if not Path(path).expanduser().is_dir():
        raise ValueError(f"--vae {path}: no such folder; give a diffusers AutoencoderKL folder "
                         "(config.json + diffusion_pytorch_model.safetensors), such as the SDXL VAE's")
    try:
        return AutoencoderKL.from_pretrained(str(Path(path).expanduser())).to(device=device, dtype=dtype).eval()
    except Exception as e:  # noqa: BLE001 - diffusers raises many types for a wrong folder
        raise ValueError(f"--vae {path}: not a diffusers AutoencoderKL folder ({str(e).splitlines()[0]})") from None


@torch.no_grad()
def decode(vae, latents: torch.Tensor, height: int | None = None, width: int | None = None) -> torch.Tensor:
    """VAE-space latents (B, 4, h, w) -> uint8 images (B, H, W, 3) on the CPU, resized and centre-cropped
    to height x width when given (the size requested before binning)."""
    device = next(vae.parameters()).device
    images = vae.decode(latents.to(device=device, dtype=vae.dtype)).sample.float()
    images = (images / 2 + 0.5).clamp(0, 1)
    if height is not None and width is not None:
        images = bins.resize_and_center_crop(images, height, width).clamp(0, 1)
    return (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()


def save_png(path, image: torch.Tensor, metadata: dict | None = None) -> Path:
    """One uint8 (H, W, 3) image as a PNG, written atomically (files.save_result), text chunks from metadata."""
    from PIL import Image, PngImagePlugin
    info = PngImagePlugin.PngInfo()
    for k, v in (metadata or {}).items():
        info.add_text(str(k), str(v))
    picture = Image.fromarray(image.numpy())
    return save_result(path, lambda tmp: picture.save(tmp, format="PNG", pnginfo=info), "image")
