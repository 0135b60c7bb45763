"""Write the example workflows (workflows/*.json, UI format) and their thumbnails (workflows/*.jpg).

    python scripts/make_workflows.py [--object-info FILE] [--out workflows]

The workflows are what users drag onto the canvas or open from Workflow > Browse Templates
(ComfyUI serves a pack's workflows/ folder as templates; the front end asks for a same-name .jpg
as the thumbnail, never a .png). Each is built here from the node schemas of a running ComfyUI
0.3.75 with this pack (GET /object_info, fetched by starting the test host, or read from --object-info),
so the widget order is the one the front end uses and a schema change is picked up by running
this again. The JSON is the canvas's own save format (version 0.4: nodes with type/pos/size/
inputs/outputs/widgets_values/properties, links as [id, from, slot, to, slot, type]).

Models are named by their release file names (README "Models"). Every node whose widget names a
file of pixart_core.hub.FILES (the one table of released files) lists it in properties.models
(name, url, directory, sha256 where known): the front end's missing-models dialog reads that
when a workflow is opened, so add a row there for a new model file and every workflow naming it
carries it. The thumbnail is a rendered picture of the graph (what is connected to what, and the
output size): sample images would need the real weights, which this repository does not ship.
"""
from __future__ import annotations

import argparse
import json
import sys
import uuid
from pathlib import Path
from typing import Any, Mapping

sys.path.insert(0, str(Path(__file__).resolve().parent))
import comfy_host  # noqa: E402

sys.path.insert(0, str(comfy_host.REPO))
from pixart_core.hub import FILES as MODEL_FILES, HubFile  # noqa: E402  (the table of released files)

REPO = comfy_host.REPO
OUT_DIR = REPO / "workflows"
PACK_ID = "pixart-sigma-suite"  # pyproject [project] name: the registry id the Manager resolves
PACK_VERSION = "0.1.0"
COMFY_VERSION = "0.3.75"
FRONTEND_VERSION = "1.32.9"

PIXART_1024 = "PixArt-Sigma-XL-2-1024-MS.pth"
PIXART_2K = "PixArt-Sigma-XL-2-2K-MS.pth"
T5_XXL = "t5xxl_fp16.safetensors"
SDXL_VAE = "sdxl_vae.safetensors"
ALPHA_CONTROLNET = "PixArt-XL-2-1024-ControlNet.pth"
SIGMA_CANNY = "pixart_sigma_controlnet_canny.safetensors"
SD15_VAE = "vae-ft-ema-560000-ema-pruned.safetensors"
PIXART_LCM = "PixArt-LCM-XL-2-1024-MS.safetensors"
ESRGAN_X4 = "RealESRGAN_x4plus.pth"
HED_IMAGE = "hed_map.png"

PROMPT = ("A small cactus with a happy face in the Sahara desert, golden hour, soft light, highly detailed, "
          "sharp focus")
NEGATIVE = ""  # the official PixArt-Σ inference uses the empty prompt as the negative
SEED = 42

# file name -> "folder - source" for the Read-me notes, from the table of released files
MODELS_NOTE = {name: f"ComfyUI/models/{f.directory}/ - from huggingface.co/{f.repo}" for name, f in MODEL_FILES.items()}
MODELS_NOTE[ALPHA_CONTROLNET] += " (holds the PixArt-α model too: both loaders read it)"
MODELS_NOTE[PIXART_LCM] += (" (its transformer/diffusion_pytorch_model.safetensors, saved under this name: "
                            "`python -m pixart_core download alpha-1024-lcm` does that)")
MODELS_NOTE.update({  # files outside the table: not released on the Hub under one name
    SIGMA_CANNY: "ComfyUI/models/controlnet/ - your own PixArt-Σ canny ControlNet (none was released; e.g. "
                 "trained with SimpleTuner), any name",
    ESRGAN_X4: "ComfyUI/models/upscale_models/ - from github.com/xinntao/Real-ESRGAN releases (any ESRGAN-family "
               "x4 model works)",
})


def model_entry(f: HubFile) -> dict:
    """A file as the front end's missing-models dialog reads it from a node's properties.models:
    name, url (huggingface.co), directory (a models/ folder name) and, where known, the sha256."""
    entry = {"name": f.name, "url": f.url, "directory": f.directory}
    if f.sha256:
        entry.update(hash=f.sha256, hash_type="SHA256")
    return entry


WIDGET_TYPES = comfy_host.WIDGET_TYPES


# --------------------------------------------------------------------------------------------
# A tiny builder for UI-format workflows
# --------------------------------------------------------------------------------------------

