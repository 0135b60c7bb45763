"""PixArt-Σ / PixArt-α diffusion transformer with KV-compressed self-attention.

A from-scratch implementation of ../shared/pixart_spec.md §2 whose module names are the official
state-dict keys (§3.1), so official checkpoints load without renaming. Shapes use B batch,
H×W latent, h×w token grid (H/p × W/p), N = h·w image tokens, L caption tokens, D hidden size.
Every layer takes `dtype`, `device` and `operations` (see ops.py) so precision and offloading
policy live with the caller.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Mapping, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .bins import nearest_bin_key
from .checks import InputError
from .config import KV_COMPRESS_MODES, PixArtConfig
from .ops import CastOps, gemm_dtype, linear_params, load_tables_by_official_names


#################################################################################
#                    Sine/cosine embeddings (spec §2.3, §2.4)                   #
#################################################################################

def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """(B,) float timesteps -> (B, dim) [cos | sin] features, always computed in fp32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def sincos_pos_embed(h: int, w: int, dim: int, base_size: int, pe_interpolation: float,
                     device=None) -> torch.Tensor:
    """(h·w, dim) fp32 2-D position embedding of the reference: channels [w-sin, w-cos, h-sin, h-cos].

    Each axis is mapped onto [0, base_size / pe_interpolation) whatever the grid size, which is what
    keeps a 2K model's positions inside its trained range at 4K.
    """
    quarter = dim // 4
    freqs = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64, device=device) / quarter)

    def axis(n: int) -> torch.Tensor:  # (n, dim/2)
        pos = torch.arange(n, dtype=torch.float32, device=device) / (n / base_size) / pe_interpolation
        angles = pos.double()[:, None] * freqs[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1).float()

    emb_w, emb_h = axis(w), axis(h)
    grid = torch.cat([emb_w[None].expand(h, w, -1), emb_h[:, None].expand(h, w, -1)], dim=-1)  # (h, w, dim)
    return grid.reshape(h * w, dim)


def caption_mask(context: torch.Tensor) -> torch.Tensor:
    """(B, L, C) caption embeddings -> (B, L) bool, the tokens to attend to: exactly-zero rows are
    padding. So a mask can travel inside the embeddings (masked_captions), kept right by anything
    that slices, concatenates, pads with zeros or averages them. An all-zero caption keeps its first
    token: its tokens are all alike, so attending to one is attending to all."""
    mask = context.ne(0).any(-1)  # (B, L)
    mask[:, 0] |= ~mask.any(1)
    return mask


