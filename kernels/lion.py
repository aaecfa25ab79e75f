"""Multi-tensor Lion in Triton (Chen et al., 2023, "Symbolic Discovery of Optimization Algorithms").

Per element, in fp32::

    g = -grad if maximize else grad
    c = beta1 * m + (1 - beta1) * g
    p = p * (1 - lr * weight_decay) - lr * sign(c)
    m = beta2 * m + (1 - beta2) * g

``lr`` may be a device tensor; one launch per dtype combination.

Bytes per element (e: element size of the parameter; per-row, per-column and per-sample terms omitted):

    step: read p (e), g (e), m (4); write p (e), m (4) = 3e + 8
    step clip+ema: read p (e), g (e), m (4), shadow (4); write p (e), m (4), shadow (4) = 3e + 16

The momentum and the EMA shadow are fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastgen.kernels._common import device_guard, interpreting, round_to
from fastgen.kernels.adamw import _ema_fold
from fastgen.kernels.multi_tensor import TL_DTYPES, block_ptr, chunk, chunk_table, ld, pointer_table, split_aligned, st

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
    COEF,  # [1] fp32 device scalar: the gradient clip coefficient (read iff CLIP)
    SH_PTRS,  # [T] int64 addresses of the EMA shadows (SH_DTYPE; iff EMA)
    ema_weight,  # 1 - EMA decay
    P_DTYPE: tl.constexpr,
    G_DTYPE: tl.constexpr,
    S_DTYPE: tl.constexpr,
    LR_IS_PTR: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    CLIP: tl.constexpr,
    EMA: tl.constexpr,
    SH_DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
    INTERPRET: tl.constexpr,
    ALIGNED: tl.constexpr = False,  # every per-element base in the tables is 16-byte aligned
):
    t, offs, mask = chunk(CHUNK_IDS, CHUNK_OFFS, NUMELS, BLOCK)
    if LR_IS_PTR:
        lr = tl.load(LR)
    else:
        lr = LR
    if CLIP:
        coef = tl.load(COEF)
    else:
        coef = 1.0
    # Full chunks load and store unmasked (16-byte accesses when ALIGNED); a tensor's last chunk masked.
    if tl.load(CHUNK_OFFS + tl.program_id(0)) + BLOCK <= tl.load(NUMELS + t):
        _lion_body(P_PTRS, G_PTRS, M_PTRS, SH_PTRS, t, offs, mask, lr, coef, beta1, beta2, weight_decay, ema_weight,
                   P_DTYPE, G_DTYPE, S_DTYPE, MAXIMIZE, CLIP, EMA, SH_DTYPE, INTERPRET, ALIGNED, False)
    else:
        _lion_body(P_PTRS, G_PTRS, M_PTRS, SH_PTRS, t, offs, mask, lr, coef, beta1, beta2, weight_decay, ema_weight,
                   P_DTYPE, G_DTYPE, S_DTYPE, MAXIMIZE, CLIP, EMA, SH_DTYPE, INTERPRET, ALIGNED, True)


@triton.jit
def _lion_body(P_PTRS, G_PTRS, M_PTRS, SH_PTRS, t, offs, mask, lr, coef, beta1, beta2, weight_decay, ema_weight,
               P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, S_DTYPE: tl.constexpr, MAXIMIZE: tl.constexpr,
               CLIP: tl.constexpr, EMA: tl.constexpr, SH_DTYPE: tl.constexpr, INTERPRET: tl.constexpr,
               ALIGNED: tl.constexpr, MASKED: tl.constexpr):
    p_ptr = block_ptr(P_PTRS, t, P_DTYPE, offs, ALIGNED)
    m_ptr = block_ptr(M_PTRS, t, S_DTYPE, offs, ALIGNED)
    g = ld(block_ptr(G_PTRS, t, G_DTYPE, offs, ALIGNED), mask, MASKED).to(tl.float32)
    if CLIP:
        g = g * coef
    if MAXIMIZE:
        g = -g
    p = ld(p_ptr, mask, MASKED).to(tl.float32)
    m = ld(m_ptr, mask, MASKED).to(tl.float32)
    c = beta1 * m + (1.0 - beta1) * g
    sign = tl.where(c > 0, 1.0, tl.where(c < 0, -1.0, 0.0))
    p = p * (1.0 - lr * weight_decay) - lr * sign
    m = beta2 * m + (1.0 - beta2) * g
    p_out = round_to(p, P_DTYPE, INTERPRET)
    st(p_ptr, p_out, mask, MASKED)
    st(m_ptr, round_to(m, S_DTYPE, INTERPRET), mask, MASKED)
    if EMA:  # the one-pass step: fold the stored parameter into its average
        _ema_fold(SH_PTRS, t, offs, mask, p_out.to(tl.float32), ema_weight, SH_DTYPE, INTERPRET, ALIGNED, MASKED)


def lion_config() -> dict:
    return dict(BLOCK=BLOCK, num_warps=8)


@device_guard
def lion_step(params, grads, exp_avgs, *, lr, beta1, beta2, weight_decay, maximize, coef=None, shadows=None,
              ema_decay=0.0):
    """Update lists of parameters in place, one launch (shared dtypes and device, all dense alike).
    ``coef`` / ``shadows`` / ``ema_decay``: the one-pass step, as ``fastgen.kernels.adamw.adamw_step``."""
    cfg = lion_config()
    lr_is_ptr = isinstance(lr, torch.Tensor)
    for aligned, (ps, gs, ms, shs) in split_aligned(params, grads, exp_avgs, shadows):
        table = chunk_table(ps, cfg["BLOCK"])
        _lion_kernel[(table.num_chunks,)](
            pointer_table(ps), pointer_table(gs), pointer_table(ms),
            table.numels, table.chunk_ids, table.chunk_offs,
            lr if lr_is_ptr else float(lr), float(beta1), float(beta2), float(weight_decay),
            coef if coef is not None else table.numels, pointer_table(shs) if shs is not None else table.numels,
            1.0 - float(ema_decay),
            P_DTYPE=TL_DTYPES[ps[0].dtype], G_DTYPE=TL_DTYPES[gs[0].dtype],
            S_DTYPE=TL_DTYPES[ms[0].dtype], LR_IS_PTR=lr_is_ptr, MAXIMIZE=bool(maximize),
            CLIP=coef is not None, EMA=shs is not None,
            SH_DTYPE=TL_DTYPES[shs[0].dtype] if shs is not None else tl.float32,
            INTERPRET=interpreting(), ALIGNED=aligned, **cfg,
        )
