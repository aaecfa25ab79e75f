"""LayerNorm over the last dimension, and the machinery its fused DiT forms share.

    y = (x - mean(x)) / sqrt(var(x) + eps) * weight + bias        (biased variance, over the last dim)

computed in fp32 whatever the input dtype and rounded once to the input dtype:
exactly ``F.layer_norm(x.float(), (N,), weight.float(), bias.float(), eps).to(x.dtype)``,
the behaviour of diffusers' ``FP32LayerNorm``.

This module also holds what ``fastgen/ops/modulate.py`` builds on: the
``torch.library`` ops ``fastgen::layer_norm_fwd`` / ``fastgen::layer_norm_bwd``
(one kernel family with optional gated residual, modulation, weight and bias, and
LayerNorm / RMSNorm / no norm) and the autograd function around them.

Implementations (``backend=``): ``"triton"`` (``fastgen/kernels/layer_norm.py``) and
``"torch"`` (the reference below). There is no CUDA C++ version of this family.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fastgen import backend as _backend
from fastgen.backend import launcher
from fastgen.limits import NORM_LAYER, NORM_NONE, NORM_RMS  # noqa: F401  (fastgen.models reads them here)
from fastgen.ops._checks import check_eps, check_param


# ----------------------------------------------------------------------------- reference


def _compute_dtype(x: Tensor) -> torch.dtype:
    """fp32 for half inputs, the input's own dtype for fp32 / fp64."""
    return torch.promote_types(x.dtype, torch.float32)


