"""Batch jobs (issue #14), many requests from a JOBS.jsonl file, in one process or on Ray (batch_ray).

Each line is one JSON object; absent fields take the defaults below. A bad line is reported with its
line number and skipped, never stopping the job. Each request has a stable hash that names its output,
so a rerun can skip finished work."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .checks import SEED_MAX, InputError, real_number, whole_number
from .config import PRESETS
from .model import layer_list_syntax
from .pipeline import MAX_GUIDANCE, MAX_REQUESTED_SIDE
from .samplers import SAMPLERS
from .schedule import MAX_STEPS

FIELDS = {"prompt": "", "negative": "", "seed": 0, "width": None, "height": None, "steps": 20,
          "sampler": "dpmpp_2m", "guidance": 4.5, "preset": None, "kv_layers": None}


@dataclass(frozen=True)
class Request:
    prompt: str
    negative: str
    seed: int
    width: int | None
    height: int | None
    steps: int
    sampler: str
    guidance: float
    preset: str | None
    kv_layers: str | None

    def key(self) -> str:
        """Hash of everything that decides the output: same request, same name."""
        text = json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:24]


def parse_request(obj) -> Request:
    if not isinstance(obj, dict):
        raise InputError("each line must be a JSON object like {\"prompt\": \"a cat\"}")
    unknown = sorted(set(obj) - set(FIELDS))
    if unknown:
        raise InputError(f"unknown field(s) {', '.join(unknown)}; the fields are {', '.join(FIELDS)}")
    v = {**FIELDS, **obj}
    for field in ("prompt", "negative"):
        if not isinstance(v[field], str):
            raise InputError(f"{field} must be text, not {json.dumps(v[field])}")
    v["seed"] = whole_number("seed", v["seed"], 0, SEED_MAX)
    v["steps"] = whole_number("steps", v["steps"], 1, MAX_STEPS)
    v["guidance"] = real_number("guidance", v["guidance"], 0.0, MAX_GUIDANCE)
    for side in ("width", "height"):
        if v[side] is not None:
            v[side] = whole_number(side, v[side], 1, MAX_REQUESTED_SIDE)
    if v["sampler"] not in SAMPLERS:
        raise InputError(f"unknown sampler {v['sampler']!r}; choose one of {', '.join(SAMPLERS)}")
    if v["preset"] is not None and v["preset"] not in PRESETS:
        raise InputError(f"unknown preset {v['preset']!r}; choose one of {', '.join(PRESETS)}")
    if v["kv_layers"] is not None:
        if not isinstance(v["kv_layers"], str):
            raise InputError('kv_layers must be text such as "14-27" or "all"')
        layer_list_syntax(v["kv_layers"])
    return Request(**v)


# -------------------------------------------------------------------------------------------------
# running a job: the stages below are shared by the local runner and pixart_core.batch_ray
# -------------------------------------------------------------------------------------------------

MANIFEST = "manifest.jsonl"
JOB_FILE = "job.json"
KV_RATIO, KV_MODE = 2, "avgpool"  # the generate command's defaults for kv_layers


@dataclass(frozen=True)
class Settings:
    """What applies to every request of a job (the command line). identity() is what decides the
    outputs' bytes, kept in DIR/job.json: a rerun into the same folder must use the same."""
    model: str
    t5: str
    tokenizer: str | None = None
    vae: str | None = None
    preset: str = "auto"
    dtype: str | None = None
    compute_dtype: str = "float32"
    t5_dtype: str = "bf16"
    device: str = "cpu"
    batch_size: int = 4
    t5_batch: int = 32
    null_mode: str = "prompt_mask"
    grid: str = "dpm_time_uniform"

    @property
    def output_kind(self) -> str:
        """png when a VAE is given and diffusers can load it, else latent."""
        from . import vae
        return "png" if self.vae is not None and vae.available() else "latent"

    def identity(self) -> dict:
        def where(p):
            return None if p is None else str(Path(p).expanduser().resolve())
        return {"model": where(self.model), "t5": where(self.t5), "tokenizer": where(self.tokenizer),
                "vae": where(self.vae) if self.output_kind == "png" else None, "preset": self.preset,
                "dtype": self.dtype, "compute_dtype": self.compute_dtype, "t5_dtype": self.t5_dtype,
                "null_mode": self.null_mode, "grid": self.grid, "output": self.output_kind}

    def describe_output(self) -> str:
        if self.output_kind == "png":
            return f"decoding to PNG with the VAE {self.vae}"
        if self.vae is not None:
            return "writing .latent files: --vae needs diffusers, which is not installed (pip install diffusers)"
        return "writing .latent files (give --vae with an SDXL VAE folder to decode PNGs)"


