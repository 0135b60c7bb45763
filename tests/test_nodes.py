"""The ComfyUI nodes, in-process on ComfyUI 0.3.75 (CPU) with tiny random-weight PixArt and T5 models.

The pack is imported the way ComfyUI imports a custom-node folder (spec_from_file_location on its
__init__.py), models are written to temporary folders registered with folder_paths, and node
`execute` classmethods are called directly. Numbers are checked against pixart_core run by hand.
"""
from __future__ import annotations

import asyncio
import importlib.util
import logging
import math
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

import pixart_fixtures as pf
import t5_fixtures as tf
from pixart_core.config import tiny
from pixart_core.model import caption_mask, masked_captions, sincos_pos_embed
from pixart_core.loading import save_checkpoint

REPO = Path(__file__).resolve().parent.parent
PACK_NAME = "pixart_suite_under_test"  # the folder name ComfyUI would use (may contain dashes on disk)
SIGMA_LATENT_SCALE = 0.13025  # SDXL latent format: LATENT holds model-space latents / 0.13025

pytestmark = pytest.mark.skipif(not tf.COMFY_T5_TOKENIZER_DIR.is_dir(),
                                reason="needs the ComfyUI tree: run scripts/build_comfyui_host.sh")


def _import_comfy_and_pack():
    # transformers 5 treats any importable `torchvision` as real; import its T5 code before the
    # import-only torchvision stand-in (needed by comfy.model_base without a real one) is on sys.path.
    import transformers.models.t5.modeling_t5  # noqa: F401
    sys.path.insert(0, str(REPO / "scripts"))
    import comfy_host
    comfy_host.ensure_host()
    if importlib.util.find_spec("torchvision") is None:
        sys.path.insert(0, str(comfy_host.STUBS_DIR))
    from comfy_env import import_comfy
    import_comfy()
    if PACK_NAME not in sys.modules:
        spec = importlib.util.spec_from_file_location(PACK_NAME, REPO / "__init__.py",
                                                      submodule_search_locations=[str(REPO)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[PACK_NAME] = module
        spec.loader.exec_module(module)
    return sys.modules[PACK_NAME]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: more threads only add overhead
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    pack = _import_comfy_and_pack()
    import folder_paths

    root = tmp_path_factory.mktemp("models")
    for name in ("diffusion_models", "checkpoints", "text_encoders", "diffusers"):
        (root / name).mkdir()
        folder_paths.add_model_folder_path(name, str(root / name), is_default=True)
    core = pf.random_model(tiny())
    save_checkpoint(core.state_dict(), core.config, root / "diffusion_models" / "tiny_pixart.safetensors")
    save_checkpoint(core.state_dict(), core.config, root / "diffusers" / "tiny-pixart-diffusers")
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3)},
              str(root / "checkpoints" / "sd15_like.safetensors"))
    tf.write_tiny_t5_single_file(root / "text_encoders" / "tiny_t5.safetensors", "fp32")
    tf.write_tiny_t5_hf_folder(root / "text_encoders" / "tiny-t5-hf", dtype="fp32")
    tf.write_clip_l_like_file(root / "text_encoders" / "clip_l.safetensors")
    tf.write_clip_l_like_file(root / "checkpoints" / "clip_l_in_checkpoints.safetensors")
    n = pack.nodes
    env = SimpleNamespace(pack=pack, n=n, root=root, core=core.eval(), folder_paths=folder_paths)
    env.model = n.PixArtSuiteModelLoader.execute("tiny_pixart.safetensors", "auto", "fp32", "checkpoint", "avgpool")[0]
    env.clip = n.PixArtSuiteT5Loader.execute("tiny_t5.safetensors", "fp32", "cpu")[0]
    env.pos = n.PixArtSuiteT5TextEncode.execute(env.clip, "a photo of a cat", "α: 120 tokens")[0]
    env.neg = n.PixArtSuiteT5TextEncode.execute(env.clip, "", "α: 120 tokens")[0]
    return env


def empty_latent(batch=1, side=16):
    return {"samples": torch.zeros(batch, 4, side, side)}


def t5_outputs(conditioning) -> torch.Tensor:
    """The T5 outputs at every position, padding included (what the official null attends)."""
    return conditioning[0][1][sys.modules[PACK_NAME].nodes.text_encoder.OUTPUTS_KEY]


def mask_of(conditioning) -> torch.Tensor:
    """(1, L) 0/1 mask of the first entry: its nonzero rows (the pack's T5 zeroes the padding)."""
    return caption_mask(conditioning[0][0]).long()


def one_sentence(err) -> str:
    msg = str(err.value if hasattr(err, "value") else err)
    assert "\n" not in msg and not re.search(r"[.;:]\s+[A-Z][a-z]", msg.replace("PixArt", "pixart")), msg
    return msg


def run_sampler(env, model=None, seed=0, steps=3, cfg=4.5, sampler="dpmpp_2m", grid="dpm_time_uniform",
                null=None, denoise=1.0, latent=None, pos=None, neg=None):
    null = null or env.pack.nodes.sampling.NULL_OFFICIAL
    out = env.n.PixArtSuiteSampler.execute(model or env.model, pos or env.pos, neg or env.neg,
                                           latent or empty_latent(), seed, steps, cfg, sampler, grid, null, denoise)
    return out[0]["samples"]


# -------------------------------------------------------------------------------------------------
# registration and schemas
# -------------------------------------------------------------------------------------------------

