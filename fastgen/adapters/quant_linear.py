"""``quant_linear(x, q, scale, bias)``: a Linear layer on a weight-only quantized weight.

Shapes: ``x (..., K)``, ``q (N, K)`` int8 or float8_e4m3fn, ``scale (N, KB)`` fp32 with ``KB``
dividing ``K`` (``W_hat[n, k] = q[n, k] * scale[n, k // (K / KB)]``), ``bias (N,)`` or None;
returns ``(..., N)`` in x's dtype. The gradient flows to ``x`` (``dy @ W_hat``) and to a bias
that requires grad; the quantized weight is frozen.

- ``backend="torch"`` (and ``"auto"`` until a recorded GPU run says otherwise): dequantize the
  weight to x's dtype, then ``F.linear`` (the transient is one layer's weight).
- ``backend="triton"``: ``kernels/quant_matmul.py`` dequantizes tiles in registers inside the GEMM,
  forward and input gradient; no full-precision weight is written. The launchers are registered
  as ``torch.library.custom_op`` (``fastgen::quant_linear_fwd`` / ``_dx``) with fake
  implementations, so ``torch.compile`` traces them.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fastgen.backend import launcher, resolve


def dequantize_weight(q: Tensor, scale: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    out_f, in_f = q.shape
    nb = scale.shape[1]
    return (q.float().reshape(out_f, nb, in_f // nb) * scale[..., None]).reshape(out_f, in_f).to(dtype)


def quant_linear_ref(x: Tensor, q: Tensor, scale: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    return F.linear(x, dequantize_weight(q, scale, x.dtype), None if bias is None else bias.to(x.dtype))


def _unsupported(x: Tensor, q: Tensor) -> Optional[str]:
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"the dequantize-GEMM kernel covers fp32/fp16/bf16 inputs, got {x.dtype}"
    if q.dtype == torch.float8_e4m3fn and x.device.type == "cuda" and torch.cuda.get_device_capability(x.device) < (8, 9):
        return "float8_e4m3 weights need an sm_89+ GPU in the Triton kernel"
    return None


@torch.library.custom_op("fastgen::quant_linear_fwd", mutates_args=())
def _fwd_op(x: Tensor, q: Tensor, scale: Tensor, bias: Optional[Tensor]) -> Tensor:
    """y (..., N) from x (..., K); allocated in its final shape (no view: the fused LoRA adds into it)."""
    y = torch.empty(*x.shape[:-1], q.shape[0], device=x.device, dtype=x.dtype)
    launcher("quant_linear", "triton").qmm_fwd(x.reshape(-1, x.shape[-1]), q, scale, bias, out=y.view(-1, q.shape[0]))
    return y


@_fwd_op.register_fake
def _(x, q, scale, bias):
    return x.new_empty((*x.shape[:-1], q.shape[0]))


@torch.library.custom_op("fastgen::quant_linear_dx", mutates_args=())
def _dx_op(dy: Tensor, q: Tensor, scale: Tensor) -> Tensor:
    """dx (..., K) from dy (..., N)."""
    dx = torch.empty(*dy.shape[:-1], q.shape[1], device=dy.device, dtype=dy.dtype)
    launcher("quant_linear", "triton").qmm_dx(dy.reshape(-1, dy.shape[-1]).contiguous(), q, scale,
                                               out=dx.view(-1, q.shape[1]))
    return dx


@_dx_op.register_fake
def _(dy, q, scale):
    return dy.new_empty((*dy.shape[:-1], q.shape[1]))


class _QuantLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, q, scale, bias):
        ctx.save_for_backward(q, scale)
        return _fwd_op(x, q, scale, bias)

    @staticmethod
    def backward(ctx, dy):
        q, scale = ctx.saved_tensors
        dx = _dx_op(dy.contiguous(), q, scale) if ctx.needs_input_grad[0] else None
        db = dy.reshape(-1, dy.shape[-1]).float().sum(0).to(dy.dtype) if ctx.needs_input_grad[3] else None
        return dx, None, None, db


def quant_linear(x: Tensor, q: Tensor, scale: Tensor, bias: Optional[Tensor] = None,
                 backend: Optional[str] = "auto") -> Tensor:
    """A Linear on a quantized weight (see the module docstring for shapes and backends)."""
    if q.dim() != 2 or x.shape[-1] != q.shape[1] or scale.shape[0] != q.shape[0] or q.shape[1] % scale.shape[1]:
        raise ValueError(
            f"quant_linear: x {tuple(x.shape)}, q {tuple(q.shape)}, scale {tuple(scale.shape)} do not fit "
            "x (..., K), q (N, K), scale (N, KB) with KB dividing K"
        )
    impl = resolve("quant_linear", backend, x.device, {"triton": _unsupported(x, q)})
    if impl == "torch":
        return quant_linear_ref(x, q, scale, bias)
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    return _QuantLinear.apply(x, q, scale, bias)
