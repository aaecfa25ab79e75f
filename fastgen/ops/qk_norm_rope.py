"""Fused per-head RMSNorm of q and k followed by RoPE (Flux, SD3.5 attention).

For every head row ``x`` (D elements) of q and of k, with the norm weight of q or k::

    n = x * rsqrt(mean(x ** 2) + eps) * weight      (RMSNorm over D, fp32)
    y = n * cos + rot(n) * sin  on the first R dims, n on the rest   (RoPE, fastgen.ops.rope)

in fp32 from load to store, rounded once to the input dtype. This is the unfused
``apply_rope(rms_norm(q), ...)`` minus the intermediate rounding of the normalized
q / k to the input dtype (so it is the more accurate of the two; they agree to about
one unit in the last place).

Implementations (``backend=``): ``"triton"`` (``fastgen/kernels/qk_norm_rope.py``), ``"cuda"``
(``csrc/qk_norm_rope/``, launched by ``fastgen.cuda.qk_norm_rope``) and ``"torch"``
(``qk_norm_rope_ref``).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fastgen.backend import launcher, resolve
from fastgen.ops._shapes import new_like, rope_call_is_empty
from fastgen.ops.rope import rope_rotate_float, unit_last, validate_qk

# ----------------------------------------------------------------------------- reference


def qk_norm_rope_ref(q: Tensor, k: Tensor, q_weight: Tensor, k_weight: Tensor, cos: Tensor, sin: Tensor,
                     eps: float = 1e-6, layout: str = "bshd", interleaved: bool = False) -> tuple[Tensor, Tensor]:
    """Plain torch: ``F.rms_norm`` in fp32, the rotation in fp32, one rounding. The truth for
    tests and the ``backend="torch"`` path (differentiable, cos / sin included)."""
    outs = []
    for x, w in ((q, q_weight), (k, k_weight)):
        n = F.rms_norm(x.float(), (x.shape[-1],), w.float(), eps)
        outs.append(rope_rotate_float(n, cos, sin, layout, interleaved).to(x.dtype))
    return outs[0], outs[1]


# ----------------------------------------------------------------------------- validation


def _validate(q, k, q_weight, k_weight, cos, sin, eps, layout):
    validate_qk("qk_norm_rope", q, k, cos, sin, layout)
    D = q.shape[-1]
    for name, w in (("q_weight", q_weight), ("k_weight", k_weight)):
        if not isinstance(w, Tensor):
            raise TypeError(f"qk_norm_rope: {name} must be a torch.Tensor, got {type(w).__name__}")
        if w.shape != (D,):
            raise ValueError(f"qk_norm_rope: {name} must have shape ({D},) (the head dim of q), got {tuple(w.shape)}")
        if w.device != q.device:
            raise ValueError(f"qk_norm_rope: {name} is on {w.device} but q is on {q.device}")
        if w.dtype not in (q.dtype, torch.float32):
            raise TypeError(f"qk_norm_rope: {name} dtype {w.dtype} does not match q dtype {q.dtype}; "
                            f"use {q.dtype} or torch.float32")
    if not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"qk_norm_rope: eps must be a finite number >= 0, got {eps!r}")


# ----------------------------------------------------------------------------- torch.library ops


@torch.library.custom_op("fastgen::qk_norm_rope_fwd", mutates_args=())
def _fwd_op(q: Tensor, k: Tensor, q_weight: Tensor, k_weight: Tensor, cos: Tensor, sin: Tensor, eps: float,
            layout: str, interleaved: bool, impl: str) -> tuple[Tensor, Tensor]:
    qo, ko = new_like(q), new_like(k)
    if not rope_call_is_empty(q, k, cos, layout):
        launcher("qk_norm_rope", impl).qk_norm_rope_fwd(q, k, q_weight, k_weight, cos, sin, eps, layout, interleaved,
                                                        q_out=qo, k_out=ko)
    return qo, ko


@_fwd_op.register_fake
def _(q, k, q_weight, k_weight, cos, sin, eps, layout, interleaved, impl):
    return new_like(q), new_like(k)


def _bwd_outputs(q: Tensor, k: Tensor, q_weight: Tensor, k_weight: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dwq, dwk): contiguous like q / k, the weight gradients like the weights."""
    return new_like(q), new_like(k), torch.empty_like(q_weight), torch.empty_like(k_weight)