class Workflow:
    def __init__(self, name: str, object_info: Mapping):
        self.name = name
        self.object_info = object_info
        self.nodes: list[dict] = []
        self.links: list[list] = []
        self._by_id: dict[int, dict] = {}

    # -- nodes --------------------------------------------------------------------------
    def _schema(self, ntype: str) -> Mapping:
        try:
            return self.object_info[ntype]
        except KeyError:
            raise SystemExit(f"node type {ntype!r} is not in /object_info (is the pack importable?)") from None

    @staticmethod
    def _inputs(schema: Mapping) -> list[tuple[str, Any, bool]]:
        """(name, spec, optional) in the front end's order: required then optional, by input_order."""
        out = []
        order = schema.get("input_order") or {}
        for section in ("required", "optional"):
            specs = (schema.get("input") or {}).get(section) or {}
            for name in order.get(section) or list(specs):
                if name in specs:
                    out.append((name, specs[name], section == "optional"))
        return out

    def node(self, ntype: str, pos, size, widgets: Mapping | None = None, title: str | None = None,
             color: str | None = None) -> int:
        schema = self._schema(ntype)
        widgets = dict(widgets or {})
        nid = len(self.nodes) + 1
        sockets, widget_inputs, values = [], [], []
        for name, spec, optional in self._inputs(schema):
            kind = spec[0]
            opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            if comfy_host._is_widget(spec):
                wtype = "COMBO" if isinstance(kind, list) else kind
                widget_inputs.append({"localized_name": name, "name": name, "type": wtype,
                                      "widget": {"name": name}, "link": None})
                if name in widgets:
                    value = widgets.pop(name)
                elif "default" in opts:
                    value = opts["default"]
                else:
                    options = kind if isinstance(kind, list) else opts.get("options") or []
                    if not options:
                        raise SystemExit(f"{self.name}: {ntype}.{name} needs a value (no default)")
                    value = options[0]
                values.append(value)
                if opts.get("control_after_generate") or (kind == "INT" and name in comfy_host.SEED_NAMES):
                    values.append("fixed")  # the seed stays as written: the same image on every run
                if opts.get("image_upload"):
                    values.append("image")  # the upload button's value, as the canvas saves it
            else:
                entry = {"localized_name": name, "name": name, "type": kind, "link": None}
                if optional:
                    entry["shape"] = 7  # the front end's marker for optional sockets
                sockets.append(entry)
        if widgets:
            raise SystemExit(f"{self.name}: {ntype} has no widget(s) {sorted(widgets)}")
        outputs = [{"localized_name": oname, "name": oname, "type": otype, "links": []}
                   for otype, oname in zip(schema.get("output") or [], schema.get("output_name") or [])]
        props: dict[str, Any] = {"Node name for S&R": ntype}
        is_ours = ntype.startswith("PixArtSuite")
        props["cnr_id"] = PACK_ID if is_ours else "comfy-core"
        props["ver"] = PACK_VERSION if is_ours else COMFY_VERSION
        models = [model_entry(MODEL_FILES[v]) for v in values if isinstance(v, str) and v in MODEL_FILES]
        if models:  # any widget naming a known file (loaders of this pack, stock ones, others' workflows)
            props["models"] = models
        node = {"id": nid, "type": ntype, "pos": list(pos), "size": list(size), "flags": {}, "order": 0,
                "mode": 0, "inputs": sockets + widget_inputs, "outputs": outputs, "properties": props,
                "widgets_values": values}
        if title:
            node["title"] = title
        if color:
            node["color"], node["bgcolor"] = color
        self.nodes.append(node)
        self._by_id[nid] = node
        return nid

    def note(self, text: str, pos, size, title: str = "Read me") -> int:
        nid = len(self.nodes) + 1
        node = {"id": nid, "type": "MarkdownNote", "pos": list(pos), "size": list(size), "flags": {}, "order": 0,
                "mode": 0, "inputs": [], "outputs": [], "title": title, "properties": {}, "widgets_values": [text],
                "color": "#432", "bgcolor": "#653"}
        self.nodes.append(node)
        self._by_id[nid] = node
        return nid

    def link(self, src: int, out: int | str, dst: int, input_name: str) -> int:
        s, d = self._by_id[src], self._by_id[dst]
        if isinstance(out, str):
            names = [o["name"] for o in s["outputs"]]
            if out not in names:
                raise SystemExit(f"{self.name}: {s['type']} has no output {out!r} ({names})")
            out = names.index(out)
        target = next((i for i, inp in enumerate(d["inputs"]) if inp["name"] == input_name), None)
        if target is None:
            raise SystemExit(f"{self.name}: {d['type']} has no input {input_name!r}")
        otype = s["outputs"][out]["type"]
        lid = len(self.links) + 1
        d["inputs"][target]["link"] = lid
        s["outputs"][out]["links"].append(lid)
        s["outputs"][out]["slot_index"] = out
        self.links.append([lid, src, out, dst, target, otype])
        return lid

    # -- output ---------------------------------------------------------------------------
    def _set_order(self) -> None:
        """Topological execution order, as the canvas stores it (notes first)."""
        deps = {n["id"]: {lk[1] for lk in self.links if lk[3] == n["id"]} for n in self.nodes}
        done: list[int] = []
        while len(done) < len(self.nodes):
            ready = sorted(i for i, d in deps.items() if i not in done and d <= set(done))
            if not ready:
                raise SystemExit(f"{self.name}: the graph has a cycle")
            done.extend(ready)
        for order, nid in enumerate(done):
            self._by_id[nid]["order"] = order

    def to_json(self) -> dict:
        self._set_order()
        return {
            "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"{PACK_ID}/workflows/{self.name}")),
            "revision": 0,
            "last_node_id": len(self.nodes),
            "last_link_id": len(self.links),
            "nodes": self.nodes,
            "links": self.links,
            "groups": [],
            "config": {},
            "extra": {"ds": {"scale": 0.7, "offset": [40, 40]}, "frontendVersion": FRONTEND_VERSION},
            "version": 0.4,
        }


# --------------------------------------------------------------------------------------------
# The workflows
# --------------------------------------------------------------------------------------------

OURS = ("#223", "#335")  # colour of this pack's nodes on the canvas
X0, X1, X2, X3, X4 = 0, 420, 900, 1280, 1560


def _note(models: list[str], what: str, extra: str = "") -> str:
    lines = [f"## {what}", "", "**Models** (file name -> folder, source):", ""]
    lines += [f"- `{m}` -> {MODELS_NOTE[m]}" for m in models]
    lines += ["", "Random-looking output? Check that each file is the real release file, not a renamed other model."]
    if extra:
        lines += ["", extra]
    return "\n".join(lines)


def _common(wf: Workflow, ckpt: str, note: str, note_pos=(X0, 640), vae: str = SDXL_VAE, prompt: str = PROMPT,
            **encode) -> dict[str, int]:
    """Loaders, prompts and the VAE shared by every workflow."""
    ids = {
        "model": wf.node("PixArtSuiteModelLoader", (X0, 0), (360, 180), {"ckpt_name": ckpt}, color=OURS),
        "t5": wf.node("PixArtSuiteT5Loader", (X0, 230), (360, 110), {"t5_name": T5_XXL}, color=OURS),
        "vae": wf.node("VAELoader", (X0, 390), (360, 60), {"vae_name": vae}),
        "pos": wf.node("PixArtSuiteT5TextEncode", (X1, 0), (430, 200), {"text": prompt, **encode},
                       title="Positive prompt", color=OURS),
        "neg": wf.node("PixArtSuiteT5TextEncode", (X1, 250), (430, 160), {"text": NEGATIVE, **encode},
                       title="Negative prompt (empty, as the official inference)", color=OURS),
    }
    wf.note(note, note_pos, (400, 300))
    wf.link(ids["t5"], 0, ids["pos"], "clip")
    wf.link(ids["t5"], 0, ids["neg"], "clip")
    return ids


