"""Shared pieces: device choice and description, synchronised timing, interleaved runs, matmul rate."""
from __future__ import annotations

import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def pick_device(name: str | None = None) -> torch.device:
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def cpu_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return line.split(":", 1)[1].split()
    except OSError:
        pass
    return []


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def native_bf16_matmul() -> bool:
    """Whether this PyTorch build uses oneDNN's bf16 GEMMs here (needs AVX512-BW/VL/DQ on x86)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:  # noqa: BLE001 - private op; absent on some builds
        return False


def device_info(device: torch.device, threads: int) -> dict:
    import psutil
    info = {
        "device": str(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": threads,
        "interop_threads": torch.get_num_interop_threads(),
        "os": platform.platform(),
        "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
    }
    for mod in ("diffusers", "transformers"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            info[mod] = None
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(gpu=p.name, gpu_memory_gb=round(p.total_memory / 2**30, 1),
                    cuda=torch.version.cuda, capability=f"{p.major}.{p.minor}")
    flags = cpu_flags()
    watch = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile",
             "avx_vnni")
    info.update(
        cpu=cpu_model(),
        logical_cpus=os.cpu_count(),
        physical_cores=psutil.cpu_count(logical=False),
        cpu_flags={f: (f in flags) for f in watch},
        torch_cpu_capability=torch.backends.cpu.get_cpu_capability(),
        onednn_bf16_gemm=native_bf16_matmul(),
        blas=_blas_name(),
    )
    return info


def _blas_name() -> str:
    cfg = torch.__config__.show()
    for key in ("BLAS_INFO=", ):
        if key in cfg:
            return cfg.split(key, 1)[1].split(",", 1)[0]
    return "?"


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


# ----------------------------------------------------------------------------------------- timing

class Sample:
    """One timed call: wall seconds and this process's CPU seconds (all threads)."""
    __slots__ = ("wall", "cpu")

    def __init__(self, wall, cpu):
        self.wall, self.cpu = wall, cpu


def timed(fn, device):
    sync(device)
    c0, t0 = time.process_time(), time.perf_counter()
    out = fn()
    sync(device)
    return Sample(time.perf_counter() - t0, time.process_time() - c0), out


def interleaved(cases: dict, device, warmup: int = 1, runs: int = 3, on_output=None, log=print) -> dict:
    """Run every case `warmup` times, then `runs` rounds A,B,C / B,C,A / ... so drift and other
    processes' load hit all cases alike. Returns {name: summary}. on_output(name, out) sees each
    warm-up output (used for the equality checks), then the output is dropped.
    """
    names = list(cases)
    samples = {n: [] for n in names}
    with torch.inference_mode():
        for n in names:
            for _ in range(warmup):
                s, out = timed(cases[n], device)
                if on_output is not None:
                    on_output(n, out)
                del out
                log(f"    warm-up {n:<22} {s.wall:8.3f} s")
        for r in range(runs):
            order = names[r % len(names):] + names[:r % len(names)]
            for n in order:
                s, out = timed(cases[n], device)
                del out
                samples[n].append(s)
            log("    round %d: %s" % (r + 1, "  ".join(f"{n}={samples[n][-1].wall:.3f}" for n in names)))
    return {n: summarize(samples[n]) for n in names}


def summarize(samples: list[Sample]) -> dict:
    walls = [s.wall for s in samples]
    cpus = [s.cpu for s in samples]
    return {
        "median_s": statistics.median(walls),
        "min_s": min(walls),
        "max_s": max(walls),
        "runs": len(walls),
        "cpu_s_median": statistics.median(cpus),
        "walls": walls,
    }


# ----------------------------------------------------------------------------------- matmul rate

def matmul_case(dtype, device, layout: str = "a@b.T", n: int | None = None):
    """(zero-argument callable, FLOPs, n) of one square matmul in `dtype`. Timed on its own by
    matmul_rate, and inside each speed cell's interleaved rounds so the floor sees the same machine
    state (frequency, other load) as the steps."""
    dev = torch.device(device)
    if n is None:
        n = 4096 if (dev.type == "cuda" or dtype == torch.float32) else 2048
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device=dev, dtype=dtype)
    b = torch.randn(n, n, generator=g).to(device=dev, dtype=dtype)
    fn = (lambda: F.linear(a, b)) if layout == "a@b.T" else (lambda: a @ b)
    return fn, 2 * n ** 3, n


def matmul_rate(dtype, device, n: int | None = None, reps: int = 3) -> dict:
    """FLOP/s of a large square matmul in `dtype`, in both operand layouts.

    `a @ b.T` is the layout every nn.Linear uses (weight stored out x in); `a @ b` is the plain
    product. On CPUs without native bf16 GEMMs PyTorch runs these through different fallback
    kernels whose speeds differ by an order of magnitude, so both are reported and the faster is
    the rate the floor uses.
    """
    dev = torch.device(device)
    out = {}
    with torch.inference_mode():
        for layout in ("a@b.T", "a@b"):
            # PyTorch's scalar fallback for a@b in bf16 runs at ~1 GFLOP/s here: time a smaller one
            slow = layout == "a@b" and dev.type == "cpu" and dtype != torch.float32 and not native_bf16_matmul()
            fn, flop, size = matmul_case(dtype, dev, layout, 512 if slow else n)
            out.setdefault("n", size)
            timed(fn, dev)  # warm-up
            walls = [timed(fn, dev)[0].wall for _ in range(reps)]
            out[layout] = flop / statistics.median(walls)
    out["rate"] = max(out["a@b.T"], out["a@b"])
    return out


def fmt_s(s: float | None) -> str:
    if s is None:
        return "–"
    if s >= 100:
        return f"{s:.0f} s"
    if s >= 1:
        return f"{s:.2f} s"
    return f"{s * 1000:.0f} ms"
