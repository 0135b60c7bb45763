"""Every shipped example workflow (workflows/*.json) run on the real ComfyUI 0.3.75 host.

How: each UI-format workflow is converted to the API format with the host's own node schemas
(GET /object_info, as the front end does when it queues), checked to name the released model
files, shrunk where a 2-core CPU cannot afford it (see CASES), queued, and its saved image checked
for its exact size and for not being constant. The models it names exist on the host under the
release file names as tiny random-weight stand-ins (pixart_model_fixtures.py), so the shipped JSON
runs unchanged apart from the overrides listed per case: sampler steps 1 everywhere (the graph,
not the step count, is under test), and sizes only where noted.

Cost, measured on the 2-core test machine (shared, load 2-5): decoding with the TAESD-XL
stand-in takes 10-25 s per megapixel and a 1024 px step of the depth-2 DiT 1-3 s, so the four
1024-class workflows run at their shipped 1024 x 1024 (11-28 s each). The 2K workflow
(2688 x 1536), the 4K one (4096 x 4096: ~9 TFLOP of decoding alone, three passes when tiled) and
the hires fix's 2048 x 2048 pass would take minutes each, so they run at smaller bins of the same
aspect ratio, every other node as shipped; the size each of them asks for is still checked, from
its own PixArt Resolution node, by test_shipped_resolution. The whole e2e folder (harness tests
included) took 2 min there.

Also here: the pack's nodes in /object_info with descriptions and tooltips, the workflows served
as templates, and host-free structure checks of the JSON files and thumbnails.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import comfy_host
import controlnet_model_fixtures as cfx
import pixart_model_fixtures as fx
import run_workflow

REPO = comfy_host.REPO
WORKFLOW_DIR = REPO / "workflows"
WORKFLOWS = sorted(p.stem for p in WORKFLOW_DIR.glob("*.json"))
PACK_NODES = (
    "PixArtSuiteModelLoader", "PixArtSuiteT5Loader", "PixArtSuiteT5TextEncode", "PixArtSuiteSampler",
    "PixArtSuiteSamplerSelect", "PixArtSuiteSigmas", "PixArtSuiteResolution", "PixArtSuiteResizeCrop",
    "PixArtSuiteKVCompression", "PixArtSuiteControlNetLoader", "PixArtSuiteLoraLoader", "PixArtSuiteValidationLoss",
    "PixArtSuiteCFGGuider", "PixArtSuitePAG",
)
RELEASED_NAMES = set(fx.RELEASED) | set(cfx.RELEASED)  # PixArt 1024/2K .pth, t5xxl_fp16, sdxl_vae; ControlNets, ESRGAN
MODEL_INPUTS = ("ckpt_name", "t5_name", "vae_name", "unet_name", "clip_name", "control_net_name", "model_name")
STEPPED = ("PixArtSuiteSampler", "PixArtSuiteSigmas", "KSampler", "KSamplerAdvanced")
THUMBNAIL_LIMIT = 200 * 1024

e2e = pytest.mark.e2e


TRAIN_SHIPPED = {"RebatchLatents": {"batch_size": 1}, "LoadImageTextDataSetFromFolder": {"folder": "pixart_lora_dataset"},
                 "TrainLoraNode": {"steps": 500, "rank": 16, "learning_rate": 0.0002, "lora_dtype": "fp32"}}
TRAIN_FAST = {"steps": 20, "learning_rate": 0.002, "gradient_checkpointing": False}
VALIDATION_TITLES = ("PixArt Validation Loss (before training)", "PixArt Validation Loss (after training)")


@dataclass
class Case:
    size: tuple[int, int]  # (width, height) of the saved image after the overrides
    bin: tuple[int, int] | None  # (width, height) the shipped PixArt Resolution node gives, checked unshrunk
    shipped: dict = field(default_factory=dict)  # class_type -> {input: value} the JSON must hold
    overrides: dict = field(default_factory=dict)  # class_type or node title -> {input: value}
    why: str = ""


CASES = {
    "txt2img_1024": Case(
        size=(1024, 1024), bin=(1024, 1024),
        shipped={"PixArtSuiteModelLoader": {"ckpt_name": fx.PIXART_1024},
                 "PixArtSuiteResolution": {"size_class": "from model", "aspect_ratio": "1.00 square"},
                 "PixArtSuiteSampler": {"steps": 20, "cfg": 4.5, "denoise": 1.0}}),
    "txt2img_2k": Case(
        size=(672, 384), bin=(2688, 1536),  # run at the 512-class 0.57 bin
        shipped={"PixArtSuiteModelLoader": {"ckpt_name": fx.PIXART_2K},
                 "PixArtSuiteResolution": {"size_class": "2048", "aspect_ratio": "0.57 landscape"}},
        overrides={"PixArtSuiteResolution": {"size_class": "512"}},
        why="4.1 MP to decode: 40-100 s here"),
    "txt2img_4k_kv_compression": Case(
        size=(512, 512), bin=(4096, 4096),  # run at the 512-class 1.00 bin
        shipped={"PixArtSuiteModelLoader": {"ckpt_name": fx.PIXART_2K},
                 "PixArtSuiteResolution": {"size_class": "4096"},
                 "PixArtSuiteKVCompression": {"layers": "14-27", "ratio": 2},
                 "VAEDecodeTiled": {"tile_size": 1024}},
        # layers 1: the deeper half of the depth-2 stand-in, as 14-27 is of PixArt-Σ's 28 blocks;
        # tile_size 256: several tiles at 512 px, as 1024 px tiles are at 4K
        overrides={"PixArtSuiteResolution": {"size_class": "512"}, "PixArtSuiteKVCompression": {"layers": "1"},
                   "VAEDecodeTiled": {"tile_size": 256, "overlap": 32}},
        why="16.8 MP decoded three times over (tiled): 10-20 min here, and 1-2 min per DiT step"),
    "hires_fix_1024_to_2k": Case(
        size=(512, 512), bin=(1024, 1024),  # run: pass 1 at 256, x2 -> 512; shipped: 1024 -> 2048
        shipped={"PixArtSuiteModelLoader": {"ckpt_name": fx.PIXART_1024},
                 "LatentUpscaleBy": {"scale_by": 2.0},
                 "Pass 2: 2K, denoise 0.5": {"denoise": 0.5}},
        overrides={"PixArtSuiteResolution": {"size_class": "256"}},
        why="the 2048 x 2048 pass: 4.2 MP to decode, 40-100 s here, plus a 2K DiT step"),
    "txt2img_lcm_4step": Case(
        size=(512, 512), bin=(1024, 1024),
        shipped={"PixArtSuiteModelLoader": {"ckpt_name": fx.PIXART_LCM}, "VAELoader": {"vae_name": cfx.SD15_VAE},
                 "PixArtSuiteT5TextEncode": {"max_length": "α: 120 tokens"},
                 "PixArtSuiteSampler": {"preset": "LCM 4 steps", "steps": 4, "cfg": 1.0, "sampler_name": "lcm",
                                        "step_grid": "lcm"}},
        overrides={"PixArtSuiteResolution": {"size_class": "512"}},
        why="the preset runs its 4 steps whatever the steps widget says; 512 px keeps that to seconds here"),
    "img2img": Case(
        size=(1024, 1024), bin=(1024, 1024),  # ComfyUI's input/example.png (768 x 768) resized and cropped to the 1024 bin
        shipped={"LoadImage": {"image": "example.png"}, "PixArtSuiteSampler": {"denoise": 0.6}}),
    "sampler_custom_advanced": Case(
        size=(1024, 1024), bin=(1024, 1024),
        shipped={"PixArtSuiteSamplerSelect": {"sampler_name": "sa_solver"},
                 "PixArtSuiteSigmas": {"step_grid": "dpm_time_uniform", "steps": 20},
                 "PixArtSuiteCFGGuider": {"cfg": 4.5, "null_mask": "prompt's mask (official Σ)"}}),
    "ksampler_stock": Case(
        size=(1024, 1024), bin=None,
        shipped={"KSampler": {"steps": 20, "cfg": 4.5}, "EmptyLatentImage": {"width": 1024, "height": 1024}}),
    "controlnet_canny": Case(
        size=(256, 256), bin=(1024, 1024),  # example.png (768 x 768) -> Canny -> hint resized to the 256 bin
        shipped={"PixArtSuiteControlNetLoader": {"control_net_name": cfx.SIGMA_CANNY},
                 "ControlNetApplyAdvanced": {"strength": 0.9, "start_percent": 0.0, "end_percent": 1.0},
                 "LoadImage": {"image": "example.png"}},
        overrides={"PixArtSuiteResolution": {"size_class": "256"}},
        why="the ControlNet graph is under test (test_controlnet_e2e.py varies it); 1024-px decoding adds 10-25 s"),
    "controlnet_hed_alpha": Case(
        size=(256, 256), bin=(1024, 1024),  # the HED map (600 x 400) resized and cropped to the square bin
        shipped={"PixArtSuiteModelLoader": {"ckpt_name": cfx.ALPHA_CONTROLNET},
                 "PixArtSuiteControlNetLoader": {"control_net_name": cfx.ALPHA_CONTROLNET},
                 "VAELoader": {"vae_name": cfx.SD15_VAE}, "PixArtSuiteSampler": {"steps": 14},
                 "PixArtSuiteT5TextEncode": {"max_length": "α: 120 tokens"}},
        overrides={"PixArtSuiteResolution": {"size_class": "256"}},
        why="as controlnet_canny"),
    "upscale_refine_4k": Case(
        size=(256, 256), bin=(2048, 2048),  # run: pass 1 at 256, ESRGAN x4 -> 1024, fitted to the 256 bin
        shipped={"UpscaleModelLoader": {"model_name": cfx.ESRGAN_X4},
                 "Pass 2 size: 4K bin": {"size_class": "4096"},
                 "Pass 2: 4K refine, denoise 0.3": {"denoise": 0.3},
                 "PixArtSuiteKVCompression": {"layers": "14-27"}, "VAEEncodeTiled": {"tile_size": 1024}},
        # layers 1 and tiles of 128 px: the deeper half of the stand-in and several tiles, as at 4K
        overrides={"Pass 1 size: 2K": {"size_class": "256"}, "Pass 2 size: 4K bin": {"size_class": "256"},
                   "PixArtSuiteKVCompression": {"layers": "1"},
                   "VAEEncodeTiled": {"tile_size": 128, "overlap": 32},
                   "VAEDecodeTiled": {"tile_size": 128, "overlap": 32}},
        why="a 2K pass, an 8K upscale and a tiled 4K pass: many minutes here"),
    # LoRA training (stock Train LoRA) and the two recipes: trained at the 256 bins, 40 steps at a higher
    # learning rate (the tiny model learns in that; 500 steps at 1024 would take minutes here); the shipped
    # settings are checked, and the validation loss must fall (check_training)
    "train_lora": Case(
        size=(256, 256), bin=(1024, 1024),
        shipped={"PixArtSuiteModelLoader": {"ckpt_name": fx.PIXART_1024}, **TRAIN_SHIPPED},
        overrides={"PixArtSuiteResolution": {"size_class": "256"}, "TrainLoraNode": TRAIN_FAST},
        why="1024 px training steps and VAE encodes: minutes here"),
    "train_lora_kv_compression_4k": Case(
        size=(256, 256), bin=(4096, 4096),
        shipped={"PixArtSuiteModelLoader": {"ckpt_name": fx.PIXART_2K}, "Training size": {"size_class": "2048"},
                 "PixArtSuiteKVCompression": {"layers": "14-27", "ratio": 2}, **TRAIN_SHIPPED},
        overrides={"PixArtSuiteResolution": {"size_class": "256"}, "PixArtSuiteKVCompression": {"layers": "1"},
                   "TrainLoraNode": TRAIN_FAST, "VAEDecodeTiled": {"tile_size": 256, "overlap": 32}},
        why="2K training and a 4K decode: far beyond this machine's budget"),
    "train_lora_resolution_2k": Case(
        size=(256, 256), bin=(2048, 2048),
        shipped={"PixArtSuiteModelLoader": {"ckpt_name": fx.PIXART_1024}, "Training size": {"size_class": "2048"},
                 **TRAIN_SHIPPED},
        overrides={"PixArtSuiteResolution": {"size_class": "256"}, "TrainLoraNode": TRAIN_FAST},
        why="2K training steps and a 2K decode: minutes here"),
}


def load(name: str) -> dict:
    return json.loads((WORKFLOW_DIR / f"{name}.json").read_text(encoding="utf-8"))


def nodes_matching(api: dict, key: str) -> list[str]:
    """API node ids whose class_type or title is ``key``."""
    return [nid for nid, e in api.items() if e["class_type"] == key or (e.get("_meta") or {}).get("title") == key]


def apply_case(api: dict, case: Case) -> dict:
    for nid, entry in api.items():
        if entry["class_type"] in STEPPED and isinstance(entry["inputs"].get("steps"), int):
            entry["inputs"]["steps"] = 1
    for key, values in case.overrides.items():
        ids = nodes_matching(api, key)
        assert ids, f"override target {key!r} is not in the workflow"
        for nid in ids:
            api[nid]["inputs"].update(values)
    return api


def upstream(api: dict, node_id: str) -> set[str]:
    """``node_id`` and every node it depends on."""
    seen, todo = set(), [node_id]
    while todo:
        nid = todo.pop()
        if nid not in seen:
            seen.add(nid)
            todo += [v[0] for v in api[nid]["inputs"].values() if isinstance(v, list) and len(v) == 2]
    return seen


def png_array(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


# --------------------------------------------------------------------------------------------
# The files themselves (no host)
# --------------------------------------------------------------------------------------------

def test_every_workflow_has_a_case():
    assert WORKFLOWS, "no workflows/*.json"
    assert set(WORKFLOWS) == set(CASES), "add a Case for each new workflow (and drop the ones removed)"
    assert not (REPO / "example_workflows").exists(), "one template folder only: workflows/"


@pytest.mark.parametrize("name", WORKFLOWS)
def test_workflow_is_canvas_format(name):
    wf = load(name)
    assert {"id", "revision", "last_node_id", "last_link_id", "nodes", "links", "groups", "config", "extra",
            "version"} <= set(wf)
    assert wf["version"] == 0.4
    nodes = {n["id"]: n for n in wf["nodes"]}
    assert len(nodes) == len(wf["nodes"]) and wf["last_node_id"] >= max(nodes)
    assert wf["last_link_id"] >= max(link[0] for link in wf["links"])
    for node in wf["nodes"]:
        assert {"id", "type", "pos", "size", "flags", "order", "mode", "inputs", "outputs", "properties"} <= set(node)
        if node["type"] != "MarkdownNote":
            assert node["properties"]["Node name for S&R"] == node["type"]
            assert "widgets_values" in node
    for lid, src, sslot, dst, dslot, ltype in wf["links"]:
        out = nodes[src]["outputs"][sslot]
        inp = nodes[dst]["inputs"][dslot]
        assert lid in (out["links"] or []) and inp["link"] == lid, f"link {lid} is not wired on both ends"
        assert out["type"] == ltype and (inp["type"] == ltype or "widget" in inp), f"link {lid}: type mismatch"
    linked = {inp["link"] for n in wf["nodes"] for inp in n["inputs"] if inp.get("link") is not None}
    assert linked == {link[0] for link in wf["links"]}


@pytest.mark.parametrize("name", WORKFLOWS)
def test_workflow_names_released_models_and_has_thumbnail(name):
    wf = load(name)
    names = set()
    for node in wf["nodes"]:
        values = node.get("widgets_values") or []
        for value in values if isinstance(values, list) else values.values():
            if isinstance(value, str) and value.endswith((".pth", ".safetensors", ".ckpt", ".gguf")):
                names.add(value)
    assert names and names <= RELEASED_NAMES, f"{name} names {sorted(names - RELEASED_NAMES)}"
    thumb = WORKFLOW_DIR / f"{name}.jpg"  # the front end asks for <name>.jpg; a .png would never be shown
    assert thumb.is_file() and thumb.stat().st_size < THUMBNAIL_LIMIT
    with Image.open(thumb) as im:
        assert im.format == "JPEG" and min(im.size) >= 200


# --------------------------------------------------------------------------------------------
# On the host
# --------------------------------------------------------------------------------------------

@e2e
def test_object_info_lists_every_pack_node_with_help(comfy, comfy_object_info):
    for node_id in PACK_NODES:
        schema = comfy_object_info.get(node_id)
        assert schema is not None, f"{node_id} missing from /object_info"
        assert schema["python_module"].startswith("custom_nodes."), schema["python_module"]
        assert schema["category"].startswith("PixArt"), schema["category"]
        assert schema["display_name"] and schema["display_name"] != node_id
        assert len(schema["description"]) > 40, f"{node_id}: no description"
        for section in ("required", "optional"):
            for name, spec in (schema["input"].get(section) or {}).items():
                opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
                assert opts.get("tooltip"), f"{node_id}.{name} has no tooltip"
        tips = schema.get("output_tooltips") or []
        assert len(tips) == len(schema["output"]) and all(tips), f"{node_id}: an output has no tooltip"


@e2e
def test_workflows_are_served_as_templates(comfy):
    templates = comfy.get("/workflow_templates")
    assert sorted(templates.get(comfy.pack_name, [])) == WORKFLOWS
    for name in WORKFLOWS[:2]:
        status, body = comfy._request("GET", f"/api/workflow_templates/{comfy.pack_name}/{name}.json")
        assert status == 200 and body == load(name)
        status, _ = comfy._request("GET", f"/api/workflow_templates/{comfy.pack_name}/{name}.jpg")
        assert status == 200


@e2e
@pytest.mark.parametrize("name", [n for n in WORKFLOWS if CASES.get(n) and CASES[n].bin])
def test_shipped_resolution(name, comfy):
    """The size each shipped workflow asks for, from its own PixArt Resolution node (and the model
    loader feeding it), without the cost of sampling and decoding at that size."""
    api = run_workflow.to_api(comfy, load(name))
    (res,) = nodes_matching(api, "PixArtSuiteResolution")[:1]
    graph = {nid: api[nid] for nid in upstream(api, res)}
    graph["w"] = {"class_type": "PreviewAny", "inputs": {"source": [res, 0]}}
    graph["h"] = {"class_type": "PreviewAny", "inputs": {"source": [res, 1]}}
    outputs = comfy.run(graph, timeout=120)["outputs"]
    assert (int(outputs["w"]["text"][0]), int(outputs["h"]["text"][0])) == CASES[name].bin


@pytest.fixture(scope="module")
def example_input(comfy, comfy_host_dir):
    """ComfyUI ships input/example.png; the test host's base folder starts without it."""
    target = comfy.input_dir / "example.png"
    if not target.exists():
        shutil.copy(comfy_host_dir / "input" / "example.png", target)
    cfx.write_hed_map(comfy.input_dir / cfx.HED_MAP)  # what a HED preprocessor saves, for controlnet_hed_alpha
    return target


