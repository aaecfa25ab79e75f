"""Launch configs of the flash-attention kernels (``kernels/attention.py``, ``attention_bwd.py``), as data.

A config is a dict of the kernel's tile constexprs and launch options::

    {"BLOCK_M": query rows per block, "BLOCK_N": keys per block,
     "BLOCK_D": power-of-two head-dim block, "BLOCK_DR": 0 or a second head-dim block,
     "num_warps": 4 | 8, "num_stages": 3, ["TMA": True]}

Per kernel (forward, dK/dV, dQ; the preprocess has one config) there are:

- one **default rule**, ``attention_<kernel>_config(D)``: the config shipped when tuning is off
  (``FASTGEN_AUTOTUNE=0``, ``deterministic=True``). It depends on the head dim only: bf16 and fp16
  compile to the same code, and one config serves every GPU;
- one **candidate list**, ``attention_<kernel>_candidates(D, tma)``: the default first, then every
  tile of the space ``BLOCK_M x BLOCK_N x num_warps`` (x head-dim blocks x pointer / TMA loads)
  that the kernel's filter keeps. The filters encode what the static tier (``tests/sm90.py``)
  measured: a tile is kept only where it compiles for sm_90 without spilling and within
  shared memory; the GPU tier runs each against the reference.

Head-dim blocks: ``split_head_dim`` covers D by a power-of-two block plus an optional remainder
(80 = 64 + 16), ``kernel_head_blocks`` says where a kernel runs the split with pointer loads
(elsewhere it pads to the next power of two), and TMA tiles may also run the splits in
``TMA_SPLITS`` that pointer loads pad, since the descriptor's bounds zero-fill the remainder.

Tests do not patch any of this: they pass a :class:`LaunchOverride` down the call
(``fastgen.ops.attention(..., _launch=...)`` -> the launchers' ``launch=``), and
:func:`launch_config` turns it (or the interpreter) into the one config a launch runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import triton

from fastgen.kernels.autotune import length_bucket

# The tile space every candidate list is drawn from (num_stages is 3 throughout).
BLOCKS = (32, 64, 128)
WARPS = (8, 4)
STAGES = 3
# Split head-dim blocks that only TMA tiles run where pointer loads pad to the next power of two:
# D = 88 / 96 as 64 + 32 in the backward, 136..160 as 128 + 32 and 176..192 as 128 + 64.
TMA_SPLITS = ((64, 32), (128, 32), (128, 64))
# ptxas before Triton 3.9 (the GPU image's 3.6) allocates registers differently: the causal dK/dV
# kernel spills 20-44 bytes in three TMA tiles that 3.9 compiles without spills
# (``_dkdv_spills_before_39``; tests/test_static_sm90.py under both versions).
OLD_PTXAS = tuple(int(v) for v in triton.__version__.split(".")[:2]) < (3, 9)


# ----------------------------------------------------------------------------- head-dim blocks


def block_d(D: int) -> int:
    """The power-of-two head-dim block that covers D (at least 16, the smallest dot)."""
    return max(16, triton.next_power_of_2(D))


def split_head_dim(D: int) -> tuple[int, int]:
    """(BLOCK_D, BLOCK_DR): a power-of-two block plus an optional power-of-two remainder block
    (>= 16, the smallest dot), where the pair is narrower than the next power of two:
    40 -> (32, 16), 72 / 80 -> (64, 16), 96 -> (64, 32), 160 -> (128, 32), 192 -> (128, 64);
    64 -> (64, 0), 112 -> (128, 0) (64 + 64 would be no narrower)."""
    full = block_d(D)
    low = max(16, full // 2 if full > D else full)
    if low >= D:
        return full, 0
    rem = block_d(D - low)
    return (low, rem) if low + rem < full else (full, 0)


def kernel_head_blocks(D: int, kernel: str) -> tuple[int, int]:
    """(BLOCK_D, BLOCK_DR) that ``kernel`` ("fwd" | "bwd") runs for head dim D with pointer loads.

    The split of :func:`split_head_dim` where it compiles with register headroom on sm_90 (Triton
    3.6 and 3.9): a main block <= 64 plus a 16-wide remainder (D = 40, 48, 72, 80) in every kernel,
    64 + 32 (D = 88, 96) in the forward only. Elsewhere the next power of two with masking: the
    split needs a second accumulator per output, which there runs out of registers."""
    main, rem = split_head_dim(D)
    if (rem == 16 and main <= 64) or (kernel == "fwd" and rem == 32 and main == 64):
        return main, rem
    return block_d(D), 0


# ----------------------------------------------------------------------------- default rules


def config(bm: int, bn: int, nw: int, head: tuple[int, int], tma: bool = False) -> dict:
    """One launch config (pointer loads carry no TMA key)."""
    cfg = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=head[0], BLOCK_DR=head[1], num_warps=nw, num_stages=STAGES)
    return dict(cfg, TMA=True) if tma else cfg


def attention_fwd_config(D: int) -> dict:
    """The forward's default for head dim D: 128 x 64 up to 64 columns, 64 x 32 up to 128 (8 warps
    for the 64 + 32 split's second accumulator), 32 x 32 at 256."""
    bd, rem = block_d(D), kernel_head_blocks(D, "fwd")[1]
    tile = (128, 64, 8) if bd <= 64 else (64, 32, 8 if rem == 32 else 4) if bd <= 128 else (32, 32, 8)
    return config(*tile, kernel_head_blocks(D, "fwd"))


