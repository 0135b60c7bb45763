"""Command line: `python -m pixart_core {inspect,convert,lora,encode,generate,train-lora} --help`."""
from __future__ import annotations

import argparse
import logging
import sys

import torch

from .config import PRESETS


def _inspect(args):
    from .loading import describe
    print(describe(args.checkpoint))


def _convert(args):
    from .loading import convert
    out = convert(args.source, args.output, layout=args.layout)
    print(f"wrote {out}")


def _lora(args):
    from .lora import describe, read_lora, save_converted
    lora = read_lora(args.lora)
    if args.lora_command == "inspect":
        print(describe(lora))
    else:
        print(f"wrote {save_converted(lora, args.output)}: {len(lora.sources)} modules in diffusers/PEFT names "
              f"with alpha ({', '.join(lora.formats)}; {len(lora.unmatched)} keys not used)")


def _load_t5(args):
    from .t5 import load_t5
    return load_t5(args.t5, dtype=args.t5_dtype, device=args.device, tokenizer_path=args.tokenizer)


def _encode(args):
    from safetensors.torch import save_file
    encoder = _load_t5(args)
    embeds, mask = encoder.encode([args.prompt], max_length=args.max_length)
    save_file({"embeds": embeds.float().cpu().contiguous(), "mask": mask.cpu().contiguous()}, args.output)
    print(f"wrote {args.output}: embeds {tuple(embeds.shape)}, {int(mask.sum())} valid tokens"
          + (f", {encoder.last_truncated[0]} tokens truncated" if encoder.last_truncated[0] else ""))


def _generate(args):
    from .loading import load_pixart
    from .model import KVCompress, parse_layers
    from .pipeline import Conditioning, generate, save_latents
    loaded = load_pixart(args.model, preset=args.preset, dtype=args.dtype, device=args.device,
                         compute_dtype=getattr(torch, args.compute_dtype))
    model = loaded.model.eval()
    if args.lora:
        from .lora import merge_lora, read_lora
        skipped = merge_lora(model, read_lora(args.lora), args.lora_strength)
        reasons = "; ".join(sorted(set(skipped.values())))
        print(f"applied {args.lora}" + (f" ({len(skipped)} modules not applied: {reasons})" if skipped else ""))
    if args.kv_layers is not None:
        model.kv_compress = KVCompress(parse_layers(args.kv_layers, model.config.depth), args.kv_ratio, args.kv_mode)
    encoder = _load_t5(args)
    length = model.config.model_max_length
    prompt = Conditioning(*encoder.encode([args.prompt], max_length=length))
    negative = Conditioning(*encoder.encode([args.negative], max_length=length))
    encoder.release()
    result = generate(model, prompt, negative, height=args.height, width=args.width, steps=args.steps,
                      guidance=args.guidance, sampler=args.sampler, grid=args.grid, seed=args.seed,
                      batch=args.batch, null_mode=args.null_mode, binning=not args.no_binning, progress_bar=True)
    save_latents(args.output, result)
    print(f"wrote {args.output}: {result.width}x{result.height} px latents (requested "
          f"{result.requested[1]}x{result.requested[0]}), seed {result.seed}")


def main(argv=None) -> int:
    from .samplers import SAMPLERS
    from .schedule import STEP_GRIDS
    from .pipeline import NULL_MODES
    parser = argparse.ArgumentParser(prog="python -m pixart_core", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="print what a checkpoint contains and the configuration detected")
    p.add_argument("checkpoint")
    p.set_defaults(run=_inspect)

    p = sub.add_parser("convert", help="convert between the official .pth, .safetensors and diffusers layouts")
    p.add_argument("source")
    p.add_argument("output", help="x.pth, x.safetensors or a folder name (diffusers)")
    p.add_argument("--layout", choices=["official", "diffusers"], default="official",
                   help="key layout of a .safetensors output (folders are always diffusers)")
    p.set_defaults(run=_convert)

    p = sub.add_parser("lora", help="inspect a PixArt LoRA/LyCORIS of any trainer, or convert it to diffusers/PEFT names")
    lora_sub = p.add_subparsers(dest="lora_command", required=True)
    q = lora_sub.add_parser("inspect", help="print the format, modules, ranks, alpha and keys not used")
    q.add_argument("lora")
    q.set_defaults(run=_lora)
    q = lora_sub.add_parser("convert", help="rewrite to transformer.<diffusers name>/text_encoder.<T5 name> with alpha")
    q.add_argument("lora")
    q.add_argument("output", help="x.safetensors")
    q.set_defaults(run=_lora)

    def t5_args(p):
        p.add_argument("--t5", required=True, help="T5 encoder: HF folder or single .safetensors")
        p.add_argument("--t5-dtype", default="bf16", choices=["fp32", "bf16", "fp16"])
        p.add_argument("--tokenizer", default=None, help="folder with tokenizer.json or spiece.model")
        p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")

    p = sub.add_parser("encode", help="T5-encode a prompt into a .safetensors file (embeds, mask)")
    t5_args(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-length", type=int, default=300, help="300 for Σ, 120 for α")
    p.add_argument("output")
    p.set_defaults(run=_encode)

    p = sub.add_parser("generate", help="generate latents (a ComfyUI-loadable .latent file)")
    p.add_argument("--model", required=True, help="PixArt checkpoint (.pth, .safetensors, diffusers folder)")
    t5_args(p)
    p.add_argument("--preset", default="auto", choices=["auto", *PRESETS])
    p.add_argument("--dtype", default=None, help="weight storage dtype (fp32, bf16, fp16, fp8_e4m3fn)")
    p.add_argument("--compute-dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative", default="")
    p.add_argument("--height", type=int, default=None, help="default: the model's resolution")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--no-binning", action="store_true", help="generate at exactly height x width")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=4.5)
    p.add_argument("--sampler", default="dpmpp_2m", choices=list(SAMPLERS))
    p.add_argument("--grid", default="dpm_time_uniform", choices=list(STEP_GRIDS))
    p.add_argument("--null-mode", default="prompt_mask", choices=list(NULL_MODES))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--kv-layers", default=None, help='KV compression layers, e.g. "14-27" or "all"')
    p.add_argument("--kv-ratio", type=int, default=2)
    p.add_argument("--kv-mode", default="avgpool", choices=["avgpool", "conv", "ave", "uniform"])
    p.add_argument("--lora", default=None, help="a PixArt LoRA to merge into the weights (any trainer's format)")
    p.add_argument("--lora-strength", type=float, default=1.0)
    p.add_argument("output", help="output .latent file")
    p.set_defaults(run=_generate)

    from .train_cli import add_parser as add_train_lora
    add_train_lora(sub, t5_args)

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        args.run(args)
    except (ValueError, FileNotFoundError) as e:  # our errors are one sentence a user can act on
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
