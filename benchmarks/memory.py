"""Peak memory of one denoiser step of the full-size model, and of T5-XXL-shaped encoding.

Each case runs in a fresh subprocess (`python -m benchmarks.memory ...`) so peaks don't mix. On
CPU the peak is the process's resident set: ru_maxrss, plus a 1-ms psutil sampler for the step
alone; on CUDA, torch.cuda.max_memory_allocated.

The denoiser child builds all 28 blocks of the real model (611M parameters, resident), then runs a
step that executes `run_blocks` of them (all 28 where time allows). Inference keeps no activation
from one block to the next except the (B, N, D) residual stream, so the peak of a step is the
weights plus the largest single block's working set: running one block of each kind present
(uncompressed, compressed) gives the 28-block peak. `--validate` runs both ways at a small size.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------------- measuring

class PeakRSS:
    """Samples this process's RSS every `interval` s in a thread while active."""

    def __init__(self, interval=0.001):
        import psutil
        self.proc, self.interval, self.peak, self._stop = psutil.Process(), interval, 0, threading.Event()

    def __enter__(self):
        self.peak = self.proc.memory_info().rss
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def rss() -> int:
    import psutil
    return psutil.Process().memory_info().rss


def maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


# ------------------------------------------------------------------------------------- children

def child_denoiser(a) -> dict:
    import torch
    sys.path.insert(0, REPO)
    torch.set_num_threads(a.threads)
    from benchmarks import peers, proposed
    from benchmarks.common import DTYPES, pick_device, sync
    device = pick_device(a.device)
    dtype = DTYPES[a.dtype]
    package = "pixart_core"
    if a.patched:
        package = proposed.available()
        if package is None:
            return {"error": "proposed_model.patch does not apply"}
    import importlib
    KVCompress = importlib.import_module(package).KVCompress
    base = {"rss_start": rss()}
    sample = min(max(a.px // 8, 64), 256)
    model = peers.ours(28, dtype, device, sample_size=sample, package=package)
    n_params = sum(p.numel() for p in model.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters()) + \
        sum(b.numel() * b.element_size() for b in model.buffers())
    base["block_params"] = sum(p.numel() for p in model.blocks[0].parameters())
    base["block_bytes"] = sum(p.numel() * p.element_size() for p in model.blocks[0].parameters())
    sync(device)
    base.update(rss_weights=rss(), maxrss_build=maxrss())
    # which blocks run, and which of those compress
    if a.run_blocks >= 28:
        idx = list(range(28))
    elif a.kv == "deep":
        idx = [0, 27][:max(a.run_blocks, 2)]
    else:
        idx = [0]
    compressed = {"off": set(), "deep": set(range(14, 28)), "all": set(range(28))}[a.kv]
    layers = tuple(j for j, i in enumerate(idx) if i in compressed)
    full_blocks = model.blocks
    model.blocks = torch.nn.ModuleList(full_blocks[i] for i in idx)  # the rest stay resident
    kv = KVCompress(layers=layers, ratio=2, mode=a.mode)
    if a.ff_chunk:
        model.ff_chunk = a.ff_chunk
    x, t, y, mask = peers.inputs(a.px, dtype, device)
    base["rss_inputs"] = rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base["cuda_allocated_before"] = torch.cuda.memory_allocated(device)
    t0 = time.perf_counter()
    with torch.inference_mode(), PeakRSS() as peak:
        out = model(x, t, y, mask, kv_compress=kv)
        sync(device)
    wall = time.perf_counter() - t0
    res = dict(base, px=a.px, kv=a.kv, mode=a.mode, dtype=a.dtype, package=package, run_blocks=len(idx),
               blocks_run=idx, compressed_run=[idx[j] for j in layers], params=n_params, weight_bytes=weight_bytes,
               rss_peak_step=peak.peak, maxrss=maxrss(), step_wall_s=wall, out_shape=list(out.shape),
               ff_chunk=a.ff_chunk)
    if device.type == "cuda":
        res["cuda_peak"] = torch.cuda.max_memory_allocated(device)
    res["peak"] = res.get("cuda_peak") or _step_peak(res)
    return res


def _step_peak(res):
    """ru_maxrss is exact but covers the whole process: use it when the step set it (it grew past
    the build's peak), else the sampled step peak."""
    return res["maxrss"] if res["maxrss"] > res["maxrss_build"] else res["rss_peak_step"]


T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              relative_attention_num_buckets=32, relative_attention_max_distance=128,
              feed_forward_proj="gated-gelu", is_encoder_decoder=False, tie_word_embeddings=False)


def child_t5(a) -> dict:
    import torch
    torch.set_num_threads(a.threads)
    sys.path.insert(0, REPO)
    from transformers import T5Config, T5EncoderModel
    from benchmarks.common import DTYPES, pick_device, sync
    device = pick_device(a.device)
    dtype = DTYPES[a.dtype]
    cfg = dict(T5_XXL, num_layers=a.layers, d_model=a.d_model, d_ff=a.d_ff)
    if a.d_model != T5_XXL["d_model"]:
        cfg["num_heads"] = max(1, a.d_model // 64)
    base = {"rss_start": rss()}
    with torch.device("meta"):
        model = T5EncoderModel(T5Config(**cfg))
        xxl = T5EncoderModel(T5Config(**T5_XXL))
    xxl_params = sum(p.numel() for p in xxl.parameters())
    model = model.to(dtype).to_empty(device=device)
    g = torch.Generator(device="cpu").manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_((torch.randn(p.shape, generator=g, dtype=torch.float32) * (p.shape[-1] ** -0.5)).to(dtype))
    model.eval()
    n = sum(p.numel() for p in model.parameters())
    sync(device)
    base.update(rss_weights=rss(), maxrss_build=maxrss())
    ids = torch.randint(0, cfg["vocab_size"], (a.batch, a.tokens), generator=g).to(device)
    mask = torch.ones_like(ids)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    with torch.inference_mode(), PeakRSS() as peak:
        out = model(input_ids=ids, attention_mask=mask).last_hidden_state
        sync(device)
    wall = time.perf_counter() - t0
    res = dict(base, config=cfg, params=n, xxl_params=xxl_params, weight_bytes=n * torch.finfo(dtype).bits // 8,
               dtype=a.dtype, tokens=a.tokens, batch=a.batch, rss_peak_step=peak.peak, maxrss=maxrss(),
               encode_wall_s=wall, out_shape=list(out.shape))
    if device.type == "cuda":
        res["cuda_peak"] = torch.cuda.max_memory_allocated(device)
    res["peak"] = res.get("cuda_peak") or _step_peak(res)
    return res


# ------------------------------------------------------------------------------------- parent side

def spawn(args: list[str], threads: int, device: str, timeout=3600) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.memory", *args, "--threads", str(threads), "--device", device]
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=timeout)
    lines = [l for l in r.stdout.strip().splitlines() if l.startswith("{")]
    if r.returncode != 0 or not lines:
        return {"error": (r.stderr or r.stdout)[-1500:], "returncode": r.returncode, "cmd": " ".join(cmd)}
    res = json.loads(lines[-1])
    res["child_wall_s"] = time.perf_counter() - t0
    return res


def run(plan: dict, device, threads: int, log=print) -> dict:
    """plan: dtype, cases: [(px, kv, run_blocks, patched[, dtype])], t5: [dict(layers, d_model, d_ff)], validate: px|None."""
    from benchmarks import proposed
    out = {"dtype": plan["dtype"], "cases": [], "t5": [], "validation": None}
    dev = str(device)
    for case in plan["cases"]:
        px, kvmode, run_blocks, patched = case[:4]
        dtype = case[4] if len(case) > 4 else plan["dtype"]
        if patched and not proposed.available():
            log(f"  memory {px} px, compression {kvmode}, {dtype} (patched): skipped, no proposed_model.patch applies")
            continue
        log(f"  memory {px} px, compression {kvmode}, {dtype}{' (patched)' if patched else ''}: "
            f"28 blocks resident, {run_blocks} run")
        args = ["denoiser", "--px", str(px), "--kv", kvmode, "--run-blocks", str(run_blocks), "--dtype", dtype]
        if patched:
            args.append("--patched")
        r = spawn(args, threads, dev)
        log(_line(r))
        out["cases"].append(r)
    if plan.get("validate"):
        px = plan["validate"]
        log(f"  memory validation at {px} px: a 2-block step vs the real 28-block step (compression 14–27)")
        a = spawn(["denoiser", "--px", str(px), "--kv", "deep", "--run-blocks", "2", "--dtype", plan["dtype"]], threads, dev)
        b = spawn(["denoiser", "--px", str(px), "--kv", "deep", "--run-blocks", "28", "--dtype", plan["dtype"]], threads, dev)
        out["validation"] = {"two_blocks": a, "all_blocks": b}
        log(_line(a))
        log(_line(b))
    for t5 in plan.get("t5", []):
        log(f"  T5 encoder {t5} bf16, 1 x 300 tokens")
        args = ["t5", "--layers", str(t5["layers"]), "--d-model", str(t5["d_model"]), "--d-ff", str(t5["d_ff"]),
                "--dtype", "bf16"]
        r = spawn(args, threads, dev)
        if "error" not in r:
            full = r["xxl_params"]
            r["xxl_weight_bytes"] = full * 2
            r["stand_in"] = r["params"] != full
            # activations of an encoder pass are a few (tokens x d_ff) tensors, independent of depth
            r["xxl_peak_estimate"] = r["peak"] - r["weight_bytes"] + full * 2
            log(f"    peak {r['peak'] / 2**30:.2f} GiB for {r['params'] / 1e9:.2f}B params; "
                f"full XXL estimate {r['xxl_peak_estimate'] / 2**30:.2f} GiB")
        else:
            log(f"    failed: {r['error'][-300:]}")
        out["t5"].append(r)
    return out


def _line(r: dict) -> str:
    if "error" in r:
        return f"    failed: {r['error'][-400:]}"
    return (f"    peak {r['peak'] / 2**30:.2f} GiB (weights {r['weight_bytes'] / 2**30:.2f} GiB, after build "
            f"{r['rss_weights'] / 2**30:.2f} GiB), step {r['step_wall_s']:.1f} s")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="what", required=True)
    d = sub.add_parser("denoiser")
    d.add_argument("--px", type=int, required=True)
    d.add_argument("--kv", choices=("off", "deep", "all"), default="off")
    d.add_argument("--mode", default="avgpool")
    d.add_argument("--run-blocks", type=int, default=2)
    d.add_argument("--ff-chunk", type=int, default=None)
    d.add_argument("--patched", action="store_true")
    t = sub.add_parser("t5")
    t.add_argument("--layers", type=int, default=2)
    t.add_argument("--d-model", type=int, default=4096)
    t.add_argument("--d-ff", type=int, default=10240)
    t.add_argument("--tokens", type=int, default=300)
    t.add_argument("--batch", type=int, default=1)
    for s in (d, t):
        s.add_argument("--dtype", default="fp32")
        s.add_argument("--threads", type=int, default=2)
        s.add_argument("--device", default=None)
    a = p.parse_args(argv)
    res = child_denoiser(a) if a.what == "denoiser" else child_t5(a)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
