"""The mistakes users make, queued on the real host, and the error text they get back.

Each case starts from the shipped txt2img_1024 workflow (converted as the front end queues it)
and changes what a user would change in the canvas: pick another file in a dropdown, type a size,
swap a loader. The host either refuses the prompt (HTTP 400, ``node_errors`` shown on the node)
or runs it and reports an ``execution_error``; the message asserted is the one the front end
shows in its error dialog (``exception_message``) or on the node (``node_errors``).

The wrong files are small stand-ins in the real key layouts (pixart_model_fixtures.py): an SD1.5
checkpoint, a CLIP-L text encoder, a T5 encoder of another width, and, for "not a PixArt MODEL",
a complete depth-1 SD3 MMDiT that ComfyUI's own Load Diffusion Model (UNETLoader) turns into a
real SD3 MODEL - the cheapest non-PixArt MODEL ComfyUI 0.3.75 builds from a file.
"""
from __future__ import annotations

import json

import pytest

import pixart_model_fixtures as fx
import run_workflow
from comfy_host import ExecutionError, PromptError

pytestmark = pytest.mark.e2e

WORKFLOW = run_workflow.comfy_host.REPO / "workflows" / "txt2img_1024.json"


def small_api(comfy, workflow) -> dict:
    """A shipped workflow in API form, 1 step at the 256 bins (errors, not images, are under test)."""
    api = run_workflow.to_api(comfy, json.loads(workflow.read_text(encoding="utf-8")))
    for entry in api.values():
        if entry["class_type"] == "PixArtSuiteSampler":
            entry["inputs"]["steps"] = 1
        if entry["class_type"] == "PixArtSuiteResolution":
            entry["inputs"]["size_class"] = "256"
    return api


@pytest.fixture
def txt2img(comfy):
    return small_api(comfy, WORKFLOW)


def node_of(api: dict, class_type: str) -> str:
    ids = [nid for nid, e in api.items() if e["class_type"] == class_type]
    assert len(ids) == 1, (class_type, ids)
    return ids[0]


def run_failing(comfy, api: dict) -> ExecutionError:
    with pytest.raises(ExecutionError) as err:
        comfy.run(api, timeout=300)
    assert not err.value.interrupted
    return err.value


def test_sd15_checkpoint_in_the_pixart_loader(comfy, txt2img):
    loader = node_of(txt2img, "PixArtSuiteModelLoader")
    txt2img[loader]["inputs"]["ckpt_name"] = fx.SD15_CHECKPOINT  # it is in the dropdown (models/checkpoints)
    e = run_failing(comfy, txt2img)
    assert (e.node_id, e.node_type) == (loader, "PixArtSuiteModelLoader")
    assert e.exception_type.endswith("CheckpointError")
    msg = e.exception_message
    assert fx.SD15_CHECKPOINT in msg
    assert "this is a Stable Diffusion UNet checkpoint (SD1.x/SDXL), not a PixArt checkpoint" in msg
    assert "load it with ComfyUI's Load Checkpoint" in msg


def test_clip_l_in_the_t5_loader(comfy, txt2img):
    loader = node_of(txt2img, "PixArtSuiteT5Loader")
    txt2img[loader]["inputs"]["t5_name"] = fx.CLIP_L
    e = run_failing(comfy, txt2img)
    assert (e.node_id, e.node_type) == (loader, "PixArtSuiteT5Loader")
    msg = e.exception_message
    assert msg.startswith("t5_name: ") and fx.CLIP_L in msg
    assert "looks like a CLIP text encoder (like clip_l.safetensors), not a T5 encoder" in msg
    assert "t5xxl_fp16.safetensors" in msg  # says what to load instead


