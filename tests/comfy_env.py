"""Import ComfyUI 0.3.75's own modules (the test host) into the test process, on CPU."""
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def comfy_root() -> str:
    out = subprocess.run(["bash", os.path.join(REPO, "scripts", "build_comfyui_host.sh")],
                         check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
    return out


def import_comfy():
    """Puts ComfyUI on sys.path with --cpu parsed, as main.py would (see shared/comfyui_host.md)."""
    root = comfy_root()
    if root not in sys.path:
        sys.path.insert(0, root)
    if "comfy.model_management" not in sys.modules:
        argv = sys.argv
        sys.argv = [argv[0], "--cpu"]
        try:
            import comfy.options
            comfy.options.enable_args_parsing()
            import comfy.model_management  # noqa: F401  (parses args now)
        finally:
            sys.argv = argv
    import comfy
    return comfy
