"""Lossless tiled VAE encode / decode: tile cores that partition the input at every layer.

Activations are ``(N, C, *axes)``: ``(H, W)`` for images, ``(T, H, W)`` for videos. The network is
the flat step list of :mod:`fastgen.vae.tiling` (``conv``, ``gn``, ``push``, ``add``, ``attn``,
``up``, ``down``; plus ``("step", s)`` for a step object ``s`` of the :class:`Step` protocol, which
the video VAE's causal convs, spatial norms and temporal up / down-sampling use,
:mod:`fastgen.vae.video_tiling`), cut into **segments** that each hold at most one halo-reading
step (a ``k x k`` conv with ``k > 1``, a stride-2 ``down`` conv, a global ``attn``, a ``Step`` with
``spatial``) and start wherever the whole input must be seen first:

- before every GroupNorm (``gn``, or a ``Step`` with a ``norm``): its statistics, per (sample,
  group), merged in float64 over every tile's core (Chan et al.: ``n = n_a + n_b``,
  ``d = mean_b - mean_a``, ``mean = mean_a + d n_b / n``, ``M2 = M2_a + M2_b + d^2 n_a n_b / n``,
  ``var = M2 / n``);
- before every global ``attn``: the keys and values of every core;
- before every ``up`` (and ``Step`` with ``barrier``) and every second halo-reading step.

Every level (resolution) of the network is partitioned into the same grid of tile **cores**,
one axis at a time: at a level of size ``L`` the bounds are ``round(b * L / L_lat)`` of the
latent-level bounds ``b`` (every level is at least the latent's size, so no core is empty). A
segment's output for a tile is exactly its core; the input region it reads is the core mapped
backwards through the segment's steps (the **halo**), per axis::

    conv k x k, padding p:   out [a, b) <- in [a - p, b + p)        (clipped to [0, L))
    down (pad 0|1, stride 2): out [a, b) <- in [2a, 2b + 1)
    up (nearest x2):          out [a, b) <- in [floor(a / 2), ceil(b / 2))
    causal conv, time:        out [a, b) <- in [a - (k_t - 1), b)   (Step.need)

and read from the whole-input activation of the level below, **staged** between segments (on
the device while the resident bytes stay within the budget, in pinned host memory beyond it).
Going forward, a conv pads only the sides where the region touches the border (as the full
pass's padding does) and drops ``p`` rows on the others; at the end the result is cropped to the
core. So each core is computed from exactly the values the full network would use: the tiled
result equals the full pass up to floating-point summation order (conv and GroupNorm reductions
in another order). A pushed residual that ends a segment aliases the segment's output (no copy);
residuals are read with the same region as the activation.

Memory: the device holds the weights, one tile's working set (core + halo through one
segment), the staged activations up to ``budget`` bytes and the output; the rest waits on the
host. Passes: one per segment (~ the number of GroupNorms), over every tile.
"""

from __future__ import annotations

import itertools
import math
import weakref
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fastgen.vae.tiling import _attn_core, _collect, _gn_apply, _progress

HALO = 1  # latent positions of halo each side: the most any conv of these VAEs reads around a core


def min_tile() -> int:
    """The smallest tile (latent positions per side) the halo layout accepts: a core of one plus the halo."""
    return 1 + 2 * HALO


Region = list  # [(a, b)] per axis


class Step:
    """A step the engine runs on regions (``("step", s)`` in a step list); defaults: pointwise.

    ``axis`` counts the activation's axes after the channels (0 = ``T`` of a video, or ``H`` of an
    image); ``n`` is the step's input size along it.
    """

    spatial = False  # reads a halo (``need`` widens the region): at most one such step per segment
    barrier = False  # a segment must start here (besides GroupNorms)
    norm = None  # a GroupNorm whose whole-input statistics ``run`` receives as ``stats``

    def size(self, axis: int, n: int) -> int:
        """The output size along ``axis``."""
        return n

    def need(self, axis: int, a: int, b: int, n: int) -> tuple[int, int]:
        """The input range along ``axis`` that output range ``[a, b)`` reads."""
        return a, b

    def run(self, h: Tensor, reg: Region, lvl: list[int], stats) -> tuple[Tensor, Region]:
        """``h``: the input region ``reg`` of a level of size ``lvl`` -> (output, its region)."""
        raise NotImplementedError