def _sampler(wf: Workflow, pos, model: int, ids: Mapping[str, int], latent: tuple[int, int | str], steps: int = 20,
             denoise: float = 1.0, title: str | None = None, conds: int | None = None, **widgets) -> int:
    """PixArt Sampler on the prompts, or on the positive/negative outputs of node `conds` (Apply ControlNet)."""
    s = wf.node("PixArtSuiteSampler", pos, (330, 330),
                {"seed": SEED, "steps": steps, "cfg": 4.5, "denoise": denoise, **widgets}, title=title, color=OURS)
    wf.link(model, 0, s, "model")
    if conds is None:
        wf.link(ids["pos"], 0, s, "positive")
        wf.link(ids["neg"], 0, s, "negative")
    else:
        wf.link(conds, "positive", s, "positive")
        wf.link(conds, "negative", s, "negative")
    wf.link(latent[0], latent[1], s, "latent_image")
    return s


def _decode_save(wf: Workflow, latent: int, latent_slot: int | str, vae: int, prefix: str, tiled: bool = False,
                 x: int = X3) -> None:
    if tiled:
        dec = wf.node("VAEDecodeTiled", (x, 0), (250, 150), {"tile_size": 1024, "overlap": 64})
    else:
        dec = wf.node("VAEDecode", (x, 0), (210, 50))
    wf.link(latent, latent_slot, dec, "samples")
    wf.link(vae, 0, dec, "vae")
    save = wf.node("SaveImage", (x + 280, 0), (520, 560), {"filename_prefix": prefix})
    wf.link(dec, 0, save, "images")


def txt2img_1024(oi) -> tuple[Workflow, str]:
    wf = Workflow("txt2img_1024", oi)
    ids = _common(wf, PIXART_1024, _note([PIXART_1024, T5_XXL, SDXL_VAE], "PixArt-Σ text to image, 1024 px",
                                         "PixArt Resolution picks a 1024-class aspect-ratio bin (the sizes the "
                                         "model was trained at). Sampler defaults = the official inference: "
                                         "DPM-Solver++ 2M, 20 steps, CFG 4.5."))
    res = wf.node("PixArtSuiteResolution", (X1, 460), (430, 180),
                  {"size_class": "from model", "aspect_ratio": "1.00 square"}, color=OURS)
    wf.link(ids["model"], 0, res, "model")
    s = _sampler(wf, (X2, 0), ids["model"], ids, (res, "latent"))
    _decode_save(wf, s, 0, ids["vae"], "PixArt-Sigma_1024")
    return wf, "1024 x 1024"


def txt2img_2k(oi) -> tuple[Workflow, str]:
    wf = Workflow("txt2img_2k", oi)
    ids = _common(wf, PIXART_2K, _note([PIXART_2K, T5_XXL, SDXL_VAE], "PixArt-Σ text to image, 2K",
                                       "The 2K weights generate at the 2048-class bins; 0.57 is about 16:9 "
                                       "landscape (2688 x 1536). VAE Decode (Tiled) keeps the 2K decode within "
                                       "24 GB of RAM (the plain VAE Decode needs more on the CPU)."))
    res = wf.node("PixArtSuiteResolution", (X1, 460), (430, 180),
                  {"size_class": "2048", "aspect_ratio": "0.57 landscape"}, color=OURS)
    wf.link(ids["model"], 0, res, "model")
    s = _sampler(wf, (X2, 0), ids["model"], ids, (res, "latent"))
    _decode_save(wf, s, 0, ids["vae"], "PixArt-Sigma_2K", tiled=True)
    return wf, "2688 x 1536"


def txt2img_4k(oi) -> tuple[Workflow, str]:
    wf = Workflow("txt2img_4k_kv_compression", oi)
    ids = _common(wf, PIXART_2K, _note([PIXART_2K, T5_XXL, SDXL_VAE], "PixArt-Σ 4K with KV compression",
                                       "No 4K weights were released: the 2K weights run at the 4096-class bins "
                                       "(their position embedding keeps 4K inside the trained range). PixArt KV "
                                       "Compression pools keys/values 2x2 in blocks 14-27, as PixArt-Σ's KV "
                                       "configuration, which makes attention over 65k tokens affordable. VAE "
                                       "Decode (Tiled) keeps the 4K decode in memory."))
    kv = wf.node("PixArtSuiteKVCompression", (X1, 460), (430, 130),
                 {"layers": "14-27", "ratio": 2, "mode": "avgpool"}, color=OURS)
    wf.link(ids["model"], 0, kv, "model")
    res = wf.node("PixArtSuiteResolution", (X1, 640), (430, 180),
                  {"size_class": "4096", "aspect_ratio": "1.00 square"}, color=OURS)
    s = _sampler(wf, (X2, 0), kv, ids, (res, "latent"))
    _decode_save(wf, s, 0, ids["vae"], "PixArt-Sigma_4K", tiled=True)
    return wf, "4096 x 4096"


def hires_fix(oi) -> tuple[Workflow, str]:
    wf = Workflow("hires_fix_1024_to_2k", oi)
    ids = _common(wf, PIXART_1024, _note([PIXART_1024, PIXART_2K, T5_XXL, SDXL_VAE], "PixArt-Σ hires fix",
                                         "Pass 1: the 1024 model composes the image. The latent is upscaled 2x "
                                         "and pass 2 re-noises it halfway (denoise 0.5) and lets the 2K model "
                                         "add the detail at 2048 x 2048."), note_pos=(X0, 760))
    res = wf.node("PixArtSuiteResolution", (X1, 460), (430, 180),
                  {"size_class": "from model", "aspect_ratio": "1.00 square"}, color=OURS)
    wf.link(ids["model"], 0, res, "model")
    first = _sampler(wf, (X2, 0), ids["model"], ids, (res, "latent"), title="Pass 1: 1024")
    up = wf.node("LatentUpscaleBy", (X2, 380), (330, 90), {"upscale_method": "bicubic", "scale_by": 2.0})
    wf.link(first, 0, up, "samples")
    model_2k = wf.node("PixArtSuiteModelLoader", (X0, 500), (360, 180), {"ckpt_name": PIXART_2K},
                       title="Load PixArt-Σ Model (2K, pass 2)", color=OURS)
    second = _sampler(wf, (X3, 0), model_2k, ids, (up, 0), denoise=0.5, title="Pass 2: 2K, denoise 0.5")
    _decode_save(wf, second, 0, ids["vae"], "PixArt-Sigma_hires_2K", tiled=True, x=X3 + 380)
    return wf, "1024 -> 2048 x 2048"


