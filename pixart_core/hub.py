"""The released model files, where they live on the Hugging Face Hub, and a verified download.

``FILES`` is the one table of known files: the name a ComfyUI models folder (and every workflow,
the README and the loaders) uses, its folder, and its source on the Hub. ``SETS`` groups what one
model needs (weights, T5, VAE). ``download`` fetches files with ``huggingface_hub`` (an optional
dependency: resumable, progress bars, ``HF_ENDPOINT``, ``HF_TOKEN`` and its cache), checks each
file's size and sha256 against the Hub's metadata, and places it in the models folder (a hard
link to the cache blob where the file system allows, else a copy).

The PixArt weights are released only as ``.pth`` (the diffusers repos hold the same model as
``transformer/diffusion_pytorch_model.safetensors``, a name no workflow could tell apart); the
``.pth`` is loaded with ``weights_only=True``. Everything else comes as ``.safetensors``.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping

log = logging.getLogger(__name__)

HUB = "https://huggingface.co"
INSTALL_HINT = "pip install huggingface_hub"


class DownloadError(RuntimeError):
    """A download that cannot go on, in one sentence that says what would work."""


@dataclass(frozen=True)
class HubFile:
    name: str  # the file name in the models folder: what workflows and loaders name
    directory: str  # ComfyUI's model folder for it
    repo: str  # Hugging Face model repository
    path: str  # the file inside the repository
    sha256: str | None = None  # the release's hash, where public copies agree on it (workflows carry it)
    also_in: tuple[str, ...] = ()  # other folders ComfyUI reads this kind of file from
    revision: str = "main"

    @property
    def url(self) -> str:
        return f"{HUB}/{self.repo}/resolve/{self.revision}/{self.path}"

    @property
    def folders(self) -> tuple[str, ...]:
        return (self.directory, *self.also_in)


_DIT = ("checkpoints", "unet")
_TE = ("clip",)
FILES: dict[str, HubFile] = {f.name: f for f in (
    *(HubFile(n, "diffusion_models", "PixArt-alpha/PixArt-Sigma", n, also_in=_DIT) for n in (
        "PixArt-Sigma-XL-2-256x256.pth", "PixArt-Sigma-XL-2-512-MS.pth",
        "PixArt-Sigma-XL-2-1024-MS.pth", "PixArt-Sigma-XL-2-2K-MS.pth")),
    *(HubFile(n, "diffusion_models", "PixArt-alpha/PixArt-alpha", n, also_in=_DIT) for n in (
        "PixArt-XL-2-256x256.pth", "PixArt-XL-2-512x512.pth", "PixArt-XL-2-1024-MS.pth")),
    # the official ControlNet files hold the whole PixArt-α base model too (both loaders read them)
    *(HubFile(n, "controlnet", "PixArt-alpha/PixArt-ControlNet", n) for n in (
        "PixArt-XL-2-512-ControlNet.pth", "PixArt-XL-2-1024-ControlNet.pth")),
    HubFile("t5xxl_fp16.safetensors", "text_encoders", "comfyanonymous/flux_text_encoders",
            "t5xxl_fp16.safetensors", also_in=_TE,
            sha256="6e480b09fae049a72d2a8c5fbccb8d3e92febeb233bbe9dfe7256958a9167635"),
    HubFile("t5xxl_fp8_e4m3fn.safetensors", "text_encoders", "comfyanonymous/flux_text_encoders",
            "t5xxl_fp8_e4m3fn.safetensors", also_in=_TE),
    HubFile("sdxl_vae.safetensors", "vae", "stabilityai/sdxl-vae", "sdxl_vae.safetensors",
            sha256="63aeecb90ff7bc1c115395962d3e803571385b61938377bc7089b36e81e92e2e"),
    # the SDXL VAE retrained to run in fp16 without NaNs (the PixArt-Σ README's VAE link)
    HubFile("sdxl_vae_fp16_fix.safetensors", "vae", "madebyollin/sdxl-vae-fp16-fix", "sdxl_vae.safetensors"),
    # PixArt-α was trained on sd-vae-ft-ema latents
    HubFile("vae-ft-ema-560000-ema-pruned.safetensors", "vae", "stabilityai/sd-vae-ft-ema-original",
            "vae-ft-ema-560000-ema-pruned.safetensors"),
    # few-step models (pixart_core.fewstep): released in diffusers layout only, so the models folder gets
    # the transformer file under the repository's name (the loaders read diffusers keys from one file)
    HubFile("PixArt-LCM-XL-2-1024-MS.safetensors", "diffusion_models", "PixArt-alpha/PixArt-LCM-XL-2-1024-MS",
            "transformer/diffusion_pytorch_model.safetensors", also_in=_DIT),
    HubFile("PixArt-Alpha-DMD-XL-2-512x512.bin", "diffusion_models", "PixArt-alpha/PixArt-Alpha-DMD-XL-2-512x512",
            "transformer/diffusion_pytorch_model.bin", also_in=_DIT),
    # a PEFT LoRA on PixArt-α 1024: its lora_alpha is in adapter_config.json, read from beside the file
    HubFile("flash-pixart.safetensors", "loras", "jasperai/flash-pixart", "adapter_model.safetensors"),
    HubFile("flash-pixart.adapter_config.json", "loras", "jasperai/flash-pixart", "adapter_config.json"),
)}

T5 = {"fp16": "t5xxl_fp16.safetensors", "fp8": "t5xxl_fp8_e4m3fn.safetensors"}
_SIGMA_VAE, _ALPHA_VAE = "sdxl_vae.safetensors", "vae-ft-ema-560000-ema-pruned.safetensors"
# what each model needs; the T5 is chosen separately (T5)
SETS: dict[str, tuple[str, ...]] = {
    "sigma-256": ("PixArt-Sigma-XL-2-256x256.pth", _SIGMA_VAE),
    "sigma-512": ("PixArt-Sigma-XL-2-512-MS.pth", _SIGMA_VAE),
    "sigma-1024": ("PixArt-Sigma-XL-2-1024-MS.pth", _SIGMA_VAE),
    "sigma-2k": ("PixArt-Sigma-XL-2-2K-MS.pth", _SIGMA_VAE),  # also the 4K workflow's weights
    "alpha-256": ("PixArt-XL-2-256x256.pth", _ALPHA_VAE),
    "alpha-512": ("PixArt-XL-2-512x512.pth", _ALPHA_VAE),
    "alpha-1024": ("PixArt-XL-2-1024-MS.pth", _ALPHA_VAE),
    "alpha-1024-controlnet": ("PixArt-XL-2-1024-ControlNet.pth", _ALPHA_VAE),  # the HED ControlNet and its α
    "alpha-1024-lcm": ("PixArt-LCM-XL-2-1024-MS.safetensors", _ALPHA_VAE),  # preset "LCM 4 steps"
    "alpha-512-dmd": ("PixArt-Alpha-DMD-XL-2-512x512.bin", _ALPHA_VAE),  # preset "DMD 1 step"
    "alpha-1024-flash": ("PixArt-XL-2-1024-MS.pth", "flash-pixart.safetensors", "flash-pixart.adapter_config.json",
                         _ALPHA_VAE),  # preset "Flash 4 steps"
}


# the file each loader suggests (its dropdown's default) when the user has none of that kind
RECOMMENDED_MODEL = "PixArt-Sigma-XL-2-1024-MS.pth"
RECOMMENDED_T5 = T5["fp16"]
RECOMMENDED_CONTROLNET = "PixArt-XL-2-1024-ControlNet.pth"  # the only released one (α, HED)
# (file-name pattern, repository) for names outside FILES: converted copies and other variants
_FAMILIES = (
    (r"PixArt-Sigma-XL-2-.*\.(pth|safetensors)", "PixArt-alpha/PixArt-Sigma"),
    (r"PixArt-XL-2-.*-ControlNet\.(pth|safetensors)", "PixArt-alpha/PixArt-ControlNet"),
    (r"PixArt-XL-2-.*\.(pth|safetensors)", "PixArt-alpha/PixArt-alpha"),
    (r"t5xxl_.*\.safetensors", "comfyanonymous/flux_text_encoders"),
)


def where_to_get(name: str) -> str | None:
    """The Hub page to download a file of this name from (for messages about missing files), or None
    for a name this pack does not know."""
    base = str(name).replace("\\", "/").rsplit("/", 1)[-1]
    if base in FILES:
        return f"{HUB}/{FILES[base].repo}"
    for pattern, repo in _FAMILIES:
        if re.fullmatch(pattern, base):
            return f"{HUB}/{repo}"
    return None


def resolve(items: Iterable[str], t5: str = "fp16") -> list[HubFile]:
    """Set names (SETS) and file names (FILES) -> the files, in order, without repeats; a set
    brings the T5 of precision ``t5``."""
    names: list[str] = []
    for item in items:
        if item in SETS:
            names += [*SETS[item], T5[t5]]
        elif item in FILES:
            names.append(item)
        else:
            raise ValueError(f"unknown model {item!r}: name a set ({', '.join(SETS)}) or a file "
                             "(python -m pixart_core download --list shows them)")
    return [FILES[n] for n in dict.fromkeys(names)]


def files_in_workflow(workflow: Mapping) -> list[HubFile]:
    """The known files a UI- or API-format workflow names (in any widget or input value)."""
    if "nodes" in workflow:
        values = [v for node in workflow.get("nodes") or [] for v in (node.get("widgets_values") or [])]
        for sub in ((workflow.get("definitions") or {}).get("subgraphs") or []):
            values += [v for node in sub.get("nodes") or [] for v in (node.get("widgets_values") or [])]
    else:
        values = [v for node in workflow.values() if isinstance(node, dict) for v in (node.get("inputs") or {}).values()]
    return [FILES[v] for v in dict.fromkeys(v for v in values if isinstance(v, str) and v in FILES)]


def default_models_dir() -> Path | None:
    """``$COMFYUI_MODELS``, else the models folder of the ComfyUI this pack is installed in
    (``ComfyUI/custom_nodes/<pack>/pixart_core``), else None."""
    if os.environ.get("COMFYUI_MODELS"):
        return Path(os.environ["COMFYUI_MODELS"]).expanduser()
    pack = Path(__file__).resolve().parent.parent
    if pack.parent.name == "custom_nodes" and (pack.parent.parent / "models").is_dir():
        return pack.parent.parent / "models"
    return None


def gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


# --------------------------------------------------------------------------------------------
# Download
# --------------------------------------------------------------------------------------------

def _hub():
    try:
        import huggingface_hub
    except ImportError:
        raise DownloadError(f"downloading models needs the huggingface_hub package: {INSTALL_HINT}") from None
    return huggingface_hub


def _endpoint(endpoint: str | None) -> str:
    return (endpoint or os.environ.get("HF_ENDPOINT") or HUB).rstrip("/")


def _explain(err: Exception, what: str, endpoint: str) -> DownloadError:
    """One sentence for what went wrong talking to the Hub."""
    status = getattr(getattr(err, "response", None), "status_code", None)
    if status in (401, 403):
        return DownloadError(f"{what}: the Hub at {endpoint} refused access (HTTP {status}); log in with a token "
                             "that may read it (set HF_TOKEN) or accept its licence on its page")
    if status == 404:
        return DownloadError(f"{what}: not found on the Hub at {endpoint} (HTTP 404); check HF_ENDPOINT, or the "
                             "file was moved - download it by hand from its page")
    if status is not None:
        return DownloadError(f"{what}: the Hub at {endpoint} answered HTTP {status}; try again later")
    reason = str(err).splitlines()[0] if str(err) else type(err).__name__
    return DownloadError(f"{what}: cannot reach the Hub at {endpoint} ({reason}); check the network, or set "
                         "HF_ENDPOINT to a mirror")


@dataclass
class Planned:
    file: HubFile
    target: Path  # where it goes in the models folder
    size: int  # bytes, from the Hub
    sha256: str | None  # from the Hub's LFS metadata (None: a small non-LFS file, checked by git blob id)
    blob_id: str | None
    commit: str
    present: Path | None = None  # an existing copy of the right size, anywhere ComfyUI looks


def plan(files: Iterable[HubFile], models_dir: Path, endpoint: str | None = None,
         timeout: float = 20.0) -> list[Planned]:
    """Ask the Hub (one metadata call per repository: commit, size and sha256 of every file) and
    see which files the models folder already holds."""
    hub = _hub()
    endpoint = _endpoint(endpoint)
    api = hub.HfApi(endpoint=endpoint)
    infos: dict[tuple[str, str], object] = {}
    planned = []
    for f in files:
        key = (f.repo, f.revision)
        if key not in infos:
            try:
                infos[key] = api.model_info(f.repo, revision=f.revision, files_metadata=True, timeout=timeout)
            except Exception as e:  # noqa: BLE001 - every failure becomes one sentence
                raise _explain(e, f.repo, endpoint) from None
        info = infos[key]
        sibling = next((s for s in info.siblings or [] if s.rfilename == f.path), None)
        if sibling is None or sibling.size is None:
            raise DownloadError(f"{f.name}: {f.repo} has no file {f.path} at {f.revision} on the Hub at {endpoint}; "
                                "the release may have moved - download it by hand")
        lfs = sibling.lfs
        target = models_dir / f.directory / f.name
        present = next((models_dir / d / f.name for d in f.folders
                        if (models_dir / d / f.name).is_file() and (models_dir / d / f.name).stat().st_size == sibling.size),
                       None)
        if present is None and target.exists():
            raise DownloadError(f"{target} exists but is {target.stat().st_size:,} bytes, not the release's "
                                f"{sibling.size:,}; move it away (or delete it) and run again")
        planned.append(Planned(f, target, sibling.size, lfs.sha256 if lfs else None, sibling.blob_id, info.sha,
                               present))
    return planned


def _digest(path: Path, kind: str, size: int, label: str) -> str:
    """sha256 of the file, or its git blob id (sha1 of a header and the bytes), with a progress bar."""
    from tqdm.auto import tqdm  # huggingface_hub's own dependency
    h = hashlib.sha256() if kind == "sha256" else hashlib.sha1(b"blob %d\0" % size)
    with open(path, "rb") as fh, tqdm(total=size, unit="B", unit_scale=True, desc=f"checking {label}",
                                      disable=size < 2 ** 28, leave=False) as bar:
        while chunk := fh.read(1 << 22):
            h.update(chunk)
            bar.update(len(chunk))
    return h.hexdigest()


def verify(path: Path, p: Planned) -> None:
    """Raise DownloadError unless ``path`` has the Hub's size and hash."""
    size = path.stat().st_size
    if size != p.size:
        raise DownloadError(f"{p.file.name}: downloaded {size:,} bytes, the Hub says {p.size:,}")
    kind, want = ("sha256", p.sha256) if p.sha256 else ("sha1", p.blob_id)
    if want and _digest(path, kind, size, p.file.name) != want:
        raise DownloadError(f"{p.file.name}: its {kind} does not match the Hub's {want}, so the download is damaged")


