"""The standalone text-to-latent pipeline and the command line, on a tiny PixArt and a tiny T5."""
import pytest
import torch
from safetensors.torch import load_file

from pixart_core.__main__ import main
from pixart_core.config import tiny
from pixart_core.loading import save_checkpoint
from pixart_core.pipeline import Conditioning, Interrupted, generate, null_conditioning
from pixart_core.t5 import load_t5
from tests.pixart_fixtures import random_model
from tests.t5_fixtures import write_tiny_t5_hf_folder


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    return write_tiny_t5_hf_folder(tmp_path_factory.mktemp("t5") / "text_encoder")


@pytest.fixture(scope="module")
def encoder(t5_dir):
    return load_t5(t5_dir)


@pytest.fixture(scope="module")
def model():
    return random_model(tiny(model_max_length=300)).eval()


def cond(encoder, text, length=300):
    return Conditioning(*encoder.encode([text], max_length=length))


def test_deterministic_for_a_seed_and_binned(model, encoder):
    p, n = cond(encoder, "a photo of a cat"), cond(encoder, "")
    a = generate(model, p, n, height=200, width=300, steps=4, seed=7)
    b = generate(model, p, n, height=200, width=300, steps=4, seed=7)
    c = generate(model, p, n, height=200, width=300, steps=4, seed=8)
    assert (a.height, a.width) == (208, 304) and a.requested == (200, 300)  # nearest 256-table bin: 0.68
    assert a.latents.shape == (1, 4, 26, 38) and torch.isfinite(a.latents).all()
    assert torch.equal(a.latents, b.latents) and not torch.equal(a.latents, c.latents)


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "euler", "ddim", "sa_solver"])
def test_every_sampler_runs_deterministically(model, encoder, sampler):
    p, n = cond(encoder, "a red car"), cond(encoder, "")
    a = generate(model, p, n, steps=3, sampler=sampler, seed=1, batch=2)
    b = generate(model, p, n, steps=3, sampler=sampler, seed=1, batch=2)
    assert a.latents.shape == (2, 4, 32, 32) and torch.equal(a.latents, b.latents)
    assert a.latents.std() > 0.1


def test_null_modes_differ_and_follow_the_spec(model, encoder):
    p, n = cond(encoder, "a small wooden boat on a lake"), cond(encoder, "")
    official = null_conditioning("prompt_mask", p, n)
    assert torch.equal(official.mask, p.mask) and torch.equal(official.embeds, n.embeds)
    assert torch.equal(null_conditioning("own_mask", p, n).mask, n.mask)
    y = null_conditioning("y_embedding", p, n, model)
    assert torch.equal(y.embeds[0], model.y_embedder.y_embedding.weight[:300])
    outs = [generate(model, p, n, steps=3, null_mode=m).latents for m in ("prompt_mask", "own_mask", "y_embedding")]
    assert not torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])


def test_progress_and_interrupt(model, encoder):
    p, n = cond(encoder, "x"), cond(encoder, "")
    seen = []
    generate(model, p, n, steps=5, callback=lambda i, total: seen.append((i, total)))
    assert seen == [(i, 5) for i in range(1, 6)]
    with pytest.raises(Interrupted):
        generate(model, p, n, steps=5, should_stop=lambda: len(seen) >= 7,
                 callback=lambda i, total: seen.append(i))
    assert len(seen) == 7  # stopped right after the second step


def test_img2img_keeps_the_init(model, encoder):
    p, n = cond(encoder, "x"), cond(encoder, "")
    init = torch.randn(1, 4, 32, 32) * 5
    weak = generate(model, p, n, steps=10, denoise=0.2, init_latents=init).latents
    strong = generate(model, p, n, steps=10, denoise=1.0).latents
    assert (weak - init).norm() < 0.5 * (strong - init).norm()


def test_bad_requests(model, encoder):
    p, n = cond(encoder, "x"), cond(encoder, "")
    with pytest.raises(ValueError, match="16"):
        generate(model, p, n, height=1000, width=1001, steps=2, binning=False)
    with pytest.raises(ValueError, match="unknown sampler 'heun'"):
        generate(model, p, n, steps=2, sampler="heun")
    wide = Conditioning(torch.randn(1, 300, 48), p.mask)
    with pytest.raises(ValueError, match="48 wide but the model expects 32"):
        generate(model, wide, wide, steps=2)


