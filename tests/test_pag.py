"""Perturbed-attention guidance: equal to diffusers' PixArtSigmaPAGPipeline on the same weights, in pixart_core
(one guided prediction and whole DPM-Solver runs), the CLI, and the PixArt PAG node on ComfyUI's samplers."""
import math

import pytest
import torch

from pixart_core import schedule
from pixart_core.checks import InputError
from pixart_core.config import tiny
from pixart_core.guidance import PAG, apply_pag, diffusers_layers, pag_layers
from pixart_core.model import KVCompress, PerturbedAttention
from pixart_core.pipeline import Conditioning, generate, initial_noise
from pixart_core.samplers import PixArtDenoiser
from tests.pixart_fixtures import random_model, rel_err
from tests.test_model import diffusers_twin

DEPTH = 12  # deep enough for diffusers' "blocks.1" to show that it also matches blocks 10 and 11
LENGTH = 16


@pytest.fixture(scope="module")
def model():
    return random_model(tiny(depth=DEPTH)).eval()


@pytest.fixture(scope="module")
def twin(model):
    return diffusers_twin(model)


def pag_pipeline(twin, layers):
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPAGPipeline
    return PixArtSigmaPAGPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=twin,
                                  scheduler=DPMSolverMultistepScheduler(), pag_applied_layers=layers)


def prompts(config, seed=3):
    """A prompt and a negative with different valid lengths (diffusers wants masks of one shape)."""
    g = torch.Generator().manual_seed(seed)
    embeds = torch.randn(2, LENGTH, config.caption_channels, generator=g)
    mask = torch.zeros(2, LENGTH, dtype=torch.long)
    mask[0, :11], mask[1, :4] = 1, 1
    embeds = embeds * mask[..., None]
    return Conditioning(embeds[:1], mask[:1]), Conditioning(embeds[1:], mask[1:])


def perturbed_processors(twin):
    return sorted(int(name.split(".")[1]) for name, p in twin.attn_processors.items() if "PAG" in type(p).__name__)


@pytest.mark.parametrize("patterns", ["blocks.1", "blocks.14", "blocks.(14|15)", ["blocks.2", "blocks.20"], "blocks.2[0-3]"])
def test_layer_patterns_select_the_blocks_diffusers_selects(patterns):
    """diffusers' own matching on a 28-block model: its default "blocks.1" perturbs blocks 1 and 10-19."""
    twin = diffusers_twin(random_model(tiny(depth=28)))
    original = twin.attn_processors
    pipe = pag_pipeline(twin, patterns)
    pipe._set_pag_attn_processor(pipe.pag_applied_layers, True)
    assert diffusers_layers(patterns, 28) == tuple(perturbed_processors(twin))
    twin.set_attn_processor(original)
    assert diffusers_layers("blocks.1", 28) == (1, *range(10, 20))
    assert pag_layers("diffusers default (blocks.1)", 28) == pag_layers("diffusers-default", 28) == (1, *range(10, 20))
    assert pag_layers("diffusers docs (blocks.14)", 28) == (14,)


