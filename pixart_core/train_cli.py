"""`python -m pixart_core train-lora`: the training folder, the run, and the files it writes.

A training folder holds pairs with the same stem: `cat.latent` (a ComfyUI / `generate` latent file, VAE
space) or `cat.png|jpg|jpeg|webp` (encoded with --vae, a diffusers VAE folder), and `cat.txt` (the
caption; none = the empty caption). Images are resized and centre-cropped to their nearest
aspect-ratio bin of --resolution (default: the model's), so --resolution 2048 on 1024 weights is the
resolution-adaptation recipe and --kv-layers 14-27 on the 2K weights the KV-compression one.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from . import bins, training
from .checks import SEED_MAX, argument, cli_type, clean_text, real_number, whole_number
from .files import prepare_output
from .model import KVCompress, layer_list_syntax, parse_layers
from .pipeline import LATENT_SCALE

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
LATENT_SUFFIXES = (".latent",)


def _read_latent_file(path: Path) -> torch.Tensor:
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            if "latent_tensor" not in f.keys():
                raise ValueError(f"{path}: no latent_tensor inside; save latents with ComfyUI's Save Latent or "
                                 "python -m pixart_core generate")
            t = f.get_tensor("latent_tensor")
    except ValueError:
        raise
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for a bad file
        raise ValueError(f"{path}: not a readable .latent file ({e})") from None
    if t.ndim != 4 or t.shape[1] != 4:
        raise ValueError(f"{path}: latent_tensor has shape {tuple(t.shape)}, not (batch, 4, height/8, width/8)")
    return t.float()


def _load_vae(path):
    from .vae import load_vae
    return load_vae(path, need="encoding images", instead="; or encode them in ComfyUI (VAE Encode -> Save Latent) "
                    "and train on the .latent files")


def _encode_image(vae, path: Path, resolution: int) -> torch.Tensor:
    from PIL import Image
    import numpy as np
    try:
        with Image.open(path) as im:
            pixels = torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0)
    except Exception as e:  # noqa: BLE001 - PIL raises many types
        raise ValueError(f"{path}: not a readable image ({e})") from None
    pixels = pixels.permute(2, 0, 1)[None]  # (1, 3, H, W)
    h, w = bins.nearest_bin(pixels.shape[2], pixels.shape[3], resolution)
    pixels = bins.resize_and_center_crop(pixels, h, w) * 2 - 1
    with torch.no_grad():
        return vae.encode(pixels.to(vae.dtype)).latent_dist.mode().float()  # (1, 4, h/8, w/8), VAE space


def read_folder(folder, vae_path=None, resolution: int = 1024) -> list[tuple[str, torch.Tensor, str]]:
    """(name, VAE-space latents (1, 4, h, w), caption) for every latent file or image in `folder`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"--data {folder}: no such folder")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES + LATENT_SUFFIXES)
    if not files:
        raise ValueError(f"--data {folder}: no .latent files or images ({', '.join(IMAGE_SUFFIXES)}) in it")
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    if images and vae_path is None:
        raise ValueError(f"--data {folder} has {len(images)} images but no --vae was given to encode them; pass a "
                         "diffusers VAE folder with --vae, or train on .latent files")
    vae = _load_vae(vae_path) if images else None
    out = []
    for p in files:
        caption_file = p.with_suffix(".txt")
        caption = (clean_text(caption_file.read_text(encoding="utf-8", errors="replace").strip())[0]
                   if caption_file.is_file() else "")
        latents = _encode_image(vae, p, resolution) if p in images else _read_latent_file(p)
        for j in range(latents.shape[0]):
            out.append((p.stem if latents.shape[0] == 1 else f"{p.stem}[{j}]", latents[j:j + 1], caption))
    return out


def _samples(args, model) -> list[training.Sample]:
    from .t5 import load_t5
    cfg = model.config
    items = read_folder(args.data, args.vae, args.resolution or cfg.resolution)
    encoder = load_t5(args.t5, dtype=args.t5_dtype, device=args.device, tokenizer_path=args.tokenizer)
    if encoder.width != cfg.caption_channels:
        raise ValueError(f"--t5 {args.t5} gives {encoder.width}-wide embeddings but the model takes "
                         f"{cfg.caption_channels}; use the model's own T5 encoder")
    samples = []
    for name, latents, caption in items:
        embeds, mask = encoder.encode([caption], max_length=cfg.model_max_length)
        samples.append(training.Sample(latents * LATENT_SCALE[cfg.family], embeds.float().cpu(), mask.cpu(), name))
    encoder.release()
    sizes = sorted({(s.latents.shape[-1] * 8, s.latents.shape[-2] * 8) for s in samples})
    log.info("training on %d samples, sizes %s", len(samples), ", ".join(f"{w}x{h}" for w, h in sizes))
    return samples


