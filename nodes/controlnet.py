"""Load PixArt ControlNet: a PixArt-δ ControlNet as a CONTROL_NET for ComfyUI's stock Apply ControlNet.

`PixArtControlNet` subclasses ComfyUI's `ControlBase`, so the stock node's strength, start/end
percent, VAE input and chaining work as for any ControlNet. What differs from ComfyUI's own
DiT ControlNets (which run their branch inside `get_control` and return residual tensors): the
branch needs the base model's stream after block 0 and runs inside our model's block loop, so
`get_control` only prepares the hint latent and returns `{CONTROL_KEY: [ControlInput, ...]}`; the
model's forward (comfy_model.ComfyPixArtDiT) runs the copies beside its blocks. That costs no
recomputed block 0 and keeps no 13 residuals in memory (3.9 GB at 4K in fp16 under CFG).
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from comfy_api.latest import io

import comfy.controlnet
import comfy.latent_formats
import comfy.model_base
import comfy.model_management as mm
import comfy.model_patcher
import comfy.ops
import comfy.supported_models
import comfy.utils

from ..pixart_core.controlnet import ControlInput, build_controlnet, read_controlnet
from ..pixart_core.hub import RECOMMENDED_CONTROLNET
from .comfy_model import CONTROL_KEY, ComfyPixArtDiT, with_readable_linears
from .common import CATEGORY, queue_check
from .loaders import DIFFUSERS_PREFIX, _files, _scan, _verdict, default_choice, resolve_choice

log = logging.getLogger("PixArt-Σ")

_FOREIGN = [  # (module or class name of a stock ControlNet's model, what it is)
    ("T2IAdapter", "a T2I-Adapter"),
    ("ControlLora", "an SDXL Control-LoRA"),
    ("comfy.cldm.cldm", "an SD1.x/SDXL ControlNet"),
    ("comfy.ldm.flux", "a Flux ControlNet"),
    ("comfy.cldm.mmdit", "an SD3 ControlNet"),
    ("comfy.cldm.dit_embedder", "an SD3.5 ControlNet"),
    ("comfy.ldm.hydit", "a HunyuanDiT ControlNet"),
    ("comfy.ldm.qwen_image", "a Qwen-Image ControlNet"),
    ("comfy.ldm.cascade", "a Stable Cascade ControlNet"),
]


def _kind(control) -> str:
    model = getattr(control, "control_model", None)
    names = (type(control).__name__, type(model).__module__ if model is not None else "")
    for key, what in _FOREIGN:
        if any(n == key or n.startswith(key + ".") for n in names):
            return what
    return f"a {type(control).__name__} ControlNet"


def check_control_chain(control) -> None:
    """One-sentence error when the conditioning carries a ControlNet made for another model family."""
    while control is not None:
        if not isinstance(control, PixArtControlNet):
            raise ValueError(f"the conditioning carries {_kind(control)}, which cannot steer a PixArt model; load a "
                             f"PixArt ControlNet with 'Load PixArt ControlNet' and apply that instead")
        control = control.previous_controlnet


class PixArtControlNet(comfy.controlnet.ControlBase):
    """A PixArt ControlNet inside ComfyUI's ControlNet protocol (see the module docstring)."""

    def __init__(self, patcher: comfy.model_patcher.ModelPatcher, source: Path, latent_format):
        super().__init__()
        self.control_model_wrapped = patcher  # model management loads it with the base (get_models)
        self.source = Path(source)
        self.compression_ratio = 1  # the hint is a latent of the image's size: only the VAE's factor
        # Set, so the stock node keeps its VAE; pre_run replaces it by the model's own latent format.
        self.latent_format = latent_format

    @property
    def net(self):
        return self.control_model_wrapped.model

    def copy(self):
        c = PixArtControlNet(self.control_model_wrapped, self.source, self.latent_format)
        self.copy_to(c)
        return c

    def get_models(self):
        return super().get_models() + [self.control_model_wrapped]

    def pre_run(self, model, percent_to_timestep_function):
        name = f"PixArt ControlNet {self.source.name}"
        if not isinstance(getattr(model, "diffusion_model", None), ComfyPixArtDiT):
            if isinstance(model, comfy.model_base.PixArt):
                raise ValueError(f"{name} was applied to ComfyUI's own PixArt model, which ignores ControlNets; load "
                                 f"the model with 'Load PixArt-Σ Model' instead")
            raise ValueError(f"{name} was applied to a {type(model).__name__} model; it steers only PixArt models "
                             f"loaded with 'Load PixArt-Σ Model'")
        self.net.check_base(model.diffusion_model.config, name)
        if self.vae is None:
            raise ValueError(f"{name} needs the hint image as a latent: connect the VAE you decode with (SDXL VAE for "
                             f"PixArt-Σ, SD1.5 VAE for PixArt-α) to Apply ControlNet's vae input")
        self.latent_format = model.latent_format
        super().pre_run(model, percent_to_timestep_function)

    def hint_latent(self, x_noisy: torch.Tensor, batched_number: int) -> torch.Tensor:
        """The control image resized (centre crop) to the latent's size x the VAE factor, as ComfyUI's own
        ControlNets do, VAE-encoded into the model's latent space; cached while the size stays."""
        H, W = x_noisy.shape[-2:]
        if self.cond_hint is None or tuple(self.cond_hint.shape[-2:]) != (H, W):
            self.cond_hint = None
            ratio = self.compression_ratio * self.vae.spacial_compression_encode()
            image = comfy.utils.common_upscale(self.cond_hint_original, W * ratio, H * ratio, self.upscale_algorithm,
                                               "center")
            image = image[:, :3] if image.shape[1] >= 3 else image[:, :1].expand(-1, 3, -1, -1)
            loaded = mm.loaded_models(only_currently_used=True)
            latent = self.vae.encode(image.movedim(1, -1))
            mm.load_models_gpu(loaded)  # encoding may have pushed the models off the device
            latent = self.latent_format.process_in(latent)
            if latent.ndim != 4 or latent.shape[1] != x_noisy.shape[1]:
                raise ValueError(f"the VAE connected to Apply ControlNet gives {tuple(latent.shape)} latents but the "
                                 f"PixArt model takes {x_noisy.shape[1]}-channel ones; connect the model's VAE "
                                 f"(SDXL VAE for PixArt-Σ, SD1.5 VAE for PixArt-α)")
            self.cond_hint = latent.to(device=x_noisy.device, dtype=torch.float32)
        hint = self.cond_hint
        if hint.shape[0] != x_noisy.shape[0]:
            hint = comfy.controlnet.broadcast_image_to(hint, x_noisy.shape[0], batched_number)
        return hint

    def get_control(self, x_noisy, t, cond, batched_number, transformer_options):
        prev = None
        if self.previous_controlnet is not None:
            prev = self.previous_controlnet.get_control(x_noisy, t, cond, batched_number, transformer_options)
        if self.timestep_range is not None and (t[0] > self.timestep_range[0] or t[0] < self.timestep_range[1]):
            return prev
        entry = ControlInput(self.net, self.hint_latent(x_noisy, batched_number), self.strength)
        out = {"input": [], "middle": [], "output": []}
        out[CONTROL_KEY] = list((prev or {}).get(CONTROL_KEY, [])) + [entry]
        return out


