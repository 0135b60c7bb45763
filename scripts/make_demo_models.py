"""Choose the model files for the demo (scripts/demo.sh) and lay them out for the host.

    python scripts/make_demo_models.py [--out .cache/demo_models] [--comfy-dir ComfyUI] [--download]

workflows/txt2img_1024.json needs three files, named as released (README "Models"):

    diffusion_models/PixArt-Sigma-XL-2-1024-MS.pth   (also accepted in checkpoints/ or unet/)
    text_encoders/t5xxl_fp16.safetensors             (also accepted in clip/)
    vae/sdxl_vae.safetensors

They are looked for, in ComfyUI's layout, in $COMFYUI_MODELS (a models folder, when set), in the
models/ of the ComfyUI named by --comfy-dir or $COMFYUI_DIR, in the models/ of the ComfyUI this
pack is installed in (ComfyUI/custom_nodes/<pack>), and then in models/ of this repository.
With --download, missing ones are first fetched from the Hugging Face Hub into the first of these
folders (``python -m pixart_core download``; an unreachable Hub falls through to the stand-ins).
When all three are found, they are linked into OUT/real/ and the demo runs the real model.
Otherwise small random-weight stand-ins (a depth-2 PixArt, a 32-wide T5 and a TAESD-XL, ~20 MB;
the writers of tests/e2e/pixart_model_fixtures.py) are written to OUT/random/ once, and the
demo's image is noise by design.

Prints one line on stdout, ``real<TAB>FOLDER`` or ``random<TAB>FOLDER`` (FOLDER in ComfyUI's
models/ layout, for run_workflow.py --models); says what it chose, and why, on stderr.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / ".cache" / "demo_models"
FIXTURES_DIR = REPO / "tests" / "e2e"  # pixart_model_fixtures.py: the stand-in writers
REAL_MIN_BYTES = 50 * 2 ** 20  # every released file is far larger; smaller ones are stand-ins

sys.path.insert(0, str(REPO))
from pixart_core import hub  # noqa: E402  (the table of released files, and their download)

DEMO_SET = "sigma-1024"  # what workflows/txt2img_1024.json needs
# (folder the workflow expects, file name, folders it may be found in)
NEEDED = tuple((f.directory, f.name, f.folders) for f in hub.resolve([DEMO_SET]))


def say(msg: str = "") -> None:
    print(msg, file=sys.stderr, flush=True)


def model_roots(comfy_dir: Path | None = None) -> list[Path]:
    roots = []
    if os.environ.get("COMFYUI_MODELS"):
        roots.append(Path(os.environ["COMFYUI_MODELS"]).expanduser())
    comfy_dir = comfy_dir or (Path(os.environ["COMFYUI_DIR"]) if os.environ.get("COMFYUI_DIR") else None)
    if comfy_dir is not None:
        roots.append(comfy_dir.expanduser() / "models")
    if REPO.parent.name == "custom_nodes":  # installed in a ComfyUI: its models folder
        roots.append(REPO.parent.parent / "models")
    roots.append(REPO / "models")
    return list(dict.fromkeys(roots))


def find_real(roots: list[Path]) -> tuple[dict[str, Path], list[str]]:
    """{release name: path} of the files found, and the 'folder/name' of those missing."""
    found, missing = {}, []
    for folder, name, where in NEEDED:
        hit = next((root / sub / name for root in roots for sub in where if (root / sub / name).is_file()), None)
        if hit is None:
            missing.append(f"{folder}/{name}")
        else:
            found[name] = hit
    return found, missing


def link_real(found: dict[str, Path], out: Path) -> Path:
    target_root = out / "real"
    for folder, name, _ in NEEDED:
        link = target_root / folder / name
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(found[name].resolve())
    return target_root


def write_random(out: Path) -> Path:
    target_root = out / "random"
    if all((target_root / folder / name).is_file() for folder, name, _ in NEEDED):
        return target_root  # written before (the writers are deterministic)
    sys.path.insert(0, str(FIXTURES_DIR))
    import pixart_model_fixtures as fx  # noqa: E402  (also puts tests/ and the repo on sys.path)

    fx.write_released_standins(target_root, which=(fx.PIXART_1024, fx.T5_XXL, fx.SDXL_VAE))
    return target_root


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where the demo's model folders go")
    parser.add_argument("--comfy-dir", type=Path, default=None,
                        help="a ComfyUI whose models/ to look in (default: $COMFYUI_DIR)")
    parser.add_argument("--download", action="store_true",
                        help="fetch missing release files from the Hugging Face Hub into the first folder looked in")
    args = parser.parse_args(argv)
    roots = model_roots(args.comfy_dir)
    found, missing = find_real(roots)
    small = [f"{p} ({p.stat().st_size / 2 ** 20:.1f} MB)" for p in found.values() if p.stat().st_size < REAL_MIN_BYTES]
    if (missing or small) and args.download:
        say(f"== Downloading the release files into {roots[0]} (PIXART_DEMO_DOWNLOAD=0 skips this)")
        try:
            hub.download(hub.resolve([DEMO_SET]), roots[0], say=say)
            found, missing = find_real(roots)
            small = [f"{p} ({p.stat().st_size / 2 ** 20:.1f} MB)" for p in found.values()
                     if p.stat().st_size < REAL_MIN_BYTES]
        except hub.DownloadError as e:
            say(f"   no download: {e}")
    if not missing and not small:
        folder = link_real(found, args.out)
        say("== Demo models: REAL weights ==")
        for path in found.values():
            say(f"   {path}  ({path.stat().st_size / 2 ** 30:.2f} GB)")
        print(f"real\t{folder}")
        return 0
    folder = write_random(args.out)
    say("== Demo models: SMALL RANDOM-WEIGHT STAND-INS (the image will be noise, by design) ==")
    say(f"   looked in: {', '.join(str(r) for r in roots)}")
    if missing:
        say(f"   missing:   {', '.join(missing)}")
    if small:
        say(f"   too small to be the released files: {', '.join(small)}")
    say(f"   using:     {folder} (depth-2 PixArt, 32-wide T5, random TAESD-XL under the release names)")
    say("   For real images put the files listed in README.md (Models) in models/ and run again.")
    print(f"random\t{folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
