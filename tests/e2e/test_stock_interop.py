"""Stock ComfyUI 0.3.75 nodes on the pack's MODEL, CLIP, CONDITIONING and LATENT, on the real host (issue #15).

Each stock node runs next to the same graph without it, and the test asserts what the node promises: the
same latent where it promises equality (ConditioningAverage at strength 0 and 1, ModelMergeSimple at ratio
0 and 1, a saved file loaded again, neutral settings of RescaleCFG / APG / SLG), a different one where it
promises an effect (skip-layer guidance, LoRAs on the modulation tables, the official guider), and its one
sentence where a node cannot apply (UNet-only nodes). All branches of a kind share one prompt, so the host
loads and encodes once; each branch ends in SaveLatent, read back here.

The stand-ins (pixart_model_fixtures.py, interop_fixtures.py) are the depth-2 DiT and the tiny T5: blocks
0 and 1, prompts of 8 and 25 tokens padded to 300. Images are 256 px (32 x 32 latents), 2 steps.
"""
from __future__ import annotations

import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import interop_fixtures as ix
import pixart_model_fixtures as fx
from comfy_host import ExecutionError

pytestmark = pytest.mark.e2e

PROMPT = "a photo of a cat"
LONG_PROMPT = "a watercolour painting of a lighthouse on a cliff above a stormy sea at dusk, seagulls, spray"
OFFICIAL, OWN = "prompt's mask (official Σ)", "own mask (diffusers)"


class Graph:
    """An API-format prompt under construction; every branch ends in `save(name, latent)`."""

    def __init__(self, tag: str):
        self.nodes, self.saves, self.tag = {}, {}, tag

    def add(self, class_type: str, **inputs) -> str:
        nid = str(len(self.nodes) + 1)
        self.nodes[nid] = {"class_type": class_type, "inputs": inputs}
        return nid

    def save(self, name: str, latent, slot: int = 0) -> None:
        self.saves[name] = self.add("SaveLatent", samples=[latent, slot], filename_prefix=f"{self.tag}/{name}")

    def run(self, comfy, timeout=600) -> tuple[dict, dict]:
        """(name -> latent tensor, the history entry)."""
        entry = comfy.run(self.nodes, timeout=timeout)
        out = {}
        for name, nid in self.saves.items():
            (item,) = entry["outputs"][nid]["latents"]
            out[name] = load_file(str(comfy.output_dir / item["subfolder"] / item["filename"]))["latent_tensor"]
        return out, entry


def base(tag: str, ckpt=fx.PIXART_1024) -> tuple[Graph, dict]:
    """Loader, T5, the prompts, a 256 px empty latent: ids by role."""
    g = Graph(tag)
    ids = {"model": g.add("PixArtSuiteModelLoader", ckpt_name=ckpt, preset="auto", weight_dtype="default",
                          kv_compression="checkpoint", kv_mode="avgpool"),
           "clip": g.add("PixArtSuiteT5Loader", t5_name=fx.T5_XXL, dtype="default", device="auto"),
           "latent": g.add("EmptyLatentImage", width=256, height=256, batch_size=1)}
    for role, text in (("pos", PROMPT), ("neg", ""), ("long", LONG_PROMPT)):
        ids[role] = g.add("PixArtSuiteT5TextEncode", clip=[ids["clip"], 0], text=text, max_length="Σ: 300 tokens")
    return g, ids


def ksampler(g: Graph, ids, model=None, pos=None, neg=None, latent=None, **settings) -> str:
    inputs = {"seed": 0, "steps": 2, "cfg": 4.5, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}
    inputs.update(settings)
    return g.add("KSampler", model=[model or ids["model"], 0], positive=[pos or ids["pos"], 0],
                 negative=[neg or ids["neg"], 0], latent_image=[latent or ids["latent"], 0], **inputs)


def pixart_sampler(g: Graph, ids, pos=None, neg=None, null_mask=OFFICIAL, model=None) -> str:
    return g.add("PixArtSuiteSampler", model=[model or ids["model"], 0], positive=[pos or ids["pos"], 0],
                 negative=[neg or ids["neg"], 0], latent_image=[ids["latent"], 0], seed=0, steps=2, cfg=4.5,
                 sampler_name="dpmpp_2m", step_grid="dpm_time_uniform", null_mask=null_mask, denoise=1.0)


