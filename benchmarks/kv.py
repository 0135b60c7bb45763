"""KV compression: attention time and step time with compression off / on layers 14–27 / on all.

Measured with pixart_core's per-call override `model(x, t, y, mask, kv_compress=KVCompress(...))`.
A 28-layer step is E + Σ_i block_i, E being the embedding/caption/final work: E comes from a
depth-0 model and each kind of block (uncompressed, avgpool, conv) from depth-1 models, all timed
interleaved; the 28-layer figures are assembled from those and say so.
"""
from __future__ import annotations

import gc

import torch
import torch.nn.functional as F

from . import flops, peers
from .common import interleaved, load_average

DEEP = tuple(range(14, 28))  # the reference's kv_compress_layer list
ALL = tuple(range(28))


def attention_cases(px, dtype, device, q_fraction=1.0, ratio=2):
    """Self-attention core alone (SDPA over 16 heads of 72), keys/values at N and at N/r², and the
    compression op itself (avg-pool, and depthwise conv + LayerNorm, on K and V)."""
    from pixart_core.model import compress_tokens
    h, w = flops.tokens(px)
    N, D, H = h * w, 1152, 16
    Nq = max(1, int(N * q_fraction))
    g = torch.Generator(device="cpu").manual_seed(0)
    q = torch.randn(peers.BATCH, H, Nq, D // H, generator=g).to(device=device, dtype=dtype)
    kv_full = torch.randn(peers.BATCH, N, D, generator=g).to(device=device, dtype=dtype)
    k_full = kv_full.view(peers.BATCH, N, H, D // H).transpose(1, 2)
    kc = compress_tokens(kv_full, (h, w), ratio, "avgpool")
    k_c = kc.reshape(peers.BATCH, -1, H, D // H).transpose(1, 2)
    sr = torch.nn.Conv2d(D, D, ratio, stride=ratio, groups=D, device=device, dtype=dtype)
    norm = torch.nn.LayerNorm(D, eps=1e-5, device=device, dtype=dtype)
    cases = {
        "sdpa_off": lambda: F.scaled_dot_product_attention(q, k_full, k_full),
        "sdpa_on": lambda: F.scaled_dot_product_attention(q, k_c, k_c),
        "compress_avgpool": lambda: (compress_tokens(kv_full, (h, w), ratio, "avgpool"),
                                     compress_tokens(kv_full, (h, w), ratio, "avgpool")),
        "compress_conv": lambda: (compress_tokens(kv_full, (h, w), ratio, "conv", sr, norm),
                                  compress_tokens(kv_full, (h, w), ratio, "conv", sr, norm)),
    }
    return cases, {"N": N, "Nk": kc.shape[1], "Nq": Nq, "q_fraction": Nq / N}


def run(plan: dict, device, log=print) -> dict:
    """plan: dtype, warmup, runs, sizes: [(px, {"attention_q_fraction": f, "blocks": bool})]."""
    from pixart_core import KVCompress
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[plan["dtype"]]
    out = {"dtype": plan["dtype"], "cells": []}
    for px, opts in plan["sizes"]:
        cell = {"px": px}
        h, w = flops.tokens(px)
        N = h * w
        Nk = flops.kv_tokens(h, w, 2)
        cell.update(tokens=N, kv_tokens=Nk)
        # attention alone
        frac = opts.get("attention_q_fraction", 1.0)
        log(f"  KV attention {px} px {plan['dtype']} (queries: {frac:g} of {N})   load {load_average()}")
        cases, meta = attention_cases(px, dtype, device, frac)
        t = interleaved(cases, device, plan["warmup"], plan["runs"], log=log)
        scale = 1.0 / meta["q_fraction"]  # SDPA cost is linear in the number of queries
        att = {k: v["median_s"] * (scale if k.startswith("sdpa") else 1.0) for k, v in t.items()}
        cell["attention"] = {"times_s": att, "raw": t, "q_fraction": meta["q_fraction"],
                             "extrapolated": meta["q_fraction"] < 1,
                             "flops_off": flops.attention_flops(peers.BATCH, N, N),
                             "flops_on": flops.attention_flops(peers.BATCH, N, Nk)}
        cell["attention"]["speedup"] = att["sdpa_off"] / att["sdpa_on"]
        cell["attention"]["speedup_with_avgpool"] = att["sdpa_off"] / (att["sdpa_on"] + att["compress_avgpool"])
        cell["attention"]["speedup_with_conv"] = att["sdpa_off"] / (att["sdpa_on"] + att["compress_conv"])
        cell["attention"]["flop_ratio"] = N / Nk
        del cases
        gc.collect()
        # blocks and the assembled 28-layer step
        if opts.get("blocks", True):
            log(f"  KV blocks {px} px {plan['dtype']} (one block of each kind + depth-0 overhead)   load {load_average()}")
            sample = min(max(px // 8, 64), 256)
            pkg = plan.get("package", "pixart_core")
            m0 = peers.ours(0, dtype, device, sample_size=sample, package=pkg)
            m1 = peers.ours(1, dtype, device, sample_size=sample, package=pkg)
            x, tt, y, mask = peers.inputs(px, dtype, device)
            on = {"avgpool": KVCompress(layers=(0,), ratio=2, mode="avgpool"),
                  "conv": KVCompress(layers=(0,), ratio=2, mode="conv")}
            cases = {
                "overhead(depth0)": lambda: m0(x, tt, y, mask),
                "block_off": lambda: m1(x, tt, y, mask, kv_compress=KVCompress(layers=())),
                "block_avgpool": lambda: m1(x, tt, y, mask, kv_compress=on["avgpool"]),
                "block_conv": lambda: m1(x, tt, y, mask, kv_compress=on["conv"]),
            }
            runs = opts.get("runs", plan["runs"])
            warm = opts.get("warmup", plan["warmup"])
            t = interleaved(cases, device, warm, runs, log=log)
            E = t["overhead(depth0)"]["median_s"]
            blk = {k: max(t[f"block_{k}"]["median_s"] - E, 1e-9) for k in ("off", "avgpool", "conv")}
            steps = {"off": E + 28 * blk["off"]}
            for mode in ("avgpool", "conv"):
                steps[f"14-27 {mode}"] = E + 14 * blk["off"] + 14 * blk[mode]
                steps[f"all {mode}"] = E + 28 * blk[mode]
            L = peers.VALID
            fl = {"off": flops.step_flops(px, L, 28), "14-27": flops.step_flops(px, L, 28, DEEP),
                  "all": flops.step_flops(px, L, 28, ALL)}
            cell["blocks"] = {"raw": t, "overhead_s": E, "block_s": blk, "step28_s": steps, "step28_flops": fl,
                              "speedup": {k: steps["off"] / v for k, v in steps.items() if k != "off"},
                              "flop_ratio": {"14-27": fl["off"] / fl["14-27"], "all": fl["off"] / fl["all"]},
                              "block_flop_ratio": flops.block_flops(N, N, L)["total"]
                              / flops.block_flops(N, Nk, L, compressed=True)["total"]}
            del m0, m1, cases
            gc.collect()
        out["cells"].append(cell)
    return out
