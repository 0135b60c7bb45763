"""The three denoisers built from one set of random weights, and the inputs each is fed.

- pixart_core.PixArt (ours), official key layout;
- diffusers' PixArtTransformer2DModel, weights through pixart_core.loading.official_to_diffusers;
- ComfyUI 0.3.75's comfy.ldm.pixart.pixartms.PixArtMS, the official layout as ComfyUI loads it.
"""
from __future__ import annotations

import os
import subprocess
import sys

import torch

from .common import REPO

SEQ_LEN = 300  # T5 tokens PixArt-Σ pads to
VALID = 24  # caption tokens that are real in each sample (a short prompt)
BATCH = 2  # classifier-free guidance: prompt + negative


# ------------------------------------------------------------------------------------------ models

def ours(depth: int, dtype, device, kv_layers=(), kv_mode="conv", sample_size=128, seed=0, package="pixart_core"):
    """A full-width (1152) PixArt-Σ with random weights on `device` in `dtype`. `package` may name
    a patched copy of pixart_core (see proposed.py); the same seed gives the same weights."""
    import importlib
    pkg = importlib.import_module(package)
    PRESETS, PixArt = pkg.PRESETS, pkg.PixArt
    cfg = PRESETS["sigma-1024-ms"].replace(depth=depth, sample_size=sample_size,
                                           pe_interpolation=sample_size / 64, kv_compress_layers=tuple(kv_layers),
                                           kv_compress_mode=kv_mode)
    model = PixArt(cfg, dtype=dtype, device="meta")
    model = model.to_empty(device=device)
    randomize(model, seed)  # drawn in fp32 on the CPU, rounded into `dtype`: same weights at any dtype
    model.compute_dtype = dtype
    return model.eval().requires_grad_(False)