def diffusers_guided_eps(twin, layers, x_vp, t, prompt, negative, cfg, pag_scale, adaptive):
    """The guided ε of one step of PixArtSigmaPAGPipeline.__call__, with its own helpers and processors."""
    pipe = pag_pipeline(twin, layers)
    pipe._pag_scale, pipe._pag_adaptive_scale = pag_scale, adaptive
    do_cfg = cfg > 1.0
    embeds = pipe._prepare_perturbed_attention_guidance(prompt.embeds, negative.embeds, do_cfg)
    mask = pipe._prepare_perturbed_attention_guidance(prompt.mask, negative.mask, do_cfg)
    original = twin.attn_processors
    pipe._set_pag_attn_processor(pipe.pag_applied_layers, do_cfg)
    try:
        latent_in = torch.cat([x_vp] * (embeds.shape[0] // x_vp.shape[0]))
        with torch.no_grad():
            noise = twin(latent_in, encoder_hidden_states=embeds, encoder_attention_mask=mask,
                         timestep=t.expand(latent_in.shape[0]), added_cond_kwargs={"resolution": None,
                                                                                    "aspect_ratio": None},
                         return_dict=False)[0]
        # the pipeline passes the batch-expanded timestep, which its adaptive branch cannot compare with 0
        # ("Boolean value of Tensor with more than one value is ambiguous"): the one timestep, as it means
        guided = pipe._apply_perturbed_attention_guidance(noise, do_cfg, cfg, t[0])
    finally:
        twin.set_attn_processor(original)
    return guided.chunk(2, dim=1)[0]  # learned sigma


@pytest.mark.parametrize("cfg,adaptive,layers", [(4.5, 0.0, "blocks.1"), (1.0, 0.0, "blocks.1"),
                                                 (4.5, 0.004, "blocks.(3|7)"), (1.0, 0.004, "blocks.11")])
def test_guided_prediction_equals_diffusers(model, twin, cfg, adaptive, layers):
    prompt, negative = prompts(model.config)
    sigma = schedule.discrete_sigmas()[640].float().reshape(1)
    t = schedule.sigma_to_timestep(sigma)  # both models get the same (continuous) timestep
    x_vp = torch.randn(1, 4, 16, 12, generator=torch.Generator().manual_seed(7))
    x = x_vp * math.sqrt(1 + sigma.item() ** 2)
    pag = PAG(diffusers_layers(layers, DEPTH), 2.5, adaptive)
    with torch.no_grad():
        denoised = PixArtDenoiser(model)(x, sigma, prompt.embeds, prompt.mask, negative.embeds, negative.mask,
                                         cfg_scale=cfg, pag=pag)
    ours = (x - denoised) / sigma
    ref = diffusers_guided_eps(twin, layers, x_vp, t, prompt, negative, cfg, 2.5, adaptive)
    assert rel_err(ours, ref) <= 1e-5
    if adaptive:  # 2.5 - 0.004·(1000 - 640) = 1.06: the adaptive scale is in use, not clipped to 0
        assert 0 < pag.scale_at(float(t)) < 2.5
    with torch.no_grad():  # and PAG changes the prediction
        plain = PixArtDenoiser(model)(x, sigma, prompt.embeds, prompt.mask, negative.embeds, negative.mask,
                                      cfg_scale=cfg)
    assert rel_err(denoised, plain) > 1e-4


@pytest.mark.parametrize("cfg", [4.5, 1.0])
def test_whole_run_equals_diffusers_pag_pipeline(model, twin, cfg):
    """generate() with diffusers' grid and null against PixArtSigmaPAGPipeline(output_type="latent") with
    DPMSolverMultistepScheduler, from the same starting noise."""
    prompt, negative = prompts(model.config)
    steps, seed = 5, 11
    pag = PAG(diffusers_layers("blocks.1", DEPTH), 2.0)
    ours = generate(model, prompt, negative, height=128, width=96, steps=steps, guidance=cfg, grid="linspace",
                    sampler="dpmpp_2m", seed=seed, null_mode="own_mask", binning=False, pag=pag)
    pipe = pag_pipeline(twin, "blocks.1")
    ref = pipe(negative_prompt=None, prompt_embeds=prompt.embeds, prompt_attention_mask=prompt.mask,
               negative_prompt_embeds=negative.embeds, negative_prompt_attention_mask=negative.mask,
               latents=initial_noise(seed, 1, 4, 128, 96), height=128, width=96, num_inference_steps=steps,
               guidance_scale=cfg, pag_scale=2.0, output_type="latent", use_resolution_binning=False).images
    assert perturbed_processors(twin) == []  # the pipeline put its processors back
    ours_latent = ours.latents * 0.13025  # generate returns VAE-space latents
    assert rel_err(ours_latent, ref) <= 1e-5  # measured 1e-6
    plain = generate(model, prompt, negative, height=128, width=96, steps=steps, guidance=cfg, grid="linspace",
                     seed=seed, null_mode="own_mask", binning=False)
    assert rel_err(plain.latents, ours.latents) > 1e-3


def test_identity_rows_get_the_value_projection_and_others_are_untouched(model):
    """Perturbed rows: to_out(to_v(x)) in the perturbed blocks; the other rows exactly as without perturbation;
    under KV compression the perturbed rows use each token's own (uncompressed) value."""
    x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    t = torch.full((3,), 500.0)
    y = torch.randn(3, LENGTH, model.config.caption_channels, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        plain = model(x, t, y)
        pert = model(x, t, y, perturb=PerturbedAttention((1, 5), (2,)))
        assert torch.allclose(pert[:2], plain[:2], atol=1e-6) and rel_err(pert[2:], plain[2:]) > 1e-3
        alone = model(x[2:], t[2:], y[2:], perturb=PerturbedAttention((1, 5)))
        assert rel_err(pert[2:], alone) < 1e-6
        kv = KVCompress(tuple(range(DEPTH)), 2, "avgpool")
        kv_pert = model(x, t, y, kv_compress=kv, perturb=PerturbedAttention(tuple(range(DEPTH)), (2,)))
        assert rel_err(kv_pert[2:], model(x[2:], t[2:], y[2:], perturb=PerturbedAttention(tuple(range(DEPTH))))) < 1e-6
        assert rel_err(kv_pert[:2], plain[:2]) > 1e-4  # the unperturbed rows are compressed
        block = model.blocks[0].attn
        tokens = torch.randn(2, 16, model.config.hidden_size)
        D = model.config.hidden_size
        v = tokens @ block.qkv.weight[2 * D:].t() + block.qkv.bias[2 * D:]
        assert torch.allclose(block(tokens, (4, 4), identity=(0, 1)), block.proj(v), atol=1e-6)
    with pytest.raises(InputError, match="blocks 0-11"):
        model(x, t, y, perturb=PerturbedAttention((12,)))


def test_scale_schedule_and_combination():
    pag = PAG((1,), 3.0, 0.01)
    assert pag.scale_at(1000) == 3.0 and pag.scale_at(900) == pytest.approx(2.0) and pag.scale_at(100) == 0.0
    assert PAG((1,), 3.0).scale_at(0) == 3.0 and not PAG((), 3.0).active and not PAG((1,), 0.0).active
    g, c, p = torch.tensor(1.0), torch.tensor(2.0), torch.tensor(0.5)
    assert apply_pag(g, c, p, 2.0) == 4.0 and apply_pag(g, c, p, 0) is g
    for bad in (dict(scale=float("nan")), dict(scale=-1.0), dict(adaptive_scale=5.0)):
        with pytest.raises(InputError, match="PAG"):
            PAG((1,), **bad)


@pytest.mark.parametrize("text,message", [("x", "not a layer list"), ("9-2", "runs backwards"),
                                          ("40", "layers 0-11"), ("blocks.1", "or a preset")])
def test_bad_layer_strings_are_refused(text, message):
    with pytest.raises(InputError, match=message):
        pag_layers(text, DEPTH)
    with pytest.raises(InputError, match="matches no block"):
        diffusers_layers("blocks.99", DEPTH)


# -------------------------------------------------------------------------------------------------
# the PixArt PAG node, in-process on ComfyUI (the host and tiny models of test_nodes.py)
# -------------------------------------------------------------------------------------------------

from test_nodes import SIGMA_LATENT_SCALE, empty_latent, env, mask_of, one_sentence, run_sampler, t5_outputs  # noqa: E402,F401
from test_nodes import pytestmark as needs_comfy  # noqa: E402  (skipped without the ComfyUI tree, as test_nodes)


def core_sample(env, sigmas, seed, cfg, uncond_mask, pag, sampler="dpmpp_2m", kv=None):
    """pixart_core's sampler + PixArtDenoiser(pag=...) on the node env's weights, noise and conditioning."""
    import comfy.sample
    from pixart_core import samplers
    latent = empty_latent()["samples"]
    noise = comfy.sample.prepare_noise(latent, seed)
    x = noise * math.sqrt(1.0 + float(sigmas[0]) ** 2)
    pos, neg = t5_outputs(env.pos), t5_outputs(env.neg)
    denoiser = PixArtDenoiser(env.core)
    saved = env.core.kv_compress
    env.core.kv_compress = kv or saved
    try:
        out = samplers.SAMPLERS[sampler](
            lambda x, s: denoiser(x, s, pos, mask_of(env.pos), neg, uncond_mask, cfg_scale=cfg, pag=pag),
            x, sigmas, disable=True)
    finally:
        env.core.kv_compress = saved
    return out / SIGMA_LATENT_SCALE


def pag_node(env, model=None, preset="layers below", layers="1", scale=2.0, adaptive=0.0):
    return env.n.PixArtSuitePAG.execute(model or env.model, preset, layers, scale, adaptive)[0]


@needs_comfy
@pytest.mark.parametrize("cfg,adaptive", [(4.5, 0.0), (1.0, 0.0), (4.5, 0.002)])
def test_node_through_the_pack_sampler_equals_core(env, cfg, adaptive):
    from pixart_core.schedule import make_sigmas
    model = pag_node(env, layers="0-1", adaptive=adaptive)
    got = run_sampler(env, model=model, seed=5, steps=3, cfg=cfg)
    want = core_sample(env, make_sigmas("dpm_time_uniform", 3), 5, cfg, mask_of(env.pos), PAG((0, 1), 2.0, adaptive))
    assert rel_err(got, want) < 1e-5
    assert rel_err(got, run_sampler(env, seed=5, steps=3, cfg=cfg)) > 1e-3  # PAG does something


@needs_comfy
def test_node_through_stock_ksampler_and_sampler_custom_advanced_equals_core(env):
    import comfy.sample
    import comfy.samplers
    model = pag_node(env, layers="1", scale=3.0)
    latent = empty_latent()["samples"]
    noise = comfy.sample.prepare_noise(latent, 9)
    got = comfy.sample.sample(model, noise, 3, 4.5, "euler", "normal", env.pos, env.neg, latent, seed=9)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", 3)
    want = core_sample(env, sigmas, 9, 4.5, mask_of(env.neg), PAG((1,), 3.0), sampler="euler")
    assert rel_err(got, want) < 1e-5
    # SamplerCustomAdvanced: the pack's CFG guider (official null) + its sampler and grid = PixArt Sampler
    guider = env.n.PixArtSuiteCFGGuider.execute(model, env.pos, env.neg, 4.5, env.pack.nodes.sampling.NULL_OFFICIAL)[0]
    sampler = env.n.PixArtSuiteSamplerSelect.execute("dpmpp_2m", 1.0)[0]
    grid = env.n.PixArtSuiteSigmas.execute(model, "dpm_time_uniform", 3, 1.0)[0]
    custom = guider.sample(noise, latent, sampler, grid, seed=9, disable_pbar=True)
    assert rel_err(custom, run_sampler(env, model=model, seed=9, steps=3)) < 1e-6


@needs_comfy
def test_node_batches_the_perturbed_prompt_with_cfg_and_works_with_kv_compression(env):
    from pixart_core.schedule import make_sigmas
    kv_model = env.n.PixArtSuiteKVCompression.execute(env.model, "0-1", 2, "avgpool")[0]
    model = pag_node(env, model=kv_model, layers="all")
    dit = model.model.diffusion_model
    batches = []
    original = dit.forward
    dit.forward = lambda x, *a, **k: (batches.append(x.shape[0]), original(x, *a, **k))[1]
    try:
        got = run_sampler(env, model=model, seed=2, steps=2, cfg=4.5)
        assert batches == [3, 3]  # [cond, uncond, cond perturbed] in one call per step
        batches.clear()
        run_sampler(env, model=model, seed=2, steps=2, cfg=1.0)
        assert batches == [2, 2]  # CFG 1: [cond, cond perturbed]
    finally:
        dit.forward = original
    want = core_sample(env, make_sigmas("dpm_time_uniform", 2), 2, 4.5, mask_of(env.pos), PAG((0, 1), 2.0),
                       kv=KVCompress((0, 1), 2, "avgpool"))
    assert rel_err(got, want) < 1e-5


@needs_comfy
def test_node_still_guides_when_another_node_replaces_the_batch_function(env):
    """The post-CFG function then evaluates the perturbed prompt itself (one more call per step)."""
    import comfy.samplers
    model = pag_node(env, layers="1").clone()
    model.set_model_sampler_calc_cond_batch_function(
        lambda a: comfy.samplers.calc_cond_batch(a["model"], a["conds"], a["input"], a["sigma"], a["model_options"]))
    assert rel_err(run_sampler(env, model=model, seed=4), run_sampler(env, model=pag_node(env, layers="1"), seed=4)) < 1e-6


@needs_comfy
@pytest.mark.parametrize("layers,message", [("abc", "PAG layers 'abc' is not a layer list"),
                                            ("5-2", "runs backwards"), ("0,7", "this model has layers 0-1")])
def test_node_bad_layers_are_one_sentence_naming_the_input(env, layers, message):
    with pytest.raises(ValueError, match=message) as err:  # the pack's InputError (imported as the pack)
        pag_node(env, layers=layers)
    assert type(err.value).__name__ == "InputError" and "presets" in str(err.value)
    one_sentence(err)
    assert env.n.PixArtSuitePAG.validate_inputs("layers below", "abc", 3.0, 0.0).startswith("PAG layers 'abc'")
    assert env.n.PixArtSuitePAG.validate_inputs("diffusers docs (blocks.14)", "abc", 3.0, 0.0) is True
    with pytest.raises(ValueError, match="already has PixArt PAG"):
        pag_node(env, model=pag_node(env))


@needs_comfy
def test_stock_pag_on_pixart_points_to_the_node(env):
    import comfy.sample
    import comfy_extras.nodes_pag as stock
    model = stock.PerturbedAttentionGuidance.execute(env.model, 3.0)[0]
    latent = empty_latent()["samples"]
    with pytest.raises(ValueError, match="patches a UNet .*use this pack's 'PixArt PAG' node") as err:
        comfy.sample.sample(model, comfy.sample.prepare_noise(latent, 0), 2, 4.5, "euler", "normal", env.pos,
                            env.neg, latent)
    one_sentence(err)


def test_command_line_generate_with_pag(tmp_path, capsys):
    from safetensors.torch import load_file
    from pixart_core.__main__ import main
    from pixart_core.loading import load_pixart, save_checkpoint
    from pixart_core.t5 import load_t5
    from tests.t5_fixtures import write_tiny_t5_hf_folder
    core = random_model(tiny(model_max_length=300)).eval()
    ckpt = save_checkpoint(core.state_dict(), core.config, tmp_path / "tiny.safetensors")
    t5 = write_tiny_t5_hf_folder(tmp_path / "text_encoder")
    common = ["generate", "--model", str(ckpt), "--t5", str(t5), "--t5-dtype", "fp32", "--prompt", "a cat",
              "--height", "128", "--width", "128", "--steps", "2", "--seed", "3"]
    assert main(common + ["--pag-layers", "1", "--pag-scale", "2.5", "--pag-adaptive-scale", "0.001",
                          str(tmp_path / "pag.latent")]) == 0
    assert main(common + [str(tmp_path / "plain.latent")]) == 0
    got = load_file(str(tmp_path / "pag.latent"))["latent_tensor"]
    encoder = load_t5(t5)
    prompt = Conditioning(*encoder.encode(["a cat"], max_length=300))
    negative = Conditioning(*encoder.encode([""], max_length=300))
    want = generate(load_pixart(ckpt).model.eval(), prompt, negative, height=128, width=128, steps=2, seed=3,
                    pag=PAG((1,), 2.5, 0.001)).latents
    assert rel_err(got, want) < 1e-6
    assert rel_err(got, load_file(str(tmp_path / "plain.latent"))["latent_tensor"]) > 1e-4
    capsys.readouterr()
    assert main(common + ["--pag-layers", "blocks.1", str(tmp_path / "bad.latent")]) == 2
    assert "--pag-layers: PAG layers 'blocks.1' is not a layer list" in capsys.readouterr().err
    assert main(common + ["--pag-layers", "5", str(tmp_path / "bad.latent")]) == 2
    assert "this model has layers 0-1" in capsys.readouterr().err
