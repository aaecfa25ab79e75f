"""RMSNorm in Triton: forward, backward, and the fused residual-add form.

Math, per row of ``N`` elements, in fp32 with one rounding at each store::

    h    = x + r                          (residual form only; rounded to x.dtype and stored)
    rstd = 1 / sqrt(mean(h ** 2) + eps)
    y    = h * rstd * w                   (w optional)

The norm is taken of the *rounded* ``h`` that is returned, so ``y`` equals
``rms_norm(x + r)`` computed by a reference that adds first and then normalizes.

Backward, with ``xhat = h * rstd`` and ``g = dy * w`` (``g = dy`` without a weight)::

    dh = rstd * (g - xhat * mean(g * xhat)) + dh_out
    dw = sum over rows of dy * xhat

Shapes: the launchers take 2-D ``[M, N]`` tensors whose last dim is contiguous
(rows may be strided). Rows that fit in one block (``N <= MAX_FUSED_N_*``) are
kept in registers; wider rows are processed in chunks of ``CHUNK_N``: the forward
re-reads the row (from L2) for its second pass, the backward computes the row
dot product ``mean(g * xhat)`` in a first kernel and then runs a 2-D grid over
(row groups, column blocks).

The weight gradient is deterministic: each row-group program accumulates its
rows into its own fp32 partial row ``dw_partial[pid]``, and the partials are
summed in a fixed order afterwards (no atomics).

Under ``TRITON_INTERPRET=1`` the kernels run on CPU tensors (tests); every load
is upcast to fp32 at once, which keeps bf16 correct in the interpreter too.

Bytes per element (e: element size of x; per-row, per-column and per-sample terms omitted):

    fwd: read x (e); write y (e) = 2e
    fwd residual: read x (e), r (e); write y (e), h (e) = 4e
    bwd: read dy (e), h (e); write dx (e) = 3e
    bwd residual: read dy (e), h (e), dh_out (e); write dx (e) = 4e

Rows wider than ``MAX_FUSED_N_FWD`` (``MAX_FUSED_N_FWD_RESIDUAL``) read x (and r) a second time in
the forward's second pass, and rows wider than ``MAX_FUSED_N_BWD`` read dy and h once more in the
row-dot kernel: + 1e (2e) and + 2e when that second read misses L2.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastgen.kernels._common import device_guard, interpreting, max_programs, round_to, warps_for

# Widest row kept in registers by one program; wider rows take the chunked path.
# Chosen so that no config spills registers on sm_90 with Triton 3.6 or 3.9
# (tests/test_static_sm90.py): the residual form keeps more values live.
MAX_FUSED_N_FWD = 16384
MAX_FUSED_N_FWD_RESIDUAL = 8192
MAX_FUSED_N_BWD = 8192
# Column chunk of the chunked paths.
CHUNK_N = 4096
# Elements per program that the small-row paths aim for (rows are batched).
TARGET_TILE = 4096


@triton.jit
def _rms_norm_fwd_kernel(
    X,  # [M, N] input, row stride stride_x, unit column stride
    R,  # [M, N] residual, row stride stride_r (unused unless HAS_R)
    W,  # [N] weight (unused unless HAS_W)
    Y,  # [M, N] output, contiguous, x.dtype
    H,  # [M, N] x + r, contiguous, x.dtype (unused unless HAS_R)
    RSTD,  # [M] fp32 reciprocal RMS
    M,
    N,
    stride_x,
    stride_r,
    eps,
    HAS_W: tl.constexpr,
    HAS_R: tl.constexpr,
    SINGLE_PASS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    pid = tl.program_id(0)
    if SINGLE_PASS:
        # BLOCK_M whole rows per program, held in registers.
        rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_N)
        row_mask = rows < M
        mask = row_mask[:, None] & (cols < N)[None, :]
        rows64 = rows.to(tl.int64)
        out_offs = rows64[:, None] * N + cols[None, :]
        h = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_R:
            r = tl.load(R + rows64[:, None] * stride_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            h_lo = round_to(h + r, H.dtype.element_ty, INTERPRET)
            tl.store(H + out_offs, h_lo, mask=mask)
            h = h_lo.to(tl.float32)
        rstd = tl.rsqrt(tl.sum(h * h, axis=1) / N + eps)
        tl.store(RSTD + rows, rstd, mask=row_mask)
        y = h * rstd[:, None]
        if HAS_W:
            w = tl.load(W + cols, mask=cols < N, other=0.0).to(tl.float32)
            y = y * w[None, :]
        tl.store(Y + out_offs, round_to(y, Y.dtype.element_ty, INTERPRET), mask=mask)
    else:
        # One row per program, in chunks of BLOCK_N: sum of squares, then normalize.
        row = pid.to(tl.int64)
        x_row = X + row * stride_x
        r_row = R + row * stride_r
        out_row = row * N
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for start in range(0, N, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            mask = cols < N
            h = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_R:
                r = tl.load(r_row + cols, mask=mask, other=0.0).to(tl.float32)
                h_lo = round_to(h + r, H.dtype.element_ty, INTERPRET)
                tl.store(H + out_row + cols, h_lo, mask=mask)
                h = h_lo.to(tl.float32)
            acc += h * h
        rstd = tl.rsqrt(tl.sum(acc, axis=0) / N + eps)
        tl.store(RSTD + row, rstd)
        for start in range(0, N, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            mask = cols < N
            # Recompute h from the inputs (not from H: another thread of this
            # program stored it, and the rounding is deterministic anyway).
            h = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_R:
                r = tl.load(r_row + cols, mask=mask, other=0.0).to(tl.float32)
                h = round_to(h + r, H.dtype.element_ty, INTERPRET).to(tl.float32)
            y = h * rstd
            if HAS_W:
                w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
                y = y * w
            tl.store(Y + out_row + cols, round_to(y, Y.dtype.element_ty, INTERPRET), mask=mask)


@triton.jit
def _rms_norm_bwd_rowdot_kernel(
    DY,  # [M, N] upstream gradient, row stride stride_dy
    H,  # [M, N] normalized input (x, or x + r), row stride stride_h
    W,  # [N] weight (unused unless HAS_W)
    RSTD,  # [M] fp32
    C,  # [M] fp32 out: mean(g * xhat) per row
    N,
    stride_dy,
    stride_h,
    HAS_W: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        mask = cols < N
        g = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_W:
            g = g * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        h = tl.load(H + row * stride_h + cols, mask=mask, other=0.0).to(tl.float32)
        acc += g * h
    rstd = tl.load(RSTD + row)
    tl.store(C + row, tl.sum(acc, axis=0) * rstd / N)


@triton.jit
def _rms_norm_bwd_kernel(
    DY,  # [M, N] upstream gradient of y, row stride stride_dy
    H,  # [M, N] normalized input (x, or x + r), row stride stride_h
    W,  # [N] weight (unused unless HAS_W)
    RSTD,  # [M] fp32
    DHOUT,  # [M, N] upstream gradient of h, row stride stride_dho (unused unless HAS_DHOUT)
    C,  # [M] fp32 mean(g * xhat) per row (read unless FULL_ROW)
    DX,  # [M, N] out: gradient of h, contiguous, h.dtype
    DW_PARTIAL,  # [num_row_programs, N] fp32 out: per-program partial weight gradient
    M,
    N,
    stride_dy,
    stride_h,
    stride_dho,
    num_row_programs,  # grid[0]
    tiles_per_program,  # cdiv(cdiv(M, BLOCK_M), grid[0]); host-computed: loop bounds derived from
    # tl.program_id break range() in Triton 3.6's interpreter
    HAS_W: tl.constexpr,
    HAS_DHOUT: tl.constexpr,
    FULL_ROW: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    # grid = (G row programs, column blocks); row program p takes row tiles p, p + G, p + 2G, ...
    pid_m = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    if HAS_W:
        w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
        dw_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for i in range(0, tiles_per_program):
        # Tiles past the last one (at most one per program) are fully masked.
        rows = (pid_m + i * num_row_programs) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < M
        mask = row_mask[:, None] & col_mask[None, :]
        rows64 = rows.to(tl.int64)
        dy = tl.load(DY + rows64[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        h = tl.load(H + rows64[:, None] * stride_h + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)
        xhat = h * rstd[:, None]
        if HAS_W:
            g = dy * w[None, :]
            dw_acc += dy * xhat
        else:
            g = dy
        if FULL_ROW:
            c = tl.sum(g * xhat, axis=1) / N
        else:
            c = tl.load(C + rows, mask=row_mask, other=0.0)
        dx = rstd[:, None] * (g - xhat * c[:, None])
        if HAS_DHOUT:
            dx += tl.load(DHOUT + rows64[:, None] * stride_dho + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + rows64[:, None] * N + cols[None, :], round_to(dx, DX.dtype.element_ty, INTERPRET), mask=mask)
    if HAS_W:
        tl.store(DW_PARTIAL + pid_m.to(tl.int64) * N + cols, tl.sum(dw_acc, axis=0), mask=col_mask)


# ----------------------------------------------------------------------------- launchers


def _row_tile(N: int, M: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N) for the paths that hold whole rows."""
    block_n = triton.next_power_of_2(N)
    block_m = max(1, min(TARGET_TILE // block_n, triton.next_power_of_2(M), 64))
    return block_m, block_n


def fwd_config(M: int, N: int, residual: bool) -> dict:
    """Launch parameters of _rms_norm_fwd_kernel for an [M, N] input (the static tests compile these)."""
    if N <= (MAX_FUSED_N_FWD_RESIDUAL if residual else MAX_FUSED_N_FWD):
        block_m, block_n = _row_tile(N, M)
        grid, single_pass = (triton.cdiv(M, block_m),), True
    else:
        block_m, block_n = 1, CHUNK_N
        grid, single_pass = (M,), False
    return dict(grid=grid, SINGLE_PASS=single_pass, BLOCK_M=block_m, BLOCK_N=block_n,
                num_warps=warps_for(block_m * block_n))


def bwd_config(M: int, N: int, device: torch.device) -> dict:
    """Launch parameters of _rms_norm_bwd_kernel; FULL_ROW=False means the row-dot kernel runs first."""
    full_row = N <= MAX_FUSED_N_BWD
    if full_row:
        block_m, block_n = _row_tile(N, M)
        col_blocks = 1
    else:
        block_m, block_n = 1, CHUNK_N
        col_blocks = triton.cdiv(N, block_n)
    row_programs = max(1, min(triton.cdiv(M, block_m), max_programs(device) // col_blocks))
    return dict(grid=(row_programs, col_blocks), FULL_ROW=full_row, BLOCK_M=block_m, BLOCK_N=block_n,
                num_warps=warps_for(block_m * block_n))


@device_guard
def rms_norm_fwd(x, weight, residual, eps, *, y, h, rstd):
    """Launch the forward into ``y``, ``h`` and ``rstd`` (allocated by ``fastgen.ops.rms_norm``).

    x [M, N] (M, N > 0) with unit last stride, weight [N] | None, residual [M, N] | None;
    y [M, N] contiguous in x.dtype; h [M, N] contiguous (x + residual, with a residual;
    None without one); rstd [M] fp32.
    """
    M, N = x.shape
    assert x.stride(1) == 1 or N <= 1
    if residual is not None:
        assert residual.shape == x.shape and residual.dtype == x.dtype and (residual.stride(1) == 1 or N <= 1)
    cfg = fwd_config(M, N, residual is not None)
    _rms_norm_fwd_kernel[cfg.pop("grid")](
        x,
        residual if residual is not None else x,
        weight if weight is not None else x,
        y,
        h if h is not None else y,
        rstd,
        M,
        N,
        x.stride(0),
        residual.stride(0) if residual is not None else 0,
        eps,
        HAS_W=weight is not None,
        HAS_R=residual is not None,
        INTERPRET=interpreting(),
        **cfg,
    )


@device_guard
def rms_norm_bwd(dy, h, weight, rstd, dh_out, *, dx, dw):
    """Launch the backward into ``dx`` and ``dw`` (allocated by ``fastgen.ops.rms_norm``).

    dy, h [M, N] (M, N > 0) with unit last stride, weight [N] | None, rstd [M] fp32,
    dh_out [M, N] | None; dx [M, N] contiguous in h.dtype receives the whole gradient of h
    (dh_out included), dw [N] in weight.dtype (None without a weight) the sum of fp32
    per-program partials in a fixed order: deterministic.
    """
    M, N = h.shape
    assert dy.shape == h.shape and ((dy.stride(1) == 1 and h.stride(1) == 1) or N <= 1)
    assert dh_out is None or (dh_out.shape == h.shape and (dh_out.stride(1) == 1 or N <= 1))
    cfg = bwd_config(M, N, h.device)
    grid = cfg.pop("grid")
    c = rstd  # not read when whole rows fit in one program
    if not cfg["FULL_ROW"]:
        c = torch.empty((M,), dtype=torch.float32, device=h.device)
        _rms_norm_bwd_rowdot_kernel[(M,)](
            dy, h, weight if weight is not None else h, rstd, c, N, dy.stride(0), h.stride(0),
            HAS_W=weight is not None, BLOCK_N=cfg["BLOCK_N"], num_warps=cfg["num_warps"],
        )
    dw_partial = None if weight is None else torch.empty((grid[0], N), dtype=torch.float32, device=h.device)
    _rms_norm_bwd_kernel[grid](
        dy,
        h,
        weight if weight is not None else h,
        rstd,
        dh_out if dh_out is not None else dy,
        c,
        dx,
        dw_partial if dw_partial is not None else rstd,
        M,
        N,
        dy.stride(0),
        h.stride(0),
        dh_out.stride(0) if dh_out is not None else 0,
        grid[0],
        triton.cdiv(triton.cdiv(M, cfg["BLOCK_M"]), grid[0]),
        HAS_W=weight is not None,
        HAS_DHOUT=dh_out is not None,
        INTERPRET=interpreting(),
        **cfg,
    )
    if dw_partial is not None:  # fixed-order sum of the per-program partials: the deterministic second pass
        dw.copy_(dw_partial.sum(0))
