"""PixArt LoRA / LyCORIS files from every trainer, rewritten to one form: diffusers/PEFT names with alpha.

Formats read (the module part of each key; suffixes are LoRA `lora_A/lora_B`, `lora_down/lora_up`,
`lora.down/lora.up`, LoHa `hada_*`, LoKr `lokr_*`, plus `alpha`, `dora_scale`, `diff`, `diff_b`):
- diffusers / PEFT: `transformer.transformer_blocks.N.attn1.to_q`, `base_model.model.…`,
  `unet.base_model.model.…`; PEFT files without alpha take it from `adapter_config.json` beside
  the file (`lora_alpha`, `r`, `alpha_pattern`, `rank_pattern`, `use_rslora`) or from diffusers'
  `lora_adapter_metadata` in the safetensors header;
- SimpleTuner LyCORIS: `lycoris_transformer_blocks_N_attn1_to_q` (LoRA, LoHa, LoKr);
- OneTrainer legacy: `lora_transformer_transformer_blocks_N_attn1_to_q`, T5 `lora_te_encoder_block_N_…`
  (and its dotted `lora_transformer.` / `lora_te.` form);
- OMI / newer OneTrainer: native names with split indices, `transformer.blocks.N.attn.qkv.0` (q),
  `cross_attn.kv_linear.1` (v), T5 under `t5.`;
- native names (ComfyUI's generic mapping): `diffusion_model.blocks.N.attn.qkv`, `lora_unet_blocks_N_attn_qkv`;
  a LoRA on a fused projection is split into its q/k/v (or k/v) parts exactly.

The converted form (what `convert` writes and the node applies) is
`transformer.<diffusers module>.<suffix>` and `text_encoder.<HF T5 module>.<suffix>`, LoRA suffixes
`lora_A.weight` / `lora_B.weight`, LyCORIS suffixes kept, and an `alpha` for every module, so
scale = alpha / rank holds everywhere. `module_table` is the one name mapping (diffusers module ->
native weight and the slice of it), for loading here and for LoRA export in diffusers names.
"""
from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checks import InputError
from .loading import _FUSED, _RENAMES  # the checkpoint converter's names: one mapping for weights and LoRAs

log = logging.getLogger(__name__)

TRANSFORMER = "transformer"
TEXT_ENCODER = "text_encoder"
MAX_BLOCKS = 100  # name tables cover this many blocks; keys past the model's depth are reported, not applied

