"""Hostile and broken inputs queued on the real host: each is refused with a sentence that says what to
do, nothing is left half-done, and the server serves the next prompt (issue #10; #13 item 3).

Refusals at queue time come back as HTTP 400 with ``node_errors`` (ComfyUI's input validation hook:
the nodes' ``validate_inputs``); failures that need a loaded model come back as ``execution_error``.
After each case the shipped txt2img workflow runs again with a fresh seed and must save an image.
"""
from __future__ import annotations

import itertools
import json
import shutil

import pytest
import torch

import pixart_model_fixtures as fx
import run_workflow
from comfy_host import ExecutionError, PromptError

pytestmark = pytest.mark.e2e

WORKFLOWS = run_workflow.comfy_host.REPO / "workflows"
_seeds = itertools.count(1000)


_converted: dict = {}


def api_of(comfy, name: str) -> dict:
    """A shipped workflow in API form, 1 step at the 256 bins (errors, not images, are under test)."""
    if name not in _converted:  # converting fetches the whole /object_info: once per workflow
        _converted[name] = run_workflow.to_api(comfy, json.loads((WORKFLOWS / name).read_text(encoding="utf-8")))
    api = json.loads(json.dumps(_converted[name]))
    for entry in api.values():
        if entry["class_type"] in ("PixArtSuiteSampler", "PixArtSuiteSigmas"):
            entry["inputs"]["steps"] = 1
        if entry["class_type"] == "PixArtSuiteResolution":
            entry["inputs"]["size_class"] = "256"
    return api


def node_of(api: dict, class_type: str, index: int = 0) -> str:
    return sorted((nid for nid, e in api.items() if e["class_type"] == class_type), key=int)[index]


def refused(comfy, api: dict) -> dict:
    """The node_errors of a prompt the server refuses when it is queued."""
    with pytest.raises(PromptError) as err:
        comfy.queue(api)
    assert err.value.status == 400, err.value
    return err.value.node_errors


def messages(node_errors: dict, node_id: str) -> list[str]:
    return [e["details"] for e in node_errors[node_id]["errors"]]


def fails(comfy, api: dict) -> ExecutionError:
    with pytest.raises(ExecutionError) as err:
        comfy.run(api, timeout=300)
    return err.value


def serves_next_prompt(comfy) -> None:
    api = api_of(comfy, "txt2img_1024.json")
    api[node_of(api, "PixArtSuiteSampler")]["inputs"]["seed"] = next(_seeds)  # not a cached result
    images = comfy.output_images(comfy.run(api, timeout=300))
    assert images and all(p.stat().st_size > 0 for p in images)


# -------------------------------------------------------------------------------------------------
# numbers and text
# -------------------------------------------------------------------------------------------------

def with_kv_node(api: dict, layers: str) -> tuple[dict, str]:
    loader, sampler = node_of(api, "PixArtSuiteModelLoader"), node_of(api, "PixArtSuiteSampler")
    api["900"] = {"class_type": "PixArtSuiteKVCompression",
                  "inputs": {"model": [loader, 0], "layers": layers, "ratio": 2, "mode": "avgpool"}}
    api[sampler]["inputs"]["model"] = ["900", 0]
    return api, "900"


def test_a_layer_list_that_would_fill_memory_is_refused_when_queued(comfy):
    # it grew the server to 22 GB until the kernel killed it (issue #10, case 1)
    api, kv = with_kv_node(api_of(comfy, "txt2img_1024.json"), "0-99999999999999999999")
    errors = refused(comfy, api)
    assert list(errors) == [kv]
    assert messages(errors, kv) == ["layers - layers names layer 999999999..., which no model has; use numbers "
                                    "like 14-27, or all"]
    serves_next_prompt(comfy)


def test_layers_beyond_the_models_depth_are_an_error_naming_the_depth(comfy):
    api, kv = with_kv_node(api_of(comfy, "txt2img_1024.json"), "0-40")
    e = fails(comfy, api)
    assert (e.node_id, e.node_type) == (kv, "PixArtSuiteKVCompression")
    assert e.exception_message.strip() == ("layers '0-40' names layer 40, but this model has layers 0-1; use numbers "
                                           "up to 1 or all")
    serves_next_prompt(comfy)


