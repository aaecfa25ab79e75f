"""AdaLN modulation without a norm, in Triton: ``y = x * (1 + scale) + shift``.

Shapes: ``x`` is ``[B, S, N]`` with a unit last stride; ``scale`` and ``shift`` are each
``[B, 1, N]`` (per sample, broadcast over the ``S`` tokens: stride 0 along S) or
``[B, S, N]`` (per token), read through their own (batch, token) strides.

Grid: one program per (sample ``b``, chunk of ``chunk_s`` tokens, block of ``BLOCK_N``
features), all on axis 0 (axis 1 stops at 65,535). A program walks its ``chunk_s`` tokens
in tiles of ``BLOCK_S`` rows (a runtime trip count computed on the host: no recompile per
token count, and loop bounds derived from ``tl.program_id`` break Triton 3.6's interpreter).
``BLOCK_S`` is 1 for rows of 256 features or more; narrower rows stack ``256 // BLOCK_N``
tokens per tile so that every thread still holds 8 contiguous features (16 bytes in bf16).

Forward, fp32 math and one rounding at the store::

    y = x * (1 + scale) + shift

Backward, with ``dy`` the gradient of ``y``::

    dx     = dy * (1 + scale)
    dscale = dy * x          per token; per sample: sum over tokens
    dshift = dy              per token (the op returns dy itself); per sample: sum over tokens

Per-sample sums: each program writes fp32 partials ``[B, chunks, N]`` of its tokens (the
launcher's scratch), and the launcher sums them over ``chunks`` in a fixed order into the
op's ``[B, 1, N]`` output (deterministic, no atomics). The op allocates every output.

Bytes per element (e: element size of x; per-row, per-column and per-sample terms omitted):

    fwd: read x (e); write y (e) = 2e
    fwd per-token: read x (e), scale (e), shift (e); write y (e) = 4e
    bwd: read dy (e), x (e); write dx (e) = 3e
    bwd per-token: read dy (e), x (e), scale (e); write dx (e), dscale (e) = 5e

The plain lines are per-sample modulation (``[B, 1, N]``, read once per row block).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastgen.kernels._common import device_guard, interpreting, max_programs, round_to


@triton.jit
def _offsets(pid, N, n_chunks, BLOCK_N: tl.constexpr):
    n_blocks = tl.cdiv(N, BLOCK_N)
    nb = pid % n_blocks
    c = (pid // n_blocks) % n_chunks
    b = pid // (n_blocks * n_chunks)
    cols = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    return b.to(tl.int64), c, cols, cols < N


@triton.jit
def _rows(c, i, chunk_s, S, mask_n, BLOCK_S: tl.constexpr):
    """Tokens ``c * chunk_s + i + [0, BLOCK_S)`` as an int64 ``[BLOCK_S, 1]`` column and the
    ``[BLOCK_S, BLOCK_N]`` mask of the tile (``chunk_s`` is a multiple of ``BLOCK_S``)."""
    s = (c * chunk_s + i + tl.arange(0, BLOCK_S)).to(tl.int64)
    return s[:, None], (s < S)[:, None] & mask_n[None, :]


@triton.jit
def _scale_shift_fwd_kernel(
    X,  # [B, S, N] input, strides (sxb, sxs, 1)
    SCALE,  # [B, S | 1, N] modulation, strides (scb, scs, 1); scs = 0 per sample
    SHIFT,  # [B, S | 1, N] modulation, strides (shb, shs, 1); shs = 0 per sample
    Y,  # [B, S, N] output, contiguous, X's dtype
    S, N, n_chunks, chunk_s, sxb, sxs, scb, scs, shb, shs,
    BLOCK_S: tl.constexpr, BLOCK_N: tl.constexpr, INTERPRET: tl.constexpr,
):
    b, c, cols, mask_n = _offsets(tl.program_id(0), N, n_chunks, BLOCK_N)
    col = cols[None, :]
    for i in range(0, chunk_s, BLOCK_S):
        s, mask = _rows(c, i, chunk_s, S, mask_n, BLOCK_S)
        x = tl.load(X + b * sxb + s * sxs + col, mask=mask, other=0.0).to(tl.float32)
        sc = tl.load(SCALE + b * scb + s * scs + col, mask=mask, other=0.0).to(tl.float32)
        sh = tl.load(SHIFT + b * shb + s * shs + col, mask=mask, other=0.0).to(tl.float32)
        y = x * (1.0 + sc) + sh
        tl.store(Y + (b * S + s) * N + col, round_to(y, Y.dtype.element_ty, INTERPRET), mask=mask)


@triton.jit
def _scale_shift_bwd_kernel(
    DY,  # [B, S, N] gradient of Y, contiguous
    X,  # [B, S, N] the forward's input, strides (sxb, sxs, 1)
    SCALE,  # [B, S | 1, N] strides (scb, scs, 1)
    DX,  # [B, S, N] output, contiguous, X's dtype
    DSCALE,  # per token: [B, S, N] contiguous, X's dtype; per sample: fp32 partials [B, n_chunks, N]
    DSHIFT,  # per sample: fp32 partials [B, n_chunks, N]; per token: unused (dshift is dy itself)
    S, N, n_chunks, chunk_s, sxb, sxs, scb, scs,
    SCALE_PS: tl.constexpr, SHIFT_PS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_N: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    b, c, cols, mask_n = _offsets(tl.program_id(0), N, n_chunks, BLOCK_N)
    col = cols[None, :]
    acc_scale = tl.zeros((BLOCK_S, BLOCK_N), dtype=tl.float32)
    acc_shift = tl.zeros((BLOCK_S, BLOCK_N), dtype=tl.float32)
    dt = DX.dtype.element_ty
    for i in range(0, chunk_s, BLOCK_S):
        s, mask = _rows(c, i, chunk_s, S, mask_n, BLOCK_S)
        row = (b * S + s) * N + col
        dy = tl.load(DY + row, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(X + b * sxb + s * sxs + col, mask=mask, other=0.0).to(tl.float32)
        sc = tl.load(SCALE + b * scb + s * scs + col, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + row, round_to(dy * (1.0 + sc), dt, INTERPRET), mask=mask)
        if SCALE_PS:
            acc_scale += dy * x  # 0 where masked (dy = 0)
        else:
            tl.store(DSCALE + row, round_to(dy * x, dt, INTERPRET), mask=mask)
        if SHIFT_PS:
            acc_shift += dy
    part = (b * n_chunks + c) * N + cols
    if SCALE_PS:
        tl.store(DSCALE + part, tl.sum(acc_scale, axis=0), mask=mask_n)
    if SHIFT_PS:
        tl.store(DSHIFT + part, tl.sum(acc_shift, axis=0), mask=mask_n)


# Features a warp holds per tile: 8 per thread, 16 contiguous bytes in bf16.
WARP_TILE = 256


def scale_shift_config(B: int, S: int, N: int, device: torch.device) -> dict:
    """Launch config: a feature block up to 1024 wide, 8 features per thread (``BLOCK_N //
    256`` warps, one warp below that, with ``256 // BLOCK_N`` token rows per tile so that a
    narrow row is still read 16 bytes per thread), and token chunks (a multiple of the tile's
    rows) sized so that the grid fills the device about once (``max_programs``) without a
    chunk of zero rows."""
    block_n = min(triton.next_power_of_2(max(N, 1)), 1024)
    block_s = min(max(1, WARP_TILE // block_n), triton.next_power_of_2(max(S, 1)))
    n_blocks = triton.cdiv(N, block_n)
    want_chunks = max(1, max_programs(device) // max(1, B * n_blocks))
    chunk_s = max(1, triton.cdiv(S, want_chunks))
    chunk_s = triton.cdiv(chunk_s, block_s) * block_s
    n_chunks = triton.cdiv(S, chunk_s)
    return dict(BLOCK_N=block_n, BLOCK_S=block_s, num_warps=max(1, block_n // WARP_TILE), chunk_s=chunk_s,
                n_chunks=n_chunks, grid=(B * n_chunks * n_blocks,))


def _strides(t: torch.Tensor) -> tuple[int, int]:
    """(batch, token) strides of a [B, S | 1, N] tensor; 0 along a broadcast token dim."""
    return t.stride(0), (0 if t.shape[1] == 1 else t.stride(1))


def _check(x: torch.Tensor, *mods: torch.Tensor) -> None:
    assert x.dim() == 3 and (x.shape[2] <= 1 or x.stride(2) == 1)
    B, S, N = x.shape
    for t in mods:
        assert t.shape in ((B, 1, N), (B, S, N)) and t.dtype == x.dtype and (N <= 1 or t.stride(2) == 1)


@device_guard
def scale_shift_fwd(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, y: torch.Tensor) -> None:
    """y [B, S, N] (contiguous, allocated by the op) = x * (1 + scale) + shift."""
    _check(x, scale, shift)
    B, S, N = x.shape
    cfg = scale_shift_config(B, S, N, x.device)
    grid, n_chunks, chunk_s = cfg.pop("grid"), cfg.pop("n_chunks"), cfg.pop("chunk_s")
    _scale_shift_fwd_kernel[grid](x, scale, shift, y, S, N, n_chunks, chunk_s, x.stride(0), x.stride(1), *_strides(scale),
                                  *_strides(shift), INTERPRET=interpreting(), **cfg)


@device_guard
def scale_shift_bwd(dy: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, dx: torch.Tensor, dscale: torch.Tensor,
                    dshift: torch.Tensor | None, scale_per_sample: bool, shift_per_sample: bool) -> None:
    """Fill the op's outputs, all contiguous in x's dtype: dx [B, S, N]; dscale of scale's shape,
    ``dy * x`` per token, its sum over tokens [B, 1, N] per sample; dshift [B, 1, N] the sum of
    dy over tokens per sample, None per token (dshift is dy itself: nothing to launch)."""
    _check(x, scale)
    B, S, N = x.shape
    assert dy.shape == x.shape and dy.is_contiguous() and dy.dtype == x.dtype
    assert dx.shape == x.shape and dx.is_contiguous() and dx.dtype == x.dtype
    assert dscale.shape == scale.shape and dscale.is_contiguous() and dscale.dtype == x.dtype
    assert scale_per_sample or dscale.shape == x.shape  # per token the kernel writes dscale rows
    assert (dshift is not None) == shift_per_sample
    assert dshift is None or (dshift.shape == (B, 1, N) and dshift.is_contiguous() and dshift.dtype == x.dtype)
    cfg = scale_shift_config(B, S, N, x.device)
    grid, n_chunks, chunk_s = cfg.pop("grid"), cfg.pop("n_chunks"), cfg.pop("chunk_s")
    # Scratch: fp32 partials [B, n_chunks, N] of each per-sample sum.
    part = lambda: torch.empty((B, n_chunks, N), dtype=torch.float32, device=x.device)  # noqa: E731
    scale_part = part() if scale_per_sample else dscale
    shift_part = part() if shift_per_sample else scale_part  # unused by the kernel per token
    _scale_shift_bwd_kernel[grid](dy, x, scale, dx, scale_part, shift_part, S, N, n_chunks, chunk_s, x.stride(0),
                                  x.stride(1), *_strides(scale), SCALE_PS=scale_per_sample,
                                  SHIFT_PS=shift_per_sample, INTERPRET=interpreting(), **cfg)
    # Fixed-order sums of the per-chunk partials into the outputs: the deterministic second pass.
    if scale_per_sample:
        dscale.copy_(scale_part.sum(1, keepdim=True))
    if shift_per_sample:
        dshift.copy_(shift_part.sum(1, keepdim=True))
