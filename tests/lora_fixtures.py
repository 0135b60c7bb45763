"""Tiny PixArt/T5 LoRAs written in every trainer's format from the same random low-rank factors.

`Factors` holds one rank-r LoRA per diffusers module (and per T5 module); the writers lay the same
numbers out as each trainer does, so a correct loader gives the same patched weights for all.
The fused native formats (ComfyUI names, kohya names) carry q/k/v as one LoRA of rank 3r with a
block-diagonal up matrix and alpha·3, which is the same weight change exactly.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

RANK = 4
ALPHA = 2.0  # scale alpha / rank = 0.5

BLOCK_MODULES = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
                 "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2")
TOP_MODULES = ("proj_out", "adaln_single.linear", "caption_projection.linear_1", "pos_embed.proj")
FUSED = {"attn1": ("attn.qkv", ("to_q", "to_k", "to_v")), "attn2": ("cross_attn.kv_linear", ("to_k", "to_v"))}
NATIVE = {"attn1.to_out.0": "attn.proj", "attn2.to_q": "cross_attn.q_linear", "attn2.to_out.0": "cross_attn.proj",
          "ff.net.0.proj": "mlp.fc1", "ff.net.2": "mlp.fc2", "proj_out": "final_layer.linear",
          "adaln_single.linear": "t_block.1", "caption_projection.linear_1": "y_embedder.y_proj.fc1",
          "pos_embed.proj": "x_embedder.proj"}
T5_MODULES = ("layer.0.SelfAttention.q", "layer.0.SelfAttention.k", "layer.0.SelfAttention.v",
              "layer.0.SelfAttention.o", "layer.1.DenseReluDense.wi_0", "layer.1.DenseReluDense.wi_1",
              "layer.1.DenseReluDense.wo")


@dataclass
class Factors:
    transformer: dict  # diffusers module -> (A (r, in...), B (out, r...))
    t5: dict  # HF module -> (A, B)


def make_factors(model_state: dict, depth: int, t5_state: dict | None = None, t5_layers: int = 2,
                 seed: int = 0) -> Factors:
    """Random rank-RANK factors shaped for the native weights in model_state (official names)."""
    g = torch.Generator().manual_seed(seed)

    def pair(weight):
        out, rest = weight.shape[0], weight.shape[1:]
        a = torch.randn(RANK, *rest, generator=g) * 0.3
        b = torch.randn(out, RANK, *([1] * (len(rest) - 1)), generator=g) * 0.3
        return a, b

    tr = {}
    for name in TOP_MODULES:
        tr[name] = pair(model_state[NATIVE[name] + ".weight"])
    for i in range(depth):
        for name in BLOCK_MODULES:
            attn, _, proj = name.partition(".")
            if attn in FUSED and proj in FUSED[attn][1]:
                fused = model_state[f"blocks.{i}.{FUSED[attn][0]}.weight"]
                part = fused[: fused.shape[0] // len(FUSED[attn][1])]
                tr[f"transformer_blocks.{i}.{name}"] = pair(part)
            else:
                tr[f"transformer_blocks.{i}.{name}"] = pair(model_state[f"blocks.{i}.{NATIVE[name]}.weight"])
    t5 = {}
    if t5_state is not None:
        for i in range(t5_layers):
            for name in T5_MODULES:
                key = f"encoder.block.{i}.{name}"
                t5[key] = pair(t5_state[key + ".weight"])
    return Factors(tr, t5)


def _lora(prefix, a, b, down="lora_down.weight", up="lora_up.weight", alpha=ALPHA):
    out = {f"{prefix}.{down}": a, f"{prefix}.{up}": b}
    if alpha is not None:
        out[f"{prefix}.alpha"] = torch.tensor(alpha)
    return out


def _native_name(module: str) -> tuple[str, int | None]:
    """diffusers module -> (native module, split index or None)."""
    if module.startswith("transformer_blocks."):
        _, i, rest = module.split(".", 2)
        attn, _, proj = rest.partition(".")
        if attn in FUSED and proj in FUSED[attn][1]:
            return f"blocks.{i}.{FUSED[attn][0]}", FUSED[attn][1].index(proj)
        return f"blocks.{i}.{NATIVE[rest]}", None
    return NATIVE[module], None


def write(factors: Factors, fmt: str, path, t5: bool = True) -> Path:
    """Write the factors as `fmt`: diffusers, peft, lycoris, onetrainer, omi, native, kohya."""
    path = Path(path)
    sd = {}
    tr, te = factors.transformer, factors.t5 if t5 else {}
    if fmt in ("diffusers", "peft"):
        prefix = "transformer." if fmt == "diffusers" else "base_model.model."
        alpha = ALPHA if fmt == "diffusers" else None
        for m, (a, b) in tr.items():
            sd.update(_lora(prefix + m, a, b, "lora_A.weight", "lora_B.weight", alpha))
        for m, (a, b) in te.items():
            sd.update(_lora("text_encoder." + m, a, b, "lora_A.weight", "lora_B.weight", ALPHA))
        if fmt == "peft":
            (path.parent / "adapter_config.json").write_text(json.dumps({"r": RANK, "lora_alpha": ALPHA,
                                                                        "peft_type": "LORA"}))
    elif fmt == "lycoris":
        for m, (a, b) in tr.items():
            sd.update(_lora("lycoris_" + m.replace(".", "_"), a, b))
    elif fmt == "onetrainer":
        for m, (a, b) in tr.items():
            sd.update(_lora("lora_transformer_" + m.replace(".", "_"), a, b))
        for m, (a, b) in te.items():
            sd.update(_lora("lora_te_" + m.replace(".", "_"), a, b))
    elif fmt == "omi":
        for m, (a, b) in tr.items():
            native, part = _native_name(m)
            sd.update(_lora("transformer." + native + ("" if part is None else f".{part}"), a, b))
        for m, (a, b) in te.items():
            sd.update(_lora("t5." + m, a, b))
    elif fmt in ("native", "kohya"):
        fused: dict = {}
        for m, (a, b) in tr.items():
            native, part = _native_name(m)
            if part is None:
                fused[native] = [(a, b)]
            else:
                fused.setdefault(native, []).append((part, a, b))
        for native, items in fused.items():
            if len(items[0]) == 3:  # q/k/v (or k/v) as one LoRA: concatenated downs, block-diagonal ups
                items = [x[1:] for x in sorted(items, key=lambda x: x[0])]
                a = torch.cat([x[0] for x in items])
                b = torch.block_diag(*[x[1] for x in items])
                alpha = ALPHA * len(items)
            else:
                (a, b), alpha = items[0], ALPHA
            name = "diffusion_model." + native if fmt == "native" else "lora_unet_" + native.replace(".", "_")
            sd.update(_lora(name, a, b, alpha=alpha))
        for m, (a, b) in te.items():
            sd.update(_lora("lora_te1_" + m.replace(".", "_"), a, b))
    else:
        raise ValueError(fmt)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


def expected_delta(a, b, alpha=ALPHA, strength=1.0):
    """strength · alpha/r · B·A as the weight's shape (the oracle, independent of any loader)."""
    return strength * alpha / a.shape[0] * (b.flatten(1) @ a.flatten(1))


