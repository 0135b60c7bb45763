"""Few-step models: PixArt-LCM (lcm sampler + grid), PixArt-α-DMD (one step at 400), Flash-PixArt (LoRA + LCM).

Proof against diffusers on tiny random weights: the LCM timesteps for every step count, each LCM step's
sample and denoised against LCMScheduler.step with the same seeded noise, whole generate() runs against
PixArtAlphaPipeline with the scheduler each model's card uses (LCMScheduler; DDPMScheduler with
timesteps=[400]; LCMScheduler(timestep_spacing="trailing") with the Flash LoRA fused into the weights).
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from pixart_core import schedule as S
from pixart_core.checks import InputError
from pixart_core.fewstep import LABELS, SAMPLING_PRESETS, sampling_preset
from pixart_core.lora import merge_lora, read_lora
from pixart_core.pipeline import LATENT_SCALE, Conditioning, generate
from pixart_core.samplers import SAMPLERS, PixArtDenoiser, lcm_boundary, sample_lcm
from tests.pixart_fixtures import random_model
from tests.test_model import diffusers_twin

SEED = 7
SIZE = 128  # 16 x 16 latents
BETAS = dict(beta_start=0.0001, beta_end=0.02, beta_schedule="linear")  # PixArt's training schedule


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return random_model(seed=3).eval()


@pytest.fixture(scope="module")
def prompt(model):
    g = torch.Generator().manual_seed(11)
    cfg = model.config
    embeds = torch.randn(1, cfg.model_max_length, cfg.caption_channels, generator=g)
    mask = torch.zeros(1, cfg.model_max_length, dtype=torch.long)
    mask[:, :9] = 1
    return Conditioning(embeds, mask)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def lcm_scheduler(**changes):
    from diffusers import LCMScheduler
    return LCMScheduler(**BETAS, **changes)


def pipeline(twin, scheduler):
    from diffusers import PixArtAlphaPipeline
    return PixArtAlphaPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=twin, scheduler=scheduler)


def run_pipeline(twin, scheduler, prompt, model, **kwargs):
    """The card's pipeline call on prompt embeddings, from the same starting noise as generate(seed=SEED)."""
    cfg = model.config
    latents = torch.randn(1, cfg.in_channels, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(SEED))
    with torch.no_grad():
        return pipeline(twin, scheduler)(
            prompt_embeds=prompt.embeds, prompt_attention_mask=prompt.mask, latents=latents,
            generator=torch.Generator().manual_seed(SEED + 1),  # the step noise generate() draws (seed + 1)
            height=SIZE, width=SIZE, use_resolution_binning=False, output_type="latent", **kwargs).images


def run_ours(model, prompt, preset):
    p = sampling_preset(preset)
    out = generate(model, prompt, prompt, height=SIZE, width=SIZE, binning=False, steps=p.steps, guidance=p.cfg,
                   sampler=p.sampler, grid=p.grid, seed=SEED)
    return out.latents * LATENT_SCALE[model.config.family]


# --------------------------------------------------------------------------------------------------
# the LCM grid and sampler
# --------------------------------------------------------------------------------------------------

def test_lcm_timesteps_match_diffusers_for_every_step_count():
    sch = lcm_scheduler()
    for steps in range(1, S.LCM_ORIGINAL_STEPS + 1):
        sch.set_timesteps(steps)
        assert S.lcm_timesteps(steps).tolist() == sch.timesteps.tolist(), steps
    assert S.lcm_timesteps(4).tolist() == [999, 759, 499, 259]
    # Flash-PixArt's card asks for trailing spacing; LCMScheduler's grid does not depend on it
    trailing = lcm_scheduler(timestep_spacing="trailing")
    trailing.set_timesteps(4)
    assert trailing.timesteps.tolist() == [999, 759, 499, 259]


def test_lcm_sigmas_are_the_training_sigmas_at_those_timesteps():
    sigmas = S.make_sigmas("lcm", 4)
    assert sigmas.shape == (5,) and sigmas[-1] == 0
    expected = S.discrete_sigmas()[[999, 759, 499, 259]].float()
    assert torch.equal(sigmas[:-1], expected)
    t = S.sigma_to_timestep(sigmas[:-1].double())
    assert torch.allclose(t, torch.tensor([999.0, 759, 499, 259], dtype=torch.float64), atol=1e-3)