def test_every_node_is_registered_documented_and_prefixed(env):
    extension = asyncio.run(env.pack.comfy_entrypoint())
    nodes = asyncio.run(extension.get_node_list())
    assert [c.__name__ for c in nodes] == [c.__name__ for c in env.n.NODES] and len(nodes) == 14
    for cls in nodes:
        schema = cls.GET_SCHEMA()
        assert schema.node_id.startswith("PixArtSuite") and schema.node_id == cls.__name__
        assert schema.category == "PixArt-Σ" and schema.display_name and len(schema.description) > 40
        for i in schema.inputs:
            assert i.tooltip and len(i.tooltip) > 15, (schema.node_id, i.id)
        for o in schema.outputs:
            assert o.tooltip, (schema.node_id, o.id)
        info = cls.INPUT_TYPES()  # what /object_info serves
        assert info["required"]


def test_input_names_and_order(env):
    def names(cls):
        return [i.id for i in cls.GET_SCHEMA().inputs]
    n = env.n
    assert names(n.PixArtSuiteModelLoader) == ["ckpt_name", "preset", "weight_dtype", "kv_compression", "kv_mode"]
    assert names(n.PixArtSuiteT5Loader) == ["t5_name", "dtype", "device"]
    assert names(n.PixArtSuiteT5TextEncode) == ["clip", "text", "max_length"]
    assert names(n.PixArtSuiteSampler) == ["model", "positive", "negative", "latent_image", "seed", "steps", "cfg",
                                           "sampler_name", "step_grid", "null_mask", "denoise", "preset"]
    assert names(n.PixArtSuiteSamplerSelect) == ["sampler_name", "eta"]
    assert names(n.PixArtSuiteSigmas) == ["model", "step_grid", "steps", "denoise"]
    assert names(n.PixArtSuiteResolution) == ["size_class", "aspect_ratio", "width", "height", "batch_size", "model"]
    assert names(n.PixArtSuiteResizeCrop) == ["image", "width", "height"]
    assert names(n.PixArtSuiteKVCompression) == ["model", "layers", "ratio", "mode"]
    assert names(n.PixArtSuitePAG) == ["model", "preset", "layers", "scale", "adaptive_scale"]


def test_file_lists(env):
    loaders = env.pack.nodes.loaders
    models = loaders.pixart_model_choices()
    assert "tiny_pixart.safetensors" in models and "[diffusers] tiny-pixart-diffusers" in models
    t5s = loaders.t5_choices()
    assert "tiny_t5.safetensors" in t5s and "[folder] tiny-t5-hf" in t5s
    assert not any(name.startswith("tiny-t5-hf/") for name in t5s)  # files inside a listed folder are hidden


# -------------------------------------------------------------------------------------------------
# Load PixArt-Σ Model
# -------------------------------------------------------------------------------------------------

def test_loader_model_reproduces_pixart_core(env):
    import comfy.model_base
    x, t, y, mask = pf.inputs(env.core.config, batch=2, height=16, width=16)
    with torch.no_grad():
        want = env.core(x, t, y, mask)[:, :4]
        for model in (env.model, env.n.PixArtSuiteModelLoader.execute(
                "[diffusers] tiny-pixart-diffusers", "auto", "default", "checkpoint", "avgpool")[0]):
            assert isinstance(model.model, comfy.model_base.PixArt)
            got = model.model.diffusion_model(x, t, y, context_mask=mask)
            assert pf.rel_err(got, want) < 1e-6


def test_comfy_linears_hand_out_the_weights_their_forward_uses(env):
    """The folded cross-attention reads q/proj weights through `params_for`: with ComfyUI's plain ops
    that must be what the layer's own forward multiplies by (here with a low-VRAM LoRA-style weight
    function in place); op sets that scale inside forward are left alone (black boxes)."""
    import comfy.ops
    from pixart_core.model import CrossAttention
    wrap = env.pack.nodes.comfy_model.with_readable_linears
    lin = env.model.model.diffusion_model.blocks[0].cross_attn.q_linear
    assert isinstance(lin, comfy.ops.disable_weight_init.Linear)
    x = torch.randn(3, lin.in_features)
    lin.weight_function.append(lambda w: w + 1)
    try:
        w, b = lin.params_for(x)
        assert torch.equal(w, lin.weight + 1)
        assert torch.allclose(torch.nn.functional.linear(x, w, b), lin(x), atol=1e-6)
    finally:
        lin.weight_function.clear()
    assert hasattr(wrap(comfy.ops.manual_cast).Linear, "params_for")
    scaled = comfy.ops.scaled_fp8_ops()
    assert wrap(scaled).Linear is scaled.Linear and not hasattr(scaled.Linear, "params_for")
    assert wrap(scaled).Table is wrap(comfy.ops.manual_cast).Table  # tables are cast layers in every set
    ca = CrossAttention(64, 4, operations=wrap(comfy.ops.manual_cast)).eval()
    for p in ca.parameters():
        torch.nn.init.normal_(p, std=0.3)
    y, x = torch.randn(2, 5, 64), torch.randn(2, 12, 64)
    with torch.no_grad():
        k, v = (t.reshape(2, 5, 4, 16).transpose(1, 2) for t in ca.kv_linear(y).chunk(2, dim=-1))
        folded = ca.folded(x, k, v)
        q = ca.q_linear(x).view(2, 12, 4, 16).transpose(1, 2)
        ref = ca.proj(torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(2, 12, 64))
    assert pf.rel_err(folded, ref) < 1e-6


