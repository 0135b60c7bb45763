"""Fine-tuning in pixart_core: the official loss against the reference's IDDPM formula written out here,
LoRA injection/export, KV compression and the chunked MLP under autograd, the validation loss, and the
train-lora CLI. Tiny models on CPU; no ComfyUI (the ComfyUI side is tests/test_training_nodes.py)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import pixart_fixtures as pf
import t5_fixtures as tf
from pixart_core import lora as core_lora
from pixart_core import training as tr
from pixart_core.__main__ import main as cli
from pixart_core.config import tiny
from pixart_core.loading import save_checkpoint
from pixart_core.model import KVCompress
from test_nodes import _one_thread  # noqa: F401 - autouse: tiny models run fastest on one thread


def samples(n=3, side=16, tokens=16, width=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        mask = torch.zeros(1, tokens, dtype=torch.long)
        mask[0, : 5 + 3 * i] = 1
        out.append(tr.Sample(torch.randn(1, 4, side, side, generator=g) * 0.8,
                             torch.randn(1, tokens, width, generator=g), mask, f"s{i}"))
    return out


# -------------------------------------------------------------------------------------------------
# the official loss, against the reference's formula (PixArt-sigma diffusion/model/gaussian_diffusion.py,
# IDDPM with LossType.MSE and LEARNED_RANGE), written out independently with numpy tables
# -------------------------------------------------------------------------------------------------

class ReferenceIDDPM:
    """GaussianDiffusion's training_losses for ε-prediction + learned-range variance, as the reference
    computes it: float64 numpy tables, extracted per timestep as float32, terms in float32."""

    def __init__(self):
        betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
        alphas_cumprod = np.cumprod(1.0 - betas)
        prev = np.append(1.0, alphas_cumprod[:-1])
        self.betas = betas
        self.sqrt_alphas_cumprod = np.sqrt(alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / alphas_cumprod - 1)
        posterior_variance = betas * (1.0 - prev) / (1.0 - alphas_cumprod)
        self.posterior_log_variance_clipped = np.log(np.append(posterior_variance[1], posterior_variance[1:]))
        self.posterior_mean_coef1 = betas * np.sqrt(prev) / (1.0 - alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - prev) * np.sqrt(1.0 - betas) / (1.0 - alphas_cumprod)

    @staticmethod
    def extract(arr, t, shape):
        res = torch.from_numpy(arr)[t].float()
        while res.ndim < len(shape):
            res = res[..., None]
        return res + torch.zeros(shape)

    def q_sample(self, x_start, t, noise):
        return (self.extract(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
                + self.extract(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * noise)

    def losses(self, model_output, x_start, x_t, t, noise):
        C = x_start.shape[1]
        output, var_values = torch.split(model_output, C, dim=1)
        frozen = output.detach()
        # q(x_{t-1} | x_t, x_0)
        true_mean = (self.extract(self.posterior_mean_coef1, t, x_t.shape) * x_start
                     + self.extract(self.posterior_mean_coef2, t, x_t.shape) * x_t)
        true_log_var = self.extract(self.posterior_log_variance_clipped, t, x_t.shape)
        # p(x_{t-1} | x_t) from the frozen ε and the learned range
        min_log = true_log_var
        max_log = self.extract(np.log(self.betas), t, x_t.shape)
        frac = (var_values + 1) / 2
        model_log_var = frac * max_log + (1 - frac) * min_log
        pred_xstart = (self.extract(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
                       - self.extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * frozen)
        model_mean = (self.extract(self.posterior_mean_coef1, t, x_t.shape) * pred_xstart
                      + self.extract(self.posterior_mean_coef2, t, x_t.shape) * x_t)
        kl = 0.5 * (-1.0 + model_log_var - true_log_var + torch.exp(true_log_var - model_log_var)
                    + (true_mean - model_mean) ** 2 * torch.exp(-model_log_var))
        kl = kl.mean(dim=(1, 2, 3)) / np.log(2.0)

        def cdf(x):
            return 0.5 * (1.0 + torch.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * torch.pow(x, 3))))

        centered = x_start - model_mean
        inv_stdv = torch.exp(-0.5 * model_log_var)
        cdf_plus, cdf_min = cdf(inv_stdv * (centered + 1.0 / 255.0)), cdf(inv_stdv * (centered - 1.0 / 255.0))
        log_probs = torch.where(
            x_start < -0.999, torch.log(cdf_plus.clamp(min=1e-12)),
            torch.where(x_start > 0.999, torch.log((1.0 - cdf_min).clamp(min=1e-12)),
                        torch.log((cdf_plus - cdf_min).clamp(min=1e-12))))
        decoder_nll = -log_probs.mean(dim=(1, 2, 3)) / np.log(2.0)
        vb = torch.where(t == 0, decoder_nll, kl)
        mse = ((noise - output) ** 2).mean(dim=(1, 2, 3))
        return {"mse": mse, "vb": vb, "loss": mse + vb}


@pytest.fixture(scope="module")
def model():
    return pf.random_model(tiny())


def test_official_loss_matches_the_reference_formula(model):
    """Model output of the tiny model at t = 0 (decoder NLL), 1, 500, 999 (KL), latents past ±0.999 included."""
    ref = ReferenceIDDPM()
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(4, 4, 16, 16, generator=g) * 0.8
    noise = torch.randn(x0.shape, generator=g)
    t = torch.tensor([0, 1, 500, 999])
    context, mask = torch.randn(1, 16, 32, generator=g), torch.ones(1, 16, dtype=torch.long)
    x_t = tr.q_sample(x0, t, noise)
    assert (x_t - ref.q_sample(x0, t, noise)).abs().max() <= 1e-6
    with torch.no_grad():
        out = model(x_t, t.float(), context, mask)
    ours, want = tr.official_loss(out, x0, x_t, t, noise), ref.losses(out, x0, x_t, t, noise)
    for term in ("mse", "vb", "loss"):
        assert (ours[term] - want[term]).abs().max() <= 1e-5, (term, ours[term], want[term])
    assert (want["vb"] > 0).all() and want["vb"][0] != want["vb"][1]  # both branches, non-trivial


def test_training_step_loss_is_the_reference_loss_of_its_draws(model):
    """The step draws t and ε from its generator; the reference, on those same draws, gives the same loss,
    and only the VB term reaches the variance channels (the mean is detached there)."""
    batch = tr.stack(samples(2))
    step = tr.training_step(model, batch, torch.Generator().manual_seed(5))
    ref = ReferenceIDDPM()
    x_t = ref.q_sample(batch.latents, step.timesteps, step.noise)
    with torch.no_grad():
        out = model(x_t, step.timesteps.float(), batch.context, batch.mask)
    want = ref.losses(out, batch.latents, x_t, step.timesteps, step.noise)
    assert abs(float(step.loss.detach()) - float(want["loss"].mean())) <= 1e-5
    assert step.timesteps.min() >= 0 and step.timesteps.max() <= 999
    out = out.clone().requires_grad_(True)
    tr.official_loss(out, batch.latents, x_t, step.timesteps, step.noise)["vb"].sum().backward()
    assert out.grad[:, :4].abs().max() == 0 and out.grad[:, 4:].abs().max() > 0


# -------------------------------------------------------------------------------------------------
# LoRA adapters
# -------------------------------------------------------------------------------------------------

def fresh(config=None, seed=0):
    return pf.random_model(config or tiny(), seed=seed)


def _randomise(adapters, seed=7):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapters.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def test_lora_starts_at_the_model_and_exports_exactly(tmp_path):
    """Injection leaves the output unchanged (B = 0); after training-like changes, the exported file (diffusers
    names, one LoRA per q/k/v part, alpha) read back by pixart_core.lora gives exactly the weights trained."""
    model, base = fresh(), fresh()
    s = samples(1)[0]
    with torch.no_grad():
        before = model(s.latents, torch.tensor([500.0]), s.context, s.mask)
    adapters = tr.inject_lora(model, rank=4, alpha=2.0)
    assert len(adapters.modules) == 7 * model.config.depth
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora." in n for n in trainable)
    with torch.no_grad():
        assert torch.equal(model(s.latents, torch.tensor([500.0]), s.context, s.mask), before)
    _randomise(adapters)
    path = tr.save_lora(adapters, tmp_path / "lora.safetensors", {"steps": "3"})
    sd = load_file(str(path))
    assert "transformer.transformer_blocks.0.attn1.to_k.lora_A.weight" in sd
    assert "transformer.transformer_blocks.1.attn2.to_v.lora_B.weight" in sd
    assert all(float(v) == 2.0 for k, v in sd.items() if k.endswith(".alpha"))
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert json.loads(meta["lora_adapter_metadata"])["r"] == 4 and meta["pixart_train_steps"] == "3"
    lora = core_lora.read_lora(path)
    assert lora.formats == ["diffusers (transformer.)"] and not lora.unmatched
    assert core_lora.merge_lora(base, lora) == {}
    for native in adapters.modules:
        assert (base.get_parameter(native + ".weight") - adapters.merged_weight(native)).abs().max() <= 1e-6, native
    with torch.no_grad():
        assert (model(s.latents, torch.tensor([500.0]), s.context, s.mask)
                - base(s.latents, torch.tensor([500.0]), s.context, s.mask)).abs().max() <= 1e-5
    adapters.remove()
    assert torch.equal(model.blocks[0].attn.qkv.weight, fresh().blocks[0].attn.qkv.weight)
    with pytest.raises(ValueError, match="unknown LoRA target 'ffn'"):
        tr.inject_lora(fresh(), targets=("ffn",))


def _lora_grads(model, kv=None, chunk=None, checkpointing=False):
    model.kv_compress = kv or KVCompress()
    model.ff_chunk = chunk
    adapters = tr.inject_lora(model, rank=2)
    _randomise(adapters)  # both factors non-zero, so both get gradients
    with tr.gradient_checkpointing(model, checkpointing):
        step = tr.training_step(model, tr.stack(samples(2)), torch.Generator().manual_seed(2))
        step.loss.backward()
    return {name: [p.grad.clone() for p in lw.parameters()] for name, (_, lw, _) in adapters.modules.items()}


def test_kv_compression_is_trained_through():
    """With KV compression on block 1, the gradients of block 1's self-attention LoRA change (its keys and
    values are pooled), and in conv mode the compression conv and norm get gradients themselves, which
    they do not without compression: the compressed path is in the graph."""
    off, on = _lora_grads(fresh()), _lora_grads(fresh(), KVCompress((1,), 2, "avgpool"))
    diff = {name: max(float((a - b).abs().max()) for a, b in zip(off[name], on[name])) for name in off}
    assert diff["blocks.1.attn.qkv"] > 1e-4
    assert all(g.abs().max() > 0 for g in on["blocks.1.attn.qkv"])
    conv = fresh(tiny(kv_compress_layers=(1,), kv_compress_mode="conv"))
    sr, norm = conv.blocks[1].attn.sr, conv.blocks[1].attn.norm
    for kv, used in ((None, True), (KVCompress(), False)):
        conv.zero_grad(set_to_none=True)
        conv.kv_compress = kv or KVCompress.from_config(conv.config)
        tr.training_step(conv, tr.stack(samples(2)), torch.Generator().manual_seed(2)).loss.backward()
        grads = [p.grad for p in (*sr.parameters(), *norm.parameters())]
        assert all((g is not None and g.abs().max() > 0) for g in grads) is used


def test_chunked_mlp_and_checkpointing_keep_the_gradients():
    plain = _lora_grads(fresh())
    for kwargs in ({"chunk": 24}, {"checkpointing": True}):
        other = _lora_grads(fresh(), **kwargs)
        for name in plain:
            for a, b in zip(plain[name], other[name]):
                assert (a - b).abs().max() <= 1e-5 * (1 + a.abs().max()), (kwargs, name)


# -------------------------------------------------------------------------------------------------
# validation loss and the training loop
# -------------------------------------------------------------------------------------------------

def test_validation_loss_is_reproducible_and_falls_with_training():
    model, data = fresh(), samples(3)
    first = tr.validation_loss(model, data)
    again = tr.validation_loss(model, data)
    assert first.loss == again.loss and len(first.per_level) == tr.VALIDATION_LEVELS
    assert first.timesteps == [62, 187, 312, 437, 562, 687, 812, 937]
    assert tr.validation_loss(model, data, seed=1).loss != first.loss
    result = tr.train_lora(model, data, tr.TrainConfig(steps=60, rank=4, learning_rate=2e-3,
                                                       gradient_checkpointing=False))
    after = tr.validation_loss(model, data)
    assert result.steps_done == 60 and len(result.losses) == 60 and all(math.isfinite(v) for v in result.losses)
    assert after.loss < 0.85 * first.loss, (first.loss, after.loss)
    assert "validation loss" in after.describe()


def test_training_stops_when_asked_and_keeps_what_it_did():
    calls = []
    result = tr.train_lora(fresh(), samples(2), tr.TrainConfig(steps=10, rank=2, gradient_checkpointing=False),
                           on_step=lambda step, loss: calls.append(step), should_stop=lambda: len(calls) >= 3)
    assert result.interrupted and result.steps_done == 3 and calls == [1, 2, 3]
    assert any(p.abs().max() > 0 for p in result.adapters.parameters())


@pytest.mark.parametrize("change, message", [
    ({"steps": 0}, "steps must be a whole number of at least 1"),
    ({"learning_rate": 2.0}, "learning rate must be between 0 and 1"),
    ({"caption_dropout": 1.0}, "caption dropout must be in"),
])
def test_bad_settings_are_one_sentence(change, message):
    with pytest.raises(ValueError, match=message):
        tr.TrainConfig(**change).check()


def test_caption_dropout_needs_the_null_caption():
    model = fresh()
    with torch.no_grad():
        model.y_embedder.y_embedding.weight.zero_()
    with pytest.raises(ValueError, match="null caption"):
        tr.training_step(model, tr.stack(samples(2)), torch.Generator().manual_seed(0), caption_dropout=0.99)


# -------------------------------------------------------------------------------------------------
# python -m pixart_core train-lora
# -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cli_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_cli")
    config = tiny(model_max_length=300)
    ckpt = save_checkpoint(pf.random_model(config).state_dict(), config, root / "tiny.safetensors")
    t5 = tf.write_tiny_t5_hf_folder(root / "t5")
    data = root / "data"
    data.mkdir()
    g = torch.Generator().manual_seed(4)
    for i, caption in enumerate(["a red cube", "a blue ball", ""]):
        latent = torch.randn(1, 4, 16, 16 + 8 * (i == 2), generator=g) / 0.13025  # VAE space; one wider
        save_file({"latent_tensor": latent, "latent_format_version_0": torch.tensor([])}, str(data / f"im{i}.latent"))
        if caption:
            (data / f"im{i}.txt").write_text(caption)
    return root, ckpt, t5, data


def _train_args(files, *extra):
    root, ckpt, t5, data = files
    return ["train-lora", "--model", str(ckpt), "--t5", str(t5), "--t5-dtype", "fp32", "--device", "cpu",
            "--data", str(data), "--rank", "4", "--lr", "2e-3", "--no-gradient-checkpointing", *extra]


def test_cli_trains_a_lora_that_generate_and_pixart_core_load(cli_files, capsys):
    root, ckpt, t5, data = cli_files
    out = root / "out" / "kv.safetensors"
    assert cli(_train_args(cli_files, "--steps", "40", "--kv-layers", "1", "--save-every", "10", str(out))) == 0
    text = capsys.readouterr().out
    before = float(text.split("before: validation loss ")[1].split()[0])
    after = float(text.split("after:  validation loss ")[1].split()[0])
    assert after < before and f"trained step 40 of 40" in text and "validation loss" in text
    assert not list(out.parent.glob("*.part"))  # written through a temporary file, nothing left over
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
    assert meta["pixart_train_kv_compression"] == "layers 1 ratio 2 avgpool"
    assert meta["pixart_train_steps_done"] == "40" and float(meta["pixart_train_validation_after"]) == pytest.approx(after, abs=1e-5)
    lora = core_lora.read_lora(out)
    assert len(lora.modules(core_lora.TRANSFORMER)) == 10 * 2 and not lora.unmatched
    assert cli(["generate", "--model", str(ckpt), "--t5", str(t5), "--t5-dtype", "fp32", "--device", "cpu",
                "--prompt", "a red cube", "--steps", "2", "--lora", str(out), str(root / "o.latent")]) == 0
    assert f"applied {out}" in capsys.readouterr().out
    assert load_file(str(root / "o.latent"))["latent_tensor"].shape == (1, 4, 32, 32)


@pytest.mark.parametrize("extra, message", [
    (["--targets", "attn,ffn"], "unknown LoRA target 'ffn'"),
    (["--batch", "2"], "a batch needs latents of one size"),
    (["--steps", "0"], "argument --steps: must be a whole number from 1 to 1000000, got 0"),
])
def test_cli_refuses_bad_settings_in_one_sentence(cli_files, capsys, extra, message, tmp_path):
    assert cli(_train_args(cli_files, *extra, str(tmp_path / "x.safetensors"))) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and not (tmp_path / "x.safetensors").exists()


def test_cli_images_need_a_vae(cli_files, capsys, tmp_path):
    root, ckpt, t5, data = cli_files
    images = tmp_path / "images"
    images.mkdir()
    from PIL import Image
    Image.new("RGB", (40, 30), (200, 10, 10)).save(images / "red.png")
    args = _train_args(cli_files, str(tmp_path / "x.safetensors"))
    args[args.index("--data") + 1] = str(images)
    assert cli(args) == 2
    assert "1 images but no --vae" in capsys.readouterr().err


def test_cli_encodes_images_with_a_diffusers_vae_at_the_resolution_bins(cli_files, tmp_path, capsys):
    """--resolution fits each image to its nearest bin of that table (the resolution-adaptation recipe)."""
    diffusers = pytest.importorskip("diffusers")
    from PIL import Image
    from pixart_core import train_cli
    vae = diffusers.AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                                  block_out_channels=(8, 8, 8, 8), layers_per_block=1, latent_channels=4,
                                  norm_num_groups=4, sample_size=64)
    vae.save_pretrained(tmp_path / "vae")
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (300, 200), (200, 10, 10)).save(images / "wide.png")
    Image.new("RGB", (256, 256), (10, 200, 10)).save(images / "square.jpg")
    (images / "wide.txt").write_text("a red wall")
    items = train_cli.read_folder(images, tmp_path / "vae", resolution=512)
    shapes = {name: tuple(lat.shape) for name, lat, _ in items}
    assert shapes == {"square": (1, 4, 64, 64), "wide": (1, 4, 52, 76)}  # 512x512 and the 0.68 bin, 608x416
    assert dict((n, c) for n, _, c in items) == {"square": "", "wide": "a red wall"}
    root, ckpt, t5, data = cli_files
    args = _train_args(cli_files, "--vae", str(tmp_path / "vae"), "--resolution", "256", "--steps", "2",
                       str(tmp_path / "res.safetensors"))
    args[args.index("--data") + 1] = str(images)
    assert cli(args) == 0 and "trained step 2 of 2" in capsys.readouterr().out