@dataclass
class Chunk:
    """Requests sampled together: the same model preset, KV layers, bin and sampler settings."""
    preset: str
    kv_layers: str | None
    bin: tuple[int, int]
    length: int  # T5 tokens the model takes
    keys: list[str]
    requests: list[Request]

    def group(self) -> tuple:
        r = self.requests[0]
        return self.preset, self.kv_layers, self.bin, r.steps, r.sampler, r.guidance


@dataclass
class Summary:
    done: int = 0
    skipped: int = 0
    failed: int = 0
    invalid: int = 0
    seconds: float = 0.0

    @property
    def images_per_s(self) -> float:
        return self.done / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        return (f"{self.done} done, {self.skipped} skipped (already there), {self.failed} failed, "
                f"{self.invalid} bad lines; {self.images_per_s:.3g} images/s over {self.seconds:.1f} s")


def output_name(key: str, kind: str) -> str:
    return f"{key}.{kind}"


def error_text(e: BaseException) -> str:
    """Our errors are one sentence already; anything else keeps its type (the first line only)."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return text if isinstance(e, (InputError, ValueError, OSError)) and text else f"{type(e).__name__}: {text}"


class Manifest:
    """DIR/manifest.jsonl: one JSON line per request, the last line of a key being its state. Lines are
    appended (and flushed) as results come, so an interrupted job keeps what it finished; compact()
    rewrites it atomically with one line per request."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / MANIFEST
        self.entries: dict[str, dict] = {}
        if self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    entry = json.loads(line)
                    self.entries[entry["key"]] = entry
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue  # a line cut by a crash: that request is simply not finished

    def record(self, entry: dict) -> None:
        self.entries[entry["key"]] = entry
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(entry, sort_keys=True) + "\n")
            fh.flush()

    def compact(self) -> Path:
        from .files import save_result
        text = "".join(json.dumps(e, sort_keys=True) + "\n" for e in self.entries.values())
        return save_result(self.path, lambda tmp: tmp.write_text(text, encoding="utf-8"), "manifest", rescue=False)


def entry(key: str, request: Request, lines: list[int], status: str, file: str | None = None,
          error: str | None = None) -> dict:
    return {"key": key, "status": status, "file": file, "error": error, "lines": lines,
            "prompt": request.prompt, "seed": request.seed}


def open_output(folder, settings: Settings) -> Path:
    """The output folder, created; a folder already holding another job's settings is refused (its file
    names would no longer say what is in them)."""
    from .files import prepare_output, read_json_object, save_result
    folder = prepare_output(folder, inputs=[settings.model, settings.t5, settings.vae], folder_files=(JOB_FILE,),
                            what="--out")
    folder.mkdir(parents=True, exist_ok=True)
    job, identity = folder / JOB_FILE, settings.identity()
    if job.is_file():
        before = read_json_object(job)
        changed = sorted(k for k in set(before) | set(identity) if before.get(k) != identity.get(k))
        if changed:
            raise InputError(f"--out {folder} holds the outputs of a job with other settings "
                             f"({', '.join(f'{k}: {before.get(k)} now {identity.get(k)}' for k in changed)}); "
                             "use another --out folder, or the same settings to continue that job")
    else:
        text = json.dumps(identity, indent=2, sort_keys=True)
        save_result(job, lambda tmp: tmp.write_text(text, encoding="utf-8"), "job settings", rescue=False)
    return folder


def model_config(settings: Settings, preset: str):
    """The model's configuration for a preset ('auto': detected), without building the model."""
    from .loading import config_from_preset, detect_config, read_checkpoint
    raw = read_checkpoint(settings.model)
    return detect_config(raw)[0] if preset == "auto" else config_from_preset(preset, raw)


@dataclass
class Plan:
    chunks: list[Chunk]
    lines: dict  # key -> the JSONL line numbers asking for it
    requests: dict  # key -> Request
    skipped: list[str]
    failed: list[tuple[str, str]]  # (key, error) found while planning