def test_loader_errors_are_one_sentence(env):
    with pytest.raises(ValueError, match="Stable Diffusion") as err:
        env.n.PixArtSuiteModelLoader.execute("sd15_like.safetensors", "auto", "default", "checkpoint", "avgpool")
    one_sentence(err)
    with pytest.raises(ValueError, match="CLIP text encoder, not a PixArt checkpoint") as err:
        env.n.PixArtSuiteModelLoader.execute("clip_l_in_checkpoints.safetensors", "auto", "default", "checkpoint",
                                             "avgpool")
    one_sentence(err)
    with pytest.raises(ValueError, match="there is no such model folder in .*diffusers; put it there") as err:
        env.n.PixArtSuiteModelLoader.execute("[diffusers] gone", "auto", "default", "checkpoint", "avgpool")
    one_sentence(err)
    with pytest.raises(ValueError, match="ckpt_name 'missing.safetensors'") as err:
        env.n.PixArtSuiteModelLoader.execute("missing.safetensors", "auto", "default", "checkpoint", "avgpool")
    one_sentence(err)


def test_loader_kv_choices(env):
    load = env.n.PixArtSuiteModelLoader.execute
    kv_option = env.pack.nodes.comfy_model.KV_OPTION
    off = load("tiny_pixart.safetensors", "auto", "fp32", "off", "avgpool")[0]
    deep = load("tiny_pixart.safetensors", "auto", "fp32", "deep layers 14-27", "conv")[0]
    every = load("tiny_pixart.safetensors", "auto", "fp32", "all layers", "uniform")[0]
    assert off.model_options["transformer_options"][kv_option].layers == ()
    assert deep.model_options["transformer_options"][kv_option].layers == (1,)  # the deeper half of 2 blocks
    assert every.model_options["transformer_options"][kv_option].layers == (0, 1)
    assert "transformer_options" not in env.model.model_options or \
        kv_option not in env.model.model_options["transformer_options"]


# -------------------------------------------------------------------------------------------------
# Load T5 Encoder (PixArt) + text encoding
# -------------------------------------------------------------------------------------------------

def test_t5_clip_is_a_comfy_clip_and_stock_cliptextencode_gives_the_mask(env):
    import comfy.sd
    import nodes as comfy_nodes
    assert Path(comfy_nodes.__file__).name == "nodes.py", "ComfyUI's nodes.py must win over this pack's nodes/"
    assert isinstance(env.clip, comfy.sd.CLIP)
    core_t5 = env.pack.pixart_core.t5.load_t5(env.root / "text_encoders" / "tiny_t5.safetensors",
                                              dtype=torch.float32, device="cpu")
    want, want_mask = core_t5.encode(["a photo of a cat"], 300)
    (cond, extra), = comfy_nodes.CLIPTextEncode().encode(env.clip, "a photo of a cat")[0]
    outputs = extra[env.n.text_encoder.OUTPUTS_KEY]
    assert cond.shape == outputs.shape == (1, 300, 32)
    assert torch.equal(caption_mask(cond).long(), want_mask)  # the mask travels in the tensor: zero padding rows
    assert torch.allclose(outputs, want, atol=1e-6, rtol=1e-6)
    assert torch.equal(cond, masked_captions(outputs, want_mask))
    (cond2, extra2), = env.n.PixArtSuiteT5TextEncode.execute(env.clip, "a photo of a cat", "Σ: 300 tokens")[0]
    assert torch.equal(cond2, cond) and torch.equal(extra2[env.n.text_encoder.OUTPUTS_KEY], outputs)
    assert env.pos[0][0].shape == (1, 120, 32) and int(caption_mask(env.pos[0][0]).sum()) == 8


def test_t5_from_hf_folder_and_partial_load(env):
    clip = env.n.PixArtSuiteT5Loader.execute("[folder] tiny-t5-hf", "fp32", "auto")[0]
    ref = env.n.PixArtSuiteT5TextEncode.execute(clip, "two dogs", "α: 120 tokens")[0][0][0]
    # The weights are in ComfyUI's cast-capable layer classes: a partial ("lowvram") load still encodes.
    clip.patcher.patch_model(device_to=torch.device("cpu"), lowvram_model_memory=1)
    try:
        assert clip.patcher.model.model_lowvram
        got = clip.cond_stage_model.encode_token_weights(clip.tokenize("two dogs", max_length=120))[0]
    finally:
        clip.patcher.unpatch_model(torch.device("cpu"))
    assert torch.allclose(got, ref, atol=1e-6)


def test_truncation_warning_reaches_log_and_ui(env, caplog):
    text = " ".join(["red apple"] * 80)
    with caplog.at_level(logging.WARNING):
        out = env.n.PixArtSuiteT5TextEncode.execute(env.clip, text, "α: 120 tokens")
    message = out.ui.as_dict()["text"][0]
    assert "cut off" in message and "120" in message
    assert any("cut off" in r.getMessage() for r in caplog.records)
    assert bool(caption_mask(out[0][0][0]).all())
    ok = env.n.PixArtSuiteT5TextEncode.execute(env.clip, "a cat", "α: 120 tokens")
    assert ok.ui.as_dict()["text"][0].startswith("4 of 120")


