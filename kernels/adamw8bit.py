"""Multi-tensor 8-bit AdamW in Triton: dequantize -> AdamW update in fp32 -> requantize, one pass.

Per 256-element quantization block of each parameter (``fastgen.optim.quant8``: block-wise
dynamic maps, fp32 absmax per block), with ``t`` the parameter's step count::

    m = SMAP[cm] * am          v = UMAP[cv] * av               (dequantize, fp32)
    p = p * (1 - lr * wd)
    m = lerp(m, g, 1 - beta1)  v = beta2 * v + (1 - beta2) * g^2
    p = p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
    am = max |m| over the block,  cm = #{i : SBOUND[i] < m / am}   (0 if am = 0)
    av = max  v  over the block,  cv = #{i : UBOUND[i] < v / av}

The code is found by an 8-step binary search of the 256-entry boundary table (L1-resident).

A program owns ``QB`` whole quantization blocks (``BLOCK = QB * 256`` elements), so a block
never straddles two programs and its absmax is a local reduction.

Bytes per element (e: element size of the parameter; per-row, per-column and per-sample terms omitted):

    step: read p (e), g (e), cm (1), cv (1); write p (e), cm (1), cv (1) = 3e + 4
    step clip+ema: read p (e), g (e), cm (1), cv (1), shadow (4); write p (e), cm (1), cv (1), shadow (4) = 3e + 12

The moments are uint8 codes, plus the fp32 absmax of each moment, read and written once per
256-element block (1/16 byte per element).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from fastgen.kernels._common import device_guard, interpreting, round_to
from fastgen.kernels.adamw import _ema_fold, _lerp, _one_minus_pow, _stochastic_bf16
from fastgen.kernels.multi_tensor import (TL_DTYPES, block_ptr, chunk_table, ld, pointer_table, split_aligned, st,
                                          tensor_ptr)

QBLOCK = 256
QB = 8  # quantization blocks per program: 2048 elements


@triton.jit
def _quantize(x, absmax, BOUND):
    """uint8 codes of ``x / absmax`` ([QB, QBLOCK] fp32, absmax [QB, 1]): #{i : BOUND[i] < x}."""
    scaled = tl.where(absmax > 0.0, tl.math.div_rn(x, tl.where(absmax > 0.0, absmax, 1.0)), 0.0)
    code = tl.zeros(x.shape, dtype=tl.int32)
    for k in tl.static_range(8):
        b = tl.load(BOUND + code + ((128 >> k) - 1))
        code = code + tl.where(b < scaled, 128 >> k, 0)
    return code.to(tl.uint8)


