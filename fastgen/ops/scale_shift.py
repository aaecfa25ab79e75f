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
This module validates, puts the tensors in kernel form (both with the helpers of
``fastgen.ops.modulate``, whose modulation this is), allocates the outputs and calls the
launchers of the implementation that ``resolve`` picked.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastgen.backend import launcher, resolve
from fastgen.ops._shapes import new_like
from fastgen.ops.layer_norm import _compute_dtype, check_x, unit_last
from fastgen.ops.modulate import _check_mod, _k, _modulate_ref

OP = "scale_shift"

# ----------------------------------------------------------------------------- reference


def scale_shift_ref(x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """Plain-torch ``x * (1 + scale) + shift`` in fp32 (float64 stays float64), one rounding:
    the modulation of ``fastgen.ops.modulate`` applied to ``x`` itself."""
    cd = _compute_dtype(x)
    return _modulate_ref(x.to(cd), shift, scale, cd).to(x.dtype)


# ----------------------------------------------------------------------------- validation


def _validate(x, scale, shift) -> None:
    """x (B, S, N) floating; scale / shift (B, N), (B, 1, N) or (B, S, N), x's dtype and device."""
    check_x(OP, x, dims=3)
    _check_mod(OP, "scale", scale, x)
    _check_mod(OP, "shift", shift, x)


def _per_sample(t: Tensor, x: Tensor) -> bool:
    """True when the kernel-form modulation t [B, 1 | S, N] is broadcast over x's S > 1 tokens:
    its gradient is a sum over tokens. With S = 1 it is per token (one row, nothing to sum)."""
    return t.shape[1] != x.shape[1]


# ----------------------------------------------------------------------------- torch.library ops


@torch.library.custom_op("fastgen::scale_shift_fwd", mutates_args=())
def _scale_shift_fwd_op(x: Tensor, scale: Tensor, shift: Tensor, impl: str) -> Tensor:
    """y [B, S, N] contiguous from x [B, S, N] and scale / shift [B, 1 | S, N]."""
    y = new_like(x)
    launcher(OP, impl).scale_shift_fwd(x, scale, shift, y)
    return y


@_scale_shift_fwd_op.register_fake
def _(x, scale, shift, impl):
    return new_like(x)


def _bwd_outputs(x: Tensor, scale: Tensor, shift_per_sample: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(dx [B, S, N], dscale of scale's shape [B, 1 | S, N], dshift [B, 1, N] per sample or [0]
    per token), contiguous, x's dtype (scale has it: validated)."""
    B, _, N = x.shape
    return new_like(x), new_like(scale), x.new_empty((B, 1, N) if shift_per_sample else (0,))


@torch.library.custom_op("fastgen::scale_shift_bwd", mutates_args=())
def _scale_shift_bwd_op(dy: Tensor, x: Tensor, scale: Tensor, shift_per_sample: bool, impl: str
                        ) -> tuple[Tensor, Tensor, Tensor]:
    """(dx [B, S, N], dscale like scale, dshift [B, 1, N] per sample or [0] per token: dy itself)."""
    dx, dscale, dshift = _bwd_outputs(x, scale, shift_per_sample)
    launcher(OP, impl).scale_shift_bwd(dy, x, scale, dx, dscale, dshift if shift_per_sample else None,
                                       _per_sample(scale, x), shift_per_sample)
    return dx, dscale, dshift


@_scale_shift_bwd_op.register_fake
def _(dy, x, scale, shift_per_sample, impl):
    return _bwd_outputs(x, scale, shift_per_sample)


# ----------------------------------------------------------------------------- autograd


class _ScaleShiftFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, shift, impl):
        ctx.save_for_backward(x, scale)
        ctx.impl, ctx.shift_ps = impl, _per_sample(shift, x)
        return _scale_shift_fwd_op(x, scale, shift, impl)

    @staticmethod
    def backward(ctx, dy):
        x, scale = ctx.saved_tensors
        dx, dscale, dshift = _scale_shift_bwd_op(dy.contiguous(), x, scale, ctx.shift_ps, ctx.impl)
        # per token, shift has dy's shape [B, S, N]: its gradient is dy itself
        return dx, dscale, (dshift if ctx.shift_ps else dy), None


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
    impl = resolve(OP, backend, x.device, call=(x,))
    if impl == "torch" or x.numel() == 0:
        return scale_shift_ref(x, scale, shift)
    return _ScaleShiftFunction.apply(unit_last(x), _k(scale), _k(shift), impl)
