"""Batch jobs (issue #14), first increment: reading a JOBS.jsonl file into checked requests.

Each line is one JSON object; absent fields take the defaults below. A bad line is reported with its
line number and skipped, never stopping the job. Each request has a stable hash that names its output,
so a rerun can skip finished work."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

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
    if not isinstance(v["prompt"], str) or not isinstance(v["negative"], str):
        raise InputError("prompt and negative must be text")
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


def read_jobs(path) -> tuple[list[Request], list[tuple[int, str]]]:
    """(requests, [(line number, error sentence)]); blank lines are ignored."""
    requests, errors = [], []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            requests.append(parse_request(json.loads(line)))
        except json.JSONDecodeError as e:
            errors.append((number, f"{path} line {number}: not JSON ({e.msg})"))
        except InputError as e:
            errors.append((number, f"{path} line {number}: {e}"))
    return requests, errors
