"""Multi-tensor EMA update in Triton: ``shadow <- shadow + (1 - decay) * (param - shadow)``.

One launch per (shadow dtype, parameter dtype) pair; fp32 math, one rounding at the
store. The weight ``1 - decay`` is a host float, or an fp32 device scalar that the kernel
reads (``WEIGHT_IS_PTR``: the warm-up decay computed on the device, so a step captured in a
CUDA graph reads each replay's own decay). Aligned, full chunks load and store 16 bytes per
access.

Bytes per element (e: element size of the parameter; per-row, per-column and per-sample terms omitted):

    update: read shadow (4), p (e); write shadow (4) = e + 8

The shadow is fp32.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from fastgen.kernels._common import device_guard, interpreting, round_to
from fastgen.kernels.multi_tensor import TL_DTYPES, block_ptr, chunk, chunk_table, ld, pointer_table, split_aligned, st

BLOCK = 2048


@triton.jit
def _ema_kernel(
    S_PTRS,  # [T] int64 addresses of the shadow tensors (S_DTYPE), updated in place
    P_PTRS,  # [T] int64 addresses of the parameters (P_DTYPE)
    NUMELS,  # [T] int64
    CHUNK_IDS,  # [C] int32
    CHUNK_OFFS,  # [C] int64
    weight,  # 1 - decay: fp32 scalar, or pointer to an fp32 device scalar when WEIGHT_IS_PTR
    S_DTYPE: tl.constexpr,
    P_DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
    INTERPRET: tl.constexpr,
    ALIGNED: tl.constexpr = False,  # every base in the tables is 16-byte aligned
    WEIGHT_IS_PTR: tl.constexpr = False,
):
    t, offs, mask = chunk(CHUNK_IDS, CHUNK_OFFS, NUMELS, BLOCK)
    if WEIGHT_IS_PTR:
        w = tl.load(weight)
    else:
        w = weight
    if tl.load(CHUNK_OFFS + tl.program_id(0)) + BLOCK <= tl.load(NUMELS + t):
        _ema_body(S_PTRS, P_PTRS, t, offs, mask, w, S_DTYPE, P_DTYPE, INTERPRET, ALIGNED, False)
    else:
        _ema_body(S_PTRS, P_PTRS, t, offs, mask, w, S_DTYPE, P_DTYPE, INTERPRET, ALIGNED, True)


@triton.jit
def _ema_body(S_PTRS, P_PTRS, t, offs, mask, weight, S_DTYPE: tl.constexpr, P_DTYPE: tl.constexpr,
              INTERPRET: tl.constexpr, ALIGNED: tl.constexpr, MASKED: tl.constexpr):
    s_ptr = block_ptr(S_PTRS, t, S_DTYPE, offs, ALIGNED)
    s = ld(s_ptr, mask, MASKED).to(tl.float32)
    p = ld(block_ptr(P_PTRS, t, P_DTYPE, offs, ALIGNED), mask, MASKED).to(tl.float32)
    st(s_ptr, round_to(s + weight * (p - s), S_DTYPE, INTERPRET), mask, MASKED)


def ema_config() -> dict:
    return dict(BLOCK=BLOCK, num_warps=8)


@device_guard
def ema_update_(shadows: list[torch.Tensor], params: list[torch.Tensor], decay: Optional[float] = None, *,
                weight: Optional[torch.Tensor] = None) -> None:
    """shadow <- lerp(shadow, param, 1 - decay) for every pair, one launch per alignment class
    (dense, alike, one device). Give either the host float ``decay`` or ``weight``, an fp32
    0-d tensor on the tensors' device holding ``1 - decay`` (read by the kernel: no host sync)."""
    if (decay is None) == (weight is None):
        raise ValueError("ema_update_: give exactly one of decay (a float) and weight (an fp32 device scalar)")
    if weight is not None and (weight.dtype != torch.float32 or weight.numel() != 1
                               or weight.device != shadows[0].device):
        raise ValueError(f"ema_update_: weight must be one fp32 element on {shadows[0].device}, got "
                         f"{weight.dtype} {tuple(weight.shape)} on {weight.device}")
    cfg = ema_config()
    for aligned, (ss, ps) in split_aligned(shadows, params):
        table = chunk_table(ss, cfg["BLOCK"])
        _ema_kernel[(table.num_chunks,)](
            pointer_table(ss), pointer_table(ps), table.numels, table.chunk_ids, table.chunk_offs,
            weight if weight is not None else 1.0 - float(decay), S_DTYPE=TL_DTYPES[ss[0].dtype],
            P_DTYPE=TL_DTYPES[ps[0].dtype], INTERPRET=interpreting(), ALIGNED=aligned,
            WEIGHT_IS_PTR=weight is not None, **cfg,
        )
