"""Tiny stand-ins for the released model files, under the released names, for the e2e host and the demo.

The example workflows (workflows/*.json) name the files users download (README "Models"), and the
e2e tests run those workflows unchanged, so the stand-ins are written under exactly those names,
in the same containers and folders:

  diffusion_models/PixArt-Sigma-XL-2-1024-MS.pth  official .pth container {'state_dict': ...} with
  diffusion_models/PixArt-Sigma-XL-2-2K-MS.pth    pos_embed and y_embedding, fp32 like the release;
                                                  hidden 64, depth 2, 4 heads, caption width 32,
                                                  300 tokens; the grid (1024 / 2K) comes from
                                                  pos_embed, as for the real files
  text_encoders/t5xxl_fp16.safetensors            ComfyUI-style single-file T5 v1.1 encoder, fp16,
                                                  d_model 32 (tests/t5_fixtures.py); tokenizer from
                                                  ComfyUI's own t5_tokenizer folder
  diffusion_models/PixArt-LCM-XL-2-1024-MS.safetensors
                                                  PixArt-α 1024-MS geometry (micro-conditions, 120
                                                  tokens) in diffusers keys, one file without pos_embed
                                                  or y_embedding, as the release's transformer/ file
  vae/sdxl_vae.safetensors                        a random TAESD-XL (tests/e2e/vae_fixtures.py) in one
                                                  file with its latent scale: ComfyUI's VAE loader
                                                  recognises the TAESD keys, so VAELoader("sdxl_vae.
                                                  safetensors") decodes SDXL-format latents x8 like
                                                  the real SDXL VAE. A small real-layout SDXL VAE is
                                                  impossible: ComfyUI 0.3.75 hard-codes its 128-ch
                                                  width (comfy/sd.py), ~1 min per 1024 px on 2 cores.

What the real files are, and where they come from, is in README.md. The random weights make
noise-like images: these files prove wiring, sizes and errors, not image quality.

Files for the error cases (tests/e2e/test_node_errors.py):

  checkpoints/v1-5-pruned-emaonly.safetensors     SD1.5 checkpoint key layout (a few small tensors)
  text_encoders/clip_l.safetensors                CLIP-L text-encoder key layout
  text_encoders/t5_wrong_width.safetensors        a T5 encoder 48 wide (the PixArt stand-in takes 32)
  diffusion_models/tiny_sd3_mmdit.safetensors     a complete depth-1 SD3 MMDiT (hidden 64), the
                                                  cheapest non-PixArt MODEL ComfyUI 0.3.75 loads from
                                                  a file: its MMDiT detection reads the width from the
                                                  weights (depth x 64) and it matches the SD3 config
                                                  with 16 latent channels (UNETLoader -> model_base.SD3)

Used by tests/e2e/conftest.py (``write_models``) and scripts/make_demo_models.py.
Also a script: ``python tests/e2e/pixart_model_fixtures.py MODELS_DIR``.
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

import t5_fixtures  # noqa: E402
import vae_fixtures  # noqa: E402
from pixart_core.config import tiny  # noqa: E402
from pixart_core.model import sincos_pos_embed  # noqa: E402
from pixart_fixtures import random_model  # noqa: E402

# The released names (README "Models"); the example workflows use exactly these.
PIXART_1024 = "PixArt-Sigma-XL-2-1024-MS.pth"
PIXART_2K = "PixArt-Sigma-XL-2-2K-MS.pth"
T5_XXL = "t5xxl_fp16.safetensors"
SDXL_VAE = "sdxl_vae.safetensors"
PIXART_LCM = "PixArt-LCM-XL-2-1024-MS.safetensors"
RELEASED = {  # file -> models/ subfolder
    PIXART_1024: "diffusion_models",
    PIXART_LCM: "diffusion_models",
    PIXART_2K: "diffusion_models",
    T5_XXL: "text_encoders",
    SDXL_VAE: "vae",
}
# Error-case files
SD15_CHECKPOINT = "v1-5-pruned-emaonly.safetensors"
CLIP_L = "clip_l.safetensors"
T5_WRONG_WIDTH = "t5_wrong_width.safetensors"
SD3_MMDIT = "tiny_sd3_mmdit.safetensors"

TINY_CAPTION_WIDTH = t5_fixtures.TINY_CONFIG["d_model"]  # 32: the stand-in PixArt takes the stand-in T5's width
TINY_TOKENS = 300  # PixArt-Σ's T5 length, as in the release
TAESDXL_SCALE = 0.13025  # what VAELoader("taesdxl") sets; SDXL's latent scale


# --------------------------------------------------------------------------------------------
# PixArt-Σ stand-ins
# --------------------------------------------------------------------------------------------

def tiny_pixart_config(sample_size: int):
    """The stand-in's configuration: tests' tiny() with Σ's token length and the release's PE grid."""
    return tiny(caption_channels=TINY_CAPTION_WIDTH, model_max_length=TINY_TOKENS, sample_size=sample_size,
                pe_interpolation=sample_size / 64, resolution=sample_size * 8)


def tiny_pixart_official_state_dict(sample_size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights in the official layout, plus the `pos_embed` buffer the released .pth files carry
    ((1, (latent/2)^2, hidden), the square training grid) from which loaders read the grid size."""
    config = tiny_pixart_config(sample_size)
    sd = {k: v.detach().float().contiguous() for k, v in random_model(config, seed=seed).state_dict().items()}
    side = sample_size // config.patch_size
    sd["pos_embed"] = sincos_pos_embed(side, side, config.hidden_size, config.base_size,
                                       config.pe_interpolation)[None].contiguous()
    return sd


