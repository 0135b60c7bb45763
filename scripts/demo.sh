#!/usr/bin/env bash
# The main command: sets up everything on a fresh machine, then runs workflows/txt2img_1024.json
# headless on a local ComfyUI and writes the PNG to output/.
#
#   bash scripts/demo.sh ["a prompt"]
#
# 1. .venv with the pinned CPU torch and the dependencies (scripts/setup_env.sh)
# 2. ComfyUI 0.3.75 in .cache/comfyui, with this pack linked into its custom_nodes
#    (scripts/comfy_host.py build)
# 3. the models (scripts/make_demo_models.py): the released files when they are in models/
#    (this repository, ComfyUI layout), in $COMFYUI_MODELS or in the ComfyUI named by $COMFYUI_DIR;
#    if not, downloaded from the Hugging Face Hub when it is reachable (about 13 GB; set
#    PIXART_DEMO_DOWNLOAD=0 to skip this); otherwise small random-weight stand-ins written to
#    .cache/demo_models - it says which, and random weights give noise
# 4. the workflow, unchanged apart from the prompt when one is given (scripts/run_workflow.py)
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== 1/4 Python environment (.venv)" >&2
bash scripts/setup_env.sh
echo "== 2/4 ComfyUI host" >&2
.venv/bin/python scripts/comfy_host.py build >/dev/null
echo "== 3/4 Models" >&2
download=(--download)
if [ "${PIXART_DEMO_DOWNLOAD:-1}" = 0 ]; then download=(); fi
IFS=$'\t' read -r mode models < <(.venv/bin/python scripts/make_demo_models.py ${download[@]+"${download[@]}"})
if [ -z "${models:-}" ]; then
  echo "demo: scripts/make_demo_models.py gave no models folder" >&2
  exit 1
fi
if [ "$mode" = real ] && ! .venv/bin/python -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
  echo "   note: no GPU visible to torch, so ComfyUI runs on the CPU; 20 steps of the 0.6B model at 1024 px take long there" >&2
fi
sets=()
if [ $# -ge 1 ] && [ -n "$1" ]; then
  sets+=(--set "Positive prompt.text=$1")
fi
echo "== 4/4 Running workflows/txt2img_1024.json" >&2
pngs=$(.venv/bin/python scripts/run_workflow.py workflows/txt2img_1024.json --models "$models" \
  --base .cache/demo_host --out "$PWD/output" ${sets[@]+"${sets[@]}"})
png=$(printf '%s\n' "$pngs" | tail -n 1)
if [ -z "$png" ]; then
  echo "demo: the workflow saved no image" >&2
  exit 1
fi
echo >&2
if [ "$mode" = real ]; then
  echo "Done: PixArt-Σ 1024 image from the real weights:" >&2
else
  echo "Done, with small RANDOM-WEIGHT stand-in models: the image is noise, by design." >&2
  echo "It proves the setup works; put the real files in models/ (README, Models) for real images:" >&2
fi
echo "$png"
