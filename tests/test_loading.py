"""Checkpoint formats, configuration detection, conversion round trips and error messages."""
import json
import pickle

import pytest
import torch
from safetensors.torch import save_file

from pixart_core import PRESETS, PixArt
from pixart_core.config import tiny
from pixart_core.loading import (CheckpointError, convert, describe, detect_config, load_pixart, official_to_diffusers,
                                 read_checkpoint, save_checkpoint)
from pixart_core.model import sincos_pos_embed
from tests.pixart_fixtures import inputs, random_model


def official_sd(model):
    """The official container's contents: the weights plus the stored pos_embed of the training grid."""
    cfg = model.config
    sd = dict(model.state_dict())
    side = cfg.sample_size // cfg.patch_size
    sd["pos_embed"] = sincos_pos_embed(side, side, cfg.hidden_size, cfg.base_size, cfg.pe_interpolation)[None]
    return sd


def write_pth(model, path):
    torch.save({"state_dict": official_sd(model)}, path)
    return path


def same_output(a, b):
    x, t, y, mask = inputs(a.config, height=16, width=20)
    with torch.no_grad():
        return torch.equal(a(x, t, y, mask), b(x, t, y, mask))


@pytest.fixture
def model():
    return random_model(tiny(depth=3)).eval()


def test_official_pth_autodetects_everything(model, tmp_path):
    loaded = load_pixart(write_pth(model, tmp_path / "PixArt-Sigma-XL-2-256x256.pth"))
    assert loaded.layout == "official" and loaded.has_null_embedding
    assert loaded.config == model.config
    assert loaded.sources["sample_size"] == "weights (pos_embed)"
    assert torch.equal(loaded.model.y_embedder.y_embedding.weight, model.y_embedder.y_embedding.weight)
    assert same_output(loaded.model, model)


def test_flat_safetensors_and_comfy_prefixed_checkpoint(model, tmp_path):
    sd = official_sd(model)
    save_file(sd, str(tmp_path / "flat.safetensors"))
    save_file({"model.diffusion_model." + k: v for k, v in sd.items()}, str(tmp_path / "full.safetensors"))
    for name in ("flat.safetensors", "full.safetensors"):
        loaded = load_pixart(tmp_path / name)
        assert loaded.config == model.config and same_output(loaded.model, model)


