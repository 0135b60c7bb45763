"""Cost of one guided denoiser step: CFG, CFG + PAG (batched, and as two calls), PAG alone, no guidance.

    python -m benchmarks.guidance             # a small model (depth 4, width 384) at 512 px, fp32 CPU: < 1 min
    python -m benchmarks.guidance --depth 28 --width 1152 --px 1024 --device cuda

Each case is one call of pixart_core's PixArtDenoiser (what the CLI and the batched ComfyUI path run),
timed interleaved; "CFG + PAG, two calls" is a CFG call plus a separate perturbed-prompt call, the
cost ComfyUI pays where its memory estimate splits the batch (and stock ComfyUI's PAG always pays).
PAG perturbs one block (diffusers' documented "blocks.14" has one block too). Writes
benchmarks/results/guidance-<device>.json and .md; never asserts on timings.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch

from .common import DTYPES, device_info, interleaved, load_average, pick_device
from .run import RESULTS


def build(depth: int, width: int, px: int, dtype, device):
    from pixart_core import PRESETS, PixArt
    from .peers import randomize
    heads = max(1, width // 64) if width % 64 == 0 else max(1, width // 72)
    cfg = PRESETS["sigma-1024-ms"].replace(depth=depth, hidden_size=width, num_heads=heads, caption_channels=256,
                                           model_max_length=120, sample_size=px // 8, kv_compress_layers=())
    return randomize(PixArt(cfg, dtype=dtype, device=device), 0).eval().requires_grad_(False)


def run(depth: int, width: int, px: int, dtype_name: str, device, runs: int, log=print) -> dict:
    from pixart_core import schedule
    from pixart_core.guidance import PAG
    from pixart_core.model import PerturbedAttention
    from pixart_core.samplers import PixArtDenoiser
    dtype = DTYPES[dtype_name]
    model = build(depth, width, px, dtype, device)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, px // 8, px // 8, generator=g).to(device)
    y = torch.randn(2, 120, 256, generator=g).to(device=device, dtype=dtype)
    mask = torch.zeros(2, 120, dtype=torch.long, device=device)
    mask[0, :40], mask[1, :8] = 1, 1
    y = y * mask[..., None]
    sigma = schedule.discrete_sigmas()[500].float().reshape(1).to(device)
    t = schedule.sigma_to_timestep(sigma)
    pag = PAG((depth // 2,), 3.0)
    d = PixArtDenoiser(model)
    cond = dict(context=y[:1], context_mask=mask[:1])
    both = dict(cond, uncond_context=y[1:], uncond_mask=mask[1:])
    x_in = x / (1 + sigma ** 2).sqrt()
    cases = {
        "no guidance": lambda: d(x, sigma, **cond),
        "CFG": lambda: d(x, sigma, **both, cfg_scale=4.5),
        "PAG alone (CFG 1)": lambda: d(x, sigma, **cond, pag=pag),
        "CFG + PAG": lambda: d(x, sigma, **both, cfg_scale=4.5, pag=pag),
        "CFG + PAG, two calls": lambda: (d(x, sigma, **both, cfg_scale=4.5),
                                         model(x_in, t, y[:1], mask[:1], perturb=PerturbedAttention(pag.layers))),
    }
    log(f"guided step cost: depth {depth}, width {width}, {px} px, {dtype_name} on {device}   load {load_average()}")
    raw = interleaved(cases, device, 1, runs, log=log)
    base = raw["CFG"]["median_s"]
    return {"depth": depth, "width": width, "px": px, "dtype": dtype_name, "device": str(device),
            "pag_layers": list(pag.layers), "raw": raw,
            "ratio_vs_cfg": {k: v["median_s"] / base for k, v in raw.items()},
            "ratio_vs_cfg_cpu_time": {k: v["cpu_s_median"] / raw["CFG"]["cpu_s_median"] for k, v in raw.items()}}


def table(r: dict) -> str:
    lines = [f"| depth {r['depth']}, width {r['width']}, {r['px']} px, {r['dtype']}, {r['device']} | batch | "
             "step (median) | vs CFG (wall) | vs CFG (CPU time) |", "|---|---|---|---|---|"]
    batch = {"no guidance": "1", "CFG": "2", "PAG alone (CFG 1)": "2", "CFG + PAG": "3", "CFG + PAG, two calls": "2 + 1"}
    for k, v in r["raw"].items():
        lines.append(f"| {k} | {batch[k]} | {v['median_s'] * 1000:.0f} ms | **{r['ratio_vs_cfg'][k]:.2f}** | "
                     f"{r['ratio_vs_cfg_cpu_time'][k]:.2f} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--width", type=int, default=384)
    ap.add_argument("--px", type=int, default=512)
    ap.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    ap.add_argument("--device", default=None)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args(argv)
    device = pick_device(a.device)
    threads = a.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    res = run(a.depth, a.width, a.px, a.dtype, device, a.runs)
    res.update(date=datetime.datetime.now().isoformat(timespec="seconds"), info=device_info(device, threads),
               command="python -m benchmarks.guidance " + " ".join(argv if argv is not None else sys.argv[1:]),
               load_end=load_average())
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, f"guidance-{device.type}")
    with open(path + ".json", "w") as f:
        json.dump(res, f, indent=1)
    text = table(res)
    with open(path + ".md", "w") as f:
        f.write(text + "\n")
    print(text)
    print(f"wrote {path}.json, {path}.md")


if __name__ == "__main__":
    main()
