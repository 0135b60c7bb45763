"""scripts/make_demo_models.py: which models the demo runs, and the stand-ins it writes (no host)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def mdm(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("make_demo_models", REPO / "scripts" / "make_demo_models.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "REPO", tmp_path / "repo")  # ignore real weights in this checkout's models/
    monkeypatch.delenv("COMFYUI_MODELS", raising=False)
    monkeypatch.delenv("COMFYUI_DIR", raising=False)
    return module


def run(mdm, out, capsys, *args) -> tuple[str, Path, str]:
    assert mdm.main(["--out", str(out), *args]) == 0
    captured = capsys.readouterr()
    mode, folder = captured.out.strip().split("\t")
    return mode, Path(folder), captured.err


def big(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.truncate(60 * 2 ** 20)  # sparse: big enough to count as a release file, no disk used
    return path


def test_random_standins_when_nothing_is_there(mdm, tmp_path, capsys):
    mode, folder, err = run(mdm, tmp_path / "out", capsys)
    assert mode == "random" and folder == tmp_path / "out" / "random"
    assert "RANDOM-WEIGHT" in err and "noise" in err and "missing:" in err
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert files == ["diffusion_models/PixArt-Sigma-XL-2-1024-MS.pth", "text_encoders/t5xxl_fp16.safetensors",
                     "vae/sdxl_vae.safetensors"]
    assert sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) < 30 * 2 ** 20


def test_real_weights_from_comfyui_models(mdm, tmp_path, capsys, monkeypatch):
    models = tmp_path / "ComfyUI" / "models"
    big(models / "checkpoints" / "PixArt-Sigma-XL-2-1024-MS.pth")
    big(models / "clip" / "t5xxl_fp16.safetensors")  # legacy folder names count too
    big(models / "vae" / "sdxl_vae.safetensors")
    monkeypatch.setenv("COMFYUI_MODELS", str(models))
    mode, folder, err = run(mdm, tmp_path / "out", capsys)
    assert mode == "real" and "REAL weights" in err
    link = folder / "diffusion_models" / "PixArt-Sigma-XL-2-1024-MS.pth"
    assert link.is_symlink() and link.resolve() == models / "checkpoints" / "PixArt-Sigma-XL-2-1024-MS.pth"
    assert (folder / "text_encoders" / "t5xxl_fp16.safetensors").resolve() == models / "clip" / "t5xxl_fp16.safetensors"


def test_small_or_partial_sets_fall_back_to_random(mdm, tmp_path, capsys):
    models = mdm.REPO / "models"
    big(models / "diffusion_models" / "PixArt-Sigma-XL-2-1024-MS.pth")
    big(models / "text_encoders" / "t5xxl_fp16.safetensors")
    mode, _, err = run(mdm, tmp_path / "out", capsys)
    assert mode == "random" and "missing:   vae/sdxl_vae.safetensors" in err
    (models / "vae").mkdir(parents=True)
    (models / "vae" / "sdxl_vae.safetensors").write_bytes(b"x" * 1000)  # a stand-in, not the release
    mode, _, err = run(mdm, tmp_path / "out", capsys)
    assert mode == "random" and "too small to be the released files" in err



def release_set(models: Path) -> None:
    big(models / "diffusion_models" / "PixArt-Sigma-XL-2-1024-MS.pth")
    big(models / "text_encoders" / "t5xxl_fp16.safetensors")
    big(models / "vae" / "sdxl_vae.safetensors")


def test_real_weights_from_the_comfyui_it_is_pointed_at(mdm, tmp_path, capsys, monkeypatch):
    comfy = tmp_path / "MyComfy"
    release_set(comfy / "models")
    mode, folder, err = run(mdm, tmp_path / "out", capsys, "--comfy-dir", str(comfy))
    assert mode == "real" and (folder / "vae" / "sdxl_vae.safetensors").resolve() == comfy / "models" / "vae" / "sdxl_vae.safetensors"
    monkeypatch.setenv("COMFYUI_DIR", str(comfy))  # the same through the environment run_workflow.py reads
    assert run(mdm, tmp_path / "out2", capsys)[0] == "real"


def test_real_weights_from_the_comfyui_the_pack_is_installed_in(mdm, tmp_path, capsys, monkeypatch):
    comfy = tmp_path / "ComfyUI"
    monkeypatch.setattr(mdm, "REPO", comfy / "custom_nodes" / "ComfyUI-PixArt-Sigma-Suite")
    mode, _, err = run(mdm, tmp_path / "out", capsys)
    assert mode == "random" and f"looked in: {comfy / 'models'}, " in err
    release_set(comfy / "models")
    assert run(mdm, tmp_path / "out", capsys)[0] == "real"


def test_download_fills_the_first_models_folder(mdm, tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants
    from hub_standin import StandInHub
    payload = {"PixArt-Sigma-XL-2-1024-MS.pth": b"p" * 3000, "t5xxl_fp16.safetensors": b"t" * 2000,
               "sdxl_vae.safetensors": b"v" * 1000}
    repos = {"PixArt-alpha/PixArt-Sigma": {"PixArt-Sigma-XL-2-1024-MS.pth": payload["PixArt-Sigma-XL-2-1024-MS.pth"]},
             "comfyanonymous/flux_text_encoders": {"t5xxl_fp16.safetensors": payload["t5xxl_fp16.safetensors"]},
             "stabilityai/sdxl-vae": {"sdxl_vae.safetensors": payload["sdxl_vae.safetensors"]}}
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(mdm, "REAL_MIN_BYTES", 500)  # the stand-in Hub's files count as the release here
    with StandInHub(repos) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        mode, folder, err = run(mdm, tmp_path / "out", capsys, "--download")
    assert mode == "real" and "== Downloading the release files into" in err and "REAL weights" in err
    models = mdm.REPO / "models"
    assert (models / "vae" / "sdxl_vae.safetensors").read_bytes() == payload["sdxl_vae.safetensors"]
    assert (folder / "diffusion_models" / "PixArt-Sigma-XL-2-1024-MS.pth").resolve().parent == models / "diffusion_models"


def test_unreachable_hub_falls_back_to_the_standins(mdm, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens
    mode, _, err = run(mdm, tmp_path / "out", capsys, "--download")
    assert mode == "random" and "no download: PixArt-alpha/PixArt-Sigma: cannot reach the Hub" in err
    assert "SMALL RANDOM-WEIGHT STAND-INS" in err and "For real images put the files" in err