def masked_captions(embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, L, C) embeddings with the rows `mask` (B, L) leaves out set to exactly zero."""
    return torch.where(mask.bool()[..., None].to(embeds.device), embeds, 0)


def modulate(x, shift, scale):
    return torch.addcmul(shift, x, 1 + scale)


def layer_norm(x, eps=1e-6):
    return F.layer_norm(x, x.shape[-1:], eps=eps)


def modulated_norm(x, shift, scale, shared=False):
    """modulate(layer_norm(x), shift, scale); one fused pass when all samples share the modulation."""
    if shared:
        return F.layer_norm(x, x.shape[-1:], 1 + scale[0, 0], shift[0, 0], eps=1e-6)
    return modulate(layer_norm(x), shift, scale)


def add_gated(x, gate, linear, inp, shared=False):
    """x + gate·linear(inp). Without autograd and with one gate for all samples (always so under CFG),
    the gate is folded into the layer's weights and the GEMM accumulates straight into x, in place:
    no temporary, no extra pass over the residual stream."""
    params = linear_params(linear, inp) if shared and not torch.is_grad_enabled() else None
    if params is None or params[0].dtype != x.dtype or not x.is_contiguous():
        return torch.addcmul(x, gate, linear(inp))
    w, b = params
    g = gate[0, 0]  # (D,)
    rows = x.view(-1, x.shape[-1])  # (B·N, D)
    if b is not None:
        rows.add_(b * g)
    rows.addmm_(inp.reshape(-1, inp.shape[-1]), (w * g[:, None]).t())
    return x


#################################################################################
#                               Embedding layers                                #
#################################################################################

class PatchEmbed(nn.Module):
    def __init__(self, patch_size, in_channels, hidden_size, dtype=None, device=None, operations=CastOps):
        super().__init__()
        self.proj = operations.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size, bias=True,
                                      dtype=dtype, device=device)

    def forward(self, x):
        # contiguous: otherwise the residual stream keeps the conv's channels-first layout through
        # every block, and each LayerNorm and linear copies it first
        return self.proj(x).flatten(2).transpose(1, 2).contiguous()  # (B, D, h, w) -> (B, N, D)


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden_size, freq_dim=256, dtype=None, device=None, operations=CastOps):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(
            operations.Linear(freq_dim, hidden_size, dtype=dtype, device=device),
            nn.SiLU(),
            operations.Linear(hidden_size, hidden_size, dtype=dtype, device=device),
        )

    def forward(self, t, dtype):
        return self.mlp(timestep_embedding(t, self.freq_dim).to(dtype))  # (B, D)


class SizeEmbedder(TimestepEmbedder):
    """α micro-conditioning: each scalar (height, width or aspect ratio) gets its own sinusoid."""

    def forward(self, s, batch, dtype):
        s = s.reshape(s.shape[0], -1)  # (b, n_scalars)
        if s.shape[0] != batch:
            s = s.repeat(batch // s.shape[0], 1)
        emb = self.mlp(timestep_embedding(s.flatten(), self.freq_dim).to(dtype))  # (B·n, D/3)
        return emb.reshape(batch, -1)  # (B, n·D/3)


class Mlp(nn.Module):
    def __init__(self, in_features, hidden_features, out_features, dtype=None, device=None, operations=CastOps):
        super().__init__()
        self.fc1 = operations.Linear(in_features, hidden_features, dtype=dtype, device=device)
        self.fc2 = operations.Linear(hidden_features, out_features, dtype=dtype, device=device)

    def hidden(self, x):
        h = self.fc1(x)
        # in place when no gradient is needed: saves allocating another 4·D-wide activation
        return F.gelu(h, approximate="tanh") if torch.is_grad_enabled() else torch.ops.aten.gelu_(h, approximate="tanh")

    def forward(self, x):
        return self.fc2(self.hidden(x))


def table_layer(operations):
    """The operations' Table layer (ops.Table), or pixart_core's where they have none."""
    return getattr(operations, "Table", CastOps.Table)


class CaptionEmbedder(nn.Module):
    def __init__(self, caption_channels, hidden_size, max_length, dtype=None, device=None, operations=CastOps):
        super().__init__()
        self.y_proj = Mlp(caption_channels, hidden_size, hidden_size, dtype=dtype, device=device, operations=operations)
        # The training-time null caption (T5("") for Σ): never trained, but saved.
        self.y_embedding = table_layer(operations)(max_length, caption_channels, trainable=False, dtype=dtype,
                                                   device=device)
        load_tables_by_official_names(self)

    def forward(self, context):
        return self.y_proj(context)  # (B, L, C) -> (B, L, D)


#################################################################################
#                     Attention with KV compression (spec §2.1)                 #
#################################################################################

@dataclass(frozen=True)
class KVCompress:
    """Which self-attention layers compress keys/values, by how much, and how."""
    layers: tuple[int, ...] = ()
    ratio: int = 2
    mode: str = "conv"

    def __post_init__(self):
        if self.mode not in KV_COMPRESS_MODES:
            raise InputError(f"KV compression mode must be one of {KV_COMPRESS_MODES}, got {self.mode!r}")
        if self.ratio < 1:
            raise InputError(f"KV compression ratio must be >= 1, got {self.ratio}")

    @classmethod
    def from_config(cls, config: PixArtConfig) -> "KVCompress":
        return cls(tuple(config.kv_compress_layers), config.kv_compress_ratio, config.kv_compress_mode)

    def for_layer(self, i: int) -> "KVCompress | None":
        return self if (self.ratio > 1 and i in self.layers) else None


_LAYER_ITEM = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+)\s*)?$")
MAX_LAYER_TEXT = 1000  # characters of a layer list; a 28-block model needs at most about 80


def parse_layers(text: str, depth: int | None) -> tuple[int, ...]:
    """'14-27', '0,2,5-9', 'all' or 'none' -> sorted layer indices, checked against the model's depth.

    Every number is checked before any range is built, so no text can make this allocate more than
    `depth` entries. depth None checks the syntax only (returns ()), as ComfyUI's queue-time check does.
    """
    if not isinstance(text, str):
        raise InputError(f"layers must be text such as 14-27, got {type(text).__name__}")
    spec = text.strip().lower()
    if len(spec) > MAX_LAYER_TEXT:
        raise InputError(f"layers is {len(spec):,} characters long; a layer list is short, like 14-27 or "
                         "0,2,5-9 (or all)")
    if spec == "all":
        return tuple(range(depth or 0))
    if spec in ("", "none", "off"):
        return ()
    ranges = []
    for part in spec.split(","):
        m = _LAYER_ITEM.match(part)
        if m is None:
            raise InputError(f"layers {text!r} is not a layer list; write numbers and ranges like 14-27 or 0,2,5-9, "
                             "or all")
        lo_digits, hi_digits = m.group(1), m.group(2) or m.group(1)
        if max(len(lo_digits), len(hi_digits)) > 6:  # no model has a million blocks: stop before int()
            big = hi_digits if len(hi_digits) > 6 else lo_digits
            raise InputError(f"layers names layer {big[:9]}..., which no model has; use numbers like 14-27"
                             + (f" up to {depth - 1}" if depth else "") + ", or all")
        lo, hi = int(lo_digits), int(hi_digits)
        if hi < lo:
            raise InputError(f"layers {text!r} has the range {lo}-{hi}, which runs backwards; write it as {hi}-{lo}")
        if depth is not None and hi >= depth:
            raise InputError(f"layers {text!r} names layer {hi}, but this model has layers 0-{depth - 1}; "
                             f"use numbers up to {depth - 1} or all")
        ranges.append((lo, hi))
    if depth is None:
        return ()
    return tuple(sorted({i for lo, hi in ranges for i in range(lo, hi + 1)}))


def layer_list_syntax(text: str) -> str:
    """`text` when it is a layer list (syntax only: the numbers are checked once the model's depth is
    known), else InputError; for command-line options."""
    parse_layers(text, None)
    return text


def compress_tokens(t, hw, ratio, mode, sr=None, norm=None):
    """(B, N, D) keys or values on an h×w grid -> (B, N', D) with fewer tokens.

    conv: the reference's depthwise ratio×ratio conv + LayerNorm(eps 1e-5); without weights it
    uses their average initialisation, i.e. average pooling and an identity-affine LayerNorm.
    ave: nearest-neighbour downsampling (the reference's name). uniform: every ratio-th row and
    column. avgpool: plain average pooling, needs no weights. Grids not divisible by the ratio are
    floored (conv, ave, avgpool) or ceiled (uniform), as the reference's operators do.
    """
    B, N, D = t.shape
    h, w = hw
    if h < ratio or w < ratio:
        raise InputError(f"KV compression ratio {ratio} needs a token grid of at least {ratio}x{ratio}, got {h}x{w}")
    grid = t.transpose(1, 2).reshape(B, D, h, w)  # (B, D, h, w)
    if mode == "conv":
        grid = sr(grid) if sr is not None else F.avg_pool2d(grid, ratio)
    elif mode == "avgpool":
        grid = F.avg_pool2d(grid, ratio)
    elif mode == "ave":
        grid = F.interpolate(grid, scale_factor=1 / ratio, mode="nearest")
    elif mode == "uniform":
        grid = grid[:, :, ::ratio, ::ratio]
    else:
        raise InputError(f"unknown KV compression mode {mode!r}")
    t = grid.flatten(2).transpose(1, 2)  # (B, N', D)
    if mode == "conv":
        t = norm(t) if norm is not None else F.layer_norm(t, (D,), eps=1e-5)
    return t


class SelfAttention(nn.Module):
    def __init__(self, dim, num_heads, qk_norm=False, kv_compress_ratio=1, dtype=None, device=None,
                 operations=CastOps):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = operations.Linear(dim, dim * 3, bias=True, dtype=dtype, device=device)
        self.proj = operations.Linear(dim, dim, dtype=dtype, device=device)
        if qk_norm:
            self.q_norm = operations.LayerNorm(dim, eps=1e-5, dtype=dtype, device=device)
            self.k_norm = operations.LayerNorm(dim, eps=1e-5, dtype=dtype, device=device)
        else:
            self.q_norm = self.k_norm = None
        self.sr = self.norm = None
        if kv_compress_ratio > 1:
            self.add_kv_compress_weights(kv_compress_ratio, dtype=dtype, device=device, operations=operations)

    def add_kv_compress_weights(self, ratio, dtype=None, device=None, operations=CastOps):
        dim = self.proj.in_features
        self.sr = operations.Conv2d(dim, dim, ratio, stride=ratio, groups=dim, bias=True, dtype=dtype, device=device)
        self.norm = operations.LayerNorm(dim, eps=1e-5, dtype=dtype, device=device)
        if self.sr.weight.device.type != "meta":
            self.reset_kv_compress_weights()

    @torch.no_grad()
    def reset_kv_compress_weights(self):
        """The reference's average initialisation: the conv starts as ratio×ratio mean pooling."""
        self.sr.weight.fill_(1.0 / (self.sr.kernel_size[0] * self.sr.kernel_size[1]))
        self.sr.bias.zero_()
        self.norm.weight.fill_(1.0)
        self.norm.bias.zero_()

    def forward(self, x, hw, kv: KVCompress | None = None, identity: tuple[int, ...] | None = None):
        return self.proj(self.attend(x, hw, kv, identity))

    def attend(self, x, hw, kv: KVCompress | None = None, identity: tuple[int, ...] | None = None):
        """The attention up to (not including) the output projection: (B, N, D) -> (B, N, D).

        identity: batch rows whose attention map is the identity (perturbed-attention guidance): each
        token attends to itself only, so those rows get their value projection. Under KV compression
        that is each token's own, uncompressed value: identity attention has no keys to pool."""
        qkv = self.qkv(x)  # (B, N, 3D)
        if not identity:
            return self._attention(qkv, hw, kv)
        B, N, D = x.shape
        rows = torch.zeros(B, dtype=torch.bool, device=x.device)
        rows[list(identity)] = True
        out = torch.empty(B, N, D, dtype=qkv.dtype, device=qkv.device)
        out[rows] = qkv[rows, :, 2 * D:]
        if not rows.all():
            out[~rows] = self._attention(qkv[~rows], hw, kv)
        return out

    def _attention(self, qkv, hw, kv: KVCompress | None = None):
        """(B, N, 3D) fused q/k/v -> (B, N, D) attention output, before the output projection."""
        B, N, D = qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3
        heads, hd = self.num_heads, D // self.num_heads
        if kv is None and self.q_norm is None:
            # one copy into head-major q, k, v: SDPA runs faster on contiguous heads than on strided views
            q, k, v = qkv.view(B, N, 3, heads, hd).permute(2, 0, 3, 1, 4).contiguous().unbind(0)  # (B, heads, N, hd)
            out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, hd)
            return out.transpose(1, 2).reshape(B, N, D)
        q, k, v = qkv.chunk(3, dim=-1)  # each (B, N, D)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if kv is not None:
            sr = self.sr if (kv.mode == "conv" and self.sr is not None and self.sr.stride[0] == kv.ratio) else None
            norm = self.norm if sr is not None else None
            k = compress_tokens(k, hw, kv.ratio, kv.mode, sr, norm)  # (B, N', D)
            v = compress_tokens(v, hw, kv.ratio, kv.mode, sr, norm)
        q = q.view(B, N, heads, hd).transpose(1, 2)  # (B, heads, N, hd)
        k = k.reshape(B, -1, heads, hd).transpose(1, 2)  # (B, heads, N', hd)
        v = v.reshape(B, -1, heads, hd).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, hd)
        return out.transpose(1, 2).reshape(B, N, D)


