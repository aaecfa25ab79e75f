"""Adaptive (AdaLN) modulation and the gated residual of DiT blocks, fused with the norm.

::

    layer_norm_modulate(x, shift, scale)      = LN(x) * (1 + scale) + shift
    rms_norm_modulate(x, shift, scale)        = RMSNorm(x) * (1 + scale) + shift
    gated_residual(x, y, gate)                = x + gate * y
    gated_residual_layer_norm_modulate(x, y, gate, shift, scale)
        x_new = x + gate * y;   h = LN(x_new) * (1 + scale) + shift    -> (h, x_new)

Shapes: ``x`` and ``y`` are ``(B, S, N)`` (batch, tokens, features). ``shift``,
``scale`` and ``gate`` are each either per sample, ``(B, N)`` (or ``(B, 1, N)``),
broadcast over the tokens, or per token, ``(B, S, N)``; any strides — a chunk of a
``(B, 6N)`` AdaLN projection output is read in place, without a copy, as long as
its last dim is contiguous.

Numerics: fp32 math, one rounding at each store (diffusers' ``FP32LayerNorm``
convention for the norm, extended to the modulation): the reference is the
expression above evaluated on fp32 upcasts and rounded once. ``x_new`` is
``(x.float() + gate.float() * y.float()).to(x.dtype)``, and the norm is taken of
that rounded ``x_new``, the tensor that is returned and carried on as the
residual stream.

Gradients flow to every tensor input; those that reduce over tokens (per-sample
``shift`` / ``scale`` / ``gate``) and over rows (``weight``, ``bias``) are
deterministic (fixed-order sums of fp32 partials, no atomics).

Implementations: ``"triton"`` (``fastgen/kernels/layer_norm.py``, the kernel
family shared with ``fastgen.ops.layer_norm``) and ``"torch"`` (the references
below).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fastgen.backend import resolve
from fastgen.limits import NORM_LAYER, NORM_NONE, NORM_RMS
from fastgen.ops._checks import check_eps, check_param
from fastgen.ops.layer_norm import NormModulateFunction, _compute_dtype, _up, check_x, unit_last

# ----------------------------------------------------------------------------- references


def _bcast(t: Tensor) -> Tensor:
    """(B, N) -> (B, 1, N); (B, 1, N) and (B, S, N) unchanged."""
    return t.unsqueeze(1) if t.dim() == 2 else t


def _modulate_ref(n: Tensor, shift: Tensor, scale: Tensor, cd: torch.dtype) -> Tensor:
    return n * (1 + _bcast(scale).to(cd)) + _bcast(shift).to(cd)


def layer_norm_modulate_ref(x, shift, scale, eps=1e-6, weight=None, bias=None):
    """Plain-torch ``LN(x) * (1 + scale) + shift``, fp32 math, one rounding."""
    cd = _compute_dtype(x)
    n = F.layer_norm(x.to(cd), (x.shape[-1],), _up(weight, cd), _up(bias, cd), eps)
    return _modulate_ref(n, shift, scale, cd).to(x.dtype)


def rms_norm_modulate_ref(x, shift, scale, eps=1e-6, weight=None):
    """Plain-torch ``RMSNorm(x) * (1 + scale) + shift``, fp32 math, one rounding."""
    cd = _compute_dtype(x)
    n = F.rms_norm(x.to(cd), (x.shape[-1],), _up(weight, cd), eps)
    return _modulate_ref(n, shift, scale, cd).to(x.dtype)


def gated_residual_ref(x, y, gate):
    """Plain-torch ``x + gate * y``, fp32 math, one rounding."""
    cd = _compute_dtype(x)
    return (x.to(cd) + _bcast(gate).to(cd) * y.to(cd)).to(x.dtype)


def gated_residual_layer_norm_modulate_ref(x, y, gate, shift, scale, eps=1e-6, weight=None, bias=None):
    """Plain-torch ``(LN(x_new) * (1 + scale) + shift, x_new)`` with ``x_new = x + gate * y``."""
    x_new = gated_residual_ref(x, y, gate)
    return layer_norm_modulate_ref(x_new, shift, scale, eps, weight, bias), x_new


# ----------------------------------------------------------------------------- validation


def _check_mod(op: str, name: str, t, x: Tensor) -> None:
    """shift / scale / gate: (B, N), (B, 1, N) or (B, S, N); x's dtype and device."""
    B, S, N = x.shape
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    ok = tuple(t.shape) in ((B, N), (B, 1, N), (B, S, N))
    if not ok:
        raise ValueError(
            f"{op}: {name} must have shape (B, N) = ({B}, {N}) (per sample) or (B, S, N) = ({B}, {S}, {N}) "
            f"(per token) for x of shape {tuple(x.shape)}, got {tuple(t.shape)}"
        )
    if t.device != x.device:
        raise ValueError(f"{op}: {name} is on {t.device} but x is on {x.device}; put both on one device")
    if t.dtype != x.dtype:
        raise TypeError(f"{op}: {name} dtype {t.dtype} does not match x dtype {x.dtype}")


