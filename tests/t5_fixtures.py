"""Tiny T5 v1.1 encoders written in the layouts pixart_core.t5 accepts, for tests.

Shape: d_model 32, 2 layers, 4 heads x d_kv 8, d_ff 64, vocab 32128 (the real T5 vocabulary, so
the real tokenizer's ids are valid). Weights are random from a fixed seed and rounded to values
that float16 holds exactly, so fp32 and fp16 files hold the same numbers.
The tokenizer is ComfyUI's own (comfy/text_encoders/t5_tokenizer) from the local ComfyUI tree.
"""
from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parent.parent
COMFY_ROOT = REPO / ".cache" / "comfyui" / "ComfyUI"  # made by scripts/build_comfyui_host.sh
COMFY_T5_TOKENIZER_DIR = COMFY_ROOT / "comfy" / "text_encoders" / "t5_tokenizer"

TINY_CONFIG = {
    "architectures": ["T5EncoderModel"],
    "model_type": "t5",
    "vocab_size": 32128,
    "d_model": 32,
    "d_kv": 8,
    "d_ff": 64,
    "num_layers": 2,
    "num_heads": 4,
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "feed_forward_proj": "gated-gelu",
    "layer_norm_epsilon": 1e-6,
    "dropout_rate": 0.0,
    "is_encoder_decoder": False,
    "use_cache": False,
}
FP8_MAX = 448.0  # largest float8_e4m3fn value


def tiny_t5_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Float32 weights under Hugging Face names (`shared.weight`, no `encoder.embed_tokens.weight`)."""
    c = TINY_CONFIG
    d, inner, ff = c["d_model"], c["num_heads"] * c["d_kv"], c["d_ff"]
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, std):
        return (torch.randn(*shape, generator=gen) * std).half().float()

    def norm():
        return (1.0 + torch.randn(d, generator=gen) * 0.1).half().float()

    sd = {"shared.weight": rand(c["vocab_size"], d, std=1.0)}
    for i in range(c["num_layers"]):
        att = f"encoder.block.{i}.layer.0."
        for proj in ("q", "k", "v"):
            sd[att + f"SelfAttention.{proj}.weight"] = rand(inner, d, std=d ** -0.5)
        sd[att + "SelfAttention.o.weight"] = rand(d, inner, std=inner ** -0.5)
        if i == 0:  # T5 shares the first layer's position bias with every layer
            sd[att + "SelfAttention.relative_attention_bias.weight"] = rand(
                c["relative_attention_num_buckets"], c["num_heads"], std=1.0)
        sd[att + "layer_norm.weight"] = norm()
        ffn = f"encoder.block.{i}.layer.1."
        sd[ffn + "DenseReluDense.wi_0.weight"] = rand(ff, d, std=d ** -0.5)
        sd[ffn + "DenseReluDense.wi_1.weight"] = rand(ff, d, std=d ** -0.5)
        sd[ffn + "DenseReluDense.wo.weight"] = rand(d, ff, std=ff ** -0.5)
        sd[ffn + "layer_norm.weight"] = norm()
    sd["encoder.final_layer_norm.weight"] = norm()
    return sd


def copy_tokenizer(folder) -> Path:
    """Copy ComfyUI's T5 tokenizer files (tokenizer.json and its configs) into folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(COMFY_T5_TOKENIZER_DIR / name, folder / name)
    return folder


