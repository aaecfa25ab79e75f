"""Tiled VAE encode / decode: any image size, bounded memory, optionally colour-consistent.

Both functions take a :class:`fastgen.vae.AutoencoderKL` or a ``diffusers.AutoencoderKL``
(the same module names, so one code path serves both) and run under ``torch.no_grad()``.
Sizes are in latent positions for decode and in pixels for encode; ``f`` is the VAE's
spatial factor ``2 ** (len(block_out_channels) - 1)``.

**Layout 1, diffusers'** (``consistent_colors=False``). Tiles of ``T`` latent positions start
every ``step = int(T * (1 - overlap))``; each decoded tile (``T * f`` pixels) is blended with
the tile above and the tile to its left over ``E = int(T * f * overlap)`` rows / columns::

    b[y] = a[-E + y] * (1 - r(y / E)) + b[y] * r(y / E),   y = 0 .. E-1

with ``r(t) = t`` (``blend="linear"``: diffusers' ``blend_v`` / ``blend_h``, so the result is
diffusers' ``tiled_decode`` at ``tile_latent_min_size=T``, ``tile_overlap_factor=overlap``) or
``r(t) = (1 - cos(pi t)) / 2`` (``blend="cosine"``), then cropped to ``T * f - E``. Each tile is
normalized with its own GroupNorm statistics, which is what makes tiles differ in tone.
Besides the output, only the current row of tiles and the bottom edges of the row above are
kept (diffusers keeps every decoded tile until the end).

**Layout 3, lossless** (``consistent_colors=True``, the default ``halo=True``): tile cores that
partition every level of the network, halos read from whole-image staged activations before
every conv, whole-image GroupNorm statistics, global attention: equal to the full pass up to
summation order. It lives in :mod:`fastgen.vae.halo`; this module dispatches to it.

**Layout 2, colour-consistent with blending** (``consistent_colors=True, halo=False``). The latent is cut into a grid of
cores (at most ``T - 2m`` wide, ``m = round(T * overlap / 2)``); a tile is its core plus a margin
of ``m`` on every inner side. The network is run as a flat list of steps (conv, GroupNorm(+SiLU),
push residual, add residual, attention, up/down-sample) over all tiles, segment by segment: a
segment starts at a GroupNorm whose statistics are first accumulated over every tile's **core**
(so the cores partition the image and nothing is counted twice), per sample and group, merged in
float64 (Chan et al.'s parallel variance)::

    n = n_a + n_b,  d = mean_b - mean_a,  mean = mean_a + d n_b / n,  M2 = M2_a + M2_b + d^2 n_a n_b / n

then every tile is normalized with ``var = M2 / n``, exactly as the full image is. The remaining
difference from a full decode is the receptive field cut at tile borders (absorbed by the
margin) and the mid-block attention, which attends within a tile unless ``global_attention=True``
(then the keys and values of every core are gathered at a barrier like the statistics, and
each tile's queries attend to the whole image). Outputs are blended with
weights ``r`` ramping over the ``2m`` overlap of neighbouring tiles (the weights sum to 1).
Between segments the tile activations (and pushed residuals) wait on the device up to a
budget and in pinned host memory beyond it (``offload``), so device memory holds the
budget, one tile's working set and the output: bounded by the tile, not by the image.

An input no larger than one tile is encoded / decoded whole: exactly ``vae.decode`` /
``vae.encode``, whatever the options.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fastgen.vae.autoencoder_kl import DiagonalGaussianDistribution, attention

BLENDS = ("linear", "cosine")
PROGRESS_MIN_TILES = 16  # progress=None shows a bar above this many tiles


# ----------------------------------------------------------------------------- the VAE, either kind


@dataclass
class _Parts:
    encoder: Any
    decoder: Any
    quant_conv: Any
    post_quant_conv: Any
    in_channels: int
    latent_channels: int
    factor: int
    sample_size: int


def _parts(vae: Any) -> _Parts:
    cfg = getattr(vae, "config", None)
    if cfg is None or not hasattr(vae, "decoder") or not hasattr(vae, "encoder"):
        raise TypeError(
            f"expected a fastgen.vae.AutoencoderKL or a diffusers AutoencoderKL, got {type(vae).__name__}"
        )
    sample = getattr(cfg, "sample_size", 512)
    sample = int(sample[0] if isinstance(sample, (list, tuple)) else sample)
    return _Parts(
        encoder=vae.encoder, decoder=vae.decoder,
        quant_conv=getattr(vae, "quant_conv", None) if getattr(cfg, "use_quant_conv", True) else None,
        post_quant_conv=getattr(vae, "post_quant_conv", None) if getattr(cfg, "use_post_quant_conv", True) else None,
        in_channels=int(cfg.in_channels), latent_channels=int(cfg.latent_channels),
        factor=2 ** (len(cfg.block_out_channels) - 1), sample_size=sample,
    )


def _check_input(x: Any, channels: int, what: str, name: str, module: Any, axes: tuple = ("H", "W")) -> None:
    """``x``: a non-empty tensor ``(N, channels, *axes)`` (an image's ``("H", "W")``, a video's ``("T", "H", "W")``)
    with ``module``'s dtype and device."""
    nd = 2 + len(axes)
    layout = f"(N, {channels}, {', '.join(axes)})"
    if not isinstance(x, Tensor) or x.dim() != nd:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{what}: {name} must be a {nd}-D tensor {layout}, got {shape}")
    if x.shape[1] != channels:
        kind = "latent_channels" if name == "latents" else "in_channels"
        hint = ". Is this latent from another VAE (4-channel SD/SDXL vs 16-channel SD3/Flux)?" if nd == 4 else ""
        raise ValueError(
            f"{what}: {name} have {x.shape[1]} channels but the {'VAE' if nd == 4 else 'video VAE'} expects "
            f"{kind}={channels}, i.e. a tensor of shape {layout}; got {tuple(x.shape)}{hint}"
        )
    if x.numel() == 0:
        raise ValueError(f"{what}: {name} must not be empty, got shape {tuple(x.shape)}")
    w = next(module.parameters(), None)
    if w is not None and (w.dtype != x.dtype or w.device != x.device):
        raise ValueError(
            f"{what}: {name} are {x.dtype} on {x.device} but the VAE's weights are {w.dtype} on {w.device}; "
            f"move one to the other (e.g. {name}.to(device=..., dtype=...))"
        )


