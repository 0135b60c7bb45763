"""Seconds per image: the few-step presets (LCM 4, Flash 4, DMD 1) against the default 20-step DPM-Solver++ with CFG.

    python -m benchmarks.fewstep [--px 512] [--runs 3] [--depths 1 2]
        # writes benchmarks/results/fewstep-cpu.json and .md

Each case is a whole pixart_core.pipeline.generate() call (noise, every model evaluation, the
sampler's arithmetic), on a PixArt-α 1024-MS model of the released width (hidden 1152, 16 heads,
T5 width 4096, 120 tokens) with random weights, timed interleaved (benchmarks.common.interleaved).
A 28-block model takes minutes per 20-step image on this CPU, so it is measured at two small depths
and extrapolated linearly: time(28) = time(d1) + (28 - d1)·(time(d2) - time(d1)) / (d2 - d1), which
holds because each block costs the same and the rest of the run does not depend on depth. The
default run evaluates the model 20 times on a CFG batch of 2; the presets evaluate it 4 (or 1)
times on a batch of 1 (no guidance), so the expected ratio is about 10x (40x for DMD).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from .common import device_info, interleaved, load_average, pick_device

from pixart_core import PixArt  # noqa: E402  (common puts the repository on sys.path)
from pixart_core.config import PRESETS
from pixart_core.fewstep import sampling_preset
from pixart_core.pipeline import Conditioning, generate

RESULTS = Path(__file__).resolve().parent / "results"
FULL_DEPTH = 28
DEFAULT = "DPM-Solver++ 20 steps, CFG 4.5"
CASES = {  # name -> generate() settings
    DEFAULT: dict(sampler="dpmpp_2m", grid="dpm_time_uniform", steps=20, guidance=4.5),
    **{p.label: dict(sampler=p.sampler, grid=p.grid, steps=p.steps, guidance=p.cfg)
       for p in map(sampling_preset, ("lcm_4step", "flash_4step", "dmd_1step"))},
}


def make_cases(depth: int, px: int, device) -> dict:
    config = PRESETS["alpha-1024-ms"].replace(depth=depth)
    model = PixArt(config).to(device).eval()
    g = torch.Generator().manual_seed(0)
    embeds = torch.randn(1, config.model_max_length, config.caption_channels, generator=g)
    mask = torch.zeros(1, config.model_max_length, dtype=torch.long)
    mask[:, :20] = 1
    prompt, negative = Conditioning(embeds, mask), Conditioning(torch.zeros_like(embeds), mask)
    return {name: (lambda kw=kw: generate(model, prompt, negative, height=px, width=px, binning=False, seed=1, **kw))
            for name, kw in CASES.items()}


def run(depths, px: int, runs: int, device, log=print) -> dict:
    results = {"px": px, "depths": list(depths), "full_depth": FULL_DEPTH, "cases": CASES, "measured": {}}
    for depth in depths:
        log(f"depth {depth}, {px} px")
        results["measured"][str(depth)] = interleaved(make_cases(depth, px, device), device, warmup=1, runs=runs,
                                                      log=log)
    d1, d2 = depths[0], depths[-1]
    est = {}
    for name in CASES:
        t1, t2 = (results["measured"][str(d)][name]["median_s"] for d in (d1, d2))
        est[name] = t1 + (FULL_DEPTH - d1) * (t2 - t1) / (d2 - d1)
    results["estimated_full_depth_s"] = est
    results["load_average"] = load_average()
    return results


def table(results: dict) -> str:
    d1, d2 = results["depths"][0], results["depths"][-1]
    est = results["estimated_full_depth_s"]
    base = est[DEFAULT]
    rows = [f"| preset | model calls x batch | depth {d1} | depth {d2} | 28 blocks (est.) | saved per image | speed-up |",
            "|---|---|---|---|---|---|---|"]
    for name, kw in results["cases"].items():
        m1, m2 = (results["measured"][str(d)][name]["median_s"] for d in (d1, d2))
        calls = f"{kw['steps']} x {2 if kw['guidance'] != 1.0 else 1}"
        saved = "-" if name == DEFAULT else f"{base - est[name]:.1f} s"
        rows.append(f"| {name} | {calls} | {m1:.2f} s | {m2:.2f} s | {est[name]:.1f} s | {saved} | "
                    f"{base / est[name]:.1f}x |")
    return "\n".join(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--px", type=int, default=512)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--depths", type=int, nargs=2, default=[1, 2])
    parser.add_argument("--device", default=None)
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    results = run(args.depths, args.px, args.runs, device)
    results["device"] = device_info(device, torch.get_num_threads())
    md = (f"# Few-step presets vs the default sampler, seconds per image (PixArt-α 1024-MS width, {args.px} px, "
          f"{results['device'].get('cpu') if device.type == 'cpu' else results['device'].get('gpu')}, "
          f"{torch.get_num_threads()} threads; whole generate() calls, median of {args.runs} interleaved rounds; "
          f"28 blocks extrapolated from depths {args.depths[0]} and {args.depths[1]}; load average at the end "
          f"{results['load_average']})\n\n" + table(results) + "\n")
    name = f"fewstep-{device.type}"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(results, indent=2))
    (RESULTS / f"{name}.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
