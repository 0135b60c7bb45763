"""T5 v1.1 text encoder for PixArt: loads T5 encoder weights in the layouts people actually have,
tokenises the way the official Σ inference does, and caches prompt embeddings.

Accepted weights (the architecture is always read from the tensor shapes, so a tiny test T5 and
T5-XXL take the same path):
- a Hugging Face folder: model.safetensors, sharded model-*.safetensors with
  model.safetensors.index.json, or pytorch_model*.bin (with or without index);
- a diffusers pipeline root holding text_encoder/ and tokenizer/;
- a T5 GGUF file as llama.cpp / ComfyUI-GGUF users have it (t5-v1_1-xxl-encoder-Q8_0.gguf, Q5_K_M,
  Q4_K_M, F16, ...; see gguf.py): quantized weights stay quantized in memory, dequantized per layer;
- a single .safetensors file as ComfyUI keeps in models/text_encoders: fp16/bf16/fp32, plain fp8
  (e4m3fn/e5m2), or ComfyUI's scaled fp8 (a `scaled_fp8` marker tensor plus a float32
  `<layer>.scale_weight` per quantised Linear; `<layer>.scale_input` is ignored). The newer
  per-layer `<layer>.weight_scale` form is dequantised the same way. Keys may sit under a prefix
  (e.g. `text_encoders.t5xxl.transformer.` in a combined checkpoint); decoder keys are ignored.

See spec §4 for tokenisation (padding to max_length, 300 tokens for Σ, 120 for α).
"""
from __future__ import annotations

import gc
import importlib.util
import logging
import re
from collections import OrderedDict
from pathlib import Path

import torch

from .checks import InputError, clean_text, real_number, usable_device, whole_number
from .files import config_fields, read_json_object, torch_load, unreadable

log = logging.getLogger(__name__)

DEFAULT_MAX_LENGTH = 300  # Σ; α uses 120
MAX_TOKENS = 1024  # the longest max_length taken: prompts are padded to it
MAX_PROMPT_CHARS = 100_000  # T5 reads 300 tokens (about 1,500 characters); more is a pasted accident
CACHE_SIZE = 64  # prompt embeddings kept (on the CPU); a T5-XXL fp32 entry is about 5 MB

_ANCHOR = "encoder.block.0.layer.0.SelfAttention.q.weight"
_WEIGHT_SCALE_SUFFIXES = ("scale_weight", "weight_scale")  # ComfyUI scaled fp8 / per-layer quant
_SKIPPED_SUFFIXES = ("scale_input", "input_scale")  # activation scales only matter to fp8 matmuls
_TOKENIZER_FILES = ("tokenizer.json", "spiece.model")
_DTYPES = {
    "fp32": torch.float32, "float32": torch.float32,
    "fp16": torch.float16, "float16": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
}
_WHAT_TO_LOAD = ("load a T5 v1.1 XXL encoder instead: t5xxl_fp16.safetensors (or its fp8 variants) "
                 "from models/text_encoders, or the text_encoder/ folder of "
                 "PixArt-alpha/pixart_sigma_sdxlvae_T5_diffusers")
# (key fragments, what such a file is); checked in order, first hit wins.
_LOOKALIKES = (
    (("model.diffusion_model.", "input_blocks.", "time_embedding."), "a Stable Diffusion checkpoint or UNet"),
    (("t_block.", "adaln_single.", "x_embedder."), "a PixArt transformer (load it with the PixArt model loader)"),
    (("decoder.up_blocks.", "decoder.up.", "post_quant_conv."), "a VAE"),
    (("text_model.", "transformer.resblocks."), "a CLIP text encoder (like clip_l.safetensors)"),
    (("model.layers.", "layers.0.self_attn."), "a decoder-only language model (Gemma/Llama/Qwen)"),
)


class T5LoadError(InputError):
    """The weights or tokenizer given cannot be used as PixArt's T5 encoder."""


# ----------------------------------------------------------------------------- public API

