"""RMSNorm, optionally fused with the residual add of a pre-norm block.

    y = x / sqrt(mean(x ** 2, dim=-1) + eps) * weight

computed in fp32 whatever the input dtype, and rounded once to the input dtype:
exactly ``F.rms_norm(x.float(), (N,), weight.float(), eps).to(x.dtype)``, the
fp32-upcast convention of diffusers' ``RMSNorm`` and of Flux.

Implementations (``backend=``): ``"triton"`` (``fastgen/kernels/rms_norm.py``),
``"cuda"`` (``csrc/rms_norm/``, the ``fastgen._C`` extension), ``"torch"`` (the
reference below). See ``fastgen.backend`` for how ``"auto"`` chooses.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fastgen.backend import launcher, resolve
from fastgen.ops._checks import check_eps, check_param



# ----------------------------------------------------------------------------- reference


def rms_norm_ref(x: Tensor, weight: Optional[Tensor] = None, eps: float = 1e-6, residual: Optional[Tensor] = None):
    """Plain-torch RMSNorm: the truth for tests and the ``backend="torch"`` path.

    Returns ``y``, or ``(y, x + residual)`` when ``residual`` is given (the sum is
    rounded to ``x.dtype`` and the norm is taken of that rounded sum).
    """
    if residual is not None:
        h = x + residual
        return rms_norm_ref(h, weight, eps), h
    w = None if weight is None else weight.float()
    return F.rms_norm(x.float(), (x.shape[-1],), w, eps).to(x.dtype)


# ----------------------------------------------------------------------------- validation


def _validate(x: Tensor, weight: Optional[Tensor], residual: Optional[Tensor], eps: float) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"rms_norm: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1:
        raise ValueError("rms_norm: x must have at least one dimension (..., N), got a 0-d tensor")
    if not x.is_floating_point():
        raise TypeError(f"rms_norm: x must be a floating-point tensor, got dtype {x.dtype}")
    check_param("rms_norm", "weight", weight, x)
    if residual is not None:
        if residual.shape != x.shape:
            raise ValueError(
                f"rms_norm: residual must have the shape of x {tuple(x.shape)}, got {tuple(residual.shape)}"
            )
        if residual.device != x.device:
            raise ValueError(f"rms_norm: residual is on {residual.device} but x is on {x.device}")
        if residual.dtype != x.dtype:
            raise TypeError(f"rms_norm: residual dtype {residual.dtype} does not match x dtype {x.dtype}")
    check_eps("rms_norm", eps)


def _as_rows(t: Tensor) -> Tensor:
    """A [M, N] view (or copy) of t whose last dim is contiguous; rows may be strided."""
    N = t.shape[-1]
    t2 = t.reshape(-1, N)
    if N > 1 and t2.stride(1) != 1:
        t2 = t2.contiguous()
    return t2


# ----------------------------------------------------------------------------- torch.library ops


def _fwd_outputs(x: Tensor, residual: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """(y [M, N], h [M, N] or [0] without a residual, rstd [M] fp32), allocated for x [M, N]."""
    M, N = x.shape
    h = x.new_empty((M, N) if residual is not None else (0,))
    return x.new_empty((M, N)), h, x.new_empty((M,), dtype=torch.float32)


def _bwd_outputs(h: Tensor, weight: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """(dh [M, N] contiguous, dw [N] like weight or [0] without a weight), allocated."""
    dw = h.new_empty(0) if weight is None else torch.empty_like(weight, memory_format=torch.contiguous_format)
    return torch.empty(h.shape, dtype=h.dtype, device=h.device), dw


@torch.library.custom_op("fastgen::rms_norm_fwd", mutates_args=())
def _rms_norm_fwd_op(
    x: Tensor, weight: Optional[Tensor], residual: Optional[Tensor], eps: float, impl: str
) -> tuple[Tensor, Tensor, Tensor]:
    """(y [M, N], h [M, N] or [0] without a residual, rstd [M] fp32) from x [M, N]."""
    y, h, rstd = _fwd_outputs(x, residual)
    if x.numel():
        launcher("rms_norm", impl).rms_norm_fwd(x, weight, residual, eps, y=y,
                                                h=h if residual is not None else None, rstd=rstd)
    return y, h, rstd


@_rms_norm_fwd_op.register_fake
def _(x, weight, residual, eps, impl):
    return _fwd_outputs(x, residual)


@torch.library.custom_op("fastgen::rms_norm_bwd", mutates_args=())
def _rms_norm_bwd_op(
    dy: Tensor, h: Tensor, weight: Optional[Tensor], rstd: Tensor, dh_out: Optional[Tensor], impl: str
) -> tuple[Tensor, Tensor]:
    """(dh [M, N], dw [N] or [0] without a weight)."""
    dx, dw = _bwd_outputs(h, weight)
    if h.numel():
        launcher("rms_norm", impl).rms_norm_bwd(dy, h, weight, rstd, dh_out, dx=dx,
                                                dw=dw if weight is not None else None)
    elif weight is not None:
        dw.zero_()  # a sum over no rows
    return dx, dw


@_rms_norm_bwd_op.register_fake
def _(dy, h, weight, rstd, dh_out, impl):
    return _bwd_outputs(h, weight)


# ----------------------------------------------------------------------------- autograd


class _RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, residual, eps, impl):
        x2 = _as_rows(x)
        r2 = None if residual is None else _as_rows(residual)
        weight = None if weight is None else weight.contiguous()
        y, h, rstd = _rms_norm_fwd_op(x2, weight, r2, eps, impl)
        ctx.save_for_backward(x2 if residual is None else h, weight, rstd)
        ctx.impl = impl
        ctx.has_residual = residual is not None
        ctx.shape = x.shape
        ctx.set_materialize_grads(False)
        y = y.view(x.shape)
        return (y, h.view(x.shape)) if residual is not None else y

    @staticmethod
    def backward(ctx, dy, dh_out=None):
        h, weight, rstd = ctx.saved_tensors
        if dy is None:  # only h = x + residual was used downstream
            dx, dw = _as_rows(dh_out), None
        else:
            d_out = None if dh_out is None else _as_rows(dh_out)
            dx, dw = _rms_norm_bwd_op(_as_rows(dy), h, weight, rstd, d_out, ctx.impl)
            dw = dw if weight is not None else None
        dx = dx.reshape(ctx.shape)
        return (
            dx if ctx.needs_input_grad[0] else None,
            dw if ctx.needs_input_grad[1] else None,
            dx if ctx.has_residual and ctx.needs_input_grad[2] else None,
            None,
            None,
        )


# ----------------------------------------------------------------------------- public op


def rms_norm(
    x: Tensor,
    weight: Optional[Tensor] = None,
    eps: float = 1e-6,
    residual: Optional[Tensor] = None,
    backend: Optional[str] = "auto",
):
    """Root-mean-square normalization over the last dimension, optionally fused with a residual add.

    ::

        x        (..., N)   float32 | float16 | bfloat16, any strides
        weight   (N,)       optional; x.dtype or float32
        residual (..., N)   optional; same shape and dtype as x

        y = x * rsqrt(mean(x**2, -1) + eps) * weight         -> (..., N), x.dtype

    With ``residual``, returns ``(rms_norm(x + residual), x + residual)`` computed
    in one pass (the pre-norm block: the sum is also the next residual stream).

    Numerics: fp32 math, one rounding to ``x.dtype`` at the end — the same function
    as ``F.rms_norm(x.float(), (N,), weight.float(), eps).to(x.dtype)`` (diffusers'
    ``RMSNorm`` and Flux upcast the same way). Gradients flow to ``x``, ``weight``
    and ``residual``; the weight gradient is deterministic on every backend.

    ``backend``: ``"auto"`` (default), ``"triton"``, ``"cuda"`` or ``"torch"``; an
    explicit kernel backend that cannot serve the call (CPU tensors, extension not
    built, float64) raises ``fastgen.backend.BackendUnavailableError``. Registered as
    ``torch.ops.fastgen.rms_norm_fwd`` / ``rms_norm_bwd``, so ``torch.compile`` with
    ``fullgraph=True`` traces it.
    """
    _validate(x, weight, residual, eps)
    impl = resolve("rms_norm", backend, x.device, call=(x,))
    if impl == "torch" or x.numel() == 0:
        return rms_norm_ref(x, weight, eps, residual)
    return _RMSNormFunction.apply(x, weight, residual, float(eps), impl)