def test_text_encode_with_a_stock_style_clip(env):
    from comfy.text_encoders.pixart_t5 import PixArtTokenizer

    class StockLike:  # ComfyUI's CLIPLoader(type=pixart) tokenizer; the 4.7B encoder is replaced by a stub
        tokenizer = PixArtTokenizer()

        def tokenize(self, text, **kw):
            return self.tokenizer.tokenize_with_weights(text, **kw)

        def encode_from_tokens_scheduled(self, tokens):
            self.seen = tokens
            return [[torch.zeros(1, len(tokens["t5xxl"][0]), 4096), {"pooled_output": None}]]

    clip = StockLike()
    out = env.n.PixArtSuiteT5TextEncode.execute(clip, " ".join(["red apple"] * 80), "α: 120 tokens")
    seq = clip.seen["t5xxl"][0]
    assert len(seq) == 120 and seq[-1][0] == 1  # cut to 120 with EOS kept
    assert env.n.text_encoder.OUTPUTS_KEY not in out[0][0][1] and "cut off" in out.ui.as_dict()["text"][0]

    class NotT5(StockLike):
        def tokenize(self, text, **kw):
            return {"l": [[(49406, 1.0)]]}

    with pytest.raises(ValueError, match="not a T5") as err:
        env.n.PixArtSuiteT5TextEncode.execute(NotT5(), "x", "Σ: 300 tokens")
    one_sentence(err)


def test_t5_loader_names_a_clip_l_file(env):
    with pytest.raises(ValueError, match="CLIP text encoder") as err:
        env.n.PixArtSuiteT5Loader.execute("clip_l.safetensors", "default", "cpu")
    one_sentence(err)


# -------------------------------------------------------------------------------------------------
# PixArt Sampler
# -------------------------------------------------------------------------------------------------

def reference_sample(env, sampler, seed, steps, cfg, grid, uncond_mask, eta=None, latent=None):
    """pixart_core's sampler + PixArtDenoiser on the same weights, noise and conditioning."""
    import comfy.sample
    core = env.pack.pixart_core
    latent = latent if latent is not None else empty_latent()["samples"]
    noise = comfy.sample.prepare_noise(latent, seed)
    sigmas = core.schedule.make_sigmas(grid, steps)
    x = noise * math.sqrt(1.0 + float(sigmas[0]) ** 2)  # ComfyUI's full-denoise start (VP prior)
    pos, neg = t5_outputs(env.pos), t5_outputs(env.neg)
    denoiser = core.samplers.PixArtDenoiser(env.core)

    def model(x, sigma):
        return denoiser(x, sigma, pos, mask_of(env.pos), neg, uncond_mask, cfg_scale=cfg)

    kwargs = {}
    if sampler in ("sa_solver", "ddim", "lcm"):
        kwargs["generator"] = torch.Generator().manual_seed(seed + 1)
    if sampler == "sa_solver":
        kwargs["tau"] = core.samplers.tau_window(1.0 if eta is None else eta)
    if sampler == "ddim":
        kwargs["eta"] = 0.0 if eta is None else eta
    out = core.samplers.SAMPLERS[sampler](model, x, sigmas, disable=True, **kwargs)
    return out / SIGMA_LATENT_SCALE


@pytest.mark.parametrize("sampler,grid", [("dpmpp_2m", "dpm_time_uniform"), ("sa_solver", "linspace"),
                                          ("euler", "karras"), ("ddim", "trailing")])
def test_sampler_equals_pixart_core(env, sampler, grid):
    got = run_sampler(env, seed=7, steps=4, cfg=4.5, sampler=sampler, grid=grid)
    want = reference_sample(env, sampler, 7, 4, 4.5, grid, mask_of(env.pos))
    assert torch.isfinite(got).all()
    assert pf.rel_err(got, want) < 1e-5


def test_sampler_is_deterministic_and_null_mask_matters(env):
    nodes = env.pack.nodes.sampling
    a, b = run_sampler(env, seed=3), run_sampler(env, seed=3)
    assert torch.equal(a, b)
    assert not torch.allclose(a, run_sampler(env, seed=4))
    own = run_sampler(env, seed=3, null=nodes.NULL_OWN)
    assert pf.rel_err(own, a) > 1e-4
    want_own = reference_sample(env, "dpmpp_2m", 3, 3, 4.5, "dpm_time_uniform", mask_of(env.neg))
    assert pf.rel_err(own, want_own) < 1e-5


def test_sampler_img2img_denoise(env):
    start = {"samples": torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(5))}
    got = run_sampler(env, latent=start, denoise=0.5, steps=2)
    assert got.shape == start["samples"].shape and torch.isfinite(got).all()
    assert torch.equal(run_sampler(env, latent=start, denoise=0.0), start["samples"])


def test_stock_ksampler_runs_on_our_model(env):
    import comfy.sample
    latent = empty_latent()["samples"]
    noise = comfy.sample.prepare_noise(latent, 0)
    out = comfy.sample.sample(env.model, noise, 3, 3.0, "euler", "normal", env.pos, env.neg, latent)
    assert out.shape == latent.shape and torch.isfinite(out).all() and out.abs().sum() > 0


def native_pixart(env):
    """ComfyUI's own PixArt model (model_base.PixArt) with the tiny model's weights, as a MODEL."""
    import comfy.model_patcher
    import comfy.supported_models
    cfg = env.core.config
    config = comfy.supported_models.PixArtSigma({
        "image_model": "pixart_sigma", "input_size": cfg.sample_size, "patch_size": cfg.patch_size,
        "in_channels": cfg.in_channels, "hidden_size": cfg.hidden_size, "depth": cfg.depth,
        "num_heads": cfg.num_heads, "caption_channels": cfg.caption_channels,
        "model_max_length": cfg.model_max_length, "pe_interpolation": 1, "micro_condition": False})
    config.set_inference_dtype(torch.float32, None)
    native = config.get_model({})
    missing, unexpected = native.diffusion_model.load_state_dict(env.core.state_dict(), strict=False)
    assert not unexpected and all("pos_embed" in k for k in missing)
    return comfy.model_patcher.ModelPatcher(native, torch.device("cpu"), torch.device("cpu"))