def _up(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    return None if t is None else t.to(dtype)


def layer_norm_ref(x: Tensor, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, eps: float = 1e-5):
    """Plain-torch LayerNorm with fp32 math: the truth for tests and the ``backend="torch"`` path."""
    cd = _compute_dtype(x)
    return F.layer_norm(x.to(cd), (x.shape[-1],), _up(weight, cd), _up(bias, cd), eps).to(x.dtype)


# ----------------------------------------------------------------------------- validation


def check_x(op: str, x, dims: Optional[int] = None) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{op}: x must be a torch.Tensor, got {type(x).__name__}")
    if dims is None and x.dim() < 1:
        raise ValueError(f"{op}: x must have at least one dimension (..., N), got a 0-d tensor")
    if dims is not None and x.dim() != dims:
        raise ValueError(f"{op}: x must have shape (B, S, N) (batch, tokens, features), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{op}: x must be a floating-point tensor, got dtype {x.dtype}")


def resolve(op: str, backend: Optional[str], x: Tensor) -> str:
    """``fastgen.backend.resolve`` for a LayerNorm-family call on ``x`` (it decides; this only
    passes the call). The form ``fastgen.models`` reads."""
    return _backend.resolve(op, backend, x.device, call=(x,))


# ----------------------------------------------------------------------------- torch.library ops


def _opt(t: Tensor) -> Optional[Tensor]:
    """The custom ops return [0]-shaped placeholders for absent outputs."""
    return None if t.dim() == 1 and t.shape[0] == 0 else t


def _ph(like: Tensor, t: Optional[Tensor]) -> Tensor:
    return like.new_empty(0) if t is None else t


def _fwd_outputs(x: Tensor, y: Optional[Tensor], norm: int) -> tuple[Optional[Tensor], ...]:
    """(out, x_new, mean, rstd) for x [B, S, N], None where not applicable: out [B, S, N] (with a
    norm), x_new [B, S, N] (with y), mean [M] fp32 (LayerNorm), rstd [M] fp32 (with a norm)."""
    B, S, N = x.shape

    def new(cond, shape, dtype):
        return torch.empty(shape, dtype=dtype, device=x.device) if cond else None

    return (new(norm != NORM_NONE, (B, S, N), x.dtype), new(y is not None, (B, S, N), x.dtype),
            new(norm == NORM_LAYER, (B * S,), torch.float32), new(norm != NORM_NONE, (B * S,), torch.float32))


def _placeholders(x: Tensor, outs) -> tuple[Tensor, ...]:
    f32 = x.new_empty(0, dtype=torch.float32)
    return _ph(x, outs[0]), _ph(x, outs[1]), _ph(f32, outs[2]), _ph(f32, outs[3])


@torch.library.custom_op("fastgen::layer_norm_fwd", mutates_args=())
def _layer_norm_fwd_op(
    x: Tensor, y: Optional[Tensor], gate: Optional[Tensor], shift: Optional[Tensor], scale: Optional[Tensor],
    weight: Optional[Tensor], bias: Optional[Tensor], eps: float, norm: int, impl: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(out [B, S, N], x_new [B, S, N], mean [M], rstd [M]); [0] placeholders for absent ones."""
    outs = _fwd_outputs(x, y, norm)
    if x.numel():
        out, x_new, mean, rstd = outs
        launcher("layer_norm", impl).layer_norm_fwd(x, y, gate, shift, scale, weight, bias, eps, norm,
                                                    out=out, x_new=x_new, mean=mean, rstd=rstd)
    return _placeholders(x, outs)


@_layer_norm_fwd_op.register_fake
def _(x, y, gate, shift, scale, weight, bias, eps, norm, impl):
    return _placeholders(x, _fwd_outputs(x, y, norm))


def _bwd_outputs(h, y, gate, scale, weight, bias, norm, shift_ps) -> tuple[Optional[Tensor], ...]:
    """(dh, dy, dgate, dshift, dscale, dw, db) that layer_norm_bwd fills, allocated (uninitialized:
    the launcher writes every element; an empty call gets zeros, ``_zero_sums``), None
    where not applicable (see fastgen.kernels.layer_norm.layer_norm_bwd)."""
    B, S, N = h.shape
    dev = h.device
    has_res, has_mod = y is not None, scale is not None
    scale_ps = has_mod and scale.shape[1] == 1
    gate_ps = has_res and gate.shape[1] == 1

    def new(t, per_sample=False):
        return torch.empty((B, 1 if per_sample else S, N), dtype=t.dtype, device=dev)

    return (
        new(h) if norm != NORM_NONE else None,
        new(y) if has_res else None,
        new(gate, gate_ps) if has_res else None,
        new(scale, True) if has_mod and shift_ps else None,
        new(scale, scale_ps) if has_mod else None,
        torch.empty_like(weight) if weight is not None else None,
        torch.empty_like(bias) if bias is not None else None,
    )


def _zero_sums(grads) -> None:
    """An empty call (no tokens, or nothing to differentiate) launches nothing: its gradients are
    zeros (those that are sums over tokens or rows, per-sample dgate / dshift / dscale, dw and db,
    have elements even without tokens)."""
    for g in grads:
        if g is not None:
            g.zero_()


def _bwd_call(dout, scale, weight, bias, shift_per_sample, norm):
    """The backward call in launcher form: without dout (only x_new was used downstream) there is
    no norm gradient at all. Returns (scale, weight, bias, shift_ps, norm)."""
    if dout is None:
        norm, scale, weight, bias = NORM_NONE, None, None, None
    return scale, weight, bias, scale is not None and shift_per_sample, norm


@torch.library.custom_op("fastgen::layer_norm_bwd", mutates_args=())
def _layer_norm_bwd_op(
    dout: Optional[Tensor], dxnew: Optional[Tensor], h: Tensor, y: Optional[Tensor], gate: Optional[Tensor],
    scale: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor], mean: Optional[Tensor],
    rstd: Optional[Tensor], shift_per_sample: bool, norm: int, impl: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dh, dy, dgate, dshift, dscale, dw, db); [0] placeholders for absent ones (see layer_norm_bwd)."""
    scale, weight, bias, shift_ps, norm = _bwd_call(dout, scale, weight, bias, shift_per_sample, norm)
    grads = _bwd_outputs(h, y, gate, scale, weight, bias, norm, shift_ps)
    if h.numel() and (norm != NORM_NONE or y is not None):
        dh, dy, dgate, dshift, dscale, dw, db = grads
        launcher("layer_norm", impl).layer_norm_bwd(
            dout, dxnew, h, y, gate, scale, weight, bias, mean, rstd, shift_per_sample, norm,
            dh=dh, dy=dy, dgate=dgate, dshift=dshift, dscale=dscale, dw=dw, db=db,
        )
    else:
        _zero_sums(grads)
    return tuple(_ph(h, g) for g in grads)


@_layer_norm_bwd_op.register_fake
def _(dout, dxnew, h, y, gate, scale, weight, bias, mean, rstd, shift_per_sample, norm, impl):
    scale, weight, bias, shift_ps, norm = _bwd_call(dout, scale, weight, bias, shift_per_sample, norm)
    return tuple(_ph(h, g) for g in _bwd_outputs(h, y, gate, scale, weight, bias, norm, shift_ps))


# ----------------------------------------------------------------------------- autograd


class NormModulateFunction(torch.autograd.Function):
    """``[out, x_new] = f(x, y, gate, shift, scale, weight, bias)`` through the custom ops.

    Inputs are already in kernel form: x, y ``[B, S, N]``; gate / shift / scale
    ``[B, S, N]`` or ``[B, 1, N]``; all with unit last stride; weight / bias ``[N]``
    contiguous. Returns ``out`` (norm only), ``x_new`` (no norm) or ``(out, x_new)``.
    """

    @staticmethod
    def forward(ctx, x, y, gate, shift, scale, weight, bias, eps, norm, impl):
        out, x_new, mean, rstd = _layer_norm_fwd_op(x, y, gate, shift, scale, weight, bias, eps, norm, impl)
        has_res = y is not None
        h = x_new if has_res else x
        mean = mean if norm == NORM_LAYER else None
        rstd = rstd if norm != NORM_NONE else None
        ctx.save_for_backward(h, y, gate, scale, weight, bias, mean, rstd)
        ctx.norm, ctx.impl, ctx.has_res = norm, impl, has_res
        ctx.shift_ps = shift is not None and shift.shape[1] == 1
        ctx.set_materialize_grads(False)
        if norm == NORM_NONE:
            return x_new
        return (out, x_new) if has_res else out

    @staticmethod
    def backward(ctx, *grads):
        h, y, gate, scale, weight, bias, mean, rstd = ctx.saved_tensors
        if ctx.norm == NORM_NONE:
            dout, dxnew = None, grads[0]
        elif ctx.has_res:
            dout, dxnew = grads
        else:
            dout, dxnew = grads[0], None
        if dout is None and dxnew is None:
            return (None,) * 10

        def unit(t):
            return t if t is None or t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()

        dout, dxnew = unit(dout), unit(dxnew)
        dh, dy, dgate, dshift, dscale, dw, db = (
            _opt(g)
            for g in _layer_norm_bwd_op(
                dout, dxnew, h, y, gate, scale, weight, bias, mean, rstd, ctx.shift_ps, ctx.norm, ctx.impl
            )
        )
        if dh is None:  # no norm gradient: x_new's gradient is x's
            dh = dxnew
        if scale is not None and dout is not None and not ctx.shift_ps:
            dshift = dout  # per-token shift: its gradient is the output gradient itself
        need = ctx.needs_input_grad
        return tuple(g if need[i] else None for i, g in enumerate((dh, dy, dgate, dshift, dscale, dw, db))) + (
            None, None, None,
        )


def as_rows3(t: Tensor) -> Tensor:
    """t (..., N) -> [1, M, N] with a unit last stride (a view when possible)."""
    N = t.shape[-1]
    t2 = t.reshape(-1, N)
    if N > 1 and t2.stride(1) != 1:
        t2 = t2.contiguous()
    return t2.unsqueeze(0)


def unit_last(t: Optional[Tensor]) -> Optional[Tensor]:
    """t with a unit last stride (a copy only when it has not)."""
    if t is None or t.shape[-1] <= 1 or t.stride(-1) == 1:
        return t
    return t.contiguous()


# ----------------------------------------------------------------------------- public op


def layer_norm(
    x: Tensor,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
    backend: Optional[str] = "auto",
) -> Tensor:
    """Layer normalization over the last dimension, in fp32 with one rounding.

    ::

        x       (..., N)   float32 | float16 | bfloat16 (float64: torch backend only), any strides
        weight  (N,)       optional; x.dtype or float32
        bias    (N,)       optional; x.dtype or float32

        y = (x - mean(x, -1)) * rsqrt(var(x, -1) + eps) * weight + bias    -> (..., N), x.dtype

    The same function as ``F.layer_norm(x.float(), (N,), weight.float(), bias.float(),
    eps).to(x.dtype)`` — diffusers' ``FP32LayerNorm``. Gradients flow to ``x``,
    ``weight`` and ``bias``; the parameter gradients are deterministic.

    ``backend``: ``"auto"`` (default), ``"triton"`` or ``"torch"``; the Triton kernels
    serve rows of any width (up to 8192 elements a row is held in registers, wider rows
    take a two-pass chunked forward). An explicit backend that cannot serve the call raises
    ``fastgen.backend.BackendUnavailableError``. Registered as
    ``torch.ops.fastgen.layer_norm_fwd`` / ``layer_norm_bwd``, so ``torch.compile(fullgraph=True)``
    traces it.
    """
    op = "layer_norm"
    check_x(op, x)
    check_param(op, "weight", weight, x)
    check_param(op, "bias", bias, x)
    check_eps(op, eps)
    impl = resolve(op, backend, x)
    if impl == "torch" or x.numel() == 0:
        return layer_norm_ref(x, weight, bias, eps)
    w = None if weight is None else weight.contiguous()
    b = None if bias is None else bias.contiguous()
    y = NormModulateFunction.apply(as_rows3(x), None, None, None, None, w, b, float(eps), NORM_LAYER, impl)
    return y.view(x.shape)
