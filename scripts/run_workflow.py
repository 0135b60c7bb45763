"""Run a ComfyUI workflow headless on a local CPU host and collect its images.

    python scripts/run_workflow.py WORKFLOW.json [--models DIR] [--out DIR] [--base DIR]
                                   [--set NODE_ID.input=value ...]

WORKFLOW is a UI-format workflow (as the canvas saves it), an API-format prompt, or a PNG that
ComfyUI saved. ``--models DIR`` holds model files in ComfyUI's models/ layout (checkpoints/,
diffusion_models/, text_encoders/, vae/, vae_approx/, ...); they are symlinked into the host's
base folder. ``--comfy-dir DIR`` runs that ComfyUI on its own folders (models/, input/, output/,
custom_nodes/ with this pack installed, user/): nothing is written there but what ComfyUI itself
writes, and ``--models`` folders are added as extra model paths instead of links. ``--set 3.seed=42`` (or ``--set "KSampler title.steps=4"``) overrides an input after
conversion; the value is read as JSON when it parses, else as a string.

The saved images are copied to --out (default: output/ in the repository) and their paths
printed one per line on stdout; progress and errors go to stderr. Exit status: 0 on success,
1 when the prompt is refused or fails (with the server's error text), 2 on bad arguments.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

sys.path.insert(0, str(Path(__file__).resolve().parent))
import comfy_host  # noqa: E402
from comfy_host import ComfyHost, HostError, is_api_prompt, load_workflow, workflow_to_api  # noqa: E402

log = logging.getLogger("run_workflow")

VIRTUAL_TYPES = {"Reroute", "PrimitiveNode", "Note", "MarkdownNote"}


def parse_set(spec: str) -> tuple[str, str, Any]:
    """``"NODE.input=value"`` -> (node, input, value); the node part may itself contain dots
    (a title), the input name is what follows the last dot before ``=``."""
    if "=" not in spec:
        raise ValueError(f"--set {spec!r}: expected NODE_ID.input=value")
    target, raw = spec.split("=", 1)
    if "." not in target:
        raise ValueError(f"--set {spec!r}: expected NODE_ID.input=value")
    node, name = target.rsplit(".", 1)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return node.strip(), name.strip(), value


def apply_overrides(api: dict, sets: Iterable[str]) -> dict:
    """Apply ``--set`` overrides to an API prompt in place (node id, or a unique ``_meta.title``)."""
    for spec in sets:
        node, name, value = parse_set(spec)
        if node not in api:
            matches = [nid for nid, entry in api.items() if (entry.get("_meta") or {}).get("title") == node]
            if len(matches) != 1:
                known = ", ".join(f"{nid} ({e.get('class_type')})" for nid, e in api.items())
                raise ValueError(f"--set {spec!r}: no single node {node!r} in the prompt; nodes: {known}")
            node = matches[0]
        inputs = api[node].setdefault("inputs", {})
        if name not in inputs:
            log.warning("--set %s: node %s (%s) had no input %r; adding it", spec, node, api[node].get("class_type"), name)
        inputs[name] = value
        log.info("set %s.%s = %r", node, name, value)
    return api


def to_api(host: ComfyHost, workflow: Mapping) -> dict:
    """API form of ``workflow``; a UI workflow is converted with the host's node schemas, after
    checking every node type is installed (a missing one raises with the import failure)."""
    if is_api_prompt(workflow):
        host.require_nodes(sorted({e["class_type"] for e in workflow.values()}))
        return json.loads(json.dumps(workflow))
    wanted = sorted({n.get("type") for n in workflow.get("nodes", [])
                     if n.get("type") not in VIRTUAL_TYPES and n.get("mode", 0) not in (2, 4)})
    host.require_nodes(wanted)
    return workflow_to_api(workflow, host.object_info())


class _Progress:
    """Reports queue state changes and a heartbeat while a prompt runs (and, verbose, new log lines)."""

    def __init__(self, host: ComfyHost, verbose: bool, every: float = 5.0):
        self.host, self.verbose, self.every = host, verbose, every
        self.state, self.last, self.log_pos = None, 0.0, len(host.log_text())

    def __call__(self, state: str, elapsed: float) -> None:
        if state != self.state or elapsed - self.last >= self.every:
            log.info("%s (%.1f s)", state, elapsed)
            self.state, self.last = state, elapsed
        if self.verbose:
            text = self.host.log_text()
            for line in text[self.log_pos:].replace("\r", "\n").splitlines():
                if line.strip():
                    log.info("host: %s", line.rstrip())
            self.log_pos = len(text)


def execute(host: ComfyHost, workflow: Mapping, out_dir: Path, sets: Iterable[str] = (),
            timeout: float = 3600.0, verbose: bool = False, api_out: Path | None = None) -> list[Path]:
    """Convert, override, queue and wait for ``workflow`` on a started ``host``; copy the saved
    images to ``out_dir`` and return the copies' paths."""
    api = apply_overrides(to_api(host, workflow), sets)
    if api_out is not None:
        api_out.parent.mkdir(parents=True, exist_ok=True)
        api_out.write_text(json.dumps(api, indent=2))
        log.info("API prompt written to %s", api_out)
    t0 = time.monotonic()
    # like the canvas does: SaveImage embeds the UI workflow in the PNG next to the prompt
    extra = None if is_api_prompt(workflow) else {"extra_pnginfo": {"workflow": workflow}}
    prompt_id = host.queue(api, extra_data=extra)
    log.info("queued prompt %s (%d nodes)", prompt_id, len(api))
    entry = host.wait(prompt_id, timeout=timeout, poll=0.25, on_poll=_Progress(host, verbose))
    log.info("finished in %.1f s", time.monotonic() - t0)
    out_dir.mkdir(parents=True, exist_ok=True)
    copies = []
    for src in host.output_images(entry):
        dst = out_dir / src.name
        shutil.copy2(src, dst)
        copies.append(dst)
    if not copies:
        log.warning("the workflow saved no images (no SaveImage output?)")
    return copies