def test_sampler_accepts_comfyuis_native_pixart_model(env):
    patcher = native_pixart(env)
    out = run_sampler(env, model=patcher, steps=2, latent=empty_latent(side=64))  # native needs >= 34 px latents
    assert out.shape == (1, 4, 64, 64) and torch.isfinite(out).all()
    sigmas = env.n.PixArtSuiteSigmas.execute(patcher, "karras", 5, 1.0)[0]
    assert sigmas.shape == (6,)
    with pytest.raises(ValueError, match="takes 32-wide"):
        run_sampler(env, model=patcher, pos=[[torch.zeros(1, 120, 4096), {}]])
    with pytest.raises(ValueError, match="not from 'Load PixArt-Σ Model'") as err:
        env.n.PixArtSuiteKVCompression.execute(patcher, "all", 2, "avgpool")
    one_sentence(err)


def test_sampler_select_and_step_grid_through_sample_custom(env):
    """SamplerCustom path (our SAMPLER + SIGMAS) = PixArt Sampler with the negative's own mask."""
    import comfy.sample
    n = env.n
    sampler = n.PixArtSuiteSamplerSelect.execute("dpmpp_2m", 1.0)[0]
    sigmas = n.PixArtSuiteSigmas.execute(env.model, "dpm_time_uniform", 3, 1.0)[0]
    assert sigmas.shape == (4,) and float(sigmas[-1]) == 0.0
    latent = empty_latent()["samples"]
    noise = comfy.sample.prepare_noise(latent, 11)
    got = comfy.sample.sample_custom(env.model, noise, 4.5, sampler, sigmas, env.pos, env.neg, latent, seed=11)
    want = run_sampler(env, seed=11, null=env.pack.nodes.sampling.NULL_OWN)
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-6)
    sa = n.PixArtSuiteSamplerSelect.execute("sa_solver", 0.5)[0]
    got = comfy.sample.sample_custom(env.model, noise, 4.5, sa, sigmas, env.pos, env.neg, latent, seed=11)
    want = reference_sample(env, "sa_solver", 11, 3, 4.5, "dpm_time_uniform", mask_of(env.neg), eta=0.5)
    assert pf.rel_err(got, want) < 1e-5


@pytest.mark.parametrize("preset,sampler,grid,steps", [("LCM 4 steps", "lcm", "lcm", 4), ("DMD 1 step", "euler", "dmd", 1),
                                                      ("Flash 4 steps", "lcm", "lcm", 4)])
def test_sampler_presets_override_the_widgets(env, preset, sampler, grid, steps):
    """A preset replaces steps, cfg (1: no guidance), sampler and grid; the widgets' own values are ignored."""
    null = env.pack.nodes.sampling.NULL_OFFICIAL
    got = env.n.PixArtSuiteSampler.execute(env.model, env.pos, env.neg, empty_latent(), 7, 20, 4.5, "dpmpp_2m",
                                           "dpm_time_uniform", null, 1.0, preset)[0]["samples"]
    want = reference_sample(env, sampler, 7, steps, 1.0, grid, mask_of(env.pos))
    assert pf.rel_err(got, want) < 1e-5
    with pytest.raises(ValueError, match="unknown sampling preset 'LCM 2 steps'") as err:
        env.n.PixArtSuiteSampler.execute(env.model, env.pos, env.neg, empty_latent(), 7, 20, 4.5, "dpmpp_2m",
                                         "dpm_time_uniform", null, 1.0, "LCM 2 steps")
    one_sentence(err)


def test_lcm_sampler_and_grid_through_sample_custom(env):
    """SamplerCustom with our lcm SAMPLER and lcm SIGMAS (cfg 1) = the PixArt Sampler's LCM preset."""
    import comfy.sample
    n = env.n
    sampler = n.PixArtSuiteSamplerSelect.execute("lcm", 1.0)[0]
    sigmas = n.PixArtSuiteSigmas.execute(env.model, "lcm", 4, 1.0)[0]
    assert sigmas.shape == (5,) and float(sigmas[-1]) == 0.0
    latent = empty_latent()["samples"]
    noise = comfy.sample.prepare_noise(latent, 11)
    got = comfy.sample.sample_custom(env.model, noise, 1.0, sampler, sigmas, env.pos, env.neg, latent, seed=11)
    want = reference_sample(env, "lcm", 11, 4, 1.0, "lcm", mask_of(env.pos))
    assert pf.rel_err(got, want) < 1e-5
    with pytest.raises(ValueError, match="use the PixArt Sampler with the 'DMD 1 step' preset") as err:
        n.PixArtSuiteSigmas.execute(env.model, "dmd", 1, 1.0)
    one_sentence(err)


def test_sampler_errors_are_one_sentence(env):
    import comfy.model_patcher
    not_pixart = comfy.model_patcher.ModelPatcher(torch.nn.Linear(2, 2), torch.device("cpu"), torch.device("cpu"))
    with pytest.raises(ValueError, match="not a PixArt model") as err:
        run_sampler(env, model=not_pixart)
    one_sentence(err)
    with pytest.raises(ValueError, match="not a PixArt model"):
        env.n.PixArtSuiteSigmas.execute(not_pixart, "linspace", 10, 1.0)
    wide = [[torch.zeros(1, 120, 4096), {}]]
    with pytest.raises(ValueError, match="4096 wide but this model takes 32-wide") as err:
        run_sampler(env, pos=wide)
    one_sentence(err)
    with pytest.raises(ValueError, match="negative embeddings are 4096 wide") as err:
        run_sampler(env, neg=wide)
    one_sentence(err)
    with pytest.raises(ValueError, match="eta must be a number from 0.0 to 10.0, got -1") as err:
        env.n.PixArtSuiteSamplerSelect.execute("ddim", -1.0)
    one_sentence(err)