class CrossAttention(nn.Module):
    def __init__(self, dim, num_heads, dtype=None, device=None, operations=CastOps):
        super().__init__()
        self.num_heads = num_heads
        self.q_linear = operations.Linear(dim, dim, dtype=dtype, device=device)
        self.kv_linear = operations.Linear(dim, dim * 2, dtype=dtype, device=device)
        self.proj = operations.Linear(dim, dim, dtype=dtype, device=device)

    def forward(self, x, y, mask=None):
        """x (B, N, D) image tokens attend to y (B, L, D) caption tokens; mask (B, 1, 1, L) bool or None."""
        B, N, D = x.shape
        heads, hd = self.num_heads, D // self.num_heads
        k, v = self.kv_linear(y).chunk(2, dim=-1)  # each (B, L, D)
        k = k.reshape(B, -1, heads, hd).transpose(1, 2)  # (B, heads, L, hd)
        v = v.reshape(B, -1, heads, hd).transpose(1, 2)
        if k.shape[2] < hd and gemm_dtype(x) == torch.float32:  # short captions (most prompts)
            out = self.folded(x, k, v, mask)
            if out is not None:
                return out
        q = self.q_linear(x).view(B, N, heads, hd).transpose(1, 2)  # (B, heads, N, hd)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, heads, N, hd)
        return self.proj(out.transpose(1, 2).reshape(B, N, D))

    def folded(self, x, k, v, mask=None):
        """The same attention with the query and output projections folded into the caption side:
        per head, scores = x·(W_q,hᵀ·k_hᵀ) and out = Σ_h P_h·(v_h·W_o,hᵀ). Only the order of the sums
        changes, and the two D×D GEMMs over every image token become D×(heads·L) ones, cheaper while
        L < head_dim (measured break-even at L = head_dim). Used only where the GEMMs run in fp32:
        the scores come out of a GEMM here, and rounding them to bf16/fp16 would cost more accuracy
        than flash attention does (it keeps them in fp32). None when the layers' weights cannot be
        read (unknown ops)."""
        q_params, o_params = linear_params(self.q_linear, x), linear_params(self.proj, x)
        if q_params is None or o_params is None:
            return None
        (wq, bq), (wo, bo) = q_params, o_params
        B, N, D = x.shape
        _, H, L, hd = k.shape
        dtype = wq.dtype  # fp32, also for bf16/fp16 inputs on CPUs without their kernels
        k, v = k.to(dtype) * hd ** -0.5, v.to(dtype)
        a = torch.einsum("hed,bhle->bdhl", wq.view(H, hd, D), k).reshape(B, D, H * L)  # (B, D, H·L)
        c = (torch.einsum("he,bhle->bhl", bq.view(H, hd), k) if bq is not None
             else k.new_zeros(B, H, L))  # (B, H, L): the query bias's share of the scores
        if mask is not None:
            c = c.masked_fill(~mask.reshape(B, 1, L), float("-inf"))
        scores = torch.baddbmm(c.reshape(B, 1, H * L), x.to(dtype), a)  # (B, N, H·L)
        probs = scores.view(B, N, H, L).softmax(dim=-1).view(B, N, H * L)
        vo = torch.einsum("bhle,dhe->bhld", v, wo.view(D, H, hd)).reshape(B, H * L, D)  # (B, H·L, D)
        if bo is None:
            return torch.bmm(probs, vo).to(x.dtype)  # (B, N, D)
        return torch.baddbmm(bo.view(1, 1, D), probs, vo).to(x.dtype)  # (B, N, D)


