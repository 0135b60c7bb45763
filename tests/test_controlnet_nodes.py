"""Load PixArt ControlNet with ComfyUI's own Apply ControlNet, samplers, LoRA and errors, in-process
on ComfyUI 0.3.75 (CPU) with the tiny random-weight models of test_nodes.py."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import pixart_fixtures as pf
from pixart_core.controlnet import ControlInput, save_controlnet
from tests.test_nodes import _one_thread, empty_latent, env, native_pixart, one_sentence, run_sampler  # noqa: F401

sys.path.insert(0, str(Path(__file__).resolve().parent / "e2e"))
import vae_fixtures  # noqa: E402

SDXL_SCALE = 0.13025


@pytest.fixture(scope="module")
def cn(env):
    """Two ControlNets for the tiny Σ model (official and diffusers layouts), a TAESD-XL VAE, a hint image."""
    import comfy.sd
    import folder_paths
    folder = env.root / "controlnet"
    folder.mkdir()
    folder_paths.add_model_folder_path("controlnet", str(folder), is_default=True)
    nets = [pf.random_controlnet(env.core.config, num_blocks=1, seed=s) for s in (5, 6)]
    save_controlnet(nets[0].state_dict(), folder / "pixart_cn_official.safetensors")
    save_controlnet(nets[0].state_dict(), folder / "pixart-cn-diffusers")
    save_controlnet(nets[1].state_dict(), folder / "pixart_cn_second.pth")
    save_controlnet(pf.random_controlnet(env.core.config.replace(hidden_size=96, num_heads=6)).state_dict(),
                    folder / "pixart_cn_wide.safetensors")
    save_file({"input_hint_block.0.weight": torch.zeros(16, 3, 3, 3)}, str(folder / "control_sd15_canny.safetensors"))
    enc, dec = vae_fixtures.tiny_taesdxl_state_dicts(0)
    sd = {f"taesd_encoder.{k}": v for k, v in enc.items()} | {f"taesd_decoder.{k}": v for k, v in dec.items()}
    vae = comfy.sd.VAE(sd=sd | {"vae_scale": torch.tensor(SDXL_SCALE), "vae_shift": torch.tensor(0.0)})
    g = torch.Generator().manual_seed(3)
    load = env.n.PixArtSuiteControlNetLoader.execute
    return {"nets": nets, "vae": vae, "image": torch.rand(1, 128, 128, 3, generator=g),
            "official": load("pixart_cn_official.safetensors")[0],
            "diffusers": load("[diffusers] pixart-cn-diffusers")[0],
            "second": load("pixart_cn_second.pth")[0], "wide": load("pixart_cn_wide.safetensors")[0]}


def apply(env, control_net, image, strength=1.0, start=0.0, end=1.0, vae=None, pos=None, neg=None):
    import nodes as comfy_nodes
    return comfy_nodes.ControlNetApplyAdvanced().apply_controlnet(pos or env.pos, neg or env.neg, control_net, image,
                                                                  strength, start, end, vae=vae)


def test_loader_lists_and_loads_both_layouts(env, cn):
    import comfy.controlnet
    choices = env.pack.nodes.controlnet.controlnet_choices()
    assert {"pixart_cn_official.safetensors", "[diffusers] pixart-cn-diffusers"} <= set(choices)
    for key in ("official", "diffusers"):
        c = cn[key]
        assert isinstance(c, comfy.controlnet.ControlBase) and c.net.num_blocks == 1
        for k, v in cn["nets"][0].state_dict().items():
            assert torch.equal(c.net.state_dict()[k], v), (key, k)
    assert [n.id for n in env.n.PixArtSuiteControlNetLoader.GET_SCHEMA().inputs] == ["control_net_name"]


def test_get_control_hands_the_model_the_vae_latent_of_the_resized_hint(env, cn):
    """Through the stock node: the hint is resized (centre crop) to the latent x 8, VAE-encoded, scaled into
    the model's latent space; the model's forward then equals pixart_core with that ControlInput."""
    import comfy.utils
    pos, neg = apply(env, cn["official"], cn["image"][:, :, :96], 0.8, vae=cn["vae"])  # 96 x 128 -> 128 x 128 crop
    control = pos[0][1]["control"]
    assert neg[0][1]["control"] is control  # one object for both halves of CFG
    control.pre_run(env.model.model, lambda p: env.model.model.model_sampling.percent_to_sigma(p))
    x = torch.randn(2, 4, 16, 16)
    sigma = torch.tensor([3.0, 3.0])
    out = control.get_control(x, sigma, {}, 2, {})
    (entry,) = out[env.pack.nodes.comfy_model.CONTROL_KEY]
    want = comfy.utils.common_upscale(cn["image"][:, :, :96].movedim(-1, 1), 128, 128, "nearest-exact", "center")
    want = cn["vae"].encode(want.movedim(1, -1)) * SDXL_SCALE
    assert entry.hint.shape == (1, 4, 16, 16) and torch.allclose(entry.hint, want, atol=1e-6)  # the model broadcasts
    assert entry.strength == 0.8 and entry.net is cn["official"].net
    _, t, y, mask = pf.inputs(env.core.config, batch=2, height=16, width=16)
    with torch.no_grad():
        got = env.model.model.diffusion_model(x, t, y, context_mask=mask, control=out)
        ref = env.core(x, t, y, mask, controls=[ControlInput(cn["nets"][0], want, 0.8)])[:, :4]
    assert pf.rel_err(got, ref) < 1e-6
    assert control.get_control(x, torch.tensor([0.0, 0.0]), {}, 2, {}) is not None  # default range: every step
    control.cleanup()


def test_sampling_strength_range_and_chaining(env, cn):
    image, vae = cn["image"], cn["vae"]
    plain = run_sampler(env, seed=1, steps=3)

    def sample(pos_neg, **kw):
        return run_sampler(env, seed=1, steps=3, pos=pos_neg[0], neg=pos_neg[1], **kw)

    full = sample(apply(env, cn["official"], image, 1.0, vae=vae))
    assert pf.rel_err(full, plain) > 1e-2  # the hint steers
    other = sample(apply(env, cn["official"], torch.rand(1, 128, 128, 3, generator=torch.Generator().manual_seed(8)),
                         1.0, vae=vae))
    assert pf.rel_err(other, full) > 1e-3  # ... and another hint steers elsewhere
    assert torch.equal(sample(apply(env, cn["diffusers"], image, 1.0, vae=vae)), full)  # same weights, other layout
    assert torch.equal(sample(apply(env, cn["official"], image, 0.0, vae=vae)), plain)  # strength 0: the plain model
    assert torch.equal(sample(apply(env, cn["official"], image, 1.0, 1.0, 1.0, vae=vae)), plain)  # never in range
    half = sample(apply(env, cn["official"], image, 1.0, 0.5, 1.0, vae=vae))
    assert pf.rel_err(half, plain) > 1e-4 and pf.rel_err(half, full) > 1e-4
    weak = sample(apply(env, cn["official"], image, 0.3, vae=vae))
    assert 0 < pf.rel_err(weak, plain) < pf.rel_err(full, plain)
    first = apply(env, cn["official"], image, 1.0, vae=vae)
    chained = apply(env, cn["second"], image, 0.7, vae=vae, pos=first[0], neg=first[1])
    assert chained[0][0][1]["control"].previous_controlnet is first[0][0][1]["control"]
    both = sample(chained)
    assert pf.rel_err(both, full) > 1e-3


def test_stock_ksampler_custom_advanced_lora_kv_and_wrong_sized_latent(env, cn):
    import comfy.sample
    import comfy.sd
    import comfy.samplers
    pos, neg = apply(env, cn["official"], cn["image"], 1.0, vae=cn["vae"])
    latent = torch.zeros(1, 4, 12, 20)  # not the hint's aspect ratio: resized and cropped like ComfyUI does
    noise = comfy.sample.prepare_noise(latent, 0)
    plain = comfy.sample.sample(env.model, noise, 2, 3.0, "euler", "normal", env.pos, env.neg, latent)
    ks = comfy.sample.sample(env.model, noise, 2, 3.0, "euler", "normal", pos, neg, latent)
    assert ks.shape == latent.shape and torch.isfinite(ks).all() and pf.rel_err(ks, plain) > 1e-3
    assert pos[0][1]["control"].cond_hint is None  # cleaned up after sampling, as ComfyUI's own ControlNets
    guider = comfy.samplers.CFGGuider(env.model)
    guider.set_conds(pos, neg)
    guider.set_cfg(3.0)
    sigmas = env.n.PixArtSuiteSigmas.execute(env.model, "dpm_time_uniform", 2, 1.0)[0]
    sampler = env.n.PixArtSuiteSamplerSelect.execute("dpmpp_2m", 1.0)[0]
    adv = guider.sample(noise, latent, sampler, sigmas, seed=0)
    assert adv.shape == latent.shape and torch.isfinite(adv).all()
    D = env.core.config.hidden_size
    g = torch.Generator().manual_seed(3)
    lora = {"transformer.transformer_blocks.1.attn1.to_q.lora_A.weight": torch.randn(4, D, generator=g),
            "transformer.transformer_blocks.1.attn1.to_q.lora_B.weight": torch.randn(D, 4, generator=g)}
    patched, _ = comfy.sd.load_lora_for_models(env.model, None, lora, 1.0, 0.0)
    with_lora = comfy.sample.sample(patched, noise, 2, 3.0, "euler", "normal", pos, neg, latent)
    assert torch.isfinite(with_lora).all() and pf.rel_err(with_lora, ks) > 1e-4
    kv = env.n.PixArtSuiteKVCompression.execute(env.model, "all", 2, "avgpool")[0]
    compressed = comfy.sample.sample(kv, noise, 2, 3.0, "euler", "normal", pos, neg, latent)
    assert torch.isfinite(compressed).all() and pf.rel_err(compressed, ks) > 1e-4


def test_previews_and_interrupt(env, cn):
    import comfy.model_management as mm
    import comfy.sample
    pos, neg = apply(env, cn["official"], cn["image"], 1.0, vae=cn["vae"])
    latent = empty_latent()["samples"]
    noise = comfy.sample.prepare_noise(latent, 0)
    seen = []
    comfy.sample.sample(env.model, noise, 3, 3.0, "euler", "normal", pos, neg, latent,
                        callback=lambda step, x0, x, total: seen.append((step, x0.shape)))
    assert [s for s, _ in seen] == [0, 1, 2] and all(shape == latent.shape for _, shape in seen)

    def stop(step, x0, x, total):
        mm.interrupt_current_processing(True)

    try:
        with pytest.raises(mm.InterruptProcessingException):
            comfy.sample.sample(env.model, noise, 3, 3.0, "euler", "normal", pos, neg, latent, callback=stop)
    finally:
        mm.interrupt_current_processing(False)


def test_errors_are_one_sentence(env, cn):
    import comfy.cldm.cldm
    import comfy.controlnet
    import comfy.ldm.flux.controlnet
    import comfy.model_patcher
    image, vae = cn["image"], cn["vae"]
    with pytest.raises(ValueError, match="is 96 wide but the PixArt model is 64 wide") as err:
        run_sampler(env, pos=apply(env, cn["wide"], image, vae=vae)[0], neg=env.neg)
    one_sentence(err)
    assert "pixart_cn_wide.safetensors" in str(err.value)
    with pytest.raises(ValueError, match="needs the hint image as a latent: connect the VAE") as err:
        run_sampler(env, pos=apply(env, cn["official"], image)[0], neg=env.neg)
    one_sentence(err)
    with pytest.raises(ValueError, match="SD1.x/SDXL ControlNet, not a PixArt ControlNet") as err:
        env.n.PixArtSuiteControlNetLoader.execute("control_sd15_canny.safetensors")
    one_sentence(err)
    for module_class, what in ((comfy.cldm.cldm.ControlNet, "an SD1.x/SDXL ControlNet"),
                               (comfy.ldm.flux.controlnet.ControlNetFlux, "a Flux ControlNet")):
        stock = comfy.controlnet.ControlNet(None)
        stock.control_model = module_class.__new__(module_class)  # its class is all the check reads
        stock.control_model_wrapped = comfy.model_patcher.ModelPatcher(torch.nn.Linear(1, 1), torch.device("cpu"),
                                                                       torch.device("cpu"))
        pos = [[env.pos[0][0], {**env.pos[0][1], "control": stock}]]
        with pytest.raises(ValueError, match=f"carries {what}, which cannot steer a PixArt model") as err:
            run_sampler(env, pos=pos)
        one_sentence(err)
    native = native_pixart(env)
    pos, neg = apply(env, cn["official"], image, vae=vae)
    with pytest.raises(ValueError, match="applied to ComfyUI's own PixArt model, which ignores ControlNets") as err:
        run_sampler(env, model=native, pos=pos, neg=neg, latent=empty_latent(side=64))
    one_sentence(err)
