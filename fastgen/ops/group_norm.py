"""GroupNorm over ``(N, C, *spatial)`` tensors, optionally fused with SiLU.

    y = act((x - mean_g) / sqrt(var_g + eps) * weight[c] + bias[c])

with ``mean_g`` / ``var_g`` (biased) taken over the ``C / num_groups`` channels of the
group and all spatial positions, and ``act`` the identity or SiLU
(``activation="silu"``: the ``GroupNorm -> SiLU`` pair of every UNet / VAE ResNet
block). Computed in fp32 whatever the input dtype and rounded once to the input
dtype: exactly ``F.silu(F.group_norm(x.float(), G, w.float(), b.float(), eps)).to(x.dtype)``.

Implementations (``backend=``): ``"triton"`` (``fastgen/kernels/group_norm.py``),
``"cuda"`` (``csrc/group_norm/``, the ``fastgen._C`` extension), ``"torch"`` (the
reference below). See ``fastgen.backend`` for how ``"auto"`` chooses.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fastgen.backend import launcher, resolve
from fastgen.limits import group_norm_reason
from fastgen.ops._checks import check_eps, check_param

ACTIVATIONS = (None, "silu")

_CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


# ----------------------------------------------------------------------------- reference


def group_norm_ref(
    x: Tensor,
    num_groups: int,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
    activation: Optional[str] = None,
) -> Tensor:
    """Plain-torch GroupNorm (+ SiLU): the truth for tests and the ``backend="torch"`` path.

    fp32 math (``F.group_norm`` on the upcast input; float64 stays float64), one rounding to ``x.dtype``.
    """
    acc = torch.promote_types(x.dtype, torch.float32)  # fp32, or float64 for float64 inputs
    w = None if weight is None else weight.to(acc)
    b = None if bias is None else bias.to(acc)
    if w is None and b is not None:
        # F.group_norm's CPU backward fails for a bias without a weight (torch 2.13): add it here.
        y = F.group_norm(x.to(acc), num_groups, None, None, eps) + b.view((1, -1) + (1,) * (x.dim() - 2))
    else:
        y = F.group_norm(x.to(acc), num_groups, w, b, eps)
    if activation == "silu":
        y = F.silu(y)
    return y.to(x.dtype)


# ----------------------------------------------------------------------------- validation


def _validate(x, num_groups, weight, bias, eps, activation) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"group_norm: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() not in (3, 4, 5):
        raise ValueError(
            "group_norm: x must have shape (N, C, *spatial) with 1 to 3 spatial dims (a 3-D, 4-D or 5-D "
            f"tensor), got a {x.dim()}-D tensor of shape {tuple(x.shape)}"
        )
    if not x.is_floating_point():
        raise TypeError(f"group_norm: x must be a floating-point tensor, got dtype {x.dtype}")
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1:
        raise ValueError(f"group_norm: num_groups must be an int >= 1, got {num_groups!r}")
    C = x.shape[1]
    if C % num_groups != 0:
        raise ValueError(
            f"group_norm: the number of channels C={C} (dim 1 of x) must be divisible by num_groups={num_groups}"
        )
    for name, t in (("weight", weight), ("bias", bias)):
        check_param("group_norm", name, t, x, dim=1, what="(one value per channel of x")
    if activation not in ACTIVATIONS:
        raise ValueError(f"group_norm: unknown activation {activation!r}; expected None or 'silu'")
    check_eps("group_norm", eps)


_unsupported = group_norm_reason  # the name fastgen.patch and fastgen.models read


def _layout(x: Tensor) -> Optional[torch.memory_format]:
    """The channels-last memory format x is dense in, or None for contiguous (or anything else)."""
    fmt = _CHANNELS_LAST.get(x.dim())
    if fmt is not None and not x.is_contiguous() and x.is_contiguous(memory_format=fmt):
        return fmt
    return None


def _as_ncs(t: Tensor, fmt: Optional[torch.memory_format]) -> Tensor:
    """A dense [N, C, S] view of t: contiguous, or channels-last strides (S*C, 1, C) when fmt is given."""
    N, C = t.shape[:2]
    if fmt is None:
        return t.contiguous().view(N, C, -1)
    return t.contiguous(memory_format=fmt).flatten(2)


# ----------------------------------------------------------------------------- torch.library ops


def _fwd_outputs(x: Tensor, num_groups: int) -> tuple[Tensor, Tensor, Tensor]:
    """(y like x with its strides, mean [N*G] fp32, rstd [N*G] fp32), allocated for x [N, C, S]."""
    n = x.shape[0] * num_groups
    return torch.empty_like(x), x.new_empty((n,), dtype=torch.float32), x.new_empty((n,), dtype=torch.float32)


def _bwd_outputs(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """(dx like x with its strides, dw [C] like weight or [0], db [C] like bias or [0]), allocated."""
    dw = x.new_empty(0) if weight is None else torch.empty_like(weight)
    db = x.new_empty(0) if bias is None else torch.empty_like(bias)
    return torch.empty_like(x), dw, db


@torch.library.custom_op("fastgen::group_norm_fwd", mutates_args=())
def _group_norm_fwd_op(
    x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], num_groups: int, eps: float, silu: bool, impl: str
) -> tuple[Tensor, Tensor, Tensor]:
    """(y [N, C, S] with the strides of x, mean [N*G] fp32, rstd [N*G] fp32) from x [N, C, S]."""
    y, mean, rstd = _fwd_outputs(x, num_groups)
    if x.numel():
        launcher("group_norm", impl).group_norm_fwd(x, weight, bias, num_groups, eps, silu, y=y, mean=mean, rstd=rstd)
    return y, mean, rstd


@_group_norm_fwd_op.register_fake
def _(x, weight, bias, num_groups, eps, silu, impl):
    return _fwd_outputs(x, num_groups)


@torch.library.custom_op("fastgen::group_norm_bwd", mutates_args=())
def _group_norm_bwd_op(
    dy: Tensor,
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    mean: Tensor,
    rstd: Tensor,
    num_groups: int,
    silu: bool,
    impl: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dx [N, C, S] with the strides of x, dw [C] or [0] without a weight, db [C] or [0] without a bias)."""
    dx, dw, db = _bwd_outputs(x, weight, bias)
    if x.numel() == 0:  # the parameter gradients are sums over no elements
        return dx, dw.zero_(), db.zero_()
    launcher("group_norm", impl).group_norm_bwd(dy, x, weight, bias, mean, rstd, num_groups, silu, dx=dx,
                                                dw=dw if weight is not None else None,
                                                db=db if bias is not None else None)
    return dx, dw, db