@triton.jit
def _adamw8bit_kernel(
    P_PTRS,  # [T] int64 addresses of the parameters (P_DTYPE)
    G_PTRS,  # [T] int64 addresses of the gradients (G_DTYPE)
    QM_PTRS,  # [T] int64 addresses of the first-moment codes (uint8, numel)
    AM_PTRS,  # [T] int64 addresses of the first-moment absmax (fp32, ceil(numel / 256))
    QV_PTRS,  # [T] int64 addresses of the second-moment codes (uint8)
    AV_PTRS,  # [T] int64 addresses of the second-moment absmax (fp32)
    STEP_PTRS,  # [T] int64 addresses of the fp32 step counts (0-d, already incremented)
    NUMELS,  # [T] int64
    CHUNK_IDS,  # [C] int32 tensor of each program
    CHUNK_OFFS,  # [C] int64 first element of each program (a multiple of QB * QBLOCK)
    SMAP,  # [256] fp32 signed dynamic map
    SBOUND,  # [256] fp32 its boundaries (+inf last)
    UMAP,  # [256] fp32 unsigned dynamic map
    UBOUND,  # [256] fp32 its boundaries
    LR,  # fp32 scalar, or pointer to an fp32 device scalar when LR_IS_PTR
    beta1,
    beta2,
    ln_beta1,
    ln_beta2,
    eps,
    weight_decay,
    seed,
    COEF,  # [1] fp32 device scalar: the gradient clip coefficient (read iff CLIP)
    SH_PTRS,  # [T] int64 addresses of the EMA shadows (SH_DTYPE; iff EMA)
    ema_weight,  # 1 - EMA decay
    P_DTYPE: tl.constexpr,
    G_DTYPE: tl.constexpr,
    LR_IS_PTR: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    STOCHASTIC: tl.constexpr,
    CLIP: tl.constexpr,
    EMA: tl.constexpr,
    SH_DTYPE: tl.constexpr,
    QB: tl.constexpr,
    QBLOCK: tl.constexpr,
    INTERPRET: tl.constexpr,
    ALIGNED: tl.constexpr = False,  # every per-element base in the tables is 16-byte aligned
):
    pid = tl.program_id(0)
    t = tl.load(CHUNK_IDS + pid)
    start = tl.load(CHUNK_OFFS + pid)
    numel = tl.load(NUMELS + t)
    rows = tl.arange(0, QB)
    offs = start + rows[:, None] * QBLOCK + tl.arange(0, QBLOCK)[None, :]  # [QB, QBLOCK]
    mask = offs < numel
    blk = start // QBLOCK + rows  # [QB] quantization block index
    bmask = blk * QBLOCK < numel

    step = tl.load(tensor_ptr(STEP_PTRS, t, tl.float32))
    if LR_IS_PTR:
        lr = tl.load(LR)
    else:
        lr = LR
    bias1 = _one_minus_pow(step, ln_beta1)
    bias2_sqrt = tl.math.sqrt_rn(_one_minus_pow(step, ln_beta2))
    if CLIP:
        coef = tl.load(COEF)
    else:
        coef = 1.0
    # Full chunks load and store unmasked (16-byte accesses when ALIGNED); a tensor's last chunk masked.
    if start + QB * QBLOCK <= numel:
        _adamw8bit_body(P_PTRS, G_PTRS, QM_PTRS, AM_PTRS, QV_PTRS, AV_PTRS, SH_PTRS, SMAP, SBOUND, UMAP, UBOUND, t,
                        offs, mask, blk, bmask, lr, bias1, bias2_sqrt, coef, beta1, beta2, eps, weight_decay, seed,
                        ema_weight, P_DTYPE, G_DTYPE, MAXIMIZE, STOCHASTIC, CLIP, EMA, SH_DTYPE, INTERPRET, ALIGNED,
                        False)
    else:
        _adamw8bit_body(P_PTRS, G_PTRS, QM_PTRS, AM_PTRS, QV_PTRS, AV_PTRS, SH_PTRS, SMAP, SBOUND, UMAP, UBOUND, t,
                        offs, mask, blk, bmask, lr, bias1, bias2_sqrt, coef, beta1, beta2, eps, weight_decay, seed,
                        ema_weight, P_DTYPE, G_DTYPE, MAXIMIZE, STOCHASTIC, CLIP, EMA, SH_DTYPE, INTERPRET, ALIGNED,
                        True)


@triton.jit
def _adamw8bit_body(P_PTRS, G_PTRS, QM_PTRS, AM_PTRS, QV_PTRS, AV_PTRS, SH_PTRS, SMAP, SBOUND, UMAP, UBOUND, t,
                    offs, mask, blk, bmask, lr, bias1, bias2_sqrt, coef, beta1, beta2, eps, weight_decay, seed,
                    ema_weight, P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, MAXIMIZE: tl.constexpr,
                    STOCHASTIC: tl.constexpr, CLIP: tl.constexpr, EMA: tl.constexpr, SH_DTYPE: tl.constexpr,
                    INTERPRET: tl.constexpr, ALIGNED: tl.constexpr, MASKED: tl.constexpr):
    """The per-element update of one chunk's [QB, QBLOCK] tile (see the module docstring)."""
    p_ptr = block_ptr(P_PTRS, t, P_DTYPE, offs, ALIGNED)
    qm_ptr = block_ptr(QM_PTRS, t, tl.uint8, offs, ALIGNED)
    qv_ptr = block_ptr(QV_PTRS, t, tl.uint8, offs, ALIGNED)
    am_ptr = tensor_ptr(AM_PTRS, t, tl.float32) + blk
    av_ptr = tensor_ptr(AV_PTRS, t, tl.float32) + blk

    g = ld(block_ptr(G_PTRS, t, G_DTYPE, offs, ALIGNED), mask, MASKED).to(tl.float32)
    if CLIP:
        g = g * coef
    if MAXIMIZE:
        g = -g
    p = ld(p_ptr, mask, MASKED).to(tl.float32)
    cm = ld(qm_ptr, mask, MASKED).to(tl.int32)
    cv = ld(qv_ptr, mask, MASKED).to(tl.int32)
    am = tl.load(am_ptr, mask=bmask, other=0.0)
    av = tl.load(av_ptr, mask=bmask, other=0.0)
    m = tl.load(SMAP + cm) * am[:, None]
    v = tl.load(UMAP + cv) * av[:, None]
    if MASKED:  # lanes past the tensor hold 0, so they never raise a block's max
        m = tl.where(mask, m, 0.0)
        v = tl.where(mask, v, 0.0)

    p = p * (1.0 - lr * weight_decay)
    m = _lerp(m, g, 1.0 - beta1)
    v = v * beta2 + (1.0 - beta2) * (g * g)
    denom = tl.math.div_rn(tl.math.sqrt_rn(v), bias2_sqrt) + eps
    p = p - tl.math.div_rn(lr, bias1) * tl.math.div_rn(m, denom)
    if STOCHASTIC:
        p_out = _stochastic_bf16(p, seed, offs)
    else:
        p_out = round_to(p, P_DTYPE, INTERPRET)
    st(p_ptr, p_out, mask, MASKED)
    if EMA:
        _ema_fold(SH_PTRS, t, offs, mask, p_out.to(tl.float32), ema_weight, SH_DTYPE, INTERPRET, ALIGNED, MASKED)

    new_am = tl.max(tl.abs(m), axis=1)
    new_av = tl.max(v, axis=1)
    st(qm_ptr, _quantize(m, new_am[:, None], SBOUND), mask, MASKED)
    st(qv_ptr, _quantize(v, new_av[:, None], UBOUND), mask, MASKED)
    tl.store(am_ptr, new_am, mask=bmask)
    tl.store(av_ptr, new_av, mask=bmask)


