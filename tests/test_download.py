"""pixart_core.hub / `python -m pixart_core download` against a stand-in Hub on loopback (tests/hub_standin.py).

A full download through the CLI, a download resumed after a cut connection, a damaged file caught
by its sha256, an unreachable Hub, a gated repository that needs HF_TOKEN, and the file table.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hub_standin import StandInHub
from pixart_core import hub

REPO = Path(__file__).resolve().parent.parent
SIGMA, T5, VAE = "PixArt-Sigma-XL-2-1024-MS.pth", "t5xxl_fp16.safetensors", "sdxl_vae.safetensors"
PAYLOAD = {SIGMA: os.urandom(300_000), T5: os.urandom(120_000), VAE: os.urandom(50_000)}


def repos(payload=PAYLOAD) -> dict[str, dict[str, bytes]]:
    return {"PixArt-alpha/PixArt-Sigma": {SIGMA: payload[SIGMA], "README.md": b"# model card\n"},
            "comfyanonymous/flux_text_encoders": {T5: payload[T5]},
            "stabilityai/sdxl-vae": {VAE: payload[VAE]}}


@pytest.fixture
def standin():
    with StandInHub(repos()) as server:
        yield server


@pytest.fixture(autouse=True)
def _no_token(monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("COMFYUI_MODELS", raising=False)


def cli(args, tmp_path, endpoint, **env):
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    environ.update(HF_ENDPOINT=endpoint, HF_HOME=str(tmp_path / "hf"), HF_HUB_DISABLE_TELEMETRY="1",
                   HF_HUB_DISABLE_XET="1", PYTHONPATH=str(REPO), **env)
    return subprocess.run([sys.executable, "-m", "pixart_core", "download", *args], capture_output=True, text=True,
                          env=environ, cwd=tmp_path, timeout=120)


def test_full_download_through_the_cli(standin, tmp_path):
    models = tmp_path / "ComfyUI" / "models"
    run = cli(["sigma-1024", "--models-dir", str(models)], tmp_path, standin.url)
    assert run.returncode == 0, run.stderr
    for folder, name in (("diffusion_models", SIGMA), ("text_encoders", T5), ("vae", VAE)):
        path = models / folder / name
        assert path.read_bytes() == PAYLOAD[name]
        assert path.stat().st_nlink == 2  # a hard link to the blob in the Hub cache: no second copy
    assert list((tmp_path / "hf" / "hub").glob("models--PixArt-alpha--PixArt-Sigma/blobs/*"))
    total = sum(map(len, PAYLOAD.values()))
    assert f"3 of 3 files to download, {total / 1e6:.1f} MB in all" in run.stdout  # said before it starts
    assert run.stdout.index("in all") < run.stdout.index("(sha256 checked, linked from the cache)")
    assert len([r for r in standin.requests if r[1] == "GET" and r[2].startswith("/cdn/")]) == 3
    # the second run finds everything and downloads nothing
    before = len(standin.requests)
    again = cli(["sigma-1024", "--models-dir", str(models)], tmp_path, standin.url)
    assert again.returncode == 0 and "0 of 3 files to download" in again.stdout
    assert not [r for r in standin.requests[before:] if r[2].startswith("/cdn/")]


def test_resumes_after_a_cut_connection(tmp_path):
    # huggingface_hub writes 10 MiB chunks: a cut after 11 MiB keeps the first one and resumes after it
    big = dict(PAYLOAD, **{SIGMA: os.urandom(12 * 2 ** 20)})
    models = tmp_path / "models"
    with StandInHub(repos(big)) as server:
        server.cut_after[SIGMA] = 11 * 2 ** 20
        hub.download(hub.resolve(["sigma-1024"]), models, endpoint=server.url, cache_dir=tmp_path / "cache",
                     say=lambda s: None)
        ranges = server.downloads(SIGMA)
    assert ranges[0] is None and len(ranges) == 2
    start = int(ranges[1].removeprefix("bytes=").rstrip("-"))
    assert 0 < start <= 11 * 2 ** 20  # the second request asks only for the rest
    assert (models / "diffusion_models" / SIGMA).read_bytes() == big[SIGMA]


def test_damaged_file_is_caught_by_its_hash_and_removed(standin, tmp_path):
    standin.corrupt.add(T5)
    models, cache = tmp_path / "models", tmp_path / "cache"
    with pytest.raises(hub.DownloadError) as err:
        hub.download(hub.resolve(["sigma-1024"]), models, endpoint=standin.url, cache_dir=cache, say=lambda s: None)
    msg = str(err.value)
    assert msg.startswith(f"{T5}: its sha256 does not match the Hub's ") and "removed from the cache" in msg
    assert not (models / "text_encoders" / T5).exists()
    assert not list((cache / "models--comfyanonymous--flux_text_encoders" / "blobs").iterdir())
    standin.corrupt.clear()  # a good copy next time: the next run downloads it again and succeeds
    paths = hub.download(hub.resolve(["sigma-1024"]), models, endpoint=standin.url, cache_dir=cache,
                         say=lambda s: None)
    assert (models / "text_encoders" / T5).read_bytes() == PAYLOAD[T5] and len(paths) == 3
    assert len(standin.downloads(T5)) == 2


def test_unreachable_hub_is_one_sentence(tmp_path):
    import socket
    with socket.socket() as s:  # a port with nothing behind it
        s.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{s.getsockname()[1]}"
    run = cli(["--models-dir", str(tmp_path / "models")], tmp_path, endpoint)
    assert run.returncode == 1
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith(f"error: PixArt-alpha/PixArt-Sigma: cannot reach the Hub at {endpoint} (")
    assert "check the network, or set HF_ENDPOINT to a mirror" in lines[0]
    assert not (tmp_path / "models").exists()


def test_gated_repository_needs_hf_token(tmp_path, monkeypatch):
    with StandInHub(repos(), token="hf_test", gated={"PixArt-alpha/PixArt-Sigma"}) as server:
        files = [hub.FILES[SIGMA]]
        with pytest.raises(hub.DownloadError, match=r"refused access \(HTTP 401\); log in .*set HF_TOKEN"):
            hub.download(files, tmp_path / "m", endpoint=server.url, cache_dir=tmp_path / "c", say=lambda s: None)
        monkeypatch.setenv("HF_TOKEN", "hf_test")
        hub.download(files, tmp_path / "m", endpoint=server.url, cache_dir=tmp_path / "c", say=lambda s: None)
        auth = {(host.split(":")[0], path.split("/")[1]): a for host, _, path, _, a in server.requests}
    assert (tmp_path / "m" / "diffusion_models" / SIGMA).read_bytes() == PAYLOAD[SIGMA]
    assert auth[("127.0.0.1", "api")] == auth[("127.0.0.1", "PixArt-alpha")] == "Bearer hf_test"
    assert auth[("127.0.0.2", "cdn")] is None  # the token never goes to the CDN


def test_present_files_are_kept_and_a_different_one_refused(standin, tmp_path):
    models = tmp_path / "models"
    (models / "checkpoints").mkdir(parents=True)
    (models / "checkpoints" / SIGMA).write_bytes(PAYLOAD[SIGMA])  # the legacy folder counts
    lines = []
    paths = hub.download(hub.resolve(["sigma-1024"]), models, endpoint=standin.url, cache_dir=tmp_path / "c",
                         say=lines.append)
    assert paths[0] == models / "checkpoints" / SIGMA and not standin.downloads(SIGMA)
    assert "2 of 3 files to download" in "\n".join(lines)
    (models / "vae" / VAE).write_bytes(b"x" * 10)  # someone else's file under the release name
    with pytest.raises(hub.DownloadError, match=r"sdxl_vae.safetensors exists but is 10 bytes, not the release's "
                                                r"50,000; move it away"):
        hub.download(hub.resolve(["sigma-1024"]), models, endpoint=standin.url, cache_dir=tmp_path / "c",
                     say=lambda s: None)


def test_missing_huggingface_hub_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(hub.DownloadError, match=r"needs the huggingface_hub package: pip install huggingface_hub$"):
        hub.download([hub.FILES[VAE]], tmp_path, say=lambda s: None)


def test_sets_workflows_and_table():
    assert [f.name for f in hub.resolve(["sigma-2k"], t5="fp8")] == [
        "PixArt-Sigma-XL-2-2K-MS.pth", VAE, "t5xxl_fp8_e4m3fn.safetensors"]
    assert [f.name for f in hub.resolve(["sigma-1024", "sigma-2k"])] == [SIGMA, VAE, T5, "PixArt-Sigma-XL-2-2K-MS.pth"]
    with pytest.raises(ValueError, match="unknown model 'sigma-4096'"):
        hub.resolve(["sigma-4096"])
    wf = json.loads((REPO / "workflows" / "hires_fix_1024_to_2k.json").read_text(encoding="utf-8"))
    assert [f.name for f in hub.files_in_workflow(wf)] == [SIGMA, T5, VAE, "PixArt-Sigma-XL-2-2K-MS.pth"]
    api = {"1": {"class_type": "VAELoader", "inputs": {"vae_name": VAE}}}
    assert hub.files_in_workflow(api) == [hub.FILES[VAE]]
    for f in hub.FILES.values():
        assert f.url == f"https://huggingface.co/{f.repo}/resolve/main/{f.path}"
        assert f.path.endswith(f.name.rsplit(".", 1)[1])  # renamed at most, never converted
        assert f.name.endswith((".pth", ".safetensors", ".bin", ".adapter_config.json"))
    assert hub.FILES[T5].sha256 and len(hub.FILES[VAE].sha256) == 64


def test_every_workflow_carries_its_models():
    """Each node whose widget names a known file lists it where the front end's missing-models
    dialog reads it (properties.models: name, url, directory, hash), and only those files."""
    for path in sorted((REPO / "workflows").glob("*.json")):
        wf = json.loads(path.read_text(encoding="utf-8"))
        listed = 0
        for node in wf["nodes"]:
            named = [v for v in node.get("widgets_values") or [] if isinstance(v, str) and v in hub.FILES]
            models = (node.get("properties") or {}).get("models", [])
            assert [m["name"] for m in models] == named, (path.name, node["type"])
            for m in models:
                f = hub.FILES[m["name"]]
                assert m["url"] == f.url and m["url"].startswith("https://huggingface.co/")
                assert m["directory"] == f.directory  # a models/ folder name, as folder_paths knows it
                assert m.get("hash") == f.sha256 and m.get("hash_type") == ("SHA256" if f.sha256 else None)
                # the dialog downloads these, under the URL's last part; files released only in diffusers
                # layout (transformer/diffusion_pytorch_model.safetensors) cannot match: the workflow's
                # Read-me names the file to rename, and `python -m pixart_core download` names it right
                if m["name"].endswith(".safetensors") and "/" not in f.path:
                    assert m["url"].rsplit("/", 1)[1] == m["name"]
            listed += len(models)
        assert listed >= 3, path.name  # a PixArt model, the T5 and the VAE at least


def test_dry_run_and_where_the_files_go(standin, tmp_path, monkeypatch):
    lines = []
    paths = hub.download(hub.resolve(["sigma-1024"]), tmp_path / "m", endpoint=standin.url, dry_run=True,
                         say=lines.append)
    assert paths == [tmp_path / "m" / d / n for d, n in (("diffusion_models", SIGMA), ("vae", VAE), ("text_encoders", T5))]
    assert not (tmp_path / "m").exists() and not standin.downloads(SIGMA)
    assert lines[-1].startswith("== 3 of 3 files to download, 0.5 MB in all")
    run = cli([], tmp_path, standin.url)  # run from outside any ComfyUI, no COMFYUI_MODELS: it asks
    assert run.returncode == 2 and "say where the models go: --models-dir PATH/TO/ComfyUI/models" in run.stderr
    monkeypatch.setenv("COMFYUI_MODELS", str(tmp_path / "cm"))
    assert hub.default_models_dir() == tmp_path / "cm"