@pytest.fixture(scope="module")
def lora_dataset(comfy):
    """The training workflows' image folder: two pictures of different sizes with captions."""
    folder = comfy.input_dir / "pixart_lora_dataset"
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for name, size, caption in (("red", (320, 240), "a red square"), ("blue", (200, 260), "a blue circle")):
        pixels = (rng.random((size[1], size[0], 3)) * 80).astype(np.uint8)
        pixels[..., 0 if name == "red" else 2] += 150
        Image.fromarray(pixels).save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_text(caption)
    return folder


def check_training(api: dict, entry: dict, comfy) -> None:
    """A training workflow lowered the validation loss, and its saved LoRA reads in pixart_core."""
    values = []
    for title in VALIDATION_TITLES:
        (nid,) = nodes_matching(api, title)
        values.append(float(entry["outputs"][nid]["text"][0].split("validation loss ")[1].split()[0]))
    assert values[1] < values[0], f"validation loss did not fall: {values}"
    from pixart_core.lora import read_lora
    saved = max((comfy.output_dir / "loras").glob("pixart_lora_*.safetensors"), key=lambda p: p.stat().st_mtime)
    assert len(read_lora(saved).modules("transformer")) > 20


@e2e
@pytest.mark.parametrize("name", WORKFLOWS)
def test_workflow_runs(name, comfy, comfy_object_info, example_input, lora_dataset):
    case = CASES[name]
    wf = load(name)
    api = run_workflow.to_api(comfy, wf)  # every node type installed, then converted through the schemas

    # the shipped values, before any override
    for key, values in case.shipped.items():
        ids = nodes_matching(api, key)
        assert ids, f"{name}: no {key} node"
        for input_name, value in values.items():
            assert api[ids[0]]["inputs"][input_name] == value, f"{name}: {key}.{input_name}"
    for entry in api.values():
        for input_name in MODEL_INPUTS:
            if isinstance(entry["inputs"].get(input_name), str):
                assert entry["inputs"][input_name] in RELEASED_NAMES

    api = apply_case(api, case)
    entry = comfy.run(api, timeout=600, extra_data={"extra_pnginfo": {"workflow": wf}})
    files = comfy.output_images(entry)
    saves = nodes_matching(api, "SaveImage")
    assert len(files) == len(saves) == 1, files
    img = png_array(files[0])
    assert (img.shape[1], img.shape[0]) == case.size, f"{name}: {img.shape[1]}x{img.shape[0]}, want {case.size}"
    assert img.std() > 2.0, f"{name}: the image is (almost) constant"
    assert len(np.unique(img.reshape(-1, 3)[::97], axis=0)) > 32, f"{name}: the image has hardly any colours"
    assert comfy_host.load_workflow(files[0]) == wf  # dragging the PNG back in restores the workflow
    if nodes_matching(api, "TrainLoraNode"):
        check_training(api, entry, comfy)