def _positive_int(what: str, name: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{what}: {name} must be a positive int, got {v!r}")
    return v


def _check_options(what: str, tile_size: Any, overlap: float, blend: str, pair: bool = False) -> tuple:
    """Checks ``blend``, ``overlap`` and ``tile_size``: a positive int or, with ``pair`` (video tiling),
    also a ``(height, width)`` pair of them. Returns the sides: ``(t,)``, or ``(h, w)`` with ``pair``."""
    if blend not in BLENDS:
        raise ValueError(f"{what}: blend must be one of {BLENDS}, got {blend!r}")
    sides = tuple(tile_size) if pair and isinstance(tile_size, (tuple, list)) else (tile_size,) * (1 + pair)
    if len(sides) != 1 + pair:
        raise ValueError(f"{what}: tile_size is an int or a (height, width) pair, got {tile_size!r}")
    for v in sides:
        _positive_int(what, "tile_size", v)
    if not 0.0 <= float(overlap) < 0.5:
        raise ValueError(f"{what}: overlap is a fraction of the tile in [0, 0.5), got {overlap!r}")
    return sides


def _ramp(n: int, blend: str, device, offset: float = 0.0) -> Tensor:
    """``r((i + offset) / n)`` for i in 0..n-1, float32; ``r`` linear or cosine."""
    t = (torch.arange(n, dtype=torch.float64) + offset) / n
    if blend == "cosine":
        t = 0.5 - 0.5 * torch.cos(math.pi * t)
    return t.to(device=device, dtype=torch.float32)


def _progress(total: int, tiles: int, progress: Optional[bool], desc: str):
    show = tiles > PROGRESS_MIN_TILES if progress is None else bool(progress)
    if not show:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm comes with diffusers / huggingface_hub
        return None
    return tqdm(total=total, desc=desc, unit="tile")


# ----------------------------------------------------------------------------- layout 1: diffusers'


def _blend_into(a: Tensor, b: Tensor, extent: int, dim: int, blend: str) -> None:
    """In place: the first ``e`` rows (dim 2) / columns (dim 3) of ``b`` blended with the last of ``a``."""
    e = min(a.shape[dim], b.shape[dim], extent)
    if e <= 0:
        return
    w = _ramp(e, blend, b.device)
    w = w.view(-1, 1) if dim == 2 else w.view(1, -1)
    head = b.narrow(dim, 0, e)
    head.copy_(a.narrow(dim, a.shape[dim] - e, e).float() * (1 - w) + head.float() * w)


def _diffusers_layout(x: Tensor, fn: Callable[[Tensor], Tensor], tile: int, step: int, extent: int,
                      limit: int, blend: str, bar) -> Tensor:
    """diffusers' tiling of ``x``'s last two dims, streaming: ``fn`` maps a tile to its output."""
    rows, above = [], None
    for i in range(0, x.shape[2], step):
        row, strips, left = [], [], None
        for jj, j in enumerate(range(0, x.shape[3], step)):
            t = fn(x[:, :, i:i + tile, j:j + tile])
            if above is not None:
                _blend_into(above[jj], t, extent, 2, blend)
            if left is not None:
                _blend_into(left, t, extent, 3, blend)
            if extent > 0:
                left = t[:, :, :, -extent:].clone()
                strips.append(t[:, :, -extent:, :].clone())
            row.append(t[:, :, :limit, :limit])
            if bar is not None:
                bar.update(1)
        above = strips
        rows.append(torch.cat(row, dim=3))
    return torch.cat(rows, dim=2)


# ----------------------------------------------------------------------------- layout 2: colour-consistent


@dataclass
class _Tile:
    core: tuple  # (y0, y1, x0, x1) in latent units
    ext: tuple  # (y0, y1, x0, x1) in latent units
    x: Any = None  # current activation
    stack: Any = None  # pushed residuals


def _axis(total: int, tile: int, m: int) -> tuple[list[tuple[int, int]], int]:
    """Cores ``[(c0, c1)]`` partitioning ``range(total)`` and the margin used."""
    if total <= tile:
        return [(0, total)], 0
    n = math.ceil(total / max(tile - 2 * m, 1))
    bounds = [round(k * total / n) for k in range(n + 1)]
    cores = list(zip(bounds[:-1], bounds[1:]))
    return cores, min(m, min(c1 - c0 for c0, c1 in cores) // 2)


def _axis_weights(c0: int, c1: int, e0: int, e1: int, m: int, total: int, s: int, blend: str, device) -> Tensor:
    """Blend weights along one axis for the pixels ``[e0 * s, e1 * s)`` of a tile with core ``[c0, c1)``."""
    w = torch.ones((e1 - e0) * s, device=device, dtype=torch.float32)
    if m == 0:
        return w
    r = _ramp(2 * m * s, blend, device, offset=0.5)
    if c0 > 0:  # ramp up over [c0 - m, c0 + m)
        w[: 2 * m * s] *= r
    if c1 < total:  # ramp down over [c1 - m, c1 + m)
        w[(c1 - m - e0) * s:] *= 1 - r
    return w


def _resnet_steps(r: Any) -> list:
    return [("push",), ("gn", r.norm1, True), ("conv", r.conv1), ("gn", r.norm2, True), ("conv", r.conv2),
            ("add", getattr(r, "conv_shortcut", None))]


def _mid_steps(mid: Any) -> list:
    steps = _resnet_steps(mid.resnets[0])
    if getattr(mid, "attentions", None) is not None and len(mid.attentions) > 0 and mid.attentions[0] is not None:
        a = mid.attentions[0]
        steps += [("push",), ("gn", a.group_norm, False), ("attn", a), ("add", None)]
    return steps + _resnet_steps(mid.resnets[1])


def decoder_steps(p: _Parts) -> list:
    """The decoder (with ``post_quant_conv``) as a flat list of steps; see the module docstring."""
    d = p.decoder
    steps = [("conv", p.post_quant_conv)] if p.post_quant_conv is not None else []
    steps += [("conv", d.conv_in)] + _mid_steps(d.mid_block)
    for b in d.up_blocks:
        for r in b.resnets:
            steps += _resnet_steps(r)
        if getattr(b, "upsamplers", None):
            steps += [("up",), ("conv", b.upsamplers[0].conv)]
    return steps + [("gn", d.conv_norm_out, True), ("conv", d.conv_out)]


def encoder_steps(p: _Parts) -> list:
    """The encoder (with ``quant_conv``) as a flat list of steps."""
    e = p.encoder
    steps = [("conv", e.conv_in)]
    for b in e.down_blocks:
        for r in b.resnets:
            steps += _resnet_steps(r)
        if getattr(b, "downsamplers", None):
            steps += [("down", b.downsamplers[0].conv)]
    steps += _mid_steps(e.mid_block) + [("gn", e.conv_norm_out, True), ("conv", e.conv_out)]
    return steps + ([("conv", p.quant_conv)] if p.quant_conv is not None else [])


ATTN_CHUNK_ELEMENTS = 2**26  # queries per chunk x keys: bounds the score matrix of a non-fused SDPA (256 MiB fp32)


def _tokens(lin: Any, h: Tensor, heads: int) -> Tensor:
    """``(N, C, h, w)`` -> ``lin`` over channels -> ``(N, heads, h * w, C / heads)``."""
    n, c = h.shape[:2]
    t = lin(h.reshape(n, c, -1).transpose(1, 2))
    return t.view(n, t.shape[1], heads, -1).transpose(1, 2)


def _attn_core(a: Any, h: Tensor, kv: Optional[tuple[Tensor, Tensor]] = None) -> Tensor:
    """Attention without its norm and residual (fastgen's or diffusers' module: same names).

    ``kv``: keys and values ``(N, heads, L, d)`` of the whole image (global attention); ``None``:
    the tile attends to itself. Queries go in chunks so that no score matrix passes 2^28 elements.
    """
    n, c, hh, ww = h.shape
    heads = int(getattr(a, "heads", 1))
    q = _tokens(a.to_q, h, heads)
    k, v = kv if kv is not None else (_tokens(a.to_k, h, heads), _tokens(a.to_v, h, heads))
    step = max(1, ATTN_CHUNK_ELEMENTS // max(k.shape[2] * heads * n, 1))
    o = torch.cat([attention(qc, k, v) for qc in q.split(step, dim=2)], dim=2) if q.shape[2] > step \
        else attention(q, k, v)
    o = a.to_out[0](o.transpose(1, 2).reshape(n, hh * ww, c).to(h.dtype))
    return o.transpose(1, 2).reshape(n, c, hh, ww).contiguous()


def _group_stats(x: Tensor, groups: int) -> tuple[int, Tensor, Tensor]:
    """(count, mean, M2) per (sample, group) of ``x`` (N, C, *axes): fp32 per tile, returned as float64."""
    v = x if x.dtype in (torch.float32, torch.float64) else x.float()
    v = v.unflatten(1, (groups, -1))  # a view, also of a cropped (strided) core: no copy
    var, mean = torch.var_mean(v, dim=tuple(range(2, v.dim())), correction=0)
    cnt = v[0, 0].numel()
    return cnt, mean.double(), var.double() * cnt


def _merge(acc, new):
    if acc is None:
        return new
    na, ma, m2a = acc
    nb, mb, m2b = new
    n = na + nb
    d = mb - ma
    return n, ma + d * (nb / n), m2a + m2b + d.square() * (na * nb / n)


def _apply_backend(x: Tensor, norm: Any) -> str:
    """``"triton"`` when ``fastgen.backend.resolve`` picks the Triton GroupNorm for this step (the
    module's ``backend``, else the ``fastgen.backend`` default) and its check serves ``x``;
    otherwise ``"torch"``: the CUDA C++ extension has no apply-only entry, and a backend that
    cannot serve the apply step leaves it to the reference, which computes the same numbers."""
    from fastgen import backend as fb

    try:
        name = fb.resolve("group_norm", getattr(norm, "backend", "auto"), x.device, call=(x, norm.num_groups))
    except fb.BackendUnavailableError:
        return "torch"
    return "triton" if name == "triton" else "torch"


def _gn_apply(x: Tensor, norm: Any, stats, silu: bool) -> Tensor:
    """GroupNorm (+ SiLU) of ``x`` with given (count, mean, M2) per (sample, group), in fp32.

    ``y = x * scale[n, c] + shift[n, c]`` with ``scale = weight[c] / sqrt(M2 / count + eps)`` and
    ``shift = bias[c] - mean * scale``; one fp32 temporary, rounded once to ``x.dtype``. On the
    Triton backend one fused pass instead (the registered launcher ``group_norm_apply``).
    """
    n, mean, m2 = stats
    c, g = x.shape[1], norm.num_groups
    if _apply_backend(x, norm) == "triton":
        from fastgen.backend import launcher

        group_norm_apply = launcher("group_norm", "triton").group_norm_apply
        rstd_g = torch.rsqrt(m2 / n + norm.eps).float().reshape(-1)  # (N * G,)
        x3 = x.reshape(x.shape[0], c, -1)
        if x3.numel() and not (x3.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
            x3 = x3.contiguous()
        y = torch.empty_like(x3)  # x3's strides (contiguous or channels-last)
        if y.numel():
            group_norm_apply(x3, norm.weight, norm.bias, mean.float().reshape(-1), rstd_g, g, silu, y=y)
        return y.view(x.shape) if y.is_contiguous() else y.as_strided(x.shape, x.stride())
    rstd = torch.rsqrt(m2 / n + norm.eps).float().repeat_interleave(c // g, dim=1)  # (N, C)
    mean_c = mean.float().repeat_interleave(c // g, dim=1)
    scale = rstd if norm.weight is None else rstd * norm.weight.float()
    shift = -mean_c * scale
    if norm.bias is not None:
        shift = shift + norm.bias.float()
    tail = (1,) * (x.dim() - 2)
    y = torch.addcmul(shift.view(*shift.shape, *tail), x, scale.view(*scale.shape, *tail))  # fp32: reads x once
    if silu:
        F.silu(y, inplace=True)
    return y.to(x.dtype)


class _Store:
    """Where tile activations wait between segments: on the device while the resident bytes stay
    within ``budget``, beyond it in pinned host memory (copies on the current stream, so ordered)."""

    def __init__(self, device: torch.device, budget: float) -> None:
        self.device, self.budget, self.resident = device, budget, 0
        self.offloaded = device.type == "cuda" and budget < float("inf")
        self.pinned = True

    def put(self, t: Tensor) -> Tensor:
        nbytes = t.numel() * t.element_size()
        if not self.offloaded or self.resident + nbytes <= self.budget:
            self.resident += nbytes
            return t
        if self.pinned:
            try:
                host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            except RuntimeError:  # out of page-locked memory: pageable (synchronous copies) from here on
                self.pinned = False
        if not self.pinned:
            return t.to("cpu")
        host.copy_(t, non_blocking=True)
        return host

    def get(self, t: Tensor) -> Tensor:
        if t.device.type == self.device.type:
            self.resident -= t.numel() * t.element_size()
            return t
        return t.to(self.device, non_blocking=True)


def _tile_step(op: tuple, h: Tensor, t: _Tile, store: _Store, shared) -> Tensor:
    """One step of the blended consistent layout on one tile's activation ``h``. ``shared``: the
    whole-image GroupNorm statistics for a ``gn`` step, the global keys and values (or None) for ``attn``."""
    kind = op[0]
    if kind == "conv":
        return op[1](h)
    if kind == "gn":
        return _gn_apply(h, op[1], shared, op[2])
    if kind == "push":
        t.stack.append(store.put(h))
        return h
    if kind == "add":
        res = store.get(t.stack.pop())
        return (res if op[1] is None else op[1](res)) + h
    if kind == "attn":
        return _attn_core(op[1], h, shared)
    if kind == "up":
        return F.interpolate(h, scale_factor=2.0, mode="nearest")
    if kind == "down":
        return op[1](F.pad(h, (0, 1, 0, 1)))
    raise AssertionError(kind)  # pragma: no cover


def _core_of(h: Tensor, t: _Tile) -> Tensor:
    """The part of a tile's activation ``h`` (its extended region) that lies in the tile's core."""
    (cy0, cy1, cx0, cx1), (ey0, _, ex0, _) = t.core, t.ext
    r = h.shape[2] / (t.ext[1] - t.ext[0])  # activation positions per latent position
    return h[:, :, round((cy0 - ey0) * r):round((cy1 - ey0) * r), round((cx0 - ex0) * r):round((cx1 - ex0) * r)]


def _kv(a: Any, core: Tensor) -> tuple[Tensor, Tensor]:
    """The keys and values ``(N, heads, L, d)`` of attention ``a`` over the positions of ``core``."""
    heads = int(getattr(a, "heads", 1))
    return _tokens(a.to_k, core, heads), _tokens(a.to_v, core, heads)


def _collect(norm: Any, attn: Any, core: Tensor, acc: list) -> list:
    """Add one core to what a barrier gathers: merged statistics (one entry) for the GroupNorm ``norm``,
    else this core's keys and values for the global attention ``attn`` (neither: ``acc`` as it is)."""
    if norm is not None:
        return [_merge(acc[0] if acc else None, _group_stats(core, norm.num_groups))]
    return acc if attn is None else acc + [_kv(attn, core)]


def _run_consistent(steps: list, x: Tensor, hw: tuple[int, int], in_scale: int, out_scale: float,
                    tile: int, overlap: float, blend: str, budget: float, progress, desc: str,
                    global_attention: bool = False) -> Tensor:
    """Run ``steps`` over a tile grid of the ``hw`` latent grid with whole-image GroupNorm statistics.

    Barriers (a pass over every tile before the next step can run) sit before each ``gn`` step
    (collect the statistics) and, with ``global_attention``, before each ``attn`` step (collect
    the keys and values of every tile's core, so each query attends to the whole image once).
    """
    H, W = hw
    m = round(tile * overlap / 2)
    (ys, my), (xs, mx) = _axis(H, tile, m), _axis(W, tile, m)
    tiles = [_Tile((y0, y1, x0, x1), (max(y0 - my, 0), min(y1 + my, H), max(x0 - mx, 0), min(x1 + mx, W)))
             for y0, y1 in ys for x0, x1 in xs]
    barriers = ("gn", "attn") if global_attention else ("gn",)
    segments, cur = [], []
    for st in steps:
        if st[0] in barriers and cur:
            segments.append(cur)
            cur = []
        cur.append(st)
    segments.append(cur)
    dev = x.device
    store = _Store(dev, budget)
    for t in tiles:
        e = t.ext
        t.x, t.stack = store.put(x[:, :, e[0] * in_scale:e[1] * in_scale, e[2] * in_scale:e[3] * in_scale]), []
    out, bar = None, _progress(len(segments) * len(tiles), len(tiles), progress, desc)
    shared = None  # what the barrier collected: GroupNorm statistics, or global keys and values
    for si, seg in enumerate(segments):
        last = si == len(segments) - 1
        nxt = None if last else segments[si + 1][0]  # the step that opens the next segment: "gn" or "attn"
        norm = nxt[1] if nxt is not None and nxt[0] == "gn" else None
        attn = nxt[1] if nxt is not None and nxt[0] == "attn" else None
        acc = []
        for t in tiles:
            h = store.get(t.x)
            t.x = None
            for op in seg:
                h = _tile_step(op, h, t, store, shared if op[0] == "gn" or global_attention else None)
            if last:
                s = h.shape[2] // (t.ext[1] - t.ext[0])  # output pixels per latent position: f or 1
                if out is None:
                    out = torch.zeros(x.shape[0], h.shape[1], round(H * out_scale), round(W * out_scale),
                                      device=dev, dtype=torch.float32)
                wy = _axis_weights(t.core[0], t.core[1], t.ext[0], t.ext[1], my, H, s, blend, dev)
                wx = _axis_weights(t.core[2], t.core[3], t.ext[2], t.ext[3], mx, W, s, blend, dev)
                region = out[:, :, t.ext[0] * s:t.ext[1] * s, t.ext[2] * s:t.ext[3] * s]
                region.addcmul_(h.float(), wy[:, None] * wx[None, :])
            else:
                acc = _collect(norm, attn, _core_of(h, t), acc)
                t.x = store.put(h)
            del h
            if bar is not None:
                bar.update(1)
        if not last:
            shared = acc[0] if nxt[0] == "gn" else tuple(torch.cat(kv, dim=2) for kv in zip(*acc))
            del acc
    if bar is not None:
        bar.close()
    return out.to(x.dtype)


# ----------------------------------------------------------------------------- public API


AUTO_BUDGET_FRACTION = 0.05  # offload=None: activations stay on the GPU up to this share of its memory


def _budget(offload: Any, device: torch.device, what: str) -> float:
    """Bytes of staged activations allowed to stay on the device between segments."""
    if not (offload is None or isinstance(offload, bool) or (isinstance(offload, (int, float)) and offload >= 0)):
        raise ValueError(f"{what}: offload must be None, True, False or a budget in GiB >= 0, got {offload!r}")
    if device.type != "cuda":
        if offload is not None and offload is not False:
            raise ValueError(
                f"{what}: offload={offload!r} stages activations in host memory, which only means something for "
                f"CUDA tensors; these are on {device}. Leave offload=None (or False) here"
            )
        return float("inf")
    if offload is False:
        return float("inf")
    if offload is True:
        return 0.0
    if offload is None:
        return AUTO_BUDGET_FRACTION * torch.cuda.get_device_properties(device).total_memory
    return float(offload) * 2**30


def _check_halo_tile(what: str, tile: Any, unit: int, unit_name: str,
                     layout: str = "the lossless layout (consistent_colors=True, halo=True)") -> None:
    """``tile``: an int or the ``(height, width)`` sides, in ``unit_name`` (``unit`` per latent position)."""
    from fastgen.vae.halo import HALO, min_tile

    sides = tuple(tile) if isinstance(tile, (tuple, list)) else (tile,)
    if min(sides) < min_tile() * unit:
        raise ValueError(
            f"{what}: tile_size={sides[0] if len(set(sides)) == 1 else tile} is smaller than the halo it needs: "
            f"{layout} reads {HALO} latent position(s) around each tile's core at every conv, so tile_size must be "
            f"at least {min_tile() * unit} {unit_name} (a core of 1 latent position plus the halo on each side)"
        )


def _video(vae: Any, what: str, halo: bool, frame_chunk: Any) -> bool:
    """Whether ``vae`` is a video VAE (then only the lossless layout); ``frame_chunk`` is for those only."""
    from fastgen.vae.video_tiling import is_video_vae

    if is_video_vae(vae):
        if not halo:
            raise ValueError(f"{what}: the video VAE's tiling is the lossless layout only; leave halo=True")
        return True
    if frame_chunk is not None:
        raise ValueError(f"{what}: frame_chunk is for video VAEs (AutoencoderKLCogVideoX); this is an image VAE")
    return False


def _global(global_attention: Optional[bool], halo: bool) -> bool:
    return halo if global_attention is None else bool(global_attention)


def _diffusers_layout_with_bar(x: Tensor, fn, tile: int, step: int, extent: int, limit: int, blend: str,
                               progress, what: str) -> Tensor:
    """:func:`_diffusers_layout` with a progress bar over its tiles (closed even on an error)."""
    n_tiles = len(range(0, x.shape[-2], step)) * len(range(0, x.shape[-1], step))
    bar = _progress(n_tiles, n_tiles, progress, what)
    try:
        return _diffusers_layout(x, fn, tile, step, extent, limit, blend, bar)
    finally:
        if bar is not None:
            bar.close()


@torch.no_grad()
def tiled_decode(vae: Any, latents: Tensor, tile_size: Optional[int] = None, overlap: float = 0.25,
                 blend: str = "linear", consistent_colors: bool = False, progress: Optional[bool] = None,
                 offload: Any = None, global_attention: Optional[bool] = None, halo: bool = True,
                 frame_chunk: Optional[int] = None) -> Tensor:
    """Decode ``latents (N, latent_channels, h, w)`` -> images ``(N, out_channels, h * f, w * f)`` tile by tile.

    A video VAE (``AutoencoderKLCogVideoX``, fastgen's or diffusers') takes 5-D latents and always
    the lossless layout, in space and in time (``frame_chunk`` latent frames per chunk):
    :func:`fastgen.vae.video_tiling.tiled_decode_video`.

    Args:
        vae: a ``fastgen.vae.AutoencoderKL`` or a ``diffusers.AutoencoderKL``.
        latents: unscaled latents, as ``vae.decode`` takes them (divide by ``scaling_factor``
            and add ``shift_factor`` first). Any ``h``, ``w``; batch > 1; the VAE's dtype.
        tile_size: tile side in latent positions; default ``sample_size // f`` (diffusers' ``tile_latent_min_size``).
            The lossless layout needs at least 3 (a core of 1 plus a halo of 1 on each side).
        overlap: fraction of the tile shared with a neighbour, in [0, 0.5); default 0.25 (diffusers').
            Used by the blended layouts; the lossless layout has no overlap (cores partition the image).
        blend: ``"linear"`` (diffusers' ramps: with ``consistent_colors=False`` the result is
            diffusers' ``tiled_decode``) or ``"cosine"`` (a smoother window). Blended layouts only.
        consistent_colors: GroupNorm statistics over the whole image, not per tile. With
            ``halo=True`` (the default) the **lossless** layout of :mod:`fastgen.vae.halo`: tile
            cores partition the image at every layer, halos are exchanged before every conv, and
            the result equals the full decode up to floating-point summation order.
        progress: a tqdm bar; ``None`` shows one when there are more than 16 tiles.
        offload: (``consistent_colors`` only, CUDA tensors only: an error on others) where
            activations wait between GroupNorm segments: ``False`` all on the GPU (fastest, memory
            grows with the image), ``True`` all in pinned host memory (GPU memory bounded by one
            tile and the output), a number: up to that many GiB on the GPU and the rest on the host;
            ``None``: 5 % of the GPU's memory.
        global_attention: (``consistent_colors`` only) the mid-block attention attends over the
            whole image (keys and values of every core gathered first, queries in chunks) instead
            of within the tile. Default: on with ``halo=True`` (needed to be lossless), off with ``halo=False``.
        halo: (``consistent_colors`` only) ``True``: the lossless halo layout; ``False``: the
            older layout (tiles with a margin of ``overlap / 2`` and blended outputs).

    A latent no larger than one tile is decoded whole (exactly ``vae.decode``).
    Raises ``ValueError`` for a latent whose channel count is not the VAE's ``latent_channels``,
    an overlap outside [0, 0.5), a tile smaller than the halo needs, or ``offload`` on CPU tensors.
    """
    what = "tiled_decode"
    if _video(vae, what, halo, frame_chunk):
        from fastgen.vae.video_tiling import tiled_decode_video

        return tiled_decode_video(vae, latents, tile_size, overlap, frame_chunk, progress, offload)
    p = _parts(vae)
    _check_input(latents, p.latent_channels, what, "latents", p.decoder)
    tile = p.sample_size // p.factor if tile_size is None else tile_size
    _check_options(what, tile, overlap, blend)
    budget = _budget(offload, latents.device, what)
    H, W = latents.shape[-2:]
    if consistent_colors and halo:
        _check_halo_tile(what, tile, 1, "latent positions")
    if H <= tile and W <= tile:
        z = p.post_quant_conv(latents) if p.post_quant_conv is not None else latents
        return p.decoder(z)
    if consistent_colors and halo:
        from fastgen.vae.halo import core_bounds, run_halo

        return run_halo(decoder_steps(p), latents, (H, W), [core_bounds(H, tile), core_bounds(W, tile)], budget,
                        progress, what, _global(global_attention, True))
    if consistent_colors:
        return _run_consistent(decoder_steps(p), latents, (H, W), 1, p.factor, tile, overlap, blend,
                               budget, progress, what, _global(global_attention, False))
    step = int(tile * (1 - overlap))
    extent = int(tile * p.factor * overlap)
    limit = tile * p.factor - extent
    if step * p.factor != limit:
        raise ValueError(
            f"{what}: tile_size={tile} with overlap={overlap} gives tiles every {step} latent positions "
            f"({step * p.factor} px) but keeps {limit} px of each (diffusers' layout), which would not line up; "
            "choose tile_size * overlap a whole number"
        )

    def fn(z: Tensor) -> Tensor:
        return p.decoder(p.post_quant_conv(z) if p.post_quant_conv is not None else z)

    return _diffusers_layout_with_bar(latents, fn, tile, step, extent, limit, blend, progress, what)


def _encoded_size(size: int, downs: int) -> int:
    for _ in range(downs):
        size = (size - 2) // 2 + 1  # diffusers' Downsample2D: pad (0, 1), 3x3 stride 2
    return size


@torch.no_grad()
def tiled_encode(vae: Any, images: Tensor, tile_size: Optional[int] = None, overlap: float = 0.25,
                 blend: str = "linear", consistent_colors: bool = False, progress: Optional[bool] = None,
                 offload: Any = None, global_attention: Optional[bool] = None,
                 halo: bool = True, frame_chunk: Optional[int] = None) -> DiagonalGaussianDistribution:
    """Encode ``images (N, in_channels, H, W)`` tile by tile -> the posterior over ``(N, latent_channels, H / f, W / f)``.

    A video VAE takes 5-D videos (``frame_chunk`` in frames): :func:`fastgen.vae.video_tiling.tiled_encode_video`.

    ``tile_size`` is in **pixels** (default ``sample_size``, diffusers' ``tile_sample_min_size``);
    the other arguments are those of :func:`tiled_decode`. With ``blend="linear"`` and
    ``consistent_colors=False`` the moments equal diffusers' ``_tiled_encode``.

    Size rules: the lossless layout (``consistent_colors=True``, ``halo=True``) takes any image
    size (the latent is what the full encoder gives, ``ceil``-halved per downsample) and a
    ``tile_size`` of at least ``3 f`` px. The blended layouts need ``H`` and ``W`` multiples of
    ``f`` (so that no tile is thinner than the encoder can take), and ``consistent_colors=True,
    halo=False`` also ``tile_size`` a multiple of ``f``. An image no larger than one tile is
    encoded whole. Returns a :class:`DiagonalGaussianDistribution` (``.mean``, ``.logvar``,
    ``.sample()``, ``.mode()``).
    """
    what = "tiled_encode"
    if _video(vae, what, halo, frame_chunk):
        from fastgen.vae.video_tiling import tiled_encode_video

        return tiled_encode_video(vae, images, tile_size, overlap, frame_chunk, progress, offload)
    p = _parts(vae)
    _check_input(images, p.in_channels, what, "images", p.encoder)
    tile = p.sample_size if tile_size is None else tile_size
    _check_options(what, tile, overlap, blend)
    budget = _budget(offload, images.device, what)
    H, W = images.shape[-2:]
    f = p.factor
    if consistent_colors and halo:
        _check_halo_tile(what, tile, f, "px")

    def fn(x: Tensor) -> Tensor:
        h = p.encoder(x)
        return p.quant_conv(h) if p.quant_conv is not None else h

    if H <= tile and W <= tile:
        return DiagonalGaussianDistribution(fn(images))
    if consistent_colors and halo:
        from fastgen.vae.halo import core_bounds, run_halo

        downs = len(p.encoder.down_blocks) - 1
        h, w = _encoded_size(H, downs), _encoded_size(W, downs)
        moments = run_halo(encoder_steps(p), images, (h, w), [core_bounds(h, tile // f), core_bounds(w, tile // f)],
                           budget, progress, what, _global(global_attention, True))
        return DiagonalGaussianDistribution(moments)
    if H % f or W % f or (consistent_colors and tile % f):
        raise ValueError(
            f"{what}: this layout needs the image size{' and tile_size' if consistent_colors else ''} to be "
            f"multiples of the VAE's factor {f} (a thinner edge tile cannot go through the encoder's "
            f"downsampling), got image {H}x{W}{f' and tile_size={tile}' if consistent_colors else ''}; "
            "pad or crop the image, or use consistent_colors=True (the lossless layout takes any size)"
        )
    if consistent_colors:
        moments = _run_consistent(encoder_steps(p), images, (H // f, W // f), f, 1, tile // f, overlap, blend,
                                  budget, progress, what, _global(global_attention, False))
        return DiagonalGaussianDistribution(moments)
    step = int(tile * (1 - overlap))
    extent = int(tile // f * overlap)
    limit = tile // f - extent
    if step != limit * f:
        raise ValueError(
            f"{what}: tile_size={tile} with overlap={overlap} gives tiles every {step} px but keeps {limit} latent "
            f"positions ({limit * f} px) of each (diffusers' layout), which would not line up; choose tile_size a "
            f"multiple of {f} with tile_size / {f} * overlap a whole number"
        )
    return DiagonalGaussianDistribution(
        _diffusers_layout_with_bar(images, fn, tile, step, extent, limit, blend, progress, what))


__all__ = ["tiled_decode", "tiled_encode", "decoder_steps", "encoder_steps", "BLENDS"]