#################################################################################
#                                 Core model                                    #
#################################################################################

class PixArtBlock(nn.Module):
    """adaLN-single block: modulated self-attention, plain cross-attention, modulated MLP."""

    def __init__(self, config: PixArtConfig, kv_compress_ratio=1, dtype=None, device=None, operations=CastOps):
        super().__init__()
        D = config.hidden_size
        self.attn = SelfAttention(D, config.num_heads, config.qk_norm, kv_compress_ratio, dtype, device, operations)
        self.cross_attn = CrossAttention(D, config.num_heads, dtype, device, operations)
        self.mlp = Mlp(D, config.mlp_hidden, D, dtype=dtype, device=device, operations=operations)
        self.scale_shift_table = table_layer(operations)(6, D, dtype=dtype, device=device)
        load_tables_by_official_names(self)

    def forward(self, x, y, t0, mask, hw, kv=None, ff_chunk=None, shared=False, identity=None):
        """x (B, N, D) is updated in place when no gradient is needed. shared: all samples have the
        same t0 (same timestep), which lets the modulation and gates fold into the neighbouring ops.
        identity: batch rows whose self-attention is the identity (SelfAttention.attend)."""
        B, N, D = x.shape
        mod = self.scale_shift_table.get(x)[None] + t0.view(B, 6, D)  # (B, 6, D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=1)  # each (B, 1, D)
        h = self.attn.attend(modulated_norm(x, shift_msa, scale_msa, shared), hw, kv, identity)  # (B, N, D), before proj
        x = add_gated(x, gate_msa, self.attn.proj, h, shared)
        cross = self.cross_attn(x, y, mask)  # (B, N, D)
        x = x + cross if torch.is_grad_enabled() else x.add_(cross)
        if not ff_chunk or N <= ff_chunk:
            return add_gated(x, gate_mlp, self.mlp.fc2, self.mlp.hidden(modulated_norm(x, shift_mlp, scale_mlp, shared)),
                             shared)
        # Token-chunked MLP: the 4·D-wide hidden activation is the largest tensor at 4K.
        out = torch.empty_like(x)
        for s in range(0, N, ff_chunk):
            xs = x[:, s:s + ff_chunk]
            out[:, s:s + ff_chunk] = torch.addcmul(xs, gate_mlp, self.mlp(modulated_norm(xs, shift_mlp, scale_mlp, shared)))
        return out