def same(a, b, tol=0.0) -> bool:
    return a.shape == b.shape and bool(((a - b).abs().max() <= tol * max(1.0, float(b.abs().max()))))


def apart(a, b, at_least=1e-3) -> bool:
    """Different by more than `at_least` of the latent's range (SLG on a no-op gave 1e-6)."""
    return float((a - b).abs().max()) > at_least * float(b.abs().max())


def ui_text(entry, nid) -> str:
    return " ".join(entry["outputs"].get(nid, {}).get("text", []))


# --------------------------------------------------------------------------------------------
# CONDITIONING
# --------------------------------------------------------------------------------------------

def test_conditioning_nodes(comfy):
    g, ids = base("cond")
    g.save("base", ksampler(g, ids))
    g.save("long", ksampler(g, ids, pos=ids["long"]))

    def cond(class_type, **inputs):  # a value naming a node of the graph is a link to its first output
        return g.add(class_type, **{k: [v, 0] if v in g.nodes else v for k, v in inputs.items()})

    # ConditioningAverage: to_strength 1 is `to`, 0 is `from`, whatever their lengths
    g.save("avg_to", ksampler(g, ids, pos=cond("ConditioningAverage", conditioning_to=ids["pos"],
                                              conditioning_from=ids["long"], conditioning_to_strength=1.0)))
    g.save("avg_from", ksampler(g, ids, pos=cond("ConditioningAverage", conditioning_to=ids["long"],
                                                conditioning_from=ids["pos"], conditioning_to_strength=0.0)))
    g.save("avg_half", ksampler(g, ids, pos=cond("ConditioningAverage", conditioning_to=ids["pos"],
                                                conditioning_from=ids["long"], conditioning_to_strength=0.5)))
    # ConditioningConcat: a 600-token caption; with a zeroed-out second half it is the first prompt
    zero = cond("ConditioningZeroOut", conditioning=ids["long"])
    g.save("concat_zero", ksampler(g, ids, pos=cond("ConditioningConcat", conditioning_to=ids["pos"],
                                                   conditioning_from=zero)))
    concat = cond("ConditioningConcat", conditioning_to=ids["pos"], conditioning_from=ids["long"])
    g.save("concat", ksampler(g, ids, pos=concat))
    # stock CLIPTextEncode on the pack's CLIP: the same conditioning as T5 Text Encode (PixArt) at 300 tokens
    g.save("cliptextencode", ksampler(g, ids, pos=cond("CLIPTextEncode", clip=ids["clip"], text=PROMPT)))
    # Combine of a prompt with itself, a prompt split over the schedule, a full-size area and mask: the prompt
    g.save("combine", ksampler(g, ids, pos=cond("ConditioningCombine", conditioning_1=ids["pos"],
                                               conditioning_2=ids["pos"])))
    early = cond("ConditioningSetTimestepRange", conditioning=ids["pos"], start=0.0, end=0.5)
    late = cond("ConditioningSetTimestepRange", conditioning=ids["pos"], start=0.5, end=1.0)
    g.save("timesteps", ksampler(g, ids, pos=cond("ConditioningCombine", conditioning_1=early, conditioning_2=late)))
    g.save("area_full", ksampler(g, ids, pos=cond("ConditioningSetArea", conditioning=ids["pos"], width=256,
                                                 height=256, x=0, y=0, strength=1.0)))
    mask = g.add("SolidMask", value=1.0, width=256, height=256)
    g.save("mask_full", ksampler(g, ids, pos=cond("ConditioningSetMask", conditioning=ids["pos"], mask=mask,
                                                 strength=1.0, set_cond_area="default")))
    g.save("area_half", ksampler(g, ids, pos=cond("ConditioningCombine", conditioning_1=ids["pos"], conditioning_2=cond(
        "ConditioningSetArea", conditioning=ids["long"], width=128, height=256, x=0, y=0, strength=1.0))))
    g.save("zero_negative", ksampler(g, ids, neg=cond("ConditioningZeroOut", conditioning=ids["neg"])))
    # the official null through stock nodes: an Average at strength 1 keeps the negative's T5 outputs
    official = pixart_sampler(g, ids)
    g.save("official", official)
    g.save("official_avg_neg", pixart_sampler(g, ids, neg=cond("ConditioningAverage", conditioning_to=ids["neg"],
                                                              conditioning_from=ids["long"],
                                                              conditioning_to_strength=1.0)))
    concat_official = pixart_sampler(g, ids, pos=concat)
    g.save("concat_official", concat_official)
    changed_neg = pixart_sampler(g, ids, neg=cond("ConditioningAverage", conditioning_to=ids["neg"],
                                                  conditioning_from=ids["long"], conditioning_to_strength=0.5))
    g.save("official_half_neg", changed_neg)
    got, entry = g.run(comfy)

    b = got["base"]
    assert apart(got["long"], b, 0.05)  # the two prompts give different latents
    assert same(got["avg_to"], b) and same(got["avg_from"], b)
    assert apart(got["avg_half"], b) and apart(got["avg_half"], got["long"])
    assert same(got["concat_zero"], b, 1e-5)  # rounding only: the 300-token negative is batched repeated to 600
    assert apart(got["concat"], b) and apart(got["concat"], got["long"])
    assert same(got["cliptextencode"], b)
    for name in ("combine", "timesteps", "area_full", "mask_full"):
        assert same(got[name], b, 1e-5), name
    assert apart(got["area_half"], b) and apart(got["zero_negative"], b)
    assert same(got["official_avg_neg"], got["official"])
    assert apart(got["official"], b)  # official null vs KSampler's own-mask negative (and another sampler)
    assert ui_text(entry, concat_official) == (
        "the negative has 300 tokens and the prompt 600 (encode both with 'T5 Text Encode (PixArt)' at the same "
        "max_length); the negative attends its own tokens (diffusers), not the prompt's (official).")
    assert ui_text(entry, changed_neg).startswith("a conditioning node changed the negative after T5 Text Encode")
    assert ui_text(entry, official) == ""


