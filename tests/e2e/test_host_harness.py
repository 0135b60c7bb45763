"""The e2e harness itself: host start, stock graphs, errors, interrupt, UI -> API conversion.

Only stock ComfyUI nodes and the random TAESD-XL from vae_fixtures.py are used, so these tests
hold whatever state the pack's own nodes are in. Conversion tests need no host (no e2e mark).
"""
from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import comfy_host
import run_workflow
import vae_fixtures
from comfy_host import ExecutionError, MissingNodesError, PromptError, WorkflowError, workflow_to_api

e2e = pytest.mark.e2e


# --------------------------------------------------------------------------------------------
# UI-format workflows and the schemas they need (trimmed copies of ComfyUI 0.3.75's /object_info)
# --------------------------------------------------------------------------------------------

def _schema(display, required, optional=None, output=()):
    inputs = {"required": required}
    order = {"required": list(required)}
    if optional:
        inputs["optional"] = optional
        order["optional"] = list(optional)
    return {"input": inputs, "input_order": order, "output": list(output), "display_name": display}


_SAMPLERS = [["euler", "dpmpp_2m"], {}]
_SCHEDULERS = [["normal", "karras"], {}]
OBJECT_INFO = {
    "EmptyLatentImage": _schema("Empty Latent Image", {
        "width": ["INT", {"default": 512, "min": 16}], "height": ["INT", {"default": 512}],
        "batch_size": ["INT", {"default": 1}]}, output=["LATENT"]),
    "LatentUpscale": _schema("Upscale Latent", {
        "samples": ["LATENT"], "upscale_method": [["nearest-exact", "bilinear"]], "width": ["INT", {}],
        "height": ["INT", {}], "crop": [["disabled", "center"]]}, output=["LATENT"]),
    "LatentUpscaleBy": _schema("Upscale Latent By", {
        "samples": ["LATENT"], "upscale_method": [["nearest-exact", "bilinear"]],
        "scale_by": ["FLOAT", {"default": 1.5}]}, output=["LATENT"]),
    "VAELoader": _schema("Load VAE", {"vae_name": [["taesdxl", "pixel_space"]]}, output=["VAE"]),
    "VAEDecode": _schema("VAE Decode", {"samples": ["LATENT", {}], "vae": ["VAE", {}]}, output=["IMAGE"]),
    "ImageAddNoise": _schema("ImageAddNoise", {
        "image": ["IMAGE"], "seed": ["INT", {"default": 0, "control_after_generate": True}],
        "strength": ["FLOAT", {"default": 0.5}]}, output=["IMAGE"]),
    "SaveImage": _schema("Save Image", {"images": ["IMAGE", {}], "filename_prefix": ["STRING", {"default": "ComfyUI"}]}),
    "PreviewImage": _schema("Preview Image", {"images": ["IMAGE"]}),
    "LoadImage": _schema("Load Image", {"image": [["cat.png"], {"image_upload": True}]}, output=["IMAGE", "MASK"]),
    "CheckpointLoaderSimple": _schema("Load Checkpoint", {"ckpt_name": [["x.safetensors"], {}]},
                                      output=["MODEL", "CLIP", "VAE"]),
    "CLIPTextEncode": _schema("CLIP Text Encode (Prompt)", {
        "text": ["STRING", {"multiline": True}], "clip": ["CLIP", {}]}, output=["CONDITIONING"]),
    # seed without the control_after_generate flag: the name alone adds the control value
    "KSampler": _schema("KSampler", {
        "model": ["MODEL"], "seed": ["INT", {"default": 0}], "steps": ["INT", {"default": 20}],
        "cfg": ["FLOAT", {"default": 8.0}], "sampler_name": _SAMPLERS, "scheduler": _SCHEDULERS,
        "positive": ["CONDITIONING"], "negative": ["CONDITIONING"], "latent_image": ["LATENT"],
        "denoise": ["FLOAT", {"default": 1.0}]}, output=["LATENT"]),
    # invented: bypass must pass its IMAGE input through although slot 0 is a MASK
    "MaskThenImage": _schema("Mask then image", {
        "mask": ["MASK"], "image": ["IMAGE"], "count": ["INT", {"forceInput": True}],
        "mode": ["COMBO", {"options": ["keep", "drop"]}]}, output=["IMAGE"]),
}