@dataclass(frozen=True)
class PerturbedAttention:
    """Perturbed-attention guidance's perturbation: in the model's blocks `layers`, the self-attention of
    batch rows `rows` is the identity (each token attends to itself only). None rows: the whole batch."""
    layers: tuple[int, ...]
    rows: tuple[int, ...] | None = None

    def rows_for(self, i: int, batch: int) -> tuple[int, ...] | None:
        if i not in self.layers:
            return None
        return tuple(range(batch)) if self.rows is None else self.rows


@dataclass
class BlockInputs:
    """What every block sees in one forward call besides the token stream. `run` is the one place a
    block is called, so anything that runs a copy of block i (a ControlNet) runs it exactly as block
    i: same captions, modulation, mask, KV compression of layer i and MLP chunking."""
    y: torch.Tensor  # (B, L, D) projected captions
    t0: torch.Tensor  # (B, 6D) timestep (+ micro-condition) modulation
    mask: torch.Tensor | None  # (B, 1, 1, L) bool, or None when every caption token is valid
    hw: tuple[int, int]  # token grid h, w
    kv: KVCompress
    ff_chunk: int | None
    shared: bool  # all samples share t0 (one timestep, always so under CFG)
    perturb: PerturbedAttention | None = None

    def run(self, block: PixArtBlock, i: int, tokens: torch.Tensor, own: bool = False) -> torch.Tensor:
        """own: block i is the model's own (perturbed when `perturb` says so). A ControlNet's copy of
        block i is not: PAG perturbs the denoiser, as diffusers' processors do, not its control branch."""
        identity = self.perturb.rows_for(i, tokens.shape[0]) if own and self.perturb is not None else None
        return block(tokens, self.y, self.t0, self.mask, self.hw, self.kv.for_layer(i), self.ff_chunk, self.shared,
                     identity)