def load_t5(path, dtype=torch.float32, device="cpu", tokenizer_path=None) -> "T5TextEncoder":
    """Load a T5 encoder and its tokenizer; see the module docstring for the accepted layouts.

    dtype is the compute dtype (float32, float16 or bfloat16, or "fp32"/"fp16"/"bf16"); stored
    weights of any dtype, fp8 included, are cast to it tensor by tensor. In float16 the
    feed-forward output projections (`wo`) stay float32, as transformers does, because T5 v1.1
    activations overflow float16 there.
    """
    dtype = _as_dtype(dtype)
    device = usable_device(device)
    source = _WeightSource.resolve(path)
    weights = source.open()
    try:
        prefix = _t5_prefix(weights, source.display)
        config = _t5_config(weights, prefix, source)
    finally:
        weights.close()
    tokenizer_dir = _find_tokenizer_dir(tokenizer_path, source)
    tokenizer = _load_tokenizer(tokenizer_dir, config.vocab_size)
    encoder = T5TextEncoder(source, prefix, config, tokenizer, tokenizer_dir, dtype, device)
    return encoder.load()  # now, so that bad weights fail here rather than at the first prompt


def clear_cache() -> None:
    """Forget every cached prompt embedding (of all encoders)."""
    _cache.clear()


class T5TextEncoder:
    """A loaded T5 encoder plus tokenizer. `encode()` returns (embeds, mask) for PixArt.

    `release()` frees the weights; the next `encode()` that needs the model reloads it from the
    same path (prompts already in the cache are served without reloading).
    """

    def __init__(self, source, prefix, config, tokenizer, tokenizer_dir, dtype, device):
        self._source = source
        self._prefix = prefix
        self.config = config
        self.tokenizer = tokenizer
        self.tokenizer_dir = tokenizer_dir
        self.dtype = dtype
        self.device = device
        self.path = source.path
        self.last_truncated: list[int] = []  # tokens dropped per prompt by the latest encode()
        self._model = None
        self.identity = self._make_identity()

    def __repr__(self):
        c = self.config
        return (f"T5TextEncoder({self.path}, d_model={c.d_model}, layers={c.num_layers}, "
                f"dtype={self.dtype}, device={self.device}, loaded={self.loaded})")

    @property
    def width(self) -> int:
        """Embedding width (d_model): 4096 for T5-XXL."""
        return self.config.d_model

    @property
    def loaded(self) -> bool:
        return self._model is not None

    @property
    def model(self):
        """The transformers T5EncoderModel, loaded on first use (again after `release()`)."""
        self.load()
        return self._model

    def load(self) -> "T5TextEncoder":
        """Load the weights if they are not loaded (a no-op otherwise); returns self."""
        if self._model is None:
            self.identity = self._make_identity()  # the file may have changed since release()
            self._model = _build_model(self._source, self._prefix, self.config, self.dtype, self.device)
        return self

    def release(self) -> None:
        """Free the weights now; a later encode() of an uncached prompt reloads them."""
        if self._model is None:
            return
        self._model = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        log.info("Released T5 weights of %s", self.path)

    def tokenize(self, prompts, max_length=DEFAULT_MAX_LENGTH):
        """Token ids and mask, (B, max_length) long each, plus the tokens dropped per prompt.

        Same call as the official inference: pad to max_length, truncate (EOS kept), mask 1 on
        the real tokens including EOS.
        """
        texts = _as_prompt_list(prompts)
        max_length = _as_max_length(max_length)
        full_lengths = [len(ids) for ids in self.tokenizer(texts, truncation=False)["input_ids"]]
        batch = self.tokenizer(texts, padding="max_length", truncation=True, max_length=max_length,
                               return_tensors="pt")
        dropped = [max(0, n - max_length) for n in full_lengths]
        return batch["input_ids"].long(), batch["attention_mask"].long(), dropped

    def encode(self, prompts, max_length=DEFAULT_MAX_LENGTH):
        """Embeddings (B, max_length, width) in the compute dtype and mask (B, max_length) long,
        both on the encoder's device. Prompts are used as given apart from `.strip()`.
        Sets `last_truncated` to the tokens dropped from each prompt."""
        texts = _as_prompt_list(prompts)
        max_length = _as_max_length(max_length)
        keys = [(text, self.identity, max_length) for text in texts]
        entries = {}
        for key in keys:
            if key in _cache:
                _cache.move_to_end(key)
                entries[key] = _cache[key]
        todo = list(dict.fromkeys(key for key in keys if key not in entries))
        if todo:
            fresh = self._run([key[0] for key in todo], max_length)
            for key, entry in zip(todo, fresh):
                entries[key] = entry
                _cache[key] = entry
            while len(_cache) > CACHE_SIZE:
                _cache.popitem(last=False)

        rows = [entries[key] for key in keys]
        self.last_truncated = [dropped for _, _, dropped in rows]
        for i, (text, dropped) in enumerate(zip(texts, self.last_truncated)):
            if dropped:
                log.warning("T5 prompt %d (%r) is longer than max_length=%d: its last %d tokens were dropped",
                            i, _preview(text), max_length, dropped)
        embeds = torch.stack([e for e, _, _ in rows]).to(self.device)
        mask = torch.stack([m for _, m, _ in rows]).to(self.device)
        return embeds, mask

    def _run(self, texts, max_length):
        ids, mask, dropped = self.tokenize(texts, max_length)
        model = self.model
        with torch.no_grad():
            out = model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).last_hidden_state
        out = out.to(self.dtype)
        if not torch.isfinite(out).all():
            raise FloatingPointError(
                f"T5 from {self.path} produced inf/NaN embeddings in {self.dtype}; "
                "load it with dtype bfloat16 or float32 instead")
        # Cached on the CPU so a long-lived cache does not hold accelerator memory.
        return [(out[i].to("cpu", copy=True), mask[i].clone(), dropped[i]) for i in range(len(texts))]

    def _make_identity(self) -> str:
        return (f"{self._source.path}|mtime={self._source.mtime_ns()}|{self.dtype}|{self.device}"
                f"|tokenizer={self.tokenizer_dir}")


