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
