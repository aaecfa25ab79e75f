"""Lossless tiled VAE encode / decode: tile cores that partition the image at every layer.

The network is the flat step list of :mod:`fastgen.vae.tiling` (``conv``, ``gn``, ``push``,
``add``, ``attn``, ``up``, ``down``), cut into **segments** that each hold at most one spatial
step (a ``k x k`` conv with ``k > 1``, a stride-2 ``down`` conv, a global ``attn``) and start
wherever the whole image must be seen first:

- before every ``gn``: its statistics, per (sample, group), merged in float64 over every tile's
  core (Chan et al.: ``n = n_a + n_b``, ``d = mean_b - mean_a``, ``mean = mean_a + d n_b / n``,
  ``M2 = M2_a + M2_b + d^2 n_a n_b / n``, ``var = M2 / n``);
- before every global ``attn``: the keys and values of every core;
- before every ``up`` and every second spatial step.

Every level (resolution) of the network is partitioned into the same grid of ``ny x nx`` tile
**cores**: at a level of size ``L`` the bounds are ``round(b * L / L_lat)`` of the latent-level
bounds ``b``. A segment's output for a tile is exactly its core; the input region it reads is
the core mapped backwards through the segment's steps (the **halo**)::

    conv k x k, padding p:   out [a, b) <- in [a - p, b + p)        (clipped to [0, L))
    down (pad 0|1, stride 2): out [a, b) <- in [2a, 2b + 1)
    up (nearest x2):          out [a, b) <- in [floor(a / 2), ceil(b / 2))

and read from the whole-image activation of the level below, **staged** between segments (on
the device while the resident bytes stay within the budget, in pinned host memory beyond it).
Going forward, a conv zero-pads only the sides where the region touches the image border
(as the full image's padding does) and drops ``p`` rows on the others; at the end the result
is cropped to the core. So each core is computed from exactly the values the full network
would use: the tiled result equals the full decode up to floating-point summation order (conv
and GroupNorm reductions in another order). A pushed residual that ends a segment aliases the
segment's output (no copy); residuals are read with the same region as the activation.

Memory: the device holds the weights, one tile's working set (core + halo through one
segment), the staged activations up to ``budget`` bytes and the output; the rest waits on the
host. Passes: one per segment (~ the number of GroupNorms), over every tile.
"""

from __future__ import annotations

import math
import weakref
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fastgen.vae.tiling import _attn_core, _gn_apply, _group_stats, _merge, _progress, _tokens

HALO = 1  # latent positions of halo each side: the most any conv of these VAEs reads around a core


def min_tile() -> int:
    """The smallest tile (latent positions per side) the halo layout accepts: a core of one plus the halo."""
    return 1 + 2 * HALO


# ----------------------------------------------------------------------------- segments and geometry


def _spatial(op: tuple, global_attention: bool) -> bool:
    if op[0] == "conv":
        return op[1] is not None and op[1].kernel_size[0] > 1
    return op[0] == "down" or (op[0] == "attn" and global_attention)


def split_segments(steps: list, global_attention: bool) -> list[list]:
    """Cut ``steps`` into segments (module docstring): each holds at most one spatial step."""
    segments, cur, has_spatial = [], [], False
    for op in steps:
        barrier = op[0] in ("gn", "up") or (op[0] == "attn" and global_attention)
        if cur and (barrier or (has_spatial and _spatial(op, global_attention))):
            segments.append(cur)
            cur, has_spatial = [], False
        cur.append(op)
        has_spatial = has_spatial or _spatial(op, global_attention)
    segments.append(cur)
    return segments


def _size_after(op: tuple, size: int) -> int:
    if op[0] == "up":
        return 2 * size
    if op[0] == "down":
        return (size - 2) // 2 + 1  # pad (0, 1), 3x3 stride 2: diffusers' Downsample2D
    return size


def _check_conv(conv) -> tuple[int, int]:
    k, p = conv.kernel_size[0], conv.padding[0]
    if (conv.kernel_size[0] != conv.kernel_size[1] or conv.stride != (1, 1) or k != 2 * p + 1
            or getattr(conv, "padding_mode", "zeros") != "zeros" or conv.dilation != (1, 1)):
        raise ValueError(f"tiled VAE (halo layout): unsupported conv {conv} (expected k x k, stride 1, 'same' zero padding)")
    return k, p


