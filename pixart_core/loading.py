"""Reading, recognising, converting and writing PixArt checkpoints (spec §3).

Layouts: "official" (PixArt-sigma's key names, the model's own) and "diffusers"
(`PixArtTransformer2DModel`). Containers: the official `.pth` (`{'state_dict': ...}`), flat
`.safetensors` in either layout, and diffusers folders (config.json + single or sharded
`diffusion_pytorch_model*.safetensors`, or a pipeline root with `transformer/`).
"""
from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import checks
from .checks import InputError
from .config import PRESETS, PixArtConfig
from .files import config_fields, prepare_output, read_json_object, save_result, torch_load, unreadable
from .model import PixArt

log = logging.getLogger(__name__)

CONFIG_METADATA_KEY = "pixart_config"  # safetensors metadata written by save_checkpoint
IGNORED_KEYS = ("pos_embed",)  # recomputed on every call; the stored one fixes one grid size
DTYPES = {
    "fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp8": torch.float8_e4m3fn, "fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2,
}


class CheckpointError(InputError):
    """A checkpoint that cannot be used, with a message that names the file and what would work."""


# -------------------------------------------------------------------------------------------------
# reading files
# -------------------------------------------------------------------------------------------------

def read_safetensors(path: Path) -> tuple[dict, dict]:
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            return {k: f.get_tensor(k) for k in f.keys()}, meta
    except (SafetensorError, OSError, RuntimeError) as e:
        raise unreadable(path, e, CheckpointError) from None


def read_pth(path: Path) -> dict:
    """The official container, loaded with weights_only=True (a checkpoint must not run code)."""
    obj = torch_load(path, CheckpointError)
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: not a state dict (expected a dict of tensors, or {{'state_dict': ...}})")
    return obj


def read_diffusers_folder(folder: Path) -> tuple[dict, dict]:
    """(state dict, config.json) of a diffusers transformer folder or pipeline root."""
    if (folder / "transformer").is_dir():
        folder = folder / "transformer"
    cfg_path = folder / "config.json"
    if not cfg_path.exists():
        raise CheckpointError(f"{folder}: no config.json - expected a diffusers PixArt transformer folder "
                              "(config.json + diffusion_pytorch_model.safetensors) or a pipeline root with transformer/")
    config = read_diffusers_config(cfg_path)
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    if index.exists():
        files = [folder / s for s in _index_shards(index)]
    else:
        files = sorted(folder.glob("diffusion_pytorch_model*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder}: no diffusion_pytorch_model*.safetensors next to config.json")
    sd = {}
    for f in files:
        if not f.exists():
            raise CheckpointError(f"{folder}: shard {f.name} named in the index is missing")
        sd.update(read_safetensors(f)[0])
    return sd, config


# config.json fields the loader reads, and what each must be
_DIFFUSERS_FIELDS = {
    "num_attention_heads": (checks.whole_number, 1, "e.g. 16"),
    "sample_size": (checks.whole_number, 1, "e.g. 128 for 1024-px models"),
    "interpolation_scale": (checks.real_number, 1e-6, "e.g. 2.0 for 1024-px models"),
    "num_layers": (checks.whole_number, 1, "e.g. 28"),
    "caption_channels": (checks.whole_number, 1, "e.g. 4096"),
}


def read_diffusers_config(cfg_path) -> dict:
    """A diffusers transformer config.json, its fields that the loader uses checked; every message names
    the file and the field."""
    return check_diffusers_config(read_json_object(cfg_path, CheckpointError), cfg_path)


def check_diffusers_config(config: dict, cfg_path) -> dict:
    """The config with the fields the loader reads checked (and JSON numbers like 128.0 made ints)."""
    return {**config, **config_fields(config, cfg_path, _DIFFUSERS_FIELDS, CheckpointError)}


def _index_shards(index: Path) -> list[str]:
    weight_map = read_json_object(index, CheckpointError).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index}: field weight_map must map tensor names to shard file names; "
                              "fix the file or download it again")
    shards = sorted(set(weight_map.values()))
    outside = [s for s in shards if Path(s).name != s or s in ("", ".", "..")]
    if outside:
        raise CheckpointError(f"{index}: field weight_map names {outside[0]!r}, which is not a file in this "
                              "folder; an index only names the shards beside it")
    return shards


