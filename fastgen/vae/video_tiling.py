"""Lossless spatial and temporal tiling of CogVideoX's video VAE (``AutoencoderKLCogVideoX``).

Video activations are ``(N, C, T, H, W)``. The decoder / encoder is written as the flat step list
of :mod:`fastgen.vae.halo` (the image VAEs' lossless engine, whose regions, staging and GroupNorm
barriers are N-D) with four :class:`fastgen.vae.halo.Step` kinds for what a video VAE adds. Tiles
are a grid over ``(T, H, W)``: spatial tiles of ``tile_size`` latent positions (cores of
``tile_size - 2``), and **frame chunks** of ``frame_chunk`` latent frames. Per axis, the range an
output range ``[a, b)`` reads (``n``: the step's input size):

- causal conv ``k_t x k x k`` (:class:`CausalConv`): time ``[a - (k_t - 1), b)``, space
  ``[a - p, b + p)``. A chunk that starts at frame 0 is padded with ``k_t - 1`` copies of its first
  frame, any other chunk reads the ``k_t - 1`` frames before it from the staged activation: exactly
  what the frame cache would carry (the cache *is* this time halo), so chunking in time is exact;
- spatial norm (:class:`SpatialNorm`): pointwise, ``GN(h) * conv_y(zq') + conv_b(zq')``, ``zq'``
  gathered from the latent with the index maps of the full pass's nearest resize (first frame on
  its own when ``T`` is odd); ``GN`` uses whole-video statistics (a barrier);
- temporal + spatial nearest x2 (:class:`Upsample`, a barrier): ``src(j)`` = ``0`` for ``j = 0`` and
  ``1 + (j - 1) // 2`` after (``n`` odd > 1: first frame kept), ``j // 2`` (``n`` even), ``j``
  (no time compression, or one frame); space ``[a // 2, ceil(b / 2))``;
- frame-pair average + 3x3 stride-2 conv (:class:`Downsample`): output frame ``i`` averages frames
  ``{2i - 1, 2i}`` (``n`` odd; frame 0 kept) or ``{2i, 2i + 1}`` (``n`` even); space ``[2a, 2b + 1)``.

Every GroupNorm uses statistics over the whole video, per (sample, group), merged in float64
across tiles and frame chunks. So the tiled result equals the **one-pass** decode / encode (all
frames in one chunk: ``num_latent_frames_batch_size >= t``) up to floating-point summation order.
(The default frame-batched ``vae.decode``, as diffusers', normalizes each 2-latent-frame chunk with
its own statistics: an approximation this layout does not make.)
"""

from __future__ import annotations

import bisect
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from fastgen.vae.halo import Step, _down, _size_after, core_bounds, run_halo
from fastgen.vae.tiling import _budget, _check_halo_tile, _check_input, _check_options, _gn_apply, _positive_int

__all__ = ["is_video_vae", "tiled_decode_video", "tiled_encode_video", "video_decoder_steps",
           "video_encoder_steps", "CausalConv", "SpatialNorm", "Upsample", "Downsample"]


def is_video_vae(vae: Any) -> bool:
    """A fastgen or diffusers ``AutoencoderKLCogVideoX`` (its config has ``temporal_compression_ratio``)."""
    return hasattr(getattr(vae, "config", None), "temporal_compression_ratio") and hasattr(vae, "decoder")


# ----------------------------------------------------------------------------- the steps


class CausalConv(Step):
    """``CausalConv3d`` (fastgen's or diffusers' ``CogVideoXCausalConv3d``) on a region (module docstring)."""

    def __init__(self, m: Any) -> None:
        conv = m.conv
        kt, kh, kw = conv.kernel_size
        p = (kh - 1) // 2
        if (getattr(m, "pad_mode", "first") == "replicate" or kt != m.time_kernel_size or kh != kw
                or kh != 2 * p + 1 or tuple(conv.padding) != (0, p, p) or tuple(conv.stride) != (1, 1, 1)
                or tuple(conv.dilation) != (1, 1, 1) or conv.padding_mode != "zeros"):
            raise ValueError(f"tiled video VAE: unsupported causal conv {conv} (expected stride 1, "
                             "causal time padding, 'same' zero padding in space)")
        self.conv, self.kt, self.p = conv, kt, p
        self.spatial = kt > 1 or kh > 1

    def need(self, axis: int, a: int, b: int, n: int) -> tuple[int, int]:
        if axis == 0:
            return max(a - (self.kt - 1), 0), b
        return max(a - self.p, 0), min(b + self.p, n)

    def run(self, h: Tensor, reg: list, lvl: list[int], stats) -> tuple[Tensor, list]:
        (t0, t1), (y0, y1), (x0, x1) = reg
        k, p = self.kt, self.p
        if k > 1 and t0 == 0:  # the video's start: the first frame repeated, as the full pass pads it
            h = torch.cat([h[:, :, :1].expand(-1, -1, k - 1, -1, -1), h], dim=2)
            t0 -= k - 1
        pads = (p if x0 == 0 else 0, p if x1 == lvl[2] else 0, p if y0 == 0 else 0, p if y1 == lvl[1] else 0)
        c = self.conv
        h = F.conv3d(F.pad(h, pads) if any(pads) else h, c.weight, c.bias, 1, 0, 1, c.groups)
        return h, [(t0 + k - 1, t1), (y0 + p - pads[2], y1 - p + pads[3]), (x0 + p - pads[0], x1 - p + pads[1])]