def img2img(oi) -> tuple[Workflow, str]:
    wf = Workflow("img2img", oi)
    ids = _common(wf, PIXART_1024, _note([PIXART_1024, T5_XXL, SDXL_VAE], "PixArt-Σ image to image",
                                         "Load any picture: PixArt Resize & Crop fits it to a 1024-class bin, "
                                         "and the sampler keeps 40% of it (denoise 0.6)."), note_pos=(X0, 860))
    load = wf.node("LoadImage", (X0, 500), (360, 320), {"image": "example.png"})
    res = wf.node("PixArtSuiteResolution", (X1, 460), (430, 180),
                  {"size_class": "from model", "aspect_ratio": "1.00 square"}, color=OURS)
    wf.link(ids["model"], 0, res, "model")
    crop = wf.node("PixArtSuiteResizeCrop", (X1, 690), (430, 100), {"width": 1024, "height": 1024}, color=OURS)
    wf.link(load, 0, crop, "image")
    wf.link(res, "width", crop, "width")
    wf.link(res, "height", crop, "height")
    enc = wf.node("VAEEncode", (X1, 840), (210, 50))
    wf.link(crop, 0, enc, "pixels")
    wf.link(ids["vae"], 0, enc, "vae")
    s = _sampler(wf, (X2, 0), ids["model"], ids, (enc, 0), denoise=0.6)
    _decode_save(wf, s, 0, ids["vae"], "PixArt-Sigma_img2img")
    return wf, "1024 x 1024"


def sampler_custom_advanced(oi) -> tuple[Workflow, str]:
    wf = Workflow("sampler_custom_advanced", oi)
    ids = _common(wf, PIXART_1024, _note([PIXART_1024, T5_XXL, SDXL_VAE], "PixArt-Σ in SamplerCustomAdvanced",
                                         "The pack's samplers (here SA-Solver), step grids and CFG guider plug "
                                         "into ComfyUI's custom sampling nodes. PixArt CFG Guider does the "
                                         "official Σ guidance (the negative attended over the prompt's tokens); "
                                         "the stock CFGGuider gives the diffusers variant."))
    res = wf.node("PixArtSuiteResolution", (X1, 460), (430, 180),
                  {"size_class": "from model", "aspect_ratio": "1.00 square"}, color=OURS)
    wf.link(ids["model"], 0, res, "model")
    noise = wf.node("RandomNoise", (X2, 0), (320, 90), {"noise_seed": SEED})
    guider = wf.node("PixArtSuiteCFGGuider", (X2, 140), (320, 130), {"cfg": 4.5}, color=OURS)
    wf.link(ids["model"], 0, guider, "model")
    wf.link(ids["pos"], 0, guider, "positive")
    wf.link(ids["neg"], 0, guider, "negative")
    sel = wf.node("PixArtSuiteSamplerSelect", (X2, 320), (320, 90), {"sampler_name": "sa_solver", "eta": 1.0},
                  color=OURS)
    sig = wf.node("PixArtSuiteSigmas", (X2, 460), (320, 130),
                  {"step_grid": "dpm_time_uniform", "steps": 20, "denoise": 1.0}, color=OURS)
    wf.link(ids["model"], 0, sig, "model")
    adv = wf.node("SamplerCustomAdvanced", (X3, 200), (260, 130))
    wf.link(noise, 0, adv, "noise")
    wf.link(guider, 0, adv, "guider")
    wf.link(sel, 0, adv, "sampler")
    wf.link(sig, 0, adv, "sigmas")
    wf.link(res, "latent", adv, "latent_image")
    _decode_save(wf, adv, "output", ids["vae"], "PixArt-Sigma_custom_advanced", x=X3 + 300)
    return wf, "1024 x 1024"


def ksampler_stock(oi) -> tuple[Workflow, str]:
    wf = Workflow("ksampler_stock", oi)
    model = wf.node("PixArtSuiteModelLoader", (X0, 0), (360, 180), {"ckpt_name": PIXART_1024}, color=OURS)
    t5 = wf.node("PixArtSuiteT5Loader", (X0, 230), (360, 110), {"t5_name": T5_XXL}, color=OURS)
    vae = wf.node("VAELoader", (X0, 390), (360, 60), {"vae_name": SDXL_VAE})
    wf.note(_note([PIXART_1024, T5_XXL, SDXL_VAE], "PixArt-Σ with stock ComfyUI nodes",
                  "The model and the T5 are ordinary MODEL and CLIP: CLIP Text Encode, Empty Latent Image and "
                  "KSampler work as with any model. Use sizes that are multiples of 16."), (X0, 500), (400, 300))
    pos = wf.node("CLIPTextEncode", (X1, 0), (430, 200), {"text": PROMPT}, title="Positive prompt")
    neg = wf.node("CLIPTextEncode", (X1, 250), (430, 160), {"text": NEGATIVE}, title="Negative prompt")
    wf.link(t5, 0, pos, "clip")
    wf.link(t5, 0, neg, "clip")
    empty = wf.node("EmptyLatentImage", (X1, 460), (430, 110), {"width": 1024, "height": 1024, "batch_size": 1})
    ks = wf.node("KSampler", (X2, 0), (330, 270), {"seed": SEED, "steps": 20, "cfg": 4.5, "sampler_name": "dpmpp_2m",
                                                   "scheduler": "normal", "denoise": 1.0})
    wf.link(model, 0, ks, "model")
    wf.link(pos, 0, ks, "positive")
    wf.link(neg, 0, ks, "negative")
    wf.link(empty, 0, ks, "latent_image")
    _decode_save(wf, ks, 0, vae, "PixArt-Sigma_ksampler")
    return wf, "1024 x 1024"


