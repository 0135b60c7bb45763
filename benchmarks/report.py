"""Markdown tables (latest.md), target verdicts with their reasons, and the KV-compression plot."""
from __future__ import annotations

import os

from .common import fmt_s

GiB = 2 ** 30
OURS, PATCHED = "pixart_core", "pixart_core+patch"
COMFY_SDPA = "comfy+sdpa"
IMPL_ORDER = (OURS, PATCHED, "diffusers", "comfy", COMFY_SDPA)
# The issue's two peers: diffusers, and ComfyUI's model as ComfyUI runs it on this device (its default
# attention). comfy+sdpa, the same model with an opt-in flag, is reported beside them.
ISSUE_PEERS = ("diffusers", "comfy")


def _pct(x):
    return "–" if x is None else f"{100 * x:.0f}%"


def _g(x):
    return f"{x / 1e9:.1f}"


def _check_name(key):
    return (key.replace("rel_err_patch_vs_current", f"{PATCHED} vs {OURS}")
            .replace("rel_err_patch_vs_", f"{PATCHED} vs ").replace("rel_err_vs_", f"{OURS} vs "))


def _impls(cells):
    seen = {n for c in cells for n in c["times"]}
    return [n for n in IMPL_ORDER if n in seen]


def _ours_names(cell):
    return [n for n in (OURS, PATCHED) if n in cell["times"]]


def _peers(cell):
    return [n for n in cell["times"] if not n.startswith("pixart_core")]


# ------------------------------------------------------------------------------------------ targets

def _attention_efficiency(res, px):
    """GFLOP/s of the self-attention kernel at px from the KV section (if measured)."""
    for c in (res.get("kv") or {}).get("cells", []):
        if c["px"] == px:
            a = c["attention"]
            return a["flops_off"] / a["times_s"]["sdpa_off"]
    return None


def _rate(res, c):
    """The matmul rate a speed cell's floor uses (timed in its own rounds; older results: the global one)."""
    if c.get("matmul_in_rounds"):
        return c["matmul_in_rounds"]["rate"]
    return ((res.get("speed") or {}).get("rates", {}).get(c["dtype"]) or {}).get("rate")


def _attention_time(res, px, dtype):
    """Seconds of the uncompressed self-attention core (batch 2) at px from the KV section, if measured
    there in `dtype` over every query."""
    kv = res.get("kv") or {}
    if kv.get("dtype") != dtype:
        return None
    for c in kv.get("cells", []):
        if c["px"] == px and c["attention"].get("q_fraction", 1.0) == 1.0:
            return c["attention"]["times_s"]["sdpa_off"]
    return None


def _profile_share(res, px, dtype, impl):
    for p in res.get("profile") or []:
        if p["px"] == px and p["dtype"] == dtype and impl in p["split"]:
            s = p["split"][impl]
            return {k: v / s["total"] for k, v in s.items() if k != "total"}
    return None


def _speed_rows(res, c, label, peers) -> list[dict]:
    """The ≥1.2x rows of one speed cell against the faster of `peers`, with the reason for a miss."""
    out = []
    sp = res.get("speed") or {}
    fast = min(peers, key=lambda n: c["times"][n]["median_s"])
    t_fast = c["times"][fast]["median_s"]
    ceiling = t_fast / c["floor_s"]
    fast_min = min(peers, key=lambda n: c["times"][n]["min_s"])
    for impl in _ours_names(c):
        r = t_fast / c["times"][impl]["median_s"]
        r_min = c["times"][fast_min]["min_s"] / c["times"][impl]["min_s"]
        ok = r >= 1.2
        why = ""
        if not ok:
            att = _attention_time(res, c["px"], c["dtype"])
            depth = sp.get("depth", 1)
            if ceiling < 1.2:
                why = (f"unreachable here: {fast} already runs at {_pct(c['floor_s'] / t_fast)} of the matmul floor, "
                       f"so even a step at 100% of the floor would be only {ceiling:.2f}x faster")
            elif att is not None and _rate(res, c):
                from .flops import attention_flops, cross_fold_saving
                rest = c["flops"] - depth * attention_flops(2, c["tokens"], c["tokens"])
                rest -= depth * cross_fold_saving(c["tokens"], sp.get("valid_tokens", 24))  # what ours does
                best = depth * att + rest / _rate(res, c)
                why = (f"self-attention runs in PyTorch's CPU flash-attention kernel in every implementation "
                       f"({fmt_s(att)} per block here, measured in the KV section); with it and every other FLOP at "
                       f"the GEMM rate a step takes at least {fmt_s(best)}, at most {t_fast / best:.2f}x faster than "
                       f"{fast}; {impl} is at {fmt_s(c['times'][impl]['median_s'])}")
            else:
                why = f"{impl} runs at {_pct(c['fraction_of_floor'][impl])} of the floor; {fast} at {_pct(c['floor_s'] / t_fast)}"
                sh = _profile_share(res, c["px"], c["dtype"], impl)
                if sh:
                    why += "; profile: " + ", ".join(f"{k} {_pct(v)}" for k, v in sorted(sh.items(), key=lambda kv: -kv[1]))
        out.append(dict(target=f"≥1.2x faster than {label} ({c['dtype']}, {c['px']} px)", impl=impl,
                         value=f"{r:.2f}x vs {fast} (fastest runs: {r_min:.2f}x vs {fast_min})", ok=ok, why=why))
    return out