def _need(seg: list, sizes: list[int], a: int, b: int) -> tuple[int, int]:
    """The input region ``[a', b')`` (one axis) that the segment needs to produce ``[a, b)``."""
    for op, size in zip(reversed(seg), reversed(sizes[:-1])):  # size: the op's input size
        kind = op[0]
        if kind == "conv" and op[1] is not None and op[1].kernel_size[0] > 1:
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


# ----------------------------------------------------------------------------- staging


class _Staging:
    """Whole-image activations between segments: on the device while the resident bytes stay within
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

    def read(self, buf: Tensor, ry: tuple[int, int], rx: tuple[int, int]) -> Tensor:
        v = buf[:, :, ry[0]:ry[1], rx[0]:rx[1]]
        return v if v.device == self.device else v.to(self.device, non_blocking=True)

    @staticmethod
    def write(buf: Tensor, ry: tuple[int, int], rx: tuple[int, int], h: Tensor) -> None:
        buf[:, :, ry[0]:ry[1], rx[0]:rx[1]].copy_(h, non_blocking=True)

    def barrier(self) -> None:
        if self.host:
            torch.cuda.current_stream(self.device).synchronize()


# ----------------------------------------------------------------------------- the engine


def _conv_same(conv, h: Tensor, ry: tuple, rx: tuple, size: tuple) -> tuple[Tensor, tuple, tuple]:
    """A 'same'-padded k x k conv on a region: zero padding only where the region meets the border."""
    k, p = _check_conv(conv)
    if k == 1:
        return conv(h), ry, rx
    pads = (p if rx[0] == 0 else 0, p if rx[1] == size[1] else 0, p if ry[0] == 0 else 0, p if ry[1] == size[0] else 0)
    h = F.conv2d(F.pad(h, pads), conv.weight, conv.bias, 1, 0, 1, conv.groups)
    ry = (ry[0] + p - pads[2], ry[1] - p + pads[3])
    rx = (rx[0] + p - pads[0], rx[1] - p + pads[1])
    return h, ry, rx


def _down(conv, h: Tensor, ry: tuple, rx: tuple, size: tuple) -> tuple[Tensor, tuple, tuple]:
    """diffusers' Downsample2D (pad right / bottom by one zero, 3x3 stride 2) on a region starting on even rows."""
    assert ry[0] % 2 == 0 and rx[0] % 2 == 0, (ry, rx)
    pr, pb = int(rx[1] == size[1]), int(ry[1] == size[0])
    h = conv(F.pad(h, (0, pr, 0, pb)))
    return h, (ry[0] // 2, ry[0] // 2 + h.shape[2]), (rx[0] // 2, rx[0] // 2 + h.shape[3])


def _kv(a, core: Tensor) -> tuple[Tensor, Tensor]:
    heads = int(getattr(a, "heads", 1))
    return _tokens(a.to_k, core, heads), _tokens(a.to_v, core, heads)


def run_halo(steps: list, x: Tensor, lat_hw: tuple[int, int], cores_y: list[int], cores_x: list[int],
             budget: float, progress, desc: str, global_attention: bool = True) -> Tensor:
    """Run ``steps`` on ``x`` (N, C, H, W) tile by tile, losslessly (module docstring).

    ``lat_hw``: the latent-level size; ``cores_y`` / ``cores_x``: core bounds there (0 .. h, 0 .. w).
    Returns the final activation on ``x``'s device, in the dtype of the last step's output.
    """
    segments = split_segments(steps, global_attention)
    dev, stage = x.device, _Staging(x.device, budget)
    size = tuple(x.shape[-2:])
    cur, stack, shared = x, [], None
    ntiles = (len(cores_y) - 1) * (len(cores_x) - 1)
    bar = _progress(len(segments) * ntiles, ntiles, progress, desc)
    for si, seg in enumerate(segments):
        sizes_y, sizes_x = [size[0]], [size[1]]
        for op in seg:
            sizes_y.append(_size_after(op, sizes_y[-1]))
            sizes_x.append(_size_after(op, sizes_x[-1]))
        out_size = (sizes_y[-1], sizes_x[-1])
        by, bx = _level_bounds(cores_y, out_size[0], lat_hw[0]), _level_bounds(cores_x, out_size[1], lat_hw[1])
        last = si == len(segments) - 1
        nxt = None if last else segments[si + 1][0]
        n_push = sum(op[0] == "push" for op in seg)
        alias = seg[-1][0] == "push"
        pushed: list[Optional[Tensor]] = [None] * n_push
        out, acc = None, []
        for ty in range(len(by) - 1):
            for tx in range(len(bx) - 1):
                cy, cx = (by[ty], by[ty + 1]), (bx[tx], bx[tx + 1])
                ry, rx = _need(seg, sizes_y, *cy), _need(seg, sizes_x, *cx)
                h, lvl, local, pi = stage.read(cur, ry, rx), size, list(stack), 0
                for op in seg:
                    kind = op[0]
                    if kind == "conv":
                        if op[1] is not None:
                            h, ry, rx = _conv_same(op[1], h, ry, rx, lvl)
                    elif kind == "gn":
                        h = _gn_apply(h, op[1], shared, op[2])
                    elif kind == "push":
                        oy, ox = cy[0] - ry[0], cx[0] - rx[0]
                        core = h[:, :, oy:oy + cy[1] - cy[0], ox:ox + cx[1] - cx[0]]
                        if not (alias and pi == n_push - 1):
                            if pushed[pi] is None:
                                pushed[pi] = stage.new((h.shape[0], h.shape[1]) + out_size, h.dtype)
                            stage.write(pushed[pi], cy, cx, core)
                        pi += 1
                    elif kind == "add":
                        res = stage.read(local.pop(), ry, rx)
                        h = (res if op[1] is None else op[1](res)) + h
                    elif kind == "attn":
                        h = _attn_core(op[1], h, shared if global_attention else None)
                    elif kind == "up":
                        h = F.interpolate(h, scale_factor=2.0, mode="nearest")
                        ry, rx = (2 * ry[0], 2 * ry[1]), (2 * rx[0], 2 * rx[1])
                    elif kind == "down":
                        h, ry, rx = _down(op[1], h, ry, rx, lvl)
                    else:  # pragma: no cover
                        raise AssertionError(kind)
                    lvl = (_size_after(op, lvl[0]), _size_after(op, lvl[1]))
                oy, ox = cy[0] - ry[0], cx[0] - rx[0]
                assert oy >= 0 and ox >= 0 and ry[1] >= cy[1] and rx[1] >= cx[1], (cy, cx, ry, rx)
                core = h[:, :, oy:oy + cy[1] - cy[0], ox:ox + cx[1] - cx[0]]
                if out is None:
                    out = stage.new((h.shape[0], h.shape[1]) + out_size, h.dtype, force_device=last)
                stage.write(out, cy, cx, core)
                if nxt is not None and nxt[0] == "gn":
                    acc = [_merge(acc[0] if acc else None, _group_stats(core, nxt[1].num_groups))]
                elif nxt is not None and nxt[0] == "attn" and global_attention:
                    acc.append(_kv(nxt[1], core))
                del h, core
                if bar is not None:
                    bar.update(1)
        stage.barrier()
        for op in seg:  # the segment's stack effect, now that the pushed activations are complete
            if op[0] == "add":
                stack.pop()
        stack += pushed[:-1] + [out] if alias else pushed
        cur, size = out, out_size
        if nxt is not None and nxt[0] == "gn":
            shared = acc[0]
        elif nxt is not None and nxt[0] == "attn" and global_attention:
            shared = tuple(torch.cat(kv, dim=2) for kv in zip(*acc))
        del acc
    if bar is not None:
        bar.close()
    return cur if cur.device == dev else cur.to(dev)


def core_bounds(total: int, tile: int) -> list[int]:
    """Core bounds partitioning ``range(total)`` into ``ceil(total / (tile - 2 * HALO))`` near-equal cores."""
    n = math.ceil(total / (tile - 2 * HALO))
    return [(k * total * 2 + n) // (2 * n) for k in range(n + 1)]


__all__ = ["run_halo", "split_segments", "core_bounds", "min_tile", "HALO"]