@pytest.mark.parametrize("form", ["folder", "pipeline_root", "sharded", "single_file"])
def test_diffusers_forms(model, tmp_path, form):
    folder = save_checkpoint(model.state_dict(), model.config, tmp_path / "transformer")
    if form == "pipeline_root":
        target = tmp_path
    elif form == "sharded":
        sd = official_to_diffusers(model.state_dict())
        keys = sorted(sd)
        (folder / "diffusion_pytorch_model.safetensors").unlink()
        halves = {"diffusion_pytorch_model-00001-of-00002.safetensors": keys[: len(keys) // 2],
                  "diffusion_pytorch_model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
        for name, ks in halves.items():
            save_file({k: sd[k].contiguous() for k in ks}, str(folder / name))
        index = {"weight_map": {k: name for name, ks in halves.items() for k in ks}}
        (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
        target = folder
    elif form == "single_file":
        target = save_checkpoint(model.state_dict(), model.config, tmp_path / "pixart.safetensors", layout="diffusers")
    else:
        target = folder
    loaded = load_pixart(target)
    assert loaded.layout == "diffusers"
    assert loaded.config == model.config
    assert same_output(loaded.model, model)


def test_written_diffusers_folder_loads_in_diffusers(model, tmp_path):
    from diffusers import PixArtTransformer2DModel
    folder = save_checkpoint(model.state_dict(), model.config, tmp_path / "transformer")
    twin = PixArtTransformer2DModel.from_pretrained(folder).eval()
    x, t, y, mask = inputs(model.config, height=16, width=16)
    with torch.no_grad():
        ref = twin(x, encoder_hidden_states=y, timestep=t, encoder_attention_mask=mask, return_dict=False)[0]
        ours = model(x, t, y, mask)
    assert ((ours - ref).norm() / ref.norm()).item() <= 1e-5


def test_official_diffusers_official_round_trip_is_bit_identical(model, tmp_path):
    src = write_pth(model, tmp_path / "a.pth")
    convert(src, tmp_path / "b")  # diffusers folder
    convert(tmp_path / "b", tmp_path / "c.pth")
    convert(tmp_path / "c.pth", tmp_path / "d.safetensors", layout="diffusers")
    convert(tmp_path / "d.safetensors", tmp_path / "e.safetensors")
    original = read_checkpoint(src).state_dict
    original.pop("pos_embed")
    for name in ("c.pth", "e.safetensors"):
        back = read_checkpoint(tmp_path / name).state_dict
        assert back.keys() == original.keys()
        assert all(torch.equal(back[k], original[k]) for k in original)


@pytest.mark.parametrize("name,sample,pe", [("sigma-256", 32, 0.5), ("sigma-512", 64, 1.0),
                                             ("sigma-1024-ms", 128, 2.0), ("sigma-2k-ms", 256, 4.0),
                                             ("alpha-256", 32, 1.0), ("alpha-1024-ms", 128, 2.0)])
def test_released_geometry_detected_from_pos_embed(tmp_path, name, sample, pe):
    cfg = PRESETS[name].replace(depth=1, hidden_size=72 * 2, num_heads=2, caption_channels=32)
    model = PixArt(cfg)
    raw = read_checkpoint(write_pth(model, tmp_path / "x.pth"))
    detected, _ = detect_config(raw)
    assert (detected.sample_size, detected.pe_interpolation, detected.family) == (sample, pe, cfg.family)
    assert detected.micro_condition == cfg.micro_condition
    assert detected.model_max_length == cfg.model_max_length and detected.num_heads == 2


def test_kv_and_qk_norm_weights_detected(tmp_path):
    model = random_model(tiny(kv_compress_layers=(1,), qk_norm=True))
    loaded = load_pixart(write_pth(model, tmp_path / "kv.pth"))
    assert loaded.config.kv_compress_layers == (1,) and loaded.config.qk_norm
    assert same_output(loaded.model, model)


def test_size_from_file_name_when_nothing_else_says(model, tmp_path):
    sd = dict(model.state_dict())
    save_file(sd, str(tmp_path / "PixArt-Sigma-XL-2-2K-MS.safetensors"))
    cfg, src = detect_config(read_checkpoint(tmp_path / "PixArt-Sigma-XL-2-2K-MS.safetensors"))
    assert cfg.sample_size == 256 and cfg.pe_interpolation == 4.0 and src["sample_size"] == "file name"


def test_conv_kv_compression_without_weights_gets_average_init(model, tmp_path):
    loaded = load_pixart(write_pth(model, tmp_path / "m.pth"), kv_compress_layers=(2,), kv_compress_mode="conv")
    attn = loaded.model.blocks[2].attn
    assert torch.all(attn.sr.weight == 0.25) and torch.all(attn.sr.bias == 0) and torch.all(attn.norm.weight == 1)


def test_preset_and_weight_dtype(model, tmp_path):
    path = write_pth(model, tmp_path / "m.pth")
    loaded = load_pixart(path, dtype="fp8_e4m3fn", compute_dtype=torch.float32)
    assert loaded.model.blocks[0].mlp.fc1.weight.dtype == torch.float8_e4m3fn
    assert loaded.model.blocks[0].mlp.fc1.bias.dtype == torch.float32
    assert loaded.model.blocks[0].scale_shift_table.weight.dtype == torch.float32
    with pytest.raises(CheckpointError, match="sigma-1024-ms"):
        load_pixart(path, preset="sigma-1024-ms")  # real width: shapes contradict
    with pytest.raises(CheckpointError, match="unknown dtype 'fp12'"):
        load_pixart(path, dtype="fp12")


def test_describe_lists_findings(model, tmp_path):
    text = describe(write_pth(model, tmp_path / "m.pth"))
    assert "layout:      official" in text and "depth:" in text and "weights (pos_embed)" in text


# ---- errors ---------------------------------------------------------------------------------------

def test_other_model_types_are_named(tmp_path):
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4)}, str(tmp_path / "sd15.safetensors"))
    with pytest.raises(CheckpointError, match="sd15.safetensors: this is a Stable Diffusion UNet checkpoint"):
        load_pixart(tmp_path / "sd15.safetensors")
    save_file({"text_model.encoder.layers.0.self_attn.q_proj.weight": torch.zeros(4, 4)}, str(tmp_path / "clip_l.safetensors"))
    with pytest.raises(CheckpointError, match="CLIP text encoder"):
        load_pixart(tmp_path / "clip_l.safetensors")
    save_file({"something.else": torch.zeros(1)}, str(tmp_path / "odd.safetensors"))
    with pytest.raises(CheckpointError, match="not a PixArt checkpoint.*something.else"):
        load_pixart(tmp_path / "odd.safetensors")


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_truncated_files(model, tmp_path, suffix):
    path = tmp_path / ("m" + suffix)
    if suffix == ".pth":
        write_pth(model, path)
    else:
        save_file(official_sd(model), str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"m\%s: cannot read .*truncated or corrupt" % suffix):
        load_pixart(path)


def test_missing_unexpected_and_misshaped_keys(model, tmp_path):
    sd = official_sd(model)
    bad = dict(sd)
    del bad["blocks.1.mlp.fc2.weight"]
    save_file(bad, str(tmp_path / "missing.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing.safetensors.*1 missing keys.*blocks\.1\.mlp\.fc2\.weight"):
        load_pixart(tmp_path / "missing.safetensors")
    bad = dict(sd, **{"blocks.0.extra.weight": torch.zeros(2)})
    save_file(bad, str(tmp_path / "extra.safetensors"))
    with pytest.raises(CheckpointError, match=r"1 unexpected keys.*blocks\.0\.extra\.weight"):
        load_pixart(tmp_path / "extra.safetensors")
    bad = dict(sd, **{"blocks.0.scale_shift_table": torch.zeros(5, 64)})
    save_file(bad, str(tmp_path / "shape.safetensors"))
    with pytest.raises(CheckpointError, match=r"blocks\.0\.scale_shift_table has shape \(5, 64\).*\(6, 64\)"):
        load_pixart(tmp_path / "shape.safetensors")
    bad = dict(sd, **{"blocks.0.scale_shift_table": torch.zeros(6, 64, dtype=torch.int32)})
    save_file(bad, str(tmp_path / "int.safetensors"))
    with pytest.raises(CheckpointError, match="dtype torch.int32"):
        load_pixart(tmp_path / "int.safetensors")


class _Exploit:
    def __reduce__(self):
        return (print, ("this checkpoint ran code",))


def test_pickled_code_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"t_block.1.weight": torch.zeros(1)}, "payload": _Exploit()}, path)
    with pytest.raises(CheckpointError, match="evil.pth: refused.*could run code"):
        load_pixart(path)


def test_missing_path_and_wrong_suffix(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        load_pixart(tmp_path / "nope.pth")
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    with pytest.raises(CheckpointError, match="unsupported file type '.gguf'"):
        load_pixart(tmp_path / "model.gguf")
