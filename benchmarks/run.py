"""Run the benchmark suite and write benchmarks/results/{<name>.json, latest.md, kv_compression.png}.

    python -m benchmarks.run --quick        # a few minutes on 2 CPU cores (the default)
    python -m benchmarks.run --full         # every size and dtype the targets name (about 1.5 h on 2 cores)
    python -m benchmarks.run --quick --sections speed kv

Picks CUDA when available (then the full 28-block model everywhere), else the CPU with a reduced
depth that the output states. Never asserts on timings: misses are reported, with their reason.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

import torch

from .common import REPO, device_info, load_average, pick_device

RESULTS = os.path.join(REPO, "benchmarks", "results")
SECTIONS = ("speed", "kv", "memory", "profile")
ALL_IMPLS = None
NO_SUBQUAD = ["pixart_core", "pixart_core+patch", "diffusers", "comfy+sdpa"]


def plan_for(mode: str, device) -> dict:
    if device.type == "cuda":  # fast enough for the real model everywhere
        runs, warm = (5, 2) if mode == "full" else (3, 1)
        sizes = (512, 1024, 2048, 4096) if mode == "full" else (1024, 2048)
        return {
            "speed": {"depth": 28, "warmup": warm, "runs": runs,
                      "cells": [(d, px, ALL_IMPLS) for d in ("fp32", "bf16") for px in sizes]},
            "kv": {"dtype": "bf16", "warmup": warm, "runs": runs,
                   "sizes": [(px, {}) for px in (1024, 2048, 4096)]},
            "memory": {"dtype": "bf16", "cases": [(px, kv, 28, False) for px in (1024, 2048, 4096)
                                                  for kv in ("off", "deep", "all")],
                       "t5": [dict(layers=24, d_model=4096, d_ff=10240)], "validate": None},
            "profile": [(1024, "bf16", None)],
        }
    if mode == "full":
        return {
            "speed": {"depth": 1, "warmup": 1, "runs": 3, "patch_dtypes": ("bf16",), "cells": [
                ("fp32", 512, ALL_IMPLS), ("fp32", 1024, ALL_IMPLS), ("fp32", 2048, ALL_IMPLS, 2),
                ("bf16", 512, ALL_IMPLS), ("bf16", 1024, NO_SUBQUAD),
                ("bf16", 2048, ["pixart_core", "pixart_core+patch", "diffusers"], 2)]},
            "kv": {"dtype": "fp32", "warmup": 1, "runs": 3, "sizes": [
                (1024, {}), (2048, {}),
                (4096, {"attention_q_fraction": 1 / 16, "warmup": 0, "runs": 1})]},
            "memory": {"dtype": "fp32", "cases": [
                (1024, "off", 1, False), (1024, "deep", 2, False), (1024, "all", 1, False),
                (2048, "off", 1, False), (2048, "deep", 2, False), (2048, "all", 1, False),
                (4096, "off", 1, False), (4096, "deep", 2, False), (4096, "all", 1, False),
                (4096, "all", 1, True, "bf16")],
                "t5": [dict(layers=2, d_model=4096, d_ff=10240), dict(layers=24, d_model=4096, d_ff=10240)],
                "validate": 512},
            "profile": [(1024, "fp32", None), (1024, "bf16", NO_SUBQUAD), (2048, "fp32", ["pixart_core", "diffusers"])],
        }
    return {  # quick, CPU
        "speed": {"depth": 1, "warmup": 1, "runs": 3, "patch_dtypes": ("bf16",), "cells": [
            ("fp32", 512, ALL_IMPLS), ("fp32", 1024, ALL_IMPLS), ("bf16", 512, NO_SUBQUAD)]},
        "kv": {"dtype": "fp32", "warmup": 1, "runs": 3, "sizes": [
            (1024, {}), (2048, {"attention_q_fraction": 1 / 4, "blocks": False}),
            (4096, {"attention_q_fraction": 1 / 64, "blocks": False})]},
        "memory": {"dtype": "fp32", "cases": [(1024, "off", 1, False), (1024, "deep", 2, False), (2048, "all", 1, False)],
                   "t5": [dict(layers=2, d_model=4096, d_ff=10240)], "validate": None},
        "profile": [(1024, "fp32", ["pixart_core", "pixart_core+patch", "diffusers"])],
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="the few-minute set (default)")
    g.add_argument("--full", action="store_true", help="all sizes and dtypes the targets name")
    ap.add_argument("--sections", nargs="*", default=list(SECTIONS), choices=SECTIONS)
    ap.add_argument("--name", default=None, help="results/<name>.json (default: <mode>-<device>)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads for every implementation "
                    "(default: physical cores)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--depth", type=int, default=None, help="override the blocks per timed step")
    ap.add_argument("--runs", type=int, default=None, help="override the timed rounds")
    ap.add_argument("--no-patch", action="store_true", help="skip the pixart_core+patch rows")
    ap.add_argument("--from-json", default=None, help="only rewrite latest.md/png from a results json")
    ap.add_argument("--merge", action="store_true", help="keep the sections of an existing results/<name>.json "
                    "that this run does not redo (run the full set in parts)")
    a = ap.parse_args(argv)
    from . import report
    if a.from_json:
        with open(a.from_json) as f:
            res = json.load(f)
        report.write(res, RESULTS)
        return
    mode = "full" if a.full else "quick"
    device = pick_device(a.device)
    import psutil
    threads = a.threads or psutil.cpu_count(logical=False) or os.cpu_count() or 1
    torch.set_num_threads(threads)
    if a.no_patch:
        from . import proposed
        proposed._STATE["name"] = None
    plan = plan_for(mode, device)
    if device.type == "cpu":
        plan["speed"]["skip_note"] = (
            "not timed. ComfyUI's CPU default attention (sub-quadratic, baddbmm chunks) in bf16 goes through "
            "PyTorch's bf16 batched-matmul fallback on CPUs without bf16 GEMMs (~1 GFLOP/s here): minutes per "
            "step above 512 px. `comfy+sdpa` in bf16 is 3-4x slower than diffusers at 512 and 1024 px (its "
            "residual stream stays in the patch conv's strided layout, so q_linear takes the bf16 bmm fallback) "
            "and is not timed at 2048 px either: diffusers is the faster peer there")
        plan["speed"]["patch_note"] = ("pixart_core with benchmarks/proposed_model.patch applied (same weights); "
                                       "timed where the patch changes the computation (" +
                                       ", ".join(plan["speed"].get("patch_dtypes", ())) + " on this CPU)")
    if a.depth:
        plan["speed"]["depth"] = a.depth
    if a.runs:
        plan["speed"]["runs"] = plan["kv"]["runs"] = a.runs
    name = a.name or f"{mode}-{device.type}"
    os.makedirs(RESULTS, exist_ok=True)
    t_start = time.perf_counter()
    previous = {}
    if a.merge and os.path.isfile(os.path.join(RESULTS, f"{name}.json")):
        with open(os.path.join(RESULTS, f"{name}.json")) as f:
            previous = {k: v for k, v in json.load(f).items() if k in SECTIONS}
    res = {"name": name, "mode": mode, "date": datetime.datetime.now().isoformat(timespec="seconds"),
           "command": "python -m benchmarks.run " + " ".join(sys.argv[1:] if argv is None else argv),
           "info": device_info(device, threads), "plan": plan, "load_start": load_average()}
    res.update({k: v for k, v in previous.items() if k not in a.sections})
    if previous:
        res["merged_from_earlier_runs"] = sorted(k for k in previous if k not in a.sections)
    print(f"PixArt benchmarks ({mode}) on {res['info'].get('gpu') or res['info']['cpu']}, {threads} threads, "
          f"torch {torch.__version__}; load average {res['load_start']}")

    def save():
        for sec in a.sections:
            if isinstance(res.get(sec), dict) and "finished" not in res[sec]:
                res[sec]["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
        res["elapsed_s"] = time.perf_counter() - t_start
        res["load_end"] = load_average()
        with open(os.path.join(RESULTS, f"{name}.json"), "w") as f:
            json.dump(res, f, indent=1, default=str)
        report.write(res, RESULTS)

    if "speed" in a.sections:
        from . import speed
        print(f"\n== denoiser step, depth {plan['speed']['depth']} ==")
        res["speed"] = speed.run(plan["speed"], device)
        save()
    if "kv" in a.sections:
        from . import kv
        print("\n== KV compression ==")
        res["kv"] = kv.run(plan["kv"], device)
        save()
    if "profile" in a.sections:
        from . import profile
        print("\n== profile (one step each, self time by kind) ==")
        res["profile"] = [{"px": px, "dtype": d, "split": profile.run(px, d, device, names, plan["speed"]["depth"])}
                          for px, d, names in plan["profile"]]
        save()
    if "memory" in a.sections:
        from . import memory
        print("\n== memory (fresh subprocess per case) ==")
        res["memory"] = memory.run(plan["memory"], device, threads)
        save()
    save()
    print(f"\nwrote {os.path.join(RESULTS, name + '.json')}, latest.md, kv_compression.png "
          f"in {res['elapsed_s'] / 60:.1f} min")


if __name__ == "__main__":
    main()
