"""Layer types the model is built from, so precision policy lives outside the model.

`CastOps` layers compute in the input's dtype: weights stored in another dtype (fp8, bf16 on an
fp32 run, ...) are cast on the fly, one layer at a time. ComfyUI passes its own `comfy.ops`
namespaces instead, which have the same constructor signatures.
"""
import torch
import torch.nn.functional as F
from torch import nn


def _cast(t, like):
    if t is None or (t.dtype == like.dtype and t.device == like.device):
        return t
    return t.to(device=like.device, dtype=like.dtype)


class CastOps:
    class Linear(nn.Linear):
        def forward(self, x):
            return F.linear(x, _cast(self.weight, x), _cast(self.bias, x))

    class Conv2d(nn.Conv2d):
        def forward(self, x):
            return self._conv_forward(x, _cast(self.weight, x), _cast(self.bias, x))

    class LayerNorm(nn.LayerNorm):
        def forward(self, x):
            return F.layer_norm(x, self.normalized_shape, _cast(self.weight, x), _cast(self.bias, x), self.eps)