@torch.no_grad()
def randomize(model, seed=0):
    """Every tensor random and O(1)-scaled (the reference init zeroes several layers, which would
    make equality checks vacuous). Tensor by tensor, so building needs no second copy."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if not t.dtype.is_floating_point:
            continue
        std = t.shape[-1] ** -0.5 if t.ndim >= 2 else 0.1
        if "scale_shift_table" in name:
            std = 0.2
        if "attn.sr.weight" in name:  # depthwise conv: keep it the averaging init plus noise
            t.copy_(torch.full(t.shape, 1.0 / (t.shape[-1] * t.shape[-2])).add_(torch.randn(t.shape, generator=g), alpha=0.01))
            continue
        if "attn.norm." in name:  # KV-compression LayerNorm: identity affine plus noise
            t.copy_(torch.randn(t.shape, generator=g).mul_(0.01).add_(1.0 if name.endswith("weight") else 0.0))
            continue
        t.copy_(torch.randn(t.shape, generator=g).mul_(std))
    return model


def diffusers_twin(model):
    from diffusers import PixArtTransformer2DModel
    from pixart_core.loading import diffusers_config, official_to_diffusers
    cfg = {k: v for k, v in diffusers_config(model.config).items() if not k.startswith("_")}
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    twin = PixArtTransformer2DModel(**cfg)
    sd = {k: v for k, v in official_to_diffusers(model.state_dict()).items() if k != "y_embedding"}
    missing, unexpected = twin.load_state_dict(sd, strict=False, assign=True)
    assert not missing and not unexpected, (missing, unexpected)
    return twin.to(device=device, dtype=dtype).eval().requires_grad_(False)


_COMFY = {}


def import_comfy(device) -> str | None:
    """ComfyUI 0.3.75 in-process (scripts/build_comfyui_host.sh unpacks it into .cache/), with the
    arguments ComfyUI itself would parse on this device (--cpu without CUDA). None if unavailable."""
    if "root" in _COMFY:
        return _COMFY["root"]
    root = None
    try:
        out = subprocess.run(["bash", os.path.join(REPO, "scripts", "build_comfyui_host.sh")], check=True,
                             capture_output=True, text=True, timeout=600).stdout.strip().splitlines()[-1]
        root = out if os.path.isfile(os.path.join(out, "comfy", "ldm", "pixart", "pixartms.py")) else None
    except Exception as e:  # noqa: BLE001 - no network, no pip: benchmark the others
        print(f"  ComfyUI not available ({type(e).__name__}: {e}); its rows are skipped")
    if root:
        if root not in sys.path:
            sys.path.insert(0, root)
        if "comfy.model_management" not in sys.modules:
            argv = sys.argv
            sys.argv = [argv[0]] + (["--cpu"] if torch.device(device).type == "cpu" else [])
            try:
                import logging
                import comfy.options
                comfy.options.enable_args_parsing()
                level = logging.getLogger().level
                import comfy.model_management  # noqa: F401 - parses the arguments
                logging.getLogger().setLevel(level)
            finally:
                sys.argv = argv
    _COMFY["root"] = root
    return root


def comfy_default_attention() -> str:
    import comfy.ldm.pixart.blocks as blocks
    return getattr(blocks.optimized_attention, "__name__", str(blocks.optimized_attention))


def comfy_twin(model):
    """ComfyUI's PixArtMS with the same weights, built the way comfy/model_detection.py configures
    an official Σ file (pe_interpolation = sample_size // 64)."""
    import comfy.ops
    from comfy.ldm.pixart.pixartms import PixArtMS
    cfg = model.config
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    twin = PixArtMS(input_size=cfg.sample_size, patch_size=cfg.patch_size, in_channels=cfg.in_channels,
                    hidden_size=cfg.hidden_size, depth=cfg.depth, num_heads=cfg.num_heads,
                    caption_channels=cfg.caption_channels, model_max_length=cfg.model_max_length,
                    micro_condition=cfg.micro_condition, pe_interpolation=cfg.sample_size // 64,
                    dtype=dtype, device=device, operations=comfy.ops.disable_weight_init)
    sd = {k: v for k, v in model.state_dict().items() if ".attn.sr." not in k and ".attn.norm." not in k}
    missing, unexpected = twin.load_state_dict(sd, strict=False, assign=True)
    assert not [k for k in missing if "pos_embed" not in k] and not unexpected, (missing, unexpected)
    return twin.to(device).eval().requires_grad_(False)


class ComfyWithAttention(torch.nn.Module):
    """Runs a ComfyUI model with a chosen attention function (what --use-pytorch-cross-attention
    selects) instead of the one ComfyUI picked at import time."""

    def __init__(self, model, attention):
        super().__init__()
        self.model, self.attention = model, attention

    def forward(self, *args, **kwargs):
        import comfy.ldm.pixart.blocks as blocks
        saved = blocks.optimized_attention
        blocks.optimized_attention = self.attention
        try:
            return self.model(*args, **kwargs)
        finally:
            blocks.optimized_attention = saved


def comfy_pytorch_attention():
    from comfy.ldm.modules.attention import attention_pytorch
    return attention_pytorch


# ------------------------------------------------------------------------------------------ inputs

def inputs(px: int, dtype, device, seed=1):
    """Latent (B,4,px/8,px/8), timesteps, captions (B,300,4096) and a mask with VALID real tokens."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(BATCH, 4, px // 8, px // 8, generator=g).to(device=device, dtype=dtype)
    t = torch.tensor([500.0] * BATCH, device=device)
    y = torch.randn(BATCH, SEQ_LEN, 4096, generator=g).to(device=device, dtype=dtype)
    mask = torch.zeros(BATCH, SEQ_LEN, dtype=torch.long, device=device)
    mask[:, :VALID] = 1
    return x, t, y, mask


def calls(models: dict, px: int, dtype, device) -> dict:
    """name -> zero-argument callable running one step. Ours and diffusers get the 300-token
    captions with the mask; ComfyUI's model takes no mask and gets the unpadded tokens, as
    ComfyUI feeds it."""
    x, t, y, mask = inputs(px, dtype, device)
    y_short = y[:, :VALID].contiguous()
    out = {}
    for name, m in models.items():
        if name.startswith("pixart_core"):
            out[name] = (lambda m=m: m(x, t, y, mask))
        elif name.startswith("diffusers"):
            out[name] = (lambda m=m: m(x, encoder_hidden_states=y, timestep=t, encoder_attention_mask=mask,
                                       added_cond_kwargs={"resolution": None, "aspect_ratio": None},
                                       return_dict=False)[0])
        elif name.startswith("comfy"):
            out[name] = (lambda m=m: m(x, t, y_short))
        else:
            raise ValueError(name)
    return out


def rel_err(a, b) -> float:
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm()).item()