def test_non_finite_sampler_numbers_are_refused_when_queued(comfy):
    # a NaN guidance "succeeded" with a black image (issue #10, case 6)
    for name, value, words in [("cfg", float("nan"), "cfg must be a finite number, got nan"),
                               ("cfg", float("inf"), "cfg must be a finite number, got inf"),
                               ("denoise", float("nan"), "denoise must be a finite number, got nan")]:
        api = api_of(comfy, "txt2img_1024.json")
        sampler = node_of(api, "PixArtSuiteSampler")
        api[sampler]["inputs"][name] = value
        errors = refused(comfy, api)
        assert list(errors) == [sampler]
        # ComfyUI lists a validate_inputs message once per input that function takes (cfg, denoise)
        assert messages(errors, sampler) == [f"cfg - {words}", f"denoise - {words}"]
    serves_next_prompt(comfy)


def test_every_non_finite_number_in_a_graph_is_reported_at_once(comfy):
    api = api_of(comfy, "sampler_custom_advanced.json")
    select, grid = node_of(api, "PixArtSuiteSamplerSelect"), node_of(api, "PixArtSuiteSigmas")
    api[select]["inputs"]["eta"] = float("nan")
    api[grid]["inputs"]["denoise"] = float("-inf")
    errors = refused(comfy, api)
    assert sorted(errors) == sorted([select, grid])
    assert messages(errors, select) == ["eta - eta must be a finite number, got nan"]
    assert messages(errors, grid) == ["denoise - denoise must be a finite number, got -inf"]
    serves_next_prompt(comfy)


def test_a_prompt_with_lone_surrogates_is_encoded_and_says_so(comfy):
    # a lone surrogate gave a TypeError from the tokenizer (issue #10, case 7)
    api = api_of(comfy, "txt2img_1024.json")
    encode = node_of(api, "PixArtSuiteT5TextEncode")
    api[encode]["inputs"]["text"] = "a cat \ud800 on a \udcff mat"
    api[node_of(api, "PixArtSuiteSampler")]["inputs"]["seed"] = next(_seeds)
    entry = comfy.run(api, timeout=300)
    assert comfy.output_images(entry)
    (text,) = entry["outputs"][encode]["text"]
    assert "2 character(s) that are not valid Unicode text were replaced by U+FFFD" in text
    serves_next_prompt(comfy)


# -------------------------------------------------------------------------------------------------
# files: all missing ones at once, unreadable diffusers folders, malicious pickles
# -------------------------------------------------------------------------------------------------

def test_every_missing_model_is_reported_at_once_with_its_folder_and_source(comfy, models_dir):
    api = api_of(comfy, "txt2img_1024.json")
    loader, t5, vae = (node_of(api, c) for c in ("PixArtSuiteModelLoader", "PixArtSuiteT5Loader", "VAELoader"))
    api[loader]["inputs"]["ckpt_name"] = "PixArt-Sigma-XL-2-512-MS.pth"
    api[t5]["inputs"]["t5_name"] = "t5xxl_fp8_e4m3fn.safetensors"
    api[vae]["inputs"]["vae_name"] = "sdxl.vae.safetensors"
    errors = refused(comfy, api)
    assert sorted(errors) == sorted([loader, t5, vae])  # one answer, not one per Run
    assert messages(errors, loader) == [
        f"ckpt_name - ckpt_name 'PixArt-Sigma-XL-2-512-MS.pth' is missing: put the file in "
        f"{models_dir / 'diffusion_models'} or {models_dir / 'checkpoints'} (download it from "
        "https://huggingface.co/PixArt-alpha/PixArt-Sigma), then press R to refresh the list"]
    assert messages(errors, t5) == [
        f"t5_name - t5_name 't5xxl_fp8_e4m3fn.safetensors' is missing: put the file in {models_dir / 'text_encoders'} "
        "(download it from https://huggingface.co/comfyanonymous/flux_text_encoders), then press R to refresh the list"]
    assert errors[vae]["errors"][0]["type"] == "value_not_in_list"  # ComfyUI's own check of its VAE loader
    serves_next_prompt(comfy)


BROKEN_CONFIGS = {  # folder -> (file inside it, its text, what the message must say)
    "bad-json": ("transformer/config.json", '{"_class_name": "PixArtTransformer2DModel",\n "sample_size": }',
                 "invalid JSON at line 2 column 17"),
    "json-list": ("config.json", "[1, 2]", "holds a JSON list, but a configuration is a JSON object"),
    "big-sample": ("transformer/config.json", json.dumps({"_class_name": "PixArtTransformer2DModel",
                                                          "sample_size": "big"}),
                   "field sample_size must be a whole number, got 'big'"),
}


