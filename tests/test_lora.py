"""PixArt LoRAs from every trainer format: pixart_core.lora (names, alpha, conversion) and the
Load PixArt LoRA node on ComfyUI 0.3.75's own patching, checked against W + alpha/r·B·A computed here."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import lora_fixtures as lf
import pixart_fixtures as pf
import t5_fixtures as tf
from pixart_core import lora as core_lora
from pixart_core.__main__ import main as cli
from pixart_core.config import tiny
from pixart_core.loading import save_checkpoint

FORMATS_WITH_T5 = ("diffusers", "onetrainer", "omi", "native", "kohya")
FORMATS = ("peft", "lycoris") + FORMATS_WITH_T5


@pytest.fixture(scope="module")
def core():
    return pf.random_model(tiny())


@pytest.fixture(scope="module")
def factors(core):
    return lf.make_factors(core.state_dict(), core.config.depth, tf.tiny_t5_state_dict())


def expected_weights(core_state, factors, strength=1.0, t5_state=None):
    """Native key -> W + strength·alpha/r·B·A over every module (slices of the fused ones)."""
    table = core_lora.module_table(tiny().depth)
    out = {}
    for module, (a, b) in factors.transformer.items():
        target = table[module]
        w = out.setdefault(target.key, core_state[target.key].detach().float().clone())
        start, rows = target.rows(w.shape[0])
        w[start:start + rows] += lf.expected_delta(a, b, strength=strength).reshape(w[start:start + rows].shape)
    for module, (a, b) in (factors.t5.items() if t5_state is not None else ()):
        key = module + ".weight"
        out[key] = t5_state[key].float() + lf.expected_delta(a, b, strength=strength)
    return out


# -------------------------------------------------------------------------------------------------
# pixart_core.lora (no ComfyUI)
# -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_converts_to_the_same_diffusers_lora(fmt, factors, tmp_path):
    """The converted form (diffusers/PEFT names, alpha everywhere) gives the same B·A·alpha/r per module."""
    path = lf.write(factors, fmt, tmp_path / f"{fmt}.safetensors", t5=fmt in FORMATS_WITH_T5)
    lora = core_lora.read_lora(path)
    assert not lora.unmatched
    assert len(lora.modules("transformer")) == len(factors.transformer)
    assert len(lora.modules("text_encoder")) == (len(factors.t5) if fmt in FORMATS_WITH_T5 else 0)
    for module, (a, b) in factors.transformer.items():
        tensors = core_lora.module_tensors(lora, "transformer." + module)
        assert set(tensors) == {"lora_A.weight", "lora_B.weight", "alpha"}
        assert torch.allclose(core_lora.lora_delta(tensors), lf.expected_delta(a, b), atol=1e-6), module


def test_formats_are_named(factors, tmp_path):
    names = {fmt: set(core_lora.read_lora(lf.write(factors, fmt, tmp_path / f"{fmt}.safetensors")).formats)
             for fmt in FORMATS}
    assert names["lycoris"] == {"SimpleTuner LyCORIS"}
    assert names["onetrainer"] == {"OneTrainer legacy", "OneTrainer legacy T5 (lora_te_)"}
    assert names["omi"] == {"OMI / OneTrainer (native names, split indices)", "OMI T5 (t5.)"}
    assert names["peft"] == {"PEFT (base_model.model.)", "diffusers T5 (text_encoder.)"}


def test_peft_alpha_from_adapter_config_with_patterns(core, tmp_path):
    """PEFT saves no alpha; adapter_config.json's lora_alpha, alpha_pattern and rank_pattern give alpha/r."""
    g = torch.Generator().manual_seed(5)
    D = core.config.hidden_size
    sd = {}
    shapes = {"transformer_blocks.0.attn1.to_q": 4, "transformer_blocks.0.attn1.to_k": 8,
              "transformer_blocks.1.ff.net.2": 4}
    for module, r in shapes.items():
        out_dim, in_dim = (D, 4 * D) if "ff.net.2" in module else (D, D)
        sd[f"base_model.model.{module}.lora_A.weight"] = torch.randn(r, in_dim, generator=g)
        sd[f"base_model.model.{module}.lora_B.weight"] = torch.randn(out_dim, r, generator=g)
    path = tmp_path / "adapter_model.safetensors"
    save_file(sd, str(path))
    (tmp_path / "adapter_config.json").write_text(json.dumps(
        {"r": 4, "lora_alpha": 8, "alpha_pattern": {"attn1.to_k": 32}, "rank_pattern": {"to_k": 8},
         "target_modules": ["to_q", "to_k", "ff.net.2"]}))
    lora = core_lora.read_lora(path)
    alphas = {"transformer_blocks.0.attn1.to_q": 8, "transformer_blocks.0.attn1.to_k": 32,
              "transformer_blocks.1.ff.net.2": 8}
    for module, alpha in alphas.items():
        a = sd[f"base_model.model.{module}.lora_A.weight"]
        b = sd[f"base_model.model.{module}.lora_B.weight"]
        got = core_lora.lora_delta(core_lora.module_tensors(lora, "transformer." + module))
        assert torch.allclose(got, (alpha / a.shape[0]) * b @ a, atol=1e-5), module
    assert "adapter_config.json" in lora.alpha_note and "alpha_pattern" in lora.alpha_note