def _nearest_index(n: int, m: int) -> list[int]:
    """``F.interpolate(mode="nearest")``'s source index of each of ``m`` outputs from ``n`` inputs."""
    if m == 0:
        return []
    i = torch.arange(n, dtype=torch.float64).view(1, 1, n, 1, 1)
    return F.interpolate(i, size=(m, 1, 1), mode="nearest").flatten().long().tolist()


class SpatialNorm(Step):
    """``silu(GN(h) * conv_y(zq') + conv_b(zq'))`` (``SpatialNorm3D`` then SiLU), ``zq'`` the latent ``z``
    resized to the level as the full pass resizes it; ``GN`` with whole-video statistics."""

    def __init__(self, m: Any, z: Tensor) -> None:
        for c in (m.conv_y, m.conv_b):
            if tuple(c.conv.kernel_size) != (1, 1, 1):
                raise ValueError(f"tiled video VAE: expected 1x1x1 spatial-norm convs, got {c.conv}")
        self.m, self.z, self.norm = m, z, m.norm_layer
        self._maps: dict = {}

    def _index(self, lvl: list[int]) -> list[Tensor]:
        key = tuple(lvl)
        if key not in self._maps:
            (T, H, W), (t, h, w) = lvl, self.z.shape[2:]
            it = [0] + [1 + i for i in _nearest_index(t - 1, T - 1)] if T > 1 and T % 2 == 1 else _nearest_index(t, T)
            maps = (it, _nearest_index(h, H), _nearest_index(w, W))
            self._maps[key] = [torch.tensor(i, dtype=torch.long, device=self.z.device) for i in maps]
        return self._maps[key]

    def run(self, h: Tensor, reg: list, lvl: list[int], stats) -> tuple[Tensor, list]:
        zq = self.z
        for ax, (idx, (a, b)) in enumerate(zip(self._index(lvl), reg)):
            zq = zq.index_select(2 + ax, idx[a:b])
        y = _gn_apply(h, self.norm, stats, False)  # a new tensor: modulated and activated in place
        y.mul_(self.m.conv_y.conv(zq)).add_(self.m.conv_b.conv(zq))
        return F.silu(y, inplace=True), reg