def attention_bwd_dkdv_config(D: int) -> dict:
    """dK/dV's default (BLOCK_N keys per program, BLOCK_M queries per step): 32 x 64 up to 32
    columns and for the split head dims (two dk / dv accumulators), 64 x 32 up to 128, 32 x 32 at 256."""
    bd, rem = block_d(D), kernel_head_blocks(D, "bwd")[1]
    tile = (32, 64, 8) if bd <= 32 or rem else (64, 32, 8) if bd <= 128 else (32, 32, 8)
    return config(*tile, kernel_head_blocks(D, "bwd"))


def attention_bwd_dq_config(D: int) -> dict:
    """dQ's default (BLOCK_M queries per program, BLOCK_N keys per step): 128 x 32 up to 64 columns,
    64 x 32 up to 128, 32 x 32 at 256."""
    bd = block_d(D)
    tile = (128, 32, 8) if bd <= 64 else (64, 32, 4) if bd <= 128 else (32, 32, 8)
    return config(*tile, kernel_head_blocks(D, "bwd"))


def attention_preprocess_config(D: int, block_m: Optional[int] = None) -> dict:
    """The preprocess (``delta = rowsum(dO * O)``): 2048-element tiles, 8 elements per thread;
    ``block_m`` overrides the rows per program (tests)."""
    bd = block_d(D)
    bm = block_m or max(8, 2048 // bd)
    return dict(BLOCK_M=bm, BLOCK_D=bd, num_warps=max(1, min(8, bm * bd // 256)))


# ----------------------------------------------------------------------------- candidate lists
# The space: BLOCK_M x BLOCK_N x num_warps on the kernel's own head-dim blocks, and with TMA also
# on a TMA-only split (listed first). Each kernel's filter keeps what the static tier measured to
# compile for sm_90 without spills (registers, shared memory); ``cols`` = BLOCK_D + BLOCK_DR, the
# head-dim columns a tile pays for.


def _space(D: int, own: tuple[int, int], tma: bool) -> list[dict]:
    split = split_head_dim(D)
    heads = lambda t: ([split] if t and split in TMA_SPLITS and split != own else []) + [own]  # noqa: E731
    return [config(bm, bn, nw, head, t) for t in (False, True)[: 1 + bool(tma)] for head in heads(t)
            for bm in BLOCKS for bn in BLOCKS for nw in WARPS]


def _tile(c: dict) -> tuple[tuple[int, int, int], int, bool]:
    """((BLOCK_M, BLOCK_N, num_warps), cols, TMA) of a config of the space."""
    return (c["BLOCK_M"], c["BLOCK_N"], c["num_warps"]), c["BLOCK_D"] + c["BLOCK_DR"], "TMA" in c


def _fwd_keeps(c: dict) -> bool:
    (bm, bn, nw), cols, tma = _tile(c)
    if cols == 256:  # pointer tiles beyond the default spill; TMA affords three more
        return tma and (bm, bn, nw) in ((64, 32, 4), (128, 32, 8), (64, 64, 8))
    # 4 warps per 64 query rows, 32 or 64 keys; 64 x 64 only up to 64 columns; 128 x 128 only
    # through TMA up to 128 columns (its tiles sit in shared memory, not registers).
    return (bm >= 64 and nw == bm // 16 and not (bm == bn == 64 and cols > 64)
            and (bn <= 64 or (tma and bm == 128 and cols <= 128)))


def _dkdv_keeps(c: dict) -> bool:
    tile, cols, tma = _tile(c)
    bm, bn, nw = tile
    if cols > 128:  # TMA's 128 + 32: one tile, 128 + 64: none; 256: the default only (and its TMA twin)
        return tile == (32, 64, 8) if cols == 160 else tma and cols == 256 and tile == (32, 32, 8)
    if cols == 128 and not tma:
        return tile == (32, 32, 4)
    # 32 queries per step x 64 or 128 keys with 8 warps; 64 x 64 up to 64 columns; 32 x 64 with
    # 4 warps at 96..128 columns through TMA. No 32-key TMA tiles: ptxas spills them at D = 64..128.
    return (bm == 32 and bn >= 64 and nw == 8 or tile == (64, 64, 8) and cols <= 64
            or tile == (32, 64, 4) and tma and cols > 80)


def _dkdv_spills_before_39(c: dict) -> bool:
    """The dK/dV TMA tiles that Triton 3.6's ptxas spills (causal): 64 x 64 x 8 above 32 columns,
    32 x 64 x 4 and 32 x 128 x 8 at 128 columns."""
    tile, cols, tma = _tile(c)
    return tma and (tile == (64, 64, 8) and cols > 32 or tile in ((32, 64, 4), (32, 128, 8)) and cols == 128)


def _dq_keeps(c: dict) -> bool:
    (bm, bn, nw), cols, _ = _tile(c)
    if cols == 256:  # the default only
        return False
    # 64 or 128 query rows x 32 or 64 keys, 4 warps per 2048 scores (at most 8); 128-row tiles only
    # up to 80 columns; 32 x 32 with 4 warps at 96..192 columns but not at 128 + 32.
    return (bm >= 64 and bn <= 64 and nw == min(8, bm * bn // 512) and (bm == 64 or cols <= 80)
            or (bm, bn, nw) == (32, 32, 4) and cols > 80 and cols != 160)


def _default_first(default: dict, kept: list[dict]) -> list[dict]:
    return [default, *(c for c in kept if c != default)]


def attention_fwd_candidates(D: int, tma: bool = False) -> list[dict]:
    """The forward's configs for head dim D, default first (``tma``: the call may use descriptors);
    the default's tile with TMA is always one."""
    d = attention_fwd_config(D)
    return _default_first(d, [c for c in _space(D, kernel_head_blocks(D, "fwd"), tma)
                              if _fwd_keeps(c) or c == dict(d, TMA=True)])


def attention_bwd_dkdv_candidates(D: int, tma: bool = False, old_ptxas: bool = OLD_PTXAS) -> list[dict]:
    """dK/dV's configs for head dim D, default first (its TMA twin only where the filter keeps it);
    ``old_ptxas``: the Triton before 3.9 this runs on, without the tiles its ptxas spills."""
    d = attention_bwd_dkdv_config(D)
    return _default_first(d, [c for c in _space(D, kernel_head_blocks(D, "bwd"), tma)
                              if _dkdv_keeps(c) and not (old_ptxas and _dkdv_spills_before_39(c))])


def attention_bwd_dq_candidates(D: int, tma: bool = False) -> list[dict]:
    """dQ's configs for head dim D, default first; the default's tile with TMA is always one."""
    d = attention_bwd_dq_config(D)
    return _default_first(d, [c for c in _space(D, kernel_head_blocks(D, "bwd"), tma)
                              if _dq_keeps(c) or c == dict(d, TMA=True)])


CANDIDATES = {"fwd": attention_fwd_candidates, "bwd_dkdv": attention_bwd_dkdv_candidates,
              "bwd_dq": attention_bwd_dq_candidates}


def tune_key(kernel: str, q, D: int, causal: bool, varlen: bool, group: int, Sq: int, Sk: int, tma: bool = False):
    """What the best launch config depends on: kernel, device, dtype, head dim, masking, GQA, lengths,
    and whether TMA candidates exist for the call."""
    return (kernel, q.device.index, q.dtype, D, bool(causal), varlen, group > 1,
            length_bucket(Sq), length_bucket(Sk), tma)


# ----------------------------------------------------------------------------- test overrides


@dataclass(frozen=True)
class LaunchOverride:
    """Launch choices that a test passes down a call explicitly; production passes ``None``.

    - ``blocks``: (BLOCK_M, BLOCK_N) for every kernel (the preprocess takes BLOCK_M);
    - ``shipped``: the GPU's configs under the interpreter too (which otherwise runs 32 x 32 tiles,
      since it pays per element);
    - ``device_bounds``: under the interpreter, the per-program loop bounds of the GPU path instead
      of looping over every block (Triton >= 3.7 only);
    - ``tma``: read through TMA descriptors wherever the call allows (``True``) or never
      (``False``), whatever the tuner would pick.
    """

    blocks: Optional[tuple[int, int]] = None
    shipped: bool = False
    device_bounds: bool = False
    tma: Optional[bool] = None

    def __post_init__(self):
        if self.blocks is not None and self.shipped:
            raise ValueError("LaunchOverride: blocks and shipped exclude each other")

    def encode(self) -> list[int]:
        """As ints, for the torch.library ops' schema: [BLOCK_M, BLOCK_N, shipped, device_bounds, tma]
        (0 = no blocks; tma -1 = not forced)."""
        bm, bn = self.blocks or (0, 0)
        return [bm, bn, int(self.shipped), int(self.device_bounds), -1 if self.tma is None else int(self.tma)]

    @classmethod
    def decode(cls, ints: Optional[Sequence[int]]) -> Optional["LaunchOverride"]:
        if ints is None:
            return None
        bm, bn, shipped, device_bounds, tma = ints
        return cls((bm, bn) if bm else None, bool(shipped), bool(device_bounds), None if tma < 0 else bool(tma))


def forced_tma_config(candidates: list[dict], tma: bool) -> dict:
    """The config a forced load path runs. With ``tma``: a TMA candidate, preferring a split
    head-dim tile (the TMA-only path), then the default's tile; else the default with ``TMA=True``.
    Without: the default with pointer loads."""
    default = candidates[0]
    if not tma:
        return dict(default, TMA=False)
    tiles = [c for c in candidates if c.get("TMA")]
    split = [c for c in tiles if (c["BLOCK_D"], c["BLOCK_DR"]) != (default["BLOCK_D"], default["BLOCK_DR"])]
    twin = dict(default, TMA=True)
    return dict(split[0] if split else twin if twin in tiles else tiles[0] if tiles else twin)


def launch_config(kernel: str, D: int, tma: bool, launch: Optional[LaunchOverride], interpret: bool) -> Optional[dict]:
    """The one config a launch runs without asking the tuner, or ``None`` (a GPU call without an
    override: the tuner picks among ``CANDIDATES[kernel](D, tma)``). The interpreter runs the
    default at 32 x 32 tiles (it pays per element) unless ``launch.shipped``; ``launch.blocks``
    then sets BLOCK_M x BLOCK_N; ``launch.tma`` forces the load path (``tma``: the call allows TMA)."""
    if launch is None and not interpret:
        return None
    launch = launch or LaunchOverride()
    candidates = CANDIDATES[kernel](D, tma)
    cfg = dict(candidates[0]) if launch.tma is None else forced_tma_config(candidates, launch.tma and tma)
    if interpret and not launch.shipped:
        cfg.update(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1)
    if launch.blocks is not None:
        cfg.update(BLOCK_M=launch.blocks[0], BLOCK_N=launch.blocks[1])
    return cfg


def host_bounds(launch: Optional[LaunchOverride], interpret: bool) -> bool:
    """Loop over every block with masks (host loop bounds) instead of per-program causal / varlen
    bounds: Triton 3.6's interpreter cannot run loops whose bounds come from tl.program_id."""
    return interpret and not (launch is not None and launch.device_bounds)