def adamw8bit_config(aligned: bool = True) -> dict:
    """Launch parameters of _adamw8bit_kernel (the static tests compile these). Aligned launches:
    8 warps, 8 elements per thread, so bf16 parameters and gradients move in 16-byte accesses
    (codes in 8-byte ones). Unaligned ones (scalar accesses) take 16 warps: at 8 they spill on
    sm_90 with bf16 stochastic rounding."""
    return dict(QB=QB, QBLOCK=QBLOCK, num_warps=8 if aligned else 16)


@device_guard
def adamw8bit_step(params, grads, qms, ams, qvs, avs, steps, *, tables, lr, beta1, beta2, eps, weight_decay,
                   maximize, stochastic_rounding=False, seed=0, coef=None, shadows=None, ema_decay=0.0):
    """Update lists of parameters and their 8-bit states in place, one launch (shared dtypes and
    device, all contiguous). ``tables``: (SMAP, SBOUND, UMAP, UBOUND) fp32 [256] on the device.
    ``coef`` / ``shadows`` / ``ema_decay``: the one-pass step, as ``fastgen.kernels.adamw.adamw_step``."""
    if not params:
        return
    lr_is_ptr = isinstance(lr, torch.Tensor)
    p_dtype = params[0].dtype
    for aligned, (ps, gs, cms, cvs, shs, ams_, avs_, sts) in split_aligned(
            params, grads, qms, qvs, shadows, ams, avs, steps, unchecked=3):
        cfg = adamw8bit_config(aligned)
        table = chunk_table(ps, cfg["QB"] * cfg["QBLOCK"])
        _adamw8bit_kernel[(table.num_chunks,)](
            pointer_table(ps), pointer_table(gs), pointer_table(cms), pointer_table(ams_), pointer_table(cvs),
            pointer_table(avs_), pointer_table(sts), table.numels, table.chunk_ids, table.chunk_offs, *tables,
            lr if lr_is_ptr else float(lr), float(beta1), float(beta2),
            math.log(beta1) if beta1 > 0 else -math.inf, math.log(beta2) if beta2 > 0 else -math.inf,
            float(eps), float(weight_decay), int(seed),
            coef if coef is not None else table.numels, pointer_table(shs) if shs is not None else table.numels,
            1.0 - float(ema_decay),
            P_DTYPE=TL_DTYPES[p_dtype], G_DTYPE=TL_DTYPES[gs[0].dtype], LR_IS_PTR=lr_is_ptr,
            MAXIMIZE=bool(maximize), STOCHASTIC=bool(stochastic_rounding) and p_dtype == torch.bfloat16,
            CLIP=coef is not None, EMA=shs is not None,
            SH_DTYPE=TL_DTYPES[shs[0].dtype] if shs is not None else tl.float32, INTERPRET=interpreting(),
            ALIGNED=aligned, **cfg,
        )
