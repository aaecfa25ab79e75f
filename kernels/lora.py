"""Fused LoRA branch in Triton: ``y += s * (x @ A) @ B`` in place, and its backward pass.

Shapes: ``x (M, K)`` (tokens x in_features), ``A (K, R)`` (the transposed ``down`` weight,
any strides), ``B (R, N)`` (the transposed ``up`` weight, any strides), ``y (M, N)`` the base
layer's output, updated in place. Unfused, ``(x @ A) @ B`` writes a ``(M, N)`` temporary that
is then added to ``y``; here one program owns a ``BLOCK_M`` row block: it computes
``t = x @ A`` (``BLOCK_M x R``, fp32, kept in registers) by a loop over K, then for each of its
``N_TILES`` column tiles loads ``y``, adds ``s * t @ B`` in fp32 and stores it once.

Backward, with ``dy (M, N)``::

    t  = x @ A            (M, R)        dt = s * dy @ B^T   (M, R)
    dA = x^T @ dt         (K, R)        dB = s * t^T @ dy   (R, N)        dx = dt @ A^T  (M, K)

DoRA's row norm, ``n[i] = || W[i, :] + s * up[i, :] @ down ||_2`` for ``W (N, K)``, ``up (N, R)``,
``down (R, K)`` (a conv weight flattened to ``(out, in kh kw)``), is ``_dora_norm_kernel``: one
program per ``BLOCK_N`` rows keeps its ``up`` rows in registers and walks K, adding the squares of
``W + s up down`` tile by tile, so the ``(N, K)`` adapted weight is never written.

``_lora_bwd_kernel`` computes ``t`` and ``dt`` in one pass over ``x`` and ``dy`` (rank-wide
outputs, no ``(M, N)`` temporary); the three rank-R matmuls that remain are skinny GEMMs that
the launcher leaves to torch (cuBLAS): deterministic, no atomics.

Grid: ``(cdiv(M, BLOCK_M), n_groups)``, rows on axis 0 (no 65,535 limit there); each program of
axis 1 owns ``N_TILES`` consecutive column tiles, a trip count computed on the host. Offsets
are int64. Every load is upcast to fp32 at once; ``DOT_FP32`` (set under the interpreter, whose
bf16 dots are wrong, and for fp32 inputs) feeds ``tl.dot`` fp32 operands with IEEE precision,
else the operands go in the input dtype (tensor cores) with fp32 accumulation.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastgen.kernels._common import device_guard, interpreting, max_programs, round_to

TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
MAX_RANK = 128


@triton.jit
def _dot(a, b, DOT_FP32: tl.constexpr, DTYPE: tl.constexpr):
    if DOT_FP32:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        out = tl.dot(a.to(DTYPE), b.to(DTYPE))
    return out


@triton.jit
def _rows_at_a(X, A, rows, rmask, rr, K, R, stride_xm, stride_xk, stride_ak, stride_ar,
               BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, K_TILES: tl.constexpr,
               DTYPE: tl.constexpr, DOT_FP32: tl.constexpr):
    """``t = x[rows] @ A`` (BLOCK_M, BLOCK_R) in fp32, by a loop over the K tiles (forward and backward)."""
    t = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for kt in range(K_TILES):
        ks = kt * BLOCK_K + tl.arange(0, BLOCK_K)
        kmask = ks < K
        x = tl.load(X + rows[:, None] * stride_xm + ks[None, :] * stride_xk,
                    mask=rmask[:, None] & kmask[None, :], other=0.0).to(tl.float32)
        a = tl.load(A + ks[:, None].to(tl.int64) * stride_ak + rr[None, :] * stride_ar,
                    mask=kmask[:, None] & (rr[None, :] < R), other=0.0).to(tl.float32)
        t += _dot(x, a, DOT_FP32, DTYPE)
    return t


@triton.jit
def _lora_fwd_kernel(
    Y,  # (M, N) base output, updated in place; row stride stride_ym, unit column stride
    X,  # (M, K) input; strides stride_xm, stride_xk
    A,  # (K, R) down^T; strides stride_ak, stride_ar
    B,  # (R, N) up^T; strides stride_br, stride_bn
    M, N, K, R,
    stride_ym, stride_xm, stride_xk, stride_ak, stride_ar, stride_br, stride_bn,
    scale,
    N_TILES,  # column tiles per program (host-computed; a runtime value: no recompile per token count)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    K_TILES: tl.constexpr,
    DTYPE: tl.constexpr, DOT_FP32: tl.constexpr, INTERPRET: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    rr = tl.arange(0, BLOCK_R)
    t = _rows_at_a(X, A, rows, rmask, rr, K, R, stride_xm, stride_xk, stride_ak, stride_ar,
                   BLOCK_M, BLOCK_K, BLOCK_R, K_TILES, DTYPE, DOT_FP32)
    for j in range(N_TILES):
        cols = (pid_n * N_TILES + j).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        cmask = cols < N
        b = tl.load(B + rr[:, None] * stride_br + cols[None, :] * stride_bn,
                    mask=(rr[:, None] < R) & cmask[None, :], other=0.0).to(tl.float32)
        mask = rmask[:, None] & cmask[None, :]
        yp = Y + rows[:, None] * stride_ym + cols[None, :]
        y = tl.load(yp, mask=mask, other=0.0).to(tl.float32)
        y += scale * _dot(t, b, DOT_FP32, DTYPE)
        tl.store(yp, round_to(y, DTYPE, INTERPRET), mask=mask)


@triton.jit
def _lora_bwd_kernel(
    X,  # (M, K) input; strides stride_xm, stride_xk
    DY,  # (M, N) output gradient; strides stride_dym, stride_dyn
    A,  # (K, R) down^T; strides stride_ak, stride_ar
    B,  # (R, N) up^T; strides stride_br, stride_bn
    T,  # (M, R) fp32 out: x @ A, contiguous
    DT,  # (M, R) fp32 out: scale * dy @ B^T, contiguous
    M, N, K, R,
    stride_xm, stride_xk, stride_dym, stride_dyn, stride_ak, stride_ar, stride_br, stride_bn,
    scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    K_TILES: tl.constexpr, N_TILES: tl.constexpr,
    DTYPE: tl.constexpr, DOT_FP32: tl.constexpr,
):
    pid_m = tl.program_id(0)
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    rr = tl.arange(0, BLOCK_R)
    t = _rows_at_a(X, A, rows, rmask, rr, K, R, stride_xm, stride_xk, stride_ak, stride_ar,
                   BLOCK_M, BLOCK_K, BLOCK_R, K_TILES, DTYPE, DOT_FP32)
    dt = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for nt in range(N_TILES):
        cols = nt * BLOCK_N + tl.arange(0, BLOCK_N)
        cmask = cols < N
        dy = tl.load(DY + rows[:, None] * stride_dym + cols[None, :] * stride_dyn,
                     mask=rmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
        bt = tl.load(B + rr[None, :] * stride_br + cols[:, None].to(tl.int64) * stride_bn,
                     mask=(rr[None, :] < R) & cmask[:, None], other=0.0).to(tl.float32)  # (BLOCK_N, BLOCK_R)
        dt += _dot(dy, bt, DOT_FP32, DTYPE)
    omask = rmask[:, None] & (rr[None, :] < R)
    offs = rows[:, None] * R + rr[None, :]
    tl.store(T + offs, t, mask=omask)
    tl.store(DT + offs, dt * scale, mask=omask)


@triton.jit
def _dora_norm_kernel(
    W,  # (N, K) base weight; strides stride_wn, stride_wk
    UP,  # (N, R) up; strides stride_un, stride_ur
    DOWN,  # (R, K) down; strides stride_dr, stride_dk
    OUT,  # (N,) fp32 row norms
    N, K, R,
    stride_wn, stride_wk, stride_un, stride_ur, stride_dr, stride_dk,
    scale,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, K_TILES: tl.constexpr,
    DTYPE: tl.constexpr, DOT_FP32: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    rr = tl.arange(0, BLOCK_R)
    u = tl.load(UP + rows[:, None] * stride_un + rr[None, :] * stride_ur,
                mask=rmask[:, None] & (rr[None, :] < R), other=0.0).to(tl.float32)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for kt in range(K_TILES):
        ks = kt * BLOCK_K + tl.arange(0, BLOCK_K).to(tl.int64)
        kmask = ks < K
        d = tl.load(DOWN + rr[:, None] * stride_dr + ks[None, :] * stride_dk,
                    mask=(rr[:, None] < R) & kmask[None, :], other=0.0).to(tl.float32)
        w = tl.load(W + rows[:, None] * stride_wn + ks[None, :] * stride_wk,
                    mask=rmask[:, None] & kmask[None, :], other=0.0).to(tl.float32)
        v = w + scale * _dot(u, d, DOT_FP32, DTYPE)
        acc += tl.sum(v * v, axis=1)
    tl.store(OUT + rows, tl.sqrt(acc), mask=rmask)


@device_guard
def dora_row_norm(w: torch.Tensor, up: torch.Tensor, down: torch.Tensor, scale: float) -> torch.Tensor:
    """``||w + scale * up @ down||`` per row, fp32 ``(N,)``; ``w (N, K)``, ``up (N, R)``, ``down (R, K)``."""
    N, K = w.shape
    R = up.shape[1]
    out = torch.empty(N, device=w.device, dtype=torch.float32)
    bn, bk, br = dora_blocks(R, w.dtype, w.device)
    _dora_norm_kernel[(triton.cdiv(N, bn),)](
        w, up, down, out, N, K, R,
        w.stride(0), w.stride(1), up.stride(0), up.stride(1), down.stride(0), down.stride(1), float(scale),
        BLOCK_N=bn, BLOCK_K=bk, BLOCK_R=br, K_TILES=triton.cdiv(K, bk),
        DTYPE=TL_DTYPES[w.dtype], DOT_FP32=_dot_fp32(w.dtype, w.device), num_warps=4,
    )
    return out


def dora_blocks(R: int, dtype: torch.dtype, device: torch.device) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, BLOCK_R) of the DoRA norm; spill-free on sm_90 (static tier)."""
    br = max(16, triton.next_power_of_2(R))
    if interpreting() or device.type != "cuda":
        return 16, 32, br
    if dtype == torch.float32:  # IEEE fp32 dots (no tensor cores)
        return 16, (32 if br <= 32 else 16), br
    return 32, 64, br