def _node(nid, ntype, inputs=(), outputs=(), widgets=None, mode=0, title=None, order=0):
    node = {"id": nid, "type": ntype, "pos": [nid * 10, 0], "size": [200, 100], "flags": {}, "order": order,
            "mode": mode, "inputs": list(inputs), "outputs": list(outputs),
            "properties": {"Node name for S&R": ntype}}
    if widgets is not None:
        node["widgets_values"] = widgets
    if title:
        node["title"] = title
    return node


def _in(name, typ, link, widget=False):
    entry = {"name": name, "type": typ, "link": link}
    if widget:
        entry["widget"] = {"name": name}
    return entry


def _out(name, typ, links, widget=None):
    entry = {"name": name, "type": typ, "links": list(links), "slot_index": 0}
    if widget:
        entry["widget"] = {"name": widget}
    return entry


def decode_workflow(prefix: str = "harness_ui") -> dict:
    """EmptyLatentImage (width from a PrimitiveNode) -> bypassed LatentUpscale -> Reroute ->
    VAEDecode(taesdxl) -> ImageAddNoise (seed + control value) -> SaveImage; plus a muted
    SaveImage and a Note. Runs on the stock host and saves one 64x64 image."""
    nodes = [
        _node(1, "EmptyLatentImage", [_in("width", "INT", 1, widget=True)], [_out("LATENT", "LATENT", [2])],
              [512, 64, 1], order=1),
        _node(2, "PrimitiveNode", [], [_out("INT", "INT", [1], widget="width")], [64, "fixed"], title="width",
              order=0),
        _node(3, "LatentUpscale", [_in("samples", "LATENT", 2)], [_out("LATENT", "LATENT", [3])],
              ["nearest-exact", 1024, 1024, "disabled"], mode=4, order=2),
        _node(4, "Reroute", [_in("", "*", 3)], [_out("", "LATENT", [4])], order=3),
        _node(5, "VAELoader", [], [_out("VAE", "VAE", [5])], ["taesdxl"], order=0),
        _node(6, "VAEDecode", [_in("samples", "LATENT", 4), _in("vae", "VAE", 5)], [_out("IMAGE", "IMAGE", [6, 8])],
              order=4),
        _node(7, "ImageAddNoise", [_in("image", "IMAGE", 6)], [_out("IMAGE", "IMAGE", [7])],
              [12345, "randomize", 0.25], title="Noise", order=5),
        _node(8, "SaveImage", [_in("images", "IMAGE", 7)], [], [prefix], order=6),
        _node(9, "SaveImage", [_in("images", "IMAGE", 8)], [], ["muted"], mode=2, order=7),
        _node(10, "Note", [], [], ["Notes are front-end only."], order=8),
    ]
    links = [[1, 2, 0, 1, 0, "INT"], [2, 1, 0, 3, 0, "LATENT"], [3, 3, 0, 4, 0, "*"], [4, 4, 0, 6, 0, "LATENT"],
             [5, 5, 0, 6, 1, "VAE"], [6, 6, 0, 7, 0, "IMAGE"], [7, 7, 0, 8, 0, "IMAGE"], [8, 6, 0, 9, 0, "IMAGE"]]
    return {"id": "harness", "revision": 0, "last_node_id": 10, "last_link_id": 8, "nodes": nodes, "links": links,
            "groups": [], "config": {}, "extra": {}, "version": 0.4}