@_group_norm_bwd_op.register_fake
def _(dy, x, weight, bias, mean, rstd, num_groups, silu, impl):
    return _bwd_outputs(x, weight, bias)


# ----------------------------------------------------------------------------- autograd


class _GroupNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, num_groups, eps, silu, impl):
        fmt = _layout(x)
        x3 = _as_ncs(x, fmt)
        weight = None if weight is None else weight.contiguous()
        bias = None if bias is None else bias.contiguous()
        y, mean, rstd = _group_norm_fwd_op(x3, weight, bias, num_groups, eps, silu, impl)
        ctx.save_for_backward(x3, weight, bias, mean, rstd)
        ctx.fmt, ctx.shape, ctx.num_groups, ctx.silu, ctx.impl = fmt, x.shape, num_groups, silu, impl
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x3, weight, bias, mean, rstd = ctx.saved_tensors
        # dy in the memory layout of x (the kernels index both with the same offsets).
        dy3 = _as_ncs(dy, ctx.fmt)
        if dy3.stride() != x3.stride():
            dy3 = torch.empty_like(x3).copy_(dy3)
        dx, dw, db = _group_norm_bwd_op(dy3, x3, weight, bias, mean, rstd, ctx.num_groups, ctx.silu, ctx.impl)
        return (
            dx.view(ctx.shape) if ctx.needs_input_grad[0] else None,
            dw if weight is not None and ctx.needs_input_grad[1] else None,
            db if bias is not None and ctx.needs_input_grad[2] else None,
            None,
            None,
            None,
            None,
        )


def _empty(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor]) -> Tensor:
    """The result for a zero-size x: an empty tensor like x whose gradients are zeros
    (F.group_norm's backward gives NaN weight gradients for empty groups)."""
    y = x * 0
    for p in (weight, bias):
        if p is not None:
            y = y + (p.sum() * 0).to(x.dtype)
    return y


# ----------------------------------------------------------------------------- public op


def group_norm(
    x: Tensor,
    num_groups: int,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
    activation: Optional[str] = None,
    backend: Optional[str] = "auto",
) -> Tensor:
    """Group normalization over ``(N, C, *spatial)``, optionally fused with SiLU.

    ::

        x        (N, C, L) | (N, C, H, W) | (N, C, D, H, W)
                 float32 | float16 | bfloat16 (float64: torch backend only);
                 contiguous or channels_last / channels_last_3d (other strides are copied)
        weight   (C,)  optional; x.dtype or float32
        bias     (C,)  optional; x.dtype or float32

        G = num_groups, K = C // G; for each sample n and group g (K channels x all positions):
        yn = (x - mean_ng) / sqrt(var_ng + eps) * weight[c] + bias[c]
        y  = yn                   activation=None
        y  = yn * sigmoid(yn)     activation="silu"          -> shape of x, x.dtype,
                                                                memory format of x

    Numerics: fp32 math, one rounding to ``x.dtype`` — the same function as
    ``F.silu(F.group_norm(x.float(), G, weight.float(), bias.float(), eps)).to(x.dtype)``.
    Statistics use a split reduction (Welford per lane, Chan's merge across lanes and
    programs) that stays exact for groups of millions of elements with a large mean.
    Gradients flow to ``x``, ``weight`` and ``bias`` (through the SiLU when fused);
    weight and bias gradients are deterministic on every backend (no atomics).

    ``backend``: ``"auto"`` (default), ``"triton"``, ``"cuda"`` or ``"torch"``; an
    explicit kernel backend that cannot serve the call (CPU tensors, extension not
    built, float64, more than 1024 channels per group) raises
    ``fastgen.backend.BackendUnavailableError``. Registered as
    ``torch.ops.fastgen.group_norm_fwd`` / ``group_norm_bwd``, so ``torch.compile``
    with ``fullgraph=True`` traces it.
    """
    _validate(x, num_groups, weight, bias, eps, activation)
    impl = resolve("group_norm", backend, x.device, call=(x, num_groups))
    if x.numel() == 0:
        return _empty(x, weight, bias)
    if impl == "torch":
        return group_norm_ref(x, num_groups, weight, bias, eps, activation)
    if weight is not None and bias is not None and weight.dtype != bias.dtype:
        # The CUDA kernels take one parameter dtype; the cast is differentiable.
        weight, bias = weight.float(), bias.float()
    return _GroupNormFunction.apply(x, weight, bias, num_groups, float(eps), activation == "silu", impl)