def _apply_controlnet(wf: Workflow, pos, cn_name: str, image: int, ids: Mapping[str, int], strength: float = 1.0,
                      title: str | None = None) -> tuple[int, int]:
    """Load PixArt ControlNet + the stock Apply ControlNet (with the VAE): (apply node, controlnet loader)."""
    cn = wf.node("PixArtSuiteControlNetLoader", (pos[0], pos[1]), (360, 60), {"control_net_name": cn_name}, color=OURS)
    apply = wf.node("ControlNetApplyAdvanced", (pos[0], pos[1] + 110), (360, 190),
                    {"strength": strength, "start_percent": 0.0, "end_percent": 1.0}, title=title)
    wf.link(ids["pos"], 0, apply, "positive")
    wf.link(ids["neg"], 0, apply, "negative")
    wf.link(cn, 0, apply, "control_net")
    wf.link(image, 0, apply, "image")
    wf.link(ids["vae"], 0, apply, "vae")
    return apply, cn


def controlnet_canny(oi) -> tuple[Workflow, str]:
    wf = Workflow("controlnet_canny", oi)
    ids = _common(wf, PIXART_1024, _note([PIXART_1024, SIGMA_CANNY, T5_XXL, SDXL_VAE], "PixArt-Σ with a canny ControlNet",
                                         "Load Image -> PixArt Resize & Crop (edges at the size generated) -> ComfyUI's "
                                         "Canny -> Apply ControlNet (the stock node: strength, start/end percent; its "
                                         "vae input encodes the edge map as an SDXL latent; a hint of another size is "
                                         "resized and centre-cropped to the latent). No Σ ControlNet "
                                         "was released: use one you trained (SimpleTuner, diffusers layout) or "
                                         "converted; chain a second Apply ControlNet to combine two."),
                  note_pos=(X0, 1000))
    load = wf.node("LoadImage", (X0, 500), (360, 320), {"image": "example.png"})
    res = wf.node("PixArtSuiteResolution", (X1, 810), (430, 180),
                  {"size_class": "from model", "aspect_ratio": "1.00 square"}, color=OURS)
    wf.link(ids["model"], 0, res, "model")
    crop = wf.node("PixArtSuiteResizeCrop", (X0, 870), (360, 100), {"width": 1024, "height": 1024}, color=OURS)
    wf.link(load, 0, crop, "image")
    wf.link(res, "width", crop, "width")
    wf.link(res, "height", crop, "height")
    canny = wf.node("Canny", (X1, 1040), (430, 90), {"low_threshold": 0.4, "high_threshold": 0.8})
    wf.link(crop, 0, canny, "image")
    apply, _ = _apply_controlnet(wf, (X1, 460), SIGMA_CANNY, canny, ids, strength=0.9)
    s = _sampler(wf, (X2, 0), ids["model"], ids, (res, "latent"), conds=apply)
    _decode_save(wf, s, 0, ids["vae"], "PixArt-Sigma_controlnet_canny")
    return wf, "1024 x 1024"


def controlnet_hed_alpha(oi) -> tuple[Workflow, str]:
    wf = Workflow("controlnet_hed_alpha", oi)
    ids = _common(wf, ALPHA_CONTROLNET, _note([ALPHA_CONTROLNET, T5_XXL, SD15_VAE], "PixArt-α HED ControlNet (as released)",
                                              "The official PixArt-δ ControlNet file holds the PixArt-α 1024 model and "
                                              "its HED control branch: both loaders read the same file. The hint is an "
                                              "HED edge map (white edges on black), e.g. from comfyui_controlnet_aux's "
                                              "HED Soft-Edge Lines node or any HED preprocessor, saved as an image; α "
                                              "uses the SD1.5 VAE and 120 T5 tokens. Official settings: 14 steps, CFG 4.5."),
                  note_pos=(X0, 900), vae=SD15_VAE, max_length="α: 120 tokens",
                  prompt="a modern living room with large windows, soft daylight, photorealistic")
    hed = wf.node("LoadImage", (X0, 500), (360, 320), {"image": HED_IMAGE}, title="HED map (from a preprocessor)")
    apply, _ = _apply_controlnet(wf, (X1, 460), ALPHA_CONTROLNET, hed, ids)
    res = wf.node("PixArtSuiteResolution", (X1, 810), (430, 180),
                  {"size_class": "from model", "aspect_ratio": "1.00 square"}, color=OURS)
    wf.link(ids["model"], 0, res, "model")
    s = _sampler(wf, (X2, 0), ids["model"], ids, (res, "latent"), steps=14, conds=apply)
    _decode_save(wf, s, 0, ids["vae"], "PixArt-alpha_controlnet_hed")
    return wf, "1024 x 1024"


def txt2img_lcm_4step(oi) -> tuple[Workflow, str]:
    wf = Workflow("txt2img_lcm_4step", oi)
    ids = _common(wf, PIXART_LCM, _note([PIXART_LCM, T5_XXL, SD15_VAE], "PixArt-LCM: text to image in 4 steps",
                                        "PixArt-LCM is PixArt-α 1024 distilled into a latent consistency model. The "
                                        "sampler's preset 'LCM 4 steps' runs it as its diffusers pipeline does: the "
                                        "lcm sampler on LCMScheduler's timesteps 999, 759, 499, 259, CFG 1 (no "
                                        "guidance: the negative prompt is not used). The same preset fits "
                                        "PixArt-α 1024 with the flash-pixart LoRA ('Flash 4 steps'); 'DMD 1 step' "
                                        "is for PixArt-α-DMD 512. α uses the SD1.5 VAE and 120 T5 tokens."),
                  vae=SD15_VAE, max_length="α: 120 tokens")
    res = wf.node("PixArtSuiteResolution", (X1, 460), (430, 180),
                  {"size_class": "from model", "aspect_ratio": "1.00 square"}, color=OURS)
    wf.link(ids["model"], 0, res, "model")
    s = _sampler(wf, (X2, 0), ids["model"], ids, (res, "latent"), steps=4, cfg=1.0, sampler_name="lcm",
                 step_grid="lcm", preset="LCM 4 steps")
    _decode_save(wf, s, 0, ids["vae"], "PixArt-LCM_4step")
    return wf, "1024 x 1024"