def run(args) -> None:
    from .loading import load_pixart
    out = Path(args.output)
    if out.suffix != ".safetensors":
        raise ValueError(f"output {out}: write the LoRA as .safetensors")
    out = prepare_output(out, inputs=[args.model, args.data, args.t5], what="LoRA")  # before any work
    dtype = getattr(torch, args.dtype)
    loaded = load_pixart(args.model, preset=args.preset, dtype=dtype, compute_dtype=dtype, device=args.device)
    model = loaded.model
    if args.kv_layers is not None:
        model.kv_compress = KVCompress(parse_layers(args.kv_layers, model.config.depth), args.kv_ratio, args.kv_mode)
    config = training.TrainConfig(
        steps=args.steps, rank=args.rank, alpha=args.alpha, learning_rate=args.lr, batch_size=args.batch,
        seed=args.seed, targets=tuple(t.strip() for t in args.targets.split(",") if t.strip()),
        caption_dropout=args.caption_dropout, grad_clip=args.grad_clip,
        gradient_checkpointing=not args.no_gradient_checkpointing)
    config.check()
    training.target_modules(model, config.targets)  # a wrong --targets fails before the data is encoded
    samples = _samples(args, model)
    before = training.validation_loss(model, samples, args.validation_seed, args.validation_levels)
    print(f"before: {before.describe()}")
    metadata = config.as_metadata(model.kv_compress)
    adapters = training.inject_lora(model, config.rank, config.alpha, config.targets, config.seed)

    def save(steps_done: int) -> None:
        training.save_lora(adapters, out, {**metadata, "steps_done": str(steps_done)})

    def on_step(step: int, loss: float) -> None:
        if args.save_every and step % args.save_every == 0 and step < config.steps:
            save(step)

    result = training.train_lora(model, samples, config, on_step=on_step, progress_bar=True, adapters=adapters)
    after = training.validation_loss(model, samples, args.validation_seed, args.validation_levels)
    metadata.update(validation_before=f"{before.loss:.6f}", validation_after=f"{after.loss:.6f}")
    save(result.steps_done)
    print(f"after:  {after.describe()}")
    state = "interrupted at" if result.interrupted else "trained"
    print(f"wrote {out}: LoRA rank {config.rank} on {len(adapters.modules)} layers in diffusers/PEFT names, "
          f"{state} step {result.steps_done} of {config.steps}; validation loss {before.loss:.5f} -> {after.loss:.5f}")


def add_parser(sub, t5_args) -> None:
    p = sub.add_parser("train-lora", help="train a LoRA with the official PixArt loss (ε-MSE + VB) on a folder of "
                                          "latents or images with captions",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="PixArt checkpoint to adapt (.pth, .safetensors, diffusers folder)")
    t5_args(p)
    p.add_argument("--data", required=True, help="folder of NAME.latent or NAME.png/.jpg/.webp with NAME.txt captions")
    p.add_argument("--vae", default=None, help="diffusers VAE folder, to encode images (needs pip install diffusers)")
    p.add_argument("--resolution", type=argument(whole_number, 256, 4096), default=None,
                   help="bin table images are fitted to (default: the model's); 2048 on 1024 weights adapts resolution")
    p.add_argument("--preset", default="auto", help="model preset (auto detects; see `inspect`)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="model weights and compute (the LoRA itself always trains in float32)")
    p.add_argument("--steps", type=argument(whole_number, 1, 1_000_000), default=500)
    p.add_argument("--rank", type=argument(whole_number, 1, 1024), default=16)
    p.add_argument("--alpha", type=argument(real_number, 1e-6, 1e6), default=None, help="LoRA alpha (default: the rank, scale 1)")
    p.add_argument("--lr", type=argument(real_number, 1e-12, 1.0), default=1e-4, help="AdamW learning rate")
    p.add_argument("--batch", type=argument(whole_number, 1, 4096), default=1, help="samples per step (one size per batch)")
    p.add_argument("--seed", type=argument(whole_number, 0, SEED_MAX), default=0)
    p.add_argument("--targets", default=",".join(training.DEFAULT_TARGETS),
                   help=f"layers that get a LoRA, from {', '.join(training.TARGET_GROUPS)}")
    p.add_argument("--caption-dropout", type=argument(real_number, 0.0, 1.0), default=0.0,
                   help="probability of training on the null caption (the official run used 0.1)")
    p.add_argument("--grad-clip", type=argument(real_number, 0.0, 1e6), default=1.0, help="gradient-norm clipping (0 = off)")
    p.add_argument("--no-gradient-checkpointing", action="store_true", help="faster, but keeps every activation")
    p.add_argument("--kv-layers", default=None, type=cli_type(layer_list_syntax), help='KV compression while training, e.g. "14-27" (the KV recipe)')
    p.add_argument("--kv-ratio", type=argument(whole_number, 1, 8), default=2)
    p.add_argument("--kv-mode", default="avgpool", choices=["avgpool", "conv", "ave", "uniform"])
    p.add_argument("--validation-levels", type=argument(whole_number, 1, 1000), default=training.VALIDATION_LEVELS,
                   help="fixed noise levels of the before/after validation loss")
    p.add_argument("--validation-seed", type=argument(whole_number, 0, SEED_MAX), default=training.VALIDATION_SEED)
    p.add_argument("--save-every", type=argument(whole_number, 0, 1_000_000), default=0, help="also write the LoRA every N steps (0 = only at the end)")
    p.add_argument("output", help="the LoRA, x.safetensors (written atomically)")
    p.set_defaults(run=run)
