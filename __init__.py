"""ComfyUI entry point of the PixArt-Σ node pack. The model code lives in pixart_core/ (no ComfyUI imports)."""
try:
    import comfy  # noqa: F401  (only present when ComfyUI imports this pack)
except ImportError:  # imported outside ComfyUI (tools, tests): expose nothing
    pass
else:
    from .nodes import comfy_entrypoint  # noqa: F401