# ----------------------------------------------------------------------------- segments and geometry


def _spatial(op: tuple, global_attention: bool) -> bool:
    if op[0] == "conv":
        return op[1] is not None and op[1].kernel_size[0] > 1
    if op[0] == "step":
        return op[1].spatial
    return op[0] == "down" or (op[0] == "attn" and global_attention)


def _norm(op: tuple):
    """The GroupNorm whose statistics must be gathered before ``op`` runs, or ``None``."""
    return op[1] if op[0] == "gn" else op[1].norm if op[0] == "step" else None


def _barrier(op: tuple, global_attention: bool) -> bool:
    if op[0] == "step":
        return op[1].barrier or op[1].norm is not None
    return op[0] in ("gn", "up") or (op[0] == "attn" and global_attention)


def split_segments(steps: list, global_attention: bool) -> list[list]:
    """Cut ``steps`` into segments (module docstring): each holds at most one spatial step."""
    segments, cur, has_spatial = [], [], False
    for op in steps:
        if cur and (_barrier(op, global_attention) or (has_spatial and _spatial(op, global_attention))):
            segments.append(cur)
            cur, has_spatial = [], False
        cur.append(op)
        has_spatial = has_spatial or _spatial(op, global_attention)
    segments.append(cur)
    return segments


def _image_axis(axis: int, nd: int) -> bool:
    """Whether ``axis`` is one of the last two (H, W): the built-in steps act on those only."""
    return axis >= nd - 2


def _size_after(op: tuple, axis: int, n: int, nd: int) -> int:
    if op[0] == "step":
        return op[1].size(axis, n)
    if not _image_axis(axis, nd):
        return n
    if op[0] == "up":
        return 2 * n
    if op[0] == "down":
        return (n - 2) // 2 + 1  # pad (0, 1), 3x3 stride 2: diffusers' Downsample2D
    return n


def _check_conv(conv) -> tuple[int, int]:
    k, p = conv.kernel_size[0], conv.padding[0]
    if (conv.kernel_size[0] != conv.kernel_size[1] or conv.stride != (1, 1) or k != 2 * p + 1
            or getattr(conv, "padding_mode", "zeros") != "zeros" or conv.dilation != (1, 1)):
        raise ValueError(f"tiled VAE (halo layout): unsupported conv {conv} (expected k x k, stride 1, 'same' zero padding)")
    return k, p


def _need(seg: list, sizes: list[int], axis: int, nd: int, a: int, b: int) -> tuple[int, int]:
    """The input range ``[a', b')`` along ``axis`` that the segment needs to produce ``[a, b)``."""
    for op, size in zip(reversed(seg), reversed(sizes[:-1])):  # size: the op's input size
        kind = op[0]
        if kind == "step":
            a, b = op[1].need(axis, a, b, size)
        elif not _image_axis(axis, nd):
            continue
        elif kind == "conv" and op[1] is not None and op[1].kernel_size[0] > 1:
            p = op[1].padding[0]
            a, b = max(a - p, 0), min(b + p, size)
        elif kind == "down":
            a, b = 2 * a, min(2 * b + 1, size)
        elif kind == "up":
            a, b = a // 2, -(-b // 2)
    return a, b