# -------------------------------------------------------------------------------------------------
# PixArt Resolution, Resize & Crop
# -------------------------------------------------------------------------------------------------

def test_resolution_bins_and_latent(env):
    res = env.n.PixArtSuiteResolution.execute
    w, h, latent = res("1024", "1.00 square", 1024, 1024, 2)
    assert (w, h) == (1024, 1024) and latent["samples"].shape == (2, 4, 128, 128)
    assert latent["samples"].abs().sum() == 0
    w, h, latent = res("1024", "0.57 landscape", 0, 0, 1)[:3]
    assert (h, w) == (768, 1344) and latent["samples"].shape == (1, 4, 96, 168)
    assert res("2048", "custom", 1920, 1088, 1)[:2] == (2688, 1536)  # ratio 0.57 bin of the 2K table
    assert res("from model", "1.75 portrait", 0, 0, 1, env.model)[:2] == (192, 336)  # tiny model: 256 table
    assert res("2880", "1.00 square", 0, 0, 1)[:2] == (2880, 2880)
    assert res("2880", "0.33 landscape", 0, 0, 1)[:2] == (4800, 1600)


def test_resolution_errors_are_one_sentence(env):
    res = env.n.PixArtSuiteResolution.execute
    with pytest.raises(ValueError, match="width 1000 is not a multiple of 16") as err:
        res("1024", "custom", 1000, 1024, 1)
    one_sentence(err)
    with pytest.raises(ValueError, match="height 4112 is larger than 4096 px") as err:
        res("1024", "custom", 1024, 4112, 1)
    one_sentence(err)
    with pytest.raises(ValueError, match="needs the model input connected") as err:
        res("from model", "1.00 square", 1024, 1024, 1)
    one_sentence(err)


def test_resize_crop(env):
    image = torch.rand(2, 30, 40, 3)
    out = env.n.PixArtSuiteResizeCrop.execute(image, 20, 20)[0]
    assert out.shape == (2, 20, 20, 3) and out.min() >= 0 and out.max() <= 1
    same = env.n.PixArtSuiteResizeCrop.execute(image, 40, 30)[0]
    assert torch.equal(same, image)
    want = env.pack.pixart_core.bins.resize_and_center_crop(image.movedim(-1, 1), 20, 20).movedim(1, -1)
    assert torch.allclose(out, want.clamp(0, 1))


# -------------------------------------------------------------------------------------------------
# PixArt KV Compression
# -------------------------------------------------------------------------------------------------