@pytest.fixture
def broken_diffusers_folders(models_dir):
    root = models_dir / "diffusers"
    made = []
    for name, (inner, text, _) in BROKEN_CONFIGS.items():
        path = root / name / inner
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        made.append(root / name)
    yield root
    for folder in made:
        shutil.rmtree(folder)


def test_unreadable_diffusers_folders_are_listed_with_the_reason(comfy, broken_diffusers_folders):
    # they vanished from the list, and a workflow naming one said "no such folder any more" (issue #10, case 4)
    choices = comfy.object_info("PixArtSuiteModelLoader")["PixArtSuiteModelLoader"]["input"]["required"]["ckpt_name"]
    listed = choices[1]["options"] if choices[0] == "COMBO" else choices[0]
    for name in BROKEN_CONFIGS:
        assert f"[diffusers] {name}" in listed
    api = api_of(comfy, "txt2img_1024.json")
    loader = node_of(api, "PixArtSuiteModelLoader")
    for name, (inner, _, words) in BROKEN_CONFIGS.items():
        api[loader]["inputs"]["ckpt_name"] = f"[diffusers] {name}"
        (message,) = messages(refused(comfy, api), loader)
        assert message.startswith(f"ckpt_name - ckpt_name '[diffusers] {name}' cannot be loaded: "
                                  f"{broken_diffusers_folders / name / inner}: "), message
        assert words in message
    serves_next_prompt(comfy)


class _Payload:
    """Unpickling this runs code: it would create the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture
def malicious_pickles(models_dir, tmp_path):
    marker = tmp_path / "payload-ran"
    files = [models_dir / "diffusion_models" / "evil-pixart.pth", models_dir / "text_encoders" / "evil-t5.pth"]
    for f in files:
        torch.save({"state_dict": {"w": torch.zeros(2)}, "x": _Payload(marker)}, f)
    yield marker
    for f in files:
        f.unlink()


def test_malicious_pickles_are_refused_by_both_loaders_with_one_message(comfy, malicious_pickles, models_dir):
    api = api_of(comfy, "txt2img_1024.json")
    loader, t5 = node_of(api, "PixArtSuiteModelLoader"), node_of(api, "PixArtSuiteT5Loader")
    refusal = ": refused - the file contains Python objects, not just tensors, and loading it could run code; " \
              "convert it to .safetensors with a trusted tool"
    api[loader]["inputs"]["ckpt_name"] = "evil-pixart.pth"
    e = fails(comfy, api)
    assert e.node_id == loader
    assert e.exception_message.strip() == str(models_dir / "diffusion_models" / "evil-pixart.pth") + refusal
    api = api_of(comfy, "txt2img_1024.json")
    api[t5]["inputs"]["t5_name"] = "evil-t5.pth"
    e = fails(comfy, api)
    assert e.node_id == t5
    assert e.exception_message.strip() == "t5_name: " + str(models_dir / "text_encoders" / "evil-t5.pth") + refusal
    assert "weights_only=False" not in e.exception_message  # never PyTorch's advice to turn the check off
    assert not malicious_pickles.exists()  # and the payload never ran
    serves_next_prompt(comfy)


# -------------------------------------------------------------------------------------------------
# what the node library shows
# -------------------------------------------------------------------------------------------------

def test_every_widget_of_the_pack_has_a_default(comfy_object_info):
    # the node library's hover preview showed "ckpt_name undefined": it prints each widget's default
    widgets = {"COMBO", "INT", "FLOAT", "STRING", "BOOLEAN"}
    missing = []
    for node, info in comfy_object_info.items():
        if not node.startswith("PixArtSuite"):
            continue
        for section in ("required", "optional"):
            for name, spec in (info["input"].get(section) or {}).items():
                kind, options = spec[0], (spec[1] if len(spec) > 1 else {})
                if (isinstance(kind, list) or kind in widgets) and "default" not in options:
                    missing.append(f"{node}.{name}")
    assert not missing
    loader = comfy_object_info["PixArtSuiteModelLoader"]["input"]["required"]
    assert loader["ckpt_name"][1]["default"] == fx.PIXART_1024
    assert comfy_object_info["PixArtSuiteT5Loader"]["input"]["required"]["t5_name"][1]["default"] == fx.T5_XXL