LORA_SUFFIXES = {  # file suffix -> converted suffix
    "lora_A.weight": "lora_A.weight", "lora_B.weight": "lora_B.weight",
    "lora_A.default.weight": "lora_A.weight", "lora_B.default.weight": "lora_B.weight",
    "lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight",
    "lora.down.weight": "lora_A.weight", "lora.up.weight": "lora_B.weight",
    "lora_linear_layer.down.weight": "lora_A.weight", "lora_linear_layer.up.weight": "lora_B.weight",
}
LOHA_SUFFIXES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR_SUFFIXES = ("lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
OTHER_SUFFIXES = ("alpha", "dora_scale", "diff", "diff_b")
UNSUPPORTED_SUFFIXES = {  # recognised, refused with a reason (applying the rest of the module would be wrong)
    "lora_mid.weight": "Tucker-decomposed (lora_mid) LoCon is not supported",
    "lora_magnitude_vector": "PEFT DoRA magnitudes are not supported",
    "lora_magnitude_vector.weight": "PEFT DoRA magnitudes are not supported",
}
_ALL_SUFFIXES = sorted([*LORA_SUFFIXES, *LOHA_SUFFIXES, *LOKR_SUFFIXES, *OTHER_SUFFIXES, *UNSUPPORTED_SUFFIXES],
                       key=len, reverse=True)
_ROW_SLICED = {"lora_B.weight", "hada_w1_a", "hada_w2_a", "diff", "diff_b", "dora_scale"}  # out-rows first

# (prefix, component, name style, format label); first match wins, so longer prefixes come first
_PREFIXES = (
    ("unet.base_model.model.", TRANSFORMER, "dotted", "PEFT (old reference script, unet.base_model.model.)"),
    ("base_model.model.", TRANSFORMER, "dotted", "PEFT (base_model.model.)"),
    ("lora_transformer.", TRANSFORMER, "dotted", "OneTrainer (diffusers names)"),
    ("transformer.", TRANSFORMER, "dotted", "diffusers (transformer.)"),
    ("diffusion_model.", TRANSFORMER, "dotted", "ComfyUI native names (diffusion_model.)"),
    ("lycoris_", TRANSFORMER, "underscore", "SimpleTuner LyCORIS"),
    ("lora_transformer_", TRANSFORMER, "underscore", "OneTrainer legacy"),
    ("lora_unet_", TRANSFORMER, "underscore", "kohya-style native names (lora_unet_)"),
    ("text_encoder.", TEXT_ENCODER, "dotted", "diffusers T5 (text_encoder.)"),
    ("lora_te.", TEXT_ENCODER, "dotted", "OneTrainer T5 (diffusers names)"),
    ("t5.", TEXT_ENCODER, "dotted", "OMI T5 (t5.)"),
    ("lora_te1_", TEXT_ENCODER, "underscore", "kohya-style T5 (lora_te1_)"),
    ("lora_te_", TEXT_ENCODER, "underscore", "OneTrainer legacy T5 (lora_te_)"),
)

_OMI = "OMI / OneTrainer (native names, split indices)"

# Key fragments of LoRAs for other models: (fragments, what it is). Checked when nothing maps to PixArt.
_OTHER_MODELS = (
    (("double_blocks", "single_blocks", "single_transformer_blocks", "add_k_proj"),
     "a Flux (or other MMDiT) LoRA"),
    (("joint_blocks", "context_block", "ff_context"), "an SD3 LoRA"),
    (("lora_te2_", "text_encoder_2.", "input_blocks_4_1_transformer_blocks_1", "input_blocks.4.1.transformer_blocks.1",
      "down_blocks_1_attentions_0_transformer_blocks_1", "down_blocks.1.attentions.0.transformer_blocks.1"),
     "an SDXL LoRA"),
    (("input_blocks", "down_blocks", "up_blocks", "mid_block"), "a Stable Diffusion 1.x/2.x (UNet) LoRA"),
    (("text_model_encoder_layers", "text_model.encoder.layers"), "a CLIP text-encoder LoRA (Stable Diffusion)"),
    (("_self_attn_q", ".self_attn.q.", ".ffn.0."), "a Wan video LoRA"),
)


class LoraError(InputError):
    """A LoRA file that cannot be used on PixArt, with a one-sentence reason."""


# -------------------------------------------------------------------------------------------------
# the name mapping
# -------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Target:
    """Where a diffusers module lands: rows [part·n/parts, (part+1)·n/parts) of a native parameter."""
    key: str  # native parameter key, e.g. "blocks.0.attn.qkv.weight" or "blocks.0.scale_shift_table"
    part: int = 0
    parts: int = 1

    def rows(self, total_rows: int) -> tuple[int, int]:
        """(first row, row count) of this part in a parameter of total_rows rows."""
        n = total_rows // self.parts
        return self.part * n, n

    @property
    def bias_key(self) -> str | None:
        return self.key[: -len("weight")] + "bias" if self.key.endswith(".weight") else None


def module_table(depth: int = MAX_BLOCKS) -> dict[str, Target]:
    """diffusers module name (or parameter name, for the tables) -> native Target, for a `depth`-block PixArt."""
    table = {}
    for official, diffusers in _RENAMES:
        for i in (range(depth) if "{i}" in official else (None,)):
            o, d = (official, diffusers) if i is None else (official.format(i=i), diffusers.format(i=i))
            table[d.rstrip(".")] = Target(o[:-1] + ".weight" if o.endswith(".") else o)
    for official, parts in _FUSED:
        for i in range(depth):
            for j, part in enumerate(parts):
                table[part.format(i=i).rstrip(".")] = Target(official.format(i=i) + "weight", j, len(parts))
    return table


def native_modules(depth: int = MAX_BLOCKS) -> dict[str, list[tuple[str, Target]]]:
    """Native module (or parameter) name -> its diffusers parts in order, e.g. blocks.0.attn.qkv -> to_q, to_k, to_v."""
    out: dict[str, list[tuple[str, Target]]] = {}
    for name, target in module_table(depth).items():
        native = target.key[: -len(".weight")] if target.key.endswith(".weight") else target.key
        out.setdefault(native, []).append((name, target))
    for parts in out.values():
        parts.sort(key=lambda p: p[1].part)
    return out


def t5_modules(num_layers: int = MAX_BLOCKS) -> list[str]:
    """The T5 encoder's linear layers under Hugging Face names (what T5 LoRAs train)."""
    names = []
    for i in range(num_layers):
        names += [f"encoder.block.{i}.layer.0.SelfAttention.{p}" for p in ("q", "k", "v", "o")]
        names += [f"encoder.block.{i}.layer.1.DenseReluDense.{p}" for p in ("wi_0", "wi_1", "wo")]
    return names


_TABLE = module_table()
_NATIVE = native_modules()
_T5 = set(t5_modules())
_UNDERSCORED = {**{n.replace(".", "_"): n for n in _NATIVE}, **{n.replace(".", "_"): n for n in _TABLE}}
_T5_UNDERSCORED = {n.replace(".", "_"): n for n in _T5}


# -------------------------------------------------------------------------------------------------
# reading a file into the converted form
# -------------------------------------------------------------------------------------------------

@dataclass
class LoraFile:
    path: Path
    state_dict: dict  # converted keys -> tensors (see the module docstring)
    formats: list[str]  # what the keys looked like, e.g. ["SimpleTuner LyCORIS"]
    kinds: list[str]  # LoRA / LoHa / LoKr / diff
    sources: dict = field(default_factory=dict)  # converted module -> file keys it came from
    unmatched: dict = field(default_factory=dict)  # file key -> why it is not used
    alpha_note: str = ""

    def modules(self, component: str) -> list[str]:
        """Converted module names (without the component prefix) of one component."""
        prefix = component + "."
        return sorted({m[len(prefix):] for m in self.sources if m.startswith(prefix)})

    @property
    def file_keys(self) -> int:
        """How many tensors the file holds (used or not)."""
        return len(self._by_file_key()) + len(self.unmatched)

    def _by_file_key(self) -> dict:
        out = {}
        for module, keys in self.sources.items():
            for k in keys:
                out.setdefault(k, []).append(module)
        return out

    def keys_of(self, modules) -> set[str]:
        """File keys that feed only the given converted modules (a fused key counts once all its parts do)."""
        modules = set(modules)
        return {k for k, ms in self._by_file_key().items() if all(m in modules for m in ms)}


def read_lora(path) -> LoraFile:
    """Read a LoRA/LyCORIS file of any supported format (see the module docstring) into the converted form."""
    path = Path(path)
    if not path.is_file():
        raise LoraError(f"{path}: no such LoRA file")
    sd, metadata = _read_tensors(path)
    return convert_state_dict(sd, path, _peft_config(path, metadata))


def _read_tensors(path: Path) -> tuple[dict, dict]:
    if path.suffix in (".safetensors", ".sft"):
        from safetensors import safe_open
        try:
            with safe_open(str(path), framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
        except Exception as e:  # noqa: BLE001 - safetensors raises several types for a bad file
            raise LoraError(f"{path}: not a readable safetensors file ({e}); download it again") from None
    if path.suffix in (".pt", ".pth", ".bin", ".ckpt"):
        try:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001
            raise LoraError(f"{path}: could not be loaded as tensors ({str(e).splitlines()[0]}); "
                            "use a .safetensors LoRA") from None
        if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
            sd = sd["state_dict"]
        if not isinstance(sd, dict):
            raise LoraError(f"{path}: holds a {type(sd).__name__}, not a dict of LoRA tensors")
        return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}, {}
    raise LoraError(f"{path}: unsupported LoRA file type {path.suffix!r}; use .safetensors")


def _peft_config(path: Path, metadata: dict) -> dict | None:
    """PEFT's LoraConfig as a dict: adapter_config.json beside the file, or diffusers' header metadata."""
    for candidate in (path.with_name(path.stem + ".adapter_config.json"), path.with_name(path.stem + ".json"),
                      path.with_name("adapter_config.json")):
        if candidate.is_file():
            try:
                config = json.loads(candidate.read_text())
            except (OSError, ValueError) as e:
                raise LoraError(f"{candidate}: not valid JSON ({e}); fix or remove it") from None
            if isinstance(config, dict) and ("lora_alpha" in config or "r" in config):
                config["_from"] = candidate.name
                return config
    raw = metadata.get("lora_adapter_metadata")
    if raw:
        try:
            config = json.loads(raw)
        except ValueError:
            return None
        if isinstance(config, dict):
            config = config.get("transformer", config)  # diffusers nests it per component
            config["_from"] = "the file's lora_adapter_metadata"
            return config
    return None


def _split_key(key: str) -> tuple[str, str] | None:
    for suffix in _ALL_SUFFIXES:
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], suffix
    return None