def _place(blob: Path, target: Path) -> str:
    """Hard-link (or, across file systems, copy) the cache blob to ``target``; returns how."""
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")  # ComfyUI lists no .part files
    part.unlink(missing_ok=True)
    try:
        os.link(blob, part)
        how = "linked from the cache"
    except OSError:
        shutil.copyfile(blob, part)
        how = "copied from the cache"
    os.replace(part, target)
    return how


def fetch(p: Planned, endpoint: str | None = None, cache_dir: str | os.PathLike | None = None,
          say: Callable[[str], None] = print) -> Path:
    """Download one planned file through the Hub cache, verify it, place it; returns the target."""
    hub = _hub()
    endpoint = _endpoint(endpoint)
    try:
        cached = Path(hub.hf_hub_download(p.file.repo, p.file.path, revision=p.commit, cache_dir=cache_dir,
                                          endpoint=endpoint))
    except Exception as e:  # noqa: BLE001
        if isinstance(e, OSError) and "Consistency check failed" in str(e):
            raise DownloadError(f"{p.file.name}: the download ended early or too long ({str(e).splitlines()[0]}); "
                                "run again") from None
        raise _explain(e, p.file.name, endpoint) from None
    blob = cached.resolve()
    try:
        verify(blob, p)
    except DownloadError as e:
        blob.unlink(missing_ok=True)  # never leave a damaged file in the cache
        if cached.is_symlink() or cached.exists():
            cached.unlink()
        raise DownloadError(f"{e}; it was removed from the cache - run the command again to download it anew") from None
    how = _place(blob, p.target)
    say(f"   {p.target}  ({'sha256' if p.sha256 else 'git blob id'} checked, {how})")
    return p.target


