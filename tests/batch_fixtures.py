"""Tiny model, T5 and jobs files for the batch runner's tests (local and Ray)."""
import json
from pathlib import Path

from pixart_core.batch import Settings
from pixart_core.config import tiny
from pixart_core.loading import save_checkpoint
from tests import pixart_fixtures as pf
from tests import t5_fixtures as tf

STEPS = 3
# Two bins (square, and a wide one), two samplers (sa_solver draws noise at every step), a duplicate.
REQUESTS = [
    {"prompt": "a red cube", "seed": 1, "steps": STEPS},
    {"prompt": "a blue ball", "negative": "blurry", "seed": 2, "steps": STEPS},
    {"prompt": "a wide field", "seed": 3, "width": 384, "height": 192, "steps": STEPS},
    {"prompt": "a green tree", "seed": 4, "steps": STEPS},
    {"prompt": "a noisy sea", "seed": 5, "steps": STEPS, "sampler": "sa_solver"},
    {"prompt": "a noisy sky", "seed": 6, "steps": STEPS, "sampler": "sa_solver"},
    {"prompt": "a red cube", "seed": 1, "steps": STEPS},  # the first again: one output, two lines
]


def write_models(root) -> tuple[Path, Path]:
    root = Path(root)
    config = tiny()
    ckpt = save_checkpoint(pf.random_model(config).state_dict(), config, root / "tiny.safetensors")
    return ckpt, tf.write_tiny_t5_hf_folder(root / "t5")


def write_jobs(path, requests, extra_lines=()) -> Path:
    lines = [json.dumps(r) for r in requests] + list(extra_lines)
    Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return Path(path)


def settings(ckpt, t5, **changes) -> Settings:
    return Settings(model=str(ckpt), t5=str(t5), t5_dtype="fp32", batch_size=4, t5_batch=3, **changes)


def manifest(folder) -> list[dict]:
    return [json.loads(line) for line in (Path(folder) / "manifest.jsonl").read_text().splitlines()]


def outputs(folder, kind="latent") -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(folder).glob(f"*.{kind}"))}