def write_tiny_pixart_pth(path, sample_size: int, seed: int = 0) -> Path:
    """An official-container .pth (``torch.save({'state_dict': sd})``, fp32), as PixArt-alpha/PixArt-Sigma ships."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": tiny_pixart_official_state_dict(sample_size, seed)}, path)
    return path


def tiny_alpha_1024_config():
    """PixArt-α 1024-MS geometry (PE grid 128, pe_interpolation 2, micro-conditions, 120 tokens), tiny widths."""
    return tiny(hidden_size=96, num_heads=6, caption_channels=TINY_CAPTION_WIDTH, model_max_length=120,
                sample_size=128, pe_interpolation=2.0, resolution=1024, micro_condition=True, family="alpha")


def write_tiny_alpha_diffusers_file(path, seed: int = 3) -> Path:
    """A PixArt-α 1024 transformer in diffusers keys in one safetensors file (PixArt-LCM's layout)."""
    from pixart_core.loading import official_to_diffusers
    sd = official_to_diffusers(random_model(tiny_alpha_1024_config(), seed=seed).state_dict())
    sd = {k: v.detach().float().contiguous() for k, v in sd.items() if k != "y_embedding"}  # diffusers drops it
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path))
    return path


# --------------------------------------------------------------------------------------------
# VAE stand-in
# --------------------------------------------------------------------------------------------

def write_taesdxl_as_single_vae(path, seed: int = 0, scale: float = TAESDXL_SCALE) -> Path:
    """TAESD-XL encoder + decoder in one file with ``vae_scale``/``vae_shift``: what VAELoader builds
    for "taesdxl" from the vae_approx pair, loadable from models/vae under any name (scale 0.18215:
    an SD1.5-VAE stand-in, the same network)."""
    enc, dec = vae_fixtures.tiny_taesdxl_state_dicts(seed)
    sd = {f"taesd_encoder.{k}": v for k, v in enc.items()}
    sd.update({f"taesd_decoder.{k}": v for k, v in dec.items()})
    sd["vae_scale"] = torch.tensor(scale)
    sd["vae_shift"] = torch.tensor(0.0)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


# --------------------------------------------------------------------------------------------
# Files for the error cases
# --------------------------------------------------------------------------------------------

def t5_state_dict(d_model: int, num_heads: int = 4, d_ff: int | None = None, num_layers: int = 1,
                  seed: int = 0) -> dict[str, torch.Tensor]:
    """A random T5 v1.1 encoder of any width (Hugging Face names, real 32128-token vocabulary)."""
    vocab, buckets, d_ff = t5_fixtures.TINY_CONFIG["vocab_size"], 32, d_ff or 2 * d_model
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return (torch.randn(*shape, generator=gen) * shape[-1] ** -0.5).half()

    sd = {"shared.weight": torch.randn(vocab, d_model, generator=gen).half(),
          "encoder.final_layer_norm.weight": torch.ones(d_model, dtype=torch.float16)}
    for i in range(num_layers):
        att, ffn = f"encoder.block.{i}.layer.0.", f"encoder.block.{i}.layer.1."
        for proj in ("q", "k", "v", "o"):
            sd[att + f"SelfAttention.{proj}.weight"] = rand(d_model, d_model)
        if i == 0:
            sd[att + "SelfAttention.relative_attention_bias.weight"] = rand(buckets, num_heads)
        sd[att + "layer_norm.weight"] = torch.ones(d_model, dtype=torch.float16)
        sd[ffn + "DenseReluDense.wi_0.weight"] = rand(d_ff, d_model)
        sd[ffn + "DenseReluDense.wi_1.weight"] = rand(d_ff, d_model)
        sd[ffn + "DenseReluDense.wo.weight"] = rand(d_model, d_ff)
        sd[ffn + "layer_norm.weight"] = torch.ones(d_model, dtype=torch.float16)
    return sd