def upscale_refine_4k(oi) -> tuple[Workflow, str]:
    wf = Workflow("upscale_refine_4k", oi)
    ids = _common(wf, PIXART_2K, _note([PIXART_2K, ESRGAN_X4, T5_XXL, SDXL_VAE], "PixArt-Σ 2K -> model upscaler -> 4K refine",
                                       "Pass 1 makes a 2K image. An ESRGAN-family upscaler (stock Load Upscale Model + "
                                       "Upscale Image (using Model)) enlarges it 4x, PixArt Resize & Crop fits it to the "
                                       "4096 bin, and pass 2 re-noises it lightly (denoise 0.3) with the 2K weights and "
                                       "KV compression on blocks 14-27, tiled VAE encode and decode keeping 4K in memory."),
                  note_pos=(X0, 1100))
    res1 = wf.node("PixArtSuiteResolution", (X1, 460), (430, 180), {"size_class": "2048", "aspect_ratio": "1.00 square"},
                   title="Pass 1 size: 2K", color=OURS)
    first = _sampler(wf, (X2, 0), ids["model"], ids, (res1, "latent"), title="Pass 1: 2K")
    dec1 = wf.node("VAEDecodeTiled", (X2, 380), (330, 150), {"tile_size": 1024, "overlap": 64})
    wf.link(first, 0, dec1, "samples")
    wf.link(ids["vae"], 0, dec1, "vae")
    up_model = wf.node("UpscaleModelLoader", (X0, 500), (360, 60), {"model_name": ESRGAN_X4})
    up = wf.node("ImageUpscaleWithModel", (X2, 580), (330, 50))
    wf.link(up_model, 0, up, "upscale_model")
    wf.link(dec1, 0, up, "image")
    res2 = wf.node("PixArtSuiteResolution", (X1, 690), (430, 180), {"size_class": "4096", "aspect_ratio": "1.00 square"},
                   title="Pass 2 size: 4K bin", color=OURS)
    crop = wf.node("PixArtSuiteResizeCrop", (X2, 680), (330, 100), {"width": 4096, "height": 4096}, color=OURS)
    wf.link(up, 0, crop, "image")
    wf.link(res2, "width", crop, "width")
    wf.link(res2, "height", crop, "height")
    enc = wf.node("VAEEncodeTiled", (X2, 830), (330, 150), {"tile_size": 1024, "overlap": 64})
    wf.link(crop, 0, enc, "pixels")
    wf.link(ids["vae"], 0, enc, "vae")
    kv = wf.node("PixArtSuiteKVCompression", (X0, 610), (360, 130), {"layers": "14-27", "ratio": 2, "mode": "avgpool"},
                 color=OURS)
    wf.link(ids["model"], 0, kv, "model")
    second = _sampler(wf, (X3, 0), kv, ids, (enc, 0), denoise=0.3, title="Pass 2: 4K refine, denoise 0.3")
    _decode_save(wf, second, 0, ids["vae"], "PixArt-Sigma_upscale_refine_4K", tiled=True, x=X3 + 380)
    return wf, "2048 -> x4 -> 4096 x 4096"


DATASET_FOLDER = "pixart_lora_dataset"  # ComfyUI/input/<this>: images with same-name .txt captions
TRAIN_DEFAULTS = {  # stock Train LoRA, set for PixArt-Σ (alpha 1 there: scale 1/rank, so lr 2e-4 ~ PEFT's 1e-4)
    "batch_size": 1, "steps": 500, "learning_rate": 0.0002, "rank": 16, "optimizer": "AdamW", "loss_function": "MSE",
    "seed": 0, "training_dtype": "bf16", "lora_dtype": "fp32", "algorithm": "LoRA", "gradient_checkpointing": True,
}
VALIDATION_BEFORE = "PixArt Validation Loss (before training)"
VALIDATION_AFTER = "PixArt Validation Loss (after training)"
REBATCH_NOTE = (
    "## Why Rebatch Latents\n\nComfyUI 0.3.75's Train LoRA fails with `UnboundLocalError: cannot access local "
    "variable 'multi_res'` (comfy_extras/nodes_train.py, TrainLoraNode.execute) whenever its latents are ONE "
    "LATENT: a batch, or a single image. Rebatch Latents with batch size 1 hands it a list of single latents, "
    "the path that works. So: keep it, and put at least 2 images in the folder.")
TRAIN_NOTE = (
    "Put images with same-name .txt captions in `ComfyUI/input/{folder}` (2 or more). They are fitted to the "
    "training bins, encoded, and Train LoRA (stock) trains a LoRA on every layer of the model. Its own loss is "
    "x0-MSE at one random noise level per step and jumps about; the two PixArt Validation Loss nodes measure "
    "the same fixed noise before and after: the second number should be lower. Save LoRA writes "
    "`output/loras/...safetensors`; move it to `models/loras` for Load PixArt LoRA or Load LoRA. "
    "`python -m pixart_core train-lora` trains the same LoRA without ComfyUI, with the official loss.")


