"""pixart_core with benchmarks/proposed_model.patch applied, importable as `pixart_core_proposed`,
so the benchmark can time the current and the proposed model side by side on the same weights."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

from .common import REPO

PATCH = os.path.join(REPO, "benchmarks", "proposed_model.patch")
NAME = "pixart_core_proposed"
_STATE = {}


def available() -> str | None:
    """Package name if the patch applies to the current pixart_core/model.py, else None (with a note)."""
    if "name" in _STATE:
        return _STATE["name"]
    name = None
    if os.path.isfile(PATCH):
        root = tempfile.mkdtemp(prefix="pixart_proposed_")
        dst = os.path.join(root, NAME)
        shutil.copytree(os.path.join(REPO, "pixart_core"), dst, ignore=shutil.ignore_patterns("__pycache__"))
        r = subprocess.run(["patch", "-p2", "--batch", "--forward", "-s", "-d", dst, "-i", PATCH],
                           capture_output=True, text=True)
        if r.returncode == 0:
            sys.path.insert(0, root)
            name = NAME
        else:
            print(f"  {PATCH} does not apply to the current pixart_core/model.py "
                  f"(already applied, or model.py changed): {r.stdout.strip()} {r.stderr.strip()}")
    _STATE["name"] = name
    return name
