"""Multi-tensor launches for Triton: one kernel launch over a whole list of tensors.

A list of same-dtype tensors is described to a kernel by device tables:

    ptrs[k]      int64 address of tensor k (one table per operand: params, grads, ...)
    numels[k]    int64 element count of tensor k
    chunk_ids[c] int32 which tensor program c works on
    chunk_offs[c] int64 first element of program c's chunk (a multiple of BLOCK)

and program ``c`` of the grid handles elements ``[chunk_offs[c], chunk_offs[c] + BLOCK)``
of tensor ``chunk_ids[c]``, casting the address with ``.to(tl.pointer_type(...))``.
So a step over hundreds of parameters is one launch per dtype combination, not
one per tensor. Tables are cached on the tensors' addresses, which stay fixed
from step to step, so the host work of a step is a lookup.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl


TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@triton.jit
def chunk(CHUNK_IDS, CHUNK_OFFS, NUMELS, BLOCK: tl.constexpr):
    """(tensor index, element offsets [BLOCK], mask) of this program's chunk."""
    pid = tl.program_id(0)
    t = tl.load(CHUNK_IDS + pid)
    offs = tl.load(CHUNK_OFFS + pid) + tl.arange(0, BLOCK)
    return t, offs, offs < tl.load(NUMELS + t)


@triton.jit
def tensor_ptr(PTRS, t, DTYPE: tl.constexpr):
    """Pointer to element 0 of tensor ``t`` of an address table."""
    return tl.load(PTRS + t).to(tl.pointer_type(DTYPE))


@dataclass(frozen=True)
class ChunkTable:
    numels: torch.Tensor  # [T] int64
    chunk_ids: torch.Tensor  # [C] int32
    chunk_offs: torch.Tensor  # [C] int64

    @property
    def num_chunks(self) -> int:
        return self.chunk_ids.numel()


_cache: dict = {}
_CACHE_LIMIT = 256


def _remember(key, make):
    value = _cache.get(key)
    if value is None:
        if len(_cache) >= _CACHE_LIMIT:
            _cache.clear()
        value = _cache[key] = make()
    return value


def pointer_table(tensors: list[torch.Tensor]) -> torch.Tensor:
    """int64 device tensor of the tensors' addresses (all on one device)."""
    key = ("ptrs", tensors[0].device, tuple(t.data_ptr() for t in tensors))
    return _remember(key, lambda: torch.tensor(key[2], dtype=torch.int64).to(tensors[0].device))


def chunk_table(tensors: list[torch.Tensor], block: int) -> ChunkTable:
    """The chunks of ``block`` elements that cover every tensor (all contiguous, one device)."""
    numels = tuple(t.numel() for t in tensors)
    key = ("chunks", tensors[0].device, numels, block)

    def make():
        ids, offs = [], []
        for k, n in enumerate(numels):
            starts = range(0, n, block)
            ids.extend([k] * len(starts))
            offs.extend(starts)
        dev = tensors[0].device
        return ChunkTable(
            torch.tensor(numels, dtype=torch.int64).to(dev),
            torch.tensor(ids, dtype=torch.int32).to(dev),
            torch.tensor(offs, dtype=torch.int64).to(dev),
        )

    return _remember(key, make)
