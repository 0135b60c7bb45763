"""The cost of a PixArt ControlNet step against a plain step (real width 1152, CFG batch 2).

    python -m benchmarks.controlnet            # 1024 px, fp32 on the CPU (about 4 minutes on 2 cores)
    python -m benchmarks.controlnet --px 2048 --dtype bf16 --device cuda

A ControlNet step is E + 28·B + H + 13·C: E the embedding/caption/final work, B one base block, H the
hint embedding (the base's patch embedder) and C one control copy (a block plus its after_proj;
copy 0 also before_proj). As in kv.py, the parts are timed interleaved on shallow models (depth 0,
depth 2, depth 2 + a 1-copy ControlNet: a copy must feed a later block) and the 28-block figures
assembled from them; on CUDA
(or with --full-depth) the real 28-block model with a 13-copy ControlNet is timed as well.
Writes benchmarks/results/controlnet-<device>.json; never asserts on timings.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import sys

import torch

from . import flops, peers
from .common import DTYPES, device_info, interleaved, load_average, pick_device
from .run import RESULTS

DEPTH, COPIES = 28, 13  # PixArt-Σ/α XL and every released ControlNet


def controlnet_for(model, copies: int, seed: int = 7):
    from pixart_core.controlnet import PixArtControlNet
    net = PixArtControlNet(model.config.replace(depth=copies, kv_compress_layers=()), dtype=model.compute_dtype,
                           device="meta").to_empty(device=next(model.parameters()).device)
    return peers.randomize(net, seed).eval().requires_grad_(False)


def flop_ratio(px: int, L: int) -> float:
    """FLOPs of a ControlNet step over a plain one: 13 more blocks, 13 after_proj (+ before_proj, hint embedding)."""
    h, w = flops.tokens(px)
    N, s = h * w, flops.Shape()
    plain = flops.step_flops(px, L, DEPTH)
    extra = COPIES * (flops.block_flops(N, N, L)["total"] + 2 * s.B * N * s.D * s.D)
    extra += 2 * s.B * N * s.D * s.D + flops.once_flops(N, L)["patch_embed"]
    return (plain + extra) / plain


def run(px: int, dtype_name: str, device, runs: int, full_depth: bool, log=print) -> dict:
    from pixart_core.controlnet import ControlInput
    dtype = DTYPES[dtype_name]
    sample = min(max(px // 8, 64), 256)
    x, t, y, mask = peers.inputs(px, dtype, device)
    hint = torch.randn(1, *x.shape[1:], generator=torch.Generator().manual_seed(3)).to(device=device, dtype=dtype)
    m0, m2 = peers.ours(0, dtype, device, sample_size=sample), peers.ours(2, dtype, device, sample_size=sample)
    c1 = [ControlInput(controlnet_for(m2, 1), hint, 1.0)]
    log(f"ControlNet step cost, {px} px {dtype_name} on {device}: parts   load {load_average()}")
    t_parts = interleaved({"overhead(depth0)": lambda: m0(x, t, y, mask), "2 blocks": lambda: m2(x, t, y, mask),
                           "2 blocks+copy": lambda: m2(x, t, y, mask, controls=c1)}, device, 1, runs, log=log)
    E = t_parts["overhead(depth0)"]["median_s"]
    B = max(t_parts["2 blocks"]["median_s"] - E, 1e-9) / 2
    C = max(t_parts["2 blocks+copy"]["median_s"] - t_parts["2 blocks"]["median_s"], 1e-9)  # H + one copy
    plain, controlled = E + DEPTH * B, E + DEPTH * B + COPIES * C
    # the same from this process's CPU seconds, which other processes' load inflates less than wall time
    cE, c2, c2c = (t_parts[k]["cpu_s_median"] for k in ("overhead(depth0)", "2 blocks", "2 blocks+copy"))
    cpu_ratio = (cE + DEPTH * (c2 - cE) / 2 + COPIES * (c2c - c2)) / (cE + DEPTH * (c2 - cE) / 2)
    out = {"px": px, "dtype": dtype_name, "device": str(device), "raw": t_parts, "overhead_s": E, "block_s": B,
           "copy_s": C, "step28_s": plain, "step28_controlnet_s": controlled, "ratio": controlled / plain,
           "ratio_cpu_time": cpu_ratio,
           "expected_block_ratio": 1 + COPIES / DEPTH, "flop_ratio": flop_ratio(px, peers.VALID),
           "assembled": True}
    del m0, m2, c1
    gc.collect()
    if full_depth:
        log(f"ControlNet step cost, {px} px {dtype_name}: the real 28-block model + 13 copies   load {load_average()}")
        m = peers.ours(DEPTH, dtype, device, sample_size=sample)
        c13 = [ControlInput(controlnet_for(m, COPIES), hint, 1.0)]
        t_full = interleaved({"plain": lambda: m(x, t, y, mask), "controlnet": lambda: m(x, t, y, mask, controls=c13)},
                             device, 1, runs, log=log)
        out["full"] = {"raw": t_full, "ratio": t_full["controlnet"]["median_s"] / t_full["plain"]["median_s"]}
        del m, c13
        gc.collect()
    return out


def table(r: dict) -> str:
    lines = [f"| {r['px']} px, {r['dtype']}, {r['device']} | plain step | ControlNet step | ratio (wall) "
             "| ratio (CPU time) | 1 + 13/28 | FLOP ratio |",
             "|---|---|---|---|---|---|---|",
             f"| 28 blocks + 13 copies (assembled) | {r['step28_s']:.2f} s | {r['step28_controlnet_s']:.2f} s | "
             f"**{r['ratio']:.3f}** | {r['ratio_cpu_time']:.3f} | {r['expected_block_ratio']:.3f} | "
             f"{r['flop_ratio']:.3f} |"]
    if "full" in r:
        f = r["full"]["raw"]
        lines.append(f"| 28 blocks + 13 copies (timed) | {f['plain']['median_s']:.2f} s | "
                     f"{f['controlnet']['median_s']:.2f} s | **{r['full']['ratio']:.3f}** | | | |")
    lines.append(f"\none base block {r['block_s']:.3f} s, one control copy (+ hint embedding) {r['copy_s']:.3f} s, "
                 f"embedding/caption/final {r['overhead_s']:.3f} s")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--px", type=int, default=1024)
    ap.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    ap.add_argument("--device", default=None)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--full-depth", action="store_true", help="also time the real 28-block model (default on CUDA)")
    a = ap.parse_args(argv)
    device = pick_device(a.device)
    import psutil
    threads = a.threads or psutil.cpu_count(logical=False) or os.cpu_count() or 1
    torch.set_num_threads(threads)
    res = run(a.px, a.dtype, device, a.runs, a.full_depth or device.type == "cuda")
    res.update(date=datetime.datetime.now().isoformat(timespec="seconds"), info=device_info(device, threads),
               command="python -m benchmarks.controlnet " + " ".join(argv if argv is not None else sys.argv[1:]),
               load_end=load_average())
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, f"controlnet-{device.type}.json")
    with open(path, "w") as f:
        json.dump(res, f, indent=1)
    print(table(res))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
