"""End-to-end fixtures: one real ComfyUI server (scripts/comfy_host.py) shared by the session.

Fixtures (all session-scoped):
  comfy_host_dir  the ComfyUI tree (built on first use by scripts/build_comfyui_host.sh)
  comfy_base      the host's base folder, models/ already filled by the model writers
  models_dir      comfy_base / "models"
  comfy           a started ComfyHost (this pack symlinked into custom_nodes/); stopped at the end
  comfy_object_info  GET /object_info, fetched once

Model-fixture hook: before the host starts, every module ``tests/e2e/*_fixtures.py`` that defines
``write_models(models_dir: Path) -> None`` is imported (file-name order) and called with the
base's models/ folder (subfolders checkpoints/, diffusion_models/, text_encoders/, vae/,
vae_approx/, ... as ComfyUI names them). vae_fixtures.py adds the TAESD-XL pair that way. To
add tiny PixArt or T5 weights, drop e.g. ``tests/e2e/pixart_fixtures.py`` with such a function:
no edit here is needed. Callables appended to ``MODEL_WRITERS`` (for plugins or conftests that
import this module) run after them.

Tests that talk to the host are marked ``e2e`` (``pytest -m "not e2e"`` skips them).
"""
from __future__ import annotations

import importlib
import logging
import sys
import time
from pathlib import Path
from typing import Callable

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
for _p in (HERE, REPO / "scripts"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import comfy_host  # noqa: E402

MODEL_WRITERS: list[Callable[[Path], None]] = []
FIXTURE_MODULE_GLOB = "*_fixtures.py"
MODEL_SUBDIRS = ("checkpoints", "diffusion_models", "text_encoders", "vae", "vae_approx", "loras")

log = logging.getLogger("e2e")


def pytest_configure(config):
    config.addinivalue_line("markers", "e2e: end-to-end test against a real ComfyUI server (scripts/comfy_host.py)")


def model_writers() -> list[Callable[[Path], None]]:
    """The ``write_models`` functions of tests/e2e/*_fixtures.py, then ``MODEL_WRITERS``."""
    writers = []
    for path in sorted(HERE.glob(FIXTURE_MODULE_GLOB)):
        module = importlib.import_module(path.stem)
        fn = getattr(module, "write_models", None)
        if callable(fn):
            writers.append(fn)
    return writers + [w for w in MODEL_WRITERS if w not in writers]


@pytest.fixture(scope="session")
def comfy_host_dir() -> Path:
    return comfy_host.ensure_host()


@pytest.fixture(scope="session")
def comfy_base(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("comfy_base")
    models = base / "models"
    for sub in MODEL_SUBDIRS:
        (models / sub).mkdir(parents=True, exist_ok=True)
    for writer in model_writers():
        t0 = time.monotonic()
        writer(models)
        log.info("model writer %s.%s: %.1f s", writer.__module__, writer.__qualname__, time.monotonic() - t0)
    return base


@pytest.fixture(scope="session")
def models_dir(comfy_base) -> Path:
    return comfy_base / "models"


@pytest.fixture(scope="session")
def comfy(comfy_host_dir, comfy_base):
    host = comfy_host.ComfyHost(comfy_base, comfy_dir=comfy_host_dir)
    host.start()
    try:
        yield host
    finally:
        host.stop()


@pytest.fixture(scope="session")
def comfy_object_info(comfy) -> dict:
    return comfy.object_info()
