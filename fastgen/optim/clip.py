"""``fastgen.optim.clip_grad_norm_``: ``torch.nn.utils.clip_grad_norm_`` with multi-tensor kernels.

    total = ||(||g_1||, ..., ||g_n||)||_p           (p = norm_type)
    g_i  <- g_i * min(1, max_norm / (total + 1e-6))

Same arguments, result and return value (the total norm, a tensor) as torch's.
For the 2-norm of dense gradients, ``backend="triton"`` computes the sum of squares
of every gradient of a dtype in one launch and scales them in one more, with the
coefficient kept on the device: no host sync unless ``error_if_nonfinite``. Other
norm types and layouts take torch's implementation.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from fastgen.backend import resolve
from fastgen.optim._common import dense_alike, local

_NO_CUDA = {"cuda": "clip_grad_norm_ has no CUDA C++ implementation yet; use backend='triton' or 'torch'"}


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
    kernel_ok = (
        float(norm_type) == 2.0
        and all(g.device == device and g.dtype in (torch.float32, torch.float16, torch.bfloat16) and dense_alike(g)
                for g in grads)
    )
    unsupported = dict(_NO_CUDA)
    if not kernel_ok:
        unsupported["triton"] = "only the 2-norm of dense fp32/fp16/bf16 gradients on one device is fused"
    impl = resolve("clip_grad_norm_", backend, device, unsupported)
    if impl == "torch":
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm, norm_type, error_if_nonfinite, foreach)

    from fastgen.kernels.clip_grad import scale_, sum_squares

    by_dtype = defaultdict(list)
    for g in grads:
        by_dtype[g.dtype].append(g)
    total = torch.stack([sum_squares(gs) for gs in by_dtype.values()]).sum().sqrt()
    if error_if_nonfinite and not torch.isfinite(total):
        raise RuntimeError(
            f"The total norm of order {float(norm_type)} for gradients from `parameters` is non-finite, so it "
            "cannot be clipped. To disable this error and scale the gradients by the non-finite norm anyway, "
            "set `error_if_nonfinite=False`"
        )
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0).reshape(1)
    for gs in by_dtype.values():
        scale_(gs, coef)
    return total.to(grads[0].dtype)