def write_spiece_model(folder) -> Path:
    """Write spiece.model (sentencepiece) holding the same vocabulary as ComfyUI's tokenizer.json,
    so the sentencepiece path can be tested without downloading the original file."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    spec = json.loads((COMFY_T5_TOKENIZER_DIR / "tokenizer.json").read_text())
    model = pb.ModelProto()
    model.trainer_spec.model_type = pb.TrainerSpec.UNIGRAM
    model.trainer_spec.pad_id, model.trainer_spec.eos_id, model.trainer_spec.unk_id = 0, 1, 2
    model.trainer_spec.bos_id = -1
    charsmap = next(n for n in spec["normalizer"]["normalizers"] if n["type"] == "Precompiled")
    model.normalizer_spec.name = "nmt_nfkc"
    model.normalizer_spec.precompiled_charsmap = base64.b64decode(charsmap["precompiled_charsmap"])
    model.normalizer_spec.add_dummy_prefix = True
    model.normalizer_spec.remove_extra_whitespaces = True
    model.normalizer_spec.escape_whitespaces = True
    kinds = {0: pb.ModelProto.SentencePiece.CONTROL, 1: pb.ModelProto.SentencePiece.CONTROL,
             2: pb.ModelProto.SentencePiece.UNKNOWN}
    pieces = [p for p in spec["model"]["vocab"] if not p[0].startswith("<extra_id_")]  # T5 adds those itself
    for i, (piece, score) in enumerate(pieces):
        entry = model.pieces.add()
        entry.piece, entry.score = piece, score
        entry.type = kinds.get(i, pb.ModelProto.SentencePiece.NORMAL)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "spiece.model").write_bytes(model.SerializeToString())
    return folder / "spiece.model"


def _cast(sd, dtype):
    if dtype not in ("fp32", "fp16"):
        raise ValueError(f"Hugging Face fixture dtype must be fp32 or fp16, got {dtype!r}")
    return {k: v.to(torch.float32 if dtype == "fp32" else torch.float16) for k, v in sd.items()}


def write_tiny_t5_hf_folder(folder, sharded: bool = False, dtype: str = "fp16", state_dict=None) -> Path:
    """A Hugging Face T5EncoderModel folder: config.json, model.safetensors (or two shards with
    model.safetensors.index.json) and the tokenizer files. fp16 by default, which keeps the folder
    under 5 MB and loses nothing (the fixture weights are fp16 values)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sd = _cast(state_dict or tiny_t5_state_dict(), dtype)
    (folder / "config.json").write_text(json.dumps(TINY_CONFIG, indent=2))
    if sharded:
        names = sorted(sd)
        shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
                  "model-00002-of-00002.safetensors": names[len(names) // 2:]}
        for file, keys in shards.items():
            save_file({k: sd[k].contiguous() for k in keys}, str(folder / file))
        index = {"metadata": {}, "weight_map": {k: file for file, keys in shards.items() for k in keys}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    else:
        save_file({k: v.contiguous() for k, v in sd.items()}, str(folder / "model.safetensors"))
    copy_tokenizer(folder)
    return folder


def write_tiny_t5_bin_folder(folder, dtype: str = "fp16") -> Path:
    """A Hugging Face folder with pytorch_model.bin and the tokenizer files."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(TINY_CONFIG, indent=2))
    torch.save(_cast(tiny_t5_state_dict(), dtype), str(folder / "pytorch_model.bin"))
    copy_tokenizer(folder)
    return folder


def write_tiny_t5_diffusers_root(root, dtype: str = "fp16") -> Path:
    """A diffusers pipeline root: text_encoder/ (weights) and tokenizer/ (spiece.model only, as the
    PixArt-Σ diffusers repos ship it)."""
    root = Path(root)
    encoder = root / "text_encoder"
    encoder.mkdir(parents=True, exist_ok=True)
    (encoder / "config.json").write_text(json.dumps(TINY_CONFIG, indent=2))
    save_file(_cast(tiny_t5_state_dict(), dtype), str(encoder / "model.safetensors"))
    write_spiece_model(root / "tokenizer")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "PixArtSigmaPipeline"}))
    return root


def quantise_scaled_fp8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor absmax scaling as ComfyUI's scaled fp8 files use: weight ~ fp8 * scale."""
    scale = weight.abs().max().float() / FP8_MAX
    return (weight.float() / scale).to(torch.float8_e4m3fn), scale.reshape(())


def write_tiny_t5_single_file(path, dtype: str = "fp16", state_dict=None) -> Path:
    """One ComfyUI-style file (models/text_encoders), without a tokenizer next to it.

    dtype "fp32"/"fp16": HF key names with `shared.weight`.
    "fp8_e4m3fn": every tensor cast to fp8, embedding as `encoder.embed_tokens.weight` only.
    "scaled_fp8": Linear weights fp8 with a float32 `<layer>.scale_weight` each, other tensors fp16,
    a `scaled_fp8` marker tensor, both embedding names, and one `scale_input` (ignored by loaders).
    """
    sd = dict(state_dict or tiny_t5_state_dict())
    out = {}
    if dtype in ("fp32", "fp16"):
        cast = torch.float32 if dtype == "fp32" else torch.float16
        out = {k: v.to(cast) for k, v in sd.items()}
    elif dtype == "fp8_e4m3fn":
        out = {k: v.to(torch.float8_e4m3fn) for k, v in sd.items()}
        out["encoder.embed_tokens.weight"] = out.pop("shared.weight")
    elif dtype == "scaled_fp8":
        for key, value in sd.items():
            is_linear = key.endswith(("q.weight", "k.weight", "v.weight", "o.weight", "wi_0.weight",
                                      "wi_1.weight", "wo.weight"))
            if is_linear:
                out[key], out[key[: -len("weight")] + "scale_weight"] = quantise_scaled_fp8(value)
            else:
                out[key] = value.half()
        out["encoder.embed_tokens.weight"] = out["shared.weight"].clone()
        out["encoder.block.0.layer.0.SelfAttention.q.scale_input"] = torch.ones(())
        out["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    else:
        raise ValueError(f"unknown fixture dtype {dtype!r}; use fp32, fp16, fp8_e4m3fn or scaled_fp8")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in out.items()}, str(path))
    return path


def write_clip_l_like_file(path) -> Path:
    """A few tensors in CLIP-L text-encoder layout (small shapes): what clip_l.safetensors looks like."""
    gen = torch.Generator().manual_seed(1)
    width, vocab, positions = 16, 64, 77
    sd = {
        "text_model.embeddings.token_embedding.weight": torch.randn(vocab, width, generator=gen),
        "text_model.embeddings.position_embedding.weight": torch.randn(positions, width, generator=gen),
        "text_model.final_layer_norm.weight": torch.ones(width),
        "text_model.final_layer_norm.bias": torch.zeros(width),
    }
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
        sd[f"text_model.encoder.layers.0.self_attn.{proj}.weight"] = torch.randn(width, width, generator=gen)
        sd[f"text_model.encoder.layers.0.self_attn.{proj}.bias"] = torch.zeros(width)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.half() for k, v in sd.items()}, str(path))
    return path
