"""``lora_add(y, x, down, up, s)``: the linear LoRA branch ``y + s * (x @ down^T) @ up^T``.

``dora_row_norm(w, up, down, s)``: DoRA's ``||W + s up @ down||`` per output row (a constant in
backward), without writing the adapted weight on the Triton path.

Shapes: ``x (..., K)``, ``y (..., N)`` (the base layer's output for ``x``), ``down (R, K)``,
``up (N, R)``; returns a tensor shaped like ``y``.

- ``backend="torch"`` (and ``"auto"``, which resolves to it until a recorded GPU run says
  otherwise): the plain composition, out of place.
- ``backend="triton"``: ``kernels/lora.py`` adds the branch **into ``y`` in place** in one
  kernel (no ``(tokens x N)`` temporary) and the autograd function below runs its backward
  (``t = x @ down^T`` and ``dt = s * dy @ up`` in one pass, then rank-R matmuls). ``y`` must not be
  needed by anything else (a base layer's fresh output is not). The launchers are
  ``torch.library.custom_op`` s (``fastgen::lora_add_`` mutates ``y``; ``fastgen::lora_add_bwd``,
  ``fastgen::dora_row_norm``) with fake implementations, so ``torch.compile(fullgraph=True)``
  traces a model with adapters on this path.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fastgen.backend import launcher, resolve

MAX_RANK = 128


def lora_add_ref(y: Tensor, x: Tensor, down: Tensor, up: Tensor, scale: float) -> Tensor:
    """The torch reference: ``y + scale * (x @ down^T) @ up^T``."""
    return y + scale * F.linear(F.linear(x, down.to(x.dtype)), up.to(x.dtype))


def _unsupported(y: Tensor, x: Tensor, down: Tensor) -> Optional[str]:
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"the fused LoRA kernel covers fp32/fp16/bf16 inputs, got {x.dtype}"
    if y.dtype != x.dtype:
        return f"the fused LoRA kernel needs the base output in the input dtype ({y.dtype} vs {x.dtype})"
    if down.shape[0] > MAX_RANK:
        return f"the fused LoRA kernel covers ranks up to {MAX_RANK}, got {down.shape[0]}"
    if not y.is_contiguous():
        return "the fused LoRA kernel adds into a contiguous base output"
    return None


@torch.library.custom_op("fastgen::lora_add_", mutates_args=("y",))
def _lora_add_op(y: Tensor, x: Tensor, down: Tensor, up: Tensor, scale: float) -> None:
    """y (..., N) += scale * (x (..., K) @ down^T) @ up^T, in place."""
    launcher("lora", "triton").lora_fwd_(y.view(-1, y.shape[-1]), x.reshape(-1, x.shape[-1]), down.t(), up.t(), scale)


@_lora_add_op.register_fake
def _(y, x, down, up, scale):
    return None


@torch.library.custom_op("fastgen::lora_add_bwd", mutates_args=())
def _lora_bwd_op(dy: Tensor, x: Tensor, down: Tensor, up: Tensor, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """(dx like x, d_down like down, d_up like up)."""
    dx, da, db = launcher("lora", "triton").lora_bwd(dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1]),
                                                      down.t(), up.t(), scale)
    return dx.reshape(x.shape), da.t().contiguous(), db.t().contiguous()


@_lora_bwd_op.register_fake
def _(dy, x, down, up, scale):
    return x.new_empty(x.shape), down.new_empty(down.shape), up.new_empty(up.shape)


class _LoRAAdd(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, x, down, up, scale):
        _lora_add_op(y, x, down, up, scale)
        ctx.mark_dirty(y)
        ctx.save_for_backward(x, down, up)
        ctx.scale = scale
        return y

    @staticmethod
    def backward(ctx, dy):
        x, down, up = ctx.saved_tensors
        dx, d_down, d_up = _lora_bwd_op(dy.contiguous(), x, down, up, ctx.scale)
        return dy, dx, d_down, d_up, None


def lora_add(y: Tensor, x: Tensor, down: Tensor, up: Tensor, scale: float, backend: Optional[str] = "auto") -> Tensor:
    """``y + scale * (x @ down^T) @ up^T`` (see the module docstring for shapes and backends)."""
    if down.dim() != 2 or up.dim() != 2 or down.shape[1] != x.shape[-1] or up.shape != (y.shape[-1], down.shape[0]):
        raise ValueError(
            f"lora_add: x {tuple(x.shape)}, down {tuple(down.shape)}, up {tuple(up.shape)}, y {tuple(y.shape)} "
            "do not fit y (..., N) = x (..., K) @ down (R, K)^T @ up (N, R)^T"
        )
    impl = resolve("lora", backend, x.device, {"triton": _unsupported(y, x, down)})
    if impl == "torch":
        return lora_add_ref(y, x, down, up, scale)
    return _LoRAAdd.apply(y, x, down.to(x.dtype), up.to(x.dtype), float(scale))


def dora_row_norm_ref(w: Tensor, up: Tensor, down: Tensor, scale: float) -> Tensor:
    """``||w + scale * up @ down||_2`` over every axis but the first: ``(out,)``, in w's dtype."""
    r = down.shape[0]
    dw = (up.reshape(up.shape[0], r) @ down.reshape(r, -1)).to(w.dtype)
    return (w.reshape(w.shape[0], -1) + scale * dw).norm(dim=1)


def dora_row_norm(w: Tensor, up: Tensor, down: Tensor, scale: float, backend: Optional[str] = "auto") -> Tensor:
    """DoRA's row norm (see the module docstring); a Linear or Conv2d weight, ``up (out, r[, 1, 1])``,
    ``down (r, in[, kh, kw])``. No gradient flows (DoRA detaches it)."""
    reasons = {
        "triton": None if w.dtype in (torch.float32, torch.float16, torch.bfloat16) and down.shape[0] <= MAX_RANK
        else f"the DoRA norm kernel covers fp32/fp16/bf16 weights and ranks <= {MAX_RANK}",
    }
    impl = resolve("dora_row_norm", backend, w.device, reasons)
    with torch.no_grad():
        if impl == "torch":
            return dora_row_norm_ref(w, up, down, scale)
        r = down.shape[0]
        out = _dora_norm_op(w.reshape(w.shape[0], -1), up.reshape(up.shape[0], r), down.reshape(r, -1), scale)
        return out.to(w.dtype)


@torch.library.custom_op("fastgen::dora_row_norm", mutates_args=())
def _dora_norm_op(w: Tensor, up: Tensor, down: Tensor, scale: float) -> Tensor:
    """(N,) fp32 from w (N, K), up (N, R), down (R, K)."""
    return launcher("lora", "triton").dora_row_norm(w, up, down, scale)


@_dora_norm_op.register_fake
def _(w, up, down, scale):
    return w.new_empty((w.shape[0],), dtype=torch.float32)
