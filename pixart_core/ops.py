"""Layer types the model is built from, so precision policy lives outside the model.

`CastOps` layers compute in the input's dtype: weights stored in another dtype (fp8, bf16 on an
fp32 run, ...) are cast on the fly, one layer at a time. ComfyUI passes its own `comfy.ops`
namespaces instead, which have the same constructor signatures (those without a `Table` get this one).
"""
import functools

import torch
import torch.nn.functional as F
from torch import nn


def _cast(t, like):
    if t is None or (t.dtype == like.dtype and t.device == like.device):
        return t
    return t.to(device=like.device, dtype=like.dtype)


@functools.cache
def cpu_has_native_gemm(dtype) -> bool:
    """Whether this CPU has fast GEMM kernels for bf16/fp16 (AVX512-BF16/AMX or AVX512-FP16 class).

    Without them PyTorch runs low-precision matmuls 5-10x slower than fp32 (measured on AVX2:
    benchmarks/results/latest.md).
    """
    try:
        if dtype == torch.bfloat16:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    except (AttributeError, RuntimeError):
        return True  # unknown build: leave PyTorch's choice alone


def gemm_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype to multiply `x` in: its own, except bf16/fp16 on a CPU without native kernels, where
    fp32 is exact for the inputs (the low-precision CPU GEMMs accumulate in fp32 too: only the
    summation order changes) and 5-10x faster."""
    if x.dtype in (torch.bfloat16, torch.float16) and x.device.type == "cpu" and not cpu_has_native_gemm(x.dtype):
        return torch.float32
    return x.dtype


def linear_params(layer: nn.Module, like: torch.Tensor):
    """(weight, bias) of a Linear exactly as its own forward would use them on `like`, in
    `gemm_dtype(like)`; None when the layer type does not say (callers then treat it as a black box)."""
    params_for = getattr(layer, "params_for", None)
    return None if params_for is None else params_for(like)


class CastOps:
    class Linear(nn.Linear):
        def params_for(self, like):
            dtype = gemm_dtype(like)
            w = self.weight.to(device=like.device, dtype=dtype)
            return w, None if self.bias is None else self.bias.to(device=like.device, dtype=dtype)

        def forward(self, x):
            return F.linear(x.to(gemm_dtype(x)), *self.params_for(x)).to(x.dtype)

    class Conv2d(nn.Conv2d):
        def forward(self, x):
            if self.groups == 1 and gemm_dtype(x) != x.dtype:
                # as Linear: without native kernels PyTorch runs a dense bf16 convolution as a slow im2col
                # GEMM (the patch embedding: 0.29 s -> 0.05 s at 1024 px); depthwise ones are fine as they are
                w, b = self.weight.float(), None if self.bias is None else self.bias.float()
                return self._conv_forward(x.float(), w, b).to(x.dtype)
            return self._conv_forward(x, _cast(self.weight, x), _cast(self.bias, x))

    class LayerNorm(nn.LayerNorm):
        def forward(self, x):
            return F.layer_norm(x, self.normalized_shape, _cast(self.weight, x), _cast(self.bias, x), self.eps)


def _official_name(module, state_dict, prefix, local_metadata):
    if prefix and prefix + "weight" in state_dict:
        state_dict[prefix[:-1]] = state_dict.pop(prefix + "weight")


def _leaf_names(module, state_dict, prefix, *args):
    for name, child in module.named_children():
        if isinstance(child, Table) and prefix + name in state_dict:
            state_dict[prefix + name + ".weight"] = state_dict.pop(prefix + name)


class Table(nn.Module):
    """A learned tensor that is not a layer's weight in the reference (a modulation table, the null
    caption), held as the `weight` of its own leaf layer: weight patchers that reach only leaf layers
    (ComfyUI's ModelPatcher, for LoRAs, merges and offloading) then patch and move it like any other.
    State dicts still name it as the official checkpoints do, `<owner>.<name>`; an owner that calls
    `load_tables_by_official_names(self)` loads it from that name too (or from `<owner>.<name>.weight`)."""
    bias = None

    def __init__(self, *shape, trainable=True, dtype=None, device=None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=trainable)
        post = getattr(self, "register_state_dict_post_hook", None)  # public from torch 2.5
        post(_official_name) if post is not None else self._register_state_dict_hook(_official_name)

    def get(self, like: torch.Tensor) -> torch.Tensor:
        """The tensor on `like`'s device, in its dtype."""
        return _cast(self.weight, like)


def load_tables_by_official_names(owner: nn.Module) -> None:
    """Let `owner`'s Table children load from `<owner>.<name>` keys (a child only sees keys below its own name)."""
    if hasattr(owner, "register_state_dict_post_hook"):  # torch >= 2.5
        owner.register_load_state_dict_pre_hook(_leaf_names)
    else:
        owner._register_load_state_dict_pre_hook(_leaf_names, with_module=True)


CastOps.Table = Table