# ----------------------------------------------------------------------------- prompt cache

_cache: "OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor, int]]" = OrderedDict()


# ----------------------------------------------------------------------------- argument checks

def _as_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, str):
        if dtype.lower() not in _DTYPES:
            raise InputError(f"T5 dtype {dtype!r} is not supported; use one of {', '.join(_DTYPES)}")
        return _DTYPES[dtype.lower()]
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise InputError(f"T5 dtype {dtype} is not supported; use torch.float32, torch.float16 or torch.bfloat16")
    return dtype


def _as_prompt_list(prompts) -> list[str]:
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise InputError("encode() needs at least one prompt")
    bad = [p for p in prompts if not isinstance(p, str)]
    if bad:
        raise InputError(f"prompts must be strings, got {type(bad[0]).__name__}")
    cleaned = []
    for p in prompts:
        p, replaced = clean_prompt(p)
        if replaced:
            log.warning("T5 prompt %r: %d character(s) that are not valid Unicode text (lone surrogates, or bytes "
                        "the terminal could not decode) were replaced by U+FFFD", _preview(p), replaced)
        cleaned.append(p.strip())
    return cleaned


def clean_prompt(text, name: str = "the prompt") -> tuple[str, int]:
    """(prompt with invalid characters replaced, how many): see checks.clean_text; refuses absurd lengths."""
    if not isinstance(text, str):
        raise InputError(f"{name} must be text, got {type(text).__name__}")
    if len(text) > MAX_PROMPT_CHARS:
        raise InputError(f"{name} is {len(text):,} characters long; T5 reads only its first "
                         f"{DEFAULT_MAX_LENGTH} tokens (about 1,500 characters): shorten it")
    return clean_text(text)


def _as_max_length(max_length) -> int:
    if isinstance(max_length, bool) or not isinstance(max_length, int) or not 1 <= max_length <= MAX_TOKENS:
        raise InputError(f"max_length must be a whole number from 1 to {MAX_TOKENS} (300 for PixArt-Σ, 120 for α), "
                         f"got {max_length!r}")
    return max_length


def _preview(text, limit=40):
    return text if len(text) <= limit else text[:limit] + "…"


# ----------------------------------------------------------------------------- weight files