class BlockReplace(Protocol):
    """Runs in place of block i (skip-layer guidance, block-level patches): gets the stream before
    the block and `original(tokens, inputs)`, which runs block i as usual on a copy of its tokens
    (blocks update the stream in place), so a replacement may still use what it was given."""

    def __call__(self, tokens: torch.Tensor, inputs: BlockInputs, original) -> torch.Tensor:
        """(B, N, D) stream after block i."""


class BlockHook(Protocol):
    """Something that reads the token stream after block i and adds to it (a ControlNet branch)."""

    def after_block(self, i: int, tokens: torch.Tensor, inputs: BlockInputs) -> torch.Tensor | None:
        """(B, N, D) to add to the stream before block i+1, or None."""


class FinalLayer(nn.Module):
    def __init__(self, hidden_size, patch_size, out_channels, dtype=None, device=None, operations=CastOps):
        super().__init__()
        self.linear = operations.Linear(hidden_size, patch_size * patch_size * out_channels, dtype=dtype, device=device)
        self.scale_shift_table = table_layer(operations)(2, hidden_size, dtype=dtype, device=device)
        load_tables_by_official_names(self)

    def forward(self, x, t):
        shift, scale = (self.scale_shift_table.get(x)[None] + t[:, None]).chunk(2, dim=1)  # (B, 1, D) each
        return self.linear(modulate(layer_norm(x), shift, scale))  # (B, N, p·p·C_out)