def targets(res) -> list[dict]:
    rows = []
    sp = res.get("speed") or {}
    for c in sp.get("cells", []):
        if c["px"] not in (1024, 2048):
            continue
        groups = []
        issue_peers = [p for p in _peers(c) if p in ISSUE_PEERS]
        if issue_peers:
            groups.append(("the faster peer (diffusers, ComfyUI default)", issue_peers))
        if COMFY_SDPA in c["times"]:
            groups.append((f"{COMFY_SDPA} (beyond the target: ComfyUI's opt-in SDPA)", [COMFY_SDPA]))
        for label, peers in groups:
            rows.extend(_speed_rows(res, c, label, peers))
        # equality
        for impl, k in ((OURS, "rel_err_vs_diffusers"), (PATCHED, "rel_err_patch_vs_diffusers")):
            if k in c["checks"] and c["dtype"] == "fp32":
                e = c["checks"][k]
                rows.append(dict(target=f"output equals diffusers within 1e-5 relative ({c['dtype']}, {c['px']} px)",
                                 impl=impl, value=f"{e:.1e}", ok=e <= 1e-5, why=""))
        # floor
        if c["px"] == 1024:
            need = 0.85 if c["dtype"] == "fp32" else 0.70
            for impl in _ours_names(c):
                f = c["fraction_of_floor"][impl]
                ok = f >= need
                why = ""
                if not ok:
                    parts = []
                    eff = _attention_efficiency(res, 1024) if c["dtype"] == "fp32" else None
                    rate = _rate(res, c)
                    if eff and rate:
                        from .flops import block_flops
                        b = block_flops(c["tokens"], c["tokens"], 24)
                        parts.append(f"self-attention is {_pct(b['self_core'] / b['total'])} of a block's FLOPs and "
                                     f"PyTorch's CPU flash-attention kernel runs it at {_g(eff)} GFLOP/s, "
                                     f"{_pct(eff / rate)} of the GEMM rate")
                    sh = _profile_share(res, c["px"], c["dtype"], impl)
                    if sh:
                        parts.append("profile: " + ", ".join(f"{k} {_pct(v)}" for k, v in sorted(sh.items(), key=lambda kv: -kv[1])))
                    why = "; ".join(parts)
                value = _pct(f)
                if "fraction_of_fp32_floor" in c:
                    value += f" ({_pct(c['fraction_of_fp32_floor'][impl])} of the fp32 floor)"
                    if ok and f > 1:
                        why = (f"met only because this CPU's {c['dtype']} GEMMs are slow: {impl} runs them in fp32 "
                               f"(exact upcast) and so beats the {c['dtype']} floor; against the fp32 floor see the "
                               "bracket")
                rows.append(dict(target=f"≥{_pct(need)} of the matmul floor ({c['dtype']}, 1024 px)", impl=impl,
                                 value=value, ok=ok, why=why))
    for c in (res.get("kv") or {}).get("cells", []):
        if c["px"] != 2048 or "blocks" not in c:
            continue
        b = c["blocks"]
        fr = b["flop_ratio"]["14-27"]
        for mode in ("avgpool", "conv"):
            s = b["speedup"][f"14-27 {mode}"]
            dev = s / fr - 1
            ok = abs(dev) <= 0.10
            why = ""
            if not ok:
                a = c["attention"]
                why = (f"attention alone speeds up {a['speedup']:.2f}x for a {a['flop_ratio']:.0f}x FLOP cut; "
                       f"the {mode} compression itself costs {fmt_s(a['times_s']['compress_' + mode])} per block")
            rows.append(dict(target="KV compression 14–27 at 2048 px: step speed-up within 10% of the FLOP ratio",
                             impl=f"pixart_core ({mode})", value=f"{s:.2f}x vs FLOP ratio {fr:.2f}x ({dev:+.0%})",
                             ok=ok, why=why))
    for r in ((res.get("memory") or {}).get("cases") or []):
        if r.get("px") == 4096 and r.get("kv") in ("deep", "all") and "peak" in r:
            ok = r["peak"] <= 16 * GiB
            rows.append(dict(target=f"4096-px step of the full-size model fits in 16 GiB (compression {r['kv']}, {r['dtype']})",
                             impl=r.get("package", OURS), value=f"{r['peak'] / GiB:.2f} GiB", ok=ok,
                             why="" if ok else "see the memory table"))
    return rows