def write_sd15_like_checkpoint(path) -> Path:
    """A few tensors in the layout of an SD1.5 full checkpoint (UNet, VAE and CLIP prefixes), small shapes."""
    gen = torch.Generator().manual_seed(2)
    sd = {
        "model.diffusion_model.input_blocks.0.0.weight": torch.randn(32, 4, 3, 3, generator=gen),
        "model.diffusion_model.input_blocks.0.0.bias": torch.zeros(32),
        "model.diffusion_model.out.2.weight": torch.randn(4, 32, 3, 3, generator=gen),
        "model.diffusion_model.time_embed.0.weight": torch.randn(128, 32, generator=gen),
        "first_stage_model.decoder.conv_in.weight": torch.randn(32, 4, 3, 3, generator=gen),
        "first_stage_model.encoder.conv_in.weight": torch.randn(32, 3, 3, 3, generator=gen),
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": torch.randn(64, 16, generator=gen),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.half().contiguous() for k, v in sd.items()}, str(path))
    return path


def sd3_mmdit_state_dict(hidden: int = 64, in_channels: int = 16, patch: int = 2, context_dim: int = 4096,
                         pooled_dim: int = 2048, pos_grid: int = 8, seed: int = 3) -> dict[str, torch.Tensor]:
    """Every tensor of ComfyUI's SD3 MMDiT at depth 1 (comfy/ldm/modules/diffusionmodules/mmdit.py;
    ComfyUI's detection takes depth = hidden / 64, so hidden 64 means one joint block)."""
    gen = torch.Generator().manual_seed(seed)
    D = hidden

    def w(*shape):
        return torch.randn(*shape, generator=gen) * (shape[1] if len(shape) > 1 else 1) ** -0.5

    def lin(prefix, n_in, n_out):
        return {prefix + "weight": w(n_out, n_in), prefix + "bias": torch.zeros(n_out)}

    sd = {"pos_embed": torch.randn(1, pos_grid * pos_grid, D, generator=gen) * 0.02,
          "x_embedder.proj.weight": w(D, in_channels, patch, patch), "x_embedder.proj.bias": torch.zeros(D)}
    sd.update(lin("t_embedder.mlp.0.", 256, D))
    sd.update(lin("t_embedder.mlp.2.", D, D))
    sd.update(lin("y_embedder.mlp.0.", pooled_dim, D))
    sd.update(lin("y_embedder.mlp.2.", D, D))
    sd.update(lin("context_embedder.", context_dim, D))
    block = "joint_blocks.0."
    sd.update(lin(block + "context_block.attn.qkv.", D, 3 * D))
    sd.update(lin(block + "context_block.adaLN_modulation.1.", D, 2 * D))  # the last block's context side: pre-only
    sd.update(lin(block + "x_block.attn.qkv.", D, 3 * D))
    sd.update(lin(block + "x_block.attn.proj.", D, D))
    sd.update(lin(block + "x_block.mlp.fc1.", D, 4 * D))
    sd.update(lin(block + "x_block.mlp.fc2.", 4 * D, D))
    sd.update(lin(block + "x_block.adaLN_modulation.1.", D, 6 * D))
    sd.update(lin("final_layer.linear.", D, patch * patch * in_channels))
    sd.update(lin("final_layer.adaLN_modulation.1.", D, 2 * D))
    return sd


def write_error_case_files(models_dir) -> list[Path]:
    models = Path(models_dir)
    paths = [
        write_sd15_like_checkpoint(models / "checkpoints" / SD15_CHECKPOINT),
        t5_fixtures.write_clip_l_like_file(models / "text_encoders" / CLIP_L),
        t5_fixtures.write_tiny_t5_single_file(models / "text_encoders" / T5_WRONG_WIDTH, "fp16",
                                              state_dict=t5_state_dict(48)),
    ]
    sd3 = models / "diffusion_models" / SD3_MMDIT
    sd3.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.half().contiguous() for k, v in sd3_mmdit_state_dict().items()}, str(sd3))
    return paths + [sd3]


# --------------------------------------------------------------------------------------------
# Writers
# --------------------------------------------------------------------------------------------

def write_released_standins(models_dir, which=tuple(RELEASED)) -> list[Path]:
    """The stand-ins for the released files in ``which`` (default: all), under their release names."""
    models = Path(models_dir)
    out = []
    for name in which:
        target = models / RELEASED[name] / name
        if name == PIXART_1024:
            out.append(write_tiny_pixart_pth(target, sample_size=128, seed=0))
        elif name == PIXART_2K:
            out.append(write_tiny_pixart_pth(target, sample_size=256, seed=1))
        elif name == PIXART_LCM:
            out.append(write_tiny_alpha_diffusers_file(target))
        elif name == T5_XXL:
            out.append(t5_fixtures.write_tiny_t5_single_file(target, "fp16"))
        elif name == SDXL_VAE:
            out.append(write_taesdxl_as_single_vae(target))
        else:
            raise ValueError(f"no stand-in for {name!r}")
    return out


def write_models(models_dir) -> None:
    """Model-fixture hook (tests/e2e/conftest.py): the released-name stand-ins and the error-case files."""
    write_released_standins(models_dir)
    write_error_case_files(models_dir)


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "models")
    write_models(target)
    for p in sorted(target.rglob("*")):
        if p.is_file():
            print(p)
