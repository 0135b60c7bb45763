"""Where the released model files come from, for messages about missing files (names as the README and
the shipped workflows use them). One table: a downloader should extend it rather than keep its own.
"""
from __future__ import annotations

import re

HUB = "https://huggingface.co/"

# (file-name pattern, the Hugging Face repository that publishes files of that name)
SOURCES = (
    (r"PixArt-Sigma-XL-2-.*\.(pth|safetensors)", "PixArt-alpha/PixArt-Sigma"),
    (r"PixArt-XL-2-.*-ControlNet\.(pth|safetensors)", "PixArt-alpha/PixArt-ControlNet"),
    (r"PixArt-XL-2-.*\.(pth|safetensors)", "PixArt-alpha/PixArt-alpha"),
    (r"t5xxl_.*\.safetensors", "comfyanonymous/flux_text_encoders"),
    (r"sdxl_vae\.safetensors", "stabilityai/sdxl-vae"),
)
# the file each loader suggests (its dropdown's default) when the user has none of that kind
RECOMMENDED_MODEL = "PixArt-Sigma-XL-2-1024-MS.pth"
RECOMMENDED_T5 = "t5xxl_fp16.safetensors"


def where_to_get(name: str) -> str | None:
    """The page to download a released file from, or None for a name this pack does not know."""
    base = str(name).replace("\\", "/").rsplit("/", 1)[-1]
    for pattern, repo in SOURCES:
        if re.fullmatch(pattern, base):
            return HUB + repo
    return None
