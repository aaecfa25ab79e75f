"""Gated linear units in Triton: ``y = a * act(g)`` with ``x = [a | g]`` split on the last dim.

The feed-forward of SD/SDXL UNets (diffusers ``GEGLU``), of many DiTs (``SwiGLU``)
and ``F.glu`` itself. Unfused, the split, the activation and the product read and
write the ``(M, N)`` halves three times; here one pass reads ``x (M, 2N)`` once and
writes ``y (M, N)`` once. In fp32, one rounding at the store::

    sigmoid    act(g) = s = 1 / (1 + exp(-g))          act'(g) = s (1 - s)
    silu       act(g) = g s                             act'(g) = s (1 + g (1 - s))
    gelu       act(g) = g Phi(g) = g (1 + erf(g/sqrt2))/2
                                                        act'(g) = Phi(g) + g phi(g)
    gelu_tanh  u = sqrt(2/pi) (g + 0.044715 g^3),  t = tanh(u)
               act(g) = g (1 + t) / 2                   act'(g) = (1 + t)/2
                                                                  + g (1 - t^2) sqrt(2/pi) (1 + 3*0.044715 g^2) / 2
               evaluated as (1 + t)/2 = sigmoid(2u), (1 - t)/2 = sigmoid(-2u): no cancellation
               where t is near -1 or 1 (1 - t^2 = 4 sigmoid(2u) sigmoid(-2u)).

``sigmoid(z) = 1 / (1 + exp(-z))`` has the right limits at large ``|z|`` (exp overflows
to inf, the quotient to 0): no nan.

Backward recomputes ``act`` from ``g`` (nothing is saved but ``x``)::

    da = dy * act(g)        dg = dy * a * act'(g)       dx = [da | dg]  (M, 2N)

Shapes: ``x (M, 2N)`` with row stride ``stride_x`` and a contiguous last dim;
``y``, ``dy`` ``(M, N)`` contiguous. One program holds a ``BLOCK_M x BLOCK_N`` tile
of the output (and the matching tiles of both halves of ``x``); the grid is
``(cdiv(M, BLOCK_M), cdiv(N, BLOCK_N))`` (rows on the axis without the 65535 limit) with
64-bit row offsets.

Bytes per element (e: element size of x; per-row, per-column and per-sample terms omitted):

    fwd: read a (e), g (e); write y (e) = 3e
    bwd: read dy (e), a (e), g (e); write da (e), dg (e) = 5e

An element is one of y's, and x = [a | g] is read as its two halves.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastgen.kernels._common import device_guard, interpreting, round_to

ACTIVATIONS = ("sigmoid", "silu", "gelu", "gelu_tanh")
TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
TILE = 2048  # output elements per program: 8 per thread with 8 warps (few live registers)

# Constants are written as literals inside the kernels (1/sqrt(2) = 0.7071067811865476,
# 1/sqrt(2 pi) = 0.3989422804014327, sqrt(2/pi) = 0.7978845608028654, GELU-tanh's 0.044715):
# constexpr globals break Triton's interpreter in arithmetic with tensors.


@triton.jit
def _sigmoid(g):
    return 1.0 / (1.0 + tl.exp(-g))


@triton.jit
def _act(g, ACT: tl.constexpr):
    if ACT == "sigmoid":
        out = _sigmoid(g)
    elif ACT == "silu":
        out = g * _sigmoid(g)
    elif ACT == "gelu":
        out = 0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476))
    else:
        out = g * _sigmoid(2.0 * 0.7978845608028654 * (g + 0.044715 * g * g * g))
    return out


@triton.jit
def _act_and_grad(g, ACT: tl.constexpr):
    if ACT == "sigmoid":
        s = _sigmoid(g)
        out = s
        grad = s * (1.0 - s)
    elif ACT == "silu":
        s = _sigmoid(g)
        out = g * s
        grad = s * (1.0 + g * (1.0 - s))
    elif ACT == "gelu":
        cdf = 0.5 * (1.0 + tl.math.erf(g * 0.7071067811865476))
        out = g * cdf
        grad = cdf + g * 0.3989422804014327 * tl.exp(-0.5 * g * g)
    else:
        u2 = 2.0 * 0.7978845608028654 * (g + 0.044715 * g * g * g)
        sp = _sigmoid(u2)   # (1 + t) / 2, no cancellation near t = -1
        sn = _sigmoid(-u2)  # (1 - t) / 2, no cancellation near t = 1
        out = g * sp
        grad = sp + 2.0 * g * sp * sn * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * g * g)
    return out, grad


@triton.jit
def _tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # rows on grid axis 0 (up to 2^31 - 1 programs; axis 1 stops at 65535), column blocks on axis 1
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)[:, None]
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    return rows, cols, (rows < M) & (cols < N)


@triton.jit
def _glu_fwd_kernel(
    X,  # [M, 2N] input (value | gate), row stride stride_x, unit column stride
    Y,  # [M, N] output, contiguous, X's dtype
    M, N, stride_x,
    ACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, INTERPRET: tl.constexpr,
):
    rows, cols, mask = _tile(M, N, BLOCK_M, BLOCK_N)
    a = tl.load(X + rows * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(X + rows * stride_x + N + cols, mask=mask, other=0.0).to(tl.float32)
    y = a * _act(g, ACT)
    tl.store(Y + rows * N + cols, round_to(y, Y.dtype.element_ty, INTERPRET), mask=mask)


@triton.jit
def _glu_bwd_kernel(
    DY,  # [M, N] gradient of Y, contiguous
    X,  # [M, 2N] the forward's input, row stride stride_x
    DX,  # [M, 2N] output, contiguous: [d value | d gate]
    M, N, stride_x,
    ACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, INTERPRET: tl.constexpr,
):
    rows, cols, mask = _tile(M, N, BLOCK_M, BLOCK_N)
    dy = tl.load(DY + rows * N + cols, mask=mask, other=0.0).to(tl.float32)
    a = tl.load(X + rows * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(X + rows * stride_x + N + cols, mask=mask, other=0.0).to(tl.float32)
    act, grad = _act_and_grad(g, ACT)
    dt = DX.dtype.element_ty
    tl.store(DX + rows * (2 * N) + cols, round_to(dy * act, dt, INTERPRET), mask=mask)
    tl.store(DX + rows * (2 * N) + N + cols, round_to(dy * a * grad, dt, INTERPRET), mask=mask)


def glu_config(M: int, N: int) -> dict:
    """Launch config: a TILE-element output tile, as wide as the row allows (<= 1024)."""
    block_n = min(triton.next_power_of_2(max(N, 1)), 1024)
    block_m = max(1, TILE // block_n)
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=8,
                grid=(triton.cdiv(M, block_m), triton.cdiv(N, block_n)))


def _check(x: torch.Tensor, activation: str) -> int:
    assert x.dim() == 2 and x.shape[1] % 2 == 0 and (x.shape[1] == 0 or x.stride(1) == 1)
    assert activation in ACTIVATIONS and x.dtype in TL_DTYPES
    return x.shape[1] // 2


@device_guard
def glu_fwd(x: torch.Tensor, activation: str, y: torch.Tensor) -> None:
    """y (M, N), contiguous and allocated by the op, = x[:, :N] * act(x[:, N:]) for x (M, 2N)
    with a contiguous last dim."""
    N = _check(x, activation)
    M = x.shape[0]
    assert y.shape == (M, N) and y.is_contiguous() and y.dtype == x.dtype
    if M * N == 0:
        return
    cfg = glu_config(M, N)
    grid = cfg.pop("grid")
    _glu_fwd_kernel[grid](x, y, M, N, x.stride(0), ACT=activation, INTERPRET=interpreting(), **cfg)


@device_guard
def glu_bwd(dy: torch.Tensor, x: torch.Tensor, activation: str, dx: torch.Tensor) -> None:
    """dx (M, 2N), contiguous and allocated by the op, from dy (M, N) contiguous and the forward's x."""
    N = _check(x, activation)
    M = x.shape[0]
    assert dy.shape == (M, N) and dy.is_contiguous() and dy.dtype == x.dtype
    assert dx.shape == (M, 2 * N) and dx.is_contiguous() and dx.dtype == x.dtype
    if M * N == 0:
        return
    cfg = glu_config(M, N)
    grid = cfg.pop("grid")
    _glu_bwd_kernel[grid](dy, x, dx, M, N, x.stride(0), ACT=activation, INTERPRET=interpreting(), **cfg)
