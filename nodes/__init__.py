"""The pack's ComfyUI nodes (V3 schema). Imported only inside ComfyUI; the maths lives in pixart_core."""
from __future__ import annotations

from typing_extensions import override

from comfy_api.latest import ComfyExtension, io

from .controlnet import PixArtSuiteControlNetLoader
from .kv_compression import PixArtSuiteKVCompression
from .loaders import PixArtSuiteModelLoader, PixArtSuiteT5Loader
from .lora import PixArtSuiteLoraLoader
from .pag import PixArtSuitePAG
from .resolution import PixArtSuiteResizeCrop, PixArtSuiteResolution
from .sampling import PixArtSuiteCFGGuider, PixArtSuiteSampler, PixArtSuiteSamplerSelect, PixArtSuiteSigmas
from .text_encoder import PixArtSuiteT5TextEncode
from .training import PixArtSuiteValidationLoss

NODES: list[type[io.ComfyNode]] = [
    PixArtSuiteModelLoader,
    PixArtSuiteT5Loader,
    PixArtSuiteT5TextEncode,
    PixArtSuiteSampler,
    PixArtSuiteSamplerSelect,
    PixArtSuiteSigmas,
    PixArtSuiteResolution,
    PixArtSuiteResizeCrop,
    PixArtSuiteKVCompression,
    PixArtSuiteLoraLoader,
    PixArtSuiteControlNetLoader,
    PixArtSuiteValidationLoss,
    PixArtSuiteCFGGuider,
    PixArtSuitePAG,
]


class PixArtSuiteExtension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)


async def comfy_entrypoint() -> PixArtSuiteExtension:
    return PixArtSuiteExtension()


__all__ = ["NODES", "PixArtSuiteExtension", "comfy_entrypoint"]
