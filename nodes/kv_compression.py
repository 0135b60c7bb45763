"""PixArt KV Compression: switch key/value token compression on for chosen self-attention layers."""
from __future__ import annotations

from comfy_api.latest import io

from ..pixart_core import KVCompress
from ..pixart_core.model import parse_layers
from .comfy_model import pixart_config_of, with_kv_compression
from .common import CATEGORY, check_widgets, queue_check
from .loaders import KV_MODES


class PixArtSuiteKVCompression(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PixArtSuiteKVCompression",
            display_name="PixArt KV Compression",
            category=CATEGORY,
            description="PixArt-Σ's KV token compression: the chosen self-attention layers attend to keys/values "
                        "pooled ratio x ratio, which makes 2K-4K generation much cheaper. Replaces the model's "
                        "own setting; the weights are shared, not copied.",
            inputs=[
                io.Model.Input("model", tooltip="A model from 'Load PixArt-Σ Model'."),
                io.String.Input("layers", default="14-27",
                                tooltip="Blocks to compress: ranges and numbers such as 14-27 (the deeper half of "
                                        "a 28-block model, as in PixArt-Σ) or 0,2,5-9; 'all'; or 'none' to switch "
                                        "compression off."),
                io.Int.Input("ratio", default=2, min=1, max=8,
                             tooltip="Keys/values are pooled ratio x ratio (2 = 4x fewer tokens); 1 = off."),
                io.Combo.Input("mode", options=list(KV_MODES), default="avgpool",
                               tooltip="avgpool: mean of each patch (no weights needed); conv: the checkpoint's "
                                       "trained conv when it has one for this ratio, else its average "
                                       "initialisation; ave: nearest neighbour; uniform: every ratio-th token."),
            ],
            outputs=[io.Model.Output(tooltip="The same model with KV compression set.")],
        )

    @classmethod
    def validate_inputs(cls, layers):
        # the syntax now; the numbers against the depth once the model is known
        return queue_check(lambda layers: parse_layers(layers, None), layers=layers)

    @classmethod
    def execute(cls, model, layers, ratio, mode) -> io.NodeOutput:
        config = pixart_config_of(model)
        if config is None:
            raise ValueError("model is not from 'Load PixArt-Σ Model'; KV compression needs this pack's PixArt model "
                             "(ComfyUI's native PixArt has no compressed attention) - load it with that node")
        if mode not in KV_MODES:
            raise ValueError(f"mode {mode!r} is not one of {', '.join(KV_MODES)}")
        check_widgets(cls, ratio=ratio)
        kv = KVCompress(parse_layers(layers, config.depth), ratio, mode)
        return io.NodeOutput(with_kv_compression(model, kv))