def download(files: Iterable[HubFile], models_dir: str | os.PathLike, *, endpoint: str | None = None,
             cache_dir: str | os.PathLike | None = None, dry_run: bool = False,
             say: Callable[[str], None] = print) -> list[Path]:
    """Fetch ``files`` into ``models_dir`` (ComfyUI's models/ layout); says what and how much first
    (through ``say``). Returns the paths of all the files, downloaded or already there."""
    models_dir = Path(models_dir)
    planned = plan(files, models_dir, endpoint)
    todo = [p for p in planned if p.present is None]
    width = max(len(p.file.name) for p in planned)
    for p in planned:
        state = f"present: {p.present}" if p.present else f"from {p.file.repo}"
        say(f"   {p.file.name:<{width}}  {p.file.directory + '/':<18} {gb(p.size):>9}  {state}")
    total = sum(p.size for p in todo)
    say(f"== {len(todo)} of {len(planned)} files to download, {gb(total)} in all, into {models_dir}")
    if dry_run or not todo:
        return [p.present or p.target for p in planned]
    models_dir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(models_dir).free
    if free < total:
        raise DownloadError(f"{models_dir} has {gb(free)} free but the downloads need {gb(total)}; free some space "
                            "or choose another --models-dir")
    for p in todo:
        fetch(p, endpoint, cache_dir, say)
    return [p.present or p.target for p in planned]
