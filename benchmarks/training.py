"""Seconds per LoRA training step (pixart_core.training, the train-lora defaults), full PixArt-Σ XL width.

    python -m benchmarks.training            # writes benchmarks/results/training.{json,md}
    python -m benchmarks.training --quick    # 512 px only

One step = forward with the official loss (ε-MSE + VB), backward, gradient clipping and an AdamW step on
rank-16 LoRAs over every linear layer of every block, gradient checkpointing on, batch 1, a 120-token
caption. Width is the real one (hidden 1152, 16 heads, MLP 4608, T5 width 4096); 28 blocks do not fit
this machine's time budget, so each case runs with 1 and 2 blocks and the full model is extrapolated:
step(28) = t(1) + 27·(t(2) - t(1)), and with KV compression on blocks 14-27 (the reference's choice)
step = t(1) + 13·per-block(plain) + 14·per-block(compressed). The four cases of a size and dtype run in
interleaved rounds after a warm-up round; the per-block cost is the median over rounds of t(2) - t(1)
within a round (the two ran back to back, under the same load from other processes).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from benchmarks.common import DTYPES, device_info, load_average, pick_device, sync
from pixart_core import training as tr
from pixart_core.config import PixArtConfig
from pixart_core.model import KVCompress, PixArt

RESULTS = Path(__file__).resolve().parent / "results"
CAPTION_TOKENS = 120
KV_BLOCKS = 14  # of 28: blocks 14-27


def make_step(side: int, dtype: str, kv: bool, depth: int, device):
    """A zero-argument callable running one training step of a fresh full-width `depth`-block model."""
    torch.manual_seed(0)
    config = PixArtConfig(depth=depth)
    model = PixArt(config, dtype=DTYPES[dtype], device=device)
    model.kv_compress = KVCompress(tuple(range(depth)) if kv else (), 2, "avgpool")
    g = torch.Generator().manual_seed(0)
    mask = torch.zeros(1, config.model_max_length, dtype=torch.long)
    mask[0, :CAPTION_TOKENS] = 1
    sample = tr.Sample(torch.randn(1, 4, side // 8, side // 8, generator=g),
                       torch.randn(1, config.model_max_length, config.caption_channels, generator=g), mask)
    adapters = tr.inject_lora(model, rank=16)
    params = adapters.parameters()
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def step():
        with tr.gradient_checkpointing(model), torch.enable_grad():
            out = tr.training_step(model, sample, g)
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
    return step


def run(sides, device, runs: int = 5) -> dict:
    """Per size and dtype, the four cases (KV off/on x 1/2 blocks) in interleaved rounds after a warm-up round,
    so other load on the machine hits them alike; per-block costs are medians of within-round differences."""
    rows = []
    for side in sides:
        for dtype in ("fp32", "bf16"):
            cases = {(kv, depth): make_step(side, dtype, kv, depth, device) for kv in (False, True) for depth in (1, 2)}
            times = {k: [] for k in cases}
            for r in range(runs + 1):
                for key, step in cases.items():
                    sync(device)
                    t0 = time.perf_counter()
                    step()
                    sync(device)
                    if r:  # round 0 is the warm-up
                        times[key].append(time.perf_counter() - t0)
                print(f"{side} px {dtype} round {r}: " + "  ".join(
                    f"kv={k[0]:d} d{k[1]}={v[-1]:.2f}" for k, v in times.items() if v), flush=True)
            # per round, the four cases ran back to back under the same load: differences within a round
            rounds = range(runs)
            base = statistics.median(times[(False, 1)])
            block = statistics.median(times[(False, 2)][r] - times[(False, 1)][r] for r in rounds)
            block_kv = statistics.median(times[(True, 2)][r] - times[(True, 1)][r] for r in rounds)
            rows.append({"side": side, "dtype": dtype,
                         "measured_s": {f"{'kv' if k else 'plain'}_{d}": v for (k, d), v in times.items()},
                         "per_block_s": block, "per_block_kv_s": block_kv,
                         "step_s": base + 27 * block,
                         "step_kv_s": base + (27 - KV_BLOCKS) * block + KV_BLOCKS * block_kv})
            del cases
    return {"device": device_info(device, torch.get_num_threads()), "load_average": load_average(), "rows": rows}


def table(results: dict) -> str:
    lines = ["| size | dtype | per block | per block, KV 2x2 | step, 28 blocks | step, KV on 14-27 | KV speed-up |",
             "|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        lines.append(f"| {r['side']} px | {r['dtype']} | {r['per_block_s']:.2f} s | {r['per_block_kv_s']:.2f} s | "
                     f"{r['step_s']:.1f} s | {r['step_kv_s']:.1f} s | {r['step_s'] / r['step_kv_s']:.2f}x |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="512 px only")
    parser.add_argument("--device", default=None)
    parser.add_argument("--runs", type=int, default=5, help="timed rounds per case")
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(min(2, torch.get_num_threads()))
    results = run((512,) if args.quick else (512, 1024), device, runs=args.runs)
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = f"training-{device.type}"
    (RESULTS / f"{name}.json").write_text(json.dumps(results, indent=2))
    info = results["device"]
    runs, load = args.runs, results["load_average"]
    md = (f"# LoRA training step, PixArt-Σ XL width ({info.get('gpu') or info.get('cpu')}, {info.get('threads')} threads; "
          "28 blocks extrapolated from 1- and 2-block runs, batch 1, rank 16 on every block linear, gradient "
          f"checkpointing; per-block costs are medians of within-round differences over {runs} interleaved rounds; "
          f"load average at the end {load})\n\n" + table(results) + "\n")
    (RESULTS / f"{name}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