def _check_y(op: str, y, x: Tensor) -> None:
    if not isinstance(y, Tensor):
        raise TypeError(f"{op}: y must be a torch.Tensor, got {type(y).__name__}")
    if y.shape != x.shape:
        raise ValueError(f"{op}: y must have the shape of x {tuple(x.shape)}, got {tuple(y.shape)}")
    if y.device != x.device:
        raise ValueError(f"{op}: y is on {y.device} but x is on {x.device}; put both on one device")
    if y.dtype != x.dtype:
        raise TypeError(f"{op}: y dtype {y.dtype} does not match x dtype {x.dtype}")


def _k(t: Optional[Tensor]) -> Optional[Tensor]:
    """Kernel form of a modulation tensor: (B, 1|S, N) with a unit last stride."""
    return None if t is None else unit_last(_bcast(t))


def _c(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.contiguous()


def _run(x, y, gate, shift, scale, weight, bias, eps, norm, impl):
    return NormModulateFunction.apply(
        unit_last(x), unit_last(y), _k(gate), _k(shift), _k(scale), _c(weight), _c(bias), float(eps), norm, impl
    )


# ----------------------------------------------------------------------------- public ops


def layer_norm_modulate(
    x: Tensor,
    shift: Tensor,
    scale: Tensor,
    eps: float = 1e-6,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    backend: Optional[str] = "auto",
) -> Tensor:
    """AdaLN: ``LayerNorm(x) * (1 + scale) + shift`` in one pass.

    ::

        x             (B, S, N)            float32 | float16 | bfloat16, any strides
        shift, scale  (B, N) | (B, S, N)   per sample (broadcast over tokens) or per token; x.dtype
        weight, bias  (N,)                 optional LayerNorm affine; x.dtype or float32

        out = ((x - mean) * rsqrt(var + eps) * weight + bias) * (1 + scale) + shift   -> (B, S, N)

    fp32 math, one rounding to ``x.dtype``. Gradients for every tensor argument;
    per-sample ``shift`` / ``scale`` gradients (sums over tokens) and ``weight`` /
    ``bias`` gradients are deterministic. ``backend``: ``"auto"``, ``"triton"`` or
    ``"torch"`` (see ``fastgen.ops.layer_norm``).
    """
    op = "layer_norm_modulate"
    check_x(op, x, dims=3)
    _check_mod(op, "shift", shift, x)
    _check_mod(op, "scale", scale, x)
    check_param(op, "weight", weight, x)
    check_param(op, "bias", bias, x)
    check_eps(op, eps)
    impl = resolve(op, backend, x.device, call=(x,))
    if impl == "torch" or x.numel() == 0:
        return layer_norm_modulate_ref(x, shift, scale, eps, weight, bias)
    return _run(x, None, None, shift, scale, weight, bias, eps, NORM_LAYER, impl)


def rms_norm_modulate(
    x: Tensor,
    shift: Tensor,
    scale: Tensor,
    eps: float = 1e-6,
    weight: Optional[Tensor] = None,
    backend: Optional[str] = "auto",
) -> Tensor:
    """``RMSNorm(x) * (1 + scale) + shift`` in one pass.

    ::

        x             (B, S, N)            float32 | float16 | bfloat16, any strides
        shift, scale  (B, N) | (B, S, N)   per sample or per token; x.dtype
        weight        (N,)                 optional; x.dtype or float32

        out = x * rsqrt(mean(x**2) + eps) * weight * (1 + scale) + shift           -> (B, S, N)

    fp32 math, one rounding; gradients and backends as ``layer_norm_modulate``.
    """
    op = "rms_norm_modulate"
    check_x(op, x, dims=3)
    _check_mod(op, "shift", shift, x)
    _check_mod(op, "scale", scale, x)
    check_param(op, "weight", weight, x)
    check_eps(op, eps)
    impl = resolve(op, backend, x.device, call=(x,))
    if impl == "torch" or x.numel() == 0:
        return rms_norm_modulate_ref(x, shift, scale, eps, weight)
    return _run(x, None, None, shift, scale, weight, None, eps, NORM_RMS, impl)


def gated_residual(x: Tensor, y: Tensor, gate: Tensor, backend: Optional[str] = "auto") -> Tensor:
    """The gated residual of an AdaLN-Zero block: ``x + gate * y``.

    ::

        x, y   (B, S, N)            float32 | float16 | bfloat16, any strides
        gate   (B, N) | (B, S, N)   per sample or per token; x.dtype

        x_new = x + gate * y        -> (B, S, N), computed in fp32 and rounded once

    Gradients: ``dx = d``, ``dy = d * gate``, ``dgate = d * y`` (summed over tokens,
    deterministically, for a per-sample gate). ``backend`` as ``layer_norm_modulate``.
    """
    op = "gated_residual"
    check_x(op, x, dims=3)
    _check_y(op, y, x)
    _check_mod(op, "gate", gate, x)
    impl = resolve(op, backend, x.device, call=(x,))
    if impl == "torch" or x.numel() == 0:
        return gated_residual_ref(x, y, gate)
    return _run(x, y, gate, None, None, None, None, 0.0, NORM_NONE, impl)


def gated_residual_layer_norm_modulate(
    x: Tensor,
    y: Tensor,
    gate: Tensor,
    shift: Tensor,
    scale: Tensor,
    eps: float = 1e-6,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    backend: Optional[str] = "auto",
) -> tuple[Tensor, Tensor]:
    """What a DiT block runs between two sublayers, in one kernel: returns ``(h, x_new)``.

    ::

        x, y                (B, S, N)            residual stream and sublayer output; any strides
        gate, shift, scale  (B, N) | (B, S, N)   per sample or per token, each on its own; x.dtype
        weight, bias        (N,)                 optional LayerNorm affine; x.dtype or float32

        x_new = x + gate * y                                  -> (B, S, N), rounded to x.dtype
        h     = LN(x_new) * (1 + scale) + shift               -> (B, S, N)

    The norm is taken of the rounded ``x_new`` (the tensor returned, the next
    residual stream). Gradients for all seven tensor arguments; both outputs may
    be used downstream. ``backend`` as ``layer_norm_modulate``.
    """
    op = "gated_residual_layer_norm_modulate"
    check_x(op, x, dims=3)
    _check_y(op, y, x)
    _check_mod(op, "gate", gate, x)
    _check_mod(op, "shift", shift, x)
    _check_mod(op, "scale", scale, x)
    check_param(op, "weight", weight, x)
    check_param(op, "bias", bias, x)
    check_eps(op, eps)
    impl = resolve(op, backend, x.device, call=(x,))
    if impl == "torch" or x.numel() == 0:
        return gated_residual_layer_norm_modulate_ref(x, y, gate, shift, scale, eps, weight, bias)
    h, x_new = _run(x, y, gate, shift, scale, weight, bias, eps, NORM_LAYER, impl)
    return h, x_new