@dataclass
class RawCheckpoint:
    path: Path
    state_dict: dict  # official layout
    layout: str  # the layout the file was in
    diffusers_config: dict | None = None
    metadata: dict = field(default_factory=dict)


def read_state_dict(path) -> tuple[Path, dict, dict, dict | None]:
    """(path, state dict as stored, safetensors metadata, diffusers config.json) of a file or folder."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    diffusers_config, metadata = None, {}
    if path.is_dir():
        sd, diffusers_config = read_diffusers_folder(path)
    elif path.suffix == ".safetensors":
        sd, metadata = read_safetensors(path)
    elif path.suffix in (".pth", ".pt", ".bin", ".ckpt"):
        sd = read_pth(path)
    else:
        raise CheckpointError(f"{path}: unsupported file type {path.suffix!r}; use .pth, .safetensors or a diffusers folder")
    return path, sd, metadata, diffusers_config


def read_checkpoint(path) -> RawCheckpoint:
    """Any supported file or folder -> its state dict in the official layout."""
    path, sd, metadata, diffusers_config = read_state_dict(path)
    sd = _strip_prefix(sd)
    layout = detect_layout(sd, path)
    if layout == "diffusers":
        sd = diffusers_to_official(sd, path)
    return RawCheckpoint(path, sd, layout, diffusers_config, metadata)


def _strip_prefix(sd: dict) -> dict:
    """Full checkpoints saved by ComfyUI put the denoiser under `model.diffusion_model.`; the official
    ControlNet files (PixArt-δ) carry a whole PixArt-α under `base_model.` beside the control branch."""
    for prefix in ("model.diffusion_model.", "diffusion_model.", "transformer.", "base_model."):
        if any(k.startswith(prefix) for k in sd):
            inner = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
            if "t_block.1.weight" in inner or "adaln_single.linear.weight" in inner:
                return inner
    return sd


_OTHER_MODELS = [  # (a key that identifies it, what it is, what to do instead)
    ("model.diffusion_model.input_blocks.0.0.weight", "a Stable Diffusion UNet checkpoint (SD1.x/SDXL)",
     "load it with ComfyUI's Load Checkpoint"),
    ("model.diffusion_model.double_blocks.0.img_attn.qkv.weight", "a Flux checkpoint", "use Load Diffusion Model"),
    ("double_blocks.0.img_attn.qkv.weight", "a Flux model", "use Load Diffusion Model"),
    ("input_blocks.0.0.weight", "a Stable Diffusion UNet", "use Load Diffusion Model"),
    ("joint_blocks.0.x_block.attn.qkv.weight", "an SD3 model", "use Load Diffusion Model"),
    ("encoder.block.0.layer.0.SelfAttention.q.weight", "a T5 text encoder", "load it with the T5 loader"),
    ("text_model.encoder.layers.0.self_attn.q_proj.weight", "a CLIP text encoder", "PixArt needs T5-XXL"),
    ("decoder.conv_in.weight", "a VAE", "load it with ComfyUI's Load VAE"),
    ("controlnet.0.after_proj.weight", "a PixArt ControlNet without a base model",
     "load it with 'Load PixArt ControlNet' and the PixArt model it was trained for with this loader"),
    ("controlnet_blocks.0.after_proj.weight", "a PixArt ControlNet (diffusers layout)",
     "load it with 'Load PixArt ControlNet' and the PixArt model it was trained for with this loader"),
    ("first_stage_model.decoder.conv_in.weight", "a checkpoint with a VAE", "load it with ComfyUI's Load Checkpoint"),
]


def detect_layout(sd: dict, path="") -> str:
    if "t_block.1.weight" in sd:
        return "official"
    if "adaln_single.linear.weight" in sd:
        return "diffusers"
    for key, what, instead in _OTHER_MODELS:
        if key in sd:
            raise CheckpointError(f"{path}: this is {what}, not a PixArt checkpoint; {instead}")
    sample = ", ".join(sorted(sd)[:3])
    raise CheckpointError(f"{path}: not a PixArt checkpoint - it has neither `t_block.1.weight` (official layout) nor "
                          f"`adaln_single.linear.weight` (diffusers layout); its first keys are: {sample}")


# -------------------------------------------------------------------------------------------------
# official <-> diffusers (spec §3.3)
# -------------------------------------------------------------------------------------------------

_RENAMES = [  # official prefix, diffusers prefix (block-level ones use {i})
    ("x_embedder.proj.", "pos_embed.proj."),
    ("y_embedder.y_proj.fc1.", "caption_projection.linear_1."),
    ("y_embedder.y_proj.fc2.", "caption_projection.linear_2."),
    ("t_embedder.mlp.0.", "adaln_single.emb.timestep_embedder.linear_1."),
    ("t_embedder.mlp.2.", "adaln_single.emb.timestep_embedder.linear_2."),
    ("csize_embedder.mlp.0.", "adaln_single.emb.resolution_embedder.linear_1."),
    ("csize_embedder.mlp.2.", "adaln_single.emb.resolution_embedder.linear_2."),
    ("ar_embedder.mlp.0.", "adaln_single.emb.aspect_ratio_embedder.linear_1."),
    ("ar_embedder.mlp.2.", "adaln_single.emb.aspect_ratio_embedder.linear_2."),
    ("t_block.1.", "adaln_single.linear."),
    ("final_layer.linear.", "proj_out."),
    ("final_layer.scale_shift_table", "scale_shift_table"),
    ("y_embedder.y_embedding", "y_embedding"),  # not a diffusers weight: kept so round trips are lossless
    ("blocks.{i}.scale_shift_table", "transformer_blocks.{i}.scale_shift_table"),
    ("blocks.{i}.attn.proj.", "transformer_blocks.{i}.attn1.to_out.0."),
    ("blocks.{i}.attn.sr.", "transformer_blocks.{i}.attn1.kv_compress_sr."),  # no diffusers equivalent
    ("blocks.{i}.attn.norm.", "transformer_blocks.{i}.attn1.kv_compress_norm."),
    ("blocks.{i}.cross_attn.q_linear.", "transformer_blocks.{i}.attn2.to_q."),
    ("blocks.{i}.cross_attn.proj.", "transformer_blocks.{i}.attn2.to_out.0."),
    ("blocks.{i}.mlp.fc1.", "transformer_blocks.{i}.ff.net.0.proj."),
    ("blocks.{i}.mlp.fc2.", "transformer_blocks.{i}.ff.net.2."),
]
_FUSED = [  # official fused projection, diffusers parts (split along dim 0)
    ("blocks.{i}.attn.qkv.", ("transformer_blocks.{i}.attn1.to_q.", "transformer_blocks.{i}.attn1.to_k.",
                              "transformer_blocks.{i}.attn1.to_v.")),
    ("blocks.{i}.cross_attn.kv_linear.", ("transformer_blocks.{i}.attn2.to_k.", "transformer_blocks.{i}.attn2.to_v.")),
]


def _pattern(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(re.escape("{i}"), r"(\d+)"))


def _rename(key, renames):
    for src, dst in renames:
        m = _pattern(src).match(key)
        if m:
            return dst.replace("{i}", m.group(1)) + key[m.end():] if "{i}" in src else dst + key[m.end():]
    return None


def official_to_diffusers(sd: dict, path="") -> dict:
    out, unknown = {}, []
    for key, value in sd.items():
        if key in IGNORED_KEYS:
            continue
        if ".q_norm." in key or ".k_norm." in key:
            raise CheckpointError(f"{path}: this model uses full-width qk-norm ({key}), which diffusers' "
                                  "PixArtTransformer2DModel cannot represent; keep it in the official layout")
        new = _rename(key, _RENAMES)
        if new is None:
            for src, parts in _FUSED:
                m = _pattern(src).match(key)
                if m:
                    if value.ndim == 0 or value.shape[0] % len(parts):
                        raise CheckpointError(f"{path}: {key} has shape {tuple(value.shape)}, which does not split "
                                              f"into {len(parts)} equal projections - the file is corrupt")
                    for part, chunk in zip(parts, value.chunk(len(parts), dim=0)):
                        out[part.replace("{i}", m.group(1)) + key[m.end():]] = chunk.clone()
                    break
            else:
                unknown.append(key)
            continue
        out[new] = value
    if unknown:
        raise CheckpointError(f"{path}: {len(unknown)} keys have no diffusers equivalent, e.g. {unknown[:5]}")
    return out


def diffusers_to_official(sd: dict, path="") -> dict:
    inverse = [(dst, src) for src, dst in _RENAMES]
    out, unknown, parts_seen = {}, [], {}
    for key, value in sd.items():
        if key in ("pos_embed.pos_embed",):
            continue
        new = _rename(key, inverse)
        if new is not None:
            out[new] = value
            continue
        for src, parts in _FUSED:
            for j, part in enumerate(parts):
                m = _pattern(part).match(key)
                if m:
                    fused = src.replace("{i}", m.group(1)) + key[m.end():]
                    parts_seen.setdefault(fused, [None] * len(parts))[j] = value
                    break
            else:
                continue
            break
        else:
            unknown.append(key)
    for fused, pieces in parts_seen.items():
        if any(p is None for p in pieces):
            raise CheckpointError(f"{path}: incomplete attention projection for {fused} (have {sum(p is not None for p in pieces)}"
                                  f" of {len(pieces)} parts) - the file is missing keys")
        if pieces[0].ndim == 0 or len({(p.ndim, tuple(p.shape[1:])) for p in pieces}) > 1:
            raise CheckpointError(f"{path}: the parts of {fused} have shapes {[tuple(p.shape) for p in pieces]}, "
                                  "which do not fit together - the file is corrupt")
        out[fused] = torch.cat(pieces, dim=0)
    if unknown:
        raise CheckpointError(f"{path}: {len(unknown)} keys are not part of a diffusers PixArt transformer, e.g. {sorted(unknown)[:5]}")
    return out


def diffusers_config(config: PixArtConfig) -> dict:
    """config.json for `PixArtTransformer2DModel` (spec §3.2; both traps set explicitly)."""
    return {
        "_class_name": "PixArtTransformer2DModel",
        "sample_size": config.sample_size, "num_layers": config.depth, "num_attention_heads": config.num_heads,
        "attention_head_dim": config.head_dim, "in_channels": config.in_channels, "out_channels": config.out_channels,
        "patch_size": config.patch_size, "attention_bias": True, "cross_attention_dim": config.hidden_size,
        "activation_fn": "gelu-approximate", "num_embeds_ada_norm": 1000, "norm_type": "ada_norm_single",
        "norm_elementwise_affine": False, "norm_eps": 1e-6, "caption_channels": config.caption_channels,
        "interpolation_scale": config.pe_interpolation, "use_additional_conditions": config.micro_condition,
        "dropout": 0.0, "upcast_attention": False, "norm_num_groups": 32,
    }


# -------------------------------------------------------------------------------------------------
# configuration from weights
# -------------------------------------------------------------------------------------------------

def _size_from_name(path) -> int | None:
    name = Path(path).name.lower()
    for pattern, size in ((r"(2k|2048)", 256), (r"(1024)", 128), (r"(512)", 64), (r"(256)", 32)):
        if re.search(pattern, name):
            return size
    return None


def default_num_heads(hidden_size: int) -> int:
    """Heads leave no trace in the weights: 72-wide heads as every released model, else 16-wide."""
    return hidden_size // 72 if hidden_size % 72 == 0 else max(1, hidden_size // 16)


def detect_config(raw: RawCheckpoint, **overrides) -> tuple[PixArtConfig, dict]:
    """Everything the weights (and a diffusers config or our metadata) say, plus explicit overrides.

    Returns the config and a dict telling, per field, where its value came from.
    """
    sd, dc = raw.state_dict, raw.diffusers_config or {}
    src = {}
    if CONFIG_METADATA_KEY in raw.metadata:
        try:
            base = PixArtConfig.from_dict(json.loads(raw.metadata[CONFIG_METADATA_KEY]))
        except (ValueError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{raw.path}: its metadata {CONFIG_METADATA_KEY!r} is not a valid PixArt "
                                  f"configuration ({e}); convert the file again or remove that metadata") from None
        values = base.to_dict()
        src = {k: "file metadata" for k in values}
    else:
        values = {}

    def put(name, value, origin):
        if value is not None and name not in values:
            values[name], src[name] = value, origin

    def shape(key, ndim):
        if key not in sd:
            raise CheckpointError(f"{raw.path}: missing key {key} - the file is incomplete or not a PixArt model")
        v = sd[key]
        if v.ndim != ndim or 0 in v.shape:
            raise CheckpointError(f"{raw.path}: {key} has shape {tuple(v.shape)}, but in a PixArt model it is a "
                                  f"non-empty {ndim}-D tensor - the file is corrupt or not a PixArt model")
        return v.shape

    D, c_in, p, _ = shape("x_embedder.proj.weight", 4)  # (D, C_in, p, p)
    put("hidden_size", D, "weights")
    put("in_channels", c_in, "weights")
    put("patch_size", p, "weights")
    put("caption_channels", shape("y_embedder.y_proj.fc1.weight", 2)[1], "weights")
    put("out_channels", shape("final_layer.linear.weight", 2)[0] // (p * p), "weights")
    put("mlp_ratio", shape("blocks.0.mlp.fc1.weight", 2)[0] / D, "weights")
    blocks = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d{1,6})\.", k))}
    depth = max(blocks) + 1  # blocks.0 exists (checked above)
    if len(blocks) != depth:  # also what keeps a forged index like blocks.999999 from building a huge model
        gap = min(set(range(depth)) - blocks)
        raise CheckpointError(f"{raw.path}: has blocks up to {depth - 1} but no block {gap} - the file is "
                              "incomplete or corrupt; download it again")
    put("depth", depth, "weights")
    if dc.get("num_attention_heads"):
        put("num_heads", dc["num_attention_heads"], "diffusers config")
    D = values["hidden_size"]
    put("num_heads", default_num_heads(D), "head width 72 (released models) or 16")
    micro = "csize_embedder.mlp.0.weight" in sd
    put("micro_condition", micro, "weights")
    put("qk_norm", "blocks.0.attn.q_norm.weight" in sd, "weights")
    kv_layers = sorted(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d{1,6})\.attn\.sr\.weight$", k)))
    if kv_layers:
        put("kv_compress_layers", tuple(kv_layers), "weights")
        put("kv_compress_ratio", shape(f"blocks.{kv_layers[0]}.attn.sr.weight", 4)[-1], "weights")
        put("kv_compress_mode", "conv", "weights")
    if "y_embedder.y_embedding" in sd:
        put("model_max_length", shape("y_embedder.y_embedding", 2)[0], "weights (y_embedding)")
    elif micro:
        put("model_max_length", 120, "micro-conditioning means PixArt-α")
    alpha = micro or values.get("model_max_length") == 120
    put("family", "alpha" if alpha else "sigma", "caption length / micro-conditioning")
    if "pos_embed" in sd:
        side = math.isqrt(shape("pos_embed", 3)[1]) * values["patch_size"]
        put("sample_size", side, "weights (pos_embed)")
    if dc.get("sample_size"):
        put("sample_size", dc["sample_size"], "diffusers config")
    if dc.get("interpolation_scale"):
        put("pe_interpolation", float(dc["interpolation_scale"]), "diffusers config")
    put("sample_size", _size_from_name(raw.path), "file name")
    if "sample_size" not in values:
        put("sample_size", 128, "default (1024 px): nothing in the file says otherwise")
    s = values["sample_size"]
    if values["family"] == "alpha" and s == 32:
        put("pe_interpolation", 1.0, "PixArt-alpha config for 256 px")
    put("pe_interpolation", s / 64, "sample_size / 64 (released models)")
    put("resolution", s * 8, "sample_size")
    for k, v in overrides.items():
        if v is not None:
            values[k], src[k] = v, "override"
    try:
        return PixArtConfig.from_dict(values), src
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{raw.path}: inconsistent configuration: {e}") from None


def config_from_preset(name: str, raw: RawCheckpoint, **overrides) -> PixArtConfig:
    if name not in PRESETS:
        raise CheckpointError(f"unknown preset {name!r}; choose auto or one of {', '.join(PRESETS)}")
    detected, _ = detect_config(raw)
    cfg = PRESETS[name].replace(depth=detected.depth)
    return cfg.replace(**{k: v for k, v in overrides.items() if v is not None})


# -------------------------------------------------------------------------------------------------
# building the model
# -------------------------------------------------------------------------------------------------

def check_state_dict(sd: dict, model: torch.nn.Module, path, what="the detected configuration") -> list[str]:
    """Refuse missing/unexpected keys and shape mismatches; returns KV-compression keys to initialise."""
    expected = model.state_dict()
    given = {k for k in sd if k not in IGNORED_KEYS}
    missing = sorted(set(expected) - given)
    kv_missing = [k for k in missing if re.search(r"\.attn\.(sr|norm)\.", k)]
    missing = [k for k in missing if k not in kv_missing and k != "y_embedder.y_embedding"]
    unexpected = sorted(given - set(expected))
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys, e.g. {missing[:4]}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys, e.g. {unexpected[:4]}")
    for k in sorted(given & set(expected)):
        if tuple(sd[k].shape) != tuple(expected[k].shape):
            problems.append(f"{k} has shape {tuple(sd[k].shape)} but the configuration needs {tuple(expected[k].shape)}")
            break
    if problems:
        raise CheckpointError(f"{path}: does not match {what}: " + "; ".join(problems)
                              + " - pick the matching preset or 'auto'")
    for k, v in sd.items():
        if v.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2,
                           torch.float64):
            raise CheckpointError(f"{path}: tensor {k} has dtype {v.dtype}, which is not a float type this loader supports")
    return kv_missing


def build_model(config: PixArtConfig, sd: dict, path="", dtype=None, compute_dtype=None, device="cpu",
                operations=None, what="the detected configuration") -> PixArt:
    """Model on the meta device, then the tensors assigned (no second copy of the weights)."""
    compute_dtype = compute_dtype or (dtype if dtype in (torch.float32, torch.float16, torch.bfloat16) else torch.float32)
    model = PixArt(config, dtype=compute_dtype, device="meta", operations=operations)
    kv_missing = check_state_dict(sd, model, path, what)
    state = {}
    for k, v in sd.items():
        if k in IGNORED_KEYS:
            continue
        target = dtype or v.dtype
        if target.itemsize == 1 and not (k.endswith(".weight") and v.ndim >= 2):
            target = compute_dtype  # fp8 only for matmul weights: vectors, tables and the null caption stay precise
        state[k] = v.to(device=device, dtype=target)
    if "y_embedder.y_embedding" not in state:
        state["y_embedder.y_embedding"] = torch.zeros(config.model_max_length, config.caption_channels,
                                                      dtype=compute_dtype, device=device)
    for k in kv_missing:
        state[k] = torch.empty(model.state_dict()[k].shape, dtype=compute_dtype, device=device)
    model.load_state_dict(state, strict=True, assign=True)
    model.compute_dtype = compute_dtype
    if kv_missing:
        for block in model.blocks:
            if block.attn.sr is not None:
                block.attn.reset_kv_compress_weights()
        log.info("%s: no KV-compression weights in the file; using the average initialisation", path)
    return model


@dataclass
class LoadedPixArt:
    model: PixArt
    config: PixArtConfig
    sources: dict
    layout: str
    path: Path
    has_null_embedding: bool


def load_pixart(path, preset: str | None = None, dtype=None, compute_dtype=None, device="cpu", operations=None,
                **overrides) -> LoadedPixArt:
    """Load any supported PixArt checkpoint. preset None/'auto' detects the configuration."""
    device = checks.usable_device(device)
    raw = read_checkpoint(path)
    if preset in (None, "auto"):
        config, sources = detect_config(raw, **overrides)
    else:
        config, sources = config_from_preset(preset, raw, **overrides), {"*": f"preset {preset}"}
    if isinstance(dtype, str):
        dtype = parse_dtype(dtype)
    what = "the detected configuration" if preset in (None, "auto") else f"preset {preset}"
    model = build_model(config, raw.state_dict, raw.path, dtype, compute_dtype, device, operations, what)
    return LoadedPixArt(model, config, sources, raw.layout, raw.path, "y_embedder.y_embedding" in raw.state_dict)


def parse_dtype(name: str | None):
    if name in (None, "default", "auto"):
        return None
    try:
        return DTYPES[name]
    except KeyError:
        raise CheckpointError(f"unknown dtype {name!r}; use one of {', '.join(sorted(DTYPES))}") from None


# -------------------------------------------------------------------------------------------------
# writing
# -------------------------------------------------------------------------------------------------

DIFFUSERS_FILES = ("config.json", "diffusion_pytorch_model.safetensors")  # what a folder output holds


def check_output(out, layout: str = "official", inputs=()) -> Path:
    """Refuse a checkpoint destination that cannot work, before any work: see files.prepare_output."""
    out = Path(out)
    if out.suffix not in ("", ".pth", ".safetensors"):
        raise CheckpointError(f"{out}: unknown output type {out.suffix!r}; use .pth, .safetensors or a folder name")
    if out.suffix == ".pth" and layout != "official":
        raise CheckpointError(f"{out}: .pth files are written in the official layout only")
    return prepare_output(out, inputs, None if out.suffix else DIFFUSERS_FILES)


def write_state_dict(sd: dict, out, layout: str, to_diffusers, folder_config: dict, metadata: dict | None = None,
                     inputs=()) -> Path:
    """Write an official-layout state dict as `.pth` (official container), `.safetensors` (official or
    diffusers layout, via `to_diffusers(sd, path)`) or a diffusers folder (a path without a suffix:
    `folder_config` as config.json + diffusion_pytorch_model.safetensors). Each file is written
    atomically; `inputs` (files being read) are never overwritten."""
    out = check_output(out, layout, inputs)
    sd = {k: v.contiguous() for k, v in sd.items()}
    if out.suffix == ".pth":
        save_result(out, lambda tmp: torch.save({"state_dict": sd}, tmp), "checkpoint", rescue=False)
        return out
    from safetensors.torch import save_file
    if out.suffix == ".safetensors":
        tensors = to_diffusers(sd, out) if layout == "diffusers" else sd
        save_result(out, lambda tmp: save_file(tensors, str(tmp), metadata=metadata), "checkpoint", rescue=False)
        return out
    tensors = to_diffusers(sd, out)
    config_json = json.dumps(folder_config, indent=2)
    save_result(out / DIFFUSERS_FILES[0], lambda tmp: tmp.write_text(config_json), "config", rescue=False)
    save_result(out / DIFFUSERS_FILES[1], lambda tmp: save_file(tensors, str(tmp), metadata=metadata), "checkpoint",
                rescue=False)
    return out


def save_checkpoint(sd: dict, config: PixArtConfig, out, layout: str = "official", inputs=()) -> Path:
    """A PixArt model's state dict (official layout) in any container; see write_state_dict."""
    return write_state_dict({k: v for k, v in sd.items() if k not in IGNORED_KEYS}, out, layout, official_to_diffusers,
                            diffusers_config(config), {CONFIG_METADATA_KEY: json.dumps(config.to_dict())}, inputs)


def convert(src, out, layout: str = "official", **overrides) -> Path:
    check_output(out, layout, inputs=[src])  # before reading: a refused output costs nothing
    raw = read_checkpoint(src)
    config, _ = detect_config(raw, **overrides)
    return save_checkpoint(raw.state_dict, config, out, layout, inputs=[src])


def describe(path, **overrides) -> str:
    """Human-readable summary of what a checkpoint contains (the `inspect` command)."""
    raw = read_checkpoint(path)
    config, sources = detect_config(raw, **overrides)
    params = sum(v.numel() for k, v in raw.state_dict.items() if k not in IGNORED_KEYS and k != "y_embedder.y_embedding")
    dtypes = sorted({str(v.dtype).replace("torch.", "") for v in raw.state_dict.values()})
    lines = [f"file:        {raw.path}", f"layout:      {raw.layout}", f"parameters:  {params:,}",
             f"dtypes:      {', '.join(dtypes)}",
             f"null caption (y_embedding): {'yes' if 'y_embedder.y_embedding' in raw.state_dict else 'no'}"]
    for k, v in config.to_dict().items():
        lines.append(f"{k + ':':<22} {v!s:<12} ({sources.get(k, 'default')})")
    return "\n".join(lines)