def _training(wf: Workflow, ids: Mapping[str, int], model: int, size_class: str, y: int = 700) -> int:
    """Dataset -> bins -> VAE Encode -> Rebatch -> Train LoRA (+ validation, Save LoRA, Loss Graph).
    Returns the MODEL with the trained LoRA loaded (stock Load LoRA Model on `model`)."""
    data = wf.node("LoadImageTextDataSetFromFolder", (X0, y + 320), (360, 100), {"folder": DATASET_FOLDER})
    res = wf.node("PixArtSuiteResolution", (X0, y + 470), (360, 180),
                  {"size_class": size_class, "aspect_ratio": "1.00 square"}, title="Training size", color=OURS)
    if size_class == "from model":
        wf.link(model, 0, res, "model")
    crop = wf.node("PixArtSuiteResizeCrop", (X1, y), (430, 100), {"width": 1024, "height": 1024}, color=OURS)
    wf.link(data, "images", crop, "image")
    wf.link(res, "width", crop, "width")
    wf.link(res, "height", crop, "height")
    if size_class == "from model":
        enc = wf.node("VAEEncode", (X1, y + 150), (210, 50))
    else:  # 2K/4K training images: tiles keep the encode within 24 GB of RAM
        enc = wf.node("VAEEncodeTiled", (X1, y + 110), (210, 160), {"tile_size": 1024, "overlap": 64})
    wf.link(crop, 0, enc, "pixels")
    wf.link(ids["vae"], 0, enc, "vae")
    rebatch = wf.node("RebatchLatents", (X1 + 230, y + 150), (200, 80), {"batch_size": 1})
    wf.link(enc, 0, rebatch, "latents")
    captions = wf.node("PixArtSuiteT5TextEncode", (X1, y + 280), (430, 120), {"text": ""}, title="Captions",
                       color=OURS)
    wf.link(ids["t5"], 0, captions, "clip")
    wf.link(data, "texts", captions, "text")
    wf.note(REBATCH_NOTE, (X1, y + 450), (430, 200), title="Why Rebatch Latents")
    train = wf.node("TrainLoraNode", (X2, y), (330, 500), TRAIN_DEFAULTS)
    wf.link(model, 0, train, "model")
    wf.link(rebatch, 0, train, "latents")
    wf.link(captions, 0, train, "positive")
    save = wf.node("SaveLoRA", (X3, y), (330, 90), {"prefix": "loras/pixart_lora", "steps": TRAIN_DEFAULTS["steps"]})
    wf.link(train, "lora", save, "lora")
    wf.link(train, "steps", save, "steps")
    graph = wf.node("LossGraphNode", (X3, y + 140), (330, 300), {"filename_prefix": "pixart_lora_loss"})
    wf.link(train, "loss_map", graph, "loss")
    loaded = wf.node("LoraModelLoader", (X2, y + 560), (330, 90), {"strength_model": 1.0})
    wf.link(model, 0, loaded, "model")
    wf.link(train, "lora", loaded, "lora")
    for title, m, pos in ((VALIDATION_BEFORE, model, (X2, y + 700)), (VALIDATION_AFTER, loaded, (X3, y + 490))):
        v = wf.node("PixArtSuiteValidationLoss", pos, (330, 160), {"noise_levels": 8, "seed": 0}, title=title,
                    color=OURS)
        wf.link(m, 0, v, "model")
        wf.link(rebatch, 0, v, "latents")
        wf.link(captions, 0, v, "positive")
    return loaded


def _train_and_sample(name: str, oi, ckpt: str, what: str, note: str, train_size: str, sample_size: str,
                      prefix: str, kv: bool = False) -> Workflow:
    wf = Workflow(name, oi)
    ids = _common(wf, ckpt, _note([ckpt, T5_XXL, SDXL_VAE], what, note + "\n\n" + TRAIN_NOTE.format(
        folder=DATASET_FOLDER)), note_pos=(X0, 500))
    res = wf.node("PixArtSuiteResolution", (X2, 380), (330, 180),
                  {"size_class": sample_size, "aspect_ratio": "1.00 square"}, color=OURS)
    model = ids["model"]
    if kv:
        model = wf.node("PixArtSuiteKVCompression", (X1, 460), (430, 130),
                        {"layers": "14-27", "ratio": 2, "mode": "avgpool"}, color=OURS)
        wf.link(ids["model"], 0, model, "model")
    if sample_size == "from model":
        wf.link(model, 0, res, "model")
    loaded = _training(wf, ids, model, train_size)
    s = _sampler(wf, (X2, 0), loaded, ids, (res, "latent"), title="PixArt Sampler (with the trained LoRA)")
    _decode_save(wf, s, 0, ids["vae"], prefix, tiled=kv or sample_size != "from model")
    return wf


def train_lora(oi) -> tuple[Workflow, str]:
    return _train_and_sample(
        "train_lora", oi, PIXART_1024, "PixArt-Σ LoRA training (stock Train LoRA)",
        "Trains a LoRA on your images at the model's own 1024 bins, then samples with it.",
        "from model", "from model", "PixArt-Sigma_lora"), "1024 x 1024, LoRA trained at 1024"


def train_lora_kv_compression(oi) -> tuple[Workflow, str]:
    return _train_and_sample(
        "train_lora_kv_compression_4k", oi, PIXART_2K, "Recipe: KV-compression adaptation (PixArt-Σ 2K -> 4K)",
        "The paper's use of fine-tuning for token compression: the 2K weights train a LoRA with KV compression on "
        "(blocks 14-27, keys/values pooled 2x2) at the 2K bins, so the compressed attention the 4K run needs costs "
        "less quality. Use the 4096 training size if memory allows. The sampler runs the same compressed model "
        "with the LoRA at 4096 x 4096.", "2048", "4096", "PixArt-Sigma_4K_kv_lora", kv=True), \
        "4096 x 4096, LoRA trained at 2K with KV compression"


def train_lora_resolution(oi) -> tuple[Workflow, str]:
    return _train_and_sample(
        "train_lora_resolution_2k", oi, PIXART_1024, "Recipe: resolution adaptation (PixArt-Σ 1024 -> 2K)",
        "A LoRA trained at a higher bin than the weights were made for: the 1024 weights learn the 2048-class "
        "bins (more tokens, positions beyond their training grid), then sample at 2048 x 2048.",
        "2048", "2048", "PixArt-Sigma_2K_res_lora"), "2048 x 2048, LoRA trained at 2K on 1024 weights"


BUILDERS = [txt2img_1024, txt2img_2k, txt2img_4k, hires_fix, img2img, sampler_custom_advanced, ksampler_stock,
            controlnet_canny, controlnet_hed_alpha, upscale_refine_4k, train_lora, train_lora_kv_compression,
            train_lora_resolution, txt2img_lcm_4step]


# --------------------------------------------------------------------------------------------
# Thumbnails: a picture of the graph
# --------------------------------------------------------------------------------------------

LINK_COLORS = {"MODEL": "#b39ddb", "CLIP": "#ffd500", "CONDITIONING": "#ffa931", "LATENT": "#ff9cf9",
               "VAE": "#ff6e6e", "IMAGE": "#64b5f6", "INT": "#7fd07f", "SAMPLER": "#ecb4b4", "SIGMAS": "#cdffcd",
               "NOISE": "#b0b0b0", "GUIDER": "#66ffff", "MASK": "#81c784", "CONTROL_NET": "#00d78d",
               "UPSCALE_MODEL": "#a0a0ff"}