def _locate(module: str):
    """File module name -> (component, [(converted module, Target or None, part, parts)], format label) or None."""
    for prefix, component, style, label in _PREFIXES:
        if not module.startswith(prefix):
            continue
        name = module[len(prefix):]
        if component == TEXT_ENCODER:
            if style == "underscore":
                name = _T5_UNDERSCORED.get(name)
            elif name.startswith("transformer."):  # ComfyUI's own T5 wrapper names
                name = name[len("transformer."):]
            if name in _T5:
                return component, [(name, None, 0, 1)], label
            continue
        if style == "underscore":
            name = _UNDERSCORED.get(name)
            if name is None:
                continue
        if name.startswith("transformer.") and prefix != "transformer.":
            name = name[len("transformer."):]  # PEFT on the pipeline (base_model.model.transformer.…)
        if name in _TABLE:
            return component, [(name, _TABLE[name], 0, 1)], label
        if prefix == "transformer.":
            label = _OMI  # native names under transformer. are OMI's
        split = re.fullmatch(r"(.+)\.(\d)", name)
        if split and split.group(1) in _NATIVE and len(_NATIVE[split.group(1)]) > int(split.group(2)):
            diffusers, target = _NATIVE[split.group(1)][int(split.group(2))]  # OMI split index
            return component, [(diffusers, target, 0, 1)], _OMI
        if name in _NATIVE:
            parts = _NATIVE[name]
            return component, [(d, t, t.part, t.parts) for d, t in parts], label
    return None