class _WeightSource:
    """Where the weights are: the files to read and the folders that may hold a tokenizer."""

    def __init__(self, path, files, tokenizer_candidates, display):
        self.path = path
        self.files = files
        self.tokenizer_candidates = tokenizer_candidates
        self.display = display

    @classmethod
    def resolve(cls, path) -> "_WeightSource":
        if path is None or str(path) == "":
            raise FileNotFoundError("no T5 path given; pass a .safetensors file, a Hugging Face folder or a diffusers pipeline folder")
        path = Path(path).expanduser().resolve()
        if path.is_file():
            return cls(path, [path], [path.parent], str(path))
        if not path.is_dir():
            raise FileNotFoundError(
                f"T5 weights not found at {path}; give a .safetensors file (as in ComfyUI's models/text_encoders), "
                "a Hugging Face T5 folder, or a diffusers pipeline folder with text_encoder/")
        if (path / "text_encoder").is_dir():
            return cls(path, _folder_weight_files(path / "text_encoder"),
                       [path / "tokenizer", path / "text_encoder", path], str(path / "text_encoder"))
        candidates = [path]
        if (path.parent / "tokenizer").is_dir():  # a diffusers text_encoder/ folder given directly
            candidates.append(path.parent / "tokenizer")
        return cls(path, _folder_weight_files(path), candidates, str(path))

    def mtime_ns(self) -> int:
        try:
            return max(f.stat().st_mtime_ns for f in self.files)
        except OSError:
            return 0

    def open(self) -> "_Weights":
        return _Weights(self.files)


def _folder_weight_files(folder: Path) -> list[Path]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.is_file():
            weight_map = read_json_object(index, T5LoadError).get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) and v and Path(v).name == v
                                                           for v in weight_map.values()):
                raise T5LoadError(f"{index}: field weight_map must map tensor names to shard files in this folder; "
                                  "re-download it")
            files = [folder / name for name in dict.fromkeys(weight_map.values())]
            absent = [f.name for f in files if not f.is_file()]
            if absent:
                raise FileNotFoundError(f"{index} lists shards that are missing from {folder}: {', '.join(absent[:3])}")
            return files
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return [folder / name]
    single = sorted(folder.glob("*.safetensors"))
    if len(single) == 1:
        return single
    found = sorted(p.name for p in folder.iterdir())[:8]
    raise FileNotFoundError(
        f"{folder} holds no T5 weights I can pick (model.safetensors, model-*.safetensors with "
        f"model.safetensors.index.json, pytorch_model*.bin, or a text_encoder/ subfolder); it has: {found}")


class _Weights:
    """Read-only view over one or more weight files: key names and shapes first, tensors on demand."""

    def __init__(self, files):
        self._handles = []
        self._where = {}  # key -> (reader, file)
        for file in files:
            reader = _open_weight_file(file)
            self._handles.append(reader)
            for key in reader.keys():
                self._where[key] = (reader, file)

    def keys(self):
        return self._where.keys()

    def __contains__(self, key):
        return key in self._where

    def shape(self, key) -> tuple:
        reader, _ = self._where[key]
        return tuple(reader.shape(key))

    def quantized(self, key):
        """The stored quantized form of a GGUF tensor (kept so in memory), or None."""
        reader, _ = self._where[key]
        return reader.quantized(key) if hasattr(reader, "quantized") else None

    def get(self, key) -> torch.Tensor:
        reader, file = self._where[key]
        try:
            return reader.get(key)
        except Exception as e:
            raise T5LoadError(f"could not read tensor {key} from {file} ({e}); the file may be truncated or corrupt") from None

    def close(self):
        for reader in self._handles:
            reader.close()
        self._handles = []


def _open_weight_file(file: Path):
    if file.suffix == ".gguf":
        from .gguf import GGUFError, GGUFReader
        try:
            return GGUFReader(file)
        except GGUFError as e:
            raise T5LoadError(str(e)) from None
    if file.suffix in (".safetensors", ".sft"):
        return _SafetensorsReader(file)
    if file.suffix in (".bin", ".pt", ".pth"):
        return _TorchReader(file)
    raise T5LoadError(f"{file} has an unsupported extension; use a .safetensors or .gguf file or a Hugging Face folder")


class _SafetensorsReader:
    def __init__(self, file):
        from safetensors import safe_open
        try:
            self._handle = safe_open(str(file), framework="pt", device="cpu")
            self._keys = list(self._handle.keys())
        except Exception as e:  # noqa: BLE001 - SafetensorError, OSError ...
            raise unreadable(file, e, T5LoadError) from None

    def keys(self):
        return self._keys

    def shape(self, key):
        return self._handle.get_slice(key).get_shape()

    def get(self, key):
        return self._handle.get_tensor(key)

    def close(self):
        self._handle = None