# --------------------------------------------------------------------------------------------
# Samplers, guidance, LATENT
# --------------------------------------------------------------------------------------------

def test_sampling_and_guidance_nodes(comfy):
    g, ids = base("sampling")
    b = ksampler(g, ids)
    g.save("base", b)
    for sampler, scheduler in (("dpmpp_2m", "karras"), ("euler_ancestral", "simple"), ("ddim", "ddim_uniform"),
                               ("uni_pc", "sgm_uniform"), ("dpmpp_sde", "beta")):
        g.save(f"{sampler}_{scheduler}", ksampler(g, ids, sampler_name=sampler, scheduler=scheduler, steps=3))
    m = [ids["model"], 0]
    g.save("cfg_5.5", ksampler(g, ids, cfg=5.5))
    g.save("advanced", g.add("KSamplerAdvanced", model=m, add_noise="enable", noise_seed=0, steps=2, cfg=4.5,
                             sampler_name="euler", scheduler="normal", positive=[ids["pos"], 0],
                             negative=[ids["neg"], 0], latent_image=[ids["latent"], 0], start_at_step=0,
                             end_at_step=10000, return_with_leftover_noise="disable"))
    # SplitSigmas: the two halves one after the other are the whole schedule
    sigmas = g.add("BasicScheduler", model=m, scheduler="normal", steps=4, denoise=1.0)
    euler = g.add("KSamplerSelect", sampler_name="euler")
    split = g.add("SplitSigmas", sigmas=[sigmas, 0], step=2)

    def custom(sig, latent, add_noise=True, model=m):
        return g.add("SamplerCustom", model=model, add_noise=add_noise, noise_seed=0, cfg=4.5, positive=[ids["pos"], 0],
                     negative=[ids["neg"], 0], sampler=[euler, 0], sigmas=sig, latent_image=latent)

    g.save("custom_whole", custom([sigmas, 0], [ids["latent"], 0]))
    first = custom([split, 0], [ids["latent"], 0])
    g.save("custom_halves", custom([split, 1], [first, 0], add_noise=False))
    # model-side guidance: neutral settings are plain CFG, the others change it

    def slg(double, single, scale=3.0):
        return {"double_layers": double, "single_layers": single, "scale": scale, "start_percent": 0.0,
                "end_percent": 1.0, "rescaling_scale": 0.0}

    for name, class_type, settings in (("rescale_0", "RescaleCFG", {"multiplier": 0.0}),
                                       ("rescale", "RescaleCFG", {"multiplier": 0.7}),
                                       ("apg_neutral", "APG", {"eta": 1.0, "norm_threshold": 0.0, "momentum": 0.0}),
                                       ("apg", "APG", {"eta": 0.0, "norm_threshold": 5.0, "momentum": -0.5}),
                                       ("cfg_zero_star", "CFGZeroStar", {}),
                                       ("slg_0", "SkipLayerGuidanceDiT", slg("1", "", scale=0.0)),
                                       ("slg_double", "SkipLayerGuidanceDiT", slg("1", "")),
                                       ("slg_single", "SkipLayerGuidanceDiT", slg("", "1")),
                                       ("slg_block0", "SkipLayerGuidanceDiT", slg("0", "")),
                                       ("slg_simple", "SkipLayerGuidanceDiTSimple", {
                                           "double_layers": "1", "single_layers": "", "start_percent": 0.0,
                                           "end_percent": 1.0})):
        g.save(name, ksampler(g, ids, model=g.add(class_type, model=m, **settings)))
    # SamplerCustomAdvanced: the PixArt CFG Guider is the PixArt Sampler; the stock CFGGuider its diffusers mode
    noise = g.add("RandomNoise", noise_seed=0)
    dpm = g.add("PixArtSuiteSamplerSelect", sampler_name="dpmpp_2m", eta=1.0)
    grid = g.add("PixArtSuiteSigmas", model=m, step_grid="dpm_time_uniform", steps=2, denoise=1.0)
    for name, guider in (
            ("guider_official", g.add("PixArtSuiteCFGGuider", model=m, positive=[ids["pos"], 0],
                                      negative=[ids["neg"], 0], cfg=4.5, null_mask=OFFICIAL)),
            ("guider_own", g.add("PixArtSuiteCFGGuider", model=m, positive=[ids["pos"], 0],
                                 negative=[ids["neg"], 0], cfg=4.5, null_mask=OWN)),
            ("guider_stock", g.add("CFGGuider", model=m, positive=[ids["pos"], 0], negative=[ids["neg"], 0],
                                   cfg=4.5))):
        g.save(name, g.add("SamplerCustomAdvanced", noise=[noise, 0], guider=[guider, 0], sampler=[dpm, 0],
                           sigmas=[grid, 0], latent_image=[ids["latent"], 0]))
    g.save("sampler_official", pixart_sampler(g, ids))
    g.save("sampler_own", pixart_sampler(g, ids, null_mask=OWN))
    # LATENT: a batch of two samples its first like one; a noise mask keeps the masked-out half
    g.save("batch", ksampler(g, ids, latent=g.add("LatentBatch", samples1=[ids["latent"], 0],
                                                  samples2=[ids["latent"], 0])))
    half = g.add("SolidMask", value=1.0, width=128, height=256)
    mask = g.add("MaskComposite", destination=[g.add("SolidMask", value=0.0, width=256, height=256), 0],
                 source=[half, 0], x=128, y=0, operation="add")  # right half 1: repaint only there
    g.save("inpaint", ksampler(g, ids, latent=g.add("SetLatentNoiseMask", samples=[b, 0], mask=[mask, 0])))
    got, _ = g.run(comfy)

    base_latent = got["base"]
    for name in ("dpmpp_2m_karras", "euler_ancestral_simple", "ddim_ddim_uniform", "uni_pc_sgm_uniform",
                 "dpmpp_sde_beta"):
        assert torch.isfinite(got[name]).all() and apart(got[name], base_latent), name
    assert same(got["advanced"], base_latent)
    assert same(got["custom_halves"], got["custom_whole"], 1e-5)
    assert same(got["rescale_0"], base_latent, 1e-5) and apart(got["rescale"], base_latent)
    # APG's neutral settings add the guidance once more than CFG does: uncond + (cfg + 1)(cond - uncond)
    assert same(got["apg_neutral"], got["cfg_5.5"], 1e-5) and apart(got["apg"], base_latent)
    assert apart(got["cfg_zero_star"], base_latent)
    assert same(got["slg_0"], base_latent)
    assert apart(got["slg_double"], base_latent, 0.01) and apart(got["slg_simple"], base_latent, 0.01)
    assert same(got["slg_single"], got["slg_double"])  # PixArt's one kind of block answers to both lists
    assert apart(got["slg_block0"], got["slg_double"], 0.01)
    assert same(got["guider_official"], got["sampler_official"]) and same(got["guider_own"], got["sampler_own"])
    assert same(got["guider_stock"], got["sampler_own"], 1e-6)
    assert apart(got["guider_official"], got["guider_stock"], 0.01)
    assert got["batch"].shape[0] == 2 and same(got["batch"][:1], base_latent, 1e-5)
    assert torch.equal(got["inpaint"][..., :16], base_latent[..., :16])
    assert apart(got["inpaint"][..., 16:], base_latent[..., 16:])


