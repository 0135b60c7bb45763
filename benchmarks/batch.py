"""Batch job throughput: the local runner against the same job on a local Ray cluster (1 and 2 actors).

    python -m benchmarks.batch                 # about 2 minutes on 2 CPU cores
    python -m benchmarks.batch --requests 32 --steps 8

One job of --requests distinct prompts (one bin, CFG 4.5, dpmpp_2m), a small random-weight PixArt
(depth 4, hidden 384, 512 px: enough work per image that the engine's per-request cost shows against
it) and the tiny test T5, written as .latent files. Each run starts from an empty output folder; the
Ray runs include starting their actors (one model load each), which is what a job pays. The local
runner runs twice, with all threads and with 1 thread: each Ray actor gets 1 CPU or less (Ray sets its
thread count to 1), so Ray with 1 actor against local with 1 thread is the engine's own cost, and 2
actors use the same 2 cores the all-threads local run uses. Ray's cluster start-up (`ray.init`) is
outside the timings: a real job joins a running cluster.
Writes benchmarks/results/batch-cpu.json and .md; never asserts on timings.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from .common import device_info, load_average
from .run import RESULTS


def write_job(root: Path, requests: int, steps: int):
    from pixart_core.config import tiny
    from pixart_core.loading import save_checkpoint
    from tests import batch_fixtures, pixart_fixtures, t5_fixtures  # the test fixtures: tiny T5 + tokenizer
    config = tiny(depth=4, hidden_size=384, num_heads=6, sample_size=64, resolution=512)
    ckpt = save_checkpoint(pixart_fixtures.random_model(config).state_dict(), config, root / "model.safetensors")
    t5 = t5_fixtures.write_tiny_t5_hf_folder(root / "t5")
    jobs = batch_fixtures.write_jobs(root / "jobs.jsonl", [
        {"prompt": f"request number {i}", "seed": i, "steps": steps} for i in range(requests)])
    return batch_fixtures.settings(ckpt, t5), jobs


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def run(requests: int, steps: int, log=print) -> dict:
    from pixart_core.batch import run_local
    quiet = lambda _: None  # noqa: E731
    root = Path(tempfile.mkdtemp(prefix="pixart_batch_bench_"))
    try:
        settings, jobs = write_job(root, requests, steps)
        rows = []
        seconds, summary = timed(lambda: run_local(jobs, root / "local", settings, progress=False, say=quiet))
        rows.append({"engine": f"local, {torch.get_num_threads()} threads", "workers": 1, "s": seconds,
                     "done": summary.done})
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # what one Ray actor with 1 CPU gets: the engine's own cost shows against it
        try:
            seconds, summary = timed(lambda: run_local(jobs, root / "local1", settings, progress=False, say=quiet))
        finally:
            torch.set_num_threads(threads)
        rows.append({"engine": "local, 1 thread", "workers": 1, "s": seconds, "done": summary.done})
        try:
            import ray
            from pixart_core import batch_ray
        except ImportError:
            log('Ray rows skipped: pip install "ray[data]"')
        else:
            env = {"PYTHONPATH": str(Path(__file__).resolve().parent.parent),
                   "MKL_CBWR": os.environ.get("MKL_CBWR", "AUTO,STRICT")}
            ray.init(num_cpus=2, runtime_env={"env_vars": env}, include_dashboard=False, log_to_driver=False)
            try:
                for actors in (1, 2):
                    out = root / f"ray{actors}"
                    seconds, summary = timed(lambda: batch_ray.run_ray(
                        jobs, out, settings, address=None, actors=actors, cpus_per_actor=1.0 if actors == 1 else 0.75,
                        progress=False, say=quiet))
                    rows.append({"engine": f"Ray Data, {actors} sampling actor(s)", "workers": actors, "s": seconds,
                                 "done": summary.done})
            finally:
                ray.shutdown()
        local, one_thread = rows[0]["s"], rows[1]["s"]
        for r in rows:
            r["images_per_s"] = r["done"] / r["s"]
            r["vs_local"] = local / r["s"]
            r["vs_local_1_thread"] = one_thread / r["s"]
            r["overhead_per_request_s"] = (r["s"] - one_thread) / requests
        return {"requests": requests, "steps": steps, "rows": rows}
    finally:
        shutil.rmtree(root, ignore_errors=True)


def table(result: dict) -> str:
    lines = [f"{result['requests']} requests, {result['steps']} steps, CFG, 512 px, depth-4 hidden-384 model, .latent outputs",
             "", "| engine | wall (s) | images/s | vs local (all threads) | vs local, 1 thread | "
             "s per request over local, 1 thread |", "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['engine']} | {r['s']:.1f} | {r['images_per_s']:.2f} | {r['vs_local']:.2f}× | "
                     f"{r['vs_local_1_thread']:.2f}× | {r['overhead_per_request_s']:+.2f} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--steps", type=int, default=6)
    a = p.parse_args(argv)
    torch.manual_seed(0)
    load = load_average()
    result = run(a.requests, a.steps)
    result.update(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  load_before=load, load_after=load_average(),
                  info=device_info(torch.device("cpu"), torch.get_num_threads()))
    text = table(result)
    print(text)
    results = Path(RESULTS)
    results.mkdir(parents=True, exist_ok=True)
    (results / "batch-cpu.json").write_text(json.dumps(result, indent=2) + "\n")
    (results / "batch-cpu.md").write_text(text + f"\n\nload average before/after: {load} / {result['load_after']}\n")


if __name__ == "__main__":
    main()