def test_kv_node_changes_the_output(env):
    kv_model = env.n.PixArtSuiteKVCompression.execute(env.model, "0-1", 2, "avgpool")[0]
    assert kv_model is not env.model and kv_model.model is env.model.model  # weights shared
    base = run_sampler(env, seed=1, steps=2)
    compressed = run_sampler(env, model=kv_model, seed=1, steps=2)
    assert pf.rel_err(compressed, base) > 1e-3
    none = env.n.PixArtSuiteKVCompression.execute(env.model, "none", 2, "avgpool")[0]
    assert torch.allclose(run_sampler(env, model=none, seed=1, steps=2), base, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("layers,message", [
    ("abc", "is not a layer list"), ("3-", "is not a layer list"), ("5-2", "runs backwards"),
    ("0,7", "names layer 7, but this model has layers 0-1"),
])
def test_kv_node_bad_layers_are_one_sentence(env, layers, message):
    with pytest.raises(ValueError, match=message) as err:
        env.n.PixArtSuiteKVCompression.execute(env.model, layers, 2, "avgpool")
    one_sentence(err)


def test_kv_layer_parser(env):
    parse = env.pack.nodes.kv_compression.parse_layers  # the one in pixart_core.model, as the node uses it
    assert parse("14-27", 28) == tuple(range(14, 28))
    assert parse(" 0, 2 ,5-9", 28) == (0, 2, 5, 6, 7, 8, 9)
    assert parse("all", 4) == (0, 1, 2, 3) and parse("none", 4) == ()


# -------------------------------------------------------------------------------------------------
# our MODEL and CONDITIONING inside stock ComfyUI machinery
# -------------------------------------------------------------------------------------------------

def test_stock_lora_loading_patches_our_model(env):
    """A diffusers-style PixArt LoRA through ComfyUI's own loader (comfy/lora.py maps keys for any
    model_base.PixArt): the patched q projection equals W + strength · up @ down."""
    import comfy.model_management as mm
    import comfy.sd
    D = env.core.config.hidden_size
    g = torch.Generator().manual_seed(3)
    down, up = torch.randn(4, D, generator=g), torch.randn(D, 4, generator=g)
    lora = {"transformer.transformer_blocks.1.attn1.to_q.lora_A.weight": down,
            "transformer.transformer_blocks.1.attn1.to_q.lora_B.weight": up}
    patched, _ = comfy.sd.load_lora_for_models(env.model, None, lora, 0.5, 0.0)
    assert len(patched.patches) == 1
    mm.load_models_gpu([patched])  # how sampling loads it: the patcher in use applies its patches
    qkv = patched.model.diffusion_model.blocks[1].attn.qkv.weight.detach().clone()
    mm.load_models_gpu([env.model])
    base = env.core.blocks[1].attn.qkv.weight.detach()
    assert torch.allclose(qkv[:D], base[:D] + 0.5 * up @ down, atol=1e-5)
    assert torch.equal(qkv[D:], base[D:])  # k and v untouched
    assert torch.equal(env.model.model.diffusion_model.blocks[1].attn.qkv.weight, base)  # unpatched again


def test_stock_conditioning_nodes_keep_our_mask(env):
    """ConditioningCombine / SetTimestepRange chains carry our mask (in the tensor) through to sampling."""
    import nodes as comfy_nodes
    combined = comfy_nodes.ConditioningCombine().combine(env.pos, env.pos)[0]
    assert len(combined) == 2 and all(torch.equal(c, env.pos[0][0]) for c, _ in combined)
    early = comfy_nodes.ConditioningSetTimestepRange().set_range(env.pos, 0.0, 0.5)[0]
    late = comfy_nodes.ConditioningSetTimestepRange().set_range(env.pos, 0.5, 1.0)[0]
    split = early + late
    # the two halves of one prompt over the two halves of the schedule sample like the prompt itself
    assert torch.allclose(run_sampler(env, pos=split), run_sampler(env), atol=1e-5)


# -------------------------------------------------------------------------------------------------
# input checks at queue time and at run time (issue #10); the real host: tests/e2e/test_reliability.py
# -------------------------------------------------------------------------------------------------

def test_validate_inputs_refuse_what_execute_would(env):
    nan = float("nan")
    assert env.n.PixArtSuiteSampler.validate_inputs(cfg=4.5, denoise=1.0) is True
    assert env.n.PixArtSuiteSampler.validate_inputs(cfg=None, denoise=None) is True  # linked: checked when run
    assert env.n.PixArtSuiteSampler.validate_inputs(cfg=nan, denoise=1.0) == "cfg must be a finite number, got nan"
    assert env.n.PixArtSuiteSampler.validate_inputs(cfg=101.0, denoise=1.0) == ("cfg must be a number from 0.0 to "
                                                                                "100.0, got 101")
    with pytest.raises(ValueError, match="cfg must be a finite number, got nan") as err:  # a linked NaN
        run_sampler(env, cfg=nan)
    one_sentence(err)
    with pytest.raises(ValueError, match="seed must be a whole number from 0 to 18446744073709551615, got -1"):
        run_sampler(env, seed=-1)
    assert env.n.PixArtSuiteKVCompression.validate_inputs(layers="14-27") is True  # depth unknown until run
    assert env.n.PixArtSuiteKVCompression.validate_inputs(layers="1-2-3").startswith("layers '1-2-3' is not a layer")
    assert env.n.PixArtSuiteT5TextEncode.validate_inputs(text="x" * 100_001).startswith(
        "text is 100,001 characters long")
    assert env.n.PixArtSuiteModelLoader.validate_inputs(ckpt_name="tiny_pixart.safetensors") is True
    assert env.n.PixArtSuiteModelLoader.validate_inputs(ckpt_name="PixArt-XL-2-1024-MS.pth").endswith(
        "(download it from https://huggingface.co/PixArt-alpha/PixArt-alpha), then press R to refresh the list")
    assert env.n.PixArtSuiteT5Loader.validate_inputs(t5_name="[folder] tiny-t5-hf") is True


def test_sizes_that_cannot_fit_are_refused_with_the_figure(env, monkeypatch):
    checks = sys.modules[f"{PACK_NAME}.pixart_core.checks"]  # the pack's own copy, as ComfyUI imports it
    monkeypatch.setattr(checks, "device_memory", lambda device="cpu": 64 << 20)
    with pytest.raises(ValueError) as err:
        env.n.PixArtSuiteResolution.execute("4096", "1.00 square", 1024, 1024, 64)
    assert str(err.value) == ("an empty latent of 64 x 4096x4096 px would need at least 256.0 MiB, more than the "
                              "64.0 MiB of memory this machine has; use a smaller batch_size")
    with pytest.raises(ValueError) as err:
        run_sampler(env, latent=empty_latent(batch=4096))
    assert str(err.value) == ("sampling 4096 image(s) of 128x128 px would need at least 256.0 MiB, more than the "
                              "64.0 MiB of memory this machine has; use a smaller batch or size")
    with pytest.raises(ValueError, match=r"covering 16384x16 px from 128x16 px images \(scaled to 16384x2048 before "
                                         r"the crop\) would need at least 384.0 MiB"):
        env.n.PixArtSuiteResizeCrop.execute(torch.zeros(1, 16, 128, 3), 16384, 16)


def test_dropdowns_default_to_the_file_to_get(env):
    loaders = env.pack.nodes.loaders
    assert loaders.default_choice([], "PixArt-Sigma-XL-2-1024-MS.pth") == "PixArt-Sigma-XL-2-1024-MS.pth"
    assert loaders.default_choice(["a.pth", "PixArt-Sigma-XL-2-1024-MS.pth"], "PixArt-Sigma-XL-2-1024-MS.pth") == \
        "PixArt-Sigma-XL-2-1024-MS.pth"
    assert loaders.default_choice(["a.pth"], "PixArt-Sigma-XL-2-1024-MS.pth") == "a.pth"
    ckpt = next(i for i in env.n.PixArtSuiteModelLoader.GET_SCHEMA().inputs if i.id == "ckpt_name")
    assert "PixArt-Sigma-XL-2-1024-MS.pth" not in ckpt.options  # this env has no release file: the first one
    assert ckpt.default == ckpt.options[0] and ckpt.default.endswith(".safetensors")


def test_queue_time_checks_pass_when_every_checked_input_is_linked(env):
    # a linked input is None when the prompt is queued (its value comes later): nothing to refuse yet
    import inspect
    for cls in env.n.NODES:
        validate = getattr(cls, "validate_inputs", None)
        if validate is None or not cls.__dict__.get("validate_inputs"):
            continue
        names = [p for p in inspect.signature(validate).parameters]
        assert validate(**{n: None for n in names}) is True, cls.__name__


# -------------------------------------------------------------------------------------------------
# stock-node interop in process (issue #15; the host runs the stock nodes: tests/e2e/test_stock_interop.py)
# -------------------------------------------------------------------------------------------------

def test_comfyuis_own_pixart_model_gets_only_the_attended_tokens(env):
    """ComfyUI's own PixArt has no caption mask: the PixArt Sampler / CFG Guider hand it only the tokens
    the mask keeps (the official null's too), so it attends as ours does; below 264 px it would divide by
    zero, which the sampler says in one sentence."""
    sampling = env.pack.nodes.sampling
    patcher = native_pixart(env)
    with pytest.raises(ValueError) as err:
        run_sampler(env, model=patcher, latent=empty_latent(side=32))
    assert one_sentence(err) == (
        "ComfyUI's own PixArt model cannot sample 256x256: it derives its position embedding from the size and "
        "divides by zero below (width + height) / 2 = 264 px; use a larger size, or load the model with "
        "'Load PixArt-Σ Model', which samples any size")
    guider = sampling.PixArtGuider(patcher)
    guider.set_conds(env.pos, env.neg)
    pos, neg = (guider.original_conds[k][0]["cross_attn"] for k in ("positive", "negative"))
    assert pos.shape == neg.shape == (1, 8, 32)
    assert torch.equal(neg, t5_outputs(env.neg)[:, :8])  # T5("") over the prompt's 8 tokens: the official null
    g = torch.Generator().manual_seed(3)
    x, t = torch.randn(1, 4, 64, 64, generator=g), torch.tensor([500.0])  # 512 px: the tiny model's own size
    with torch.no_grad():
        ours = env.model.model.diffusion_model(x, t, env.pos[0][0])
        assert pf.rel_err(patcher.model.diffusion_model(x, t, pos), ours) < 1e-5
        assert pf.rel_err(patcher.model.diffusion_model(x, t, env.pos[0][0]), ours) > 1e-3  # padding attended


def test_tables_take_patches_when_comfyui_loads_the_model_partially(env):
    """A patch on scale_shift_table (LoRA, merge) applies when ComfyUI loads the model in low-VRAM mode too
    (the table is a cast layer: ComfyTable), exactly as when it loads it whole."""
    key = "diffusion_model.blocks.0.scale_shift_table.weight"
    patched = env.model.clone()
    assert patched.add_patches({key: ("diff", (torch.full((6, 64), 0.25),))}, 1.0) == [key]
    g = torch.Generator().manual_seed(4)
    x, t, y = torch.randn(1, 4, 16, 16, generator=g), torch.tensor([300.0]), env.pos[0][0]
    dm = patched.model.diffusion_model
    with torch.no_grad():
        plain = dm(x, t, y)
        outs = []
        for low_vram in (1, 0):
            patched.patch_model(device_to=torch.device("cpu"), lowvram_model_memory=low_vram)
            try:
                assert patched.model.model_lowvram == bool(low_vram)
                outs.append(dm(x, t, y))
            finally:
                patched.unpatch_model(torch.device("cpu"))
        assert torch.equal(dm(x, t, y), plain)  # unpatched again
    assert pf.rel_err(outs[0], outs[1]) < 1e-6 and pf.rel_err(outs[1], plain) > 1e-3


def test_saved_model_loads_in_comfyuis_loader_as_its_file_did(env, tmp_path):
    """ModelSave writes the release's pos_embed: ComfyUI's Load Diffusion Model reads the grid and PE scale
    from it, so the saved file gives the function its source file gave there, and ours reloads it exactly.
    ComfyUI's detection takes only 1152-wide, 16-head, T5-XXL models: a one-block one."""
    import comfy.sd
    from comfy_extras.nodes_model_merging import save_checkpoint as model_save
    from pixart_core import PRESETS
    config = PRESETS["sigma-1024-ms"].replace(depth=1, kv_compress_layers=())
    sd = {k: v.contiguous() for k, v in pf.random_model(config, seed=2).state_dict().items()}
    sd["pos_embed"] = sincos_pos_embed(64, 64, 1152, config.base_size, config.pe_interpolation)[None]
    source = tmp_path / "one_block.safetensors"
    save_file(sd, str(source))
    ours = env.pack.nodes.comfy_model.load_model(source)
    model_save(ours, filename_prefix="saved", output_dir=str(tmp_path))
    saved = tmp_path / "saved_00001_.safetensors"
    g = torch.Generator().manual_seed(5)
    # 320 px, off the model's 1024: ComfyUI's position embedding depends on the pe_interpolation it detected
    x, t, y = torch.randn(1, 4, 40, 40, generator=g), torch.tensor([400.0]), torch.randn(1, 12, 4096, generator=g)
    with torch.no_grad():
        want = comfy.sd.load_diffusion_model(str(source)).model.diffusion_model(x, t, y)
        assert torch.equal(comfy.sd.load_diffusion_model(str(saved)).model.diffusion_model(x, t, y), want)
        mine = ours.model.diffusion_model(x, t, y)
        assert torch.equal(env.pack.nodes.comfy_model.load_model(saved).model.diffusion_model(x, t, y), mine)
