"""``fastgen.nn.RMSNorm``: a drop-in for ``torch.nn.RMSNorm`` running ``fastgen.ops.rms_norm``."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from fastgen.ops.rms_norm import rms_norm


class RMSNorm(torch.nn.RMSNorm):
    """``torch.nn.RMSNorm`` with fastgen's fused kernels.

    Same constructor arguments, attributes and ``state_dict`` keys as
    ``torch.nn.RMSNorm`` (it *is* one, by inheritance), so state dicts move
    between the two in both directions. Extras, keyword-only: ``backend``.

    ``normalized_shape`` may span several trailing dims; they are normalized as
    one flattened row. ``eps=None`` means ``torch.finfo(x.dtype).eps``, as in torch.
    The math is done in fp32 and rounded once to the input dtype.

    ``forward(x, residual=None)``: with a residual, returns
    ``(norm(x + residual), x + residual)`` from one fused pass.
    """

    def __init__(
        self,
        normalized_shape,
        eps: Optional[float] = None,
        elementwise_affine: bool = True,
        device=None,
        dtype=None,
        *,
        backend: str = "auto",
    ) -> None:
        super().__init__(normalized_shape, eps=eps, elementwise_affine=elementwise_affine, device=device, dtype=dtype)
        self.backend = backend

    def forward(self, x: Tensor, residual: Optional[Tensor] = None):
        k = len(self.normalized_shape)
        if tuple(x.shape[x.dim() - k :]) != tuple(self.normalized_shape):
            raise ValueError(
                f"RMSNorm: expected input with trailing shape {tuple(self.normalized_shape)}, got {tuple(x.shape)}"
            )
        if residual is not None and residual.shape != x.shape:
            raise ValueError(f"RMSNorm: residual must have the shape of x {tuple(x.shape)}, got {tuple(residual.shape)}")
        eps = torch.finfo(x.dtype).eps if self.eps is None else self.eps
        lead, n = x.shape[: x.dim() - k], math.prod(self.normalized_shape)
        weight = None if self.weight is None else self.weight.reshape(n)
        out = rms_norm(
            x.reshape(*lead, n),
            weight,
            eps,
            None if residual is None else residual.reshape(*lead, n),
            backend=self.backend,
        )
        if residual is None:
            return out.view(x.shape)
        return out[0].view(x.shape), out[1].view(x.shape)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", backend={self.backend!r}"
