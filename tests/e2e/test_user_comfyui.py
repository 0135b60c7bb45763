"""scripts/run_workflow.py --comfy-dir: a user's ComfyUI runs on its own folders.

The "user's ComfyUI" is the test host's tree seen through links, with its own empty models/,
input/, output/, user/ and this pack installed in custom_nodes/ (as the README's Install does).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import comfy_host

pytestmark = pytest.mark.e2e
SCRIPT = comfy_host.REPO / "scripts" / "run_workflow.py"
OWN = {"custom_nodes", "models", "input", "output", "temp", "user", "extra_model_paths.yaml"}


def users_comfyui(comfy_host_dir: Path, root: Path, install: bool = True) -> Path:
    comfy = root / "ComfyUI"
    for entry in comfy_host_dir.iterdir():
        if entry.name not in OWN:
            (comfy / entry.name).parent.mkdir(parents=True, exist_ok=True)
            (comfy / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())
    for sub in OWN - {"extra_model_paths.yaml"}:
        (comfy / sub).mkdir(parents=True, exist_ok=True)
    if install:
        (comfy / "custom_nodes" / "ComfyUI-PixArt-Sigma-Suite").symlink_to(comfy_host.REPO, target_is_directory=True)
    return comfy


def run(*args, timeout=300):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def test_runs_on_the_users_folders(comfy_host_dir, models_dir, tmp_path):
    comfy = users_comfyui(comfy_host_dir, tmp_path)
    prompt = tmp_path / "decode.json"  # the TAESD-XL stand-in decodes a blank latent: no PixArt weights needed
    prompt.write_text(json.dumps({
        "1": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "2": {"class_type": "VAELoader", "inputs": {"vae_name": "taesdxl"}},
        "3": {"class_type": "VAEDecode", "inputs": {"samples": ["1", 0], "vae": ["2", 0]}},
        "4": {"class_type": "PixArtSuiteResizeCrop", "inputs": {"image": ["3", 0], "width": 32, "height": 32}},
        "5": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "users"}}}))
    proc = run(prompt, "--comfy-dir", comfy, "--models", models_dir, "--out", tmp_path / "copies")
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = sorted((comfy / "output").glob("users_*.png"))
    assert len(saved) == 1  # ComfyUI's own output folder, not the pack's .cache
    assert Path(proc.stdout.split()[-1]) == tmp_path / "copies" / saved[0].name
    # nothing of ours in the user's folders: no links in models/, no server log, no extra config
    assert [p for p in comfy.joinpath("models").rglob("*")] == []
    assert not (comfy / "comfyui.log").exists() and not (comfy / "extra_model_paths.yaml").exists()
    assert (comfy_host.REPO / ".cache" / "run" / "extra_model_paths.yaml").is_file()


def test_refuses_a_comfyui_without_the_pack(comfy_host_dir, tmp_path):
    comfy = users_comfyui(comfy_host_dir, tmp_path, install=False)
    prompt = tmp_path / "p.json"
    prompt.write_text(json.dumps({"1": {"class_type": "EmptyLatentImage", "inputs": {}}}))
    proc = run(prompt, "--comfy-dir", comfy, timeout=120)
    assert proc.returncode == 1
    assert f"is not installed in {comfy / 'custom_nodes'}: install it there" in proc.stderr
    assert list((comfy / "custom_nodes").iterdir()) == []  # nothing was linked into the user's ComfyUI
