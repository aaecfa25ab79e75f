"""Dequantize-GEMM in Triton for weight-only quantized Linear layers (fastgen.adapters.quantize).

The weight is ``q (N, K)`` (int8 or float8_e4m3fn) with fp32 scales ``s (N, KB)``, one per output
row and block of ``QB = K / KB`` input columns: ``W_hat[n, k] = q[n, k] * s[n, k // QB]``. The
kernel dequantizes tiles of ``W_hat`` in registers, so no full-precision copy of the weight is
ever written:

    forward       y  (M, N) = x  (M, K) @ W_hat^T  (+ bias)          TRANS_W = True
    input grad    dx (M, K) = dy (M, N) @ W_hat                       TRANS_W = False

Both are ``C (M, P) = A (M, R) @ B (R, P)`` with ``B[r, p] = W_hat[p, r]`` (forward) or
``W_hat[r, p]`` (input grad). One program owns a ``BLOCK_M x BLOCK_P`` tile of ``C`` and loops
over ``R`` (trip count from the host); the grid is ``(cdiv(M, BLOCK_M), cdiv(P, BLOCK_P))``
(rows on axis 0). Loads are upcast to fp32 at once; ``DOT_FP32`` (interpreter, fp32 inputs)
feeds ``tl.dot`` fp32 operands with IEEE precision, else the dequantized tile goes in the input
dtype (tensor cores) with fp32 accumulation. Offsets are int64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastgen.kernels._common import device_guard, interpreting, round_to

TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@triton.jit
def _qmm_kernel(
    C,  # (M, P) output, contiguous rows (stride_cm, 1)
    A,  # (M, R) activations; strides stride_am, stride_ar
    Q,  # (N, K) quantized weight; strides stride_qn, stride_qk
    S,  # (N, KB) fp32 scales; strides stride_sn, stride_sb
    BIAS,  # (P,) bias or a dummy pointer when HAS_BIAS is False
    M, P, R,
    stride_cm, stride_am, stride_ar, stride_qn, stride_qk, stride_sn, stride_sb,
    QB,  # input columns per scale block
    TRANS_W: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr, R_TILES: tl.constexpr,
    DTYPE: tl.constexpr, DOT_FP32: tl.constexpr, INTERPRET: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_p = tl.program_id(1)
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_p.to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    rmask = rows < M
    cmask = cols < P
    acc = tl.zeros((BLOCK_M, BLOCK_P), dtype=tl.float32)
    for rt in range(R_TILES):
        rs = rt * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
        kmask = rs < R
        a = tl.load(A + rows[:, None] * stride_am + rs[None, :] * stride_ar,
                    mask=rmask[:, None] & kmask[None, :], other=0.0).to(tl.float32)
        if TRANS_W:  # B[r, p] = W_hat[p, r]: load the (p, r) tile along W's rows, then transpose
            wmask = cmask[:, None] & kmask[None, :]
            q = tl.load(Q + cols[:, None] * stride_qn + rs[None, :] * stride_qk, mask=wmask).to(tl.float32)
            s = tl.load(S + cols[:, None] * stride_sn + (rs[None, :] // QB) * stride_sb, mask=wmask, other=0.0)
            b = tl.where(wmask, q * s, 0.0)  # masked fp8 lanes are undefined (could be NaN): zero them
            b = tl.trans(b if DOT_FP32 else b.to(DTYPE))  # transposed in the dot's dtype (half the registers)
        else:  # B[r, p] = W_hat[r, p]: n = r, k = p
            bmask = kmask[:, None] & cmask[None, :]
            q = tl.load(Q + rs[:, None] * stride_qn + cols[None, :] * stride_qk, mask=bmask).to(tl.float32)
            s = tl.load(S + rs[:, None] * stride_sn + (cols[None, :] // QB) * stride_sb, mask=bmask, other=0.0)
            b = tl.where(bmask, q * s, 0.0)
        if DOT_FP32:
            acc += tl.dot(a, b, input_precision="ieee")
        else:
            acc += tl.dot(a.to(DTYPE), b.to(DTYPE))
    if HAS_BIAS:
        acc += tl.load(BIAS + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    tl.store(C + rows[:, None] * stride_cm + cols[None, :], round_to(acc, DTYPE, INTERPRET),
             mask=rmask[:, None] & cmask[None, :])


def blocks(device: torch.device, dtype: torch.dtype) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_P, BLOCK_R) the launchers use; spill-free on sm_90 (static tier)."""
    if interpreting() or device.type != "cuda":
        return 16, 32, 32
    if dtype == torch.float32:  # IEEE fp32 dots (no tensor cores)
        return 32, 32, 16
    return 64, 64, 32


@device_guard
def _launch(a: torch.Tensor, q: torch.Tensor, s: torch.Tensor, bias, trans_w: bool, out=None) -> torch.Tensor:
    M, R = a.shape
    N, K = q.shape
    P = N if trans_w else K
    c = torch.empty(M, P, device=a.device, dtype=a.dtype) if out is None else out
    assert c.shape == (M, P) and c.stride(1) == 1 and c.dtype == a.dtype, "qmm: output shape, layout or dtype mismatch"
    if M == 0 or P == 0:
        return c
    interp = interpreting() or a.device.type != "cuda"
    bm, bp, br = blocks(a.device, a.dtype)
    _qmm_kernel[(triton.cdiv(M, bm), triton.cdiv(P, bp))](
        c, a, q, s, bias if bias is not None else c, M, P, R,
        c.stride(0), a.stride(0), a.stride(1), q.stride(0), q.stride(1), s.stride(0), s.stride(1),
        K // s.shape[1],
        TRANS_W=trans_w, HAS_BIAS=bias is not None,
        BLOCK_M=bm, BLOCK_P=bp, BLOCK_R=br, R_TILES=triton.cdiv(R, br),
        DTYPE=TL_DTYPES[a.dtype], DOT_FP32=interp or a.dtype == torch.float32, INTERPRET=interpreting(),
        num_warps=4,
    )
    return c


def qmm_fwd(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor, bias: torch.Tensor | None = None,
            out: torch.Tensor | None = None) -> torch.Tensor:
    """``x (M, K) @ W_hat^T (+ bias)`` -> ``(M, N)`` in x's dtype (written into ``out`` if given)."""
    return _launch(x, q, s, bias, True, out)


def qmm_dx(dy: torch.Tensor, q: torch.Tensor, s: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``dy (M, N) @ W_hat`` -> ``(M, K)`` in dy's dtype (written into ``out`` if given)."""
    return _launch(dy, q, s, None, False, out)
