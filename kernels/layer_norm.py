"""LayerNorm / RMSNorm with adaptive modulation and a gated residual, in Triton.

One kernel family serves five public ops (``fastgen.ops.layer_norm``,
``layer_norm_modulate``, ``rms_norm_modulate``, ``gated_residual`` and
``gated_residual_layer_norm_modulate``) through constexpr flags. Per row of
``N`` elements (row ``r`` = token ``t`` of sample ``b``), in fp32, with one
rounding at each store::

    h     = x + gate * y                 (HAS_RES: the gated residual; rounded to x.dtype, stored as x_new)
    h     = x                            (otherwise)
    NORM == 1 (LayerNorm):  mean = mean(h);  rstd = 1 / sqrt(mean((h - mean)^2) + eps);  xhat = (h - mean) * rstd
    NORM == 2 (RMSNorm):                     rstd = 1 / sqrt(mean(h^2) + eps);            xhat = h * rstd
    n     = xhat * w + b                 (w, b optional)
    out   = n * (1 + scale) + shift      (HAS_MOD; otherwise out = n)
    NORM == 0: no norm, only x_new is produced (gated_residual alone).

``shift``, ``scale``, ``gate`` and ``y`` are addressed as ``[B, S, N]`` tensors
through a (sample, token) stride pair with unit column stride, so a per-sample
``(B, N)`` modulation is the token stride 0, and a chunk of a ``(B, 6N)``
projection output is read in place (sample stride 6N) without a copy.

Backward, with ``dout`` the gradient of ``out`` and ``dxnew`` the gradient of
``x_new`` (both optional)::

    dshift = dout                       dscale = dout * n           dn = dout * (1 + scale)
    dw     = sum_rows dn * xhat         db     = sum_rows dn        g  = dn * w
    LayerNorm: dh = rstd * (g - mean(g) - xhat * mean(g * xhat))
    RMSNorm:   dh = rstd * (g - xhat * mean(g * xhat))
    dh    += dxnew
    dx     = dh                          dy     = dh * gate          dgate = dh * y

Gradients that reduce over rows are deterministic: ``dw``, ``db`` and the
per-sample ``dshift`` / ``dscale`` / ``dgate`` (which sum over tokens) are
accumulated by each program into its own fp32 partial row and the partials are
summed in a fixed order by the launcher (no atomics). The backward grid is
``(G, P, C)``: G sample groups (B when any parameter is per-sample, else one
group of all rows), P programs per group each taking row tiles p, p + P, ...,
and C column blocks. Rows up to ``MAX_FULL_ROW_BWD`` wide are held whole
(C = 1, row dot products in-kernel); wider rows first run
``_layer_norm_bwd_rowstats_kernel`` and then use column blocks of ``CHUNK_N``.

Forward paths, by row width:

- rows up to ``MAX_FULL_ROW_FWD`` elements: ``_layer_norm_fwd_kernel`` holds
  ``BLOCK_M`` whole rows in registers and makes one pass;
- wider rows (any width): ``_layer_norm_fwd_chunked_kernel``, one row per program
  in column chunks of ``FWD_CHUNK_N``. Pass 1 reads the row once (forming, rounding
  and storing ``x_new`` for the gated forms) and accumulates the statistics. LayerNorm
  takes them of ``h - k0``, ``k0`` the mean of the first chunk (close to the row mean,
  and not thrown off by one outlying element): every lane runs Welford's update over
  its elements (a lane active in chunk ``c`` has seen exactly ``c + 1`` of them, so the
  update multiplies by the scalar ``1 / (c + 1)``) and the lanes are merged with Chan's
  exact formula ``mean = sum n_l mean_l / N, M2 = sum M2_l + sum n_l (mean_l - mean)^2``.
  No sum of squares of raw values is formed and the shift keeps the lane means small,
  so a row with a large mean (x = 1000 + randn) keeps its mean and variance to fp32
  precision. RMSNorm: per-lane sums of squares (positive terms, no cancellation).
  Pass 2 walks the chunks in reverse order (what pass 1 read last is likeliest still
  in L2), forms ``h`` again from the inputs (bit-identical) and applies the
  normalization, affine and modulation. The backward takes these rows in column
  blocks as it does every row wider than ``MAX_FULL_ROW_BWD``.

Bytes per element (e: element size of x; per-row, per-column and per-sample terms omitted):

    fwd: read x (e); write out (e) = 2e
    fwd modulate: read x (e); write out (e) = 2e
    fwd modulate per-token: read x (e), shift (e), scale (e); write out (e) = 4e
    fwd gated: read x (e), y (e); write out (e), x_new (e) = 4e
    fwd gated per-token: read x (e), y (e), gate (e), shift (e), scale (e); write out (e), x_new (e) = 7e
    fwd residual: read x (e), y (e); write x_new (e) = 3e
    fwd residual per-token: read x (e), y (e), gate (e); write x_new (e) = 4e
    bwd: read dout (e), h (e); write dh (e) = 3e
    bwd modulate: read dout (e), h (e); write dh (e) = 3e
    bwd modulate per-token: read dout (e), h (e), scale (e); write dh (e), dscale (e) = 5e
    bwd gated: read dout (e), dx_new (e), h (e), y (e); write dh (e), dy (e) = 6e
    bwd gated per-token: read dout (e), h (e), scale (e), dx_new (e), gate (e), y (e); write dh (e), dscale (e), dy (e), dgate (e) = 10e
    bwd residual: read dx_new (e), y (e); write dy (e) = 3e
    bwd residual per-token: read dx_new (e), gate (e), y (e); write dy (e), dgate (e) = 5e

"modulate" is layer_norm_modulate / rms_norm_modulate, "gated" gated_residual_layer_norm_modulate
and "residual" gated_residual alone (no norm; its dx is dx_new itself). The plain lines take
per-sample shift / scale / gate (a ``(B, N)`` row each, the DiT case); the per-token lines
read and write them per element. The chunked forward
(rows wider than ``MAX_FULL_ROW_FWD``) reads its inputs a second time in pass 2 (from L2 when the
row is still there); rows wider than ``MAX_FULL_ROW_BWD`` read dout and h once more in the
row-statistics kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastgen.kernels._common import device_guard, interpreting, max_programs, round_to, warps_for

from fastgen.limits import NORM_LAYER, NORM_NONE, NORM_RMS  # noqa: F401  (the norm constexpr, defined once)

# Widest row the single-pass forward keeps in registers; wider rows take the chunked forward.
MAX_FULL_ROW_FWD = 8192
# Column chunk of the chunked forward: one row per program, FWD_CHUNK_N // 256 warps (8 elements of
# each live tensor per thread; at 4096 / 16 warps the gated forms need 92-100 registers).
FWD_CHUNK_N = 2048
# Widest row whose backward keeps the whole row in one program; wider rows use column blocks.
MAX_FULL_ROW_BWD = 4096
# Column block of the backward for rows wider than MAX_FULL_ROW_BWD.
CHUNK_N = 1024
# Elements per program that the small-row paths aim for (rows are batched).
TARGET_TILE = 4096


@triton.jit
def _layer_norm_fwd_kernel(
    X,  # [B, S, N] input, strides (sx_b, sx_s, 1)
    Y,  # [B, S, N] residual branch output, strides (sy_b, sy_s, 1) (unused unless HAS_RES)
    GATE,  # [B, S|1, N] gate, strides (sg_b, sg_s, 1); sg_s = 0 per sample (unused unless HAS_RES)
    SHIFT,  # [B, S|1, N] shift, strides (ssh_b, ssh_s, 1) (unused unless HAS_MOD)
    SCALE,  # [B, S|1, N] scale, strides (ssc_b, ssc_s, 1) (unused unless HAS_MOD)
    W,  # [N] weight (unused unless HAS_W)
    BIAS,  # [N] bias (unused unless HAS_B)
    OUT,  # [M, N] out, contiguous, x.dtype (unused when NORM == 0)
    XNEW,  # [M, N] out: x + gate * y, contiguous, x.dtype (unused unless HAS_RES)
    MEAN,  # [M] fp32 out (written when NORM == 1)
    RSTD,  # [M] fp32 out (written when NORM != 0)
    M,  # B * S rows
    N,
    S,  # tokens per sample
    sx_b, sx_s, sy_b, sy_s, sg_b, sg_s, ssh_b, ssh_s, ssc_b, ssc_s,
    eps,
    NORM: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    HAS_MOD: tl.constexpr,
    HAS_RES: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    # BLOCK_M whole rows per program, held in registers.
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_mask = rows < M
    col_mask = cols < N
    mask = row_mask[:, None] & col_mask[None, :]
    rows64 = rows.to(tl.int64)
    # int32 division (rows < 2^31): an int64 one is a call that spills on sm_90.
    b = (rows // S).to(tl.int64)
    t = rows64 - b * S
    out_offs = rows64[:, None] * N + cols[None, :]
    h = tl.load(X + (b * sx_b + t * sx_s)[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        yv = tl.load(Y + (b * sy_b + t * sy_s)[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        gv = tl.load(GATE + (b * sg_b + t * sg_s)[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        h_lo = round_to(h + gv * yv, XNEW.dtype.element_ty, INTERPRET)
        tl.store(XNEW + out_offs, h_lo, mask=mask)
        h = h_lo.to(tl.float32)
    if NORM != 0:
        if NORM == 1:
            mean = tl.sum(h, axis=1) / N
            d = tl.where(mask, h - mean[:, None], 0.0)
            rstd = tl.rsqrt(tl.sum(d * d, axis=1) / N + eps)
            tl.store(MEAN + rows, mean, mask=row_mask)
        else:
            d = h
            rstd = tl.rsqrt(tl.sum(h * h, axis=1) / N + eps)
        tl.store(RSTD + rows, rstd, mask=row_mask)
        o = d * rstd[:, None]
        if HAS_W:
            o = o * tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        if HAS_B:
            o = o + tl.load(BIAS + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        if HAS_MOD:
            sc = tl.load(SCALE + (b * ssc_b + t * ssc_s)[:, None] + cols[None, :], mask=mask, other=0.0)
            sh = tl.load(SHIFT + (b * ssh_b + t * ssh_s)[:, None] + cols[None, :], mask=mask, other=0.0)
            o = o * (1.0 + sc.to(tl.float32)) + sh.to(tl.float32)
        tl.store(OUT + out_offs, round_to(o, OUT.dtype.element_ty, INTERPRET), mask=mask)


@triton.jit
def _fwd_chunk_h(x_row, y_row, g_row, XNEW, out_row, cols, mask, HAS_RES: tl.constexpr, STORE: tl.constexpr,
                 INTERPRET: tl.constexpr):
    """h of one column chunk of a row in fp32: x, or x + gate * y rounded to x_new's dtype
    (stored as x_new when STORE), exactly as the single-pass kernel forms it."""
    h = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        yv = tl.load(y_row + cols, mask=mask, other=0.0).to(tl.float32)
        gv = tl.load(g_row + cols, mask=mask, other=0.0).to(tl.float32)
        h_lo = round_to(h + gv * yv, XNEW.dtype.element_ty, INTERPRET)
        if STORE:
            tl.store(XNEW + out_row + cols, h_lo, mask=mask)
        h = h_lo.to(tl.float32)
    return h


@triton.jit
def _layer_norm_fwd_chunked_kernel(
    X,  # [B, S, N] input, strides (sx_b, sx_s, 1)
    Y,  # [B, S, N] residual branch output, strides (sy_b, sy_s, 1) (unused unless HAS_RES)
    GATE,  # [B, S|1, N] gate, strides (sg_b, sg_s, 1); sg_s = 0 per sample (unused unless HAS_RES)
    SHIFT,  # [B, S|1, N] shift, strides (ssh_b, ssh_s, 1) (unused unless HAS_MOD)
    SCALE,  # [B, S|1, N] scale, strides (ssc_b, ssc_s, 1) (unused unless HAS_MOD)
    W,  # [N] weight (unused unless HAS_W)
    BIAS,  # [N] bias (unused unless HAS_B)
    OUT,  # [M, N] out, contiguous, x.dtype (unused when NORM == 0)
    XNEW,  # [M, N] out: x + gate * y, contiguous, x.dtype (unused unless HAS_RES)
    MEAN,  # [M] fp32 out (written when NORM == 1)
    RSTD,  # [M] fp32 out (written when NORM != 0)
    N,
    S,  # tokens per sample
    sx_b, sx_s, sy_b, sy_s, sg_b, sg_s, ssh_b, ssh_s, ssc_b, ssc_s,
    eps,
    n_chunks,  # cdiv(N, BLOCK_N); host-computed (see DESIGN.md, interpreter pitfalls)
    NORM: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    HAS_MOD: tl.constexpr,
    HAS_RES: tl.constexpr,
    BLOCK_N: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    # One row per program (grid = (M,)), in column chunks of BLOCK_N: statistics, then apply.
    pid = tl.program_id(0)
    row = pid.to(tl.int64)
    b = (pid // S).to(tl.int64)
    t = row - b * S
    x_row = X + b * sx_b + t * sx_s
    y_row = Y + b * sy_b + t * sy_s
    g_row = GATE + b * sg_b + t * sg_s
    out_row = row * N
    lanes = tl.arange(0, BLOCK_N)
    # Pass 1. Chunk 0 is peeled: for LayerNorm its mean is the shift k0 of the statistics.
    mask = lanes < N
    h = _fwd_chunk_h(x_row, y_row, g_row, XNEW, out_row, lanes, mask, HAS_RES, True, INTERPRET)
    k0 = 0.0
    if NORM == 1:
        k0 = tl.sum(h, axis=0) / tl.minimum(N, BLOCK_N)
        mean_l = tl.where(mask, h - k0, 0.0)  # per-lane Welford mean of h - k0 (one element so far)
        m2_l = tl.zeros([BLOCK_N], dtype=tl.float32)  # per-lane sum of squared deviations
    else:
        mean_l = h * h  # RMSNorm: per-lane sum of h^2 (masked lanes load 0)
    for c in range(1, n_chunks):
        cols = c * BLOCK_N + lanes
        mask = cols < N
        h = _fwd_chunk_h(x_row, y_row, g_row, XNEW, out_row, cols, mask, HAS_RES, True, INTERPRET)
        if NORM == 1:
            # An active lane has seen exactly c + 1 elements (only the last chunk is partial).
            hs = h - k0
            d = hs - mean_l
            new_mean = mean_l + d * (1.0 / (c + 1))
            m2_l = tl.where(mask, m2_l + d * (hs - new_mean), m2_l)
            mean_l = tl.where(mask, new_mean, mean_l)
        elif NORM == 2:
            mean_l += h * h
    if NORM != 0:
        if NORM == 1:
            # Chan's merge of the lanes; lane j holds ceil((N - j) / BLOCK_N) elements.
            cnt = ((N - lanes + BLOCK_N - 1) // BLOCK_N).to(tl.float32)
            mean_s = tl.sum(cnt * mean_l, axis=0) / N  # mean of h - k0
            dm = mean_l - mean_s
            var = tl.sum(m2_l + cnt * dm * dm, axis=0) / N
            rstd = tl.rsqrt(var + eps)
            tl.store(MEAN + row, k0 + mean_s)
        else:
            mean_s = 0.0
            rstd = tl.rsqrt(tl.sum(mean_l, axis=0) / N + eps)
        tl.store(RSTD + row, rstd)
        # Pass 2, last chunk first (what pass 1 read last is the likeliest still in cache). h is
        # formed again from the inputs (bit-identical), not read back from x_new: no read of
        # another thread's store.
        sh_row = SHIFT + b * ssh_b + t * ssh_s
        sc_row = SCALE + b * ssc_b + t * ssc_s
        for i in range(0, n_chunks):
            cols = (n_chunks - 1 - i) * BLOCK_N + lanes
            mask = cols < N
            h = _fwd_chunk_h(x_row, y_row, g_row, XNEW, out_row, cols, mask, HAS_RES, False, INTERPRET)
            o = ((h - k0) - mean_s) * rstd  # k0 = mean_s = 0 for RMSNorm
            if HAS_W:
                o = o * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_B:
                o = o + tl.load(BIAS + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_MOD:
                sc = tl.load(sc_row + cols, mask=mask, other=0.0).to(tl.float32)
                sh = tl.load(sh_row + cols, mask=mask, other=0.0).to(tl.float32)
                o = o * (1.0 + sc) + sh
            tl.store(OUT + out_row + cols, round_to(o, OUT.dtype.element_ty, INTERPRET), mask=mask)


@triton.jit
def _layer_norm_bwd_rowstats_kernel(
    DOUT,  # [B, S, N] upstream gradient of out, strides (sdo_b, sdo_s, 1)
    H,  # [B, S, N] normalized input (x_new or x), strides (sh_b, sh_s, 1)
    SCALE,  # [B, S|1, N] (unused unless HAS_MOD)
    W,  # [N] (unused unless HAS_W)
    MEAN,  # [M] fp32 (read when NORM == 1)
    RSTD,  # [M] fp32
    C,  # [M, 2] fp32 out: (mean(g), mean(g * xhat)) per row
    N,
    S,
    sdo_b, sdo_s, sh_b, sh_s, ssc_b, ssc_s,
    NORM: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_MOD: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # One row per program, in chunks of BLOCK_N.
    pid = tl.program_id(0)
    row = pid.to(tl.int64)
    b = (pid // S).to(tl.int64)
    t = row - b * S
    rstd = tl.load(RSTD + row)
    mean = 0.0
    if NORM == 1:
        mean = tl.load(MEAN + row)
    acc_g = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc_gx = tl.zeros([BLOCK_N], dtype=tl.float32)
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        mask = cols < N
        g = tl.load(DOUT + b * sdo_b + t * sdo_s + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_MOD:
            g = g * (1.0 + tl.load(SCALE + b * ssc_b + t * ssc_s + cols, mask=mask, other=0.0).to(tl.float32))
        if HAS_W:
            g = g * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        xhat = (tl.load(H + b * sh_b + t * sh_s + cols, mask=mask, other=0.0).to(tl.float32) - mean) * rstd
        acc_g += g
        acc_gx += g * xhat
    tl.store(C + 2 * row, tl.sum(acc_g, axis=0) / N)
    tl.store(C + 2 * row + 1, tl.sum(acc_gx, axis=0) / N)


@triton.jit
def _layer_norm_bwd_kernel(
    DOUT,  # [B, S, N] upstream gradient of out, strides (sdo_b, sdo_s, 1) (unused when NORM == 0)
    DXNEW,  # [B, S, N] upstream gradient of x_new, strides (sdx_b, sdx_s, 1) (unused unless HAS_DXNEW)
    H,  # [B, S, N] normalized input (x_new or x), strides (sh_b, sh_s, 1) (unused when NORM == 0)
    Y,  # [B, S, N] (unused unless HAS_RES)
    GATE,  # [B, S|1, N] (unused unless HAS_RES)
    SCALE,  # [B, S|1, N] (unused unless HAS_MOD)
    W,  # [N] (unused unless HAS_W)
    BIAS,  # [N] (unused unless HAS_B)
    MEAN,  # [M] fp32 (read when NORM == 1)
    RSTD,  # [M] fp32 (read when NORM != 0)
    C,  # [M, 2] fp32 row stats from the rowstats kernel (read unless FULL_ROW)
    DH,  # [M, N] out: gradient of h, contiguous, x.dtype (written when NORM != 0)
    DY,  # [M, N] out: dh * gate, contiguous, y.dtype (HAS_RES)
    DSCALE,  # [M, N] out: per-token dout * n, contiguous (HAS_MOD and not SCALE_PS)
    DGATE,  # [M, N] out: per-token dh * y, contiguous (HAS_RES and not GATE_PS)
    DW_P,  # [G * P, N] fp32 out partials of dw (HAS_W)
    DB_P,  # [G * P, N] fp32 out partials of db (HAS_B)
    DSHIFT_P,  # [G * P, N] fp32 out partials of the per-sample dshift (HAS_MOD and SHIFT_PS)
    DSCALE_P,  # [G * P, N] fp32 out partials of the per-sample dscale (HAS_MOD and SCALE_PS)
    DGATE_P,  # [G * P, N] fp32 out partials of the per-sample dgate (HAS_RES and GATE_PS)
    M,
    N,
    S,  # tokens per sample (row r is token r % S of sample r // S)
    GROUP,  # rows per group: S when G == B, M when G == 1
    P,  # grid[1]
    tiles_per_program,  # cdiv(cdiv(GROUP, BLOCK_M), P); host-computed (see DESIGN.md, interpreter pitfalls)
    sdo_b, sdo_s, sdx_b, sdx_s, sh_b, sh_s, sy_b, sy_s, sg_b, sg_s, ssc_b, ssc_s,
    NORM: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    HAS_MOD: tl.constexpr,
    HAS_RES: tl.constexpr,
    HAS_DXNEW: tl.constexpr,
    SHIFT_PS: tl.constexpr,
    SCALE_PS: tl.constexpr,
    GATE_PS: tl.constexpr,
    FULL_ROW: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    pid_g = tl.program_id(0)
    pid_p = tl.program_id(1)
    cols = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    if HAS_W:
        w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
        dw_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if HAS_B:
        bias = tl.load(BIAS + cols, mask=col_mask, other=0.0).to(tl.float32)
        db_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if SHIFT_PS:
        dshift_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if SCALE_PS:
        dscale_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if GATE_PS:
        dgate_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for i in range(0, tiles_per_program):
        # Tiles past the group's last one (at most one per program) are fully masked.
        local = (pid_p + i * P) * BLOCK_M + tl.arange(0, BLOCK_M)
        rows = pid_g * GROUP + local
        row_mask = (local < GROUP) & (rows < M)
        mask = row_mask[:, None] & col_mask[None, :]
        rows64 = rows.to(tl.int64)
        b = (rows // S).to(tl.int64)
        t = rows64 - b * S
        out_offs = rows64[:, None] * N + cols[None, :]
        dh = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        if NORM != 0:
            dn = tl.load(DOUT + (b * sdo_b + t * sdo_s)[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)
            xhat = tl.load(H + (b * sh_b + t * sh_s)[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            if NORM == 1:
                xhat = xhat - tl.load(MEAN + rows, mask=row_mask, other=0.0)[:, None]
            xhat = tl.where(mask, xhat * rstd[:, None], 0.0)
            if HAS_MOD:
                if SHIFT_PS:
                    dshift_acc += dn
                n = xhat
                if HAS_W:
                    n = n * w[None, :]
                if HAS_B:
                    n = n + bias[None, :]
                if SCALE_PS:
                    dscale_acc += dn * n
                else:
                    tl.store(DSCALE + out_offs, round_to(dn * n, DSCALE.dtype.element_ty, INTERPRET), mask=mask)
                sc = tl.load(SCALE + (b * ssc_b + t * ssc_s)[:, None] + cols[None, :], mask=mask, other=0.0)
                dn = dn * (1.0 + sc.to(tl.float32))
            if HAS_B:
                db_acc += dn
            if HAS_W:
                dw_acc += dn * xhat
                dn = dn * w[None, :]
            # dn is now g = dL/dxhat
            if FULL_ROW:
                c2 = tl.sum(dn * xhat, axis=1) / N
            else:
                c2 = tl.load(C + 2 * rows64 + 1, mask=row_mask, other=0.0)
            if NORM == 1:
                if FULL_ROW:
                    c1 = tl.sum(dn, axis=1) / N
                else:
                    c1 = tl.load(C + 2 * rows64, mask=row_mask, other=0.0)
                dh = rstd[:, None] * (dn - c1[:, None] - xhat * c2[:, None])
            else:
                dh = rstd[:, None] * (dn - xhat * c2[:, None])
        if HAS_DXNEW:
            dh += tl.load(DXNEW + (b * sdx_b + t * sdx_s)[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if NORM != 0:
            tl.store(DH + out_offs, round_to(dh, DH.dtype.element_ty, INTERPRET), mask=mask)
        if HAS_RES:
            gv = tl.load(GATE + (b * sg_b + t * sg_s)[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            tl.store(DY + out_offs, round_to(dh * gv, DY.dtype.element_ty, INTERPRET), mask=mask)
            yv = tl.load(Y + (b * sy_b + t * sy_s)[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            if GATE_PS:
                dgate_acc += dh * yv
            else:
                tl.store(DGATE + out_offs, round_to(dh * yv, DGATE.dtype.element_ty, INTERPRET), mask=mask)
    part = (pid_g * P + pid_p).to(tl.int64) * N + cols
    if HAS_W:
        tl.store(DW_P + part, tl.sum(dw_acc, axis=0), mask=col_mask)
    if HAS_B:
        tl.store(DB_P + part, tl.sum(db_acc, axis=0), mask=col_mask)
    if SHIFT_PS:
        tl.store(DSHIFT_P + part, tl.sum(dshift_acc, axis=0), mask=col_mask)
    if SCALE_PS:
        tl.store(DSCALE_P + part, tl.sum(dscale_acc, axis=0), mask=col_mask)
    if GATE_PS:
        tl.store(DGATE_P + part, tl.sum(dgate_acc, axis=0), mask=col_mask)


# ----------------------------------------------------------------------------- launch configs


def _tile(block_n: int, rows: int, target: int = TARGET_TILE) -> int:
    """BLOCK_M: rows batched per program so a tile holds about ``target`` elements."""
    return max(1, min(target // block_n, triton.next_power_of_2(max(rows, 1)), 64))


def layer_norm_fwd_config(M: int, N: int) -> dict:
    """Launch parameters of _layer_norm_fwd_kernel for M rows of N <= MAX_FULL_ROW_FWD
    (the static tests compile these)."""
    assert N <= MAX_FULL_ROW_FWD
    block_n = triton.next_power_of_2(N)
    block_m = _tile(block_n, M)
    return dict(grid=(triton.cdiv(M, block_m),), BLOCK_M=block_m, BLOCK_N=block_n,
                num_warps=warps_for(block_m * block_n))


def layer_norm_fwd_chunked_config(M: int, N: int) -> dict:
    """Launch parameters of _layer_norm_fwd_chunked_kernel (rows wider than MAX_FULL_ROW_FWD):
    one row per program, chunks of FWD_CHUNK_N columns, ``n_chunks`` the host-computed trip count."""
    return dict(grid=(M,), n_chunks=triton.cdiv(N, FWD_CHUNK_N), BLOCK_N=FWD_CHUNK_N,
                num_warps=warps_for(FWD_CHUNK_N))


def bwd_load(has_w: bool, has_b: bool, shift_ps: bool, scale_ps: bool, gate_ps: bool, gated_norm: bool) -> int:
    """Register load score of a backward variant: the partial-sum tiles a program carries
    (dw, db, per-sample dshift / dscale / dgate), plus 3 for the gated residual with a norm."""
    return sum(map(bool, (has_w, has_b, shift_ps, scale_ps, gate_ps))) + (3 if gated_norm else 0)


def layer_norm_bwd_config(B: int, S: int, N: int, per_sample: bool, load: int, device: torch.device) -> dict:
    """Launch parameters of _layer_norm_bwd_kernel; FULL_ROW=False means the rowstats kernel runs first.

    Tiles hold TARGET_TILE elements, a quarter of that for rows of up to 1024 (many
    rows per program); ``load`` is :func:`bwd_load`: from 3 up the tile of wide rows is
    halved (and rows wider than the tile take the column-block path). So no variant spills on
    sm_90 (tests/test_static_sm90.py). The warps give each thread about 8 elements of each
    tensor: one 16-byte access of bf16 / fp16 (tests/test_static_widths.py).
    The extra key ``GROUP`` is the rows per group (S with one group per sample, else B * S).
    One row of 513 to 1024 per program with the weight and bias partials (``load`` 2: ln_wb, ln_wb_mod
    per token) runs half the warps, 16 elements (two 16-byte accesses) per thread: at 8, ptxas
    spills 4 bytes in the code a contiguous launch compiles (the launch specialization of
    tests/test_static_sm90.py); at 16, 128 registers and none.
    """
    G, group = (B, S) if per_sample else (1, B * S)
    if N > 1024:
        target = TARGET_TILE if load < 3 else TARGET_TILE // 2
    else:
        target = TARGET_TILE // 4
    full_row = triton.next_power_of_2(N) <= min(MAX_FULL_ROW_BWD, target)
    block_n = triton.next_power_of_2(N) if full_row else CHUNK_N
    block_m = _tile(block_n, group, target)
    col_blocks = 1 if full_row else triton.cdiv(N, block_n)
    P = max(1, min(triton.cdiv(group, block_m), max_programs(device) // (G * col_blocks)))
    num_warps = warps_for(block_m * block_n)
    if N <= 1024 and block_m == 1 and load == 2:
        num_warps = max(1, num_warps // 2)
    return dict(grid=(G, P, col_blocks), GROUP=group, FULL_ROW=full_row, BLOCK_M=block_m, BLOCK_N=block_n,
                num_warps=num_warps)


# ----------------------------------------------------------------------------- launchers


def _s(t, dim):
    """Stride of a [B, S|1, N] tensor along dim, 0 for a size-1 (broadcast) dim."""
    return 0 if t is None or t.shape[dim] == 1 else t.stride(dim)


@device_guard
def layer_norm_fwd(x, y, gate, shift, scale, weight, bias, eps, norm, *, out, x_new, mean, rstd):
    """Launch the forward into out, x_new, mean and rstd (allocated by ``fastgen.ops.layer_norm``).

    x, y [B, S, N] (not empty); gate, shift, scale [B, S, N] or [B, 1, N] (per sample), all
    with unit last stride (other strides free); weight, bias [N] contiguous or None.
    y and gate go together (the gated residual), so do shift and scale.
    norm: NORM_NONE | NORM_LAYER | NORM_RMS. Outputs, None where not applicable: out
    [B, S, N] contiguous (unless NORM_NONE), x_new = x + gate * y [B, S, N] contiguous (with
    y), mean [M] fp32 (NORM_LAYER), rstd [M] fp32 (unless NORM_NONE).
    """
    B, S, N = x.shape
    M = B * S
    has_res, has_mod = y is not None, scale is not None
    assert (gate is not None) == has_res and (shift is not None) == has_mod
    assert M > 0 and N > 0, "empty calls are answered by fastgen.ops.layer_norm"
    assert (out is not None) == (norm != NORM_NONE) and (x_new is not None) == has_res
    any_out = out if out is not None else x_new
    any_f32 = rstd if rstd is not None else torch.empty((1,), dtype=torch.float32, device=x.device)
    tensors = (
        x, y if has_res else x, gate if has_res else x, shift if has_mod else x, scale if has_mod else x,
        weight if weight is not None else x, bias if bias is not None else x,
        any_out, x_new if has_res else any_out,
        mean if mean is not None else any_f32, any_f32,
    )
    strides = (_s(x, 0), _s(x, 1), _s(y, 0), _s(y, 1), _s(gate, 0), _s(gate, 1),
               _s(shift, 0), _s(shift, 1), _s(scale, 0), _s(scale, 1))
    flags = dict(NORM=norm, HAS_W=weight is not None, HAS_B=bias is not None, HAS_MOD=has_mod, HAS_RES=has_res,
                 INTERPRET=interpreting())
    if N <= MAX_FULL_ROW_FWD:
        cfg = layer_norm_fwd_config(M, N)
        _layer_norm_fwd_kernel[cfg.pop("grid")](*tensors, M, N, S, *strides, eps, **flags, **cfg)
    else:
        cfg = layer_norm_fwd_chunked_config(M, N)
        _layer_norm_fwd_chunked_kernel[cfg.pop("grid")](
            *tensors, N, S, *strides, eps, cfg.pop("n_chunks"), **flags, **cfg
        )


@device_guard
def layer_norm_bwd(dout, dxnew, h, y, gate, scale, weight, bias, mean, rstd, shift_per_sample, norm, *,
                   dh, dy, dgate, dshift, dscale, dw, db):
    """Launch the gradients of layer_norm_fwd into dh, dy, dgate, dshift, dscale, dw, db
    (allocated by ``fastgen.ops.layer_norm``, None where not applicable).

    dout (gradient of out) and dxnew (gradient of x_new) are [B, S, N] with unit last
    stride or None (dout None only with norm NORM_NONE, and then scale, weight and bias are
    None too); h is what was normalized (x, or x_new), the other inputs as in
    layer_norm_fwd (only scale of the modulation is needed; ``shift_per_sample`` says
    whether shift was [B, 1, N]). Not empty, and with a norm or a gated residual. Outputs:

    - dh [B, S, N] contiguous, x.dtype: the whole gradient of x (None when norm is
      NORM_NONE: then it is dxnew itself);
    - dy [B, S, N] = dh * gate, dgate = dh * y ([B, 1, N] summed over tokens when gate is
      per sample, else [B, S, N]);
    - dshift [B, 1, N] when per sample (per token it is dout itself: None here),
      dscale [B, 1, N] or [B, S, N];
    - dw, db [N] in the dtypes of weight and bias.

    Every reduction is a fixed-order sum of fp32 partials: deterministic.
    """
    B, S, N = h.shape
    M = B * S
    dev = h.device
    has_res, has_mod = y is not None, scale is not None
    assert dout is not None or (norm == NORM_NONE and not has_mod and weight is None and bias is None)
    assert M > 0 and N > 0 and (norm != NORM_NONE or has_res), "empty calls are answered by fastgen.ops.layer_norm"
    shift_ps = has_mod and shift_per_sample
    scale_ps = has_mod and scale.shape[1] == 1
    gate_ps = has_res and gate.shape[1] == 1
    per_sample = shift_ps or scale_ps or gate_ps
    load = bwd_load(weight is not None, bias is not None, shift_ps, scale_ps, gate_ps, has_res and norm != NORM_NONE)
    cfg = layer_norm_bwd_config(B, S, N, per_sample, load, dev)
    grid = cfg.pop("grid")
    group = cfg.pop("GROUP")
    G, P = grid[0], grid[1]
    dummy = torch.empty((1,), dtype=torch.float32, device=dev)

    def partial(flag):
        return torch.empty((G * P, N), dtype=torch.float32, device=dev) if flag else None

    dw_p, db_p = partial(weight is not None), partial(bias is not None)
    dshift_p, dscale_p, dgate_p = partial(shift_ps), partial(scale_ps), partial(gate_ps)
    c = dummy
    if norm != NORM_NONE and not cfg["FULL_ROW"]:
        c = torch.empty((M, 2), dtype=torch.float32, device=dev)
        _layer_norm_bwd_rowstats_kernel[(M,)](
            dout, h, scale if has_mod else h, weight if weight is not None else h,
            mean if mean is not None else rstd, rstd, c, N, S,
            _s(dout, 0), _s(dout, 1), _s(h, 0), _s(h, 1), _s(scale, 0), _s(scale, 1),
            NORM=norm, HAS_W=weight is not None, HAS_MOD=has_mod, BLOCK_N=cfg["BLOCK_N"],
            num_warps=warps_for(cfg["BLOCK_N"]),
        )
    anyt = h if dxnew is None else dxnew
    _layer_norm_bwd_kernel[grid](
        dout if dout is not None else anyt, dxnew if dxnew is not None else anyt, h,
        y if has_res else h, gate if has_res else h, scale if has_mod else h,
        weight if weight is not None else h, bias if bias is not None else h,
        mean if mean is not None else dummy, rstd if rstd is not None else dummy, c,
        dh if dh is not None else anyt, dy if dy is not None else anyt,
        dscale if has_mod and not scale_ps else anyt, dgate if has_res and not gate_ps else anyt,
        dw_p if dw_p is not None else dummy, db_p if db_p is not None else dummy,
        dshift_p if dshift_p is not None else dummy, dscale_p if dscale_p is not None else dummy,
        dgate_p if dgate_p is not None else dummy,
        M, N, S, group, P, triton.cdiv(triton.cdiv(group, cfg["BLOCK_M"]), P),
        _s(dout, 0), _s(dout, 1), _s(dxnew, 0), _s(dxnew, 1), _s(h, 0), _s(h, 1),
        _s(y, 0), _s(y, 1), _s(gate, 0), _s(gate, 1), _s(scale, 0), _s(scale, 1),
        NORM=norm, HAS_W=weight is not None, HAS_B=bias is not None, HAS_MOD=has_mod, HAS_RES=has_res,
        HAS_DXNEW=dxnew is not None, SHIFT_PS=shift_ps, SCALE_PS=scale_ps, GATE_PS=gate_ps,
        INTERPRET=interpreting(), **cfg,
    )
    # Fixed-order sums of the per-program partials: the deterministic second pass.
    for out, p in ((dw, dw_p), (db, db_p)):
        if p is not None:
            out.copy_(p.sum(0))
    for out, p in ((dshift, dshift_p), (dscale, dscale_p), (dgate, dgate_p)):
        if p is not None:  # per sample: [B, 1, N] from the G = B groups of P partial rows
            out.copy_(p.view(G, P, N).sum(1, keepdim=True))