def _level_bounds(bounds: list[int], size: int, lat: int) -> list[int]:
    """The latent-level core bounds mapped to a level of ``size`` (exact scaling for decode levels)."""
    return [(b * size * 2 + lat) // (2 * lat) for b in bounds]


def _index(reg: Region) -> tuple:
    return (slice(None), slice(None)) + tuple(slice(a, b) for a, b in reg)


# ----------------------------------------------------------------------------- staging


class _Staging:
    """Whole-input activations between segments: on the device while the resident bytes stay within
    ``budget``, beyond it in pinned host memory (copies on the current stream; one sync per pass)."""

    def __init__(self, device: torch.device, budget: float) -> None:
        self.device, self.budget, self.resident = device, budget, 0
        self.host = device.type == "cuda" and budget < float("inf")

    def _release(self, nbytes: int) -> None:
        self.resident -= nbytes

    def new(self, shape: tuple, dtype: torch.dtype, force_device: bool = False) -> Tensor:
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if force_device or not self.host or self.resident + nbytes <= self.budget:
            t = torch.empty(shape, dtype=dtype, device=self.device)
            self.resident += nbytes
            weakref.finalize(t, self._release, nbytes)
            return t
        try:
            return torch.empty(shape, dtype=dtype, pin_memory=True)
        except RuntimeError:  # out of page-locked memory: pageable host memory (synchronous copies)
            return torch.empty(shape, dtype=dtype)

    def read(self, buf: Tensor, reg: Region) -> Tensor:
        v = buf[_index(reg)]
        return v if v.device == self.device else v.to(self.device, non_blocking=True)

    @staticmethod
    def write(buf: Tensor, reg: Region, h: Tensor) -> None:
        buf[_index(reg)].copy_(h, non_blocking=True)

    def barrier(self) -> None:
        if self.host:
            torch.cuda.current_stream(self.device).synchronize()


# ----------------------------------------------------------------------------- the engine


def _frames(h: Tensor) -> Tensor:
    """``(N, C, T, H, W)`` -> ``(N * T, C, H, W)`` (per-frame 2-D ops); 4-D as it is."""
    return h if h.dim() == 4 else h.transpose(1, 2).flatten(0, 1)


def _unframes(y: Tensor, like: Tensor) -> Tensor:
    return y if like.dim() == 4 else y.unflatten(0, (like.shape[0], like.shape[2])).transpose(1, 2)


def _conv_same(conv, h: Tensor, reg: Region, lvl: list[int]) -> tuple[Tensor, Region]:
    """A 'same'-padded k x k conv (per frame on videos) on a region: zero padding only where the
    region meets the border."""
    k, p = _check_conv(conv)
    if k == 1:
        return _unframes(conv(_frames(h)), h), reg
    (y0, y1), (x0, x1), (ny, nx) = reg[-2], reg[-1], lvl[-2:]
    pads = (p if x0 == 0 else 0, p if x1 == nx else 0, p if y0 == 0 else 0, p if y1 == ny else 0)
    out = _unframes(F.conv2d(F.pad(_frames(h), pads), conv.weight, conv.bias, 1, 0, 1, conv.groups), h)
    ry = (y0 + p - pads[2], y1 - p + pads[3])
    rx = (x0 + p - pads[0], x1 - p + pads[1])
    return out, reg[:-2] + [ry, rx]


def _down(conv, h: Tensor, reg: Region, lvl: list[int]) -> tuple[Tensor, Region]:
    """diffusers' Downsample2D (pad right / bottom by one zero, 3x3 stride 2) on a region starting on
    even rows and columns (per frame on videos)."""
    (y0, y1), (x0, x1) = reg[-2], reg[-1]
    assert y0 % 2 == 0 and x0 % 2 == 0, reg
    pr, pb = int(x1 == lvl[-1]), int(y1 == lvl[-2])
    out = _unframes(conv(F.pad(_frames(h), (0, pr, 0, pb))), h)
    return out, reg[:-2] + [(y0 // 2, y0 // 2 + out.shape[-2]), (x0 // 2, x0 // 2 + out.shape[-1])]


def _run_segment(seg: list, h: Tensor, reg: Region, size: list[int], stack: list, shared, pushed: list,
                 alias: bool, out_size: list[int], core: Region, stage: _Staging, global_attention: bool):
    """One tile through one segment: returns ``(h, reg)``, ``h`` covering region ``reg`` of the output level."""
    lvl, local, pi, nd = list(size), list(stack), 0, len(size)
    for op in seg:
        kind = op[0]
        if kind == "conv":
            if op[1] is not None:
                h, reg = _conv_same(op[1], h, reg, lvl)
        elif kind == "gn":
            h = _gn_apply(h, op[1], shared, op[2])
        elif kind == "step":
            h, reg = op[1].run(h, reg, lvl, shared)
        elif kind == "push":
            c = h[_index([(c0 - r0, c1 - r0) for (c0, c1), (r0, _) in zip(core, reg)])]
            if not (alias and pi == len(pushed) - 1):
                if pushed[pi] is None:
                    pushed[pi] = stage.new((h.shape[0], h.shape[1]) + tuple(out_size), h.dtype)
                stage.write(pushed[pi], core, c)
            pi += 1
        elif kind == "add":
            res = stage.read(local.pop(), reg)
            h = (res if op[1] is None else op[1](res)) + h
        elif kind == "attn":
            h = _attn_core(op[1], h, shared if global_attention else None)
        elif kind == "up":
            if nd != 2:
                raise ValueError("tiled VAE (halo layout): 'up' is the 2-D nearest x2 of image VAEs")
            h = F.interpolate(h, scale_factor=2.0, mode="nearest")
            reg = [(2 * a, 2 * b) for a, b in reg]
        elif kind == "down":
            h, reg = _down(op[1], h, reg, lvl)
        else:  # pragma: no cover
            raise AssertionError(kind)
        lvl = [_size_after(op, ax, n, nd) for ax, n in enumerate(lvl)]
    return h, reg


def run_halo(steps: list, x: Tensor, lat: tuple, cores: list[list[int]], budget: float, progress, desc: str,
             global_attention: bool = True) -> Tensor:
    """Run ``steps`` on ``x`` (N, C, *axes) tile by tile, losslessly (module docstring).

    ``lat``: the latent-level size per axis; ``cores``: per axis, the core bounds there (0 .. size).
    Returns the final activation on ``x``'s device, in the dtype of the last step's output.
    """
    nd = x.dim() - 2
    assert len(lat) == len(cores) == nd, (lat, len(cores), x.shape)
    segments = split_segments(steps, global_attention)
    dev, stage = x.device, _Staging(x.device, budget)
    size = list(x.shape[2:])
    cur, stack, shared = x, [], None
    ntiles = math.prod(len(c) - 1 for c in cores)
    bar = _progress(len(segments) * ntiles, ntiles, progress, desc)
    for si, seg in enumerate(segments):
        sizes = [[n] for n in size]  # per axis: the size before each op, then after the last
        for op in seg:
            for ax in range(nd):
                sizes[ax].append(_size_after(op, ax, sizes[ax][-1], nd))
        out_size = [s[-1] for s in sizes]
        bounds = [_level_bounds(c, out_size[ax], lat[ax]) for ax, c in enumerate(cores)]
        last = si == len(segments) - 1
        nxt = None if last else segments[si + 1][0]
        nxt_norm = None if nxt is None else _norm(nxt)
        nxt_attn = nxt[1] if nxt is not None and nxt[0] == "attn" and global_attention else None
        n_push = sum(op[0] == "push" for op in seg)
        alias = seg[-1][0] == "push"
        pushed: list[Optional[Tensor]] = [None] * n_push
        out, acc = None, []
        for idx in itertools.product(*(range(len(b) - 1) for b in bounds)):
            core = [(b[i], b[i + 1]) for b, i in zip(bounds, idx)]
            reg = [_need(seg, sizes[ax], ax, nd, *core[ax]) for ax in range(nd)]
            h, reg = _run_segment(seg, stage.read(cur, reg), reg, size, stack, shared, pushed, alias, out_size,
                                  core, stage, global_attention)
            assert all(r0 <= c0 and r1 >= c1 for (c0, c1), (r0, r1) in zip(core, reg)), (core, reg)
            c = h[_index([(c0 - r0, c1 - r0) for (c0, c1), (r0, _) in zip(core, reg)])]
            if out is None:
                out = stage.new((h.shape[0], h.shape[1]) + tuple(out_size), h.dtype, force_device=last)
            stage.write(out, core, c)
            acc = _collect(nxt_norm, nxt_attn, c, acc)
            del h, c
            if bar is not None:
                bar.update(1)
        stage.barrier()
        for op in seg:  # the segment's stack effect, now that the pushed activations are complete
            if op[0] == "add":
                stack.pop()
        stack += pushed[:-1] + [out] if alias else pushed
        cur, size = out, out_size
        if nxt_norm is not None:
            shared = acc[0]
        elif nxt_attn is not None:
            shared = tuple(torch.cat(kv, dim=2) for kv in zip(*acc))
        del acc
    if bar is not None:
        bar.close()
    return cur if cur.device == dev else cur.to(dev)


def core_bounds(total: int, tile: int, halo: int = HALO) -> list[int]:
    """Core bounds partitioning ``range(total)`` into ``ceil(total / (tile - 2 * halo))`` near-equal cores."""
    n = math.ceil(total / (tile - 2 * halo))
    return [(k * total * 2 + n) // (2 * n) for k in range(n + 1)]


__all__ = ["run_halo", "split_segments", "core_bounds", "min_tile", "HALO", "Step"]
