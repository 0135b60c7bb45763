"""Where a step's time goes: torch.profiler over one step of each implementation, by op and by kind.

`python -m benchmarks.profile --px 1024 --dtype fp32` prints the op tables; run.py calls
`run()` and keeps the per-kind split for latest.md.
"""
from __future__ import annotations

import argparse
import gc

import torch

from . import peers, speed
from .common import DTYPES, pick_device

KINDS = (  # first match wins; aten op names
    ("attention", ("scaled_dot_product", "flash_attention", "_efficient_attention", "softmax", "baddbmm")),
    ("gemm", ("addmm", "aten::mm", "aten::bmm", "matmul", "linear", "convolution", "conv2d", "_slow_conv2d")),
    ("copy/cast", ("copy_", "contiguous", "clone", "to_copy", "cat", "stack")),
    ("norm/modulate/act", ("layer_norm", "gelu", "addcmul", "silu", "aten::mul", "aten::add", "aten::div",
                           "aten::sub", "rsqrt", "tanh", "masked", "where", "exp", "sin", "cos")),
)


def kind(name: str) -> str:
    for k, keys in KINDS:
        if any(key in name for key in keys):
            return k
    return "other"


def profile_step(fn):
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with torch.inference_mode():
        fn()
        with profile(activities=acts, record_shapes=True) as p:
            fn()
    return p


def split(p) -> dict:
    """Self time per kind (CPU self time on CPU, device time on CUDA), in seconds."""
    cuda = torch.cuda.is_available()
    out = {}
    for e in p.key_averages():
        t = (getattr(e, "self_device_time_total", 0) if cuda else e.self_cpu_time_total) / 1e6
        if t:
            out[kind(e.key)] = out.get(kind(e.key), 0.0) + t
    out["total"] = sum(out.values())
    return out


_OPS_FILE = {"opened": False}


def _save_ops(text: str, path=None):
    """Appends op tables to benchmarks/results/profile_ops.txt (truncated at this process's first call)."""
    import os
    path = path or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "profile_ops.txt")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a" if _OPS_FILE["opened"] else "w") as f:
        f.write(text + "\n")
    _OPS_FILE["opened"] = True


def run(px: int, dtype_name: str, device, names=None, depth=1, log=print, table_rows=0, save_rows=15) -> dict:
    dtype = DTYPES[dtype_name]
    models, _ = speed.build(depth, dtype, device, px, log=lambda *a: None)
    fns = peers.calls({k: v for k, v in models.items() if names is None or k in names}, px, dtype, device)
    res = {}
    for n, f in fns.items():
        p = profile_step(f)
        res[n] = split(p)
        log(f"  profile {px} px {dtype_name} {n:<18} " + "  ".join(f"{k} {v:.2f}s" for k, v in res[n].items()))
        rows = max(table_rows, save_rows)
        table = p.key_averages(group_by_input_shape=True).table(
            sort_by="self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total",
            row_limit=rows, max_name_column_width=40, max_shapes_column_width=80)
        if table_rows:
            print(table)
        if save_rows:
            _save_ops(f"===== {n}: one step, {px} px, {dtype_name}, depth {depth}\n{table}")
        del p
    del models, fns
    gc.collect()
    return res


def main():
    ap = argparse.ArgumentParser(description="Profile one step of each implementation by op.")
    ap.add_argument("--px", type=int, default=1024)
    ap.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    ap.add_argument("--depth", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--only", nargs="*", default=None, help="implementation names")
    ap.add_argument("--rows", type=int, default=25)
    a = ap.parse_args()
    import os
    torch.set_num_threads(a.threads or max(1, min(os.cpu_count() or 1, torch.get_num_threads())))
    run(a.px, a.dtype, pick_device(), a.only, a.depth, table_rows=a.rows, save_rows=0)


if __name__ == "__main__":
    main()