def blocks(R: int, dtype: torch.dtype, device: torch.device) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_R) the launchers use; spill-free on sm_90 (static tier)."""
    block_r = max(16, triton.next_power_of_2(R))
    if interpreting() or device.type != "cuda":
        return 16, 64, 32, block_r
    if dtype == torch.float32:  # IEEE fp32 dots (no tensor cores) hold far more registers
        return (32 if block_r <= 32 else 16), 64, 32, block_r
    return (64 if block_r <= 64 else 32), 64, 64, block_r


def _dot_fp32(dtype: torch.dtype, device: torch.device) -> bool:
    return interpreting() or device.type != "cuda" or dtype == torch.float32


def num_warps(dtype: torch.dtype, device: torch.device) -> int:
    """Warps per program: 8 for the half-precision tiles on a GPU (4 leave them at the 255-register cap)."""
    return 8 if device.type == "cuda" and not interpreting() and dtype != torch.float32 else 4


@device_guard
def lora_fwd_(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """``y += scale * (x @ a) @ b`` in place. ``y (M, N)`` with a unit column stride, ``x (M, K)``,
    ``a (K, R)``, ``b (R, N)``, all of one dtype; returns ``y``."""
    M, K = x.shape
    R, N = b.shape
    assert y.shape == (M, N) and a.shape == (K, R) and y.stride(1) == 1, "lora_fwd_: shape or layout mismatch"
    if M == 0 or N == 0:
        return y
    bm, bn, bk, br = blocks(R, x.dtype, x.device)
    m_tiles, n_tiles = triton.cdiv(M, bm), triton.cdiv(N, bn)
    n_groups = max(1, min(n_tiles, max_programs(x.device, per_sm=8, interpreted=1) // m_tiles))
    tiles = triton.cdiv(n_tiles, n_groups)
    n_groups = triton.cdiv(n_tiles, tiles)
    _lora_fwd_kernel[(m_tiles, n_groups)](
        y, x, a, b, M, N, K, R,
        y.stride(0), x.stride(0), x.stride(1), a.stride(0), a.stride(1), b.stride(0), b.stride(1),
        float(scale), tiles,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_R=br, K_TILES=triton.cdiv(K, bk),
        DTYPE=TL_DTYPES[y.dtype], DOT_FP32=_dot_fp32(x.dtype, x.device), INTERPRET=interpreting(),
        num_warps=num_warps(x.dtype, x.device),
    )
    return y


@device_guard
def lora_bwd(dy: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float):
    """Gradients of ``y += scale * (x @ a) @ b``: returns ``(dx, da, db)`` in the input dtype
    (``da (K, R)``, ``db (R, N)``; weight gradients summed in fp32)."""
    M, K = x.shape
    R, N = b.shape
    t = torch.empty(M, R, device=x.device, dtype=torch.float32)
    dt = torch.empty(M, R, device=x.device, dtype=torch.float32)
    if M > 0:
        bm, bn, bk, br = blocks(R, x.dtype, x.device)
        _lora_bwd_kernel[(triton.cdiv(M, bm),)](
            x, dy, a, b, t, dt, M, N, K, R,
            x.stride(0), x.stride(1), dy.stride(0), dy.stride(1), a.stride(0), a.stride(1), b.stride(0), b.stride(1),
            float(scale),
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_R=br, K_TILES=triton.cdiv(K, bk), N_TILES=triton.cdiv(N, bn),
            DTYPE=TL_DTYPES[x.dtype], DOT_FP32=_dot_fp32(x.dtype, x.device),
            num_warps=num_warps(x.dtype, x.device),
        )
    dx = (dt.to(x.dtype) @ a.t()) if x.dtype != torch.float32 else dt @ a.t()
    da = (x.t().float() @ dt).to(a.dtype)
    db = (scale * (t.t() @ dy.float())).to(b.dtype)
    return dx.to(x.dtype), da, db
