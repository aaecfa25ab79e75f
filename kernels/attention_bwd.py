"""Flash attention backward in Triton: the dK/dV and dQ kernels (FlashAttention-2, no atomics).

The math, layouts, head-dim blocks and interpreter rules are those of ``kernels/attention.py``
(the forward, whose helpers this file shares; the launch configs are in
``kernels/attention_configs.py``). With ``p_ij =
exp(c * q_i . k_j - lse_i)`` recomputed from the forward's log-sum-exp::

    delta_i = sum_d dO_id * O_id                       (_attn_bwd_preprocess_kernel)
    dv_j    = sum_i p_ij dO_i                          (_attn_bwd_dkdv_kernel: one program per
    dk_j    = c * sum_i p_ij (dO_i . v_j - delta_i) q_i    key block and kv head, looping over the
                                                        query blocks and the group's query heads)
    dq_i    = c * sum_j p_ij (dO_i . v_j - delta_i) k_j    (_attn_bwd_dq_kernel: one program per
                                                        query block and head, looping over keys)

Each output element is written by exactly one program, so the gradients are deterministic
(no atomics, no fp32 scratch for dq); the price is computing ``s`` and ``p`` twice (the
FLOPs of the backward go from 2.5x to about 3x the forward). Extra memory: ``delta``, fp32,
the shape of ``lse``.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from fastgen.kernels import autotune
from fastgen.kernels._common import device_guard, interpreting, round_to
from fastgen.kernels.attention import (
    LOG2E,
    bhs_strides,
    block_and_head,
    call_dims,
    desc_tile,
    dot,
    dots_in_f32,
    lse_strides,
    masked_load,
    seq_bounds,
    tma_descriptor,
    tma_ok,
)
from fastgen.kernels.attention_configs import (
    CANDIDATES,
    LaunchOverride,
    attention_preprocess_config,
    host_bounds,
    launch_config,
    tune_key,
)


@triton.jit
def _attn_bwd_preprocess_kernel(
    O,  # like Q, strides (sob, soh, sos, 1)
    DO,  # like Q, strides (sdob, sdoh, sdos, 1)
    DELTA,  # like LSE, fp32 out: rowsum(dO * O)
    CU_Q,
    sob, soh, sos, sdob, sdoh, sdos, slb, slh,
    H,
    Sq,
    D,
    VARLEN: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_m, bh = block_and_head(Sq, BLOCK_M)
    b = bh // H
    h = bh % H
    q_start, seqlen_q = seq_bounds(CU_Q, b, Sq, VARLEN)
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dd = tl.arange(0, BLOCK_D)
    row_ok = rows < seqlen_q
    mask = row_ok[:, None] & (dd < D)[None, :]
    o = tl.load(O + b64 * sob + h64 * soh + q_start * sos + rows[:, None] * sos + dd[None, :],
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + b64 * sdob + h64 * sdoh + q_start * sdos + rows[:, None] * sdos + dd[None, :],
                 mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + b64 * slb + h64 * slh + q_start + rows, tl.sum(o * do, 1), mask=row_ok)


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q,  # strides (sqb, sqh, sqs, 1)
    K,  # strides (skb, skh, sks, 1)
    V,  # strides (svb, svh, svs, 1)
    DO,  # like Q, strides (sdob, sdoh, sdos, 1)
    LSE,  # fp32, strides (slb, slh, 1); DELTA shares them
    DELTA,
    DK,  # like K, k.dtype out, strides (sdkb, sdkh, sdks, 1)
    DV,  # like V, v.dtype out, strides (sdvb, sdvh, sdvs, 1)
    CU_Q,
    CU_K,
    QD,  # TMA: descriptors over [B, H|HK, S, D] (kernels/attention.py: tma_descriptor) of Q, K, V, DO,
    KD,  # blocks [1, 1, BLOCK_M | BLOCK_N, BLOCK_D]; the *R ones the head-dim remainder
    VD,  # blocks [..., BLOCK_DR] (only when BLOCK_DR > 0). None without TMA.
    DOD,
    QDR,
    KDR,
    VDR,
    DODR,
    sqb, sqh, sqs, skb, skh, sks, svb, svh, svs, sdob, sdoh, sdos, slb, slh,
    sdkb, sdkh, sdks, sdvb, sdvh, sdvs,
    HK,  # kv heads
    GROUP,  # query heads per kv head: this program loops over them
    Sq,
    Sk,
    D,
    qk_scale,  # scale * log2(e)
    sm_scale,  # scale
    n_q_blocks,  # cdiv(Sq or max_seqlen_q, BLOCK_M): the interpreter's loop bound
    CAUSAL: tl.constexpr,
    VARLEN: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,  # power-of-two block over the head dim (masked past D)
    BLOCK_DR: tl.constexpr,  # 0, or a second head-dim block at columns [BLOCK_D, BLOCK_D + BLOCK_DR)
    DOT_F32: tl.constexpr,
    INTERPRET: tl.constexpr,
    HOST_BOUNDS: tl.constexpr,  # loop over every block (host loop bounds): needed by the interpreter
    TMA: tl.constexpr,  # q / k / v / do tiles through the descriptors (not with VARLEN)
):
    pid_n, bh = block_and_head(Sk, BLOCK_N)
    b = bh // HK
    hk = bh % HK
    q_start, seqlen_q = seq_bounds(CU_Q, b, Sq, VARLEN)
    k_start, seqlen_k = seq_bounds(CU_K, b, Sk, VARLEN)
    b64 = b.to(tl.int64)
    hk64 = hk.to(tl.int64)
    K += b64 * skb + hk64 * skh + k_start * sks
    V += b64 * svb + hk64 * svh + k_start * svs
    DK += b64 * sdkb + hk64 * sdkh + k_start * sdks
    DV += b64 * sdvb + hk64 * sdvh + k_start * sdvs

    kcols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    dd = tl.arange(0, BLOCK_D)
    rr = tl.arange(0, BLOCK_M)
    col_ok = kcols < seqlen_k
    d_ok = dd < D
    kv_mask = col_ok[:, None] & d_ok[None, :]
    if TMA:
        k = desc_tile(KD, b, hk, pid_n * BLOCK_N, 0, BLOCK_N, BLOCK_D, DOT_F32)
        v = desc_tile(VD, b, hk, pid_n * BLOCK_N, 0, BLOCK_N, BLOCK_D, DOT_F32)
    else:
        k = masked_load(K + kcols[:, None] * sks + dd[None, :], kv_mask, DOT_F32)
        v = masked_load(V + kcols[:, None] * svs + dd[None, :], kv_mask, DOT_F32)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    if BLOCK_DR > 0:  # the head-dim remainder
        dr = BLOCK_D + tl.arange(0, BLOCK_DR)
        dr_ok = dr < D
        kv_mask_r = col_ok[:, None] & dr_ok[None, :]
        if TMA:
            k_r = desc_tile(KDR, b, hk, pid_n * BLOCK_N, BLOCK_D, BLOCK_N, BLOCK_DR, DOT_F32)
            v_r = desc_tile(VDR, b, hk, pid_n * BLOCK_N, BLOCK_D, BLOCK_N, BLOCK_DR, DOT_F32)
        else:
            k_r = masked_load(K + kcols[:, None] * sks + dr[None, :], kv_mask_r, DOT_F32)
            v_r = masked_load(V + kcols[:, None] * svs + dr[None, :], kv_mask_r, DOT_F32)
        dk_r = tl.zeros([BLOCK_N, BLOCK_DR], dtype=tl.float32)
        dv_r = tl.zeros([BLOCK_N, BLOCK_DR], dtype=tl.float32)
    diag = seqlen_k - seqlen_q

    if HOST_BOUNDS:
        lo = 0
        hi = n_q_blocks
    else:
        lo = 0
        if CAUSAL:  # the first row that sees key pid_n * BLOCK_N is pid_n * BLOCK_N - diag
            lo = tl.maximum(pid_n * BLOCK_N - diag, 0) // BLOCK_M
        hi = tl.cdiv(seqlen_q, BLOCK_M)
    for g in range(0, GROUP):
        h32 = hk * GROUP + g
        h64 = hk64 * GROUP + g
        Qh = Q + b64 * sqb + h64 * sqh + q_start * sqs
        DOh = DO + b64 * sdob + h64 * sdoh + q_start * sdos
        Lh = LSE + b64 * slb + h64 * slh + q_start
        Dh = DELTA + b64 * slb + h64 * slh + q_start
        for mb in range(lo, hi):
            rows = mb * BLOCK_M + rr
            row_ok = rows < seqlen_q
            q_mask = row_ok[:, None] & d_ok[None, :]
            if TMA:
                q = desc_tile(QD, b, h32, mb * BLOCK_M, 0, BLOCK_M, BLOCK_D, DOT_F32)
                do = desc_tile(DOD, b, h32, mb * BLOCK_M, 0, BLOCK_M, BLOCK_D, DOT_F32)
            else:
                q = masked_load(Qh + rows[:, None] * sqs + dd[None, :], q_mask, DOT_F32)
                do = masked_load(DOh + rows[:, None] * sdos + dd[None, :], q_mask, DOT_F32)
            lse = tl.load(Lh + rows, mask=row_ok, other=float("inf"))
            lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)  # empty row: p = 0
            delta = tl.load(Dh + rows, mask=row_ok, other=0.0)
            st = dot(k, tl.trans(q), DOT_F32)  # [BLOCK_N, BLOCK_M]
            if BLOCK_DR > 0:
                if TMA:
                    q_r = desc_tile(QDR, b, h32, mb * BLOCK_M, BLOCK_D, BLOCK_M, BLOCK_DR, DOT_F32)
                    do_r = desc_tile(DODR, b, h32, mb * BLOCK_M, BLOCK_D, BLOCK_M, BLOCK_DR, DOT_F32)
                else:
                    q_mask_r = row_ok[:, None] & dr_ok[None, :]
                    q_r = masked_load(Qh + rows[:, None] * sqs + dr[None, :], q_mask_r, DOT_F32)
                    do_r = masked_load(DOh + rows[:, None] * sdos + dr[None, :], q_mask_r, DOT_F32)
                st += dot(k_r, tl.trans(q_r), DOT_F32)
            st = st * qk_scale
            ok = col_ok[:, None] & row_ok[None, :]
            if CAUSAL:
                ok = ok & (kcols[:, None] <= rows[None, :] + diag)
            pt = tl.where(ok, tl.exp2(st - lse2[None, :]), 0.0)
            dv += dot(pt.to(do.dtype), do, DOT_F32)
            dpt = dot(v, tl.trans(do), DOT_F32)
            if BLOCK_DR > 0:
                dv_r += dot(pt.to(do_r.dtype), do_r, DOT_F32)
                dpt += dot(v_r, tl.trans(do_r), DOT_F32)
            dst = pt * (dpt - delta[None, :])
            dk += dot(dst.to(q.dtype), q, DOT_F32)
            if BLOCK_DR > 0:
                dk_r += dot(dst.to(q_r.dtype), q_r, DOT_F32)

    dk = dk * sm_scale
    tl.store(DK + kcols[:, None] * sdks + dd[None, :], round_to(dk, DK.dtype.element_ty, INTERPRET), mask=kv_mask)
    tl.store(DV + kcols[:, None] * sdvs + dd[None, :], round_to(dv, DV.dtype.element_ty, INTERPRET), mask=kv_mask)
    if BLOCK_DR > 0:
        dk_r = dk_r * sm_scale
        tl.store(DK + kcols[:, None] * sdks + dr[None, :], round_to(dk_r, DK.dtype.element_ty, INTERPRET),
                 mask=kv_mask_r)
        tl.store(DV + kcols[:, None] * sdvs + dr[None, :], round_to(dv_r, DV.dtype.element_ty, INTERPRET),
                 mask=kv_mask_r)


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA,
    DQ,  # like Q, q.dtype out, strides (sdqb, sdqh, sdqs, 1)
    CU_Q,
    CU_K,
    QD,  # TMA: descriptors over [B, H|HK, S, D] (kernels/attention.py: tma_descriptor) of Q, K, V, DO,
    KD,  # blocks [1, 1, BLOCK_M | BLOCK_N, BLOCK_D]; the *R ones the head-dim remainder
    VD,  # blocks [..., BLOCK_DR] (only when BLOCK_DR > 0). None without TMA.
    DOD,
    QDR,
    KDR,
    VDR,
    DODR,
    sqb, sqh, sqs, skb, skh, sks, svb, svh, svs, sdob, sdoh, sdos, slb, slh, sdqb, sdqh, sdqs,
    H,
    GROUP,
    Sq,
    Sk,
    D,
    qk_scale,
    sm_scale,
    n_kv_blocks,  # the interpreter's loop bound
    CAUSAL: tl.constexpr,
    VARLEN: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,  # power-of-two block over the head dim (masked past D)
    BLOCK_DR: tl.constexpr,  # 0, or a second head-dim block at columns [BLOCK_D, BLOCK_D + BLOCK_DR)
    DOT_F32: tl.constexpr,
    INTERPRET: tl.constexpr,
    HOST_BOUNDS: tl.constexpr,  # loop over every block (host loop bounds): needed by the interpreter
    TMA: tl.constexpr,  # q / k / v / do tiles through the descriptors (not with VARLEN)
):
    pid_m, bh = block_and_head(Sq, BLOCK_M)
    b = bh // H
    h = bh % H
    hk = h // GROUP
    q_start, seqlen_q = seq_bounds(CU_Q, b, Sq, VARLEN)
    k_start, seqlen_k = seq_bounds(CU_K, b, Sk, VARLEN)
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    hk64 = hk.to(tl.int64)
    K += b64 * skb + hk64 * skh + k_start * sks
    V += b64 * svb + hk64 * svh + k_start * svs

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    dd = tl.arange(0, BLOCK_D)
    row_ok = rows < seqlen_q
    d_ok = dd < D
    q_mask = row_ok[:, None] & d_ok[None, :]
    if TMA:
        q = desc_tile(QD, b, h, pid_m * BLOCK_M, 0, BLOCK_M, BLOCK_D, DOT_F32)
        do = desc_tile(DOD, b, h, pid_m * BLOCK_M, 0, BLOCK_M, BLOCK_D, DOT_F32)
    else:
        q = masked_load(Q + b64 * sqb + h64 * sqh + q_start * sqs + rows[:, None] * sqs + dd[None, :], q_mask, DOT_F32)
        do = masked_load(DO + b64 * sdob + h64 * sdoh + q_start * sdos + rows[:, None] * sdos + dd[None, :], q_mask,
                   DOT_F32)
    lse = tl.load(LSE + b64 * slb + h64 * slh + q_start + rows, mask=row_ok, other=float("inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    delta = tl.load(DELTA + b64 * slb + h64 * slh + q_start + rows, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if BLOCK_DR > 0:  # the head-dim remainder
        dr = BLOCK_D + tl.arange(0, BLOCK_DR)
        dr_ok = dr < D
        q_mask_r = row_ok[:, None] & dr_ok[None, :]
        if TMA:
            q_r = desc_tile(QDR, b, h, pid_m * BLOCK_M, BLOCK_D, BLOCK_M, BLOCK_DR, DOT_F32)
            do_r = desc_tile(DODR, b, h, pid_m * BLOCK_M, BLOCK_D, BLOCK_M, BLOCK_DR, DOT_F32)
        else:
            q_r = masked_load(Q + b64 * sqb + h64 * sqh + q_start * sqs + rows[:, None] * sqs + dr[None, :], q_mask_r,
                        DOT_F32)
            do_r = masked_load(DO + b64 * sdob + h64 * sdoh + q_start * sdos + rows[:, None] * sdos + dr[None, :],
                         q_mask_r, DOT_F32)
        dq_r = tl.zeros([BLOCK_M, BLOCK_DR], dtype=tl.float32)
    diag = seqlen_k - seqlen_q

    if HOST_BOUNDS:
        hi = n_kv_blocks
    else:
        hi_k = seqlen_k
        if CAUSAL:
            hi_k = tl.minimum(seqlen_k, (pid_m + 1) * BLOCK_M + diag)
        hi = tl.cdiv(tl.maximum(hi_k, 0), BLOCK_N)
    for nb in range(0, hi):
        kcols = nb * BLOCK_N + cols
        col_ok = kcols < seqlen_k
        kt_mask = col_ok[None, :] & d_ok[:, None]
        if TMA:
            kt = tl.trans(desc_tile(KD, b, hk, nb * BLOCK_N, 0, BLOCK_N, BLOCK_D, DOT_F32))
            vt = tl.trans(desc_tile(VD, b, hk, nb * BLOCK_N, 0, BLOCK_N, BLOCK_D, DOT_F32))
        else:
            kt = masked_load(K + kcols[None, :] * sks + dd[:, None], kt_mask, DOT_F32)  # [BLOCK_D, BLOCK_N]
            vt = masked_load(V + kcols[None, :] * svs + dd[:, None], kt_mask, DOT_F32)
        s = dot(q, kt, DOT_F32)
        dp = dot(do, vt, DOT_F32)
        if BLOCK_DR > 0:
            if TMA:
                kt_r = tl.trans(desc_tile(KDR, b, hk, nb * BLOCK_N, BLOCK_D, BLOCK_N, BLOCK_DR, DOT_F32))
                vt_r = tl.trans(desc_tile(VDR, b, hk, nb * BLOCK_N, BLOCK_D, BLOCK_N, BLOCK_DR, DOT_F32))
            else:
                kt_mask_r = col_ok[None, :] & dr_ok[:, None]
                kt_r = masked_load(K + kcols[None, :] * sks + dr[:, None], kt_mask_r, DOT_F32)
                vt_r = masked_load(V + kcols[None, :] * svs + dr[:, None], kt_mask_r, DOT_F32)
            s += dot(q_r, kt_r, DOT_F32)
            dp += dot(do_r, vt_r, DOT_F32)
        s = s * qk_scale
        ok = col_ok[None, :] & row_ok[:, None]
        if CAUSAL:
            ok = ok & (kcols[None, :] <= rows[:, None] + diag)
        p = tl.where(ok, tl.exp2(s - lse2[:, None]), 0.0)
        ds = p * (dp - delta[:, None])
        dq += dot(ds.to(kt.dtype), tl.trans(kt), DOT_F32)
        if BLOCK_DR > 0:
            dq_r += dot(ds.to(kt_r.dtype), tl.trans(kt_r), DOT_F32)

    dq = dq * sm_scale
    tl.store(DQ + b64 * sdqb + h64 * sdqh + q_start * sdqs + rows[:, None] * sdqs + dd[None, :],
             round_to(dq, DQ.dtype.element_ty, INTERPRET), mask=q_mask)
    if BLOCK_DR > 0:
        dq_r = dq_r * sm_scale
        tl.store(DQ + b64 * sdqb + h64 * sdqh + q_start * sdqs + rows[:, None] * sdqs + dr[None, :],
                 round_to(dq_r, DQ.dtype.element_ty, INTERPRET), mask=q_mask_r)


# ----------------------------------------------------------------------------- launcher


@device_guard
def attention_bwd(do, q, k, v, o, lse, causal, scale, layout="bshd", cu_q=None, cu_k=None, max_q=0, max_k=0,
                  dlse=None, deterministic=False, launch: Optional[LaunchOverride] = None):
    """dq, dk, dv = attention_bwd(do, q, k, v, o, lse, ...): contiguous, in the shapes and dtypes of q, k, v.

    do has o's shape (any strides with a unit last dim). ``dlse`` (lse's shape, optional) is the
    gradient of the log-sum-exp output: since d lse_i / d s_ij = p_ij, it enters as
    ``ds_ij = p_ij (dp_ij - delta_i + dlse_i)``, i.e. ``delta - dlse`` replaces ``delta``.
    Deterministic: no atomics; the launch configs are autotuned on the GPU (kernels/autotune.py)
    unless ``deterministic``, which takes the fixed defaults so that every process runs the same
    configs (bit-identical gradients across processes, not only across calls). ``launch``: a test's
    override (``kernels/attention_configs.py``).
    """
    varlen = cu_q is not None
    B, H, HK, Sq, Sk, D = call_dims(q, k, layout, varlen, cu_q, max_q, max_k)
    new = torch.zeros if varlen else torch.empty  # varlen: rows past cu_seqlens[-1] get 0
    dq = new(q.shape, dtype=q.dtype, device=q.device)
    dk = new(k.shape, dtype=k.dtype, device=k.device)
    dv = new(v.shape, dtype=v.dtype, device=v.device)
    if B == 0 or H == 0 or Sq == 0 or Sk == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    interp = interpreting()
    cu_q_arg = cu_q if varlen else lse
    cu_k_arg = cu_k if varlen else lse
    s_q, s_k, s_v = (bhs_strides(t, layout, varlen) for t in (q, k, v))
    s_do, s_l = bhs_strides(do, layout, varlen), lse_strides(lse, varlen)

    delta = torch.empty_like(lse)
    pcfg = attention_preprocess_config(D, launch.blocks[0] if launch is not None and launch.blocks else None)
    _attn_bwd_preprocess_kernel[(triton.cdiv(Sq, pcfg["BLOCK_M"]) * B * H,)](
        o, do, delta, cu_q_arg, *bhs_strides(o, layout, varlen), *s_do, *s_l, H, Sq, D,
        VARLEN=varlen, BLOCK_M=pcfg["BLOCK_M"], BLOCK_D=pcfg["BLOCK_D"], num_warps=pcfg["num_warps"],
    )
    if dlse is not None:
        delta -= dlse

    def descriptors(cfg, tma):
        """[QD, KD, VD, DOD, QDR, KDR, VDR, DODR] for a TMA launch, else eight Nones."""
        if not tma:
            return [None] * 8
        bm, bn, bd, br = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_D"], cfg["BLOCK_DR"]
        out = [tma_descriptor(q, layout, bm, bd), tma_descriptor(k, layout, bn, bd), tma_descriptor(v, layout, bn, bd),
               tma_descriptor(do, layout, bm, bd)]
        if br:
            return out + [tma_descriptor(q, layout, bm, br), tma_descriptor(k, layout, bn, br),
                          tma_descriptor(v, layout, bn, br), tma_descriptor(do, layout, bm, br)]
        return out + [None] * 4

    def run_dkdv(cfg):
        nw, ns, tma = cfg.pop("num_warps"), cfg.pop("num_stages"), cfg.pop("TMA", False)
        _attn_bwd_dkdv_kernel[(triton.cdiv(Sk, cfg["BLOCK_N"]) * B * HK,)](
            q, k, v, do, lse, delta, dk, dv, cu_q_arg, cu_k_arg, *descriptors(cfg, tma),
            *s_q, *s_k, *s_v, *s_do, *s_l, *bhs_strides(dk, layout, varlen), *bhs_strides(dv, layout, varlen),
            HK, H // HK, Sq, Sk, D, scale * LOG2E, scale, triton.cdiv(Sq, cfg["BLOCK_M"]),
            CAUSAL=bool(causal), VARLEN=varlen, DOT_F32=dots_in_f32(q), INTERPRET=interp,
            HOST_BOUNDS=host_bounds(launch, interp), TMA=tma, num_warps=nw, num_stages=ns, **cfg,
        )

    def run_dq(cfg):
        nw, ns, tma = cfg.pop("num_warps"), cfg.pop("num_stages"), cfg.pop("TMA", False)
        _attn_bwd_dq_kernel[(triton.cdiv(Sq, cfg["BLOCK_M"]) * B * H,)](
            q, k, v, do, lse, delta, dq, cu_q_arg, cu_k_arg, *descriptors(cfg, tma),
            *s_q, *s_k, *s_v, *s_do, *s_l, *bhs_strides(dq, layout, varlen),
            H, H // HK, Sq, Sk, D, scale * LOG2E, scale, triton.cdiv(Sk, cfg["BLOCK_N"]),
            CAUSAL=bool(causal), VARLEN=varlen, DOT_F32=dots_in_f32(q), INTERPRET=interp,
            HOST_BOUNDS=host_bounds(launch, interp), TMA=tma, num_warps=nw, num_stages=ns, **cfg,
        )

    tma = tma_ok(q, k, v, layout, varlen) and tma_ok(do, do, do, layout, varlen)
    for kernel, run in (("bwd_dkdv", run_dkdv), ("bwd_dq", run_dq)):
        cfg = launch_config(kernel, D, tma, launch, interp)  # the interpreter and a test's override: one config
        if cfg is None:
            key = tune_key(kernel, q, D, causal, varlen, H // HK, Sq, Sk, tma)
            cfg = autotune.pick(key, lambda kernel=kernel: CANDIDATES[kernel](D, tma), run, fixed=deterministic)
        run(cfg)
    return dq, dk, dv


__all__ = ["attention_bwd"]