def test_command_line(model, t5_dir, tmp_path, capsys):
    ckpt = save_checkpoint(model.state_dict(), model.config, tmp_path / "tiny.safetensors")
    assert main(["inspect", str(ckpt)]) == 0
    assert "parameters:" in capsys.readouterr().out
    assert main(["convert", str(ckpt), str(tmp_path / "tiny_diffusers")]) == 0
    assert (tmp_path / "tiny_diffusers" / "config.json").exists()
    assert main(["encode", "--t5", str(t5_dir), "--t5-dtype", "fp32", "--prompt", "a cat", str(tmp_path / "e.safetensors")]) == 0
    enc = load_file(str(tmp_path / "e.safetensors"))
    assert enc["embeds"].shape == (1, 300, 32) and int(enc["mask"].sum()) == 4  # "▁", "a", "▁cat", EOS
    assert main(["generate", "--model", str(tmp_path / "tiny_diffusers"), "--t5", str(t5_dir), "--t5-dtype", "fp32",
                 "--prompt", "a cat", "--height", "256", "--width", "512", "--steps", "2", str(tmp_path / "o.latent")]) == 0
    latent = load_file(str(tmp_path / "o.latent"))
    assert latent["latent_tensor"].shape == (1, 4, 22, 44)  # the 0.5 bin of the 256 table: 176x352
    assert main(["inspect", str(tmp_path / "missing.pth")]) == 2
    assert "no such file" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["inspect", "convert", "lora", "encode", "generate", "train-lora", "download"])
def test_every_subcommand_has_help(command, capsys):
    assert main([command, "--help"]) == 0 and "usage:" in capsys.readouterr().out


def test_official_end_returns_the_vp_sample_at_t_1e3(model, encoder, monkeypatch):
    """official_end=True: the sampler runs to σ_min (no trailing 0) and the VE state there comes back
    VP-scaled, x / √(1 + σ_min²), which is what the official DPM-Solver returns."""
    from pixart_core import pipeline, schedule
    seen = {}

    def fake_sampler(model, x, sigmas, extra_args=None, callback=None, disable=None):
        seen["sigmas"] = sigmas
        return torch.ones_like(x)

    monkeypatch.setitem(pipeline.SAMPLERS, "dpmpp_2m", fake_sampler)
    p, n = cond(encoder, "a lighthouse"), cond(encoder, "")
    out = generate(model, p, n, steps=5, official_end=True)
    assert torch.equal(seen["sigmas"], schedule.sigmas_dpm_time_uniform(5, keep_sigma_min=True))
    s_min = schedule.sigma_min()
    want = 1.0 / (1.0 + s_min ** 2) ** 0.5 / pipeline.LATENT_SCALE["sigma"]
    assert torch.allclose(out.latents, torch.full_like(out.latents, want), rtol=1e-6)
    plain = generate(model, p, n, steps=5)
    assert seen["sigmas"][-1] == 0  # the default grid ends on the x0 estimate
    assert torch.allclose(plain.latents, torch.full_like(plain.latents, 1.0 / pipeline.LATENT_SCALE["sigma"]))
    with pytest.raises(ValueError, match="official_end needs the official grid"):
        generate(model, p, n, steps=5, official_end=True, grid="karras")


def test_alpha_micro_condition_official_bin_key_or_diffusers_ratio(encoder):
    """PixArt-α 1024: official inference passes the bin's key (0.57) as the aspect-ratio condition,
    diffusers passes height/width (768/1344 = 0.5714); both available, the official one by default,
    also for a bare model call (ComfyUI's KSampler path)."""
    alpha = random_model(tiny(model_max_length=300, micro_condition=True, hidden_size=96, resolution=1024, sample_size=128,
                              pe_interpolation=2.0)).eval()
    seen = []  # the aspect ratio each model call is conditioned on
    alpha.ar_embedder.register_forward_pre_hook(lambda module, args: seen.append(args[0].flatten().tolist()))
    p, n = cond(encoder, "a lighthouse"), cond(encoder, "")
    generate(alpha, p, n, height=768, width=1344, steps=1)
    official, seen[:] = list(seen), []
    generate(alpha, p, n, height=768, width=1344, steps=1, aspect_condition="height_width")
    assert official and all(v == pytest.approx(0.57) for call in official for v in call)
    assert seen and all(v == pytest.approx(768 / 1344) for call in seen for v in call)
    with pytest.raises(ValueError, match="unknown aspect_condition 'square'"):
        generate(alpha, p, n, steps=1, aspect_condition="square")

    x, t = torch.randn(1, 4, 96, 168), torch.tensor([500.0])
    with torch.no_grad():
        default = alpha(x, t, p.embeds, p.mask)
        key = alpha(x, t, p.embeds, p.mask, c_ar=torch.tensor([[0.57]]))
        ratio = alpha(x, t, p.embeds, p.mask, c_ar=torch.tensor([[96 / 168]]))
    assert torch.equal(default, key) and not torch.equal(default, ratio)