def convert_state_dict(sd: dict, path="", peft_config: dict | None = None) -> LoraFile:
    """Any supported format's tensors -> LoraFile in the converted form; refuses LoRAs for other models."""
    path = Path(path)
    groups: dict[str, dict[str, str]] = {}  # file module -> suffix -> file key
    unmatched = {}
    for key in sd:
        split = _split_key(key)
        if split is None:
            unmatched[key] = "not a LoRA/LyCORIS tensor name" if not key.startswith("bundle_emb") else \
                "embedding bundle (textual inversion), not supported"
            continue
        groups.setdefault(split[0], {})[split[1]] = key

    out, sources, formats, kinds = {}, {}, [], []
    for module, suffixes in groups.items():
        located = _locate(module)
        if located is None:
            for key in suffixes.values():
                unmatched[key] = "names no PixArt or T5 layer"
            continue
        component, parts, label = located
        bad = [UNSUPPORTED_SUFFIXES[s] for s in suffixes if s in UNSUPPORTED_SUFFIXES]
        tensors = {LORA_SUFFIXES.get(s, s): sd[k] for s, k in suffixes.items()}
        kind = _kind(tensors)
        if not bad and kind is None:
            bad = [f"only {', '.join(sorted(suffixes))}: no LoRA, LoHa, LoKr or diff weights"]
        pieces = [tensors]
        if not bad and len(parts) > 1:
            try:
                pieces = [_slice(tensors, kind, p, n) for _, _, p, n in parts]
            except LoraError as e:
                bad = [str(e)]
        if bad:
            for key in suffixes.values():
                unmatched[key] = bad[0]
            continue
        for (name, _, _, _), piece in zip(parts, pieces):
            converted = f"{component}.{name}"
            piece = dict(piece)
            alpha = _alpha(piece, kind, name, peft_config, "alpha" in tensors)
            if alpha is not None:
                piece["alpha"] = torch.tensor(float(alpha))
            for suffix, tensor in piece.items():
                out[f"{converted}.{suffix}"] = tensor
            sources.setdefault(converted, []).extend(suffixes.values())
        formats.append(label)
        kinds.append(kind)

    other = _other_model(path, list(unmatched))
    if other or not sources:
        raise LoraError(other or _not_pixart(path, sd))
    lora = LoraFile(path, out, _counted(formats), _counted(kinds), sources, unmatched)
    lora.alpha_note = _alpha_note(groups, sd, peft_config)
    return lora


