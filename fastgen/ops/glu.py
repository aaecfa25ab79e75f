"""Gated linear units: ``glu(x, activation) = a * act(g)`` where ``a, g = x.chunk(2, -1)``.

    x (..., 2N) -> y (..., N)

    activation="sigmoid"    F.glu(x)                                    (the original GLU)
    activation="silu"       SwiGLU   (diffusers ``SwiGLU``)
    activation="gelu"       GEGLU    (diffusers ``GEGLU``: SD 1.x/2.x/SDXL UNets)
    activation="gelu_tanh"  GEGLU with the tanh approximation of GELU

The value is the first half and the gate the second, as in ``F.glu`` and diffusers.
Computed in fp32 and rounded once to ``x.dtype`` (the unfused eager path rounds the
activation and the product separately, so it can differ by one ulp in half precision).

Implementations (``backend=``): ``"triton"`` (``fastgen/kernels/glu.py``) and ``"torch"``
(the reference below). There is no CUDA C++ version: the op is one elementwise pass
that Triton already writes at memory speed, and ``backend="cuda"`` says so.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fastgen.backend import launcher, resolve

ACTIVATIONS = ("sigmoid", "silu", "gelu", "gelu_tanh")


def _act_ref(g: Tensor, activation: str) -> Tensor:
    if activation == "sigmoid":
        return torch.sigmoid(g)
    if activation == "silu":
        return F.silu(g)
    return F.gelu(g, approximate="tanh" if activation == "gelu_tanh" else "none")


def glu_ref(x: Tensor, activation: str = "gelu") -> Tensor:
    """Plain-torch gated linear unit in fp32 (float64 for float64 input), rounded once: the
    truth for tests and the ``backend="torch"`` path (differentiable)."""
    a, g = (x if x.dtype == torch.float64 else x.float()).chunk(2, dim=-1)
    return (a * _act_ref(g, activation)).to(x.dtype)


def _validate(x: Tensor, activation: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"glu: x must be a torch.Tensor, got {type(x).__name__}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"glu: activation must be one of {ACTIVATIONS}, got {activation!r}")
    if x.dim() < 1:
        raise ValueError("glu: x must have at least one dimension (..., 2N), got a 0-d tensor")
    if not x.is_floating_point():
        raise TypeError(f"glu: x must be a floating-point tensor, got dtype {x.dtype}")
    if x.shape[-1] % 2:
        raise ValueError(f"glu: the last dim of x holds value and gate halves and must be even, got "
                         f"shape {tuple(x.shape)}")


def _as_rows(x: Tensor) -> Tensor:
    """A (M, 2N) view (or copy) of x with a contiguous last dim; rows may be strided."""
    x2 = x.reshape(-1, x.shape[-1])
    if x2.shape[1] > 1 and x2.stride(1) != 1:
        x2 = x2.contiguous()
    return x2


@torch.library.custom_op("fastgen::glu_fwd", mutates_args=())
def _glu_fwd_op(x: Tensor, activation: str, impl: str) -> Tensor:
    """y (M, N) from x (M, 2N)."""
    y = torch.empty((x.shape[0], x.shape[1] // 2), dtype=x.dtype, device=x.device)
    launcher("glu", impl).glu_fwd(x, activation, y)
    return y


@_glu_fwd_op.register_fake
def _(x, activation, impl):
    return x.new_empty((x.shape[0], x.shape[1] // 2))


@torch.library.custom_op("fastgen::glu_bwd", mutates_args=())
def _glu_bwd_op(dy: Tensor, x: Tensor, activation: str, impl: str) -> Tensor:
    """dx (M, 2N) from dy (M, N) and x (M, 2N)."""
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    launcher("glu", impl).glu_bwd(dy, x, activation, dx)
    return dx


@_glu_bwd_op.register_fake
def _(dy, x, activation, impl):
    return x.new_empty(x.shape)


class _GLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, activation, impl):
        x2 = _as_rows(x)
        y = _glu_fwd_op(x2, activation, impl)
        ctx.save_for_backward(x2)
        ctx.activation, ctx.impl, ctx.shape = activation, impl, x.shape
        return y.view(*x.shape[:-1], x.shape[-1] // 2)

    @staticmethod
    def backward(ctx, dy):
        (x2,) = ctx.saved_tensors
        dy2 = dy.reshape(x2.shape[0], x2.shape[1] // 2).contiguous()
        dx = _glu_bwd_op(dy2, x2, ctx.activation, ctx.impl)
        return dx.view(ctx.shape), None, None


def glu(x: Tensor, activation: str = "gelu", backend: Optional[str] = "auto") -> Tensor:
    """Gated linear unit over the last dim: ``a * act(g)`` with ``a, g = x.chunk(2, -1)``.

    ::

        x  (..., 2N)  float32 | float16 | bfloat16, any strides      -> y (..., N), x.dtype

    ``activation``: ``"gelu"`` (GEGLU, default), ``"gelu_tanh"``, ``"silu"`` (SwiGLU) or
    ``"sigmoid"`` (``F.glu``). fp32 math, one rounding. Differentiable in ``x``. ``backend``:
    ``"auto"``, ``"triton"`` or ``"torch"`` (``"cuda"`` raises: no CUDA C++ version).
    Registered as ``torch.ops.fastgen.glu_fwd`` / ``glu_bwd`` for ``torch.compile(fullgraph=True)``.
    """
    _validate(x, activation)
    impl = resolve("glu", backend, x.device, call=(x,))
    if impl == "torch" or x.numel() == 0:
        return glu_ref(x, activation)
    return _GLUFunction.apply(x, activation, impl)
