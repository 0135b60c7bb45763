"""Files for tests/e2e/test_stock_interop.py (the model-fixture hook of tests/e2e/conftest.py).

  diffusion_models/interop_model_b.pth       the 1024 stand-in's architecture and grid with other random
                                             weights (seed 5): a second model for ModelMergeSimple
  loras/interop_tables.safetensors           ComfyUI-format diff patches of scale_shift_table (block 0
                                             and the final layer) only: tables that a LoRA patches
  loras/interop_linear.safetensors           a ComfyUI-format LoRA on one linear layer (blocks.1.attn.proj)
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

import pixart_model_fixtures as fx

MODEL_B = "interop_model_b.pth"
TABLE_LORA = "interop_tables.safetensors"
LINEAR_LORA = "interop_linear.safetensors"


def write_models(models_dir) -> None:
    models = Path(models_dir)
    fx.write_tiny_pixart_pth(models / "diffusion_models" / MODEL_B, sample_size=128, seed=5)
    D = fx.tiny_pixart_config(128).hidden_size
    g = torch.Generator().manual_seed(9)
    save_file({"diffusion_model.blocks.0.scale_shift_table.diff": torch.randn(6, D, generator=g),
               "diffusion_model.final_layer.scale_shift_table.diff": torch.randn(2, D, generator=g)},
              str(models / "loras" / TABLE_LORA))
    save_file({"diffusion_model.blocks.1.attn.proj.lora_down.weight": torch.randn(4, D, generator=g),
               "diffusion_model.blocks.1.attn.proj.lora_up.weight": torch.randn(D, 4, generator=g),
               "diffusion_model.blocks.1.attn.proj.alpha": torch.tensor(4.0)},
              str(models / "loras" / LINEAR_LORA))
