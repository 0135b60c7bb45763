"""The helpers of benchmarks/workflow_memory.py: the reduced-depth byte arithmetic and the streamed
safetensors writer (the measurement itself is slow and not part of the suite)."""
import math

import pytest
import torch
from safetensors.torch import load_file

from benchmarks import workflow_memory as wm
from pixart_core import PixArt
from pixart_core.config import preset


def test_block_param_count_matches_a_real_size_block():
    config = preset("sigma-1024-ms").replace(depth=1, kv_compress_layers=())
    with torch.device("meta"):
        model = PixArt(config)
    real = sum(p.numel() for n, p in model.named_parameters() if n.startswith("blocks.0."))
    assert wm.block_param_count() == real
    # the released 612 M parameters: 28 of these blocks are almost all of it
    assert 27 * real * 4 == wm.missing_bytes(1, 28, real * 4) and 560e6 < 28 * real < 600e6


def test_missing_bytes_refuses_impossible_depths():
    assert wm.missing_bytes(28, 28, 10) == 0
    for bad in (0, 29):
        with pytest.raises(ValueError):
            wm.missing_bytes(bad, 28, 10)


def test_t5_specs_are_t5_v1_1_xxl():
    specs = wm.t5_specs(**wm.T5_XXL)
    total = sum(math.prod(shape) for _, shape in specs)
    assert total == wm.t5_param_count(**wm.T5_XXL)
    assert 4.7e9 < total < 4.8e9  # the encoder of T5 v1.1 XXL: 4.76 G parameters, 9.5 GB in fp16
    assert sum(1 for name, _ in specs if name.endswith("wi_0.weight")) == 24


def test_streamed_safetensors_reads_back(tmp_path):
    specs = wm.t5_specs(d_model=8, d_ff=16, heads=2, d_kv=4, layers=2, vocab=11)
    made = {}

    def fill(name, shape):
        made[name] = torch.randn(shape).half()
        return made[name]

    path = wm.write_safetensors_streamed(tmp_path / "t5.safetensors", specs, fill)
    back = load_file(str(path))
    assert back.keys() == made.keys()
    assert all(torch.equal(back[k], made[k]) for k in made)


def test_training_extra_per_block_counts_checkpoint_and_adam_state():
    d, rank = 1152, 16
    lora = rank * (d + 3 * d) + 3 * rank * (2 * d) + rank * (d + 2 * d) + 2 * rank * (d + 4 * d)
    assert wm.train_extra_per_block(tokens=4096, rank=rank) == 4096 * d * 2 + 4 * lora * 4


def test_controlnet_extrapolation_adds_left_out_blocks_and_copies():
    info = {"block_bytes_fp32": 10, "controlnet_copy_bytes_fp32": 100, "controlnet_copies": 1,
            "alpha_block_bytes_fp32": 10, "alpha_controlnet_copy_bytes_fp32": 100}
    run = {"workflow": "controlnet_canny", "depth": 2, "peak_vmhwm": 1000, "peak_sampled": {"RssAnon": 500}}
    out = wm.extrapolate(run, info)
    assert out["added_bytes"] == 26 * 10 + 12 * 100
    assert wm.extrapolate({**run, "workflow": "controlnet_hed_alpha"}, info)["added_bytes"] == 26 * 10 + 12 * 100
    assert out["peak_full_bytes"] == 1000 + 1460 and out["peak_anon_full_bytes"] == 500 + 1460
    assert wm.controlnet_copies(2) == 1  # copy i feeds block i + 1: fewer copies than base blocks


def test_rrdbnet_is_real_esrgan_x4plus_size():
    sd = wm.rrdbnet_state_dict(**wm.ESRGAN_X4)
    assert sum(v.numel() for v in sd.values()) == 16_697_987  # RealESRGAN_x4plus.pth's params_ema
    assert "body.22.rdb3.conv5.weight" in sd and "body.23.rdb1.conv1.weight" not in sd


def test_log_stage_skips_progress_bars():
    text = "PixArt: T5 ready\nRequested to load AutoencoderKL\r  0%|          | 0/1 [00:00<?, ?it/s]\n"
    assert wm.log_stage(text, "start") == "Requested to load AutoencoderKL"
    assert wm.log_stage(" 50%|#####     | 1/2 [00:02<00:02, 2.1s/it]", "before") == "before"