def make_plan(requests: list[Request], settings: Settings, folder: Path, line_numbers=None) -> Plan:
    """Deduplicate, skip finished outputs, and group the rest into chunks of at most batch_size."""
    from . import bins
    kind = settings.output_kind
    by_key, lines = {}, {}
    for i, r in enumerate(requests):
        k = r.key()
        by_key.setdefault(k, r)
        lines.setdefault(k, []).append(line_numbers[i] if line_numbers else i + 1)
    skipped = [k for k in by_key if (folder / output_name(k, kind)).is_file()]
    configs, failed, groups = {}, [], {}
    for k, r in by_key.items():
        if k in skipped:
            continue
        preset = r.preset or settings.preset
        try:
            if preset not in configs:
                try:
                    configs[preset] = model_config(settings, preset)
                except Exception as e:  # noqa: BLE001 - this preset's requests fail, the others go on
                    configs[preset] = e
            cfg = configs[preset]
            if isinstance(cfg, Exception):
                raise cfg
            if r.kv_layers is not None:
                from .model import parse_layers
                parse_layers(r.kv_layers, cfg.depth)
            h = cfg.resolution if r.height is None else r.height
            w = cfg.resolution if r.width is None else r.width
            size = bins.nearest_bin(h, w, cfg.resolution)
        except Exception as e:  # noqa: BLE001
            failed.append((k, error_text(e)))
            continue
        group = (preset, r.kv_layers, size, r.steps, r.sampler, r.guidance)
        groups.setdefault(group, (cfg.model_max_length, []))[1].append(k)
    chunks = []
    for (preset, kv, size, *_), (length, keys) in groups.items():
        for i in range(0, len(keys), settings.batch_size):
            part = keys[i:i + settings.batch_size]
            chunks.append(Chunk(preset, kv, size, length, part, [by_key[k] for k in part]))
    return Plan(chunks, lines, by_key, skipped, failed)


def conditioning(chunk: Chunk, embeddings: dict):
    """(prompt, negative) Conditioning of a chunk from {(text, length): (embeds, mask)}."""
    from .pipeline import Conditioning

    def stack(texts):
        rows = [embeddings[(t, chunk.length)] for t in texts]
        return Conditioning(torch.stack([e for e, _ in rows]), torch.stack([m for _, m in rows]))
    return stack([r.prompt for r in chunk.requests]), stack([r.negative for r in chunk.requests])


def encode_texts(encoder, texts, length: int, batch: int, embeddings: dict) -> dict:
    """T5 embeddings (CPU, float32) of the texts not in `embeddings` yet, `batch` prompts per call."""
    todo = [t for t in dict.fromkeys(texts) if (t, length) not in embeddings]
    for i in range(0, len(todo), batch):
        part = todo[i:i + batch]
        embeds, mask = encoder.encode(part, max_length=length)
        for text, e, m in zip(part, embeds.float().cpu(), mask.cpu()):
            embeddings[(text, length)] = (e.clone(), m.clone())
    return embeddings


class EmbeddingCache:
    """T5 embeddings for a list of chunks, computed t5_batch prompts at a time ahead of the chunk that
    needs them and dropped once no later chunk does, so memory stays at about one T5 batch however
    long the job (an embedding is 300 x 4096 floats) and a prompt used many times is encoded once."""

    def __init__(self, encoder, chunks: list[Chunk], batch: int):
        self.encoder, self.batch, self.embeddings = encoder, batch, {}
        self.order = [(t, c.length) for c in chunks for r in c.requests for t in (r.prompt, r.negative)]
        self.uses: dict = {}
        for k in self.order:
            self.uses[k] = self.uses.get(k, 0) + 1
        self.next = 0  # position in self.order up to which everything is encoded or done

    def get(self, chunk: Chunk):
        needed = [(t, chunk.length) for r in chunk.requests for t in (r.prompt, r.negative)]
        while any(k not in self.embeddings for k in needed):
            upcoming = []  # the next uncached texts of this length, in the order the chunks use them
            while self.next < len(self.order) and len(upcoming) < self.batch:
                k = self.order[self.next]
                if k[1] == chunk.length and k not in self.embeddings and self.uses[k] > 0 and k not in upcoming:
                    upcoming.append(k)
                self.next += 1
            if not upcoming:  # lookahead passed them (another length came first): encode what is missing
                upcoming = list(dict.fromkeys(k for k in needed if k not in self.embeddings))
            encode_texts(self.encoder, [t for t, _ in upcoming], chunk.length, self.batch, self.embeddings)
        conds = conditioning(chunk, self.embeddings)
        for k in needed:
            self.uses[k] -= 1
            if self.uses[k] == 0:
                self.embeddings.pop(k, None)
        return conds