def decode_workflow_api(prefix: str = "harness_ui") -> dict:
    return {
        "1": {"inputs": {"width": 64, "height": 64, "batch_size": 1}, "class_type": "EmptyLatentImage",
              "_meta": {"title": "Empty Latent Image"}},
        "5": {"inputs": {"vae_name": "taesdxl"}, "class_type": "VAELoader", "_meta": {"title": "Load VAE"}},
        "6": {"inputs": {"samples": ["1", 0], "vae": ["5", 0]}, "class_type": "VAEDecode",
              "_meta": {"title": "VAE Decode"}},
        "7": {"inputs": {"seed": 12345, "strength": 0.25, "image": ["6", 0]}, "class_type": "ImageAddNoise",
              "_meta": {"title": "Noise"}},
        "8": {"inputs": {"filename_prefix": prefix, "images": ["7", 0]}, "class_type": "SaveImage",
              "_meta": {"title": "Save Image"}},
    }


def sampler_workflow() -> dict:
    """Schema-1.0 style (link objects): a converted seed fed by a PrimitiveNode, a muted negative
    prompt, a bypassed LatentUpscaleBy, a bypassed VAEDecode with no IMAGE input to pass, a bypass
    that must pick its second input, dict widgets_values, a LoadImage with its upload value."""
    nodes = [
        _node(20, "CheckpointLoaderSimple", [], [_out("MODEL", "MODEL", [1]), _out("CLIP", "CLIP", [2, 3]),
                                                 _out("VAE", "VAE", [])], ["x.safetensors"]),
        _node(21, "KSampler", [_in("model", "MODEL", 1), _in("positive", "CONDITIONING", 4),
                               _in("negative", "CONDITIONING", 5), _in("latent_image", "LATENT", 6),
                               _in("seed", "INT", 7, widget=True)], [_out("LATENT", "LATENT", [9])],
              [1, "increment", 4, 7.5, "dpmpp_2m", "karras", 0.8]),
        _node(22, "CLIPTextEncode", [_in("clip", "CLIP", 2)], [_out("CONDITIONING", "CONDITIONING", [4])], ["a cat"]),
        _node(23, "CLIPTextEncode", [_in("clip", "CLIP", 3)], [_out("CONDITIONING", "CONDITIONING", [5])], ["ugly"],
              mode=2),
        _node(24, "PrimitiveNode", [], [_out("INT", "INT", [7], widget="seed")], [99, "randomize"]),
        _node(25, "EmptyLatentImage", [], [_out("LATENT", "LATENT", [8])], [128, 96, 2]),
        _node(26, "LatentUpscaleBy", [_in("samples", "LATENT", 8)], [_out("LATENT", "LATENT", [6])],
              ["bilinear", 2.0], mode=4),
        _node(27, "VAEDecode", [_in("samples", "LATENT", 9), _in("vae", "VAE", None)], [_out("IMAGE", "IMAGE", [10])],
              mode=4),
        _node(28, "SaveImage", [_in("images", "IMAGE", 10)], [], {"filename_prefix": "dict"}),
        _node(31, "LoadImage", [], [_out("IMAGE", "IMAGE", [11]), _out("MASK", "MASK", [12])], ["cat.png", "image"]),
        _node(30, "MaskThenImage", [_in("mask", "MASK", 12), _in("image", "IMAGE", 11)], [_out("IMAGE", "IMAGE", [13])],
              ["keep"], mode=4),
        _node(29, "PreviewImage", [_in("images", "IMAGE", 13)], []),
        _node(32, "MarkdownNote", [], [], ["# hi"]),
    ]
    raw = [[1, 20, 0, 21, 0, "MODEL"], [2, 20, 1, 22, 0, "CLIP"], [3, 20, 1, 23, 0, "CLIP"],
           [4, 22, 0, 21, 1, "CONDITIONING"], [5, 23, 0, 21, 2, "CONDITIONING"], [6, 26, 0, 21, 3, "LATENT"],
           [7, 24, 0, 21, 4, "INT"], [8, 25, 0, 26, 0, "LATENT"], [9, 21, 0, 27, 0, "LATENT"],
           [10, 27, 0, 28, 0, "IMAGE"], [11, 31, 0, 30, 1, "IMAGE"], [12, 31, 1, 30, 0, "MASK"],
           [13, 30, 0, 29, 0, "IMAGE"]]
    links = [dict(zip(("id", "origin_id", "origin_slot", "target_id", "target_slot", "type"), row)) for row in raw]
    return {"id": "sampler", "revision": 0, "last_node_id": 32, "last_link_id": 13, "nodes": nodes, "links": links,
            "groups": [], "config": {}, "extra": {}, "version": 1, "definitions": {"subgraphs": []}}