def test_peft_without_config_says_scale_one(factors, tmp_path):
    path = lf.write(factors, "peft", tmp_path / "x.safetensors", t5=False)
    (tmp_path / "adapter_config.json").unlink()
    lora = core_lora.read_lora(path)
    assert "no adapter_config.json" in lora.alpha_note
    a, b = factors.transformer["proj_out"]
    got = core_lora.lora_delta(core_lora.module_tensors(lora, "transformer.proj_out"))
    assert torch.allclose(got, b.flatten(1) @ a.flatten(1), atol=1e-6)  # alpha = rank


@pytest.mark.parametrize("keys,what", [
    (["lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q.lora_down.weight",
      "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"], "an SDXL LoRA"),
    (["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"], "a Flux"),
    (["transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight",
      "transformer.transformer_blocks.0.ff.net.2.lora_A.weight"], "a Flux"),  # ff.net.2 alone would fit PixArt
])
def test_lora_for_another_model_is_refused_in_one_sentence(keys, what, tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({k: torch.zeros(2, 2) for k in keys}, str(path))
    with pytest.raises(core_lora.LoraError, match=what) as err:
        core_lora.read_lora(path)
    msg = str(err.value)
    assert "other.safetensors" in msg and "not a PixArt LoRA" in msg and "\n" not in msg


def test_cli_inspect_and_convert(factors, tmp_path, capsys):
    src = lf.write(factors, "kohya", tmp_path / "kohya.safetensors")
    assert cli(["lora", "inspect", str(src)]) == 0
    text = capsys.readouterr().out
    assert "kohya-style native names (lora_unet_)" in text and f"transformer: {len(factors.transformer)} modules" in text
    out = tmp_path / "converted.safetensors"
    assert cli(["lora", "convert", str(src), str(out)]) == 0
    converted = load_file(str(out))
    assert all(k.startswith(("transformer.transformer_blocks.", "transformer.", "text_encoder.encoder.block."))
               for k in converted)
    modules = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in converted}
    assert all(f"{m}.alpha" in converted for m in modules)  # alpha included for every module
    # the converted file reads back (as diffusers) to the same weight changes
    again = core_lora.read_lora(out)
    assert set(again.formats) == {"diffusers (transformer.)", "diffusers T5 (text_encoder.)"}
    for module, (a, b) in factors.transformer.items():
        got = core_lora.lora_delta(core_lora.module_tensors(again, "transformer." + module))
        assert torch.allclose(got, lf.expected_delta(a, b), atol=1e-6)
    bad = tmp_path / "sdxl.safetensors"
    save_file({"lora_unet_input_blocks_4_1_proj_in.lora_down.weight": torch.zeros(2, 2)}, str(bad))
    assert cli(["lora", "inspect", str(bad)]) == 2
    assert "not a PixArt LoRA" in capsys.readouterr().err


# -------------------------------------------------------------------------------------------------
# the node, on ComfyUI's patching
# -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def env(core, tmp_path_factory):
    if not tf.COMFY_T5_TOKENIZER_DIR.is_dir():
        pytest.skip("needs the ComfyUI tree: run scripts/build_comfyui_host.sh")
    from test_nodes import _import_comfy_and_pack
    pack = _import_comfy_and_pack()
    import folder_paths
    root = tmp_path_factory.mktemp("lora_models")
    for name in ("diffusion_models", "text_encoders", "loras"):
        (root / name).mkdir()
        folder_paths.add_model_folder_path(name, str(root / name), is_default=True)
    save_checkpoint(core.state_dict(), core.config, root / "diffusion_models" / "tiny_lora_pixart.safetensors")
    tf.write_tiny_t5_single_file(root / "text_encoders" / "tiny_lora_t5.safetensors", "fp32")
    n = pack.nodes
    model = n.PixArtSuiteModelLoader.execute("tiny_lora_pixart.safetensors", "auto", "fp32", "checkpoint",
                                             "avgpool")[0]
    clip = n.PixArtSuiteT5Loader.execute("tiny_lora_t5.safetensors", "fp32", "cpu")[0]
    return pack, n, root, model, clip


