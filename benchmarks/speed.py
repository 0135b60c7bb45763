"""Denoiser step: pixart_core vs diffusers vs ComfyUI, same weights, same inputs, interleaved."""
from __future__ import annotations

import gc


from . import flops, peers, proposed
from .common import DTYPES, interleaved, load_average, matmul_case, matmul_rate

OURS, PATCHED, DIFFUSERS, COMFY, COMFY_SDPA = "pixart_core", "pixart_core+patch", "diffusers", "comfy", "comfy+sdpa"
MATMUL = "matmul (floor rate)"


def native_sample_size(px: int) -> int:
    """Latent size of the released model for this resolution (512 -> 64, 1024 -> 128, 2048 -> 256;
    no 4K model exists, the 2K one is used). At its native size ComfyUI's position embedding equals
    the reference's, so all three implementations compute the same function."""
    return min(max(px // 8, 64), 256)


def build(depth, dtype, device, px=1024, with_comfy=True, with_patch=True, log=print):
    """The implementations for one cell. `with_patch` adds pixart_core+patch when the patch applies."""
    models = {OURS: peers.ours(depth, dtype, device, sample_size=native_sample_size(px))}
    if with_patch and proposed.available():
        models[PATCHED] = peers.ours(depth, dtype, device, sample_size=native_sample_size(px), package=proposed.NAME)
    models[DIFFUSERS] = peers.diffusers_twin(models[OURS])
    notes = {}
    if with_comfy and peers.import_comfy(device):
        twin = peers.comfy_twin(models[OURS])
        models[COMFY] = twin
        default = peers.comfy_default_attention()
        notes[COMFY] = f"ComfyUI's default attention on this device: {default}"
        if default != "attention_pytorch":
            models[COMFY_SDPA] = peers.ComfyWithAttention(twin, peers.comfy_pytorch_attention())
            notes[COMFY_SDPA] = "the same model with attention_pytorch (what --use-pytorch-cross-attention selects)"
    for k, v in notes.items():
        log(f"  {k}: {v}")
    return models, notes


def run(plan: dict, device, log=print) -> dict:
    """plan: depth, warmup, runs, cells: [(dtype_name, px, [impl names or None for all][, runs])]."""
    depth = plan["depth"]
    results = {"depth": depth, "valid_tokens": peers.VALID, "seq_len": peers.SEQ_LEN, "batch": peers.BATCH,
               "cells": [], "rates": {}, "notes": {}, "skip_note": plan.get("skip_note"),
               "patch_note": plan.get("patch_note")}
    by_dtype = {}
    for cell in plan["cells"]:
        dname, px, only = cell[:3]
        by_dtype.setdefault(dname, []).append((px, only, cell[3] if len(cell) > 3 else plan["runs"]))
    for dname, cells in by_dtype.items():
        dtype = DTYPES[dname]
        rate = matmul_rate(dtype, device)
        log(f"  matmul rate {dname}: a@b.T {rate['a@b.T'] / 1e9:.1f} GFLOP/s, a@b {rate['a@b'] / 1e9:.1f} GFLOP/s")
        for px, only, runs in cells:
            models, notes = build(depth, dtype, device, px, with_patch=dname in plan.get("patch_dtypes", DTYPES),
                                  log=lambda *a: None)
            results["notes"].update(notes)
            names = [n for n in models if only is None or n in only]
            log(f"  step {px} px {dname} (depth {depth}): {', '.join(names)}   load {load_average()}")
            fns = peers.calls({n: models[n] for n in names}, px, dtype, device)
            layout = "a@b.T" if rate["a@b.T"] >= rate["a@b"] else "a@b"
            fns[MATMUL], mm_flops, _ = matmul_case(dtype, device, layout)  # the floor's rate, in the same rounds
            outs = {}

            def keep(name, out):
                if name != MATMUL:
                    outs[name] = out.detach().float().cpu()

            times = interleaved(fns, device, plan["warmup"], runs, on_output=keep, log=log)
            mm = times.pop(MATMUL)
            in_rounds = {"layout": layout, "rate": mm_flops / mm["median_s"], "rate_best": mm_flops / mm["min_s"]}
            checks = {}
            if PATCHED in outs and DIFFUSERS in outs:
                checks["rel_err_patch_vs_diffusers"] = peers.rel_err(outs[PATCHED], outs[DIFFUSERS])
            if PATCHED in outs:
                checks["rel_err_patch_vs_current"] = peers.rel_err(outs[PATCHED], outs[OURS])
            if DIFFUSERS in outs:
                checks["rel_err_vs_diffusers"] = peers.rel_err(outs[OURS], outs[DIFFUSERS])
            for c in (COMFY, COMFY_SDPA):
                if c in outs:  # ComfyUI returns ε only (the first 4 channels)
                    checks[f"rel_err_vs_{c}"] = peers.rel_err(outs[OURS][:, :4], outs[c])
            L = peers.VALID  # useful caption tokens: what the floor counts
            f = flops.step_flops(px, L, depth)
            cell = {"dtype": dname, "px": px, "tokens": (px // 16) ** 2, "times": times, "checks": checks,
                    "flops": f, "load_after": load_average(), "matmul_in_rounds": in_rounds}
            results["cells"].append(cell)
            log("    " + "  ".join(f"{k}={v:.2e}" for k, v in checks.items()))
            del fns, outs, models
            gc.collect()
        rate2 = matmul_rate(dtype, device)  # again after the cells: the floor uses the better
        results["rates"][dname] = {"before": rate, "after": rate2,
                                   "rate": max(rate["rate"], rate2["rate"])}
    for cell in results["cells"]:
        # the rate timed in the same interleaved rounds as the steps (median, like theirs)
        rate = cell["matmul_in_rounds"]["rate"]
        cell["floor_s"] = cell["flops"] / rate
        t_ours = cell["times"][OURS]["median_s"]
        cell["fraction_of_floor"] = {n: cell["floor_s"] / t["median_s"] for n, t in cell["times"].items()}
        cell["speedup_vs"] = {n: t["median_s"] / t_ours for n, t in cell["times"].items() if n != OURS}
        if "fp32" in results["rates"] and cell["dtype"] != "fp32":
            fp32_rate = max([c["matmul_in_rounds"]["rate"] for c in results["cells"] if c["dtype"] == "fp32"] or
                            [results["rates"]["fp32"]["rate"]])
            cell["fraction_of_fp32_floor"] = {n: cell["flops"] / fp32_rate / t["median_s"]
                                              for n, t in cell["times"].items()}
    return results