def _counted(items) -> list[str]:
    return list(dict.fromkeys(items))


def _kind(tensors) -> str | None:
    if "lora_A.weight" in tensors and "lora_B.weight" in tensors:
        return "LoRA"
    if all(f"hada_w{i}_{ab}" in tensors for i in (1, 2) for ab in "ab"):
        return "LoHa"
    if ("lokr_w1" in tensors or "lokr_w1_a" in tensors) and ("lokr_w2" in tensors or "lokr_w2_a" in tensors):
        return "LoKr"
    if "diff" in tensors or "diff_b" in tensors:
        return "diff"
    return None


def _slice(tensors, kind, part, parts) -> dict:
    """One q/k/v part of an adapter trained on a fused projection (exact: the parts are output rows)."""
    out = {}
    for suffix, t in tensors.items():
        if suffix in _ROW_SLICED:
            n = t.shape[0] // parts
            out[suffix] = t[part * n:(part + 1) * n].clone()
        elif kind == "LoKr" and suffix in ("lokr_w1", "lokr_w1_a"):
            if t.shape[0] % parts:  # kron(w1, w2) rows split evenly only along whole rows of w1
                raise LoraError(f"a LoKr on a fused projection whose first factor has {t.shape[0]} rows cannot "
                                f"be split into {parts} parts")
            n = t.shape[0] // parts
            out[suffix] = t[part * n:(part + 1) * n].clone()
        elif suffix in ("hada_t1", "hada_t2", "lokr_t2"):
            raise LoraError("a Tucker-decomposed LyCORIS module on a fused projection cannot be split")
        else:
            out[suffix] = t
    return out


def _rank(tensors, kind) -> int | None:
    if kind == "LoRA":
        return tensors["lora_A.weight"].shape[0]
    if kind == "LoHa":
        return tensors["hada_w1_b"].shape[0]
    if kind == "LoKr":
        for name in ("lokr_w1_b", "lokr_w2_b"):
            if name in tensors:
                return tensors[name].shape[0]
    return None


def _pattern_value(patterns: dict, module: str):
    for pattern, value in (patterns or {}).items():  # PEFT: the pattern matches a suffix of the module path
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return None


def _alpha(tensors, kind, module, peft_config, in_file) -> float | None:
    """The alpha for scale = alpha / rank: the file's, else PEFT's config, else the rank (scale 1)."""
    rank = _rank(tensors, kind)
    if rank is None:
        return None
    if in_file:
        return float(tensors["alpha"])
    if peft_config and kind == "LoRA":
        alpha = _pattern_value(peft_config.get("alpha_pattern"), module)
        if alpha is None:
            alpha = peft_config.get("lora_alpha", 8)  # PEFT's own default
        r = _pattern_value(peft_config.get("rank_pattern"), module) or peft_config.get("r", rank)
        if int(r) != rank:
            log.warning("LoRA %s has rank %d but its PEFT config says r=%s; using the tensors' rank", module, rank, r)
        if peft_config.get("use_rslora"):
            return float(alpha) * math.sqrt(rank)  # rsLoRA: scale alpha / sqrt(r)
        return float(alpha)
    return float(rank)


