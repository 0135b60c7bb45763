"""FLOPs of one PixArt denoiser step: matmuls and attention only (a multiply-add counts 2).

Notation (spec §2): B batch, N = h·w image tokens, Nk self-attention key/value tokens (N, or
⌊h/r⌋·⌊w/r⌋ with r×r KV compression), L caption tokens actually attended to, D hidden (1152),
F MLP hidden (4·D = 4608), C caption width (4096), p patch (2), c_in / c_out latent channels (4 / 8),
f timestep-frequency width (256).

Per block
  self-attention, projections  qkv 2·B·N·D·3D + out 2·B·N·D·D                 = 8·B·N·D²
  self-attention, core         QKᵀ 2·B·N·Nk·D + softmax(·)V 2·B·N·Nk·D        = 4·B·N·Nk·D
    without compression Nk = N  ->  4·B·N²·D
    with r×r compression Nk ≈ N/r²; its depthwise r×r conv on K and V adds 2·(2·B·N·D)
    (one multiply-add per input element each), counted below though it is negligible
  cross-attention, projections q 2·B·N·D² + kv 2·B·L·D·2D + out 2·B·N·D²      = 4·B·N·D² + 4·B·L·D²
  cross-attention, core        4·B·N·L·D
  MLP                          fc1 2·B·N·D·F + fc2 2·B·N·F·D                   = 4·B·N·D·F
Once per step
  patch embedding              2·B·N·(c_in·p²)·D
  caption projection           2·B·L·(C·D + D·D)
  timestep embedding + t_block 2·B·(f·D + D·D) + 2·B·D·6D
  final layer                  2·B·N·D·(p²·c_out)
LayerNorm, modulation, GELU, softmax exponentials and residual adds are not counted: they are
O(B·N·D) memory-bound passes, and the point of the floor is what the GEMMs alone would cost.

The floor counts this, the reference algorithm, for every implementation. pixart_core does less
in one place: with L < D/H caption tokens (H heads) its cross-attention folds the q and out
projections into the captions, 4·B·N·D·(H·L) instead of 4·B·N·D² + 4·B·N·L·D
(`cross_fold_saving`), so it can beat the floor by that much.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Shape:
    B: int = 2
    D: int = 1152
    F: int = 4608
    C: int = 4096
    p: int = 2
    c_in: int = 4
    c_out: int = 8
    f: int = 256


def tokens(px: int, p: int = 2) -> tuple[int, int]:
    """(h, w) token grid of a square image of px pixels (VAE factor 8)."""
    side = px // 8 // p
    return side, side


def kv_tokens(h: int, w: int, ratio: int) -> int:
    return (h // ratio) * (w // ratio) if ratio > 1 else h * w


def block_flops(N: int, Nk: int, L: int, s: Shape = Shape(), compressed: bool = False) -> dict:
    B, D, F = s.B, s.D, s.F
    parts = {
        "self_proj": 8 * B * N * D * D,
        "self_core": 4 * B * N * Nk * D,
        "kv_compress": 4 * B * N * D if compressed else 0,
        "cross_proj": 4 * B * N * D * D + 4 * B * L * D * D,
        "cross_core": 4 * B * N * L * D,
        "mlp": 4 * B * N * D * F,
    }
    parts["total"] = sum(parts.values())
    return parts


def once_flops(N: int, L: int, s: Shape = Shape()) -> dict:
    B, D = s.B, s.D
    parts = {
        "patch_embed": 2 * B * N * s.c_in * s.p * s.p * D,
        "caption_proj": 2 * B * L * (s.C * D + D * D),
        "timestep": 2 * B * (s.f * D + D * D) + 2 * B * D * 6 * D,
        "final": 2 * B * N * D * s.p * s.p * s.c_out,
    }
    parts["total"] = sum(parts.values())
    return parts


def step_flops(px: int, L: int, depth: int, compressed_layers=(), ratio: int = 2, s: Shape = Shape()) -> int:
    """FLOPs of one step at depth `depth` whose layers in `compressed_layers` use r×r KV compression."""
    h, w = tokens(px, s.p)
    N = h * w
    total = once_flops(N, L, s)["total"]
    for i in range(depth):
        c = i in compressed_layers and ratio > 1
        total += block_flops(N, kv_tokens(h, w, ratio if c else 1), L, s, compressed=c)["total"]
    return total


def attention_flops(B: int, N: int, Nk: int, D: int = 1152) -> int:
    """The self-attention core alone: QKᵀ and softmax(·)V."""
    return 4 * B * N * Nk * D


def cross_fold_saving(N: int, L: int, heads: int = 16, s: Shape = Shape()) -> int:
    """FLOPs per block pixart_core's folded cross-attention saves (0 when L >= D/heads: not folded)."""
    B, D = s.B, s.D
    if L >= D // heads:
        return 0
    return 4 * B * N * D * D + 4 * B * N * L * D - 4 * B * N * D * heads * L