def test_lcm_boundary_conditions():
    c_skip, c_out = lcm_boundary(259)
    assert c_skip == pytest.approx(0.25 / (2590 ** 2 + 0.25))
    assert c_out == pytest.approx(2590 / math.sqrt(2590 ** 2 + 0.25))
    assert lcm_boundary(0) == (1.0, 0.0)  # f(x, 0) = x: the consistency boundary
    sch = lcm_scheduler()
    for t in (0, 19, 259, 999):
        assert lcm_boundary(t) == pytest.approx(sch.get_scalings_for_boundary_condition_discrete(t))


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_lcm_steps_match_lcm_scheduler(model, prompt, steps):
    """Every step's sample and consistency output equal LCMScheduler.step's, same weights and noise."""
    sch = lcm_scheduler()
    sch.set_timesteps(steps)
    cfg = model.config
    start = torch.randn(1, cfg.in_channels, 16, 16, generator=torch.Generator().manual_seed(0))
    extra = {"context": prompt.embeds, "context_mask": prompt.mask}
    denoiser = PixArtDenoiser(model)

    ref_samples, ref_denoised, z = [], [], start.clone()
    g = torch.Generator().manual_seed(5)
    for t in sch.timesteps:
        eps = denoiser.model(z, t.float().expand(1), prompt.embeds, context_mask=prompt.mask)[:, :cfg.in_channels]
        out = sch.step(eps, t, z, generator=g)
        z = out.prev_sample
        ref_samples.append(z)
        ref_denoised.append(out.denoised)

    sigmas = S.make_sigmas("lcm", steps)
    seen = []
    x = start * math.sqrt(1 + float(sigmas[0]) ** 2)
    ours = sample_lcm(denoiser, x, sigmas, extra_args=extra, disable=True,
                      generator=torch.Generator().manual_seed(5), callback=lambda d: seen.append(d))
    for i, info in enumerate(seen):
        assert rel(info["denoised"], ref_denoised[i]) < 1e-5, i
        if i + 1 < steps:  # the state entering step i+1, VE scale, against the scheduler's VP prev_sample
            x_next = seen[i + 1]["x"] / math.sqrt(1 + float(sigmas[i + 1]) ** 2)
            assert rel(x_next, ref_samples[i]) < 1e-5, i
    assert rel(ours, ref_samples[-1]) < 1e-5
    assert torch.equal(ours, seen[-1]["denoised"])  # the last step returns the consistency output


def test_lcm_noise_is_seeded_and_reaches_every_step(model, prompt):
    sigmas = S.make_sigmas("lcm", 4)
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0)) * math.sqrt(1 + float(sigmas[0]) ** 2)
    extra = {"context": prompt.embeds, "context_mask": prompt.mask}

    def run(seed):
        return sample_lcm(PixArtDenoiser(model), x, sigmas, extra_args=extra, disable=True,
                          generator=torch.Generator().manual_seed(seed))
    assert torch.equal(run(1), run(1))
    assert rel(run(1), run(2)) > 1e-3


# --------------------------------------------------------------------------------------------------
# whole runs against the model cards' pipeline calls
# --------------------------------------------------------------------------------------------------

def test_lcm_preset_equals_pixart_lcm_pipeline(model, prompt):
    """PixArt-LCM's pipeline: PixArtAlphaPipeline + LCMScheduler, 4 steps, no guidance."""
    ref = run_pipeline(diffusers_twin(model), lcm_scheduler(), prompt, model, num_inference_steps=4,
                       guidance_scale=0.0)
    ours = run_ours(model, prompt, "lcm_4step")
    assert ours.shape == ref.shape == (1, 4, 16, 16)
    assert rel(ours, ref) < 1e-5


def test_dmd_preset_equals_the_dmd_demo_pipeline(model, prompt):
    """The DMD demo: DDPMScheduler, timesteps=[400], guidance 1, one step -> pred_original_sample."""
    from diffusers import DDPMScheduler
    ddpm = DDPMScheduler(**BETAS, clip_sample=False)
    ref = run_pipeline(diffusers_twin(model), ddpm, prompt, model, timesteps=[400], num_inference_steps=1,
                       guidance_scale=1.0)
    ours = run_ours(model, prompt, "dmd_1step")
    assert rel(ours, ref) < 1e-5
    assert S.make_sigmas("dmd", 1).tolist() == pytest.approx([float(S.discrete_sigmas()[400]), 0.0])


# Flash-PixArt: a PEFT LoRA on PixArt-α (adapter_model.safetensors + adapter_config.json), keys
# base_model.model.<diffusers module>.lora_A/B.weight, no alpha in the file (lora_alpha in the config)
FLASH_MODULES = ["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
                 "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2"]
FLASH_GLOBAL = ["adaln_single.linear", "adaln_single.emb.timestep_embedder.linear_1",
                "adaln_single.emb.timestep_embedder.linear_2", "caption_projection.linear_1",
                "caption_projection.linear_2", "proj_out"]
RANK, ALPHA = 4, 8


def write_flash_lora(twin, folder):
    g = torch.Generator().manual_seed(21)
    modules = [f"transformer_blocks.{i}.{m}" for i in range(len(twin.transformer_blocks)) for m in FLASH_MODULES]
    tensors = {}
    for name in modules + FLASH_GLOBAL:
        weight = twin.get_submodule(name).weight
        tensors[f"base_model.model.{name}.lora_A.weight"] = torch.randn(RANK, weight.shape[1], generator=g) * 0.1
        tensors[f"base_model.model.{name}.lora_B.weight"] = torch.randn(weight.shape[0], RANK, generator=g) * 0.1
    path = folder / "adapter_model.safetensors"
    save_file(tensors, str(path))
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": RANK, "lora_alpha": ALPHA, "target_modules": ["to_q", "to_k", "to_v", "to_out.0",
        "ff.net.0.proj", "ff.net.2", "linear", "linear_1", "linear_2", "proj_out"], "use_rslora": False}))
    return path, tensors