def _alpha_note(groups, sd, peft_config) -> str:
    has_alpha = any("alpha" in s for s in groups.values())
    if peft_config is not None and not has_alpha:
        return (f"alpha from {peft_config['_from']} (lora_alpha {peft_config.get('lora_alpha', 8)}"
                + (", alpha_pattern" if peft_config.get("alpha_pattern") else "")
                + (", rsLoRA" if peft_config.get("use_rslora") else "") + ")")
    if has_alpha:
        return "alpha from the file"
    peft_style = any(k.startswith(("base_model.model.", "unet.base_model.model.")) for k in sd)
    if peft_style:
        return ("no alpha in the file and no adapter_config.json beside it: applied at scale 1 (alpha = rank); "
                "put the trainer's adapter_config.json next to the file for the intended strength")
    return "no alpha in the file: scale 1 (alpha = rank), as diffusers and ComfyUI apply it"


def _other_model(path, keys) -> str | None:
    """The refusal for a LoRA whose keys name another model's layers (even if a few also fit PixArt)."""
    lowered = [k.lower() for k in keys]
    for fragments, what in _OTHER_MODELS:
        hit = next((k for k, low in zip(keys, lowered) if any(f.lower() in low for f in fragments)), None)
        if hit is not None:
            return (f"{path.name} is {what} (keys like {hit}), not a PixArt LoRA; load it with ComfyUI's "
                    "Load LoRA on the model it was trained for")
    return None


def _not_pixart(path, sd) -> str:
    keys = list(sd)
    sample = ", ".join(sorted(keys)[:3]) or "no tensors"
    return (f"{path.name} has no keys that name a PixArt transformer or T5 layer (first keys: {sample}); "
            "it is not a PixArt LoRA in any format this loader reads")


# -------------------------------------------------------------------------------------------------
# applying and writing
# -------------------------------------------------------------------------------------------------

def transformer_targets(lora: LoraFile) -> dict[str, Target]:
    """Converted transformer module -> native Target."""
    return {m: _TABLE[m] for m in lora.modules(TRANSFORMER)}


def module_tensors(lora: LoraFile, module: str) -> dict:
    """suffix -> tensor of one converted module (full name, e.g. "transformer.transformer_blocks.0.attn1.to_q")."""
    prefix = module + "."
    return {k[len(prefix):]: v for k, v in lora.state_dict.items() if k.startswith(prefix)}


def delta_shape(tensors: dict) -> tuple[int, int] | None:
    """(rows, columns) of the weight change a converted module makes, from its factors; None if unknown."""
    kind = _kind(tensors)
    if kind == "LoRA":
        return tensors["lora_B.weight"].shape[0], tensors["lora_A.weight"][0].numel()
    if kind == "LoHa":
        return tensors["hada_w1_a"].shape[0], tensors["hada_w1_b"][0].numel()
    if kind == "LoKr" and "lokr_t2" not in tensors:
        def factor(i):
            if f"lokr_w{i}" in tensors:
                return tuple(tensors[f"lokr_w{i}"].shape[:2])
            return tensors[f"lokr_w{i}_a"].shape[0], tensors[f"lokr_w{i}_b"].shape[1]
        (a, b), (c, d) = factor(1), factor(2)
        return a * c, b * d
    if kind == "diff" and "diff" in tensors:
        return tensors["diff"].shape[0], tensors["diff"][0].numel()
    return None


def lora_delta(tensors: dict, strength: float = 1.0) -> torch.Tensor:
    """strength · alpha/rank · B·A of one converted LoRA module (the plain-LoRA case, for checks and export)."""
    a, b = tensors["lora_A.weight"].float(), tensors["lora_B.weight"].float()
    alpha = float(tensors.get("alpha", a.shape[0]))
    return strength * (alpha / a.shape[0]) * (b.flatten(1) @ a.flatten(1))


