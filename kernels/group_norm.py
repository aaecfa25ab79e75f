"""GroupNorm, optionally fused with SiLU, in Triton: forward and backward.

Shapes: the launchers take ``x`` as a 3-D ``[N, C, S]`` view (``S`` = the product of
the spatial dims) in one of two dense layouts:

- contiguous (NCHW, NCDHW, NCL): strides ``(C*S, S, 1)``;
- channels-last (NHWC, NDHWC): strides ``(S*C, 1, C)``.

``C = G * K``: group ``g`` of sample ``n`` is the ``[K, S]`` block of channels
``[g*K, (g+1)*K)``. Every kernel walks that block in tiles ``[BLOCK_K, BLOCK_S]``
(all ``K`` channels of the group, ``BLOCK_S`` spatial positions), so per-channel
sums are row sums of a tile and the weight / bias are ``[BLOCK_K]`` vectors.
Outputs have the strides of ``x``.

Forward, per group with ``L = K * S`` elements, in fp32 with one rounding at the store::

    mean = sum(x) / L,  var = sum((x - mean)^2) / L          (biased, like F.group_norm)
    rstd = 1 / sqrt(var + eps)
    yn   = (x - mean) * rstd * w[c] + b[c]
    y    = yn                     (activation=None)
    y    = yn * sigmoid(yn)       (activation="silu")

Statistics: a program walks its positions in ``iters`` tiles; every lane runs
Welford's update over its elements (a lane active in iteration ``t`` has seen exactly
``t + 1`` elements, so the update multiplies by a scalar ``1 / (t + 1)``), and the
lanes are merged with Chan's exact formula
``n = sum n_l, mean = sum n_l mean_l / n, M2 = sum M2_l + sum n_l (mean_l - mean)^2``.
No sum of squares is ever formed, so a group of 16M elements with a large mean keeps
its variance.

Two paths, chosen by ``group_norm_config``:

- one program per group (``splits == 1``, groups up to ``SPLIT_ELEMENTS``): the forward
  computes the statistics and then normalizes in the same program, re-reading its
  group (last tile first) while it is still in L1 / L2; the backward likewise (one
  launch each way);
- split reduction (larger groups): grid ``(N*G, splits)``, each program over
  ``chunk_s`` positions writes a partial ``(count, mean, M2)``, a combine kernel
  merges the partials of a group (Chan again), and an elementwise kernel normalizes,
  visiting the chunks in the reverse order so that what the first pass read last
  (still in L2) is read first.

Backward, with ``xhat = (x - mean) * rstd``, ``dyn = dL/dyn`` (``dy``, or through
the SiLU: ``dy * s * (1 + yn * (1 - s))`` with ``s = sigmoid(yn)``, ``yn`` recomputed)
and ``g = dyn * w``::

    dx    = rstd * (g - mean_L(g) - xhat * mean_L(g * xhat))
    dw[c] = sum over n, s of dyn * xhat,      db[c] = sum over n, s of dyn

Programs write per-program, per-channel fp32 partials ``DWP, DBP [N * splits, C]``;
``mean_L(g) = sum_k w_k DBP / L`` and ``mean_L(g * xhat) = sum_k w_k DWP / L``
(in-program with one split, else a small combine kernel), then ``dx``.
``dw = DWP.sum(0)``, ``db = DBP.sum(0)``: fixed order, no atomics — deterministic.

Under ``TRITON_INTERPRET=1`` the kernels run on CPU tensors (tests); every load is
upcast to fp32 at once and stores go through ``round_to``.

Bytes per element (e: element size of x; per-row, per-column and per-sample terms omitted):

    fwd: read x (e); write y (e) = 2e
    apply: read x (e); write y (e) = 2e
    bwd: read dy (e), x (e); write dx (e) = 3e

One program per group re-reads its group for the second pass while it is in L1 / L2 (counted
once); the split reduction reads x (fwd) or dy and x (bwd) in two kernels: + 1e / + 2e when the
second read misses L2.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from fastgen.kernels._common import device_guard, interpreting, round_to, warps_for
from fastgen.ops._shapes import channels_last_layout
from fastgen.limits import MAX_CHANNELS_PER_GROUP

# Elements (K * chunk_s) one program covers: a group with more elements is split along S
# over several programs. Tests lower it to force the split path on small shapes.
SPLIT_ELEMENTS = 32768
# Elements per tile held in registers (~8 per thread per live tensor at TILE // 256 warps).
TILE = 2048
# Fewest positions per tile (when S has them): a contiguous (NCHW) row of 8 elements is one
# 16-byte access in bf16. Groups of more than TILE // MIN_BLOCK_S channels get a larger tile,
# up to MAX_TILE: 16 warps at 8 elements per thread. More warps leave 64 registers per thread,
# fewer than the SiLU backward needs at 8 elements (it spills on sm_90), so a group of 1024
# channels keeps 4 positions (8-byte accesses in bf16, 16-byte in fp32).
MIN_BLOCK_S = 8
MAX_TILE = 4096


# ----------------------------------------------------------------------------- device helpers


@triton.jit
def _aligned(C, S, K, chunk_s, CHANNELS_LAST: tl.constexpr, ALIGN: tl.constexpr):
    """(C, S, K, chunk_s) unchanged, the ones that place a contiguous run written as multiples of
    ``ALIGN`` (``align_hint``: a power of two that divides them) so the compiler can prove the
    runs' alignment: K and C channels-last, S and chunk_s contiguous. Exact, as the launcher
    guarantees the divisibility; Triton's own specialization only knows multiples of 16."""
    if CHANNELS_LAST:
        C = (C // ALIGN) * ALIGN
        K = (K // ALIGN) * ALIGN
    else:
        S = (S // ALIGN) * ALIGN
        chunk_s = (chunk_s // ALIGN) * ALIGN
    return C, S, K, chunk_s


@triton.jit
def _tile_offs(pid_ng, t, s_begin, s_end, C, S, G, K,
               CHANNELS_LAST: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr):
    """Element offsets (int64) and mask of tile ``t`` of a program: channels [g*K, g*K + K),
    positions s_begin + t*BLOCK_S + [0, BLOCK_S), clipped to s_end. ``s_begin`` is a tensor."""
    n = pid_ng // G
    g = pid_ng % G
    k = tl.arange(0, BLOCK_K)
    j = tl.arange(0, BLOCK_S)
    s0 = s_begin + t * BLOCK_S
    mask = (k < K)[:, None] & ((s0 + j) < s_end)[None, :]
    sample = n.to(tl.int64) * C * S
    if CHANNELS_LAST:
        base = sample + s0.to(tl.int64) * C + g * K
        offs = k[:, None] + (j * C)[None, :]
    else:
        base = sample + (g * K).to(tl.int64) * S + s0
        offs = (k.to(tl.int64) * S)[:, None] + j[None, :]
    return base + offs, mask


@triton.jit
def _chunk_stats(X, pid_ng, s_begin, s_end, iters, C, S, G, K,
                 CHANNELS_LAST: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr):
    """(count, mean, M2) of positions [s_begin, s_end) of group pid_ng: Welford per lane, Chan across lanes."""
    mean_l = tl.zeros([BLOCK_K, BLOCK_S], dtype=tl.float32)
    m2_l = tl.zeros([BLOCK_K, BLOCK_S], dtype=tl.float32)
    for t in range(0, iters):
        offs, mask = _tile_offs(pid_ng, t, s_begin, s_end, C, S, G, K, CHANNELS_LAST, BLOCK_K, BLOCK_S)
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        # An active lane has seen exactly t + 1 elements (masking only grows with t).
        inv = 1.0 / (t + 1)
        d = x - mean_l
        new_mean = mean_l + d * inv
        m2_l = tl.where(mask, m2_l + d * (x - new_mean), m2_l)
        mean_l = tl.where(mask, new_mean, mean_l)
    # Elements per lane: tiles t with s_begin + t*BLOCK_S + j < s_end.
    rem = s_end - s_begin - tl.arange(0, BLOCK_S)
    cnt_s = tl.where(rem > 0, (rem + BLOCK_S - 1) // BLOCK_S, 0)
    cnt = tl.where((tl.arange(0, BLOCK_K) < K)[:, None], cnt_s[None, :], 0).to(tl.float32)
    n_tot = tl.sum(tl.sum(cnt, axis=1), axis=0)
    mean = tl.sum(tl.sum(cnt * mean_l, axis=1), axis=0) / tl.maximum(n_tot, 1.0)
    dm = mean_l - mean
    m2 = tl.sum(tl.sum(m2_l + cnt * dm * dm, axis=1), axis=0)
    return n_tot, mean, m2


@triton.jit
def _params(W, B, pid_ng, G, K, HAS_W: tl.constexpr, HAS_B: tl.constexpr, BLOCK_K: tl.constexpr):
    """w, b of the group's channels as [BLOCK_K] fp32 (1 / 0 when absent; 0 past K); the
    chunk helpers take them as [BLOCK_K, 1] columns."""
    k = tl.arange(0, BLOCK_K)
    c = (pid_ng % G) * K + k
    if HAS_W:
        w = tl.load(W + c, mask=k < K, other=0.0).to(tl.float32)
    else:
        w = tl.where(k < K, 1.0, 0.0)
    if HAS_B:
        b = tl.load(B + c, mask=k < K, other=0.0).to(tl.float32)
    else:
        b = tl.zeros([BLOCK_K], dtype=tl.float32)
    return w, b


@triton.jit
def _chunk_apply(X, Y, w, b, pid_ng, mean, rstd, s_begin, s_end, iters, C, S, G, K, SILU: tl.constexpr,
                 CHANNELS_LAST: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr,
                 INTERPRET: tl.constexpr):
    """y = act((x - mean) * rstd * w + b) over positions [s_begin, s_end) of group pid_ng, last tile
    first: the tiles the statistics pass read last are the likeliest to still be in L2."""
    for t in range(0, iters):
        offs, mask = _tile_offs(pid_ng, iters - 1 - t, s_begin, s_end, C, S, G, K, CHANNELS_LAST, BLOCK_K, BLOCK_S)
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        y = (x - mean) * rstd * w + b
        if SILU:
            y = y / (1.0 + tl.exp(-y))
        tl.store(Y + offs, round_to(y, Y.dtype.element_ty, INTERPRET), mask=mask)


@triton.jit
def _dyn(dy, xhat, w, b, SILU: tl.constexpr):
    """Gradient at yn = xhat * w + b: dy, or through y = yn * sigmoid(yn)."""
    if SILU:
        yn = xhat * w + b
        sig = 1.0 / (1.0 + tl.exp(-yn))
        return dy * (sig * (1.0 + yn * (1.0 - sig)))
    return dy


@triton.jit
def _chunk_grad_sums(DY, X, w, b, pid_ng, mean, rstd, s_begin, s_end, iters, C, S, G, K, SILU: tl.constexpr,
                     CHANNELS_LAST: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr):
    """Per channel of group pid_ng over positions [s_begin, s_end): (sum dyn * xhat, sum dyn), [BLOCK_K] each."""
    acc_dw = tl.zeros([BLOCK_K, BLOCK_S], dtype=tl.float32)
    acc_db = tl.zeros([BLOCK_K, BLOCK_S], dtype=tl.float32)
    for t in range(0, iters):
        offs, mask = _tile_offs(pid_ng, t, s_begin, s_end, C, S, G, K, CHANNELS_LAST, BLOCK_K, BLOCK_S)
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        xhat = (x - mean) * rstd
        dyn = _dyn(dy, xhat, w, b, SILU)  # 0 where masked (dy = 0)
        acc_dw += dyn * xhat
        acc_db += dyn
    return tl.sum(acc_dw, axis=1), tl.sum(acc_db, axis=1)


@triton.jit
def _chunk_dx(DY, X, DX, w, b, pid_ng, mean, rstd, c1, c2, s_begin, s_end, iters, C, S, G, K, SILU: tl.constexpr,
              CHANNELS_LAST: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr, INTERPRET: tl.constexpr):
    """dx = rstd * (dyn * w - c1 - xhat * c2) over positions [s_begin, s_end) of group pid_ng, last
    tile first (as in _chunk_apply)."""
    rc1 = rstd * c1
    rc2 = rstd * c2
    for t in range(0, iters):
        offs, mask = _tile_offs(pid_ng, iters - 1 - t, s_begin, s_end, C, S, G, K, CHANNELS_LAST, BLOCK_K, BLOCK_S)
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        xhat = (x - mean) * rstd
        g = _dyn(dy, xhat, w, b, SILU) * w
        dx = rstd * g - rc1 - xhat * rc2
        tl.store(DX + offs, round_to(dx, DX.dtype.element_ty, INTERPRET), mask=mask)


# ----------------------------------------------------------------------------- kernels: one program per group


@triton.jit
def _group_norm_fwd_kernel(
    X,  # [N, C, S] input, contiguous or channels-last strides (see module docstring)
    W,  # [C] weight (unused unless HAS_W)
    B,  # [C] bias (unused unless HAS_B)
    Y,  # [N, C, S] out, strides of X, x.dtype
    MEAN,  # [N*G] fp32 out
    RSTD,  # [N*G] fp32 out
    C,
    S,
    G,
    K,  # channels per group, C // G
    iters,  # tiles per group, cdiv(S, BLOCK_S); host-computed (loop bounds must not depend on program ids)
    eps,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    SILU: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_S: tl.constexpr,
    ALIGN: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    C, S, K, _ = _aligned(C, S, K, S, CHANNELS_LAST, ALIGN)
    pid_ng = tl.program_id(0)
    zero = pid_ng * 0  # s_begin as a tensor
    n_tot, mean, m2 = _chunk_stats(X, pid_ng, zero, S, iters, C, S, G, K, CHANNELS_LAST, BLOCK_K, BLOCK_S)
    rstd = tl.rsqrt(m2 / tl.maximum(n_tot, 1.0) + eps)
    tl.store(MEAN + pid_ng, mean)
    tl.store(RSTD + pid_ng, rstd)
    w, b = _params(W, B, pid_ng, G, K, HAS_W, HAS_B, BLOCK_K)
    wc, bc = w[:, None], b[:, None]  # [BLOCK_K, 1] columns
    _chunk_apply(X, Y, wc, bc, pid_ng, mean, rstd, zero, S, iters, C, S, G, K, SILU, CHANNELS_LAST, BLOCK_K, BLOCK_S,
                 INTERPRET)


@triton.jit
def _group_norm_bwd_kernel(
    DY,  # [N, C, S] upstream gradient, strides of X
    X,  # [N, C, S] input
    W,  # [C] weight (unused unless HAS_W)
    B,  # [C] bias (unused unless HAS_B)
    MEAN,  # [N*G] fp32
    RSTD,  # [N*G] fp32
    DWP,  # [N, C] fp32 out: sums over S of dyn * xhat per channel
    DBP,  # [N, C] fp32 out: sums over S of dyn per channel
    DX,  # [N, C, S] out, strides of X, x.dtype
    C,
    S,
    G,
    K,
    iters,
    inv_l,  # 1 / (K * S)
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    SILU: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_S: tl.constexpr,
    ALIGN: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    C, S, K, _ = _aligned(C, S, K, S, CHANNELS_LAST, ALIGN)
    pid_ng = tl.program_id(0)
    zero = pid_ng * 0
    mean = tl.load(MEAN + pid_ng)
    rstd = tl.load(RSTD + pid_ng)
    w, b = _params(W, B, pid_ng, G, K, HAS_W, HAS_B, BLOCK_K)
    wc, bc = w[:, None], b[:, None]  # [BLOCK_K, 1] columns
    pdw, pdb = _chunk_grad_sums(DY, X, wc, bc, pid_ng, mean, rstd, zero, S, iters, C, S, G, K, SILU, CHANNELS_LAST,
                                BLOCK_K, BLOCK_S)
    k = tl.arange(0, BLOCK_K)
    out = (pid_ng // G).to(tl.int64) * C + (pid_ng % G) * K + k
    tl.store(DWP + out, pdw, mask=k < K)
    tl.store(DBP + out, pdb, mask=k < K)
    c1 = tl.sum(w * pdb, axis=0) * inv_l
    c2 = tl.sum(w * pdw, axis=0) * inv_l
    _chunk_dx(DY, X, DX, wc, bc, pid_ng, mean, rstd, c1, c2, zero, S, iters, C, S, G, K, SILU, CHANNELS_LAST,
              BLOCK_K, BLOCK_S, INTERPRET)


# ----------------------------------------------------------------------------- kernels: split reduction


@triton.jit
def _group_norm_stats_kernel(
    X,  # [N, C, S] input
    PART,  # [N*G, splits, 3] fp32 out: (count, mean, M2) per program
    C,
    S,
    G,
    K,
    chunk_s,  # positions per program (= iters * BLOCK_S)
    iters,
    CHANNELS_LAST: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_S: tl.constexpr,
    ALIGN: tl.constexpr,
):
    C, S, K, chunk_s = _aligned(C, S, K, chunk_s, CHANNELS_LAST, ALIGN)
    pid_ng = tl.program_id(0)
    sp = tl.program_id(1)
    s_begin = sp * chunk_s
    s_end = tl.minimum(S, s_begin + chunk_s)
    n_tot, mean, m2 = _chunk_stats(X, pid_ng, s_begin, s_end, iters, C, S, G, K, CHANNELS_LAST, BLOCK_K, BLOCK_S)
    p = PART + (pid_ng.to(tl.int64) * tl.num_programs(1) + sp) * 3
    tl.store(p, n_tot)
    tl.store(p + 1, mean)
    tl.store(p + 2, m2)


@triton.jit
def _group_norm_combine_kernel(
    PART,  # [N*G, splits, 3] fp32: (count, mean, M2) per split
    MEAN,  # [N*G] fp32 out
    RSTD,  # [N*G] fp32 out
    splits,
    iters,  # cdiv(splits, BLOCK_SP), host-computed
    eps,
    BLOCK_SP: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    i = tl.arange(0, BLOCK_SP)
    n_a = tl.zeros([BLOCK_SP], dtype=tl.float32)
    mean_a = tl.zeros([BLOCK_SP], dtype=tl.float32)
    m2_a = tl.zeros([BLOCK_SP], dtype=tl.float32)
    for t in range(0, iters):
        sp = t * BLOCK_SP + i
        m = sp < splits
        p = PART + (row * splits + sp) * 3
        n_b = tl.load(p, mask=m, other=0.0)
        mean_b = tl.load(p + 1, mask=m, other=0.0)
        m2_b = tl.load(p + 2, mask=m, other=0.0)
        # Chan's pairwise merge, lane by lane (n_b = 0 leaves a lane unchanged).
        n_ab = n_a + n_b
        frac = n_b / tl.maximum(n_ab, 1.0)
        delta = mean_b - mean_a
        mean_a = mean_a + delta * frac
        m2_a = m2_a + m2_b + delta * delta * n_a * frac
        n_a = n_ab
    n_tot = tl.sum(n_a, axis=0)
    mean = tl.sum(n_a * mean_a, axis=0) / tl.maximum(n_tot, 1.0)
    dm = mean_a - mean
    m2 = tl.sum(m2_a + n_a * dm * dm, axis=0)
    tl.store(MEAN + row, mean)
    tl.store(RSTD + row, tl.rsqrt(m2 / tl.maximum(n_tot, 1.0) + eps))


@triton.jit
def _reversed_chunk(S, chunk_s):
    """(group row, first and end position) of this program of a split grid (N*G, splits), walked in
    the reverse order of the pass before it, so what that pass read last (still in L2) comes first."""
    pid_ng = tl.num_programs(0) - 1 - tl.program_id(0)
    s_begin = (tl.num_programs(1) - 1 - tl.program_id(1)) * chunk_s
    return pid_ng, s_begin, tl.minimum(S, s_begin + chunk_s)


@triton.jit
def _group_norm_apply_kernel(
    X,  # [N, C, S] input
    W,  # [C] weight (unused unless HAS_W)
    B,  # [C] bias (unused unless HAS_B)
    MEAN,  # [N*G] fp32
    RSTD,  # [N*G] fp32
    Y,  # [N, C, S] out, strides of X, x.dtype
    C,
    S,
    G,
    K,
    chunk_s,
    iters,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    SILU: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_S: tl.constexpr,
    ALIGN: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    C, S, K, chunk_s = _aligned(C, S, K, chunk_s, CHANNELS_LAST, ALIGN)
    # Programs in the reverse order of the stats kernel's: the chunks it read last come first.
    pid_ng, s_begin, s_end = _reversed_chunk(S, chunk_s)
    w, b = _params(W, B, pid_ng, G, K, HAS_W, HAS_B, BLOCK_K)
    wc, bc = w[:, None], b[:, None]  # [BLOCK_K, 1] columns
    _chunk_apply(X, Y, wc, bc, pid_ng, tl.load(MEAN + pid_ng), tl.load(RSTD + pid_ng), s_begin, s_end, iters,
                 C, S, G, K, SILU, CHANNELS_LAST, BLOCK_K, BLOCK_S, INTERPRET)


@triton.jit
def _group_norm_bwd_reduce_kernel(
    DY,  # [N, C, S] upstream gradient, strides of X
    X,  # [N, C, S] input
    W,  # [C] weight (unused unless HAS_W)
    B,  # [C] bias (unused unless HAS_B)
    MEAN,  # [N*G] fp32
    RSTD,  # [N*G] fp32
    DWP,  # [N * splits, C] fp32 out: per-program sums of dyn * xhat per channel
    DBP,  # [N * splits, C] fp32 out: per-program sums of dyn per channel
    C,
    S,
    G,
    K,
    chunk_s,
    iters,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    SILU: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_S: tl.constexpr,
    ALIGN: tl.constexpr,
):
    C, S, K, chunk_s = _aligned(C, S, K, chunk_s, CHANNELS_LAST, ALIGN)
    pid_ng = tl.program_id(0)
    sp = tl.program_id(1)
    s_begin = sp * chunk_s
    s_end = tl.minimum(S, s_begin + chunk_s)
    w, b = _params(W, B, pid_ng, G, K, HAS_W, HAS_B, BLOCK_K)
    wc, bc = w[:, None], b[:, None]  # [BLOCK_K, 1] columns
    pdw, pdb = _chunk_grad_sums(DY, X, wc, bc, pid_ng, tl.load(MEAN + pid_ng), tl.load(RSTD + pid_ng), s_begin,
                                s_end, iters, C, S, G, K, SILU, CHANNELS_LAST, BLOCK_K, BLOCK_S)
    k = tl.arange(0, BLOCK_K)
    out = ((pid_ng // G).to(tl.int64) * tl.num_programs(1) + sp) * C + (pid_ng % G) * K + k
    tl.store(DWP + out, pdw, mask=k < K)
    tl.store(DBP + out, pdb, mask=k < K)


@triton.jit
def _group_norm_bwd_combine_kernel(
    DWP,  # [N * splits, C] fp32
    DBP,  # [N * splits, C] fp32
    W,  # [C] weight (unused unless HAS_W)
    C1,  # [N*G] fp32 out: mean over the group of g = dyn * w
    C2,  # [N*G] fp32 out: mean over the group of g * xhat
    C,
    G,
    K,
    splits,
    iters,  # cdiv(splits, BLOCK_SP), host-computed
    inv_l,  # 1 / (K * S)
    HAS_W: tl.constexpr,
    BLOCK_SP: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_ng = tl.program_id(0)
    n = pid_ng // G
    k = tl.arange(0, BLOCK_K)
    i = tl.arange(0, BLOCK_SP)
    c = (pid_ng % G) * K + k
    w, _ = _params(W, W, pid_ng, G, K, HAS_W, False, BLOCK_K)
    acc1 = tl.zeros([BLOCK_SP, BLOCK_K], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_SP, BLOCK_K], dtype=tl.float32)
    for t in range(0, iters):
        sp = t * BLOCK_SP + i
        m = (sp < splits)[:, None] & (k < K)[None, :]
        offs = (n.to(tl.int64) * splits + sp)[:, None] * C + c[None, :]
        acc1 += tl.load(DBP + offs, mask=m, other=0.0)
        acc2 += tl.load(DWP + offs, mask=m, other=0.0)
    tl.store(C1 + pid_ng, tl.sum(tl.sum(acc1, axis=0) * w, axis=0) * inv_l)
    tl.store(C2 + pid_ng, tl.sum(tl.sum(acc2, axis=0) * w, axis=0) * inv_l)


@triton.jit
def _group_norm_bwd_dx_kernel(
    DY,  # [N, C, S] upstream gradient, strides of X
    X,  # [N, C, S] input
    W,  # [C] weight (unused unless HAS_W)
    B,  # [C] bias (unused unless HAS_B)
    MEAN,  # [N*G] fp32
    RSTD,  # [N*G] fp32
    C1,  # [N*G] fp32 mean(g)
    C2,  # [N*G] fp32 mean(g * xhat)
    DX,  # [N, C, S] out, strides of X, x.dtype
    C,
    S,
    G,
    K,
    chunk_s,
    iters,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    SILU: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_S: tl.constexpr,
    ALIGN: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    C, S, K, chunk_s = _aligned(C, S, K, chunk_s, CHANNELS_LAST, ALIGN)
    # Programs in the reverse order of the reduce kernel's (see _group_norm_apply_kernel).
    pid_ng, s_begin, s_end = _reversed_chunk(S, chunk_s)
    w, b = _params(W, B, pid_ng, G, K, HAS_W, HAS_B, BLOCK_K)
    wc, bc = w[:, None], b[:, None]  # [BLOCK_K, 1] columns
    _chunk_dx(DY, X, DX, wc, bc, pid_ng, tl.load(MEAN + pid_ng), tl.load(RSTD + pid_ng), tl.load(C1 + pid_ng),
              tl.load(C2 + pid_ng), s_begin, s_end, iters, C, S, G, K, SILU, CHANNELS_LAST, BLOCK_K, BLOCK_S,
              INTERPRET)


# ----------------------------------------------------------------------------- launchers


def group_norm_config(N: int, C: int, S: int, G: int) -> dict:
    """Launch parameters shared by the forward and backward kernels for x [N, C, S] in G groups
    (the static tests compile exactly these): tile [BLOCK_K, BLOCK_S], ``iters`` tiles per
    program over ``chunk_s = iters * BLOCK_S`` positions (``S`` with one split), ``splits``
    programs per group (1: the one-program-per-group kernels)."""
    K = C // G
    block_k = triton.next_power_of_2(K)
    assert block_k <= MAX_CHANNELS_PER_GROUP, f"at most {MAX_CHANNELS_PER_GROUP} channels per group, got {K}"
    per_program = max(1, SPLIT_ELEMENTS // block_k)
    widest = max(TILE // block_k, min(MIN_BLOCK_S, MAX_TILE // block_k))
    block_s = min(triton.next_power_of_2(S), widest, 1 << (per_program.bit_length() - 1))
    tiles = triton.cdiv(S, block_s)
    iters = max(1, min(SPLIT_ELEMENTS // (block_k * block_s), tiles))
    if iters >= tiles:  # the whole group in one program
        return dict(BLOCK_K=block_k, BLOCK_S=block_s, iters=tiles, chunk_s=S, splits=1,
                    num_warps=warps_for(block_k * block_s))
    chunk_s = iters * block_s
    return dict(BLOCK_K=block_k, BLOCK_S=block_s, iters=iters, chunk_s=chunk_s, splits=triton.cdiv(S, chunk_s),
                num_warps=warps_for(block_k * block_s))


def align_hint(K: int, S: int, chunk_s: int, channels_last: bool) -> int:
    """``ALIGN`` of the per-element kernels: the largest power of two up to 16 that divides what
    places a contiguous run, K (and so C = G * K) channels-last, S and chunk_s contiguous."""
    n = K if channels_last else math.gcd(S, chunk_s)
    return min(16, n & -n)


def combine_config(splits: int, K: int | None = None) -> dict:
    """BLOCK_SP (and the loop count) of the combine kernels; with K, the backward's [BLOCK_SP, BLOCK_K] tile."""
    block_k = 1 if K is None else triton.next_power_of_2(K)
    block_sp = max(1, min(triton.next_power_of_2(splits), max(1, TILE // block_k), 1024))
    return dict(BLOCK_SP=block_sp, iters=triton.cdiv(splits, block_sp),
                num_warps=warps_for(block_sp * block_k))


@device_guard
def group_norm_fwd(x, weight, bias, num_groups, eps, silu, *, y, mean, rstd):
    """Launch the forward into y, mean and rstd (allocated by ``fastgen.ops.group_norm``).

    x [N, C, S] not empty, contiguous or channels-last; weight / bias [C] | None;
    y [N, C, S] in x.dtype with the strides of x; mean, rstd [N * num_groups] fp32.
    """
    N, C, S = x.shape
    G = num_groups
    cl = channels_last_layout(x)
    assert x.numel() > 0 and y.stride() == x.stride(), "empty calls are answered by fastgen.ops.group_norm"
    K = C // G
    cfg = group_norm_config(N, C, S, G)
    splits = cfg["splits"]
    tile = dict(BLOCK_K=cfg["BLOCK_K"], BLOCK_S=cfg["BLOCK_S"], ALIGN=align_hint(K, S, cfg["chunk_s"], cl),
                num_warps=cfg["num_warps"])
    w_arg = weight if weight is not None else x
    b_arg = bias if bias is not None else x
    flags = dict(HAS_W=weight is not None, HAS_B=bias is not None, SILU=silu, CHANNELS_LAST=cl,
                 INTERPRET=interpreting())
    if splits == 1:
        _group_norm_fwd_kernel[(N * G,)](x, w_arg, b_arg, y, mean, rstd, C, S, G, K, cfg["iters"], eps,
                                         **flags, **tile)
        return
    part = torch.empty((N * G, splits, 3), dtype=torch.float32, device=x.device)
    _group_norm_stats_kernel[(N * G, splits)](x, part, C, S, G, K, cfg["chunk_s"], cfg["iters"],
                                              CHANNELS_LAST=cl, **tile)
    ccfg = combine_config(splits)
    _group_norm_combine_kernel[(N * G,)](part, mean, rstd, splits, ccfg["iters"], eps,
                                         BLOCK_SP=ccfg["BLOCK_SP"], num_warps=ccfg["num_warps"])
    _group_norm_apply_kernel[(N * G, splits)](x, w_arg, b_arg, mean, rstd, y, C, S, G, K, cfg["chunk_s"],
                                              cfg["iters"], **flags, **tile)


@device_guard
def group_norm_apply(x, weight, bias, mean, rstd, num_groups, silu, *, y):
    """Launch y = act((x - mean) * rstd * w + b) for x [N, C, S] (N, C, S > 0) with given statistics
    mean, rstd [N * num_groups] fp32 (computed elsewhere, e.g. over a whole image by the tiled VAE
    decode), into ``y`` (allocated by the caller: x.dtype, the strides of x).

    One elementwise pass (the split path's apply kernel).
    """
    N, C, S = x.shape
    G = num_groups
    assert mean.shape == rstd.shape == (N * G,) and mean.dtype == rstd.dtype == torch.float32
    assert y.shape == x.shape and y.stride() == x.stride() and y.dtype == x.dtype
    cl = channels_last_layout(x)
    cfg = group_norm_config(N, C, S, G)
    _group_norm_apply_kernel[(N * G, cfg["splits"])](
        x, weight if weight is not None else x, bias if bias is not None else x, mean.contiguous(),
        rstd.contiguous(), y, C, S, G, C // G, cfg["chunk_s"], cfg["iters"], HAS_W=weight is not None,
        HAS_B=bias is not None, SILU=silu, CHANNELS_LAST=cl, INTERPRET=interpreting(), BLOCK_K=cfg["BLOCK_K"],
        BLOCK_S=cfg["BLOCK_S"], ALIGN=align_hint(C // G, S, cfg["chunk_s"], cl), num_warps=cfg["num_warps"])


@device_guard
def group_norm_bwd(dy, x, weight, bias, mean, rstd, num_groups, silu, *, dx, dw, db):
    """Launch the backward into dx, dw and db (allocated by ``fastgen.ops.group_norm``).

    dy, x [N, C, S] not empty, dy with the strides of x, weight / bias [C] | None, mean / rstd
    [N*G] fp32; dx [N, C, S] in x.dtype with the strides of x; dw / db [C] in the dtype of
    weight / bias (None when absent). Deterministic (no atomics).
    """
    N, C, S = x.shape
    G = num_groups
    cl = channels_last_layout(x)
    assert dy.shape == x.shape and dy.dtype == x.dtype and dy.stride() == x.stride() == dx.stride()
    assert x.numel() > 0, "empty calls are answered by fastgen.ops.group_norm"
    K = C // G
    cfg = group_norm_config(N, C, S, G)
    splits = cfg["splits"]
    tile = dict(BLOCK_K=cfg["BLOCK_K"], BLOCK_S=cfg["BLOCK_S"], ALIGN=align_hint(K, S, cfg["chunk_s"], cl),
                num_warps=cfg["num_warps"])
    w_arg = weight if weight is not None else x
    b_arg = bias if bias is not None else x
    flags = dict(HAS_W=weight is not None, HAS_B=bias is not None, SILU=silu, CHANNELS_LAST=cl)
    dwp = torch.empty((N * splits, C), dtype=torch.float32, device=x.device)
    dbp = torch.empty((N * splits, C), dtype=torch.float32, device=x.device)
    if splits == 1:
        _group_norm_bwd_kernel[(N * G,)](dy, x, w_arg, b_arg, mean, rstd, dwp, dbp, dx, C, S, G, K, cfg["iters"],
                                         1.0 / (K * S), INTERPRET=interpreting(), **flags, **tile)
    else:
        _group_norm_bwd_reduce_kernel[(N * G, splits)](
            dy, x, w_arg, b_arg, mean, rstd, dwp, dbp, C, S, G, K, cfg["chunk_s"], cfg["iters"], **flags, **tile,
        )
        c1 = torch.empty((N * G,), dtype=torch.float32, device=x.device)
        c2 = torch.empty((N * G,), dtype=torch.float32, device=x.device)
        ccfg = combine_config(splits, K)
        _group_norm_bwd_combine_kernel[(N * G,)](
            dwp, dbp, w_arg, c1, c2, C, G, K, splits, ccfg["iters"], 1.0 / (K * S),
            HAS_W=weight is not None, BLOCK_SP=ccfg["BLOCK_SP"], BLOCK_K=cfg["BLOCK_K"], num_warps=ccfg["num_warps"],
        )
        _group_norm_bwd_dx_kernel[(N * G, splits)](
            dy, x, w_arg, b_arg, mean, rstd, c1, c2, dx, C, S, G, K, cfg["chunk_s"], cfg["iters"],
            INTERPRET=interpreting(), **flags, **tile,
        )
    # Fixed-order sums of the per-program partials [P, C]: the deterministic second pass.
    if dw is not None:
        dw.copy_(dwp.sum(0))
    if db is not None:
        db.copy_(dbp.sum(0))