class _TorchReader:
    def __init__(self, file):
        data = torch_load(file, T5LoadError)
        if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
            data = data["state_dict"]
        if not isinstance(data, dict):
            raise T5LoadError(f"{file} does not hold a state dict (got {type(data).__name__})")
        self._data = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}

    def keys(self):
        return self._data.keys()

    def shape(self, key):
        return self._data[key].shape

    def get(self, key):
        return self._data[key]

    def close(self):
        self._data = {}


# ----------------------------------------------------------------------------- architecture

def _t5_prefix(weights, display) -> str:
    anchors = sorted(k[: -len(_ANCHOR)] for k in weights.keys() if k.endswith(_ANCHOR))
    anchors = [p for p in anchors if p == "" or p.endswith(".")]
    if anchors:
        if len(anchors) > 1:
            log.warning("%s holds several T5 encoders (%s); using %r", display, anchors, anchors[0])
        return anchors[0]
    keys = list(weights.keys())
    for fragments, what in _LOOKALIKES:
        if any(f in k for k in keys for f in fragments):
            raise T5LoadError(f"{display} looks like {what}, not a T5 encoder; {_WHAT_TO_LOAD}")
    raise T5LoadError(f"{display} has no T5 encoder keys (like {_ANCHOR}); its first keys are "
                      f"{sorted(keys)[:5]}; {_WHAT_TO_LOAD}")


