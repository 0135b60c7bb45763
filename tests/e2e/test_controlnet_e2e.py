"""PixArt ControlNet on the real ComfyUI host: the hint steers the image (and nothing else does), and the
mistakes users make with ControlNets get their one sentence.

Starts from the shipped controlnet_canny workflow (Σ 1024 stand-in + a diffusers-layout ControlNet;
the official-layout α file runs in test_workflows.py's controlnet_hed_alpha case), converted as the
front end queues it, at the 256 bins and one step.
"""
from __future__ import annotations

import numpy as np
import pytest

import controlnet_model_fixtures as cfx
import pixart_model_fixtures as fx
import run_workflow
from test_node_errors import node_of, run_failing, small_api
from test_workflows import example_input, png_array  # noqa: F401 (fixture)

pytestmark = pytest.mark.e2e

WORKFLOW = run_workflow.comfy_host.REPO / "workflows" / "controlnet_canny.json"


@pytest.fixture
def canny(comfy, example_input):  # noqa: F811
    return small_api(comfy, WORKFLOW)


def image_of(comfy, api) -> np.ndarray:
    files = comfy.output_images(comfy.run(api, timeout=300))
    assert len(files) == 1
    return png_array(files[0]).astype(np.int16)


def test_the_hint_steers_the_image_and_nothing_else_does(comfy, canny):
    cfx.write_hed_map(comfy.input_dir / "other_hint.png", 256, 256, seed=3)
    load, apply = node_of(canny, "LoadImage"), node_of(canny, "ControlNetApplyAdvanced")
    a = image_of(comfy, canny)
    canny[load]["inputs"]["image"] = "other_hint.png"
    b = image_of(comfy, canny)
    assert a.shape == b.shape == (256, 256, 3)
    assert np.abs(a - b).mean() > 1.0  # another hint, another image
    canny[apply]["inputs"]["strength"] = 0.0
    c = image_of(comfy, canny)
    canny[load]["inputs"]["image"] = "example.png"
    d = image_of(comfy, canny)
    assert np.array_equal(c, d)  # without the ControlNet the hint changes nothing
    assert np.abs(c - a).mean() > 1.0
    canny[apply]["inputs"].update({"strength": 0.9, "start_percent": 1.0, "end_percent": 1.0})
    assert np.array_equal(image_of(comfy, canny), d)  # outside its start/end: the plain model


def test_a_file_that_is_no_pixart_controlnet(comfy, canny):
    loader = node_of(canny, "PixArtSuiteControlNetLoader")
    canny[loader]["inputs"]["control_net_name"] = cfx.SD15_CONTROLNET
    e = run_failing(comfy, canny)
    assert (e.node_id, e.node_type) == (loader, "PixArtSuiteControlNetLoader")
    assert e.exception_message.strip().endswith(
        f"{cfx.SD15_CONTROLNET}: this is an SD1.x/SDXL ControlNet, not a PixArt ControlNet (it steers its own model "
        "family through ComfyUI's Load ControlNet Model); this loader needs a PixArt ControlNet such as "
        "PixArt-XL-2-1024-ControlNet.pth or a diffusers-layout PixArt ControlNet")


def test_a_controlnet_of_another_width(comfy, canny):
    canny[node_of(canny, "PixArtSuiteControlNetLoader")]["inputs"]["control_net_name"] = cfx.WRONG_WIDTH
    e = run_failing(comfy, canny)
    assert e.node_type == "PixArtSuiteSampler"
    assert e.exception_message.strip() == (
        f"PixArt ControlNet {cfx.WRONG_WIDTH} is 96 wide but the PixArt model is 64 wide (PixArt-Σ and -α XL are "
        "1152); use a ControlNet trained for this model")


def test_an_sdxl_controlnet_on_the_pixart_model(comfy, canny):
    loader = node_of(canny, "PixArtSuiteControlNetLoader")
    canny[loader] = {"class_type": "ControlNetLoader", "inputs": {"control_net_name": cfx.CONTROL_LORA}}
    e = run_failing(comfy, canny)
    assert e.node_type == "PixArtSuiteSampler"
    assert e.exception_message.strip() == (
        "the conditioning carries an SDXL Control-LoRA, which cannot steer a PixArt model; load a PixArt ControlNet "
        "with 'Load PixArt ControlNet' and apply that instead")


def test_the_pixart_controlnet_on_another_model(comfy, canny):
    loader = node_of(canny, "PixArtSuiteModelLoader")
    canny[loader] = {"class_type": "UNETLoader", "inputs": {"unet_name": fx.SD3_MMDIT, "weight_dtype": "default"}}
    sampler = node_of(canny, "PixArtSuiteSampler")
    res = node_of(canny, "PixArtSuiteResolution")
    canny[res]["inputs"].pop("model")
    s = canny[sampler]["inputs"]
    canny[sampler] = {"class_type": "KSampler", "inputs": {
        "model": s["model"], "positive": s["positive"], "negative": s["negative"], "latent_image": s["latent_image"],
        "seed": 0, "steps": 1, "cfg": 4.5, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}}
    e = run_failing(comfy, canny)
    assert (e.node_id, e.node_type) == (sampler, "KSampler")
    assert e.exception_message.strip() == (
        f"PixArt ControlNet {cfx.SIGMA_CANNY} was applied to a SD3 model; it steers only PixArt models loaded with "
        "'Load PixArt-Σ Model'")


def test_apply_controlnet_without_its_vae(comfy, canny):
    canny[node_of(canny, "ControlNetApplyAdvanced")]["inputs"].pop("vae")
    e = run_failing(comfy, canny)
    assert e.node_type == "PixArtSuiteSampler"
    assert e.exception_message.strip().startswith(f"PixArt ControlNet {cfx.SIGMA_CANNY} needs the hint image as a "
                                                  "latent: connect the VAE you decode with")
