"""Tiny stand-ins for the ControlNet and upscaler files the ControlNet workflows name (README "Models").

  controlnet/PixArt-XL-2-1024-ControlNet.pth      the official container {'state_dict': ...}: a whole
                                                  PixArt-α 1024-MS under base_model.* (pos_embed,
                                                  micro-conditioning, 120-token y_embedding; hidden 96,
                                                  6 heads, depth 2, caption width 32) and its control
                                                  branch under controlnet.* (1 copied block), fp32; the
                                                  model loader reads the α, the ControlNet loader the branch
  controlnet/pixart_sigma_controlnet_canny.safetensors
                                                  a Σ ControlNet in the diffusers layout (SimpleTuner's),
                                                  1 copied block, for the PixArt-Σ 1024 stand-in
  vae/vae-ft-ema-560000-ema-pruned.safetensors    the SD1.5 VAE (PixArt-α's sd-vae-ft-ema): a random
                                                  TAESD with the SD1.5 latent scale 0.18215
  upscale_models/RealESRGAN_x4plus.pth            Real-ESRGAN's container {'params_ema': ...} of a
                                                  random x4 RRDBNet (8 filters, 1 block; spandrel fixes
                                                  the growth width at 32), what spandrel detects as ESRGAN

Every weight of the ControlNets is non-zero (before/after_proj included): a hint changes the image.
Files for the error cases (tests/e2e/test_controlnet_e2e.py):

  controlnet/control_v11p_sd15_canny.safetensors      a few tensors in the SD1.5 ControlNet layout
  controlnet/control-lora-canny-rank128.safetensors   an SDXL Control-LoRA as ComfyUI's Load ControlNet
                                                      Model recognises it (its weights are read only
                                                      when sampling starts)
  controlnet/pixart_controlnet_wrong_width.safetensors  a PixArt ControlNet 96 wide (the Σ stand-in is 64)
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
for _p in (REPO, REPO / "tests", HERE):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import pixart_model_fixtures as fx  # noqa: E402
from pixart_core.config import tiny  # noqa: E402
from pixart_core.controlnet import save_controlnet  # noqa: E402
from pixart_core.model import sincos_pos_embed  # noqa: E402
from pixart_fixtures import random_controlnet, random_model  # noqa: E402

ALPHA_CONTROLNET = "PixArt-XL-2-1024-ControlNet.pth"
SIGMA_CANNY = "pixart_sigma_controlnet_canny.safetensors"
SD15_VAE = "vae-ft-ema-560000-ema-pruned.safetensors"
ESRGAN_X4 = "RealESRGAN_x4plus.pth"
RELEASED = {  # file -> models/ subfolder (the Σ canny file is a user-trained one: no Σ ControlNet was released)
    ALPHA_CONTROLNET: "controlnet",
    SIGMA_CANNY: "controlnet",
    SD15_VAE: "vae",
    ESRGAN_X4: "upscale_models",
}
SD15_CONTROLNET = "control_v11p_sd15_canny.safetensors"
CONTROL_LORA = "control-lora-canny-rank128.safetensors"
WRONG_WIDTH = "pixart_controlnet_wrong_width.safetensors"
SD15_SCALE = 0.18215
HED_MAP = "hed_map.png"  # input/ image the HED workflow loads


def write_hed_map(path, width: int = 600, height: int = 400, seed: int = 0) -> Path:
    """An HED-style soft-edge map (white lines on black, as HED preprocessors save them), not the bin's size."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFilter
    rng = np.random.default_rng(seed)
    img = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(img)
    for _ in range(12):
        x0, y0 = rng.integers(0, width), rng.integers(0, height)
        draw.line([(x0, y0), (rng.integers(0, width), rng.integers(0, height))], fill=255, width=3)
        draw.ellipse([x0, y0, x0 + rng.integers(20, 120), y0 + rng.integers(20, 120)], outline=200, width=2)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.filter(ImageFilter.GaussianBlur(1.5)).convert("RGB").save(path)
    return path


def tiny_alpha_config():
    """PixArt-α 1024-MS geometry (PE grid 128, pe_interpolation 2, micro-conditions, 120 tokens), tiny widths."""
    return tiny(hidden_size=96, num_heads=6, caption_channels=fx.TINY_CAPTION_WIDTH, model_max_length=120,
                sample_size=128, pe_interpolation=2.0, resolution=1024, micro_condition=True, family="alpha")


def write_alpha_controlnet_pth(path, seed: int = 2) -> Path:
    config = tiny_alpha_config()
    base = random_model(config, seed=seed)
    sd = {f"base_model.{k}": v.detach().float().contiguous() for k, v in base.state_dict().items()}
    side = config.sample_size // config.patch_size
    sd["base_model.pos_embed"] = sincos_pos_embed(side, side, config.hidden_size, config.base_size,
                                                  config.pe_interpolation)[None].contiguous()
    net = random_controlnet(config, num_blocks=1, seed=seed + 1)
    sd.update({f"controlnet.{k}": v.detach().float().contiguous() for k, v in net.controlnet.state_dict().items()})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": sd}, path)
    return path


def tiny_rrdbnet_state_dict(num_filters: int = 8, growth: int = 32, scale: int = 4, seed: int = 4) -> dict:
    """A one-block Real-ESRGAN RRDBNet in its own key names (benchmarks.workflow_memory writes the real size)."""
    from benchmarks.workflow_memory import rrdbnet_state_dict
    return rrdbnet_state_dict(num_feat=num_filters, num_block=1, num_grow=growth, scale=scale, seed=seed)


def write_models(models_dir) -> None:
    """Model-fixture hook (tests/e2e/conftest.py)."""
    models = Path(models_dir)
    write_alpha_controlnet_pth(models / "controlnet" / ALPHA_CONTROLNET)
    sigma = fx.tiny_pixart_config(128)
    save_controlnet(random_controlnet(sigma, num_blocks=1, seed=7).state_dict(), models / "controlnet" / SIGMA_CANNY,
                    layout="diffusers")
    fx.write_taesdxl_as_single_vae(models / "vae" / SD15_VAE, seed=1, scale=SD15_SCALE)
    (models / "upscale_models").mkdir(parents=True, exist_ok=True)
    torch.save({"params_ema": tiny_rrdbnet_state_dict()}, models / "upscale_models" / ESRGAN_X4)
    wide = sigma.replace(hidden_size=96, num_heads=6)
    save_controlnet(random_controlnet(wide, num_blocks=1, seed=8).state_dict(), models / "controlnet" / WRONG_WIDTH)
    save_file({"input_hint_block.0.weight": torch.zeros(16, 3, 3, 3),
               "zero_convs.0.0.weight": torch.zeros(32, 32, 1, 1)}, str(models / "controlnet" / SD15_CONTROLNET))
    save_file({"lora_controlnet": torch.tensor([]), "input_hint_block.0.weight": torch.zeros(16, 3, 3, 3)},
              str(models / "controlnet" / CONTROL_LORA))