def patched(patcher, prefix):
    """Key (without prefix) -> the weight ComfyUI computes when it loads this patcher."""
    import comfy.lora
    import comfy.utils
    out = {}
    for key, patches in patcher.patches.items():
        w = comfy.utils.get_attr(patcher.model, key).detach().float().clone()
        out[key[len(prefix):]] = comfy.lora.calculate_weight(patches, w, key)
    return out


def load(env, fmt, factors, strength=1.0, clip_strength=1.0, name=None):
    pack, n, root, model, clip = env
    folder = root / "loras" / (name or fmt)
    folder.mkdir(exist_ok=True)
    lf.write(factors, fmt, folder / "lora.safetensors", t5=fmt in FORMATS_WITH_T5)
    out = n.PixArtSuiteLoraLoader.execute(model, f"{folder.name}/lora.safetensors", strength, clip, clip_strength)
    return out[0], out[1], out.ui.as_dict()["text"][0]


@pytest.mark.parametrize("fmt", FORMATS)
def test_node_patches_every_format_to_the_same_weights(env, factors, core, fmt):
    model, clip, text = load(env, fmt, factors, strength=0.7, clip_strength=0.5)
    t5_state = tf.tiny_t5_state_dict()
    want = expected_weights(core.state_dict(), factors, strength=0.7)
    got = patched(model, "diffusion_model.")
    assert set(got) == set(want)
    for key in want:
        assert (got[key] - want[key]).abs().max() <= 1e-6, key
    if fmt in FORMATS_WITH_T5:
        got_t5 = patched(clip.patcher, "t5xxl.transformer.")
        want_t5 = {k: v for k, v in expected_weights({}, lf.Factors({}, factors.t5), 0.5, t5_state).items()}
        assert set(got_t5) == set(want_t5)
        for key in want_t5:
            assert (got_t5[key] - want_t5[key]).abs().max() <= 1e-6, key
    n_keys = len(load_file(str(env[2] / "loras" / fmt / "lora.safetensors")))
    assert f"applied {n_keys} of {n_keys} keys" in text and "NOT applied" not in text


def test_same_images_from_two_formats_and_stacking_unpatches(env, factors, core):
    """Sampling through ComfyUI's model management: LyCORIS and OMI files give the same latents, a stacked
    pair gives W + 2·ΔW, and the shared model is unpatched afterwards."""
    import comfy.model_management as mm
    from test_nodes import empty_latent
    pack, n, root, model, clip = env
    pos = n.PixArtSuiteT5TextEncode.execute(clip, "a cat", "α: 120 tokens")[0]
    neg = n.PixArtSuiteT5TextEncode.execute(clip, "", "α: 120 tokens")[0]

    def sample(m):
        null = pack.nodes.sampling.NULL_OFFICIAL
        return n.PixArtSuiteSampler.execute(m, pos, neg, empty_latent(), 0, 3, 4.5, "dpmpp_2m", "dpm_time_uniform",
                                            null, 1.0)[0]["samples"]

    a = sample(load(env, "lycoris", factors)[0])
    b = sample(load(env, "omi", factors)[0])
    base = sample(model)
    assert (a - b).abs().max() <= 1e-6 and (a - base).abs().max() > 1e-3
    once = load(env, "lycoris", factors)[0]
    twice = n.PixArtSuiteLoraLoader.execute(once, "lycoris/lora.safetensors", 1.0, None, 1.0)[0]
    want = expected_weights(core.state_dict(), factors, strength=2.0)
    got = patched(twice, "diffusion_model.")
    assert all((got[k] - want[k]).abs().max() <= 1e-5 for k in want)
    mm.load_models_gpu([twice])
    mm.load_models_gpu([model])
    assert torch.equal(model.model.diffusion_model.blocks[0].attn.qkv.weight, core.blocks[0].attn.qkv.weight)


def test_stock_load_lora_agrees_for_the_formats_it_maps(env, factors):
    import nodes as comfy_nodes
    pack, n, root, model, clip = env
    ours = load(env, "diffusers", factors)[0]
    stock = comfy_nodes.LoraLoader().load_lora(model, clip, "diffusers/lora.safetensors", 1.0, 1.0)[0]
    got, want = patched(stock, "diffusion_model."), patched(ours, "diffusion_model.")
    assert set(got) == set(want) and all(torch.allclose(got[k], want[k], atol=1e-6) for k in want)