class PixArt(nn.Module):
    """PixArt-Σ (and α) DiT. forward(latent, timesteps, captions) -> ε and learned-variance channels."""

    def __init__(self, config: PixArtConfig, dtype=None, device=None, operations=None, init_weights=True):
        super().__init__()
        ops = operations or CastOps
        self.config = config
        self.compute_dtype = dtype or torch.get_default_dtype()
        # Tokens per MLP chunk (exact, see PixArtBlock): only 4K grids are longer, where the 4·D-wide
        # hidden activation would otherwise take 2.4 GB per CFG pair in fp32. None = never chunk.
        self.ff_chunk = 16384
        self.kv_compress = KVCompress.from_config(config)
        D = config.hidden_size
        self.x_embedder = PatchEmbed(config.patch_size, config.in_channels, D, dtype, device, ops)
        self.t_embedder = TimestepEmbedder(D, dtype=dtype, device=device, operations=ops)
        self.t_block = nn.Sequential(nn.SiLU(), ops.Linear(D, 6 * D, dtype=dtype, device=device))
        self.y_embedder = CaptionEmbedder(config.caption_channels, D, config.model_max_length, dtype, device, ops)
        if config.micro_condition:
            self.csize_embedder = SizeEmbedder(D // 3, dtype=dtype, device=device, operations=ops)
            self.ar_embedder = SizeEmbedder(D // 3, dtype=dtype, device=device, operations=ops)
        ratios = [config.kv_compress_ratio if (i in config.kv_compress_layers and config.kv_compress_mode == "conv")
                  else 1 for i in range(config.depth)]
        self.blocks = nn.ModuleList(PixArtBlock(config, r, dtype, device, ops) for r in ratios)
        self.final_layer = FinalLayer(D, config.patch_size, config.out_channels, dtype, device, ops)
        self._pe_cache = {}
        if init_weights and device != "meta" and torch.device(device or "cpu").type != "meta":
            self.initialize_weights()

    @torch.no_grad()
    def initialize_weights(self):
        """The reference initialisation (spec §2.11), for training from scratch and for tests."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        normal = [self.t_embedder.mlp[0], self.t_embedder.mlp[2], self.t_block[1],
                  self.y_embedder.y_proj.fc1, self.y_embedder.y_proj.fc2]
        if self.config.micro_condition:
            normal += [self.csize_embedder.mlp[0], self.csize_embedder.mlp[2],
                       self.ar_embedder.mlp[0], self.ar_embedder.mlp[2]]
        for m in normal:
            nn.init.normal_(m.weight, std=0.02)
        D = self.config.hidden_size
        for block in self.blocks:
            block.scale_shift_table.weight.normal_(0, D ** -0.5)
            nn.init.zeros_(block.cross_attn.proj.weight)
            nn.init.zeros_(block.cross_attn.proj.bias)
            if block.attn.sr is not None:
                block.attn.reset_kv_compress_weights()
            for norm in (block.attn.q_norm, block.attn.k_norm):
                if norm is not None:
                    nn.init.ones_(norm.weight)
                    nn.init.zeros_(norm.bias)
        self.final_layer.scale_shift_table.weight.normal_(0, D ** -0.5)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)
        C = self.config.caption_channels
        self.y_embedder.y_embedding.weight.normal_(0, C ** -0.5)

    # -- helpers ------------------------------------------------------------------

    def pos_embed(self, h, w, device, dtype):
        key = (h, w, device, dtype)
        if key not in self._pe_cache:
            self._pe_cache = {key: sincos_pos_embed(h, w, self.config.hidden_size, self.config.base_size,
                                                    self.config.pe_interpolation, device).to(dtype)}
        return self._pe_cache[key]  # (N, D)

    def _prepare_captions(self, context, context_mask, batch):
        """Caption embeddings -> (B, L', C) and an SDPA mask (B, 1, 1, L') or None. Without
        context_mask the mask is the embeddings' own (caption_mask: exactly-zero rows are padding).

        Columns no sample attends to are dropped: attending to a masked token adds nothing, so this
        is exact, and it cuts 300 padded T5 tokens to the longest prompt.
        """
        if context.ndim == 4:
            context = context.squeeze(1)  # (B, 1, L, C) -> (B, L, C)
        if context.shape[-1] != self.config.caption_channels:
            raise ValueError(
                f"caption embeddings are {context.shape[-1]} wide but this PixArt model expects "
                f"{self.config.caption_channels} (T5-XXL gives 4096): connect the matching T5 encoder")
        if context.shape[0] != batch:
            if batch % context.shape[0]:
                raise ValueError(f"caption batch {context.shape[0]} does not divide latent batch {batch}")
            context = context.repeat(batch // context.shape[0], 1, 1)
        if context_mask is None:
            context_mask = caption_mask(context)
        mask = context_mask.reshape(context_mask.shape[0], -1).to(device=context.device) != 0  # (b, L)
        if mask.shape[1] != context.shape[1]:
            raise ValueError(f"caption mask has {mask.shape[1]} tokens but the embeddings have {context.shape[1]}")
        if mask.shape[0] != batch:  # the reference repeats the prompt mask over the CFG batch
            if batch % mask.shape[0]:
                raise ValueError(f"caption mask batch {mask.shape[0]} does not divide latent batch {batch}")
            mask = mask.repeat(batch // mask.shape[0], 1)
        if not mask.any(1).all():
            raise ValueError("a caption mask has no valid token; a T5 encoding always has at least its EOS token")
        used = int(mask.any(0).nonzero().max()) + 1
        context, mask = context[:, :used], mask[:, :used]
        return context, (None if mask.all() else mask[:, None, None, :])

    def embed(self, x, dtype):
        """(B, C_in, H, W) latent -> (B, N, D) tokens with their position embedding (image and ControlNet hint)."""
        p = self.config.patch_size
        tokens = self.x_embedder(x.to(dtype))  # (B, N, D)
        return tokens + self.pos_embed(x.shape[-2] // p, x.shape[-1] // p, tokens.device, dtype)

    def run_blocks(self, tokens, inputs: BlockInputs, hooks: Sequence[BlockHook] = (),
                   replace: Mapping[int, BlockReplace] | None = None):
        """The block loop. replace[i] runs instead of block i. Hooks all read the stream as block i
        (or its replacement) left it; their outputs add (chained ControlNets sum their contributions).
        A replacement is for the model's own blocks: a ControlNet's copy i still runs after it."""
        for i, block in enumerate(self.blocks):
            swap = replace.get(i) if replace else None
            if swap is None:
                tokens = inputs.run(block, i, tokens, own=True)  # (B, N, D)
            else:
                tokens = swap(tokens, inputs, lambda t, inp, block=block, i=i: inp.run(block, i, t.clone(), own=True))
            for extra in [e for hook in hooks if (e := hook.after_block(i, tokens, inputs)) is not None]:
                tokens = tokens + extra if torch.is_grad_enabled() else tokens.add_(extra)
        return tokens

    def unpatchify(self, x, h, w):
        p, c = self.config.patch_size, self.config.out_channels
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)  # (B, C_out, H, W)

    # -- forward --------------------------------------------------------------------

    def forward(self, x, timesteps, context, context_mask=None, c_size=None, c_ar=None,
                kv_compress: KVCompress | None = None, controls: Sequence = (),
                block_replace: Mapping[int, BlockReplace] | None = None,
                perturb: PerturbedAttention | None = None, **kwargs):
        """
        x: (B, C_in, H, W) latent, H and W divisible by the patch size.
        timesteps: (B,) float, 0..999 scale (non-integer allowed).
        context: (B, L, C) or (B, 1, L, C) caption embeddings; context_mask: (B, L), 1 = valid, or None:
            caption_mask(context) (exactly-zero rows are padding).
        c_size: (B, 2) image height, width in px; c_ar: (B, 1) aspect ratio (α-1024 micro-conditioning; default: the nearest bin's key, as official inference).
        kv_compress: per-call override of the configured KV compression.
        controls: ControlNets to apply (controlnet.ControlInput: net, hint latent, strength); they add up.
        block_replace: {block index: BlockReplace} run instead of those blocks (see run_blocks).
        perturb: identity self-attention in some blocks for some batch rows (perturbed-attention guidance).
        Returns (B, C_out, H, W): ε in the first C_in channels, the learned variance in the rest.
        """
        cfg = self.config
        B, _, H, W = x.shape
        p = cfg.patch_size
        if H % p or W % p:
            raise ValueError(f"latent size {H}x{W} is not divisible by the patch size {p} "
                             f"(image sides must be multiples of {8 * p} px)")
        h, w = H // p, W // p
        dtype = self.compute_dtype
        context, mask = self._prepare_captions(context.to(dtype), context_mask, B)
        timesteps = torch.as_tensor(timesteps, device=x.device).reshape(-1)
        if timesteps.numel() == 1:
            timesteps = timesteps.expand(B)

        tokens = self.embed(x, dtype)  # (B, N, D)
        t = self.t_embedder(timesteps, dtype)  # (B, D)
        if cfg.micro_condition:
            if c_size is None:
                c_size = torch.tensor([[H * 8.0, W * 8.0]], device=x.device)
            if c_ar is None:  # official inference conditions on the bin's ratio key (0.57), not on H/W (0.5714)
                c_ar = torch.tensor([[float(nearest_bin_key(H, W, cfg.resolution))]], device=x.device)
            t = t + torch.cat([self.csize_embedder(c_size.to(x.device), B, dtype),
                               self.ar_embedder(c_ar.to(x.device), B, dtype)], dim=1)  # (B, D)
        t0 = self.t_block(t)  # (B, 6D)
        y = self.y_embedder(context)  # (B, L, D)

        kv = kv_compress if kv_compress is not None else self.kv_compress
        shared = B == 1 or bool((t0 == t0[:1]).all())  # one timestep for the batch (always under CFG)
        if perturb is not None and perturb.layers and max(perturb.layers) >= cfg.depth:
            raise InputError(f"perturbed-attention layers {list(perturb.layers)} name block {max(perturb.layers)}, "
                             f"but this model has blocks 0-{cfg.depth - 1}")
        inputs = BlockInputs(y, t0, mask, (h, w), kv, self.ff_chunk, shared, perturb)
        hooks = [hook for c in controls if (hook := c.start(self, inputs)) is not None]
        tokens = self.run_blocks(tokens, inputs, hooks, block_replace)  # (B, N, D)
        tokens = self.final_layer(tokens, t)  # (B, N, p·p·C_out)
        return self.unpatchify(tokens, h, w)