# --------------------------------------------------------------------------------------------
# Conversion (pure)
# --------------------------------------------------------------------------------------------

def test_workflow_to_api_decode_workflow():
    assert workflow_to_api(decode_workflow(), OBJECT_INFO) == decode_workflow_api()


def test_workflow_to_api_sampler_workflow():
    api = workflow_to_api(sampler_workflow(), OBJECT_INFO)
    assert api == {
        "20": {"inputs": {"ckpt_name": "x.safetensors"}, "class_type": "CheckpointLoaderSimple",
               "_meta": {"title": "Load Checkpoint"}},
        "21": {"inputs": {"seed": 99, "steps": 4, "cfg": 7.5, "sampler_name": "dpmpp_2m", "scheduler": "karras",
                          "denoise": 0.8, "model": ["20", 0], "positive": ["22", 0], "latent_image": ["25", 0]},
               "class_type": "KSampler", "_meta": {"title": "KSampler"}},
        "22": {"inputs": {"text": "a cat", "clip": ["20", 1]}, "class_type": "CLIPTextEncode",
               "_meta": {"title": "CLIP Text Encode (Prompt)"}},
        "25": {"inputs": {"width": 128, "height": 96, "batch_size": 2}, "class_type": "EmptyLatentImage",
               "_meta": {"title": "Empty Latent Image"}},
        "28": {"inputs": {"filename_prefix": "dict"}, "class_type": "SaveImage", "_meta": {"title": "Save Image"}},
        "31": {"inputs": {"image": "cat.png"}, "class_type": "LoadImage", "_meta": {"title": "Load Image"}},
        "29": {"inputs": {"images": ["31", 0]}, "class_type": "PreviewImage", "_meta": {"title": "Preview Image"}},
    }


def test_workflow_to_api_control_value_only_skipped_when_present():
    wf = decode_workflow()
    wf["nodes"][6]["widgets_values"] = [7, 0.5]  # saved without the control value
    assert workflow_to_api(wf, OBJECT_INFO)["7"]["inputs"]["seed"] == 7
    assert workflow_to_api(wf, OBJECT_INFO)["7"]["inputs"]["strength"] == 0.5


def test_workflow_to_api_force_input_is_not_a_widget():
    wf = {"nodes": [_node(1, "MaskThenImage", [_in("mask", "MASK", None)], [], ["drop"])], "links": []}
    assert workflow_to_api(wf, OBJECT_INFO)["1"]["inputs"] == {"mode": "drop"}


def test_workflow_to_api_unknown_type_names_node():
    wf = decode_workflow()
    wf["nodes"][6]["type"] = "PixArtSomethingMissing"
    with pytest.raises(WorkflowError, match=r"node 7 \(PixArtSomethingMissing\)"):
        workflow_to_api(wf, OBJECT_INFO)


def test_workflow_to_api_passes_api_prompts_through():
    api = decode_workflow_api()
    assert comfy_host.is_api_prompt(api) and not comfy_host.is_api_prompt(decode_workflow())
    out = workflow_to_api(api, {})
    assert out == api and out is not api


def test_load_workflow_reads_json_and_png(tmp_path):
    wf = decode_workflow()
    (tmp_path / "wf.json").write_text(json.dumps(wf))
    assert comfy_host.load_workflow(tmp_path / "wf.json") == wf
    from PIL.PngImagePlugin import PngInfo
    info = PngInfo()
    info.add_text("workflow", json.dumps(wf))
    Image.new("RGB", (8, 8)).save(tmp_path / "wf.png", pnginfo=info)
    assert comfy_host.load_workflow(tmp_path / "wf.png") == wf