# ------------------------------------------------------------------------------------------ markdown

def markdown(res) -> str:
    info = res["info"]
    L = []
    L.append(f"# PixArt benchmarks — {res['mode']} ({res['date']})\n")
    L.append(f"`{res['command']}` · {res.get('elapsed_s', 0) / 60:.1f} min · results/{res['name']}.json\n")
    if res.get("merged_from_earlier_runs"):
        L.append(f"(sections {', '.join(res['merged_from_earlier_runs'])} come from earlier runs with --merge; "
                 "see the json for their dates)\n")
    hw = info.get("gpu") or info["cpu"]
    flags = ", ".join(f"{k}={'yes' if v else 'no'}" for k, v in info.get("cpu_flags", {}).items())
    L.append(f"- device: **{info['device']}** — {hw}; {info['logical_cpus']} logical / {info['physical_cores']} "
             f"physical cores, {info['ram_gb']} GiB RAM")
    L.append(f"- torch {info['torch']} ({info['torch_cpu_capability']}, BLAS {info['blas']}), "
             f"{info['threads']} threads for every implementation; diffusers {info['diffusers']}, "
             f"transformers {info['transformers']}, ComfyUI 0.3.75")
    L.append(f"- CPU flags: {flags}; oneDNN bf16 GEMMs: {'yes' if info.get('onednn_bf16_gemm') else 'no'}")
    L.append(f"- load average at start {res.get('load_start')}, end {res.get('load_end')} "
             "(other processes on a shared machine inflate wall times; runs are interleaved so they hit all "
             "implementations alike)\n")

    sp = res.get("speed")
    if sp:
        d = sp["depth"]
        L.append(f"## Denoiser step\n")
        L.append(f"One step, batch {sp['batch']} (CFG), captions {sp['seq_len']} tokens of which {sp['valid_tokens']} valid "
                 f"per sample (pixart_core and diffusers get the mask; ComfyUI's model takes no mask and gets the "
                 f"{sp['valid_tokens']} unpadded tokens). **Reduced depth: {d} of 28 blocks at the real width 1152** "
                 f"(the per-step figure scales linearly with depth). Same random weights in all. Median of the "
                 "interleaved runs (column `runs`) after a warm-up; "
                 "in brackets the fraction of the matmul floor (step FLOPs ÷ this machine's matmul rate, "
                 "formula in benchmarks/flops.py).\n")
        for k, v in sp.get("notes", {}).items():
            L.append(f"- `{k}`: {v}")
        if sp.get("skip_note"):
            L.append(f"- –: {sp['skip_note']}")
        if any(n == PATCHED for c in sp["cells"] for n in c["times"]):
            L.append(f"- `{PATCHED}`: " + sp.get("patch_note", "pixart_core with benchmarks/proposed_model.patch "
                                                             "applied (same weights)"))
        L.append("")
        rates = sp.get("rates", {})
        L.append("| matmul rate | a @ b.T (nn.Linear layout) | a @ b | used for the floor |")
        L.append("|---|---|---|---|")
        for dn, r in rates.items():
            b, a = r["before"], r["after"]
            L.append(f"| {dn} (n={b['n']}) | {_g(b['a@b.T'])} / {_g(a['a@b.T'])} GFLOP/s | "
                     f"{_g(b['a@b'])} / {_g(a['a@b'])} GFLOP/s | {_g(r['rate'])} GFLOP/s |")
        L.append("\n(before / after the step cells; each cell's floor uses the same square matmul timed inside its "
                 "own interleaved rounds, column `matmul`, so it sees the same machine state as the steps)\n")
        impls = _impls(sp["cells"])
        for dn in dict.fromkeys(c["dtype"] for c in sp["cells"]):
            cells = [c for c in sp["cells"] if c["dtype"] == dn]
            L.append(f"### {dn}\n")
            L.append("| px | tokens | GFLOP | matmul | floor | runs | " + " | ".join(impls) + " |")
            L.append("|---|---|---|---|---|---|" + "---|" * len(impls))
            for c in cells:
                mm = c.get("matmul_in_rounds")
                row = [str(c["px"]), str(c["tokens"]), f"{c['flops'] / 1e9:.0f}",
                       f"{_g(mm['rate'])} GFLOP/s" if mm else "–", fmt_s(c["floor_s"]), str(c["times"][OURS]["runs"])]
                for n in impls:
                    t = c["times"].get(n)
                    row.append("–" if t is None else f"{fmt_s(t['median_s'])} ({_pct(c['fraction_of_floor'][n])})")
                L.append("| " + " | ".join(row) + " |")
            L.append("")
            here = _impls(cells)
            cols = [(o, p) for o in (OURS, PATCHED) if o in here for p in here if not p.startswith("pixart_core")]
            L.append("| px | " + " | ".join(f"{o} vs {p}" for o, p in cols) + " |")
            L.append("|---|" + "---|" * len(cols))
            for c in cells:
                row = [str(c["px"])]
                for o, p in cols:
                    if o in c["times"] and p in c["times"]:
                        row.append(f"{c['times'][p]['median_s'] / c['times'][o]['median_s']:.2f}x "
                                   f"({c['times'][p]['min_s'] / c['times'][o]['min_s']:.2f}x)")
                    else:
                        row.append("–")
                L.append("| " + " | ".join(row) + " |")
            L.append("\n(speed-up = peer median ÷ ours, in brackets the same from the fastest run of each; >1 means "
                     "ours is faster. Other processes only ever add time, so the min-based ratio is the less noisy "
                     "one on a shared machine.)\n")
            keys = list(dict.fromkeys(k for c in cells for k in c["checks"]))
            L.append("| px | " + " | ".join(_check_name(k) for k in keys) + " |")
            L.append("|---|" + "---|" * len(keys))
            for c in cells:
                L.append(f"| {c['px']} | " + " | ".join(f"{c['checks'][k]:.1e}" if k in c["checks"] else "–"
                                                       for k in keys) + " |")
            L.append("\n(relative L2 error of the outputs on the same inputs; ComfyUI returns ε only, compared on "
                     "those 4 channels)\n")
            if dn != "fp32" and "fp32" in rates:
                L.append(f"On this CPU the {dn} matmul rate is {_g(rates[dn]['rate'])} GFLOP/s against "
                         f"{_g(rates['fp32']['rate'])} GFLOP/s in fp32; as a fraction of the *fp32* floor: " +
                         ", ".join(f"{c['px']} px " + "/".join(f"{n} {_pct(v)}" for n, v in c.get('fraction_of_fp32_floor', {}).items())
                                   for c in cells) + "\n")

    rows = targets(res)
    if rows:
        L.append("## Targets\n")
        L.append("| target | implementation | measured | verdict | reason when missed |")
        L.append("|---|---|---|---|---|")
        for r in rows:
            L.append(f"| {r['target']} | {r['impl']} | {r['value']} | {'met' if r['ok'] else '**missed**'} | {r['why']} |")
        L.append("")

    kv = res.get("kv")
    if kv:
        L.append(f"## KV compression ({kv['dtype']}, pixart_core, ratio 2)\n")
        L.append("Self-attention core alone (SDPA, 16 heads × 72, batch 2) with keys/values at N and N/4, and the "
                 "compression op on K and V:\n")
        L.append("| px | N | N' | SDPA off | SDPA on | speed-up | FLOP ratio | avg-pool K,V | conv+LN K,V | note |")
        L.append("|---|---|---|---|---|---|---|---|---|---|")
        for c in kv["cells"]:
            a = c["attention"]
            t = a["times_s"]
            note = (f"SDPA timed on {a['q_fraction']:.3g} of the queries and scaled (cost is linear in queries)"
                    if a["extrapolated"] else "")
            L.append(f"| {c['px']} | {c['tokens']} | {c['kv_tokens']} | {fmt_s(t['sdpa_off'])} | {fmt_s(t['sdpa_on'])} | "
                     f"{a['speedup']:.2f}x | {a['flop_ratio']:.1f}x | {fmt_s(t['compress_avgpool'])} | "
                     f"{fmt_s(t['compress_conv'])} | {note} |")
        L.append("")
        blk = [c for c in kv["cells"] if "blocks" in c]
        if blk:
            L.append("Whole step. Measured: E = embedding/caption/final work (a depth-0 model) and one block of each "
                     "kind (depth-1 models); the 28-layer step is assembled as E + Σ blocks:\n")
            L.append("| px | E | block off | block avgpool | block conv | step off (28) | step 14–27 avgpool | "
                     "step all avgpool | speed-up 14–27 (FLOP ratio) | speed-up all (FLOP ratio) | 14–27 conv | all conv |")
            L.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
            for c in blk:
                b = c["blocks"]
                s, bs = b["step28_s"], b["block_s"]
                note = " (one block of each kind, 1 run)" if b["raw"]["block_off"]["runs"] == 1 else ""
                L.append(f"| {c['px']}{note} | {fmt_s(b['overhead_s'])} | {fmt_s(bs['off'])} | {fmt_s(bs['avgpool'])} | "
                         f"{fmt_s(bs['conv'])} | {fmt_s(s['off'])} | {fmt_s(s['14-27 avgpool'])} | {fmt_s(s['all avgpool'])} | "
                         f"{b['speedup']['14-27 avgpool']:.2f}x ({b['flop_ratio']['14-27']:.2f}x) | "
                         f"{b['speedup']['all avgpool']:.2f}x ({b['flop_ratio']['all']:.2f}x) | "
                         f"{b['speedup']['14-27 conv']:.2f}x | {b['speedup']['all conv']:.2f}x |")
            L.append("")
        L.append("![KV compression](kv_compression.png)\n")

    prof = res.get("profile")
    if prof:
        L.append("## Where the time goes (torch.profiler, one step, self time by kind)\n")
        kinds = ("gemm", "attention", "copy/cast", "norm/modulate/act", "other")
        L.append("| step | implementation | total | " + " | ".join(kinds) + " |")
        L.append("|---|---|---|" + "---|" * len(kinds))
        for p in prof:
            for n, s in p["split"].items():
                L.append(f"| {p['px']} px {p['dtype']} | {n} | {fmt_s(s['total'])} | " +
                         " | ".join(f"{fmt_s(s.get(k, 0))} ({_pct(s.get(k, 0) / s['total'])})" for k in kinds) + " |")
        L.append("\n(CPU self time summed over threads' wall time as the profiler reports it; the profiler adds overhead, "
                 "so totals exceed the timed steps)\n")

    mem = res.get("memory")
    if mem:
        L.append(f"## Memory (each case in a fresh subprocess)\n")
        L.append("Full-size model: all 28 blocks' weights resident (610.9M parameters); the step runs the blocks "
                 "listed (one of each kind present: inference keeps nothing from one block to the next but the "
                 "residual stream, so this is the 28-block peak" +
                 (", checked below" if mem.get("validation") else "") + "). Peak = process resident set "
                 "(ru_maxrss when the step set it, else a 1-ms sampler) on CPU, max_memory_allocated on CUDA.\n")
        L.append("| px | compression | dtype | model | blocks run | weights | RSS after build | peak | peak − after build | step time |")
        L.append("|---|---|---|---|---|---|---|---|---|---|")
        for r in mem["cases"]:
            if "error" in r:
                L.append(f"| ? | ? | | | | | | failed: {r['error'][-120:]!r} | | |")
                continue
            kvname = {"off": "off", "deep": "14–27", "all": "all"}[r["kv"]]
            L.append(f"| {r['px']} | {kvname} | {r['dtype']} | {r['package']} | {','.join(map(str, r['blocks_run'])) if len(r['blocks_run']) < 28 else 'all 28'} | "
                     f"{r['weight_bytes'] / GiB:.2f} GiB | {r['rss_weights'] / GiB:.2f} GiB | **{r['peak'] / GiB:.2f} GiB** | "
                     f"{(r['peak'] - r['rss_weights']) / GiB:.2f} GiB | {fmt_s(r['step_wall_s'])} |")
        for r in mem["cases"]:
            if "block_params" in r:
                L.append(f"\nPer block: {r['block_params'] / 1e6:.1f}M parameters = {r['block_bytes'] / 2**20:.0f} MiB in "
                         f"{r['dtype']} (all 28 blocks have the same shapes; KV-compression conv weights, when present, "
                         "add 8k each); a step's activation peak is one block's and does not grow with depth.")
                break
        v = mem.get("validation")
        if v and "peak" in v.get("two_blocks", {}) and "peak" in v.get("all_blocks", {}):
            a, b = v["two_blocks"], v["all_blocks"]
            L.append(f"\nValidation at {a['px']} px, compression 14–27: 2 blocks run {a['peak'] / GiB:.3f} GiB, all 28 run "
                     f"{b['peak'] / GiB:.3f} GiB ({(a['peak'] / b['peak'] - 1):+.1%}).")
        if mem.get("t5"):
            L.append("\nT5-XXL-shaped encoder (transformers T5EncoderModel, v1.1 gated-GELU, d_model 4096, d_ff 10240, "
                     "64 heads × 64), bf16, 1 prompt × 300 tokens:\n")
            L.append("| layers | params | weights | peak | encode time | full XXL (24 layers, 4.76B) |")
            L.append("|---|---|---|---|---|---|")
            for r in mem["t5"]:
                if "error" in r:
                    L.append(f"| failed | {r['error'][-120:]!r} | | | | |")
                    continue
                full = ("measured: this row" if not r.get("stand_in") else
                        f"estimated {r['xxl_peak_estimate'] / GiB:.2f} GiB (stand-in peak − its weights + 4.76B × 2 B)")
                L.append(f"| {r['config']['num_layers']} | {r['params'] / 1e9:.2f}B | {r['weight_bytes'] / GiB:.2f} GiB | "
                         f"**{r['peak'] / GiB:.2f} GiB** | {fmt_s(r['encode_wall_s'])} | {full} |")
        L.append("")
    return "\n".join(L) + "\n"


