"""T5 encoders written as GGUF files the way llama.cpp lays them out (names, architecture, tensor types).

Uses the `gguf` package's writer and its Q8_0 quantizer; gguf has no K-quant quantizer, so Q4_K is
quantized here (per 256-value block: 8 sub-blocks of 32 with 6-bit scales and mins, 4-bit values),
and the tests check the bytes against gguf's own dequantizer.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

GGUF_BLOCK = {  # Hugging Face name inside encoder.block.N -> llama.cpp's
    "layer.0.layer_norm": "attn_norm", "layer.0.SelfAttention.q": "attn_q", "layer.0.SelfAttention.k": "attn_k",
    "layer.0.SelfAttention.v": "attn_v", "layer.0.SelfAttention.o": "attn_o",
    "layer.0.SelfAttention.relative_attention_bias": "attn_rel_b", "layer.1.layer_norm": "ffn_norm",
    "layer.1.DenseReluDense.wi_0": "ffn_gate", "layer.1.DenseReluDense.wi_1": "ffn_up",
    "layer.1.DenseReluDense.wo": "ffn_down",
}


def t5_state_dict(d_model=256, d_ff=512, heads=4, d_kv=64, layers=2, vocab=32128, seed=0, first_layer=0):
    """Random T5 v1.1 encoder weights under Hugging Face names (fp16-exact values)."""
    g = torch.Generator().manual_seed(seed)
    inner = heads * d_kv

    def rand(*shape, std):
        return (torch.randn(*shape, generator=g) * std).half().float()

    def norm():
        return (1.0 + torch.randn(d_model, generator=g) * 0.1).half().float()

    sd = {"shared.weight": rand(vocab, d_model, std=1.0)}
    for i in range(first_layer, first_layer + layers):
        att, ffn = f"encoder.block.{i}.layer.0.", f"encoder.block.{i}.layer.1."
        for proj in ("q", "k", "v"):  # small q/k: T5 has no 1/sqrt(d) in attention, keep the logits O(1)
            sd[att + f"SelfAttention.{proj}.weight"] = rand(inner, d_model, std=(1.0 if proj == "v" else 0.2)
                                                            * d_model ** -0.5)
        sd[att + "SelfAttention.o.weight"] = rand(d_model, inner, std=inner ** -0.5)
        if i == 0:
            sd[att + "SelfAttention.relative_attention_bias.weight"] = rand(32, heads, std=1.0)
        sd[att + "layer_norm.weight"] = norm()
        sd[ffn + "DenseReluDense.wi_0.weight"] = rand(d_ff, d_model, std=d_model ** -0.5)
        sd[ffn + "DenseReluDense.wi_1.weight"] = rand(d_ff, d_model, std=d_model ** -0.5)
        sd[ffn + "DenseReluDense.wo.weight"] = rand(d_model, d_ff, std=d_ff ** -0.5)
        sd[ffn + "layer_norm.weight"] = norm()
    sd["encoder.final_layer_norm.weight"] = norm()
    return sd


def gguf_name(hf: str) -> str:
    stem, suffix = hf.rsplit(".", 1)
    if stem == "shared":
        return f"token_embd.{suffix}"
    if stem == "encoder.final_layer_norm":
        return f"enc.output_norm.{suffix}"
    _, _, i, rest = stem.split(".", 3)
    return f"enc.blk.{i}.{GGUF_BLOCK[rest]}.{suffix}"


def quantize_q4_k(x: np.ndarray) -> np.ndarray:
    """float32 (rows, n·256) -> Q4_K bytes (rows, n·144)."""
    rows = x.shape[0]
    sub = x.reshape(-1, 8, 32).astype(np.float32)
    lo = np.minimum(sub.min(-1), 0.0)
    scale = (sub.max(-1) - lo) / 15.0
    low = -lo
    d = (scale.max(-1) / 63.0).astype(np.float16)
    dmin = (low.max(-1) / 63.0).astype(np.float16)
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.clip(np.nan_to_num(np.rint(scale / d.astype(np.float32)[:, None])), 0, 63).astype(np.uint8)
        mn = np.clip(np.nan_to_num(np.rint(low / dmin.astype(np.float32)[:, None])), 0, 63).astype(np.uint8)
        step = d.astype(np.float32)[:, None] * sc
        offset = dmin.astype(np.float32)[:, None] * mn
        q = np.clip(np.nan_to_num(np.rint((sub + offset[..., None]) / step[..., None])), 0, 15).astype(np.uint8)
    scales = np.concatenate([(sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6), (mn[:, :4] & 63) | ((mn[:, 4:] >> 4) << 6),
                             (sc[:, 4:] & 15) | ((mn[:, 4:] & 15) << 4)], axis=1)
    q = q.reshape(-1, 4, 2, 32)
    qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)
    blocks = np.concatenate([d.reshape(-1, 1).view(np.uint8), dmin.reshape(-1, 1).view(np.uint8), scales, qs], axis=1)
    return blocks.reshape(rows, -1)


def write_t5_gguf(path, sd: dict, qtype: str = "Q8_0", arch: str = "t5encoder", extra: dict | None = None) -> Path:
    """Write sd (Hugging Face names) as a llama.cpp-style T5 GGUF; matrices in qtype, norms and the bias F32."""
    import gguf
    path = Path(path)
    writer = gguf.GGUFWriter(str(path), arch=arch)
    writer.add_block_count(1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.block.")))
    T = gguf.GGMLQuantizationType
    for name, tensor in {**sd, **(extra or {})}.items():
        data = tensor.float().numpy()
        target = gguf_name(name) if name in sd else name  # extra tensors come with GGUF names
        dense = data.ndim < 2 or "relative_attention_bias" in name or "layer_norm" in name
        if dense or qtype == "F32":
            writer.add_tensor(target, data.astype(np.float32))
        elif qtype == "F16":
            writer.add_tensor(target, data.astype(np.float16))
        elif qtype == "Q4_K":
            writer.add_tensor(target, quantize_q4_k(data), raw_dtype=T.Q4_K)
        else:
            writer.add_tensor(target, gguf.quants.quantize(data, T[qtype]), raw_dtype=T[qtype])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_llama_gguf(path) -> Path:
    import gguf
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_tensor("token_embd.weight", np.zeros((8, 32), dtype=np.float32))
    writer.add_tensor("blk.0.attn_q.weight", np.zeros((32, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)