def _t5_config(weights, prefix, source):
    from transformers import T5Config

    def shape(name):
        key = prefix + name
        if key not in weights:
            raise T5LoadError(f"{source.display} lacks {key}, which a T5 v1.1 encoder has; {_WHAT_TO_LOAD}")
        return weights.shape(key)

    if prefix + "encoder.block.0.layer.1.DenseReluDense.wi.weight" in weights:
        raise T5LoadError(f"{source.display} looks like an original T5 (v1.0, single `wi` feed-forward); "
                          f"PixArt was trained with T5 v1.1 (gated `wi_0`/`wi_1`); {_WHAT_TO_LOAD}")
    if prefix + "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight" in weights:
        raise T5LoadError(f"{source.display} looks like UMT5 (a position bias in every layer, as used by Wan), "
                          f"not T5 v1.1; {_WHAT_TO_LOAD}")
    embed_name = "shared.weight" if prefix + "shared.weight" in weights else "encoder.embed_tokens.weight"
    vocab_size, d_model = shape(embed_name)
    num_buckets, num_heads = shape("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
    inner, _ = shape("encoder.block.0.layer.0.SelfAttention.q.weight")
    d_ff, _ = shape("encoder.block.0.layer.1.DenseReluDense.wi_0.weight")
    block = re.compile(re.escape(prefix) + r"encoder\.block\.(\d+)\.")
    num_layers = 1 + max(int(m.group(1)) for m in map(block.match, weights.keys()) if m)
    if inner % num_heads:
        raise T5LoadError(f"{source.display}: q projection width {inner} is not divisible by the "
                          f"{num_heads} heads of relative_attention_bias; the file is not a standard T5 encoder")
    extra = _hf_config_extras(source)
    return T5Config(
        vocab_size=vocab_size, d_model=d_model, d_kv=inner // num_heads, d_ff=d_ff,
        num_layers=num_layers, num_heads=num_heads,
        relative_attention_num_buckets=num_buckets,
        relative_attention_max_distance=extra.get("relative_attention_max_distance", 128),
        layer_norm_epsilon=extra.get("layer_norm_epsilon", 1e-6),
        feed_forward_proj="gated-gelu", dropout_rate=0.0,
        is_encoder_decoder=False, use_cache=False,
    )


def _hf_config_extras(source) -> dict:
    """The two hyper-parameters the weights cannot tell, from config.json where there is one."""
    folder = source.files[0].parent
    config_file = folder / "config.json"
    # A config.json beside a single ComfyUI-style file may belong to anything in that folder.
    if source.path.is_file() or not config_file.is_file():
        return {}
    try:
        config = read_json_object(config_file, T5LoadError)
    except T5LoadError as e:  # the weights alone define the model; these two have standard values
        log.warning("%s; using the T5 v1.1 defaults instead", e)
        return {}
    return config_fields(config, config_file, {"relative_attention_max_distance": (whole_number, 1, "e.g. 128"),
                                               "layer_norm_epsilon": (real_number, 1e-12, "e.g. 1e-06")}, T5LoadError)


# ----------------------------------------------------------------------------- model building

def _build_model(source, prefix, config, dtype, device):
    from transformers import T5EncoderModel

    with torch.device("meta"):
        model = T5EncoderModel(config)
    expected = {name: p.shape for name, p in model.state_dict().items() if name != "encoder.embed_tokens.weight"}

    weights = source.open()
    try:
        file_keys = _file_keys_by_name(weights, prefix)
        missing = [n for n in expected if n not in file_keys]
        unexpected = [n for n in file_keys if n not in expected]
        if missing or unexpected:
            parts = []
            if missing:
                parts.append(f"missing {len(missing)} keys (e.g. {', '.join(prefix + n for n in missing[:3])})")
            if unexpected:
                parts.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(file_keys[n] for n in unexpected[:3])})")
            raise T5LoadError(f"{source.display} is not a complete T5 v1.1 encoder: {'; '.join(parts)}")

        state, stored = {}, set()
        for name, want_shape in expected.items():
            key = file_keys[name]
            if tuple(weights.shape(key)) != tuple(want_shape):
                raise T5LoadError(f"{source.display}: {key} has shape {tuple(weights.shape(key))}, expected "
                                  f"{tuple(want_shape)}; the file is corrupt or mixes models")
            target = _param_dtype(name, dtype)
            quantized = weights.quantized(key) if _keeps_quantized(name) else None
            if quantized is not None:  # a GGUF Linear/Embedding: kept as stored, dequantized when used
                stored.add(quantized.qtype)
                _swap_in_quantized(model, name, quantized, target, device)
                continue
            tensor = weights.get(key)
            stored.add(str(tensor.dtype).replace("torch.", ""))
            tensor = _dequantise(tensor, weights, key)
            state[name] = tensor.to(dtype=target).to(device)
            del tensor
    finally:
        weights.close()

    if "shared.weight" in state:
        state["encoder.embed_tokens.weight"] = state["shared.weight"]
    else:
        model.encoder.embed_tokens = model.shared  # quantized: the same module, tied as in from_pretrained
    state.update({k: v for k, v in model.state_dict().items() if k.endswith(".qweight")})
    model.load_state_dict(state, strict=True, assign=True)
    if isinstance(model.shared, torch.nn.Embedding):
        model.set_input_embeddings(model.shared)  # one embedding table, as in a from_pretrained model
    model.eval().requires_grad_(False)
    log.info("Loaded T5 encoder from %s: d_model %d, %d layers, %d heads, vocab %d; stored %s, computing in %s on %s%s",
             source.display, config.d_model, config.num_layers, config.num_heads, config.vocab_size,
             "/".join(sorted(stored)), str(dtype).replace("torch.", ""), device,
             " (feed-forward wo kept in float32)" if dtype == torch.float16 else "")
    return model


def _file_keys_by_name(weights, prefix) -> dict:
    """Model parameter name -> key in the file, leaving out scales, markers and decoder weights."""
    names = {}
    for key in weights.keys():
        if not key.startswith(prefix):
            continue  # another component of a combined checkpoint
        name = key[len(prefix):]
        last = name.rsplit(".", 1)[-1]
        if (name == "scaled_fp8" or last in _WEIGHT_SCALE_SUFFIXES or last in _SKIPPED_SUFFIXES
                or name.startswith("decoder.") or name == "lm_head.weight"):
            continue
        names[name] = key
    embed = names.pop("encoder.embed_tokens.weight", None)
    if "shared.weight" not in names and embed is not None:
        names["shared.weight"] = embed
    return names


def _dequantise(tensor, weights, key):
    base = key[: -len("weight")] if key.endswith(".weight") else None
    if base is not None:
        for suffix in _WEIGHT_SCALE_SUFFIXES:
            if base + suffix in weights:
                scale = weights.get(base + suffix).to(torch.float32)
                return tensor.to(torch.float32) * scale
    return tensor