def test_non_pixart_model_into_the_pixart_sampler(comfy, txt2img):
    # swap 'Load PixArt-Σ Model' for ComfyUI's Load Diffusion Model holding an SD3 MMDiT
    loader = node_of(txt2img, "PixArtSuiteModelLoader")
    txt2img[loader] = {"class_type": "UNETLoader", "inputs": {"unet_name": fx.SD3_MMDIT, "weight_dtype": "default"}}
    resolution = node_of(txt2img, "PixArtSuiteResolution")
    txt2img[resolution]["inputs"].pop("model")  # 'from model' is not used: size_class is 256
    sampler = node_of(txt2img, "PixArtSuiteSampler")
    e = run_failing(comfy, txt2img)
    assert (e.node_id, e.node_type) == (sampler, "PixArtSuiteSampler")
    assert e.exception_message.strip() == (
        "model is a SD3, not a PixArt model; load a PixArt-Σ checkpoint with 'Load PixArt-Σ Model' "
        "(or ComfyUI's Load Diffusion Model) and connect that")
    assert "model_type FLOW" in comfy.log_text()  # ComfyUI really built its SD3 model from the file


def test_size_not_a_multiple_of_16(comfy, txt2img):
    resolution = node_of(txt2img, "PixArtSuiteResolution")
    txt2img[resolution]["inputs"].update({"aspect_ratio": "custom", "width": 1000, "height": 1024})
    e = run_failing(comfy, txt2img)  # the schema's step 16 is a UI hint: the server accepts 1000
    assert (e.node_id, e.node_type) == (resolution, "PixArtSuiteResolution")
    assert e.exception_message.strip() == ("width 1000 is not a multiple of 16 (8 for the VAE x 2 for the patch); "
                                   "use 992 or 1008")


def test_t5_of_the_wrong_width(comfy, txt2img):
    txt2img[node_of(txt2img, "PixArtSuiteT5Loader")]["inputs"]["t5_name"] = fx.T5_WRONG_WIDTH
    sampler = node_of(txt2img, "PixArtSuiteSampler")
    e = run_failing(comfy, txt2img)
    assert (e.node_id, e.node_type) == (sampler, "PixArtSuiteSampler")
    msg = e.exception_message
    assert msg.startswith("positive embeddings are 48 wide but this model takes 32-wide T5 embeddings")
    assert "T5-XXL for every released PixArt" in msg


def test_missing_pixart_file_names_the_folders(comfy, txt2img, models_dir):
    # A workflow naming a file the user has not downloaded: the loader's validate_inputs refuses it
    # when the prompt is queued (ComfyUI 0.3.75 itself checks only V1-style list inputs, not V3 Combos).
    loader = node_of(txt2img, "PixArtSuiteModelLoader")
    txt2img[loader]["inputs"]["ckpt_name"] = "PixArt-Sigma-XL-2-512-MS.pth"
    with pytest.raises(PromptError) as err:
        comfy.queue(txt2img)
    assert err.value.status == 400 and list(err.value.node_errors) == [loader]
    (problem,) = err.value.node_errors[loader]["errors"]
    assert problem["type"] == "custom_validation_failed"
    assert problem["details"] == (
        f"ckpt_name - ckpt_name 'PixArt-Sigma-XL-2-512-MS.pth' is missing: put the file in "
        f"{models_dir / 'diffusion_models'} or {models_dir / 'checkpoints'} (download it from "
        "https://huggingface.co/PixArt-alpha/PixArt-Sigma), then press R to refresh the list")


def test_missing_vae_file_is_refused_before_running(comfy, txt2img):
    # the stock VAELoader's list input is validated at queue time: HTTP 400, shown on the node
    vae = node_of(txt2img, "VAELoader")
    txt2img[vae]["inputs"]["vae_name"] = "sdxl.vae.safetensors"
    with pytest.raises(PromptError) as err:
        comfy.queue(txt2img)
    assert err.value.status == 400 and list(err.value.node_errors) == [vae]
    (problem,) = err.value.node_errors[vae]["errors"]
    assert problem["type"] == "value_not_in_list"
    assert "vae_name: 'sdxl.vae.safetensors' not in" in problem["details"]
    assert fx.SDXL_VAE in problem["details"]  # the dropdown's real choices are listed