def test_pixart_pag_node_with_stock_and_pack_samplers(comfy):
    """PixArt PAG on the real host: scale 0 is the plain model; otherwise it changes KSampler, the PixArt
    Sampler (at CFG 1 too) and SamplerCustomAdvanced, and stacks on KV compression."""
    g, ids = base("pag")
    m = [ids["model"], 0]

    def pag(scale, model=m, layers="1"):  # the stand-in models have two blocks
        return [g.add("PixArtSuitePAG", model=model, preset="layers below", layers=layers, scale=scale,
                      adaptive_scale=0.0), 0]

    g.save("base", ksampler(g, ids))
    g.save("pag_0", ksampler(g, ids, model=pag(0.0)[0]))
    g.save("pag", ksampler(g, ids, model=pag(3.0)[0]))
    g.save("docs_preset", ksampler(g, ids, model=g.add("PixArtSuitePAG", model=m, preset="diffusers default (blocks.1)",
                                                       layers="ignored", scale=3.0, adaptive_scale=0.0)))
    g.save("sampler_cfg1", g.add("PixArtSuiteSampler", model=pag(3.0), positive=[ids["pos"], 0],
                                 negative=[ids["neg"], 0], latent_image=[ids["latent"], 0], seed=0, steps=2, cfg=1.0,
                                 sampler_name="dpmpp_2m", step_grid="dpm_time_uniform", null_mask=OFFICIAL, denoise=1.0))
    g.save("sampler_cfg1_plain", g.add("PixArtSuiteSampler", model=m, positive=[ids["pos"], 0],
                                       negative=[ids["neg"], 0], latent_image=[ids["latent"], 0], seed=0, steps=2,
                                       cfg=1.0, sampler_name="dpmpp_2m", step_grid="dpm_time_uniform",
                                       null_mask=OFFICIAL, denoise=1.0))
    kv = [g.add("PixArtSuiteKVCompression", model=m, layers="0-1", ratio=2, mode="avgpool"), 0]
    g.save("kv", ksampler(g, ids, model=kv[0]))
    g.save("kv_pag", ksampler(g, ids, model=pag(3.0, model=kv)[0]))
    guider = g.add("PixArtSuiteCFGGuider", model=pag(3.0), positive=[ids["pos"], 0], negative=[ids["neg"], 0],
                   cfg=4.5, null_mask=OFFICIAL)
    g.save("custom", g.add("SamplerCustomAdvanced", noise=[g.add("RandomNoise", noise_seed=0), 0], guider=[guider, 0],
                           sampler=[g.add("PixArtSuiteSamplerSelect", sampler_name="dpmpp_2m", eta=1.0), 0],
                           sigmas=[g.add("PixArtSuiteSigmas", model=m, step_grid="dpm_time_uniform", steps=2,
                                         denoise=1.0), 0], latent_image=[ids["latent"], 0]))
    g.save("sampler_pag", pixart_sampler(g, ids, model=pag(3.0)[0]))
    got, _ = g.run(comfy)
    assert same(got["pag_0"], got["base"])
    assert apart(got["pag"], got["base"]) and same(got["docs_preset"], got["pag"])
    assert apart(got["sampler_cfg1"], got["sampler_cfg1_plain"])
    assert apart(got["kv_pag"], got["kv"]) and apart(got["kv_pag"], got["pag"])
    assert same(got["custom"], got["sampler_pag"])


