"""The batch job on Ray Data (`python -m pixart_core batch JOBS.jsonl --out DIR --ray auto`); imported only
with --ray, so Ray stays optional (pip install "ray[data]").

The same chunks as the local runner (pixart_core.batch.make_plan) flow through four stages:
1. text encoding: T5 actors on CPU workers, each reserving --t5-memory (T5-XXL in bf16 needs ~10 GiB);
2. sampling: `actors` actors, each loading the PixArt model once, `num_gpus` GPUs each (0 on CPU);
3. decoding: VAE actors (only with --vae and diffusers; .latent outputs need no decoding);
4. writing: on the driver, as the rows arrive, so --out needs to be on the driver's disk only; the
   model, T5 and VAE paths must be readable on every worker node (a shared disk, or the same paths).
Every stage runs the functions the local runner runs, at the same fixed batch shape, so with the same
settings Ray writes the same bytes as the local runner. A worker that dies is restarted and its rows
redone; the writer keeps the first result of a request, so nothing is lost or written twice.
"""
from __future__ import annotations

import os
import pickle
import time
from pathlib import Path

import ray

from .batch import (Models, Progress, Settings, Summary, conditioning, decode_outputs, encode_texts, error_text,
                    sample_chunk, start_job, write_outputs)

CRASH_ENV = "PIXART_BATCH_CRASH_FILE"  # tests: a sampling actor that finds this file deletes it and dies


class _Encode:
    def __init__(self, settings: Settings):
        from .t5 import load_t5
        self.settings = settings
        self.encoder = load_t5(settings.t5, dtype=settings.t5_dtype, device="cpu", tokenizer_path=settings.tokenizer)

    def __call__(self, row):
        chunk = pickle.loads(row["chunk"])
        texts = [t for r in chunk.requests for t in (r.prompt, r.negative)]
        try:  # each row stands alone (a row may be redone elsewhere): no cache across chunks
            embeddings = encode_texts(self.encoder, texts, chunk.length, self.settings.t5_batch, {})
            prompt, negative = conditioning(chunk, embeddings)
            cond, error = pickle.dumps((prompt.embeds, prompt.mask, negative.embeds, negative.mask)), ""
        except Exception as e:  # noqa: BLE001 - recorded for the chunk's requests
            cond, error = b"", error_text(e)
        return {"chunk": row["chunk"], "data": cond, "error": error}


class _Sample:
    def __init__(self, settings: Settings):
        self.models = Models(settings)

    def __call__(self, row):
        crash = os.environ.get(CRASH_ENV)
        if crash and Path(crash).exists():
            Path(crash).unlink(missing_ok=True)
            os._exit(1)  # as a worker killed mid-job (out of memory, a lost node)
        if row["error"]:
            return row
        from .pipeline import Conditioning
        chunk = pickle.loads(row["chunk"])
        embeds, mask, neg_embeds, neg_mask = pickle.loads(row["data"])
        try:
            latents = sample_chunk(self.models, chunk, Conditioning(embeds, mask), Conditioning(neg_embeds, neg_mask))
            cfg = self.models.model.config
            data, error = pickle.dumps((latents, cfg.resolution, cfg.family)), ""
        except Exception as e:  # noqa: BLE001
            data, error = b"", error_text(e)
        return {"chunk": row["chunk"], "data": data, "error": error}


class _Decode:
    def __init__(self, settings: Settings, device: str):
        from .vae import load_vae
        self.vae = load_vae(settings.vae, device)

    def __call__(self, row):
        if row["error"]:
            return row
        chunk = pickle.loads(row["chunk"])
        latents, resolution, family = pickle.loads(row["data"])
        try:
            from types import SimpleNamespace
            images = decode_outputs(chunk, latents, "png", SimpleNamespace(resolution=resolution), self.vae)
            data, error = pickle.dumps((images, resolution, family)), ""
        except Exception as e:  # noqa: BLE001
            data, error = b"", error_text(e)
        return {"chunk": row["chunk"], "data": data, "error": error}


def connect(address: str | None) -> None:
    """Join the cluster at `address` ('auto': the one `ray start --head` started on this machine) unless
    this process is connected already; workers import this copy of pixart_core."""
    if ray.is_initialized():
        return
    package = str(Path(__file__).resolve().parent)
    ray.init(address=address, runtime_env={"py_modules": [package]}, log_to_driver=False)


def run_ray(jobs, folder, settings: Settings, address: str | None = "auto", actors: int = 1,
            num_gpus: float | None = None, t5_memory: float | None = None, cpus_per_actor: float | None = None,
            progress: bool = True, say=print) -> Summary:
    """The job on Ray Data; the same outputs, manifest and summary as batch.run_local. num_gpus: per
    sampling actor (default 1 with a cuda device, else 0); cpus_per_actor: default 1 on CPU, else 0.5."""
    start = time.perf_counter()
    folder, manifest, plan, summary = start_job(jobs, folder, settings, say)
    say(settings.describe_output() + f" on Ray, {actors} sampling actor(s)")
    report = Progress(manifest, plan, summary, progress)
    if plan.chunks:
        connect(address)
        gpu = settings.device.startswith("cuda")
        num_gpus = (1.0 if gpu else 0.0) if num_gpus is None else num_gpus
        cpus = cpus_per_actor if cpus_per_actor is not None else (1.0 if num_gpus == 0 else 0.5)
        memory = {"memory": int(t5_memory * 2 ** 30)} if t5_memory else {}
        ds = ray.data.from_items([{"chunk": pickle.dumps(c), "data": b"", "error": ""} for c in plan.chunks],
                                 override_num_blocks=len(plan.chunks))
        pool = ray.data.ActorPoolStrategy  # Ray Data restarts a dead actor and redoes its rows by default
        ds = ds.map(_Encode, fn_constructor_args=(settings,), compute=pool(size=1), num_cpus=0.25, **memory)
        ds = ds.map(_Sample, fn_constructor_args=(settings,), compute=pool(size=actors), num_cpus=cpus,
                    num_gpus=num_gpus)
        kind = settings.output_kind
        if kind == "png":
            ds = ds.map(_Decode, fn_constructor_args=(settings, settings.device if num_gpus else "cpu"),
                        compute=pool(size=1), num_cpus=0.25, num_gpus=min(num_gpus, 1.0))
        seen = set()
        for row in ds.iter_rows():
            chunk = pickle.loads(row["chunk"])
            if chunk.keys[0] in seen:  # a row redone after a worker died, already written
                continue
            seen.add(chunk.keys[0])
            if row["error"]:
                results = [(k, None, row["error"]) for k in chunk.keys]
            else:
                payloads, resolution, family = pickle.loads(row["data"])
                if kind == "latent":
                    payloads = decode_outputs(chunk, payloads, kind, None)
                results = write_outputs(folder, chunk, payloads, kind, resolution, family)
            report.record(results)
    return report.finish(start)