def render_thumbnail(workflow: Mapping, title: str, subtitle: str, path: Path, width: int = 640,
                     height: int = 400) -> Path:
    from PIL import Image, ImageDraw, ImageFont

    def font(size):
        try:
            return ImageFont.truetype("DejaVuSans.ttf", size)
        except OSError:
            return ImageFont.load_default(size=size)

    img = Image.new("RGB", (width, height), "#1b1b1f")
    draw = ImageDraw.Draw(img)
    for gx in range(0, width, 20):  # the canvas grid
        draw.line([(gx, 0), (gx, height)], fill="#202026")
    for gy in range(0, height, 20):
        draw.line([(0, gy), (width, gy)], fill="#202026")
    header = 78
    draw.text((18, 10), title, font=font(22), fill="#f0f0f0")
    for i, line in enumerate(subtitle.splitlines()[:2]):
        draw.text((18, 40 + 17 * i), line, font=font(13), fill="#a8a8b8")
    nodes = [n for n in workflow["nodes"] if n["type"] != "MarkdownNote"]
    x0 = min(n["pos"][0] for n in nodes)
    y0 = min(n["pos"][1] for n in nodes)
    x1 = max(n["pos"][0] + n["size"][0] for n in nodes)
    y1 = max(n["pos"][1] + n["size"][1] for n in nodes)
    margin = 14
    scale = min((width - 2 * margin) / (x1 - x0), (height - header - 2 * margin) / (y1 - y0))

    def box(n):
        x, y = (n["pos"][0] - x0) * scale + margin, (n["pos"][1] - y0) * scale + header + margin
        return x, y, x + n["size"][0] * scale, y + max(n["size"][1], 60) * scale

    by_id = {n["id"]: n for n in nodes}
    for _lid, src, _sslot, dst, _dslot, ltype in workflow["links"]:
        if src not in by_id or dst not in by_id:
            continue
        a, b = box(by_id[src]), box(by_id[dst])
        p0, p3 = (a[2], (a[1] + a[3]) / 2), (b[0], (b[1] + b[3]) / 2)
        dx = max(20.0, abs(p3[0] - p0[0]) / 2)
        pts = []
        for i in range(25):  # cubic bezier like the canvas's splines
            t = i / 24
            x = (1 - t) ** 3 * p0[0] + 3 * (1 - t) ** 2 * t * (p0[0] + dx) + 3 * (1 - t) * t ** 2 * (p3[0] - dx) + t ** 3 * p3[0]
            y = (1 - t) ** 3 * p0[1] + 3 * (1 - t) ** 2 * t * p0[1] + 3 * (1 - t) * t ** 2 * p3[1] + t ** 3 * p3[1]
            pts.append((x, y))
        draw.line(pts, fill=LINK_COLORS.get(ltype, "#999999"), width=2)
    small = font(max(9, min(13, int(11 * scale / 0.3))))
    for n in nodes:
        x, y, xe, ye = box(n)
        ours = n["type"].startswith("PixArtSuite")
        draw.rounded_rectangle([x, y, xe, ye], radius=5, fill="#2e3350" if ours else "#353535",
                               outline="#8c9eff" if ours else "#5a5a5a", width=2)
        label = n.get("title") or DISPLAY_NAMES.get(n["type"], n["type"])
        while label and draw.textlength(label, font=small) > (xe - x) - 8:
            label = label[:-2] + "…" if len(label) > 2 else ""
        draw.text((x + 5, y + 4), label, font=small, fill="#e8e8e8")
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, "JPEG", quality=88, optimize=True)
    return path


DISPLAY_NAMES: dict[str, str] = {}

TITLES = {
    "txt2img_1024": "PixArt-Σ · text to image · 1024",
    "txt2img_lcm_4step": "PixArt-LCM · text to image · 4 steps",
    "txt2img_2k": "PixArt-Σ · text to image · 2K",
    "txt2img_4k_kv_compression": "PixArt-Σ · 4K · KV compression + tiled decode",
    "hires_fix_1024_to_2k": "PixArt-Σ · hires fix · 1024 → 2K",
    "img2img": "PixArt-Σ · image to image",
    "sampler_custom_advanced": "PixArt-Σ · SamplerCustomAdvanced",
    "ksampler_stock": "PixArt-Σ · stock KSampler",
    "controlnet_canny": "PixArt-Σ · canny ControlNet",
    "controlnet_hed_alpha": "PixArt-α · HED ControlNet (official)",
    "upscale_refine_4k": "PixArt-Σ · 2K → ESRGAN ×4 → 4K refine",
    "train_lora": "PixArt-Σ · LoRA training",
    "train_lora_kv_compression_4k": "PixArt-Σ · recipe: KV-compression LoRA, 4K",
    "train_lora_resolution_2k": "PixArt-Σ · recipe: resolution LoRA, 1024 → 2K",
}


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------

def fetch_object_info() -> dict:
    base = REPO / ".cache" / "make_workflows"
    with comfy_host.ComfyHost(base) as host:
        host.require_nodes(["PixArtSuiteModelLoader", "PixArtSuiteSampler"])
        return host.object_info()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--object-info", type=Path, help="a saved GET /object_info (default: start the test host)")
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    args = parser.parse_args(argv)
    oi = json.loads(args.object_info.read_text()) if args.object_info else fetch_object_info()
    DISPLAY_NAMES.update({k: v.get("display_name") or k for k, v in oi.items()})
    for build in BUILDERS:
        wf, size = build(oi)
        data = wf.to_json()
        target = args.out / f"{wf.name}.json"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        models = sorted({v for n in data["nodes"] for v in n.get("widgets_values") or []
                         if isinstance(v, str) and v in MODELS_NOTE})
        thumb = render_thumbnail(data, TITLES.get(wf.name, wf.name), f"output {size}\n" + "  ·  ".join(models),
                                 target.with_suffix(".jpg"))
        print(f"{target.relative_to(REPO) if target.is_relative_to(REPO) else target}  "
              f"({len(data['nodes'])} nodes, {len(data['links'])} links; thumbnail {thumb.stat().st_size // 1024} KB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