# --------------------------------------------------------------------------------------------
# MODEL and CLIP: merges, LoRAs, saving and loading again
# --------------------------------------------------------------------------------------------

SAVED = {"merged": "diffusion_models", "lora_tables": "diffusion_models", "checkpoint": "checkpoints",
         "clip_t5xxl": "text_encoders"}  # output file stem -> where it is put to be loaded again


@pytest.fixture(scope="module")
def model_run(comfy):
    """One prompt: merges and LoRAs sampled, and the MODEL / CLIP / checkpoint save nodes."""
    g, ids = base("model")
    m = [ids["model"], 0]
    b_model = g.add("PixArtSuiteModelLoader", ckpt_name=ix.MODEL_B, preset="auto", weight_dtype="default",
                    kv_compression="checkpoint", kv_mode="avgpool")
    g.save("base", ksampler(g, ids))
    g.save("base_b", ksampler(g, ids, model=b_model))
    merges = {r: g.add("ModelMergeSimple", model1=m, model2=[b_model, 0], ratio=r) for r in (0.0, 0.5, 1.0)}
    for r, nid in merges.items():
        g.save(f"merge_{r}", ksampler(g, ids, model=nid))
    for s in (0.0, 1.0):
        g.save(f"stock_linear_{s}", ksampler(g, ids, model=g.add("LoraLoaderModelOnly", model=m,
                                                                 lora_name=ix.LINEAR_LORA, strength_model=s)))
    pack_lora = g.add("PixArtSuiteLoraLoader", model=m, lora_name=ix.TABLE_LORA, strength_model=1.0,
                      strength_clip=1.0)
    g.save("pack_tables", ksampler(g, ids, model=pack_lora))
    g.save("stock_tables", ksampler(g, ids, model=g.add("LoraLoaderModelOnly", model=m, lora_name=ix.TABLE_LORA,
                                                        strength_model=1.0)))
    g.add("ModelSave", model=[merges[0.5], 0], filename_prefix="interop/merged")
    g.add("ModelSave", model=[pack_lora, 0], filename_prefix="interop/lora_tables")
    g.add("CLIPSave", clip=[ids["clip"], 0], filename_prefix="interop/clip")
    vae = g.add("VAELoader", vae_name=fx.SDXL_VAE)
    g.add("CheckpointSave", model=m, clip=[ids["clip"], 0], vae=[vae, 0], filename_prefix="interop/checkpoint")
    got, entry = g.run(comfy)
    files = {}
    for stem, folder in SAVED.items():
        (path,) = (comfy.output_dir / "interop").glob(f"{stem}_*_.safetensors")
        files[stem] = comfy.models_dir / folder / f"interop_saved_{stem}.safetensors"
        shutil.copy(path, files[stem])
    return got, ui_text(entry, pack_lora), files