# ------------------------------------------------------------------------------------------ plot

def plot(res, path) -> bool:
    kv = res.get("kv")
    if not kv:
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cells = kv["cells"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    ax = axes[0]
    N = [c["tokens"] for c in cells]
    off = [c["attention"]["times_s"]["sdpa_off"] for c in cells]
    on = [c["attention"]["times_s"]["sdpa_on"] for c in cells]
    ax.loglog(N, off, "o-", label="self-attention, no compression")
    ax.loglog(N, on, "s-", label="self-attention, KV 2×2 compressed")
    ax.loglog(N, [o / 4 for o in off], ":", color="gray", label="no compression ÷ 4 (FLOP ratio)")
    for c, o in zip(cells, off):
        if c["attention"]["extrapolated"]:
            ax.annotate("scaled from a query slice", (c["tokens"], o), fontsize=7, textcoords="offset points", xytext=(-60, 8))
    ax.set_xlabel("image tokens N (1024 / 2048 / 4096 px)")
    ax.set_ylabel("seconds")
    ax.set_title(f"attention core, batch 2, {kv['dtype']}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax = axes[1]
    blk = [c for c in cells if "blocks" in c]
    if blk:
        N = [c["tokens"] for c in blk]
        for key, style, label in (("off", "o-", "no compression"), ("14-27 avgpool", "s-", "layers 14–27 (avgpool)"),
                                  ("all avgpool", "^-", "all layers (avgpool)"), ("14-27 conv", "x--", "layers 14–27 (conv)")):
            ax.loglog(N, [c["blocks"]["step28_s"][key] for c in blk], style, label=label)
        ax.set_xlabel("image tokens N")
        ax.set_ylabel("seconds per 28-layer step (assembled from per-block timings)")
        ax.set_title("whole step")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    else:
        ax.axis("off")
        ax.text(0.5, 0.5, "step timings: see --full", ha="center")
    hw = res["info"].get("gpu") or res["info"]["cpu"]
    fig.suptitle(f"PixArt-Σ KV compression — {hw}, {res['info']['threads']} threads ({res['mode']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write(res, folder):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "latest.md"), "w") as f:
        f.write(markdown(res))
    plot(res, os.path.join(folder, "kv_compression.png"))
