"""Multi-tensor launches for Triton: one kernel launch over a whole list of tensors.

A list of same-dtype tensors is described to a kernel by device tables:

    ptrs[k]      int64 address of tensor k (one table per operand: params, grads, ...)
    numels[k]    int64 element count of tensor k
    chunk_ids[c] int32 which tensor program c works on
    chunk_offs[c] int64 first element of program c's chunk (a multiple of BLOCK)

and program ``c`` of the grid handles elements ``[chunk_offs[c], chunk_offs[c] + BLOCK)``
of tensor ``chunk_ids[c]``, casting the address with ``.to(tl.pointer_type(...))``.
Chunk starts are multiples of BLOCK (so of 16 bytes); a launch whose tables hold only
16-byte-aligned bases carries ``hint``s that let the compiler use 16-byte accesses, and
full chunks load and store without a mask (``ld`` / ``st``); the rest go to a launch
without hints (``split_aligned``).
So a step over hundreds of parameters is one launch per dtype combination, not
one per tensor. Tables are cached on the tensors' addresses, which stay fixed
from step to step, so the host work of a step is a lookup. The cache is least-recently-used
with one exception: a table used while a CUDA graph is captured is never evicted (the graph
replays its address), and tables are copied to the device from page-locked memory (a
pageable host-to-device copy cannot be captured).
"""

from __future__ import annotations

from collections import OrderedDict
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


@triton.jit
def block_ptr(PTRS, t, DTYPE: tl.constexpr, offs, ALIGNED: tl.constexpr):
    """Pointers to elements ``offs`` of tensor ``t`` of an address table. With ``ALIGNED`` they
    carry the hints that they come in runs of 16 contiguous elements whose first address is a
    multiple of 16 bytes: true when the tensor's base is 16-byte aligned (the launcher checks:
    the table of an aligned launch holds only such bases) and ``offs`` starts at a chunk start
    (a multiple of BLOCK >= 16). The compiler can then emit 16-byte loads and stores
    (``ld.global.v4.b32``). The hints must sit on the op that makes the pointers, so this
    function makes them."""
    ptrs = tl.load(PTRS + t).to(tl.pointer_type(DTYPE)) + offs
    if ALIGNED:
        if len(ptrs.shape) == 2:  # [rows, cols] of whole 16-byte runs (8-bit AdamW's quantization blocks)
            ptrs = tl.max_contiguous(tl.multiple_of(ptrs, [16, 16]), [1, 16])
        else:
            ptrs = tl.max_contiguous(tl.multiple_of(ptrs, 16), 16)
    return ptrs


@triton.jit
def ld(ptrs, mask, MASKED: tl.constexpr):
    """``tl.load`` of a chunk, masked only for a tensor's last, partial chunk (a mask whose
    bound is a runtime element count would keep the loads scalar)."""
    if MASKED:
        x = tl.load(ptrs, mask=mask, other=0.0)
    else:
        x = tl.load(ptrs)
    return x


@triton.jit
def st(ptrs, x, mask, MASKED: tl.constexpr):
    """``tl.store`` of a chunk, masked only for a partial chunk."""
    if MASKED:
        tl.store(ptrs, x, mask=mask)
    else:
        tl.store(ptrs, x)


def is_aligned(t: torch.Tensor) -> bool:
    return t.data_ptr() % 16 == 0


def split_aligned(*lists, unchecked: int = 0):
    """Split parallel tensor lists (None lists passed through) into the tensors whose every
    operand has a 16-byte-aligned base and the others: ``[(aligned, lists), ...]`` with the
    empty parts left out. An odd view (a slice starting mid-vector) gets its own launch
    without alignment hints; it is never read with the wrong width. The last ``unchecked``
    lists (scalars such as step counts) are split along without being checked."""
    n = len(next(lst for lst in lists if lst is not None))
    checked = lists[:len(lists) - unchecked]
    ok = [all(is_aligned(lst[i]) for lst in checked if lst is not None) for i in range(n)]
    out = []
    for want in (True, False):
        idx = [i for i in range(n) if ok[i] == want]
        if idx:
            out.append((want, tuple(None if lst is None else [lst[i] for i in idx] for lst in lists)))
    return out


@dataclass(frozen=True)
class ChunkTable:
    numels: torch.Tensor  # [T] int64
    chunk_ids: torch.Tensor  # [C] int32
    chunk_offs: torch.Tensor  # [C] int64

    @property
    def num_chunks(self) -> int:
        return self.chunk_ids.numel()


# Launch tables, least recently used first. A table that was handed out while a CUDA graph
# was being captured is "pinned": the graph holds its device address, so it is never evicted
# (evicting it would free memory that every replay of the graph reads).
_cache: "OrderedDict" = OrderedDict()
_pinned: set = set()
_CACHE_LIMIT = 256


def capturing() -> bool:
    """True while the current CUDA stream is capturing a graph."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _remember(key, make):
    capture = capturing()
    value = _cache.get(key)
    if value is None:
        evictable = [k for k in _cache if k not in _pinned]
        while len(_cache) >= _CACHE_LIMIT and evictable:
            del _cache[evictable.pop(0)]  # the least recently used table no graph uses
        value = _cache[key] = make()
    else:
        _cache.move_to_end(key)
    if capture:
        _pinned.add(key)
    return value


def to_device(values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A device tensor of host ``values``. For a CUDA device the host side is page-locked and
    the copy asynchronous: a pageable host-to-device copy is illegal while a graph is being
    captured, and a pinned source is what a captured copy may read. The host tensor is kept
    with the device one (``_host``), so it lives as long as any table built from it."""
    host = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return host.to(device)
    host = host.pin_memory()
    out = host.to(device, non_blocking=True)
    out._host = host  # noqa: SLF001 - keeps the pinned source alive with the table
    return out


def pointer_table(tensors: list[torch.Tensor]) -> torch.Tensor:
    """int64 device tensor of the tensors' addresses (all on one device)."""
    key = ("ptrs", tensors[0].device, tuple(t.data_ptr() for t in tensors))
    return _remember(key, lambda: to_device(key[2], torch.int64, tensors[0].device))


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
        return ChunkTable(to_device(numels, torch.int64, dev), to_device(ids, torch.int32, dev),
                          to_device(offs, torch.int64, dev))

    return _remember(key, make)
