"""Multi-tensor EMA update in Triton: ``shadow <- shadow + (1 - decay) * (param - shadow)``.

One launch per (shadow dtype, parameter dtype) pair; fp32 math, one rounding at the
store. ``decay`` is a host float (it changes with the warm-up schedule).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastgen.kernels._common import interpreting, round_to
from fastgen.kernels.multi_tensor import TL_DTYPES, chunk, chunk_table, pointer_table, tensor_ptr

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
):
    t, offs, mask = chunk(CHUNK_IDS, CHUNK_OFFS, NUMELS, BLOCK)
    s_ptr = tensor_ptr(S_PTRS, t, S_DTYPE) + offs
    s = tl.load(s_ptr, mask=mask, other=0.0).to(tl.float32)
    p = tl.load(tensor_ptr(P_PTRS, t, P_DTYPE) + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(s_ptr, round_to(s + weight * (p - s), S_DTYPE, INTERPRET), mask=mask)


def ema_config() -> dict:
    return dict(BLOCK=BLOCK, num_warps=8)


def ema_update_(shadows: list[torch.Tensor], params: list[torch.Tensor], decay: float) -> None:
    """shadow <- lerp(shadow, param, 1 - decay) for every pair, one launch (dense, alike, one device)."""
    cfg = ema_config()
    table = chunk_table(shadows, cfg["BLOCK"])
    _ema_kernel[(table.num_chunks,)](
        pointer_table(shadows), pointer_table(params), table.numels, table.chunk_ids, table.chunk_offs,
        1.0 - float(decay), S_DTYPE=TL_DTYPES[shadows[0].dtype], P_DTYPE=TL_DTYPES[params[0].dtype],
        INTERPRET=interpreting(), **cfg,
    )
