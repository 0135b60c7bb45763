"""T5-XXL encoding memory and time by file type: GGUF Q8_0 / Q4_K vs safetensors fp16 / fp8, at full width.

    python -m benchmarks.t5_gguf            # writes benchmarks/results/t5_gguf.{json,md}

Weights are synthesised at T5 v1.1 XXL's real width (d_model 4096, d_ff 10240, 64 heads, vocab
32128). A 24-layer XXL does not fit this 2-core machine's time budget, so each file type is
measured with 1 and 2 layers (each in a fresh process) and the full depth is extrapolated:
time(24) = 12·t(2) (the embedding lookup is negligible), resident weights(24) = embedding + 24 layers (exact tensor
bytes), peak RSS(24) = peak(1) + 23·(peak(2) - peak(1)). Compute is bf16 (ComfyUI's CPU default).
Q4_K here quantizes every matrix as Q4_K; real Q4_K_M files also hold some Q6_K tensors.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
XXL = dict(d_model=4096, d_ff=10240, heads=64, d_kv=64)
CASES = ("Q8_0", "Q4_K", "fp16", "fp8")
PROMPT_WORDS = ("a detailed oil painting of a lighthouse on a rocky coast at dusk with waves crashing, "
                "seagulls, warm light in the windows and a stormy violet sky ") * 12


def _write(case: str, layers: int, folder: Path) -> Path:
    sys.path.insert(0, str(REPO / "tests"))
    import torch
    from safetensors.torch import save_file

    import gguf_fixtures as gf
    import t5_fixtures as tf
    tf.copy_tokenizer(folder)
    sd = gf.t5_state_dict(layers=layers, **XXL)
    if case in ("Q8_0", "Q4_K"):
        return gf.write_t5_gguf(folder / f"t5-xxl-{layers}l-{case}.gguf", sd, case)
    dtype = torch.float16 if case == "fp16" else torch.float8_e4m3fn
    path = folder / f"t5xxl-{layers}l_{case}.safetensors"
    save_file({k: (v.to(dtype) if v.ndim == 2 and "relative" not in k else v.half()) for k, v in sd.items()},
              str(path))
    return path


def _measure(path: str) -> dict:
    """In this (fresh) process: load, encode one 300-token prompt, report time and memory."""
    import torch
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    sys.path.insert(0, str(REPO))
    from pixart_core.t5 import load_t5
    t0 = time.perf_counter()
    t5 = load_t5(path, dtype="bf16")
    load_s = time.perf_counter() - t0
    ids, mask, _ = t5.tokenize([PROMPT_WORDS], 300)
    times = []
    for _ in range(4):  # the first is a warm-up; _run skips the prompt cache
        t0 = time.perf_counter()
        t5._run([PROMPT_WORDS], 300)
        times.append(time.perf_counter() - t0)
    tensors = list(t5.model.parameters()) + list(t5.model.buffers())
    resident = sum(t.numel() * t.element_size() for t in {id(t): t for t in tensors}.values())
    return {"load_s": load_s, "encode_s": statistics.median(times[1:]), "tokens": int(mask.sum()),
            "resident_bytes": resident, "peak_rss_bytes": _peak_rss(), "file_bytes": Path(path).stat().st_size}


def _peak_rss() -> int:
    """This process's peak resident memory (VmHWM; ru_maxrss would carry the parent's peak across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run(cases=CASES) -> dict:
    out = {}
    with tempfile.TemporaryDirectory(prefix="t5_gguf_bench_") as tmp:
        for case in cases:
            rows = {}
            for layers in (1, 2):
                path = _write(case, layers, Path(tmp))
                res = subprocess.run([sys.executable, "-m", "benchmarks.t5_gguf", "--measure", str(path)], cwd=REPO,
                                     capture_output=True, text=True, check=True)
                rows[layers] = json.loads(res.stdout.strip().splitlines()[-1])
                path.unlink()
                print(case, layers, rows[layers], flush=True)
            out[case] = {"measured": rows}
    return extrapolate(out)


def extrapolate(results: dict) -> dict:
    """Add the 24-layer figures to raw {case: {"measured": {1: ..., 2: ...}}} results."""
    for r in results.values():
        one, two = (r["measured"].get(k, r["measured"].get(str(k))) for k in (1, 2))

        def at_24(name):
            return one[name] + 23 * (two[name] - one[name])

        r.update({"tokens": one["tokens"],
                  # the embedding lookup and final norm are negligible: encode time is layers x one layer
                  "per_layer_encode_s": two["encode_s"] / 2, "encode_s_24": 12 * two["encode_s"],
                  "resident_gib_24": at_24("resident_bytes") / 2 ** 30,
                  "peak_rss_gib_24": at_24("peak_rss_bytes") / 2 ** 30,
                  "file_gib_24": at_24("file_bytes") / 2 ** 30})
    return results


def table(results: dict) -> str:
    base = results["fp16"]
    lines = ["| T5 file | file (24 layers) | weights in RAM | peak RSS | encode 300 tokens | per layer | vs fp16 time |",
             "|---|---|---|---|---|---|---|"]
    names = {"Q8_0": "GGUF Q8_0", "Q4_K": "GGUF Q4_K", "fp16": "safetensors fp16", "fp8": "safetensors fp8_e4m3fn"}
    for case, r in results.items():
        lines.append(f"| {names[case]} | {r['file_gib_24']:.2f} GiB | {r['resident_gib_24']:.2f} GiB | "
                     f"{r['peak_rss_gib_24']:.2f} GiB | {r['encode_s_24']:.1f} s | {r['per_layer_encode_s']:.2f} s | "
                     f"{r['encode_s_24'] / base['encode_s_24']:.2f}x |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--from-json", help="only re-render the tables from a results json")
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES),
                        help="measure these again and keep the others from benchmarks/results/t5_gguf.json")
    args = parser.parse_args(argv)
    if args.measure:
        print(json.dumps(_measure(args.measure)))
        return
    if args.from_json:
        results = extrapolate(json.loads(Path(args.from_json).read_text()))
    else:
        previous = RESULTS / "t5_gguf.json"
        results = json.loads(previous.read_text()) if previous.is_file() and args.cases != list(CASES) else {}
        results.update(run(args.cases))
        results = extrapolate({case: results[case] for case in CASES if case in results})
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "t5_gguf.json").write_text(json.dumps(results, indent=2))
    md = ("# T5-XXL encoding by file type (CPU, bf16 compute, one 300-token prompt; 24 layers extrapolated "
          "from 1- and 2-layer runs at full width; medians of 3 encodes)\n\n" + table(results) + "\n")
    (RESULTS / "t5_gguf.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