def _up_src(n: int, compress_time: bool) -> list[int]:
    """Upsample3D along time: the input frame of each output frame."""
    if not compress_time or n == 1:
        return list(range(n))
    if n % 2:
        return [0] + [1 + (j - 1) // 2 for j in range(1, 2 * n - 1)]
    return [j // 2 for j in range(2 * n)]


def _down_src(n: int, compress_time: bool) -> list[tuple[int, int]]:
    """Downsample3D along time: the (first, last) input frame averaged into each output frame."""
    if not compress_time or n == 1:
        return [(i, i) for i in range(n)]
    if n % 2:
        return [(0, 0)] + [(2 * i - 1, 2 * i) for i in range(1, (n - 1) // 2 + 1)]
    return [(2 * i, 2 * i + 1) for i in range(n // 2)]


class Upsample(Step):
    """``Upsample3D``'s nearest x2 (time: first frame kept; its 3x3 conv is the next ``("conv", ...)`` step)."""

    barrier = True

    def __init__(self, m: Any) -> None:
        self.ct = bool(m.compress_time)
        self._frames: dict = {}  # (frames, t0, t1) -> (j0, j1, frame index on the device or None: identity)

    def size(self, axis: int, n: int) -> int:
        return len(_up_src(n, self.ct)) if axis == 0 else 2 * n

    def need(self, axis: int, a: int, b: int, n: int) -> tuple[int, int]:
        if axis == 0:
            src = _up_src(n, self.ct)
            return src[a], src[b - 1] + 1
        return a // 2, -(-b // 2)

    def run(self, h: Tensor, reg: list, lvl: list[int], stats) -> tuple[Tensor, list]:
        (t0, t1), (y0, y1), (x0, x1) = reg
        key = (lvl[0], t0, t1)
        if key not in self._frames:  # the same for every tile of a frame chunk: built (and uploaded) once
            src = _up_src(lvl[0], self.ct)
            j0, j1 = bisect.bisect_left(src, t0), bisect.bisect_left(src, t1)
            idx = [s - t0 for s in src[j0:j1]]
            self._frames[key] = j0, j1, None if idx == list(range(t1 - t0)) else torch.tensor(idx, device=h.device)
        j0, j1, idx = self._frames[key]
        if idx is not None:
            h = h.index_select(2, idx)
        h = F.interpolate(h, scale_factor=(1.0, 2.0, 2.0), mode="nearest")  # space x2: a copy, as Upsample3D's
        return h, [(j0, j1), (2 * y0, 2 * y1), (2 * x0, 2 * x1)]


class Downsample(Step):
    """``Downsample3D``: frame pairs averaged (first frame kept), then pad (0, 1) and a 3x3 stride-2 conv per frame."""

    spatial = True

    def __init__(self, m: Any) -> None:
        self.ct, self.conv = bool(m.compress_time), m.conv

    def size(self, axis: int, n: int) -> int:
        return len(_down_src(n, self.ct)) if axis == 0 else (n - 2) // 2 + 1

    def need(self, axis: int, a: int, b: int, n: int) -> tuple[int, int]:
        if axis == 0:
            src = _down_src(n, self.ct)
            return src[a][0], src[b - 1][1] + 1
        return 2 * a, min(2 * b + 1, n)

    def run(self, h: Tensor, reg: list, lvl: list[int], stats) -> tuple[Tensor, list]:
        t0, t1 = reg[0]
        src = _down_src(lvl[0], self.ct)
        i0 = bisect.bisect_left([s[0] for s in src], t0)
        i1 = bisect.bisect_left([s[1] for s in src], t1)
        parts = []
        if i0 < i1 and src[i0][0] == src[i0][1]:  # a frame kept as it is (the first, or no time compression)
            single = [s[0] - t0 for s in src[i0:i1] if s[0] == s[1]]
            parts.append(h[:, :, single[0]:single[-1] + 1])
            i_pairs = i0 + len(single)
        else:
            i_pairs = i0
        if i_pairs < i1:
            rest = h[:, :, src[i_pairs][0] - t0:src[i1 - 1][1] + 1 - t0]
            parts.append(0.5 * (rest[:, :, 0::2] + rest[:, :, 1::2]))
        h = parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)
        h, reg = _down(self.conv, h, [(i0, i1)] + reg[1:], lvl)
        return h, reg


# ----------------------------------------------------------------------------- step lists


def _resnet(r: Any, z: Optional[Tensor]) -> list:
    sc = getattr(r, "conv_shortcut", None)
    if sc is not None and hasattr(sc, "time_kernel_size"):
        raise ValueError("tiled video VAE: a causal-conv shortcut (use_conv_shortcut=True) is not supported")

    def norm(n):
        return ("step", SpatialNorm(n, z)) if z is not None else ("gn", n, True)

    return [("push",), norm(r.norm1), ("step", CausalConv(r.conv1)), norm(r.norm2), ("step", CausalConv(r.conv2)),
            ("add", sc)]


def video_decoder_steps(vae: Any, z: Tensor) -> list:
    """The decoder of a (fastgen or diffusers) ``AutoencoderKLCogVideoX`` as a step list; ``z``: the latent."""
    d = vae.decoder
    steps = [("step", CausalConv(d.conv_in))]
    for r in d.mid_block.resnets:
        steps += _resnet(r, z)
    for b in d.up_blocks:
        for r in b.resnets:
            steps += _resnet(r, z)
        ups = getattr(b, "upsamplers", None)
        if ups:
            steps += [("step", Upsample(ups[0])), ("conv", ups[0].conv)]
    return steps + [("step", SpatialNorm(d.norm_out, z)), ("step", CausalConv(d.conv_out))]


def video_encoder_steps(vae: Any) -> list:
    """The encoder of a (fastgen or diffusers) ``AutoencoderKLCogVideoX`` as a step list (moments out)."""
    e = vae.encoder
    steps = [("step", CausalConv(e.conv_in))]
    for b in e.down_blocks:
        for r in b.resnets:
            steps += _resnet(r, None)
        downs = getattr(b, "downsamplers", None)
        if downs:
            steps.append(("step", Downsample(downs[0])))
    for r in e.mid_block.resnets:
        steps += _resnet(r, None)
    return steps + [("gn", e.norm_out, True), ("step", CausalConv(e.conv_out))]


# ----------------------------------------------------------------------------- public API


_LAYOUT = "the lossless layout"  # named in the halo error (a video VAE has no other layout)


def _factor(vae: Any) -> int:
    """Pixels per latent position (``f``) of a fastgen or diffusers ``AutoencoderKLCogVideoX``."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def _run(steps: list, x: Tensor, tile: tuple[int, int], chunk: int, budget: float, progress, what: str,
         encode: bool) -> Tensor:
    """``steps`` over a (frame chunk, tile, tile) grid of the latent level: the input when decoding, the
    output when encoding (the tile and chunk are in latent units)."""
    lat = list(x.shape[2:])
    for op in steps if encode else ():
        lat = [_size_after(op, ax, n, 3) for ax, n in enumerate(lat)]
    cores = [core_bounds(lat[0], chunk, 0), core_bounds(lat[1], tile[0]), core_bounds(lat[2], tile[1])]
    return run_halo(steps, x, tuple(lat), cores, budget, progress, what, global_attention=False)


@torch.no_grad()
def tiled_decode_video(vae: Any, latents: Tensor, tile_size: Union[int, tuple, None] = None, overlap: float = 0.25,
                       frame_chunk: Optional[int] = None, progress: Optional[bool] = None,
                       offload: Any = None) -> Tensor:
    """Decode video latents ``(N, latent_channels, t, h, w)`` -> ``(N, out_channels, T, h f, w f)`` losslessly.

    ``tile_size``: spatial tile in latent positions, an int or ``(height, width)``, at least 3
    (default diffusers' ``tile_latent_min_height / width``: ``sample_height / 2 / f`` by
    ``sample_width / 2 / f``); ``frame_chunk``: latent frames per chunk (default
    ``num_latent_frames_batch_size``, 2); ``overlap`` is checked (in [0, 0.5)) but unused: cores
    partition the video. ``offload``: as :func:`fastgen.vae.tiled_decode` (CUDA tensors only).
    Equals the one-pass decode (module docstring) up to summation order.
    """
    what = "tiled_decode"
    cfg = vae.config
    _check_input(latents, int(cfg.latent_channels), what, "latents", vae.decoder, ("t", "h", "w"))
    f = _factor(vae)
    default = (int(cfg.sample_height) // 2 // f, int(cfg.sample_width) // 2 // f)
    tile = _check_options(what, default if tile_size is None else tile_size, overlap, "linear", pair=True)
    _check_halo_tile(what, tile, 1, "latent positions", _LAYOUT)
    chunk = _positive_int(what, "frame_chunk",
                          getattr(vae, "num_latent_frames_batch_size", 2) if frame_chunk is None else frame_chunk)
    budget = _budget(offload, latents.device, what)
    return _run(video_decoder_steps(vae, latents), latents, tile, chunk, budget, progress, what, False)


@torch.no_grad()
def tiled_encode_video(vae: Any, video: Tensor, tile_size: Union[int, tuple, None] = None, overlap: float = 0.25,
                       frame_chunk: Optional[int] = None, progress: Optional[bool] = None, offload: Any = None):
    """Encode a video ``(N, in_channels, T, H, W)`` losslessly -> the posterior over the one-pass latent.

    ``tile_size`` in **pixels** (an int or ``(height, width)``, at least ``3 f``; default
    ``sample_height / 2`` by ``sample_width / 2``, diffusers' ``tile_sample_min_height / width``);
    ``frame_chunk`` in video frames (default ``num_sample_frames_batch_size``, 8), i.e.
    ``max(1, frame_chunk // temporal_compression_ratio)`` latent frames per chunk. Any ``T``, ``H``, ``W``.
    Returns a :class:`fastgen.vae.DiagonalGaussianDistribution`.
    """
    from fastgen.vae.autoencoder_kl import DiagonalGaussianDistribution

    what = "tiled_encode"
    cfg = vae.config
    _check_input(video, int(cfg.in_channels), what, "video", vae.encoder, ("T", "H", "W"))
    f = _factor(vae)
    default = (int(cfg.sample_height) // 2, int(cfg.sample_width) // 2)
    tile = _check_options(what, default if tile_size is None else tile_size, overlap, "linear", pair=True)
    _check_halo_tile(what, tile, f, "px", _LAYOUT)
    chunk = _positive_int(what, "frame_chunk",
                          getattr(vae, "num_sample_frames_batch_size", 8) if frame_chunk is None else frame_chunk)
    chunk = max(1, chunk // int(cfg.temporal_compression_ratio))
    budget = _budget(offload, video.device, what)
    moments = _run(video_encoder_steps(vae), video, (tile[0] // f, tile[1] // f), chunk, budget, progress, what, True)
    return DiagonalGaussianDistribution(moments)