def test_merges_and_loras(model_run):
    got, lora_text, _ = model_run
    assert apart(got["base_b"], got["base"], 0.05)
    assert same(got["merge_1.0"], got["base"], 1e-6) and same(got["merge_0.0"], got["base_b"], 1e-6)
    assert apart(got["merge_0.5"], got["base"]) and apart(got["merge_0.5"], got["base_b"])
    assert same(got["stock_linear_0.0"], got["base"]) and apart(got["stock_linear_1.0"], got["base"])
    # the modulation tables take LoRAs, from the pack's loader and the stock one alike
    assert lora_text.startswith(f"{ix.TABLE_LORA}: applied 2 of 2 keys") and "NOT applied" not in lora_text
    assert apart(got["pack_tables"], got["base"], 0.01) and same(got["stock_tables"], got["pack_tables"])


def test_saved_files_load_again_to_the_same_model(comfy, model_run):
    got, _, files = model_run
    with safe_open(str(files["merged"]), "pt") as f:
        keys = set(f.keys())
        assert tuple(f.get_slice("model.diffusion_model.pos_embed").get_shape()) == (1, 64 * 64, 64)
    assert {"model.diffusion_model.blocks.0.scale_shift_table", "model.diffusion_model.y_embedder.y_embedding",
            "model.diffusion_model.final_layer.scale_shift_table"} <= keys  # the release's names
    with safe_open(str(files["clip_t5xxl"]), "pt") as f:
        clip_keys = set(f.keys())
    assert "shared.weight" in clip_keys and "encoder.embed_tokens.weight" not in clip_keys
    with safe_open(str(files["checkpoint"]), "pt") as f:
        ckpt_keys = set(f.keys())
    assert {"text_encoders.t5xxl.transformer.shared.weight", "model.diffusion_model.pos_embed",
            "model.diffusion_model.blocks.1.scale_shift_table"} <= ckpt_keys

    g, ids = base("reload", ckpt=files["merged"].name)
    g.save("merged", ksampler(g, ids))
    for stem in ("lora_tables", "checkpoint"):
        loader = g.add("PixArtSuiteModelLoader", ckpt_name=files[stem].name, preset="auto", weight_dtype="default",
                       kv_compression="checkpoint", kv_mode="avgpool")
        g.save(stem, ksampler(g, ids, model=loader))
    clip = g.add("PixArtSuiteT5Loader", t5_name=files["clip_t5xxl"].name, dtype="default", device="auto")
    pos, neg = (g.add("PixArtSuiteT5TextEncode", clip=[clip, 0], text=t, max_length="Σ: 300 tokens")
                for t in (PROMPT, ""))
    first = g.add("PixArtSuiteModelLoader", ckpt_name=fx.PIXART_1024, preset="auto", weight_dtype="default",
                  kv_compression="checkpoint", kv_mode="avgpool")
    g.save("clip", ksampler(g, ids, model=first, pos=pos, neg=neg))
    again, _ = g.run(comfy)
    assert same(again["merged"], got["merge_0.5"])
    assert same(again["lora_tables"], got["pack_tables"])
    assert same(again["checkpoint"], got["base"]) and same(again["clip"], got["base"])