class Models:
    """One PixArt model at a time, loaded for the chunk's preset; a preset that fails to load fails
    its chunks with the same error without trying again."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.preset, self.model, self.errors = None, None, {}

    def get(self, preset: str):
        if preset in self.errors:
            raise self.errors[preset]
        if preset != self.preset:
            from .loading import load_pixart
            self.model = self.preset = None
            try:
                loaded = load_pixart(self.settings.model, preset=preset, dtype=self.settings.dtype,
                                     device=self.settings.device,
                                     compute_dtype=getattr(torch, self.settings.compute_dtype))
            except Exception as e:  # noqa: BLE001
                self.errors[preset] = e
                raise
            self.model, self.preset = loaded.model.eval(), preset
            self.default_kv = self.model.kv_compress
        return self.model


def sample_chunk(models: Models, chunk: Chunk, prompt, negative) -> torch.Tensor:
    """Latents (n, 4, h/8, w/8) of the chunk's n requests, in the VAE's space.

    The model always sees batch_size requests (the last chunk of a group is padded with copies of its
    last request): CPU and GPU matrix kernels are chosen by shape, so a fixed shape is what makes each
    image the same bytes whoever its batch mates are, and equal to the same request sampled alone."""
    from .model import KVCompress, parse_layers
    from .pipeline import Conditioning, generate
    model = models.get(chunk.preset)
    model.kv_compress = (models.default_kv if chunk.kv_layers is None else
                         KVCompress(parse_layers(chunk.kv_layers, model.config.depth), KV_RATIO, KV_MODE))
    n, pad = len(chunk.requests), models.settings.batch_size - len(chunk.requests)

    def padded(c):
        return Conditioning(torch.cat([c.embeds, c.embeds[-1:].expand(pad, -1, -1)]),
                            torch.cat([c.mask, c.mask[-1:].expand(pad, -1)])) if pad > 0 else c
    seeds = [r.seed for r in chunk.requests] + [chunk.requests[-1].seed] * max(pad, 0)
    r = chunk.requests[0]
    result = generate(model, padded(prompt), padded(negative), height=chunk.bin[0], width=chunk.bin[1], steps=r.steps,
                      guidance=r.guidance, sampler=r.sampler, grid=models.settings.grid, seeds=seeds,
                      null_mode=models.settings.null_mode)
    return result.latents[:n]


def decode_outputs(chunk: Chunk, latents: torch.Tensor, kind: str, config, vae=None) -> list:
    """Per request: a uint8 image (png, resized and cropped to the size asked) or its latents."""
    from . import vae as vae_module
    out = []
    for i, r in enumerate(chunk.requests):
        if kind == "png":
            size = (config.resolution if r.height is None else r.height, config.resolution if r.width is None else r.width)
            out.append(vae_module.decode(vae, latents[i:i + 1], *size)[0])
        else:
            out.append(latents[i:i + 1].contiguous())
    return out


def write_outputs(folder: Path, chunk: Chunk, payloads: list, kind: str, resolution: int, family: str
                  ) -> list[tuple[str, str | None, str | None]]:
    """Write each request's decoded image or latents atomically, named by its key:
    [(key, file name or None, error or None)]. A write that fails fails that request only."""
    from .pipeline import Generated, save_latents
    from .vae import save_png
    out = []
    for key, r, payload in zip(chunk.keys, chunk.requests, payloads):
        name = output_name(key, kind)
        size = (resolution if r.height is None else r.height, resolution if r.width is None else r.width)
        try:
            if kind == "png":
                save_png(folder / name, payload, {"prompt": r.prompt, "seed": r.seed, "request": key})
            else:
                save_latents(folder / name, Generated(payload, chunk.bin[0], chunk.bin[1], size, r.seed, family))
            out.append((key, name, None))
        except Exception as e:  # noqa: BLE001
            out.append((key, None, error_text(e)))
    return out


def start_job(jobs, folder, settings: Settings, say=print):
    """Read the jobs file, report its bad lines, open the output folder and plan the work.
    Returns (folder, manifest, plan, summary so far)."""
    requests, errors = read_jobs_numbered(jobs)
    for _, message in errors:
        say(message)
    folder = open_output(folder, settings)
    manifest = Manifest(folder)
    plan = make_plan([r for _, r in requests], settings, folder, [n for n, _ in requests])
    summary = Summary(skipped=len(plan.skipped), invalid=len(errors))
    kind = settings.output_kind
    for k in plan.skipped:  # the manifest says they are there even when it was lost
        if manifest.entries.get(k, {}).get("status") != "done":
            manifest.entries[k] = entry(k, plan.requests[k], plan.lines[k], "done", output_name(k, kind))
    for k, message in plan.failed:
        manifest.record(entry(k, plan.requests[k], plan.lines[k], "failed", error=message))
    summary.failed = len(plan.failed)
    return folder, manifest, plan, summary


class Progress:
    """Where a runner reports finished requests: the manifest, the summary, and a progress bar (tqdm,
    which transformers brings) when enabled."""

    def __init__(self, manifest: Manifest, plan: Plan, summary: Summary, enabled: bool):
        self.manifest, self.plan, self.summary, self.bar = manifest, plan, summary, None
        if enabled and plan.chunks:
            try:
                from tqdm.auto import tqdm
                self.bar = tqdm(total=sum(len(c.keys) for c in plan.chunks), unit="img", desc="batch")
            except ImportError:
                pass

    def record(self, results) -> None:
        """results: [(key, file name or None, error or None)]."""
        for key, name, error in results:
            status = "done" if error is None else "failed"
            self.manifest.record(entry(key, self.plan.requests[key], self.plan.lines[key], status, name, error))
            if error is None:
                self.summary.done += 1
            else:
                self.summary.failed += 1
        if self.bar is not None:
            self.bar.update(len(results))

    def finish(self, start: float) -> Summary:
        import time
        if self.bar is not None:
            self.bar.close()
        self.manifest.compact()
        self.summary.seconds = time.perf_counter() - start
        return self.summary


def read_jobs_numbered(path) -> tuple[list[tuple[int, Request]], list[tuple[int, str]]]:
    """As read_jobs, with each request's line number."""
    requests, errors = [], []
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read the jobs file ({error_text(e)})") from None
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            requests.append((number, parse_request(json.loads(line))))
        except json.JSONDecodeError as e:
            errors.append((number, f"{path} line {number}: not JSON ({e.msg})"))
        except InputError as e:
            errors.append((number, f"{path} line {number}: {e}"))
    return requests, errors


