"""Layer types the model is built from, so precision policy lives outside the model.

`CastOps` layers compute in the input's dtype: weights stored in another dtype (fp8, bf16 on an
fp32 run, ...) are cast on the fly, one layer at a time. ComfyUI passes its own `comfy.ops`
namespaces instead, which have the same constructor signatures.
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
