"""AdaLN modulation without a norm: ``y = x * (1 + scale) + shift``.

::

    x             (B, S, N)                      float32 | float16 | bfloat16, any strides
    scale, shift  (B, N) | (B, 1, N) | (B, S, N)  each per sample (broadcast over the S tokens)
                                                 or per token; x.dtype
    y = x * (1 + scale) + shift                  -> (B, S, N), x.dtype

Computed in fp32 and rounded once (the fp32 reference below evaluated on upcasts).
Gradients: ``dx = dy * (1 + scale)``, ``dscale = dy * x``, ``dshift = dy``, summed over the
tokens for a per-sample modulation (fixed-order sums of fp32 partials: deterministic).

Implementations (``backend=``): ``"triton"`` (``fastgen/kernels/scale_shift.py``) and
``"torch"`` (the reference below); see ``fastgen.backend`` for how ``"auto"`` chooses.
This module validates, puts the tensors in kernel form, allocates the outputs and calls
the launchers of the implementation that ``resolve`` picked.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastgen.backend import launcher, resolve

# ----------------------------------------------------------------------------- reference


def _bcast(t: Tensor) -> Tensor:
    """(B, N) -> (B, 1, N); (B, 1, N) and (B, S, N) unchanged."""
    return t.unsqueeze(1) if t.dim() == 2 else t


def scale_shift_ref(x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """Plain-torch ``x * (1 + scale) + shift`` in fp32 (float64 stays float64), one rounding."""
    cd = torch.promote_types(x.dtype, torch.float32)
    return (x.to(cd) * (1 + _bcast(scale).to(cd)) + _bcast(shift).to(cd)).to(x.dtype)


# ----------------------------------------------------------------------------- validation


def _validate(x, scale, shift) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"scale_shift: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 3:
        raise ValueError(f"scale_shift: x must have shape (B, S, N) (batch, tokens, features), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"scale_shift: x must be a floating-point tensor, got dtype {x.dtype}")
    B, S, N = x.shape
    for name, t in (("scale", scale), ("shift", shift)):
        if not isinstance(t, Tensor):
            raise TypeError(f"scale_shift: {name} must be a torch.Tensor, got {type(t).__name__}")
        if tuple(t.shape) not in ((B, N), (B, 1, N), (B, S, N)):
            raise ValueError(f"scale_shift: {name} must have shape (B, N) = ({B}, {N}) (per sample) or (B, S, N) = "
                             f"({B}, {S}, {N}) (per token) for x of shape {tuple(x.shape)}, got {tuple(t.shape)}")
        if t.device != x.device:
            raise ValueError(f"scale_shift: {name} is on {t.device} but x is on {x.device}; put both on one device")
        if t.dtype != x.dtype:
            raise TypeError(f"scale_shift: {name} dtype {t.dtype} does not match x dtype {x.dtype}")


def _unit_last(t: Tensor) -> Tensor:
    """t with a unit last stride (a copy only when it has not)."""
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def _kernel_form(t: Tensor) -> Tensor:
    """(B, 1 | S, N) with a unit last stride (a view when possible)."""
    return _unit_last(_bcast(t))


# ----------------------------------------------------------------------------- torch.library ops


@torch.library.custom_op("fastgen::scale_shift_fwd", mutates_args=())
def _scale_shift_fwd_op(x: Tensor, scale: Tensor, shift: Tensor, impl: str) -> Tensor:
    """y [B, S, N] contiguous from x [B, S, N] and scale / shift [B, 1 | S, N]."""
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    launcher("scale_shift", impl).scale_shift_fwd(x, scale, shift, y)
    return y


@_scale_shift_fwd_op.register_fake
def _(x, scale, shift, impl):
    return x.new_empty(x.shape)


@torch.library.custom_op("fastgen::scale_shift_bwd", mutates_args=())
def _scale_shift_bwd_op(dy: Tensor, x: Tensor, scale: Tensor, shift_per_sample: bool, impl: str
                        ) -> tuple[Tensor, Tensor, Tensor]:
    """(dx [B, S, N], dscale like scale, dshift [B, 1, N] per sample or [0] per token: dy itself)."""
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    dscale, dshift = launcher("scale_shift", impl).scale_shift_bwd(dy, x, scale, dx, scale.shape[1] == 1,
                                                                   shift_per_sample)
    dshift = x.new_empty(0) if dshift is None else dshift.to(x.dtype)
    return dx, dscale.to(x.dtype), dshift


@_scale_shift_bwd_op.register_fake
def _(dy, x, scale, shift_per_sample, impl):
    B, _, N = x.shape
    return x.new_empty(x.shape), scale.new_empty(scale.shape), x.new_empty((B, 1, N) if shift_per_sample else (0,))


# ----------------------------------------------------------------------------- autograd


class _ScaleShiftFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, shift, impl):
        ctx.save_for_backward(x, scale)
        ctx.impl, ctx.shift_ps = impl, shift.shape[1] == 1 and x.shape[1] != 1
        ctx.shift_shape = shift.shape
        return _scale_shift_fwd_op(x, scale, shift, impl)

    @staticmethod
    def backward(ctx, dy):
        x, scale = ctx.saved_tensors
        dx, dscale, dshift = _scale_shift_bwd_op(dy.contiguous(), x, scale, ctx.shift_ps, ctx.impl)
        if not ctx.shift_ps:
            dshift = dy.reshape(ctx.shift_shape)  # per token: the output gradient itself
        return dx, dscale, dshift, None


# ----------------------------------------------------------------------------- public op


def scale_shift(x: Tensor, scale: Tensor, shift: Tensor, backend: Optional[str] = "auto") -> Tensor:
    """AdaLN modulation ``x * (1 + scale) + shift`` in one pass, fp32 math, one rounding.

    ::

        x             (B, S, N)            float32 | float16 | bfloat16, any strides
        scale, shift  (B, N) | (B, S, N)   each per sample or per token; x.dtype; any strides
                                           (a chunk of a (B, 6N) AdaLN projection is read in place)

        y = x * (1 + scale) + shift        -> (B, S, N), x.dtype

    Gradients flow to all three tensors; per-sample gradients are deterministic sums over
    tokens. ``backend``: ``"auto"`` (default), ``"triton"`` or ``"torch"``; an explicit
    backend that cannot serve the call raises ``fastgen.backend.BackendUnavailableError``.
    Registered as ``torch.ops.fastgen.scale_shift_fwd`` / ``scale_shift_bwd``.
    """
    _validate(x, scale, shift)
    impl = resolve("scale_shift", backend, x.device, call=(x,))
    if impl == "torch" or x.numel() == 0:
        return scale_shift_ref(x, scale, shift)
    return _ScaleShiftFunction.apply(_unit_last(x), _kernel_form(scale), _kernel_form(shift), impl)
