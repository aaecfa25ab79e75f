"""Multi-tensor EMA update in Triton: ``shadow <- shadow + (1 - decay) * (param - shadow)``.

One launch per (shadow dtype, parameter dtype) pair; fp32 math, one rounding at the
store. ``decay`` is a host float (it changes with the warm-up schedule). Bytes per element:
shadow read and written, parameter read (16-byte accesses for aligned, full chunks).
"""

from __future__ import annotations

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
    weight,  # 1 - decay
    S_DTYPE: tl.constexpr,
    P_DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
    INTERPRET: tl.constexpr,
    ALIGNED: tl.constexpr = False,  # every base in the tables is 16-byte aligned
):
    t, offs, mask = chunk(CHUNK_IDS, CHUNK_OFFS, NUMELS, BLOCK)
    if tl.load(CHUNK_OFFS + tl.program_id(0)) + BLOCK <= tl.load(NUMELS + t):
        _ema_body(S_PTRS, P_PTRS, t, offs, mask, weight, S_DTYPE, P_DTYPE, INTERPRET, ALIGNED, False)
    else:
        _ema_body(S_PTRS, P_PTRS, t, offs, mask, weight, S_DTYPE, P_DTYPE, INTERPRET, ALIGNED, True)


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
def ema_update_(shadows: list[torch.Tensor], params: list[torch.Tensor], decay: float) -> None:
    """shadow <- lerp(shadow, param, 1 - decay) for every pair, one launch (dense, alike, one device)."""
    cfg = ema_config()
    for aligned, (ss, ps) in split_aligned(shadows, params):
        table = chunk_table(ss, cfg["BLOCK"])
        _ema_kernel[(table.num_chunks,)](
            pointer_table(ss), pointer_table(ps), table.numels, table.chunk_ids, table.chunk_offs,
            1.0 - float(decay), S_DTYPE=TL_DTYPES[ss[0].dtype], P_DTYPE=TL_DTYPES[ps[0].dtype],
            INTERPRET=interpreting(), ALIGNED=aligned, **cfg,
        )
