"""PixArt-δ ControlNet-Transformer ("ControlNet-Half", ../shared/pixart_spec.md §12) for PixArt-Σ and -α.

The control branch is N trainable copies of base blocks 0..N-1 plus zero-initialised D×D linears:
`before_proj` on copy 0, `after_proj` on every copy. The hint (a VAE latent of the control image, in
the base model's latent space) is embedded by the base model's own patch embedder and position
embedding. Base block 0 runs first; copy 0 takes `h0 + before_proj(hint)`, copy i takes copy i-1's
output, and `strength · after_proj(copy i)` is added to the input of base block i+1. It runs inside
the base model's block loop (`PixArt.run_blocks`) as a `BlockHook`, so copy i sees exactly what
block i sees (captions, mask, modulation, KV compression of layer i).

Files (module names = the official keys, so official files load without renaming):
  official  `controlnet.{i}.copied_block.*`, `controlnet.0.before_proj.*`, `controlnet.{i}.after_proj.*`,
            in the released `.pth` beside a whole PixArt-α under `base_model.*` (ignored here; the
            model loader takes that part)
  diffusers `controlnet_blocks.{i}.transformer_block.{attn1,attn2,ff,scale_shift_table}`,
            `controlnet_blocks.0.before_proj`, `controlnet_blocks.{i}.after_proj` (+ config.json
            `num_layers`): the diffusers research project and SimpleTuner's Σ ControlNets
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .checks import InputError
from .config import PixArtConfig
from .files import read_json_object
from .loading import (CheckpointError, default_num_heads, diffusers_to_official, official_to_diffusers,
                      read_state_dict, write_state_dict, check_output)
from .model import BlockInputs, PixArt, PixArtBlock
from .ops import CastOps

DIFFUSERS_CLASS = "PixArtControlNetAdapterModel"  # the diffusers research project's class name

_OFFICIAL = re.compile(r"^controlnet\.(\d+)\.(copied_block|before_proj|after_proj)\.(.+)$")
_DIFFUSERS = re.compile(r"^controlnet_blocks\.(\d+)\.(transformer_block|before_proj|after_proj)\.(.+)$")

_STOCK = "it steers its own model family through ComfyUI's Load ControlNet Model"
_OTHER_CONTROLNETS = [  # (a key that identifies it, what it is, what to do with it)
    ("input_hint_block.0.weight", "an SD1.x/SDXL ControlNet", _STOCK),
    ("controlnet_cond_embedding.conv_in.weight", "an SD1.x/SDXL ControlNet (diffusers layout)", _STOCK),
    ("lora_controlnet", "an SDXL Control-LoRA", _STOCK),
    ("controlnet_x_embedder.weight", "a Flux ControlNet", _STOCK),
    ("pos_embed_input.proj.weight", "an SD3 ControlNet", _STOCK),
    ("after_proj_list.0.weight", "a HunyuanDiT ControlNet", _STOCK),
    ("t_block.1.weight", "a PixArt model", "load it with 'Load PixArt-Σ Model'"),
    ("adaln_single.linear.weight", "a PixArt model (diffusers layout)", "load it with 'Load PixArt-Σ Model'"),
]
_WANTED = "a PixArt ControlNet such as PixArt-XL-2-1024-ControlNet.pth or a diffusers-layout PixArt ControlNet"


#################################################################################
#                                   Modules                                     #
#################################################################################

class ControlBlock(nn.Module):
    """Copy i of base block i with its zero-initialised projections (official ControlT2IDitBlockHalf)."""

    def __init__(self, config: PixArtConfig, index: int, kv_compress_ratio=1, dtype=None, device=None,
                 operations=CastOps):
        super().__init__()
        D = config.hidden_size
        self.copied_block = PixArtBlock(config, kv_compress_ratio, dtype, device, operations)
        if index == 0:
            self.before_proj = operations.Linear(D, D, dtype=dtype, device=device)
        self.after_proj = operations.Linear(D, D, dtype=dtype, device=device)


class PixArtControlNet(nn.Module):
    """The control branch. config: the copies' geometry (hidden_size, num_heads, mlp_ratio, qk_norm)
    with depth = the number of copies N."""

    def __init__(self, config: PixArtConfig, dtype=None, device=None, operations=None):
        super().__init__()
        ops = operations or CastOps
        self.config = config
        ratios = [config.kv_compress_ratio if i in config.kv_compress_layers else 1 for i in range(config.depth)]
        self.controlnet = nn.ModuleList(ControlBlock(config, i, r, dtype, device, ops) for i, r in enumerate(ratios))

    @property
    def num_blocks(self) -> int:
        return len(self.controlnet)

    def check_base(self, base: PixArtConfig, name="the ControlNet") -> None:
        """One-sentence error when this branch cannot steer `base`; adopts the base's head count,
        which the weights do not record (the copies were made from the base's blocks)."""
        cn = self.config
        if cn.hidden_size != base.hidden_size:
            raise ValueError(f"{name} is {cn.hidden_size} wide but the PixArt model is {base.hidden_size} wide "
                             f"(PixArt-Σ and -α XL are 1152); use a ControlNet trained for this model")
        if cn.mlp_hidden != base.mlp_hidden or cn.qk_norm != base.qk_norm:
            raise ValueError(f"{name}'s blocks have another shape than the PixArt model's (MLP {cn.mlp_hidden} vs "
                             f"{base.mlp_hidden} wide, qk-norm {cn.qk_norm} vs {base.qk_norm}); use a ControlNet "
                             f"trained for this model")
        if self.num_blocks >= base.depth:
            raise ValueError(f"{name} has {self.num_blocks} copied blocks but the PixArt model only {base.depth}; "
                             f"use a ControlNet trained for this model")
        if cn.num_heads != base.num_heads:
            for block in self.controlnet:
                block.copied_block.attn.num_heads = block.copied_block.cross_attn.num_heads = base.num_heads
            self.config = cn.replace(num_heads=base.num_heads)

    def embed_hint(self, base: PixArt, hint: torch.Tensor, inputs: BlockInputs) -> torch.Tensor:
        """(b, C_in, H, W) hint latent -> (B, N, D) tokens through the base model's own embedder."""
        h, w = inputs.hw
        p = base.config.patch_size
        B = inputs.t0.shape[0]
        if hint.ndim != 4 or hint.shape[1] != base.config.in_channels:
            raise ValueError(f"the ControlNet hint is a {tuple(hint.shape)} tensor but this PixArt model takes "
                             f"{base.config.in_channels}-channel latents; encode the hint image with the model's VAE")
        if tuple(hint.shape[-2:]) != (h * p, w * p):
            raise ValueError(f"the ControlNet hint latent is {hint.shape[-2]}x{hint.shape[-1]} but the latent being "
                             f"sampled is {h * p}x{w * p}; resize the hint to the image size")
        if hint.shape[0] != B:
            if B % hint.shape[0]:
                raise ValueError(f"the ControlNet hint batch {hint.shape[0]} does not divide the latent batch {B}")
            hint = hint.repeat(B // hint.shape[0], 1, 1, 1)
        return base.embed(hint.to(inputs.y.device), inputs.y.dtype)  # (B, N, D)


@dataclass
class ControlInput:
    """One ControlNet applied in a forward call: `PixArt.forward(..., controls=[...])`."""
    net: PixArtControlNet
    hint: torch.Tensor  # (b, C_in, H, W) latent of the control image, in the model's latent space
    strength: float = 1.0

    def start(self, base: PixArt, inputs: BlockInputs) -> "ControlBranch | None":
        if self.strength == 0:  # exactly the plain model
            return None
        self.net.check_base(base.config)
        return ControlBranch(self.net, self.net.embed_hint(base, self.hint, inputs), self.strength)


class ControlBranch:
    """The branch's state during one forward: the hint tokens, then copy i's output (a BlockHook)."""

    def __init__(self, net: PixArtControlNet, hint_tokens: torch.Tensor, strength: float):
        self.net, self.state, self.strength = net, hint_tokens, float(strength)

    def after_block(self, i: int, tokens: torch.Tensor, inputs: BlockInputs) -> torch.Tensor | None:
        if i >= self.net.num_blocks:
            return None
        block = self.net.controlnet[i]
        # copy 0 reads the base stream after base block 0; the later copies only the branch's own state
        c = tokens + block.before_proj(self.state) if i == 0 else self.state  # (B, N, D)
        self.state = inputs.run(block.copied_block, i, c)  # updated in place without autograd: c is ours
        out = block.after_proj(self.state)  # (B, N, D)
        return out if self.strength == 1 else out * self.strength


#################################################################################
#                                    Files                                      #
#################################################################################

@dataclass
class RawControlNet:
    path: Path
    state_dict: dict  # official keys (controlnet.{i}...), the control branch only
    layout: str  # "official" or "diffusers"
    config: PixArtConfig  # the copies' geometry, depth = number of copies
    base_family: str | None = None  # "alpha" when the file carries its PixArt-α base model, else unknown
    has_base_model: bool = False


def _convert_keys(sd: dict, pattern: re.Pattern, copy_in: str, blocks_in: str, blocks_fn, prefix_out: str,
                  copy_out: str, path) -> dict:
    """Rename one layout's ControlNet keys into the other's. The copied blocks go through the base
    model's block mapping (as `{blocks_in}.{i}.*`), so both layouts stay one mapping."""
    out, blocks, unknown = {}, {}, []
    for key, value in sd.items():
        m = pattern.match(key)
        if m is None:
            unknown.append(key)
        elif m.group(2) == copy_in:
            blocks[f"{blocks_in}.{m.group(1)}.{m.group(3)}"] = value
        else:  # before_proj / after_proj: same names in both layouts
            out[f"{prefix_out}.{m.group(1)}.{m.group(2)}.{m.group(3)}"] = value
    if unknown:
        raise CheckpointError(f"{path}: {len(unknown)} keys are not part of a PixArt ControlNet, "
                              f"e.g. {sorted(unknown)[:4]}")
    for key, value in blocks_fn(blocks, path).items():
        _, i, rest = key.split(".", 2)  # "blocks.{i}.rest" or "transformer_blocks.{i}.rest"
        out[f"{prefix_out}.{i}.{copy_out}.{rest}"] = value
    return out


def diffusers_to_official_controlnet(sd: dict, path="") -> dict:
    return _convert_keys(sd, _DIFFUSERS, "transformer_block", "transformer_blocks", diffusers_to_official,
                         "controlnet", "copied_block", path)


def official_to_diffusers_controlnet(sd: dict, path="") -> dict:
    return _convert_keys(sd, _OFFICIAL, "copied_block", "blocks", official_to_diffusers,
                         "controlnet_blocks", "transformer_block", path)


def _foreign(sd: dict) -> tuple[str, str] | None:
    for key, what, instead in _OTHER_CONTROLNETS:
        if key in sd or any(k.endswith("." + key) for k in sd):
            return what, instead
    return None


def _config_from_weights(sd: dict, path, diffusers_config: dict | None) -> PixArtConfig:
    n = 1 + max(int(_OFFICIAL.match(k).group(1)) for k in sd)
    for i in range(n):
        for key in (f"controlnet.{i}.after_proj.weight", f"controlnet.{i}.copied_block.attn.qkv.weight"):
            if key not in sd:
                raise CheckpointError(f"{path}: missing key {key} - the ControlNet file is incomplete")
    if "controlnet.0.before_proj.weight" not in sd:
        raise CheckpointError(f"{path}: missing key controlnet.0.before_proj.weight - the ControlNet file is "
                              "incomplete")
    D = sd["controlnet.0.after_proj.weight"].shape[0]
    heads = (diffusers_config or {}).get("num_attention_heads") or default_num_heads(D)
    kv_layers = sorted(i for i in range(n) if f"controlnet.{i}.copied_block.attn.sr.weight" in sd)
    ratio = sd[f"controlnet.{kv_layers[0]}.copied_block.attn.sr.weight"].shape[-1] if kv_layers else 2
    try:
        return PixArtConfig(depth=n, hidden_size=D, num_heads=heads,
                            mlp_ratio=sd["controlnet.0.copied_block.mlp.fc1.weight"].shape[0] / D,
                            qk_norm="controlnet.0.copied_block.attn.q_norm.weight" in sd,
                            kv_compress_layers=tuple(kv_layers), kv_compress_ratio=ratio)
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{path}: not a complete PixArt ControlNet ({e})") from None


def read_controlnet(path) -> RawControlNet:
    """Any PixArt ControlNet file or folder -> its control branch in the official layout."""
    path = Path(path)
    if path.is_dir() and (path / "controlnet" / "config.json").exists():  # a pipeline root
        path = path / "controlnet"
    path, sd, _, diffusers_config = read_state_dict(path)
    base = {k[len("base_model."):]: v for k, v in sd.items() if k.startswith("base_model.")}
    sd = {k: v for k, v in sd.items() if not k.startswith("base_model.")}
    if any(k.startswith("controlnet.controlnet_blocks.") for k in sd):  # a saved PixArtControlNetTransformerModel
        sd = {k[len("controlnet."):]: v for k, v in sd.items() if k.startswith("controlnet.controlnet_blocks.")}
    if any(_DIFFUSERS.match(k) for k in sd):
        layout, sd = "diffusers", diffusers_to_official_controlnet(sd, path)
    elif any(_OFFICIAL.match(k) for k in sd):
        layout = "official"
        unknown = sorted(k for k in sd if not _OFFICIAL.match(k))
        if unknown:
            raise CheckpointError(f"{path}: {len(unknown)} keys are not part of a PixArt ControlNet, "
                                  f"e.g. {unknown[:4]}")
    else:
        found = _foreign(sd) or (("a PixArt model without a control branch", "load it with 'Load PixArt-Σ Model'")
                                 if base else None)
        if found:
            raise CheckpointError(f"{path}: this is {found[0]}, not a PixArt ControlNet ({found[1]}); "
                                  f"this loader needs {_WANTED}")
        raise CheckpointError(f"{path}: not a PixArt ControlNet - it has neither controlnet.N.copied_block (official) "
                              f"nor controlnet_blocks.N.transformer_block (diffusers) keys (its first keys are "
                              f"{', '.join(sorted(sd)[:3])}); this loader needs {_WANTED}")
    config = _config_from_weights(sd, path, diffusers_config)
    alpha = "csize_embedder.mlp.0.weight" in base or (
        "y_embedder.y_embedding" in base and base["y_embedder.y_embedding"].shape[0] == 120)
    return RawControlNet(path, sd, layout, config, "alpha" if alpha else None, bool(base))


def build_controlnet(raw: RawControlNet, dtype=None, device="cpu", operations=None) -> PixArtControlNet:
    """The branch on the meta device, then the file's tensors assigned (converted to `dtype` if given)."""
    net = PixArtControlNet(raw.config, dtype=dtype or torch.float32, device="meta", operations=operations)
    expected = net.state_dict()
    for k in sorted(set(expected) - set(raw.state_dict)):
        raise CheckpointError(f"{raw.path}: missing key {k} - the ControlNet file is incomplete")
    for k in sorted(set(raw.state_dict) - set(expected)):
        raise CheckpointError(f"{raw.path}: unexpected key {k} - not a PixArt ControlNet of the detected shape")
    for k, v in raw.state_dict.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise CheckpointError(f"{raw.path}: {k} has shape {tuple(v.shape)} but the other weights need "
                                  f"{tuple(expected[k].shape)} - the file is inconsistent")
    state = {k: v.to(device=device, dtype=dtype or v.dtype) for k, v in raw.state_dict.items()}
    net.load_state_dict(state, strict=True, assign=True)
    return net.eval()


def load_controlnet(path, dtype=None, device="cpu", operations=None) -> PixArtControlNet:
    return build_controlnet(read_controlnet(path), dtype, device, operations)


def save_controlnet(sd: dict, out, layout: str = "official", inputs=()) -> Path:
    """Write a control branch (official keys): `.pth` (official container), `.safetensors` in either
    layout, or a diffusers folder (a path without a suffix: config.json + diffusion_pytorch_model.safetensors)."""
    n = 1 + max(int(_OFFICIAL.match(k).group(1)) for k in sd)
    return write_state_dict(sd, out, layout, official_to_diffusers_controlnet,
                            {"_class_name": DIFFUSERS_CLASS, "num_layers": n}, inputs=inputs)


def convert_controlnet(src, out, layout: str = "official") -> Path:
    check_output(out, layout, inputs=[src])  # before reading: a refused output costs nothing
    return save_controlnet(read_controlnet(src).state_dict, out, layout, inputs=[src])


def file_parts(path) -> set[str]:
    """{"model"}, {"controlnet"} or both (the official ControlNet .pth), from the names of the keys only."""
    path = Path(path)
    if path.is_dir():
        config = path / "config.json"
        try:
            name = str(read_json_object(config).get("_class_name", "")) if config.exists() else ""
        except InputError:  # the real reader gives the error message
            name = ""
        return {"controlnet"} if (path / "controlnet").is_dir() or "ControlNet" in name else {"model"}
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        try:
            with safe_open(str(path), framework="pt") as f:
                keys = list(f.keys())
        except Exception:  # noqa: BLE001 - the real reader gives the error message
            return {"model"}
    else:
        try:
            keys = list(read_state_dict(path)[1])
        except CheckpointError:
            return {"model"}
    parts = {"model"} if any(k.endswith(("t_block.1.weight", "adaln_single.linear.weight")) for k in keys) else set()
    if any(_OFFICIAL.match(k) or _DIFFUSERS.match(k) or k.startswith("controlnet.controlnet_blocks.") for k in keys):
        parts.add("controlnet")
    return parts or {"model"}


def describe_controlnet(path) -> str:
    """Human-readable summary of a ControlNet file (the `inspect` command)."""
    raw = read_controlnet(path)
    c = raw.config
    params = sum(v.numel() for v in raw.state_dict.values())
    dtypes = sorted({str(v.dtype).replace("torch.", "") for v in raw.state_dict.values()})
    made_for = {"alpha": "PixArt-α (its base model is in the file: the model loader reads that part; "
                         "hint: SD1.5-VAE latents)"}.get(raw.base_family, "not recorded (use the base model it was "
                                                                              "trained on; Σ: SDXL-VAE hint latents)")
    lines = [f"file:        {raw.path}", "kind:        PixArt ControlNet (ControlNet-Half)",
             f"layout:      {raw.layout}", f"parameters:  {params:,} (control branch)",
             f"dtypes:      {', '.join(dtypes)}",
             f"copied blocks: {raw.config.depth} (added after base blocks 0-{raw.config.depth - 1})",
             f"hidden_size: {c.hidden_size}",
             f"num_heads:   {c.num_heads} (taken from the base model when they differ)",
             f"mlp_ratio:   {c.mlp_ratio}", f"base model:  {'yes' if raw.has_base_model else 'no'}",
             f"made for:    {made_for}"]
    return "\n".join(lines)
