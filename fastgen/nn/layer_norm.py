"""``fastgen.nn.LayerNorm``: a drop-in for ``torch.nn.LayerNorm`` running ``fastgen.ops.layer_norm``."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fastgen.ops.layer_norm import layer_norm


class LayerNorm(torch.nn.LayerNorm):
    """``torch.nn.LayerNorm`` with fastgen's fused kernels.

    Same constructor arguments, attributes and ``state_dict`` keys as
    ``torch.nn.LayerNorm`` (it *is* one, by inheritance), so state dicts move between
    the two in both directions. Extra, keyword-only: ``backend``.

    ``normalized_shape`` may span several trailing dims; they are normalized as one
    flattened row. The math is done in fp32 and rounded once to the input dtype
    (diffusers' ``FP32LayerNorm`` behaviour; for fp32 inputs this is torch's own).
    """

    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True, bias: bool = True,
                 device=None, dtype=None, *, backend: str = "auto") -> None:
        super().__init__(normalized_shape, eps=eps, elementwise_affine=elementwise_affine, bias=bias,
                         device=device, dtype=dtype)
        self.backend = backend

    def forward(self, x: Tensor) -> Tensor:
        k = len(self.normalized_shape)
        if tuple(x.shape[x.dim() - k:]) != tuple(self.normalized_shape):
            raise ValueError(
                f"LayerNorm: expected input with trailing shape {tuple(self.normalized_shape)}, got {tuple(x.shape)}"
            )
        lead, n = x.shape[: x.dim() - k], math.prod(self.normalized_shape)
        w = None if self.weight is None else self.weight.reshape(n)
        b = None if self.bias is None else self.bias.reshape(n)
        return layer_norm(x.reshape(*lead, n), w, b, self.eps, backend=self.backend).view(x.shape)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", backend={self.backend!r}"
