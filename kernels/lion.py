"""Multi-tensor Lion in Triton (Chen et al., 2023, "Symbolic Discovery of Optimization Algorithms").

Per element, in fp32::

    g = -grad if maximize else grad
    c = beta1 * m + (1 - beta1) * g
    p = p * (1 - lr * weight_decay) - lr * sign(c)
    m = beta2 * m + (1 - beta2) * g

``lr`` may be a device tensor; one launch per dtype combination.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastgen.kernels._common import interpreting, round_to
from fastgen.kernels.multi_tensor import TL_DTYPES, chunk, chunk_table, pointer_table, tensor_ptr

BLOCK = 2048


@triton.jit
def _lion_kernel(
    P_PTRS,  # [T] int64 addresses of the parameters (P_DTYPE)
    G_PTRS,  # [T] int64 addresses of the gradients (G_DTYPE)
    M_PTRS,  # [T] int64 addresses of exp_avg (S_DTYPE)
    NUMELS,  # [T] int64
    CHUNK_IDS,  # [C] int32
    CHUNK_OFFS,  # [C] int64
    LR,  # fp32 scalar, or pointer to an fp32 device scalar when LR_IS_PTR
    beta1,
    beta2,
    weight_decay,
    P_DTYPE: tl.constexpr,
    G_DTYPE: tl.constexpr,
    S_DTYPE: tl.constexpr,
    LR_IS_PTR: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    BLOCK: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    t, offs, mask = chunk(CHUNK_IDS, CHUNK_OFFS, NUMELS, BLOCK)
    p_ptr = tensor_ptr(P_PTRS, t, P_DTYPE) + offs
    m_ptr = tensor_ptr(M_PTRS, t, S_DTYPE) + offs
    if LR_IS_PTR:
        lr = tl.load(LR)
    else:
        lr = LR
    g = tl.load(tensor_ptr(G_PTRS, t, G_DTYPE) + offs, mask=mask, other=0.0).to(tl.float32)
    if MAXIMIZE:
        g = -g
    p = tl.load(p_ptr, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(m_ptr, mask=mask, other=0.0).to(tl.float32)
    c = beta1 * m + (1.0 - beta1) * g
    sign = tl.where(c > 0, 1.0, tl.where(c < 0, -1.0, 0.0))
    p = p * (1.0 - lr * weight_decay) - lr * sign
    m = beta2 * m + (1.0 - beta2) * g
    tl.store(p_ptr, round_to(p, P_DTYPE, INTERPRET), mask=mask)
    tl.store(m_ptr, round_to(m, S_DTYPE, INTERPRET), mask=mask)


def lion_config() -> dict:
    return dict(BLOCK=BLOCK, num_warps=8)


def lion_step(params, grads, exp_avgs, *, lr, beta1, beta2, weight_decay, maximize):
    """Update lists of parameters in place, one launch (shared dtypes and device, all dense alike)."""
    cfg = lion_config()
    table = chunk_table(params, cfg["BLOCK"])
    lr_is_ptr = isinstance(lr, torch.Tensor)
    _lion_kernel[(table.num_chunks,)](
        pointer_table(params), pointer_table(grads), pointer_table(exp_avgs),
        table.numels, table.chunk_ids, table.chunk_offs,
        lr if lr_is_ptr else float(lr), float(beta1), float(beta2), float(weight_decay),
        P_DTYPE=TL_DTYPES[params[0].dtype], G_DTYPE=TL_DTYPES[grads[0].dtype],
        S_DTYPE=TL_DTYPES[exp_avgs[0].dtype], LR_IS_PTR=lr_is_ptr, MAXIMIZE=bool(maximize),
        INTERPRET=interpreting(), **cfg,
    )
