"""Seconds per LoRA training step (pixart_core.training, the train-lora defaults), full PixArt-Σ XL width.

    python -m benchmarks.training            # writes benchmarks/results/training-<device>.{json,md}
    python -m benchmarks.training --quick    # 512 px only

A step is forward with the official loss (ε-MSE + VB), backward, gradient clipping and an AdamW step on
rank-16 LoRAs over every linear layer of every block, gradient checkpointing on, batch 1, a 120-token
caption, at the real width (hidden 1152, 16 heads, MLP 4608, T5 width 4096). 28 blocks do not fit this
machine's time budget, so one block is timed on its own (forward, recomputed forward and backward with
the gradient to its input, its LoRAs' clipping and AdamW step), with and without 2x2 KV compression,
and so is the rest of the model (embeddings, caption projection, final layer, loss: the same step with
no blocks, forward only); then step = rest + 28·block, or rest + 14·block + 14·block(KV) with
compression on blocks 14-27 as the reference. Cases run in interleaved rounds after a warm-up round;
the fastest round of each is used, the one least disturbed by other load on the machine.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from benchmarks.common import DTYPES, device_info, load_average, pick_device, sync
from pixart_core import training as tr
from pixart_core.config import PixArtConfig
from pixart_core.model import KVCompress, PixArt

RESULTS = Path(__file__).resolve().parent / "results"
CAPTION_TOKENS = 120
DEPTH, KV_BLOCKS = 28, 14  # blocks 14-27 compressed


def _sample(config: PixArtConfig, side: int, g) -> tr.Sample:
    mask = torch.zeros(1, config.model_max_length, dtype=torch.long)
    mask[0, :CAPTION_TOKENS] = 1
    return tr.Sample(torch.randn(1, 4, side // 8, side // 8, generator=g),
                     torch.randn(1, config.model_max_length, config.caption_channels, generator=g), mask)


def make_block_step(side: int, dtype: str, kv: bool, device):
    """One block's share of a training step, as a zero-argument callable."""
    torch.manual_seed(0)
    config = PixArtConfig(depth=1)
    model = PixArt(config, dtype=DTYPES[dtype], device=device)
    adapters = tr.inject_lora(model, rank=16)
    params = adapters.parameters()
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    block, D, h = model.blocks[0], config.hidden_size, side // 16
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(1, h * h, D, generator=g) * 0.5).to(device, DTYPES[dtype]).requires_grad_(True)
    y = torch.randn(1, CAPTION_TOKENS, D, generator=g).to(device, DTYPES[dtype])
    t0 = (torch.randn(1, 6 * D, generator=g) * 0.1).to(device, DTYPES[dtype])
    grad_out = torch.randn(1, h * h, D, generator=g).to(device, DTYPES[dtype])
    compress = KVCompress((0,), 2, "avgpool").for_layer(0) if kv else None

    def step():
        with tr.gradient_checkpointing(model), torch.enable_grad():
            out = block(x, y, t0, None, (h, h), compress, model.ff_chunk, True)
            optimizer.zero_grad(set_to_none=True)
            x.grad = None
            out.backward(grad_out)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
    return step


def make_rest_step(side: int, dtype: str, device):
    """The model without blocks: embeddings, caption projection, final layer and the loss (forward)."""
    config = PixArtConfig(depth=0)
    model = PixArt(config, dtype=DTYPES[dtype], device=device)
    g = torch.Generator().manual_seed(0)
    sample = _sample(config, side, g)
    return lambda: tr.training_step(model, sample, g)


def run(sides, device, runs: int = 5) -> dict:
    rows = []
    for side in sides:
        for dtype in ("fp32", "bf16"):
            cases = {"rest": make_rest_step(side, dtype, device), "block": make_block_step(side, dtype, False, device),
                     "block_kv": make_block_step(side, dtype, True, device)}
            times = {k: [] for k in cases}
            for r in range(runs + 1):
                for key, step in cases.items():
                    sync(device)
                    t0 = time.perf_counter()
                    with torch.no_grad() if key == "rest" else torch.enable_grad():
                        step()
                    sync(device)
                    if r:  # round 0 is the warm-up
                        times[key].append(time.perf_counter() - t0)
                if r:
                    print(f"{side} px {dtype} round {r}: " + "  ".join(f"{k}={v[-1]:.2f}" for k, v in times.items()),
                          flush=True)
            best = {k: min(v) for k, v in times.items()}
            rows.append({"side": side, "dtype": dtype, "measured_s": times, "rest_s": best["rest"],
                         "per_block_s": best["block"], "per_block_kv_s": best["block_kv"],
                         "step_s": best["rest"] + DEPTH * best["block"],
                         "step_kv_s": best["rest"] + (DEPTH - KV_BLOCKS) * best["block"]
                         + KV_BLOCKS * best["block_kv"]})
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
          "28 blocks = the rest of the model + 28 x one block timed on its own; batch 1, rank 16 on every block "
          f"linear, gradient checkpointing; fastest of {runs} interleaved rounds; load average at the end {load})"
          "\n\n" + table(results) + "\n")
    (RESULTS / f"{name}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