def save_converted(lora: LoraFile, out) -> Path:
    from safetensors.torch import save_file
    from .files import prepare_output, save_result
    out = Path(out)
    if out.suffix != ".safetensors":
        raise LoraError(f"{out}: write the converted LoRA as .safetensors")
    out = prepare_output(out, inputs=[lora.path])
    sd = {k: v.detach().clone().contiguous() for k, v in lora.state_dict.items()}  # split parts share their down
    meta = {"pixart_lora_source": ", ".join(lora.formats)}
    return save_result(out, lambda tmp: save_file(sd, str(tmp), metadata=meta), "LoRA", rescue=False)


def describe(lora: LoraFile) -> str:
    """The `lora inspect` text: format, kinds, modules per component, ranks, alpha, what is not used."""
    ranks = {}
    for module in lora.sources:
        tensors = module_tensors(lora, module)
        rank = _rank(tensors, _kind(tensors))
        if rank is not None:
            ranks[rank] = ranks.get(rank, 0) + 1
    lines = [f"file:        {lora.path}",
             f"format:      {', '.join(lora.formats)}",
             f"kind:        {', '.join(lora.kinds)}",
             f"transformer: {len(lora.modules(TRANSFORMER))} modules (diffusers names)",
             f"T5:          {len(lora.modules(TEXT_ENCODER))} modules",
             f"ranks:       {', '.join(f'{r} ({n})' for r, n in sorted(ranks.items())) or '-'}",
             f"alpha:       {lora.alpha_note}",
             f"not used:    {len(lora.unmatched)} keys"]
    lines += [f"  {k}: {why}" for k, why in sorted(lora.unmatched.items())]
    return "\n".join(lines)


def _parameter(model, key: str):
    """The parameter a state-dict key names; tables (ops.Table) keep their official names in state dicts
    but hold the tensor as `<name>.weight`. None when the model has neither."""
    for name in (key, key + ".weight"):
        try:
            return model.get_parameter(name)
        except AttributeError:
            pass
    return None


def merge_lora(model, lora: LoraFile, strength: float = 1.0) -> dict[str, str]:
    """Add a converted LoRA's transformer part (LoRA factors, diff and diff_b patches: what LoRA trainers and
    ComfyUI's Train LoRA write) into a pixart_core PixArt's weights, in place. Returns module -> reason for
    what was not applied (T5 parts: the CLI's T5 takes no patches). LoHa/LoKr are refused: apply those in
    ComfyUI with Load PixArt LoRA."""
    skipped = {f"{TEXT_ENCODER}.{m}": "T5 parts are not applied here" for m in lora.modules(TEXT_ENCODER)}
    changes = []
    for module, target in transformer_targets(lora).items():
        tensors = module_tensors(lora, f"{TRANSFORMER}.{module}")
        kind = _kind(tensors)
        if kind in ("LoHa", "LoKr"):
            raise LoraError(f"{lora.path.name}: {module} is a {kind}, which only ComfyUI applies here; use it with "
                            "the Load PixArt LoRA node")
        weight = _parameter(model, target.key)
        if weight is None:
            skipped[f"{TRANSFORMER}.{module}"] = f"this model has no {target.key}"
            continue
        start, rows = target.rows(weight.shape[0])
        want, have = (rows, weight[0].numel()), delta_shape(tensors)
        if have is not None and tuple(have) != want:
            raise LoraError(f"{lora.path.name}: {module} has shape {tuple(have)} but the model's {target.key} "
                            f"needs {want}; this LoRA is for another model size")
        if kind == "LoRA":
            changes.append((weight, start, rows, lora_delta(tensors, strength)))
        elif "diff" in tensors:
            changes.append((weight, start, rows, tensors["diff"].float() * strength))
        if "diff_b" in tensors:
            bias = model.get_parameter(target.bias_key)
            changes.append((bias, start, rows, tensors["diff_b"].float() * strength))
    with torch.no_grad():
        for param, start, rows, delta in changes:
            part = param[start:start + rows]
            part.copy_(part.float() + delta.reshape(part.shape).to(param.device))
    return skipped
