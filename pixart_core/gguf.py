"""T5 encoders in GGUF, as llama.cpp writes them (and ComfyUI-GGUF users keep them in models/text_encoders).

Tensor names are llama.cpp's for T5 (`token_embd`, `enc.blk.N.attn_q`, `enc.blk.N.ffn_gate`,
`enc.output_norm`, ...; architecture `t5encoder`, or `t5` with a decoder, which is ignored) and
are mapped to Hugging Face names here. Quantized weights (Q8_0, K-quants, ...) stay quantized in
memory: `QuantizedLinear` / `QuantizedEmbedding` dequantize them each time they are used (an
embedding only the rows it looks up). F32/F16/BF16 tensors are ordinary tensors.

Reading and dequantizing use the `gguf` package (optional: `pip install gguf`). Q8_0 and the float
types are also dequantized in torch, on whatever device the weights are on; the other types go
through gguf's NumPy code on the CPU.
"""
from __future__ import annotations

import re
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .checks import InputError

T5_ARCHITECTURES = ("t5encoder", "t5")
INSTALL_HINT = "pip install gguf"
_FLOAT_TYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_BLOCK = {  # llama.cpp's name inside enc.blk.N -> Hugging Face's inside encoder.block.N
    "attn_norm": "layer.0.layer_norm",
    "attn_q": "layer.0.SelfAttention.q",
    "attn_k": "layer.0.SelfAttention.k",
    "attn_v": "layer.0.SelfAttention.v",
    "attn_o": "layer.0.SelfAttention.o",
    "attn_rel_b": "layer.0.SelfAttention.relative_attention_bias",
    "ffn_norm": "layer.1.layer_norm",
    "ffn_gate": "layer.1.DenseReluDense.wi_0",
    "ffn_up": "layer.1.DenseReluDense.wi_1",
    "ffn_down": "layer.1.DenseReluDense.wo",
}
_TOP = {"token_embd": "shared", "enc.output_norm": "encoder.final_layer_norm"}
_IGNORED = re.compile(r"^(dec\.|output\.weight$)")  # the decoder and LM head of a full T5 file


class GGUFError(InputError):
    """A GGUF file that cannot be used as PixArt's T5."""


def _gguf():
    try:
        import gguf
    except ImportError:
        raise GGUFError(f"reading GGUF files needs the gguf package, which is not installed: run "
                        f"`{INSTALL_HINT}` in ComfyUI's Python environment") from None
    return gguf


def hf_name(name: str) -> str | None:
    """llama.cpp T5 tensor name -> Hugging Face name; None for decoder tensors; unknown names unchanged."""
    if _IGNORED.match(name):
        return None
    stem, dot, suffix = name.rpartition(".")
    m = re.fullmatch(r"enc\.blk\.(\d+)\.(\w+)", stem)
    if m and m.group(2) in _BLOCK:
        return f"encoder.block.{m.group(1)}.{_BLOCK[m.group(2)]}.{suffix}"
    if stem in _TOP:
        return f"{_TOP[stem]}.{suffix}"
    return name


class QuantizedTensor:
    """One GGUF tensor as stored: raw bytes (rows, bytes per row) as uint8, its type name and torch shape."""

    def __init__(self, raw: torch.Tensor, qtype: str, shape: tuple):
        self.raw, self.qtype, self.shape = raw, qtype, tuple(shape)

    @property
    def nbytes(self) -> int:
        return self.raw.numel()


def dequantize(raw: torch.Tensor, qtype: str, shape: tuple, dtype=torch.float32) -> torch.Tensor:
    """Raw GGUF bytes (..., bytes per row) -> a `shape` tensor of `dtype` on raw's device."""
    if qtype in _FLOAT_TYPES:
        return raw.contiguous().view(_FLOAT_TYPES[qtype]).reshape(shape).to(dtype)
    if qtype == "Q8_0":  # blocks of 32: a float16 scale, then 32 int8
        blocks = raw.reshape(-1, 34)
        scale = blocks[:, :2].contiguous().view(torch.float16).to(dtype)
        return (blocks[:, 2:].contiguous().view(torch.int8).to(dtype) * scale).reshape(shape)
    gguf = _gguf()
    values = gguf.quants.dequantize(raw.cpu().numpy(), gguf.GGMLQuantizationType[qtype])
    return torch.from_numpy(values).reshape(shape).to(device=raw.device, dtype=dtype)