# --------------------------------------------------------------------------------------------
# UNet-only nodes: one sentence naming the node, never a silently unchanged image
# --------------------------------------------------------------------------------------------

UNET_ONLY = {
    "FreeU": ({"b1": 1.1, "b2": 1.2, "s1": 0.9, "s2": 0.2}, "FreeU", "reads the UNet setting 'model_channels'"),
    "FreeU_V2": ({"b1": 1.3, "b2": 1.4, "s1": 0.9, "s2": 0.2}, "FreeU_V2", "reads the UNet setting 'model_channels'"),
    "TomePatchModel": ({"ratio": 0.3}, "KSampler", "patches a UNet (attn1_patch)"),
    "HyperTile": ({"tile_size": 256, "swap_size": 2, "max_depth": 0, "scale_depth": False}, "KSampler",
                  "patches a UNet (attn1_patch)"),
    "PatchModelAddDownscale": ({"block_number": 3, "downscale_factor": 2.0, "start_percent": 0.0,
                                "end_percent": 0.35, "downscale_after_skip": True, "downscale_method": "bicubic",
                                "upscale_method": "bicubic"}, "KSampler", "patches a UNet (input_block_patch_after_skip)"),
    "PerturbedAttentionGuidance": ({"scale": 3.0}, "KSampler", "patches a UNet (attn1 replace)"),
    "SelfAttentionGuidance": ({"scale": 0.5, "blur_sigma": 2.0}, "KSampler", "patches a UNet (attn1 replace)"),
}


@pytest.mark.parametrize("node", list(UNET_ONLY))
def test_unet_only_nodes_say_so(comfy, node):
    settings, failing, what = UNET_ONLY[node]
    g, ids = base(f"unet_{node}")
    g.save("out", ksampler(g, ids, model=g.add(node, model=[ids["model"], 0], **settings)))
    with pytest.raises(ExecutionError) as err:
        comfy.run(g.nodes, timeout=300)
    e = err.value
    assert e.node_type == failing
    assert e.exception_message.strip() == (
        f"{node} {what}, which PixArt, a DiT, does not have" + (
            ": it works on UNet models (SD1.x/SDXL) only; remove it from the graph" if failing == node else
            ", so it would change nothing; remove it from the graph" + (
                "; for perturbed-attention guidance on PixArt use this pack's 'PixArt PAG' node instead"
                if node == "PerturbedAttentionGuidance" else " (UNet-only nodes work on SD1.x/SDXL models)")))