def load_controlnet(path) -> PixArtControlNet:
    raw = read_controlnet(path)  # CheckpointError says what the file is
    load_device, offload_device = mm.get_torch_device(), mm.unet_offload_device()
    params = sum(v.numel() for v in raw.state_dict.values())
    supported = list(comfy.supported_models.PixArtSigma.supported_inference_dtypes)
    dtype = mm.unet_dtype(model_params=params, supported_dtypes=supported,
                          weight_dtype=next(iter(raw.state_dict.values())).dtype)
    # manual_cast: the copies compute in whatever dtype the base model runs in, whatever they are stored in
    net = build_controlnet(raw, dtype, offload_device, with_readable_linears(comfy.ops.manual_cast))
    patcher = comfy.model_patcher.ModelPatcher(net, load_device=load_device, offload_device=offload_device)
    latent_format = comfy.latent_formats.SD15() if raw.base_family == "alpha" else comfy.latent_formats.SDXL()
    log.info("PixArt: loaded ControlNet %s (%s layout, %d copied blocks, width %d, weights %s)", raw.path.name,
             raw.layout, raw.config.depth, raw.config.hidden_size, dtype)
    return PixArtControlNet(patcher, raw.path, latent_format)


def _is_pixart_controlnet(c: dict) -> bool:
    name = c.get("_class_name", "")
    return ("PixArt" in name and "ControlNet" in name) or (not name and "num_layers" in c and len(c) <= 3)


def _controlnet_folders() -> list[tuple[str, Path, str | None]]:
    return _scan("controlnet", lambda d: _verdict((d / "config.json", d / "controlnet" / "config.json"),
                                                  _is_pixart_controlnet))


def controlnet_choices() -> list[str]:
    return _files("controlnet") + [DIFFUSERS_PREFIX + n for n, _, _ in _controlnet_folders()]


def resolve_controlnet(control_net_name: str) -> Path:
    return resolve_choice(control_net_name, "control_net_name", ("controlnet",),
                          {DIFFUSERS_PREFIX: (_controlnet_folders, "controlnet")})


class PixArtSuiteControlNetLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        choices = controlnet_choices()
        return io.Schema(
            node_id="PixArtSuiteControlNetLoader",
            display_name="Load PixArt ControlNet",
            category=CATEGORY,
            description="Loads a PixArt ControlNet (PixArt-δ ControlNet-Transformer: the official "
                        "PixArt-XL-2-*-ControlNet.pth, or diffusers-layout files and folders such as SimpleTuner's Σ "
                        "ControlNets) for ComfyUI's own Apply ControlNet node: strength, start/end percent and "
                        "chaining work as usual. Connect the model's VAE to Apply ControlNet's vae input.",
            inputs=[
                io.Combo.Input("control_net_name", options=choices, default=default_choice(choices, RECOMMENDED_CONTROLNET),
                               tooltip="The ControlNet: files from models/controlnet, and diffusers ControlNet folders "
                                       f"there (listed as '{DIFFUSERS_PREFIX}name'). Every size is read from the "
                                       "weights."),
            ],
            outputs=[io.ControlNet.Output(
                tooltip="For Apply ControlNet, with a PixArt model from 'Load PixArt-Σ Model'.")],
        )

    @classmethod
    def validate_inputs(cls, control_net_name):
        return queue_check(resolve_controlnet, control_net_name=control_net_name)

    @classmethod
    def execute(cls, control_net_name) -> io.NodeOutput:
        path = resolve_controlnet(control_net_name)
        return io.NodeOutput(load_controlnet(path))
