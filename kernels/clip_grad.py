"""Multi-tensor gradient clipping in Triton: the global L2 norm in one launch, the scaling in one more.

    total = sqrt(sum over tensors and elements of g^2)          (fp32 accumulation)
    g    <- g * min(1, max_norm / (total + 1e-6))               (coefficient read on the device)

The first kernel writes one fp32 partial sum of squares per program; the partials are
summed in a fixed order (deterministic). The coefficient is a device scalar, so the
whole clip needs no host sync.

Bytes per element (e: element size of the gradient; per-row, per-column and per-sample terms omitted):

    sum_squares: read g (e); write - = e
    scale: read g (e); write g (e) = 2e
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastgen.kernels._common import device_guard, interpreting, round_to
from fastgen.kernels.multi_tensor import TL_DTYPES, block_ptr, chunk, chunk_table, ld, pointer_table, split_aligned, st

BLOCK = 2048


@triton.jit
def _sum_squares_kernel(
    G_PTRS,  # [T] int64 addresses of the gradients (G_DTYPE)
    NUMELS,  # [T] int64
    CHUNK_IDS,  # [C] int32
    CHUNK_OFFS,  # [C] int64
    PARTIAL,  # [C] fp32 out: sum of squares of each program's chunk
    G_DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
    ALIGNED: tl.constexpr = False,  # every base in the table is 16-byte aligned
):
    t, offs, mask = chunk(CHUNK_IDS, CHUNK_OFFS, NUMELS, BLOCK)
    g_ptr = block_ptr(G_PTRS, t, G_DTYPE, offs, ALIGNED)
    if tl.load(CHUNK_OFFS + tl.program_id(0)) + BLOCK <= tl.load(NUMELS + t):  # a full chunk: unmasked
        g = ld(g_ptr, mask, False).to(tl.float32)
    else:
        g = ld(g_ptr, mask, True).to(tl.float32)
    tl.store(PARTIAL + tl.program_id(0), tl.sum(g * g, axis=0))


@triton.jit
def _scale_kernel(
    G_PTRS,  # [T] int64 addresses of the gradients (G_DTYPE), scaled in place
    NUMELS,  # [T] int64
    CHUNK_IDS,  # [C] int32
    CHUNK_OFFS,  # [C] int64
    COEF,  # [1] fp32 device scalar
    G_DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
    INTERPRET: tl.constexpr,
    ALIGNED: tl.constexpr = False,  # every base in the table is 16-byte aligned
):
    t, offs, mask = chunk(CHUNK_IDS, CHUNK_OFFS, NUMELS, BLOCK)
    ptr = block_ptr(G_PTRS, t, G_DTYPE, offs, ALIGNED)
    coef = tl.load(COEF)
    if tl.load(CHUNK_OFFS + tl.program_id(0)) + BLOCK <= tl.load(NUMELS + t):  # a full chunk: unmasked
        st(ptr, round_to(ld(ptr, mask, False).to(tl.float32) * coef, G_DTYPE, INTERPRET), mask, False)
    else:
        st(ptr, round_to(ld(ptr, mask, True).to(tl.float32) * coef, G_DTYPE, INTERPRET), mask, True)


def clip_config() -> dict:
    return dict(BLOCK=BLOCK, num_warps=8)


@device_guard
def sum_squares(grads: list[torch.Tensor]) -> torch.Tensor:
    """fp32 0-d tensor: the sum of squares of all elements (same dtype and device, all dense)."""
    cfg = clip_config()
    partials = []
    for aligned, (gs,) in split_aligned(grads):
        table = chunk_table(gs, cfg["BLOCK"])
        partial = torch.empty(table.num_chunks, dtype=torch.float32, device=grads[0].device)
        _sum_squares_kernel[(table.num_chunks,)](
            pointer_table(gs), table.numels, table.chunk_ids, table.chunk_offs, partial,
            G_DTYPE=TL_DTYPES[gs[0].dtype], ALIGNED=aligned, **cfg,
        )
        partials.append(partial)
    return (partials[0] if len(partials) == 1 else torch.cat(partials)).sum()


@device_guard
def scale_(grads: list[torch.Tensor], coef: torch.Tensor) -> None:
    """grads *= coef (an fp32 device scalar), in place, one launch."""
    cfg = clip_config()
    for aligned, (gs,) in split_aligned(grads):
        table = chunk_table(gs, cfg["BLOCK"])
        _scale_kernel[(table.num_chunks,)](
            pointer_table(gs), table.numels, table.chunk_ids, table.chunk_offs, coef,
            G_DTYPE=TL_DTYPES[gs[0].dtype], INTERPRET=interpreting(), ALIGNED=aligned, **cfg,
        )