def test_flash_lora_loads_and_its_4_steps_equal_lcm_trailing(model, prompt, tmp_path):
    twin = diffusers_twin(model)
    path, tensors = write_flash_lora(twin, tmp_path)
    lora = read_lora(path)
    assert not lora.unmatched, lora.unmatched
    assert "adapter_config.json" in lora.alpha_note
    flashed = random_model(seed=3).eval()
    assert not merge_lora(flashed, lora)
    # the reference: diffusers weights with the LoRA fused by hand, W += alpha/r · B A
    with torch.no_grad():
        for key, a in tensors.items():
            if key.endswith("lora_A.weight"):
                b = tensors[key.replace("lora_A", "lora_B")]
                twin.get_submodule(key[len("base_model.model."):-len(".lora_A.weight")]).weight += ALPHA / RANK * b @ a
    ref = run_pipeline(twin, lcm_scheduler(timestep_spacing="trailing"), prompt, model, num_inference_steps=4,
                       guidance_scale=0.0)
    ours = run_ours(flashed, prompt, "flash_4step")
    assert rel(ours, ref) < 1e-5
    assert rel(ours, run_ours(model, prompt, "flash_4step")) > 1e-3  # the LoRA did change the model


# --------------------------------------------------------------------------------------------------
# presets and bad input
# --------------------------------------------------------------------------------------------------

def test_presets_name_real_samplers_and_grids():
    assert LABELS[0] == "custom" and len(LABELS) == len(SAMPLING_PRESETS) + 1
    for p in SAMPLING_PRESETS.values():
        assert p.sampler in SAMPLERS and p.grid in S.STEP_GRIDS
        assert S.make_sigmas(p.grid, p.steps).shape == (p.steps + 1,)
        assert sampling_preset(p.label) is p and sampling_preset(p.name) is p
        assert p.cfg == 1.0  # all three run without guidance
    assert sampling_preset("LCM 4 steps").steps == 4 and sampling_preset("DMD 1 step").grid == "dmd"


@pytest.mark.parametrize("call,words", [
    (lambda: sampling_preset("LCM 8 steps"), ["unknown sampling preset", "lcm_4step", "DMD 1 step"]),
    (lambda: S.make_sigmas("dmd", 2), ["dmd grid", "steps 2", "set steps to 1"]),
    (lambda: S.make_sigmas("dmd", 1, denoise=0.5), ["denoise 1", "0.5"]),
    (lambda: S.make_sigmas("lcm", 51), ["steps 51", "at most 50"]),
    (lambda: S.make_sigmas("lcm", 0), ["steps"]),
    (lambda: S.sigmas_at_timesteps([1000]), ["0..999"]),
])
def test_bad_presets_and_steps_are_input_errors(call, words):
    with pytest.raises(InputError) as e:
        call()
    for w in words:
        assert w in str(e.value)


def test_lcm_with_denoise_keeps_the_tail_of_a_longer_lcm_grid():
    tail = S.make_sigmas("lcm", 2, denoise=0.5)
    assert torch.equal(tail, S.make_sigmas("lcm", 4)[-3:])
    assert np.all(np.diff(tail.numpy()) < 0)


# --------------------------------------------------------------------------------------------------
# the CLI
# --------------------------------------------------------------------------------------------------

def test_cli_sampling_preset_is_the_explicit_settings(tmp_path, capsys):
    from pixart_core.__main__ import main
    from pixart_core.config import tiny
    from pixart_core.loading import save_checkpoint
    from tests.t5_fixtures import write_tiny_t5_hf_folder
    core = random_model(tiny(model_max_length=300))
    pth = save_checkpoint(core.state_dict(), core.config, tmp_path / "tiny-256.pth")
    t5 = write_tiny_t5_hf_folder(tmp_path / "t5" / "text_encoder")
    gen = ["generate", "--model", str(pth), "--t5", str(t5), "--t5-dtype", "fp32", "--prompt", "a cat",
           "--height", "256", "--width", "256", "--seed", "3"]
    assert main(gen + ["--sampling-preset", "lcm_4step", str(tmp_path / "a.latent")]) in (0, None)
    assert "LCM 4 steps" in capsys.readouterr().out
    assert main(gen + ["--sampler", "lcm", "--grid", "lcm", "--steps", "4", "--guidance", "1",
                       str(tmp_path / "b.latent")]) in (0, None)
    assert (tmp_path / "a.latent").read_bytes() == (tmp_path / "b.latent").read_bytes()
    assert main(gen + ["--sampling-preset", "dmd_1step", str(tmp_path / "c.latent")]) in (0, None)
    assert (tmp_path / "c.latent").read_bytes() != (tmp_path / "a.latent").read_bytes()
    assert main(gen + ["--sampling-preset", "lcm_8step", str(tmp_path / "d.latent")]) == 2
    assert "invalid choice: 'lcm_8step'" in capsys.readouterr().err
    assert main(gen + ["--grid", "dmd", "--steps", "4", str(tmp_path / "e.latent")]) == 2
    assert "set steps to 1" in capsys.readouterr().err
