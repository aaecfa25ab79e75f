"""Multi-tensor Prodigy in Triton (``fastgen.optim.FusedProdigy``, ``slice_p = 1``): two passes.

Pass 1, per element (``c1 = d (1 - beta1)``, ``c2 = d^2 (1 - beta2)``, ``c3 = (d / d0) * dlr``
or ``(d / d0) * d`` with the safeguard warm-up, device scalars)::

    g  = g + weight_decay * p                      (decouple = False)
    dot_partial += g * (p0 - p)
    m  = beta1 * m + c1 * g        v = beta2 * v + c2 * g^2        s = beta3 * s + c3 * g
    abs_partial += |s|

one fp32 partial of each sum per program, added in fp64 in a fixed order by the caller.
Pass 2, after the caller updated ``d`` on the device (``w = -weight_decay * dlr``, ``a = -dlr``
or ``-dlr * d`` with ``beta1 = 0``, ``e = d * eps``)::

    p = p + w * p                  (decouple = True)
    p = p + a * (m or g) / (sqrt(v) + e)

Bytes per element (e: element size of the parameter; per-row, per-column and per-sample terms omitted):

    moments: read p (e), g (e), p0 (e), m (e), v (e), s (e); write m (e), v (e), s (e) = 9e
    update: read p (e), m (e), v (e); write p (e) = 4e

Every state is in the parameter's dtype (fp32: 52 bytes per step; the foreach path makes about
twice that).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastgen.kernels._common import device_guard, interpreting, round_to
from fastgen.kernels.multi_tensor import TL_DTYPES, block_ptr, chunk, chunk_table, ld, pointer_table, split_aligned, st

BLOCK = 2048


@triton.jit
def _prodigy_moments_kernel(
    P_PTRS, G_PTRS, P0_PTRS, M_PTRS, V_PTRS, S_PTRS,  # [T] int64 addresses (P_DTYPE; G_DTYPE for G)
    NUMELS, CHUNK_IDS, CHUNK_OFFS,  # the chunk tables
    COEFS,  # [3] fp32 device: c1, c2, c3
    DOT, ABS,  # [C] fp32 out: per-program partial sums of g (p0 - p) and of |s|
    beta1, beta2, beta3, weight_decay,
    P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, HAS_M: tl.constexpr, COUPLED_WD: tl.constexpr,
    BLOCK: tl.constexpr, INTERPRET: tl.constexpr, ALIGNED: tl.constexpr = False,
):
    t, offs, mask = chunk(CHUNK_IDS, CHUNK_OFFS, NUMELS, BLOCK)
    c1 = tl.load(COEFS)
    c2 = tl.load(COEFS + 1)
    c3 = tl.load(COEFS + 2)
    p = ld(block_ptr(P_PTRS, t, P_DTYPE, offs, ALIGNED), mask, True).to(tl.float32)
    g = ld(block_ptr(G_PTRS, t, G_DTYPE, offs, ALIGNED), mask, True).to(tl.float32)
    if COUPLED_WD:
        g = g + weight_decay * p
    p0 = ld(block_ptr(P0_PTRS, t, P_DTYPE, offs, ALIGNED), mask, True).to(tl.float32)
    tl.store(DOT + tl.program_id(0), tl.sum(g * (p0 - p), axis=0))
    if HAS_M:
        m_ptr = block_ptr(M_PTRS, t, P_DTYPE, offs, ALIGNED)
        m = ld(m_ptr, mask, True).to(tl.float32) * beta1 + g * c1
        st(m_ptr, round_to(m, P_DTYPE, INTERPRET), mask, True)
    v_ptr = block_ptr(V_PTRS, t, P_DTYPE, offs, ALIGNED)
    v = ld(v_ptr, mask, True).to(tl.float32) * beta2 + (g * c2) * g
    st(v_ptr, round_to(v, P_DTYPE, INTERPRET), mask, True)
    s_ptr = block_ptr(S_PTRS, t, P_DTYPE, offs, ALIGNED)
    s = round_to(ld(s_ptr, mask, True).to(tl.float32) * beta3 + g * c3, P_DTYPE, INTERPRET)
    st(s_ptr, s, mask, True)
    tl.store(ABS + tl.program_id(0), tl.sum(tl.where(mask, tl.abs(s.to(tl.float32)), 0.0), axis=0))


@triton.jit
def _prodigy_update_kernel(
    P_PTRS, N_PTRS, V_PTRS,  # [T] int64 addresses: parameters, numerators (m, or g with beta1 = 0), v
    NUMELS, CHUNK_IDS, CHUNK_OFFS,
    COEFS,  # [3] fp32 device: w (decoupled decay), a (step), e (d * eps)
    P_DTYPE: tl.constexpr, N_DTYPE: tl.constexpr, DECOUPLED_WD: tl.constexpr, BLOCK: tl.constexpr,
    INTERPRET: tl.constexpr, ALIGNED: tl.constexpr = False,
):
    t, offs, mask = chunk(CHUNK_IDS, CHUNK_OFFS, NUMELS, BLOCK)
    w = tl.load(COEFS)
    a = tl.load(COEFS + 1)
    e = tl.load(COEFS + 2)
    p_ptr = block_ptr(P_PTRS, t, P_DTYPE, offs, ALIGNED)
    p = ld(p_ptr, mask, True).to(tl.float32)
    n = ld(block_ptr(N_PTRS, t, N_DTYPE, offs, ALIGNED), mask, True).to(tl.float32)
    v = ld(block_ptr(V_PTRS, t, P_DTYPE, offs, ALIGNED), mask, True).to(tl.float32)
    if DECOUPLED_WD:
        p = round_to(p + w * p, P_DTYPE, INTERPRET).to(tl.float32)
    p = p + a * tl.math.div_rn(n, tl.math.sqrt_rn(v) + e)
    st(p_ptr, round_to(p, P_DTYPE, INTERPRET), mask, True)


@device_guard
def prodigy_moments(params, grads, p0s, ms, vs, ss, coefs, *, beta1, beta2, beta3, weight_decay, coupled_wd):
    """Pass 1 over lists (one dtype mix, one device, contiguous, ``slice_p = 1``). Returns the fp32
    per-program partial sums (dot, abs) of all launches, in launch order."""
    dots, abss = [], []
    for aligned, (p, g, p0, m, v, s) in split_aligned(params, grads, p0s, ms, vs, ss):
        table = chunk_table(p, BLOCK)
        dot = torch.empty(table.num_chunks, dtype=torch.float32, device=p[0].device)
        ab = torch.empty_like(dot)
        _prodigy_moments_kernel[(table.num_chunks,)](
            pointer_table(p), pointer_table(g), pointer_table(p0), pointer_table(m) if m else pointer_table(v),
            pointer_table(v), pointer_table(s), table.numels, table.chunk_ids, table.chunk_offs, coefs, dot, ab,
            float(beta1), float(beta2), float(beta3), float(weight_decay),
            P_DTYPE=TL_DTYPES[p[0].dtype], G_DTYPE=TL_DTYPES[g[0].dtype], HAS_M=bool(m), COUPLED_WD=bool(coupled_wd),
            BLOCK=BLOCK, INTERPRET=interpreting(), ALIGNED=aligned, num_warps=8,
        )
        dots.append(dot)
        abss.append(ab)
    return torch.cat(dots), torch.cat(abss)


@device_guard
def prodigy_update(params, nums, vs, coefs, *, decoupled_wd):
    """Pass 2 over lists (one dtype mix, one device, contiguous)."""
    for aligned, (p, n, v) in split_aligned(params, nums, vs):
        table = chunk_table(p, BLOCK)
        _prodigy_update_kernel[(table.num_chunks,)](
            pointer_table(p), pointer_table(n), pointer_table(v), table.numels, table.chunk_ids, table.chunk_offs,
            coefs, P_DTYPE=TL_DTYPES[p[0].dtype], N_DTYPE=TL_DTYPES[n[0].dtype], DECOUPLED_WD=bool(decoupled_wd),
            BLOCK=BLOCK, INTERPRET=interpreting(), ALIGNED=aligned, num_warps=8,
        )
