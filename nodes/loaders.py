"""Load PixArt-Σ Model and Load T5 Encoder (PixArt): files from ComfyUI's model folders -> MODEL / CLIP."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from comfy_api.latest import io

import folder_paths

from ..pixart_core import PRESETS, KVCompress
from ..pixart_core.checks import InputError
from ..pixart_core.files import read_json_object
from ..pixart_core.loading import check_diffusers_config
from ..pixart_core.hub import RECOMMENDED_MODEL, RECOMMENDED_T5, where_to_get
from .comfy_model import load_model, pixart_config_of, with_kv_compression
from .common import CATEGORY, log, queue_check

DIFFUSERS_PREFIX = "[diffusers] "  # a diffusers folder (pipeline root or transformer/text_encoder folder)
FOLDER_PREFIX = "[folder] "  # a Hugging Face model folder inside models/text_encoders
_SCAN_DEPTH = 3  # folder levels searched below each models/ folder for model folders

WEIGHT_DTYPES = {"default": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
                 "fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
KV_CHOICES = ("checkpoint", "off", "deep layers 14-27", "all layers")
KV_MODES = ("avgpool", "conv", "ave", "uniform")
T5_DTYPES = ("default", "fp32", "bf16", "fp16")
T5_DEVICES = ("auto", "cpu", "gpu")
T5_GGUF = "pixart_t5_gguf"  # the text_encoders folders, listing their .gguf files (stock loaders do not see them)


def _register_gguf_folder():
    paths, _ = folder_paths.folder_names_and_paths["text_encoders"]
    folder_paths.folder_names_and_paths.setdefault(T5_GGUF, (paths, {".gguf"}))  # same path list: stays in sync


_register_gguf_folder()


# -------------------------------------------------------------------------------------------------
# what the dropdowns list
# -------------------------------------------------------------------------------------------------

def _is_pixart_transformer(c: dict) -> bool:
    return c.get("_class_name") == "PixArtTransformer2DModel" or ("caption_channels" in c and "sample_size" in c
                                                                   and "num_layers" in c)


def _is_t5_encoder(c: dict) -> bool:
    architectures = c.get("architectures")
    return c.get("model_type") == "t5" or (isinstance(architectures, list) and "T5EncoderModel" in architectures)


def _verdict(config_files, is_kind, check=None) -> bool | str:
    """True: a model folder of this kind; False: not one; a string: its config cannot be read (why).
    Such folders are listed, not hidden, so a workflow naming one gets the reason."""
    for config_file in config_files:
        if not config_file.is_file():
            continue
        try:
            config = read_json_object(config_file)
            if not is_kind(config):
                continue
            if check is not None:
                check(config, config_file)
        except ValueError as e:
            return str(e)
        return True
    return False


_warned: set = set()


def _scan(folder_name: str, verdict) -> list[tuple[str, Path, str | None]]:
    """(relative name, folder, problem or None) of every folder below the models/<folder_name> roots that
    verdict(folder) accepts (True) or cannot read (a string: the problem)."""
    found = []
    try:
        roots = folder_paths.get_folder_paths(folder_name)
    except KeyError:
        return found
    for root in roots:
        root = Path(root)
        if not root.is_dir():
            continue
        for dirpath, dirnames, _ in os.walk(root, followlinks=True):
            here = Path(dirpath)
            depth = len(here.relative_to(root).parts)
            result = verdict(here) if depth else False
            if result is not False:
                problem = None if result is True else result
                found.append((here.relative_to(root).as_posix(), here, problem))
                if problem and problem not in _warned:
                    _warned.add(problem)
                    log.warning("PixArt: %s (listed anyway so a workflow naming it says why)", problem)
                dirnames[:] = []  # a model folder's subfolders are its parts
                continue
            if depth >= _SCAN_DEPTH:
                dirnames[:] = []
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
    return sorted(found)


def _pixart_diffusers_folders() -> list[tuple[str, Path, str | None]]:
    return _scan("diffusers", lambda d: _verdict((d / "config.json", d / "transformer" / "config.json"),
                                                 _is_pixart_transformer, check_diffusers_config))


def _t5_folders() -> list[tuple[str, Path, str | None]]:
    return _scan("text_encoders", lambda d: _verdict((d / "config.json", d / "text_encoder" / "config.json"),
                                                     _is_t5_encoder))


def _t5_diffusers_folders() -> list[tuple[str, Path, str | None]]:
    return _scan("diffusers", lambda d: _verdict((d / "text_encoder" / "config.json",), _is_t5_encoder))


def _files(*folder_names: str) -> list[str]:
    names = []
    for name in folder_names:
        try:
            names += folder_paths.get_filename_list(name)
        except KeyError:
            pass
    return list(dict.fromkeys(names))


def _pixart_files_in_controlnet() -> list[str]:
    """The official ControlNet .pth holds its PixArt-α base model too: one download serves both loaders."""
    return [f for f in _files("controlnet") if "pixart" in f.lower()]


def pixart_model_choices() -> list[str]:
    """Files in diffusion_models and checkpoints, PixArt files in controlnet, then PixArt diffusers folders."""
    return (_files("diffusion_models", "checkpoints") + _pixart_files_in_controlnet()
            + [DIFFUSERS_PREFIX + n for n, _, _ in _pixart_diffusers_folders()])


def t5_choices() -> list[str]:
    """Files in text_encoders (not those inside a listed model folder), then T5 folders."""
    folders = _t5_folders()
    inside = tuple(n + "/" for n, _, _ in folders)
    files = [f for f in _files("text_encoders", T5_GGUF) if not f.replace(os.sep, "/").startswith(inside)]
    return (files + [FOLDER_PREFIX + n for n, _, _ in folders]
            + [DIFFUSERS_PREFIX + n for n, _, _ in _t5_diffusers_folders()])


def default_choice(choices: list[str], recommended: str) -> str:
    """The dropdown's default: the recommended file when present or when nothing is, else the first.
    Always set, so the node library's preview shows a value (not 'undefined') and a new node names
    the file to get."""
    return recommended if recommended in choices or not choices else choices[0]


def _models_folder(folder: str) -> str:
    """Where files of this kind go: the registered folder of that name (not a legacy alias like unet/)."""
    try:
        paths = folder_paths.get_folder_paths(folder)
    except KeyError:
        paths = []
    named = [p for p in paths if Path(p).name == folder]
    return (named or paths or [f"models/{folder}"])[0]


def resolve_choice(choice: str, input_name: str, file_folders: tuple[str, ...], prefixed: dict | None = None,
                   blocking_problems: bool = True) -> Path:
    """The file or folder a loader's dropdown value names, or InputError saying where it belongs and where
    to get it (hub.where_to_get). Call it from the loader's validate_inputs (through queue_check)
    and from execute, e.g. ``resolve_choice(name, "control_net_name", ("controlnet",))``.
    `prefixed` maps a prefix like DIFFUSERS_PREFIX to (scan function, models/ folder) for folder entries;
    a folder the scan lists with a problem is refused with it unless blocking_problems is False."""
    if not isinstance(choice, str) or not choice:
        raise InputError(f"{input_name} is empty; pick a file from the list (press R to refresh it)")
    for prefix, (listing, folder) in (prefixed or {}).items():
        if choice.startswith(prefix):
            name = choice[len(prefix):]
            for n, path, problem in listing():
                if n == name:
                    if problem and blocking_problems:
                        raise InputError(f"{input_name} {choice!r} cannot be loaded: {problem}")
                    return path
            raise InputError(f"{input_name} {choice!r}: there is no such model folder in {_models_folder(folder)}; "
                             "put it there and press R to refresh the list")
    for folder in file_folders:
        try:
            path = folder_paths.get_full_path(folder, choice)
        except KeyError:
            path = None
        if path:
            return Path(path)
    where = " or ".join(dict.fromkeys(_models_folder(f) for f in file_folders))  # aliases share folders
    source = where_to_get(choice)
    raise InputError(f"{input_name} {choice!r} is missing: put the file in {where}"
                     + (f" (download it from {source})" if source else "") + ", then press R to refresh the list")


def resolve_pixart_model(ckpt_name: str) -> Path:
    folders = ("diffusion_models", "checkpoints") + (("controlnet",) if ckpt_name in _pixart_files_in_controlnet() else ())
    return resolve_choice(ckpt_name, "ckpt_name", folders,
                          {DIFFUSERS_PREFIX: (_pixart_diffusers_folders, "diffusers")})


def resolve_t5(t5_name: str) -> Path:
    # a T5 folder whose config.json is unreadable still loads (its weights define it): not blocking
    return resolve_choice(t5_name, "t5_name", ("text_encoders", T5_GGUF),
                          {FOLDER_PREFIX: (_t5_folders, "text_encoders"),
                           DIFFUSERS_PREFIX: (_t5_diffusers_folders, "diffusers")},
                          blocking_problems=False)


# -------------------------------------------------------------------------------------------------
# nodes
# -------------------------------------------------------------------------------------------------

def kv_for_choice(config, choice: str, mode: str) -> KVCompress | None:
    """The per-call KV compression for a loader choice; None keeps what the checkpoint/preset configured."""
    if choice == "checkpoint":
        return None
    ratio = config.kv_compress_ratio if config.kv_compress_layers else 2
    if choice == "off":
        return KVCompress((), ratio, mode)
    if choice == "deep layers 14-27":  # the reference's choice: the deeper half (14-27 of 28)
        return KVCompress(tuple(range(config.depth // 2, config.depth)), ratio, mode)
    if choice == "all layers":
        return KVCompress(tuple(range(config.depth)), ratio, mode)
    raise ValueError(f"kv_compression {choice!r} is not one of {', '.join(KV_CHOICES)}")


class PixArtSuiteModelLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        choices = pixart_model_choices()
        return io.Schema(
            node_id="PixArtSuiteModelLoader",
            display_name="Load PixArt-Σ Model",
            category=CATEGORY,
            description="Loads a PixArt-Σ (or PixArt-α) diffusion transformer: official .pth, .safetensors in the "
                        "official or diffusers layout, or a diffusers folder. Every size is read from the weights. "
                        "Works with stock samplers, LoRA loaders and the PixArt Sampler.",
            inputs=[
                io.Combo.Input("ckpt_name", options=choices, default=default_choice(choices, RECOMMENDED_MODEL),
                               tooltip="The PixArt weights: files from models/diffusion_models and models/checkpoints (and "
                                       "PixArt ControlNet .pth files from models/controlnet, which hold a PixArt-α), "
                                       f"and diffusers folders from models/diffusers (listed as '{DIFFUSERS_PREFIX}name')."),
                io.Combo.Input("preset", options=["auto", *PRESETS], default="auto",
                               tooltip="auto reads the configuration from the file (weights, diffusers config, name). "
                                       "A preset forces the geometry of a released model, e.g. sigma-4k runs 2K "
                                       "weights at the 4096 px bins."),
                io.Combo.Input("weight_dtype", options=list(WEIGHT_DTYPES), default="default",
                               tooltip="Precision the weights are kept in. default lets ComfyUI choose for your "
                                       "device; fp8 halves memory again and computes in 16 bit."),
                io.Combo.Input("kv_compression", options=list(KV_CHOICES), default="checkpoint",
                               tooltip="Key/value token compression in self-attention (fewer keys, faster at 2K-4K). "
                                       "checkpoint: what the file or preset says; off: none; deep layers 14-27: the "
                                       "deeper half of the blocks, as PixArt-Σ's KV config; all layers: every block."),
                io.Combo.Input("kv_mode", options=list(KV_MODES), default="avgpool",
                               tooltip="How keys/values are compressed 2x2 when kv_compression is 'deep layers' or "
                                       "'all layers': avgpool (no weights needed), conv (the checkpoint's trained "
                                       "conv, else its average initialisation), ave (nearest), uniform (strided)."),
            ],
            outputs=[io.Model.Output(tooltip="The PixArt model, for PixArt Sampler, KSampler or SamplerCustom.")],
        )

    @classmethod
    def validate_inputs(cls, ckpt_name):
        return queue_check(resolve_pixart_model, ckpt_name=ckpt_name)  # all missing files at queue time

    @classmethod
    def execute(cls, ckpt_name, preset, weight_dtype, kv_compression, kv_mode) -> io.NodeOutput:
        if weight_dtype not in WEIGHT_DTYPES:
            raise ValueError(f"weight_dtype {weight_dtype!r} is not one of {', '.join(WEIGHT_DTYPES)}")
        if kv_mode not in KV_MODES:
            raise ValueError(f"kv_mode {kv_mode!r} is not one of {', '.join(KV_MODES)}")
        if preset != "auto" and preset not in PRESETS:
            raise ValueError(f"preset {preset!r} is not one of auto, {', '.join(PRESETS)}")
        path = resolve_pixart_model(ckpt_name)
        model = load_model(path, preset, WEIGHT_DTYPES[weight_dtype])  # CheckpointError says what the file is
        kv = kv_for_choice(pixart_config_of(model), kv_compression, kv_mode)
        if kv is not None:
            model = with_kv_compression(model, kv)
        return io.NodeOutput(model)


class PixArtSuiteT5Loader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        choices = t5_choices()
        return io.Schema(
            node_id="PixArtSuiteT5Loader",
            display_name="Load T5 Encoder (PixArt)",
            category=CATEGORY,
            description="Loads the T5 v1.1 encoder PixArt uses (any size, read from the weights) as a CLIP that pads "
                        "prompts like the official PixArt-Σ code and passes the attention mask on, so both "
                        "CLIPTextEncode and 'T5 Text Encode (PixArt)' give exact PixArt conditioning.",
            inputs=[
                io.Combo.Input("t5_name", options=choices, default=default_choice(choices, RECOMMENDED_T5),
                               tooltip="T5 weights: a .safetensors file in models/text_encoders (fp16, bf16, fp8 and "
                                       "ComfyUI's scaled fp8 work), a T5 .gguf (Q8_0, Q5_K_M, Q4_K_M ...: stays "
                                       f"quantized in memory; needs pip install gguf), a Hugging Face T5 folder ('{FOLDER_PREFIX}name'), "
                                       f"or a diffusers PixArt pipeline folder ('{DIFFUSERS_PREFIX}name')."),
                io.Combo.Input("dtype", options=list(T5_DTYPES), default="default",
                               tooltip="Compute precision. default: bf16 (fp16 on GPUs without bf16), half the memory "
                                       "of fp32; fp32 is what the official inference uses, at 19 GB for T5-XXL."),
                io.Combo.Input("device", options=list(T5_DEVICES), default="auto",
                               tooltip="auto: ComfyUI's text-encoder device (GPU when there is room, moved off after "
                                       "use); cpu: always on the CPU (saves VRAM, slower); gpu: encode on the GPU."),
            ],
            outputs=[io.Clip.Output(tooltip="A CLIP holding T5: connect it to 'T5 Text Encode (PixArt)' or CLIPTextEncode.")],
        )

    @classmethod
    def validate_inputs(cls, t5_name):
        return queue_check(resolve_t5, t5_name=t5_name)

    @classmethod
    def execute(cls, t5_name, dtype, device) -> io.NodeOutput:
        from .text_encoder import load_t5_clip
        if dtype not in T5_DTYPES:
            raise ValueError(f"dtype {dtype!r} is not one of {', '.join(T5_DTYPES)}")
        if device not in T5_DEVICES:
            raise ValueError(f"device {device!r} is not one of {', '.join(T5_DEVICES)}")
        path = resolve_t5(t5_name)
        log.info("PixArt: loading T5 from %s", path)
        return io.NodeOutput(load_t5_clip(path, dtype, device))