def _keeps_quantized(name) -> bool:
    """Linear weights and the token embedding; norms and the position-bias table are small, kept dense."""
    return name == "shared.weight" or (name.endswith(".weight") and not name.endswith(
        ("layer_norm.weight", "relative_attention_bias.weight")))


def _swap_in_quantized(model, name, quantized, dtype, device):
    from .gguf import QuantizedEmbedding, QuantizedLinear
    quantized.raw = quantized.raw.to(device)
    parent_name, _, child = name[: -len(".weight")].rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    cls = QuantizedEmbedding if name == "shared.weight" else QuantizedLinear
    setattr(parent, child, cls(quantized, dtype))


def _param_dtype(name, dtype):
    # T5 v1.1 feed-forward outputs exceed float16's range; a float32 `wo` makes the residual stream
    # float32 from the first feed-forward on (transformers' _keep_in_fp32_modules does the same).
    if dtype == torch.float16 and name.endswith("DenseReluDense.wo.weight"):
        return torch.float32
    return dtype


# ----------------------------------------------------------------------------- tokenizer

def _has_tokenizer(folder) -> bool:
    return folder is not None and any((Path(folder) / f).is_file() for f in _TOKENIZER_FILES)


def _comfy_tokenizer_dir():
    """ComfyUI's bundled T5 v1.1 tokenizer, if a `comfy` package is importable (no import is done)."""
    try:
        spec = importlib.util.find_spec("comfy")
    except (ImportError, ValueError):
        return None
    for root in (spec.submodule_search_locations or []) if spec else []:
        folder = Path(root) / "text_encoders" / "t5_tokenizer"
        if _has_tokenizer(folder):
            return folder
    return None


def _find_tokenizer_dir(tokenizer_path, source) -> Path:
    if tokenizer_path is not None and str(tokenizer_path) != "":
        given = Path(tokenizer_path).expanduser().resolve()
        folder = given.parent if given.is_file() else given
        if not _has_tokenizer(folder):
            raise FileNotFoundError(f"tokenizer_path {given} holds no T5 tokenizer (spiece.model or tokenizer.json)")
        return folder
    for folder in source.tokenizer_candidates:
        if _has_tokenizer(folder):
            return Path(folder)
    comfy = _comfy_tokenizer_dir()
    if comfy is not None:
        return comfy
    raise FileNotFoundError(
        f"no T5 tokenizer found for {source.display}: put spiece.model or tokenizer.json next to the weights "
        f"(in {source.tokenizer_candidates[0]}), pass tokenizer_path=..., or run inside ComfyUI, "
        "which ships one in comfy/text_encoders/t5_tokenizer")


_tokenizers: dict = {}  # (folder, file mtimes) -> tokenizer; they are read-only once built


def _load_tokenizer(folder: Path, vocab_size: int):
    stamp = tuple((folder / f).stat().st_mtime_ns if (folder / f).is_file() else 0 for f in _TOKENIZER_FILES)
    tokenizer = _tokenizers.get((str(folder), stamp))
    if tokenizer is None:
        tokenizer = _tokenizers[(str(folder), stamp)] = _read_tokenizer(folder)
    if len(tokenizer) > vocab_size:
        raise T5LoadError(f"the tokenizer in {folder} has {len(tokenizer)} tokens but the T5 weights only "
                          f"{vocab_size} embeddings; they do not belong together")
    return tokenizer


def _read_tokenizer(folder: Path):
    from transformers import T5TokenizerFast

    try:
        tokenizer = T5TokenizerFast.from_pretrained(str(folder))
    except Exception as e:
        raise T5LoadError(f"could not load a T5 tokenizer from {folder} ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                          "it needs a valid tokenizer.json, or spiece.model with the sentencepiece package") from None
    if tokenizer.pad_token_id != 0 or tokenizer.eos_token_id != 1:
        raise T5LoadError(f"the tokenizer in {folder} is not a T5 tokenizer (pad id {tokenizer.pad_token_id}, "
                          f"eos id {tokenizer.eos_token_id}; T5 uses 0 and 1)")
    return tokenizer