def read_jobs(path) -> tuple[list[Request], list[tuple[int, str]]]:
    """(requests, [(line number, error sentence)]); blank lines are ignored."""
    numbered, errors = read_jobs_numbered(path)
    return [r for _, r in numbered], errors


def run_local(jobs, folder, settings: Settings, progress: bool = True, say=print) -> Summary:
    """The whole job in this process: chunk after chunk, T5-encoded (t5_batch prompts at a time, ahead),
    sampled, decoded and written."""
    import time
    from . import vae as vae_module
    from .t5 import load_t5
    start = time.perf_counter()
    folder, manifest, plan, summary = start_job(jobs, folder, settings, say)
    say(settings.describe_output())
    report = Progress(manifest, plan, summary, progress)
    if plan.chunks:
        encoder = load_t5(settings.t5, dtype=settings.t5_dtype, device=settings.device,
                          tokenizer_path=settings.tokenizer)
        cache = EmbeddingCache(encoder, plan.chunks, settings.t5_batch)
        vae = (vae_module.load_vae(settings.vae, settings.device) if settings.output_kind == "png" else None)
        models = Models(settings)
        for chunk in plan.chunks:
            try:
                latents = sample_chunk(models, chunk, *cache.get(chunk))
                cfg, kind = models.model.config, settings.output_kind
                payloads = decode_outputs(chunk, latents, kind, cfg, vae)
                results = write_outputs(folder, chunk, payloads, kind, cfg.resolution, cfg.family)
            except Exception as e:  # noqa: BLE001 - one failed chunk must not stop the job
                results = [(k, None, error_text(e)) for k in chunk.keys]
            report.record(results)
    return report.finish(start)