def test_loha_and_lokr_through_comfy_adapters(env, core, tmp_path):
    """LyCORIS LoHa/LoKr in SimpleTuner names and OMI split names: W + alpha/r·ΔW, on the q slice."""
    pack, n, root, model, clip = env
    D = core.config.hidden_size
    loha, lokr = lf.loha_factors(D, D), lf.lokr_factors(D, D)
    files = {
        "loha_lycoris": {f"lycoris_transformer_blocks_1_attn1_to_k.{k}": v for k, v in loha.items()},
        "loha_omi": {f"transformer.blocks.1.attn.qkv.1.{k}": v for k, v in loha.items()},
        "lokr_lycoris": {f"lycoris_transformer_blocks_1_attn2_to_v.{k}": v for k, v in lokr.items()},
    }
    alpha = {"alpha": torch.tensor(lf.ALPHA)}
    base = core.state_dict()
    for name, sd in files.items():
        prefix = next(iter(sd)).rsplit(".", 1)[0]
        save_file({**sd, f"{prefix}.alpha": alpha["alpha"]}, str(root / "loras" / f"{name}.safetensors"))
        m, _, _ = (*n.PixArtSuiteLoraLoader.execute(model, f"{name}.safetensors", 1.0, None, 1.0)[:2], None)
        got = patched(m, "diffusion_model.")
        if name.startswith("loha"):
            w = base["blocks.1.attn.qkv.weight"].clone()
            w[D:2 * D] += lf.loha_delta(loha)
            assert (got["blocks.1.attn.qkv.weight"] - w).abs().max() <= 1e-6, name
        else:
            w = base["blocks.1.cross_attn.kv_linear.weight"].clone()
            w[D:] += lf.lokr_delta(lokr)
            assert (got["blocks.1.cross_attn.kv_linear.weight"] - w).abs().max() <= 1e-6, name


def test_keys_that_cannot_apply_are_counted_and_listed(env, factors, core):
    """A block the model lacks, a T5 part without a clip, and a stray tensor: all reported, the rest applied
    (scale_shift_table too: a table is a leaf layer's weight for ComfyUI, pixart_core.ops.Table)."""
    pack, n, root, model, clip = env
    D = core.config.hidden_size
    a, b = factors.transformer["proj_out"]
    sd = {"transformer.proj_out.lora_A.weight": a, "transformer.proj_out.lora_B.weight": b,
          "transformer.proj_out.alpha": torch.tensor(lf.ALPHA),
          "diffusion_model.blocks.0.scale_shift_table.diff": torch.ones(6, D),
          "transformer.transformer_blocks.7.attn1.to_out.0.lora_A.weight": torch.zeros(4, D),
          "transformer.transformer_blocks.7.attn1.to_out.0.lora_B.weight": torch.zeros(D, 4),
          "text_encoder.encoder.block.0.layer.0.SelfAttention.q.lora_A.weight": torch.zeros(4, 32),
          "text_encoder.encoder.block.0.layer.0.SelfAttention.q.lora_B.weight": torch.zeros(32, 4),
          "some_metadata_tensor": torch.zeros(1)}
    save_file(sd, str(root / "loras" / "partial.safetensors"))
    out = n.PixArtSuiteLoraLoader.execute(model, "partial.safetensors", 1.0, None, 1.0)
    text = out.ui.as_dict()["text"][0]
    assert "applied 4 of 9 keys" in text and "NOT applied (5)" in text and "scale_shift_table" not in text
    assert "this model has no blocks.7.attn.proj.weight" in text
    assert "no T5 clip is connected" in text and "some_metadata_tensor (not a LoRA" in text
    assert set(out[0].patches) == {"diffusion_model.final_layer.linear.weight",
                                   "diffusion_model.blocks.0.scale_shift_table.weight"}
    got = patched(out[0], "diffusion_model.")["blocks.0.scale_shift_table.weight"]
    assert torch.equal(got, core.state_dict()["blocks.0.scale_shift_table"] + 1)


def test_node_refuses_an_sdxl_lora_in_one_sentence(env):
    pack, n, root, model, clip = env
    save_file({"lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q.lora_down.weight": torch.zeros(2, 2),
               "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(2, 2)},
              str(root / "loras" / "sdxl_style.safetensors"))
    with pytest.raises(ValueError, match=r"^lora_name: sdxl_style.safetensors is an SDXL LoRA") as err:
        n.PixArtSuiteLoraLoader.execute(model, "sdxl_style.safetensors", 1.0, clip, 1.0)
    assert "\n" not in str(err.value)