def _cuda_available() -> bool:
    import torch
    return torch.cuda.is_available()


def _prune_dangling_links(models_dir: Path) -> None:
    for path in models_dir.rglob("*"):
        if path.is_symlink() and not path.exists():
            path.unlink()


def extra_model_paths(models_dirs: Iterable[Path], path: Path) -> Path:
    """An extra_model_paths.yaml (ComfyUI's format) that adds each folder's model subfolders."""
    lines = []
    for i, src in enumerate(models_dirs):
        src = Path(src).resolve()
        if not src.is_dir():
            raise HostError(f"models folder {src} does not exist")
        lines.append(f"run_workflow_{i}:")
        lines.append(f"    base_path: {json.dumps(str(src))}")
        lines += [f"    {sub.name}: {json.dumps(sub.name)}" for sub in sorted(src.iterdir()) if sub.is_dir()]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def user_host(comfy_dir: Path, models: list[Path], extra_args: list[str], **kwargs) -> ComfyHost:
    """A host on a user's ComfyUI folders, which must have this pack in custom_nodes/."""
    nodes = comfy_dir / "custom_nodes"
    installed = nodes.is_dir() and any(p.resolve() == comfy_host.REPO for p in nodes.iterdir())
    if not installed:
        raise HostError(f"this pack ({comfy_host.REPO}) is not installed in {nodes}: install it there (README, "
                        "Install), or pass --base DIR to run that ComfyUI on a separate base folder")
    run_dir = comfy_host.REPO / ".cache" / "run"
    if models:
        extra_args = [*extra_args, "--extra-model-paths-config",
                      str(extra_model_paths(models, run_dir / "extra_model_paths.yaml"))]
    return ComfyHost(comfy_dir, extra_args=extra_args, comfy_dir=comfy_dir, pack_dir=None,
                     log_path=run_dir / "comfyui.log", **kwargs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("workflow", type=Path, help="UI- or API-format workflow JSON, or a ComfyUI PNG")
    parser.add_argument("--models", type=Path, action="append", default=[],
                        help="folder in ComfyUI's models/ layout to link in (repeatable)")
    parser.add_argument("--out", type=Path, default=comfy_host.REPO / "output", help="where to copy the images")
    parser.add_argument("--base", type=Path, default=None,
                        help="the host's base directory (custom_nodes/, models/, output/, ...); default "
                             ".cache/run, or with --comfy-dir that ComfyUI's own folders")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="NODE_ID.input=value",
                        help="override an input after conversion (repeatable)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for the prompt")
    parser.add_argument("--port", type=int, default=None, help="port on 127.0.0.1 (default: a free one)")
    parser.add_argument("--api-out", type=Path, default=None, help="also write the API prompt here")
    parser.add_argument("--comfy-dir", type=Path, default=None,
                        help="run this ComfyUI (with this pack installed) on its own folders instead of "
                             "the pinned test host (or set COMFYUI_DIR)")
    parser.add_argument("--extra-arg", action="append", default=[], help="extra main.py argument, written --extra-arg=--flag (repeatable)")
    parser.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto",
                        help="where ComfyUI runs the models (auto: the GPU when torch sees one)")
    parser.add_argument("-v", "--verbose", action="store_true", help="stream the host log")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    try:
        for spec in args.sets:
            parse_set(spec)
        workflow = load_workflow(args.workflow)
    except (OSError, ValueError) as e:
        parser.error(str(e))
    try:
        users = args.base is None and (args.comfy_dir or os.environ.get("COMFYUI_DIR"))
        comfy_dir = comfy_host.ensure_host(args.comfy_dir)
        cpu = args.device == "cpu" or (args.device == "auto" and not _cuda_available())
        if users:
            host = user_host(comfy_dir, args.models, args.extra_arg, port=args.port, cpu=cpu)
        else:
            host = ComfyHost(args.base or comfy_host.REPO / ".cache" / "run", port=args.port,
                             extra_args=args.extra_arg, comfy_dir=comfy_dir, cpu=cpu)
            _prune_dangling_links(host.models_dir)
            for src in args.models:
                made = comfy_host.link_models(src, host.models_dir)
                log.info("linked %d model files from %s", len(made), src)
        with host:
            copies = execute(host, workflow, args.out, args.sets, args.timeout, args.verbose, args.api_out)
    except (HostError, ValueError) as e:
        log.error("%s", e)
        return 1
    for path in copies:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