def test_run_workflow_overrides():
    api = decode_workflow_api()
    run_workflow.apply_overrides(api, ["7.seed=5", "Noise.strength=0.75", "8.filename_prefix=x/y", "1.width=[\"2\", 0]"])
    assert api["7"]["inputs"]["seed"] == 5 and api["7"]["inputs"]["strength"] == 0.75
    assert api["8"]["inputs"]["filename_prefix"] == "x/y"
    assert api["1"]["inputs"]["width"] == ["2", 0]
    with pytest.raises(ValueError, match="no single node"):
        run_workflow.apply_overrides(api, ["99.seed=1"])
    with pytest.raises(ValueError):
        run_workflow.parse_set("seed=1")


def test_link_models(tmp_path):
    src = tmp_path / "src"
    (src / "vae_approx").mkdir(parents=True)
    (src / "vae_approx" / "a.safetensors").write_bytes(b"x")
    (src / "loose.bin").write_bytes(b"x")
    made = comfy_host.link_models(src, tmp_path / "models")
    assert made == [tmp_path / "models" / "vae_approx" / "a.safetensors"]
    assert made[0].is_symlink() and made[0].read_bytes() == b"x"
    assert comfy_host.link_models(src, tmp_path / "models") == made  # idempotent


def test_tiny_taesdxl_is_deterministic(tmp_path):
    a = vae_fixtures.write_tiny_taesdxl(tmp_path / "a")
    b = vae_fixtures.write_tiny_taesdxl(tmp_path / "b")
    assert [p.name for p in a] == ["taesdxl_encoder.safetensors", "taesdxl_decoder.safetensors"]
    assert all(x.read_bytes() == y.read_bytes() for x, y in zip(a, b))
    _, dec = vae_fixtures.tiny_taesdxl_state_dicts()
    img = vae_fixtures.decode_reference(dec, torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)))
    assert img.shape == (1, 3, 64, 64) and torch.isfinite(img).all() and img.std() > 0.03


def test_run_workflow_cli_usage_errors(tmp_path):
    script = comfy_host.REPO / "scripts" / "run_workflow.py"
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "missing.json")], capture_output=True, text=True)
    assert proc.returncode == 2 and "missing.json" in proc.stderr


# --------------------------------------------------------------------------------------------
# Against the real host
# --------------------------------------------------------------------------------------------

def _png(path):
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


@e2e
def test_host_lists_stock_nodes(comfy, comfy_object_info):
    assert comfy.running and comfy.startup_s is not None
    assert {"KSampler", "VAEDecode", "VAELoader", "SaveImage"} <= set(comfy_object_info)
    assert "taesdxl" in comfy_object_info["VAELoader"]["input"]["required"]["vae_name"][0]
    assert set(comfy.require_nodes(["KSampler"])) == {"KSampler"}
    assert (comfy.custom_nodes_dir / comfy.pack_name).resolve() == comfy_host.REPO


@e2e
def test_require_nodes_reports_missing_with_log(comfy):
    with pytest.raises(MissingNodesError) as err:
        comfy.require_nodes(["VAEDecode", "NoSuchPixArtNode"])
    assert err.value.missing == ["NoSuchPixArtNode"]
    assert "NoSuchPixArtNode" in str(err.value) and "ComfyUI log tail" in str(err.value)
    if not (comfy_host.REPO / "__init__.py").exists():
        assert comfy.pack_import_error() and "failed to import" in str(err.value)


@e2e
def test_stock_graph_decodes_taesdxl(comfy):
    entry = comfy.run({
        "1": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "2": {"class_type": "VAELoader", "inputs": {"vae_name": "taesdxl"}},
        "3": {"class_type": "VAEDecode", "inputs": {"samples": ["1", 0], "vae": ["2", 0]}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "harness_api"}},
    }, timeout=120)
    files = comfy.output_images(entry)
    assert len(files) == 1 and files[0].is_file() and files[0].suffix == ".png"
    img = _png(files[0])
    assert img.shape == (64, 64, 3)
    assert img.std() > 1.0, "decoded image is constant"
    # the host decoded exactly what the fixture's weights compute (key layout is right)
    _, dec = vae_fixtures.tiny_taesdxl_state_dicts()
    ref = vae_fixtures.decode_reference(dec, torch.zeros(1, 4, 8, 8))[0].permute(1, 2, 0).numpy() * 255
    assert np.abs(img.astype(np.float64) - ref).max() <= 1.5
    assert "Missing VAE keys" not in comfy.log_text()