# ------------------------------------------------------------------------------- LoHa / LoKr

def loha_factors(out_dim, in_dim, rank=RANK, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(*s, generator=g) * 0.3 for n, s in
            (("hada_w1_a", (out_dim, rank)), ("hada_w1_b", (rank, in_dim)),
             ("hada_w2_a", (out_dim, rank)), ("hada_w2_b", (rank, in_dim)))}


def lokr_factors(out_dim, in_dim, rank=2, seed=2):
    g = torch.Generator().manual_seed(seed)
    a1, b1 = 4, 4  # kron(w1 (4x4), w2 (out/4 x in/4))
    return {"lokr_w1": torch.randn(a1, b1, generator=g) * 0.3,
            "lokr_w2_a": torch.randn(out_dim // a1, rank, generator=g) * 0.3,
            "lokr_w2_b": torch.randn(rank, in_dim // b1, generator=g) * 0.3}


def loha_delta(f, alpha=ALPHA):
    return (f["hada_w1_a"] @ f["hada_w1_b"]) * (f["hada_w2_a"] @ f["hada_w2_b"]) * (alpha / f["hada_w1_b"].shape[0])


def lokr_delta(f, alpha=ALPHA):
    return torch.kron(f["lokr_w1"], f["lokr_w2_a"] @ f["lokr_w2_b"]) * (alpha / f["lokr_w2_b"].shape[0])