@torch.library.custom_op("fastgen::qk_norm_rope_bwd", mutates_args=())
def _bwd_op(dq_out: Tensor, dk_out: Tensor, q: Tensor, k: Tensor, q_weight: Tensor, k_weight: Tensor, cos: Tensor,
            sin: Tensor, eps: float, layout: str, interleaved: bool, impl: str
            ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    dq, dk, dwq, dwk = _bwd_outputs(q, k, q_weight, k_weight)
    if rope_call_is_empty(q, k, cos, layout):
        return dq.zero_(), dk.zero_(), dwq.zero_(), dwk.zero_()  # sums over no rows
    launcher("qk_norm_rope", impl).qk_norm_rope_bwd(dq_out, dk_out, q, k, q_weight, k_weight, cos, sin, eps, layout,
                                                    interleaved, dq=dq, dk=dk, dwq=dwq, dwk=dwk)
    return dq, dk, dwq, dwk


@_bwd_op.register_fake
def _(dq_out, dk_out, q, k, q_weight, k_weight, cos, sin, eps, layout, interleaved, impl):
    return _bwd_outputs(q, k, q_weight, k_weight)


# ----------------------------------------------------------------------------- autograd


class _QKNormRopeFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, q_weight, k_weight, cos, sin, eps, layout, interleaved, impl):
        q, k = unit_last(q), unit_last(k)
        q_weight, k_weight = q_weight.contiguous(), k_weight.contiguous()
        cos, sin = unit_last(cos), unit_last(sin)
        ctx.save_for_backward(q, k, q_weight, k_weight, cos, sin)  # rstd is recomputed in the backward
        ctx.args = (eps, layout, interleaved, impl)
        return _fwd_op(q, k, q_weight, k_weight, cos, sin, eps, layout, interleaved, impl)

    @staticmethod
    def backward(ctx, dq_out, dk_out):
        q, k, q_weight, k_weight, cos, sin = ctx.saved_tensors
        dq, dk, dwq, dwk = _bwd_op(unit_last(dq_out), unit_last(dk_out), q, k, q_weight, k_weight, cos, sin,
                                   *ctx.args)
        need = ctx.needs_input_grad
        return (dq if need[0] else None, dk if need[1] else None, dwq if need[2] else None,
                dwk if need[3] else None, None, None, None, None, None, None)


# ----------------------------------------------------------------------------- public op


def qk_norm_rope(q: Tensor, k: Tensor, q_weight: Tensor, k_weight: Tensor, cos: Tensor, sin: Tensor,
                 eps: float = 1e-6, layout: str = "bshd", interleaved: bool = False,
                 backend: Optional[str] = "auto") -> tuple[Tensor, Tensor]:
    """Per-head RMSNorm of q and k over the head dim, then RoPE, in one kernel.

    ::

        q         (B, S, Hq, D) layout="bshd" | (B, Hq, S, D) layout="bhsd"; any strides,
                                                              last dim contiguous
        k         (B, S, Hk, D)               | (B, Hk, S, D)   (Hk may differ from Hq)
        q_weight  (D,)  q.dtype or float32    (the norm_q weight)
        k_weight  (D,)  q.dtype or float32    (the norm_k weight)
        cos, sin  (S, R) or (B, S, R), R even <= D   (see fastgen.ops.apply_rope)
        -> (q_out, k_out), shapes and dtype of q and k

        q_out = rope(q * rsqrt(mean(q**2, -1) + eps) * q_weight)   (same for k)

    fp32 from load to store, one rounding (``qk_norm_rope_ref``). Gradients flow to q, k
    and both weights; the weight gradients are deterministic (per-program fp32 partials
    summed in a fixed order, no atomics); cos / sin are constants on the kernel backends.
    ``backend``: ``"triton"``, ``"cuda"`` (CUDA C++), ``"torch"``, or ``"auto"`` (see
    ``fastgen.backend``). Registered as ``torch.ops.fastgen.qk_norm_rope_fwd`` / ``qk_norm_rope_bwd``
    (``torch.compile(fullgraph=True)`` traces it).
    """
    _validate(q, k, q_weight, k_weight, cos, sin, eps, layout)
    impl = resolve("qk_norm_rope", backend, q.device, call=(q, cos, sin))
    if impl == "torch" or q.numel() == 0 or k.numel() == 0:
        return qk_norm_rope_ref(q, k, q_weight, k_weight, cos, sin, eps, layout, interleaved)
    return _QKNormRopeFunction.apply(q, k, q_weight, k_weight, cos, sin, float(eps), layout, bool(interleaved), impl)
