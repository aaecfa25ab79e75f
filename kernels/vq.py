"""Nearest-code search for vector quantization: distance and argmin fused, no (M, K) distance matrix.

For rows ``x`` (M, D) and a codebook ``e`` (K, D)::

    idx[m]  = argmin_k ||x_m - e_k||^2 = argmin_k (||e_k||^2 - 2 x_m . e_k)
    dist[m] = ||x_m||^2 + min_k (||e_k||^2 - 2 x_m . e_k)          (clamped at 0)

One program owns ``BLOCK_M`` rows and walks the codebook in ``BLOCK_K``-code blocks: a
``BLOCK_M x BLOCK_K`` tile of dot products (``tl.dot`` over ``BLOCK_D`` slices of D, fp32,
IEEE precision so that fp32 inputs are not rounded to TF32), turned into partial distances,
reduced to a running (min, argmin) per row. Memory: the outputs only (M int64 + M fp32).
Ties go to the lowest index (as ``torch.argmin``): within a block by ``tl.argmin``'s first
minimum, across blocks by a strict ``<``. A row with a NaN gets a NaN distance (and index 0). Inputs are upcast to fp32 right after every load
(bf16 arithmetic is wrong under the interpreter; fp32 math is wanted anyway).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastgen.kernels._common import device_guard, interpreting


# The GPU launch config: spill-free for sm_90 in fp32 / fp16 / bf16 (tests/test_vae_vq.py compiles it;
# 64 x 64 x 64 and 64 x 64 x 32 with 8 warps spilled in one dtype or another).
GPU_CONFIG = {"BLOCK_M": 32, "BLOCK_K": 64, "BLOCK_D": 32, "num_warps": 4}
INTERPRET_CONFIG = {"BLOCK_M": 16, "BLOCK_K": 16, "BLOCK_D": 16, "num_warps": 1}


@triton.jit
def _vq_nearest_kernel(
    x_ptr,  # [M, D] rows to quantize, row stride stride_xm, unit column stride
    e_ptr,  # [K, D] codebook, row stride stride_ek, unit column stride
    e2_ptr,  # [K] fp32: ||e_k||^2
    idx_ptr,  # [M] int64 out: nearest code
    dist_ptr,  # [M] fp32 out: squared distance to it
    M, K, D, stride_xm, stride_ek,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    rows64 = rows.to(tl.int64)
    best = tl.full([BLOCK_M], float("inf"), tl.float32)
    best_i = tl.zeros([BLOCK_M], tl.int64)
    x2 = tl.zeros([BLOCK_M], tl.float32)
    for d0 in range(0, D, BLOCK_D):  # ||x||^2 once
        cols = d0 + tl.arange(0, BLOCK_D)
        xv = tl.load(x_ptr + rows64[:, None] * stride_xm + cols[None, :],
                     mask=rmask[:, None] & (cols[None, :] < D), other=0.0).to(tl.float32)
        x2 += tl.sum(xv * xv, axis=1)
    for k0 in range(0, K, BLOCK_K):
        codes = k0 + tl.arange(0, BLOCK_K)
        kmask = codes < K
        codes64 = codes.to(tl.int64)
        dot = tl.zeros([BLOCK_M, BLOCK_K], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            cmask = cols < D
            xv = tl.load(x_ptr + rows64[:, None] * stride_xm + cols[None, :],
                         mask=rmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
            ev = tl.load(e_ptr + codes64[:, None] * stride_ek + cols[None, :],
                         mask=kmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
            dot += tl.dot(xv, tl.trans(ev), input_precision="ieee")
        e2 = tl.load(e2_ptr + codes, mask=kmask, other=float("inf"))
        d = e2[None, :] - 2.0 * dot  # [BLOCK_M, BLOCK_K]: ||x - e||^2 - ||x||^2
        d = tl.where(kmask[None, :] & (d == d), d, float("inf"))  # padded codes and NaN never win
        blk_min = tl.min(d, axis=1)
        blk_arg = tl.argmin(d, axis=1).to(tl.int64) + k0
        better = blk_min < best
        best_i = tl.where(better, blk_arg, best_i)
        best = tl.where(better, blk_min, best)
    tl.store(idx_ptr + rows64, best_i, mask=rmask)
    dist = tl.maximum(best + x2, 0.0)
    dist = tl.where(x2 == x2, dist, x2)  # a NaN row reports a NaN distance (its index is 0)
    tl.store(dist_ptr + rows64, dist, mask=rmask)


@device_guard
def vq_nearest(x: torch.Tensor, codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``idx [M] int64, dist [M] fp32 = vq_nearest(x [M, D], codebook [K, D])`` (module docstring).

    fp32 / fp16 / bf16 inputs (math in fp32); rows and codes need a unit column stride.
    """
    M, D = x.shape
    K, D2 = codebook.shape
    assert D == D2 and x.dtype == codebook.dtype and x.device == codebook.device
    if x.stride(1) != 1:
        x = x.contiguous()
    if codebook.stride(1) != 1:
        codebook = codebook.contiguous()
    e2 = codebook.float().square().sum(1)
    idx = torch.empty(M, dtype=torch.int64, device=x.device)
    dist = torch.empty(M, dtype=torch.float32, device=x.device)
    if M == 0:
        return idx, dist
    cfg = dict(INTERPRET_CONFIG if interpreting() else GPU_CONFIG)
    cfg["BLOCK_D"] = max(16, min(cfg["BLOCK_D"], triton.next_power_of_2(D)))
    with torch.cuda.device(x.device) if x.is_cuda else _nullcontext():
        _vq_nearest_kernel[(triton.cdiv(M, cfg["BLOCK_M"]),)](
            x, codebook, e2, idx, dist, M, K, D, x.stride(0), codebook.stride(0), **cfg)
    return idx, dist


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


__all__ = ["vq_nearest"]