@e2e
def test_ui_workflow_converts_and_runs(comfy, comfy_object_info, tmp_path):
    api = workflow_to_api(decode_workflow("harness_ui"), comfy_object_info)
    assert api == decode_workflow_api("harness_ui")  # the trimmed schemas above match the host's
    copies = run_workflow.execute(comfy, decode_workflow("harness_ui"), tmp_path / "out", sets=["7.seed=3"])
    assert [p.parent for p in copies] == [tmp_path / "out"] and copies[0].name.startswith("harness_ui")
    img = _png(copies[0])
    assert img.shape == (64, 64, 3) and img.std() > 1.0
    assert comfy_host.load_workflow(copies[0]) == decode_workflow("harness_ui")  # UI workflow embedded


@e2e
def test_unknown_node_type_raises_prompt_error(comfy):
    with pytest.raises(PromptError) as err:
        comfy.queue({"17": {"class_type": "NoSuchNodeType", "inputs": {}}})
    assert err.value.status == 400 and err.value.node_ids == ["17"]
    assert "NoSuchNodeType" in str(err.value) and "17" in str(err.value)


@e2e
def test_invalid_input_raises_prompt_error_with_node_errors(comfy):
    with pytest.raises(PromptError) as err:
        comfy.queue({"3": {"class_type": "VAELoader", "inputs": {"vae_name": "no_such_vae.safetensors"}},
                     "4": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["3", 0]}},
                     "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
                     "6": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "bad"}}})
    assert "3" in err.value.node_errors and "node 3 (VAELoader)" in str(err.value)


@e2e
def test_runtime_failure_raises_execution_error(comfy):
    # a 16-channel SD3 latent through the 4-channel TAESD-XL decoder fails inside VAEDecode
    with pytest.raises(ExecutionError) as err:
        comfy.run({"1": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
                   "2": {"class_type": "VAELoader", "inputs": {"vae_name": "taesdxl"}},
                   "3": {"class_type": "VAEDecode", "inputs": {"samples": ["1", 0], "vae": ["2", 0]}},
                   "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "fail"}}},
                  timeout=120)
    e = err.value
    assert not e.interrupted and e.node_id == "3" and e.node_type == "VAEDecode"
    assert e.exception_type == "RuntimeError" and "conv" in e.traceback and "File " in e.traceback
    assert "node 3 (VAEDecode)" in str(e)


@e2e
def test_interrupt_stops_a_running_prompt(comfy):
    assert comfy.interrupt() == 200  # idle: harmless, the next prompt resets the flag
    # A slow decode (large latent) followed by more nodes: the interrupt lands at a node boundary.
    prompt = {"1": {"class_type": "EmptyLatentImage", "inputs": {"width": 768, "height": 768, "batch_size": 1}},
              "2": {"class_type": "VAELoader", "inputs": {"vae_name": "taesdxl"}},
              "3": {"class_type": "VAEDecode", "inputs": {"samples": ["1", 0], "vae": ["2", 0]}},
              "4": {"class_type": "ImageInvert", "inputs": {"image": ["3", 0]}},
              "5": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "interrupted"}}}
    prompt_id = comfy.queue(prompt)
    deadline = time.monotonic() + 60
    while not comfy.history(prompt_id) and time.monotonic() < deadline:
        if prompt_id in comfy.queue_state()["running"]:
            assert comfy.interrupt(prompt_id) == 200
        time.sleep(0.05)
    with pytest.raises(ExecutionError) as err:
        comfy.wait(prompt_id, timeout=60)
    assert err.value.interrupted
    assert not list(comfy.output_dir.glob("interrupted*"))
