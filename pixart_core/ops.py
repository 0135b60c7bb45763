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


class CastOps:
    class Linear(nn.Linear):
        def forward(self, x):
            if x.dtype in (torch.bfloat16, torch.float16) and x.device.type == "cpu" and not cpu_has_native_gemm(x.dtype):
                # bf16/fp16 -> fp32 is exact and the low-precision CPU GEMMs accumulate in fp32 too:
                # only the summation order changes, at fp32 speed
                return F.linear(x.float(), self.weight.float(), None if self.bias is None else self.bias.float()).to(x.dtype)
            return F.linear(x, _cast(self.weight, x), _cast(self.bias, x))

    class Conv2d(nn.Conv2d):
        def forward(self, x):
            if (self.groups == 1 and x.dtype in (torch.bfloat16, torch.float16) and x.device.type == "cpu"
                    and not cpu_has_native_gemm(x.dtype)):
                # as Linear: without native kernels PyTorch runs a dense bf16 convolution as a slow im2col
                # GEMM (the patch embedding: 0.29 s -> 0.05 s at 1024 px); depthwise ones are fine as they are
                w, b = self.weight.float(), None if self.bias is None else self.bias.float()
                return self._conv_forward(x.float(), w, b).to(x.dtype)
            return self._conv_forward(x, _cast(self.weight, x), _cast(self.bias, x))

    class LayerNorm(nn.LayerNorm):
        def forward(self, x):
            return F.layer_norm(x, self.normalized_shape, _cast(self.weight, x), _cast(self.bias, x), self.eps)