class QuantizedLinear(nn.Module):
    """nn.Linear (no bias, as in T5) whose weight stays GGUF-quantized; dequantized on every call.

    `weight` is None so code that inspects `.weight` (transformers' T5 feed-forward) leaves it alone.
    The input is computed in `dtype` (float32 for T5's `wo` under float16, as for dense weights)."""
    weight = None

    def __init__(self, q: QuantizedTensor, dtype):
        super().__init__()
        self.qtype, self.out_features, self.in_features = q.qtype, q.shape[0], q.shape[1]
        self.dtype = dtype
        self.register_buffer("qweight", q.raw)

    def forward(self, x):
        w = dequantize(self.qweight, self.qtype, (self.out_features, self.in_features), self.dtype)
        return F.linear(x.to(self.dtype), w.to(x.device))  # (..., in) -> (..., out)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.qtype}"


class QuantizedEmbedding(nn.Module):
    """nn.Embedding whose table stays GGUF-quantized; a lookup dequantizes only the rows it uses."""
    weight = None

    def __init__(self, q: QuantizedTensor, dtype):
        super().__init__()
        self.qtype, (self.num_embeddings, self.embedding_dim) = q.qtype, q.shape
        self.dtype = dtype
        self.register_buffer("qweight", q.raw)

    def forward(self, ids):
        rows = self.qweight[ids.reshape(-1).to(self.qweight.device)]  # (n, bytes per row)
        out = dequantize(rows, self.qtype, (rows.shape[0], self.embedding_dim), self.dtype)
        return out.reshape(*ids.shape, self.embedding_dim).to(ids.device)  # (..., D)

    def extra_repr(self):
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.qtype}"


class GGUFReader:
    """A T5 GGUF file under Hugging Face names: keys, shapes, dense tensors, or the quantized form."""

    def __init__(self, file):
        gguf = _gguf()
        try:
            reader = gguf.GGUFReader(str(file))
        except Exception as e:  # noqa: BLE001 - the reader raises several types for a bad file
            raise GGUFError(f"{file} is not a readable GGUF file ({e}); it may be truncated: download it again") from None
        arch = _string_field(reader, "general.architecture")
        if arch not in T5_ARCHITECTURES:
            raise GGUFError(f"{file} is a GGUF file of a {arch or 'unnamed'} model (architecture {arch!r}), not a "
                            "T5 encoder; use a T5 v1.1 XXL GGUF such as t5-v1_1-xxl-encoder-Q8_0.gguf")
        self._tensors = {}
        for t in reader.tensors:
            name = hf_name(t.name)
            if name is not None:
                self._tensors[name] = t
        self.file = file

    def keys(self):
        return self._tensors.keys()

    def shape(self, key):
        return tuple(int(v) for v in reversed(self._tensors[key].shape))

    def qtype(self, key) -> str:
        return self._tensors[key].tensor_type.name

    def quantized(self, key) -> QuantizedTensor | None:
        """The stored form of a quantized tensor (None for F32/F16/BF16 ones)."""
        if self.qtype(key) in _FLOAT_TYPES:
            return None
        return QuantizedTensor(self._raw(key), self.qtype(key), self.shape(key))

    def get(self, key) -> torch.Tensor:
        """The tensor dequantized to float32 (float types as stored)."""
        qtype, shape = self.qtype(key), self.shape(key)
        if qtype in _FLOAT_TYPES:
            return self._raw(key).view(_FLOAT_TYPES[qtype]).reshape(shape).clone()  # dense: a writable copy
        return dequantize(self._raw(key), qtype, shape)

    def _raw(self, key) -> torch.Tensor:
        data = np.ascontiguousarray(self._tensors[key].data)
        rows = self.shape(key)[0] if len(self.shape(key)) > 1 else 1
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            raw = torch.from_numpy(data.view(np.uint8)).reshape(rows, -1)
        return raw  # a read-only view of the memory-mapped file (as ComfyUI-GGUF keeps it): no second copy

    def close(self):
        self._tensors = {}


def _string_field(reader, name):
    field = reader.get_field(name)
    if field is None:
        return None
    try:
        return bytes(field.parts[field.data[-1]]).decode("utf-8")
    except (IndexError, TypeError, UnicodeDecodeError):
        return None
