"""Command line: `python -m pixart_core {inspect,convert,lora,encode,generate,batch,train-lora,download} --help`."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

from .checks import SEED_MAX, InputError, argument, cli_type, real_number, usable_device, whole_number
from .config import PRESETS
from .hub import DownloadError


def _inspect(args):
    from .controlnet import describe_controlnet, file_parts
    from .loading import describe
    parts = file_parts(args.checkpoint)
    if "controlnet" in parts:
        print(describe_controlnet(args.checkpoint))
    if "model" in parts:
        if "controlnet" in parts:
            print("\nthe PixArt model in the same file (the model loader reads it):")
        print(describe(args.checkpoint))


def _convert(args):
    from .controlnet import convert_controlnet, file_parts
    from .loading import convert
    if "controlnet" in file_parts(args.source) and not args.base_model:
        out = convert_controlnet(args.source, args.output, layout=args.layout)
    else:
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
    from .files import prepare_output, save_result
    out = prepare_output(args.output, inputs=[args.t5, args.tokenizer])  # before the work, not after
    encoder = _load_t5(args)
    embeds, mask = encoder.encode([args.prompt], max_length=args.max_length)
    tensors = {"embeds": embeds.float().cpu().contiguous(), "mask": mask.cpu().contiguous()}
    out = save_result(out, lambda tmp: save_file(tensors, str(tmp)), "embeddings")
    print(f"wrote {out}: embeds {tuple(embeds.shape)}, {int(mask.sum())} valid tokens"
          + (f", {encoder.last_truncated[0]} tokens truncated" if encoder.last_truncated[0] else ""))


def _generate(args):
    from .files import prepare_output
    from .loading import load_pixart
    from .model import KVCompress, parse_layers
    from .pipeline import Conditioning, generate, save_latents
    out = prepare_output(args.output, inputs=[args.model, args.t5, args.tokenizer])  # before the work
    for option, path in (("--model", args.model), ("--t5", args.t5)):
        if not Path(path).expanduser().exists():  # before minutes of model loading, not after
            raise InputError(f"{option} {path}: no such file or folder")
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
    pag = None
    if args.pag_layers is not None:
        from .guidance import PAG, pag_layers
        pag = PAG(pag_layers(args.pag_layers, model.config.depth), args.pag_scale, args.pag_adaptive_scale)
    encoder = _load_t5(args)
    length = model.config.model_max_length
    prompt = Conditioning(*encoder.encode([args.prompt], max_length=length))
    negative = Conditioning(*encoder.encode([args.negative], max_length=length))
    encoder.release()
    steps, guidance, sampler, grid = args.steps, args.guidance, args.sampler, args.grid
    if args.sampling_preset:
        from .fewstep import sampling_preset
        p = sampling_preset(args.sampling_preset)
        steps, guidance, sampler, grid = p.steps, p.cfg, p.sampler, p.grid
        print(f"{p.label} ({p.model}): sampler {sampler}, grid {grid}, {steps} steps, guidance {guidance:g}")
    result = generate(model, prompt, negative, height=args.height, width=args.width, steps=steps,
                      guidance=guidance, sampler=sampler, grid=grid, seed=args.seed,
                      batch=args.batch, null_mode=args.null_mode, binning=not args.no_binning, progress_bar=True,
                      official_end=args.official_end, aspect_condition=args.aspect_condition, pag=pag)
    out = save_latents(out, result)
    print(f"wrote {out}: {result.width}x{result.height} px latents (requested "
          f"{result.requested[1]}x{result.requested[0]}), seed {result.seed}")


def _batch(args):
    from .batch import Settings, run_local
    settings = Settings(model=args.model, t5=args.t5, tokenizer=args.tokenizer, vae=args.vae, preset=args.preset,
                        dtype=args.dtype, compute_dtype=args.compute_dtype, t5_dtype=args.t5_dtype,
                        device=args.device, batch_size=args.batch_size, t5_batch=args.t5_batch,
                        null_mode=args.null_mode, grid=args.grid)
    for option, path in (("--model", args.model), ("--t5", args.t5)):
        if not Path(path).expanduser().exists():  # before any work, not after
            raise InputError(f"{option} {path}: no such file or folder")
    if args.ray is None:
        summary = run_local(args.jobs, args.out, settings, progress=True)
    else:
        try:
            from .batch_ray import run_ray
        except ImportError as e:
            if getattr(e, "name", "") and e.name.split(".")[0] == "ray":
                raise InputError('--ray needs Ray Data, which is not installed: pip install "ray[data]"') from None
            raise
        summary = run_ray(args.jobs, args.out, settings, address=args.ray, actors=args.actors,
                          num_gpus=args.num_gpus, t5_memory=args.t5_memory)
    print(summary.line())
    return 1 if summary.failed else 0


def _download(args):
    import json
    from . import hub
    if args.list:
        for name, f in hub.FILES.items():
            print(f"{name:<42} {f.directory + '/':<18} {f.url}")
        print("\nsets (each with the T5 chosen by --t5): " + ", ".join(f"{k} = {' + '.join(v)}" for k, v in hub.SETS.items()))
        return
    files = []
    for wf in args.workflow:
        found = hub.files_in_workflow(json.loads(Path(wf).read_text(encoding="utf-8")))
        if not found:
            raise ValueError(f"{wf} names none of the known model files (python -m pixart_core download --list)")
        files += found
    files += hub.resolve(args.what or ([] if files else ["sigma-1024"]), t5=args.t5)
    models_dir = args.models_dir or hub.default_models_dir()
    if models_dir is None:
        raise ValueError("say where the models go: --models-dir PATH/TO/ComfyUI/models (or set COMFYUI_MODELS)")
    hub.download(list(dict.fromkeys(files)), models_dir, dry_run=args.dry_run,
                 say=lambda line: print(line, flush=True))


def _device(text: str) -> str:
    return str(usable_device(text))


class _Parser(argparse.ArgumentParser):
    """argparse that answers a bad option with its one sentence, not the whole usage text above it."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from .loading import DTYPES
    from .guidance import MAX_ADAPTIVE_SCALE, MAX_PAG_SCALE, pag_layers_syntax
    from .model import layer_list_syntax
    from .fewstep import SAMPLING_PRESETS
    from .samplers import SAMPLERS
    from .schedule import MAX_STEPS, STEP_GRIDS
    from .pipeline import ASPECT_CONDITIONS, MAX_BATCH, MAX_GUIDANCE, MAX_REQUESTED_SIDE, NULL_MODES
    from .t5 import MAX_TOKENS
    parser = _Parser(prog="python -m pixart_core", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="print what a checkpoint or ControlNet contains and the configuration detected")
    p.add_argument("checkpoint")
    p.set_defaults(run=_inspect)

    p = sub.add_parser("convert", help="convert a model or a ControlNet between the official .pth, .safetensors and "
                                       "diffusers layouts")
    p.add_argument("source")
    p.add_argument("output", help="x.pth, x.safetensors or a folder name (diffusers)")
    p.add_argument("--layout", choices=["official", "diffusers"], default="official",
                   help="key layout of a .safetensors output (folders are always diffusers)")
    p.add_argument("--base-model", action="store_true",
                   help="of an official ControlNet .pth (PixArt-α + control branch), convert the PixArt-α model "
                        "instead of the ControlNet")
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
        p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", type=cli_type(_device))

    p = sub.add_parser("encode", help="T5-encode a prompt into a .safetensors file (embeds, mask)")
    t5_args(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-length", type=argument(whole_number, 1, MAX_TOKENS), default=300,
                   help="300 for Σ, 120 for α")
    p.add_argument("output")
    p.set_defaults(run=_encode)

    p = sub.add_parser("generate", help="generate latents (a ComfyUI-loadable .latent file)")
    p.add_argument("--model", required=True, help="PixArt checkpoint (.pth, .safetensors, diffusers folder)")
    t5_args(p)
    p.add_argument("--preset", default="auto", choices=["auto", *PRESETS])
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="weight storage dtype (default: the file's)")
    p.add_argument("--compute-dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative", default="")
    side = argument(whole_number, 1, MAX_REQUESTED_SIDE)
    p.add_argument("--height", type=side, default=None, help="default: the model's resolution")
    p.add_argument("--width", type=side, default=None)
    p.add_argument("--no-binning", action="store_true", help="generate at exactly height x width")
    p.add_argument("--steps", type=argument(whole_number, 1, MAX_STEPS), default=20)
    p.add_argument("--guidance", type=argument(real_number, 0.0, MAX_GUIDANCE), default=4.5)
    p.add_argument("--sampler", default="dpmpp_2m", choices=list(SAMPLERS))
    p.add_argument("--grid", default="dpm_time_uniform", choices=list(STEP_GRIDS))
    p.add_argument("--null-mode", default="prompt_mask", choices=list(NULL_MODES))
    p.add_argument("--sampling-preset", default=None, choices=list(SAMPLING_PRESETS),
                   help="a few-step model's own settings (replace --steps, --guidance, --sampler, --grid): "
                        "lcm_4step (PixArt-LCM), dmd_1step (PixArt-α-DMD), flash_4step (α 1024 + the flash-pixart LoRA)")
    p.add_argument("--official-end", action="store_true",
                   help="stop at t = 1e-3 and return the VP-scaled sample, as the official solvers (dpm_time_uniform grid)")
    p.add_argument("--aspect-condition", default="bin_key", choices=list(ASPECT_CONDITIONS),
                   help="PixArt-α 1024 micro-condition: the bin's ratio key (official) or height/width (diffusers)")
    p.add_argument("--seed", type=argument(whole_number, 0, SEED_MAX), default=0, help="0 to 2**64-1")
    p.add_argument("--batch", type=argument(whole_number, 1, MAX_BATCH), default=1)
    p.add_argument("--kv-layers", default=None, type=cli_type(layer_list_syntax), help='KV compression layers, e.g. "14-27" or "all"')
    p.add_argument("--kv-ratio", type=argument(whole_number, 1, 8), default=2)
    p.add_argument("--kv-mode", default="avgpool", choices=["avgpool", "conv", "ave", "uniform"])
    p.add_argument("--lora", default=None, help="a PixArt LoRA to merge into the weights (any trainer's format)")
    p.add_argument("--lora-strength", type=argument(real_number, -100.0, 100.0), default=1.0)
    p.add_argument("--pag-layers", default=None, type=cli_type(pag_layers_syntax),
                   help='perturbed-attention guidance on these blocks, e.g. "14", "10-19", or diffusers-default '
                        '(its "blocks.1": blocks 1 and 10-19) / diffusers-docs ("blocks.14"); default: no PAG')
    p.add_argument("--pag-scale", type=argument(real_number, 0.0, MAX_PAG_SCALE), default=3.0)
    p.add_argument("--pag-adaptive-scale", type=argument(real_number, 0.0, MAX_ADAPTIVE_SCALE), default=0.0,
                   help="PAG scale at timestep t: max(0, scale - this * (1000 - t)); 0 = constant")
    p.add_argument("output", help="output .latent file")
    p.set_defaults(run=_generate)

    p = sub.add_parser("batch", help="generate every request of a JOBS.jsonl file into a folder (locally, or on "
                                     "a Ray cluster with --ray); a rerun skips finished outputs")
    p.add_argument("jobs", help='one JSON object a line: {"prompt": ..., "negative", "seed", "width", "height", '
                                '"steps", "sampler", "guidance", "preset", "kv_layers"} (absent: the defaults)')
    p.add_argument("--out", required=True, help="output folder: <request hash>.png or .latent, manifest.jsonl")
    p.add_argument("--model", required=True, help="PixArt checkpoint (.pth, .safetensors, diffusers folder)")
    t5_args(p)
    p.add_argument("--vae", default=None, help="diffusers AutoencoderKL folder (SDXL VAE for Σ) to write PNGs; "
                                               "needs diffusers. Without it: .latent files")
    p.add_argument("--preset", default="auto", choices=["auto", *PRESETS], help="for requests that name none")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="weight storage dtype (default: the file's)")
    p.add_argument("--compute-dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--batch-size", type=argument(whole_number, 1, MAX_BATCH), default=4,
                   help="requests sampled together (same model, bin and settings)")
    p.add_argument("--t5-batch", type=argument(whole_number, 1, MAX_BATCH), default=32, help="prompts per T5 call")
    p.add_argument("--null-mode", default="prompt_mask", choices=list(NULL_MODES))
    p.add_argument("--grid", default="dpm_time_uniform", choices=list(STEP_GRIDS))
    p.add_argument("--ray", default=None, metavar="ADDRESS|auto",
                   help="run on a Ray cluster (ray start --head; then auto or its address); needs ray[data]")
    p.add_argument("--actors", type=argument(whole_number, 1, 4096), default=1, help="--ray: sampling actors")
    p.add_argument("--num-gpus", type=argument(real_number, 0.0, 64.0), default=None,
                   help="--ray: GPUs per sampling actor (default 1 with --device cuda, else 0)")
    p.add_argument("--t5-memory", type=argument(real_number, 0.0, 4096.0), default=None,
                   help="--ray: GiB of memory to reserve for each T5 worker (T5-XXL in bf16 needs about 10)")
    p.set_defaults(run=_batch)

    p = sub.add_parser("download", help="download the released files a model set or workflow needs into a "
                                        "ComfyUI models folder (needs huggingface_hub)")
    p.add_argument("what", nargs="*", help="sets (sigma-1024, sigma-2k, sigma-512, alpha-1024, ...) or file names; "
                                          "default sigma-1024")
    p.add_argument("--workflow", action="append", default=[], help="also the files this workflow .json names")
    p.add_argument("--t5", choices=["fp16", "fp8"], default="fp16", help="T5-XXL precision for the sets")
    p.add_argument("--models-dir", type=Path, default=None,
                   help="ComfyUI's models folder (default: $COMFYUI_MODELS, or the ComfyUI this pack is in)")
    p.add_argument("--dry-run", action="store_true", help="show what would be downloaded, and its size")
    p.add_argument("--list", action="store_true", help="list the known files and sets (no network)")
    p.set_defaults(run=_download)

    from .train_cli import add_parser as add_train_lora
    add_train_lora(sub, t5_args)

    return parser


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, or a bad option (its sentence is printed): a status, also in-process
        return e.code
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        code = args.run(args)
    except (ValueError, OSError) as e:  # our errors (InputError...) are one sentence a user can act on
        print(f"error: {e}", file=sys.stderr)
        return 2
    except DownloadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
