"""``fastgen.optim.clip_grad_norm_``: ``torch.nn.utils.clip_grad_norm_`` with multi-tensor kernels.

    total = ||(||g_1||, ..., ||g_n||)||_p           (p = norm_type)
    g_i  <- g_i * min(1, max_norm / (total + 1e-6))

Same arguments, result and return value (the total norm, a tensor, in the promoted
dtype of the gradients) as torch's. Dense fp32/fp16/bf16 gradients on one device take
the kernels, one launch per gradient dtype for the norm and one for the scaling, with
the coefficient kept on the device: no host sync unless ``error_if_nonfinite`` (one
``isfinite`` check of the total, before anything is scaled).

- ``backend="triton"``: the 2-norm only (the sum of squares per dtype, summed by torch).
- ``backend="cuda"``: ``norm_type`` 2, 1, any p >= 1 and inf; fp32 partial sums of
  ``|g|^p`` per chunk (max ``|g|`` for inf, NaN propagating), one block summing them in a
  fixed order (deterministic) and writing the total and the coefficient.

Other norm types and layouts take torch's implementation.
"""

from __future__ import annotations

import functools
from collections import defaultdict

import torch

from fastgen.backend import launcher, resolve
from fastgen.optim._common import KERNEL_DTYPES, dense_alike, local

_LAYOUT = "only dense fp32/fp16/bf16 gradients on one device are fused"


def clip_grad_norm_(parameters, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False,
                    foreach=None, *, backend: str = "auto") -> torch.Tensor:
    """Clip the gradients of ``parameters`` in place to a total ``norm_type``-norm of at most ``max_norm``.

    Returns the total norm of the gradients (before clipping), as torch does.
    """
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    parameters = list(parameters)
    grads = [local(p.grad) for p in parameters if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    device = grads[0].device
    norm_type = float(norm_type)
    if not all(g.device == device and g.dtype in KERNEL_DTYPES and dense_alike(g) for g in grads):
        unsupported = {"triton": _LAYOUT, "cuda": _LAYOUT}
    else:
        unsupported = {
            "triton": None if norm_type == 2.0 else f"only the 2-norm is fused in Triton, got norm_type={norm_type}",
            "cuda": None if norm_type >= 1.0 else f"the CUDA kernels take norm_type >= 1 or inf, got {norm_type}",
        }
    impl = resolve("clip_grad_norm_", backend, device, unsupported)
    if impl == "torch":
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm, norm_type, error_if_nonfinite, foreach)

    by_dtype, total, coef = _kernel_total(grads, impl, norm_type, max_norm)
    if error_if_nonfinite and not torch.isfinite(total):
        raise RuntimeError(
            f"The total norm of order {norm_type} for gradients from `parameters` is non-finite, so it "
            "cannot be clipped. To disable this error and scale the gradients by the non-finite norm anyway, "
            "set `error_if_nonfinite=False`"
        )
    for gs in by_dtype.values():
        launcher("clip_grad_norm_", impl).scale_(gs, coef)
    # torch stacks the per-tensor norms, which promotes mixed dtypes
    return total.to(functools.reduce(torch.promote_types, by_dtype))


def _kernel_total(grads, impl: str, norm_type: float, max_norm: float):
    """(grads by dtype, total norm, fp32 [1] clip coefficient) on the kernel paths (no host sync,
    fixed-order sums: deterministic)."""
    by_dtype = defaultdict(list)
    for g in grads:
        by_dtype[g.dtype].append(g)
    kernels = launcher("clip_grad_norm_", impl)
    if impl == "cuda":
        total, coef = kernels.clip_coef(list(by_dtype.values()), norm_type, max_norm)
    else:
        total = torch.stack([kernels.sum_squares(gs) for gs in by_dtype.values()]).sum().sqrt()
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0).reshape(1)
    return by_dtype, total, coef


def grad_norm_and_coef(grads: list, max_norm: float, *, backend: str = "auto"):
    """``(total, coef)``: the global 2-norm of ``grads`` (local tensors) and the fp32 ``[1]`` device
    tensor ``min(1, max_norm / (total + 1e-6))`` — exactly what ``clip_grad_norm_`` computes with
    the same backend, without scaling anything (the one-pass optimizer step applies ``coef``
    inside its update). ``total`` has ``clip_grad_norm_``'s dtype (the gradients' promoted one)."""
    device = grads[0].device
    if not all(g.device == device and g.dtype in KERNEL_DTYPES and dense_alike(g) for g in grads):
        unsupported = {"triton": _LAYOUT, "cuda": _LAYOUT}
    else:
        unsupported = None
    impl = resolve("clip_grad_norm_", backend, device, unsupported)
    if impl == "torch":  # torch.nn.utils.clip_grad_norm_'s two halves
        total = torch.nn.utils.get_total_norm(grads, 2.0)
        return total, torch.clamp(max_norm / (total + 1e-6), max=1.0).to(device=device, dtype=torch.float32).reshape(1)
    by_dtype, total, coef = _kernel_total(grads, impl, 2.0, max_norm)
    return total.to(functools.reduce(torch.promote_types, by_dtype)), coef
