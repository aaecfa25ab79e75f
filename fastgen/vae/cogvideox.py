"""``fastgen.vae.AutoencoderKLCogVideoX``: CogVideoX's video VAE (diffusers' weights and math) on fastgen layers.

Video ``x (N, C, T, H, W)``; spatial factor ``f = 2 ** (len(block_out_channels) - 1)``, temporal
factor 4 (``temporal_compression_ratio``): ``T = 1 + 4 t`` frames <-> ``t + 1`` latent frames.

- **Causal 3-D convolution** (``CausalConv3d``): a ``kt x kh x kw`` conv, zero-padded in space,
  padded in time on the *past* side only: the first chunk by ``kt - 1`` copies of its first frame,
  later chunks by the **frame cache** (the last ``kt - 1`` input frames of the previous chunk). So
  a video can be encoded / decoded a few frames at a time with the result of one long pass.
- Encoder: ``conv_in``, down blocks (ResNet blocks of fused GroupNorm+SiLU -> causal conv, then a
  2-D stride-2 conv per frame, averaging frame pairs in time (first frame kept) in the first
  ``log2(temporal_compression_ratio)`` blocks), a mid block of two ResNet blocks, GroupNorm+SiLU,
  ``conv_out`` to ``2 * latent_channels`` (mean and log-variance).
- Decoder: the mirror, with every GroupNorm a **spatial norm** conditioned on the latent ``zq``:
  ``GN(h) * conv_y(zq') + conv_b(zq')``, ``zq'`` the latent resized (nearest) to ``h``'s frames and
  size (the first frame resized on its own when the frame count is odd), then SiLU; upsampling
  doubles time too (first frame kept) in the first blocks.
- Frame batching, as diffusers: encode 8 frames at a time, decode 2 latent frames at a time, the
  causal conv caches carried between chunks. GroupNorm statistics are per chunk (that is
  diffusers' math too).
- Tiling: :meth:`AutoencoderKLCogVideoX.enable_tiling` (diffusers' switch) makes ``decode`` /
  ``encode`` of inputs larger than one tile go through fastgen's **lossless** spatial + temporal
  tiling (:mod:`fastgen.vae.video_tiling`: halo exchange at every conv, whole-video GroupNorm
  statistics, frame chunks that read their causal past from the staged activations): equal to
  the one-pass decode / encode up to summation order.

``GroupNorm -> SiLU`` pairs of the encoder are one fused ``fastgen.nn.GroupNorm(..., activation="silu")``
on the 5-D activations; the decoder's spatial norms use ``fastgen.nn.GroupNorm`` then the
``zq`` modulation. Parameter names are diffusers', so its state dict loads as it is.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastgen.nn import GroupNorm
from fastgen.vae.autoencoder_kl import DecoderOutput, DiagonalGaussianDistribution
from fastgen.vae.video_tiling import _factor, tiled_decode_video, tiled_encode_video

EPS = 1e-6


@dataclass
class CogVideoXVAEConfig:
    """diffusers' ``AutoencoderKLCogVideoX`` config names and defaults (CogVideoX-2b/5b)."""

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple = (128, 256, 256, 512)
    latent_channels: int = 16
    layers_per_block: int = 3
    norm_num_groups: int = 32
    temporal_compression_ratio: float = 4
    sample_height: int = 480
    sample_width: int = 720
    scaling_factor: float = 1.15258426
    shift_factor: Optional[float] = None
    latents_mean: Optional[tuple] = None
    latents_std: Optional[tuple] = None
    force_upcast: bool = True
    invert_scale_latents: bool = False

    def __post_init__(self) -> None:
        self.block_out_channels = tuple(int(c) for c in self.block_out_channels)


class CausalConv3d(nn.Module):
    """Causal in time, 'same' zero padding in space; returns ``(out, cache)`` (module docstring)."""

    def __init__(self, cin: int, cout: int, kernel_size: int = 3, stride: int = 1) -> None:
        super().__init__()
        self.time_kernel_size = kernel_size
        p = (kernel_size - 1) // 2
        self.conv = nn.Conv3d(cin, cout, kernel_size, stride=(stride, 1, 1), padding=(0, p, p))

    def forward(self, x: Tensor, cache: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        k = self.time_kernel_size
        if k > 1:
            past = cache if cache is not None else x[:, :, :1].expand(-1, -1, k - 1, -1, -1)
            x = torch.cat([past, x], dim=2)
        new_cache = x[:, :, x.shape[2] - (k - 1):].clone()  # k = 1: an empty cache, as diffusers
        return self.conv(x), new_cache


class SpatialNorm3D(nn.Module):
    """``GN(f) * conv_y(zq') + conv_b(zq')`` with ``zq`` resized to ``f`` (diffusers' CogVideoXSpatialNorm3D)."""

    def __init__(self, f_channels: int, zq_channels: int, groups: int) -> None:
        super().__init__()
        self.norm_layer = GroupNorm(groups, f_channels, eps=EPS)
        self.conv_y = CausalConv3d(zq_channels, f_channels, 1)
        self.conv_b = CausalConv3d(zq_channels, f_channels, 1)

    def forward(self, f: Tensor, zq: Tensor, cache: dict) -> tuple[Tensor, dict]:
        if f.shape[2] > 1 and f.shape[2] % 2 == 1:
            zq = torch.cat([F.interpolate(zq[:, :, :1], size=(1,) + tuple(f.shape[-2:])),
                            F.interpolate(zq[:, :, 1:], size=(f.shape[2] - 1,) + tuple(f.shape[-2:]))], dim=2)
        else:
            zq = F.interpolate(zq, size=tuple(f.shape[-3:]))
        new = {}
        y, new["conv_y"] = self.conv_y(zq, cache.get("conv_y"))
        b, new["conv_b"] = self.conv_b(zq, cache.get("conv_b"))
        return self.norm_layer(f) * y + b, new


class ResnetBlock3D(nn.Module):
    """``shortcut(x) + conv2(silu(norm2(conv1(silu(norm1(x))))))``, norms GroupNorm (encoder) or spatial (decoder)."""

    def __init__(self, cin: int, cout: int, groups: int, spatial_norm_dim: Optional[int] = None) -> None:
        super().__init__()
        self.in_channels, self.out_channels, self.spatial = cin, cout, spatial_norm_dim is not None
        if self.spatial:
            self.norm1 = SpatialNorm3D(cin, spatial_norm_dim, groups)
            self.norm2 = SpatialNorm3D(cout, spatial_norm_dim, groups)
        else:
            self.norm1 = GroupNorm(groups, cin, eps=EPS, activation="silu")
            self.norm2 = GroupNorm(groups, cout, eps=EPS, activation="silu")
        self.conv1 = CausalConv3d(cin, cout, 3)
        self.dropout = nn.Dropout(0.0)
        self.conv2 = CausalConv3d(cout, cout, 3)
        self.conv_shortcut = nn.Conv3d(cin, cout, 1) if cin != cout else None

    def _norm(self, norm: nn.Module, h: Tensor, zq: Optional[Tensor], cache: dict, key: str, new: dict) -> Tensor:
        if not self.spatial:
            return norm(h)
        h, new[key] = norm(h, zq, cache.get(key, {}))
        return F.silu(h)

    def forward(self, x: Tensor, zq: Optional[Tensor], cache: dict) -> tuple[Tensor, dict]:
        new: dict = {}
        h = self._norm(self.norm1, x, zq, cache, "norm1", new)
        h, new["conv1"] = self.conv1(h, cache.get("conv1"))
        h = self.dropout(self._norm(self.norm2, h, zq, cache, "norm2", new))
        h, new["conv2"] = self.conv2(h, cache.get("conv2"))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return h + x, new


class Downsample3D(nn.Module):
    """Frame-pair averaging in time (first frame kept; ``compress_time``), then pad (0, 1) and a 3x3 stride-2 conv per frame."""

    def __init__(self, channels: int, compress_time: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)
        self.compress_time = compress_time

    def forward(self, x: Tensor) -> Tensor:
        if self.compress_time and x.shape[2] > 1:
            first, rest = (x[:, :, :1], x[:, :, 1:]) if x.shape[2] % 2 == 1 else (None, x)
            pairs = rest.shape[2] // 2  # avg_pool1d(2, 2): a trailing odd frame is dropped
            rest = 0.5 * (rest[:, :, 0:2 * pairs:2] + rest[:, :, 1:2 * pairs:2])
            x = rest if first is None else torch.cat([first, rest], dim=2)
        n, c, t, h, w = x.shape
        y = self.conv(F.pad(x, (0, 1, 0, 1)).transpose(1, 2).reshape(n * t, c, h + 1, w + 1))
        return y.reshape(n, t, *y.shape[1:]).transpose(1, 2)


class Upsample3D(nn.Module):
    """Nearest x2 in space (and in time but the first frame, ``compress_time``), then a 3x3 conv per frame."""

    def __init__(self, channels: int, compress_time: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.compress_time = compress_time

    def forward(self, x: Tensor) -> Tensor:
        n, c, t = x.shape[:3]
        if self.compress_time and t > 1 and t % 2 == 1:
            first = F.interpolate(x[:, :, 0], scale_factor=2.0)[:, :, None]
            x = torch.cat([first, F.interpolate(x[:, :, 1:], scale_factor=2.0)], dim=2)
        elif self.compress_time and t > 1:
            x = F.interpolate(x, scale_factor=2.0)
        else:  # no time compression here, or one frame: space only
            x = F.interpolate(x.transpose(1, 2).reshape(n * t, c, *x.shape[3:]), scale_factor=2.0)
            x = x.reshape(n, t, c, *x.shape[2:]).transpose(1, 2)
        t = x.shape[2]
        y = self.conv(x.transpose(1, 2).reshape(n * t, c, *x.shape[3:]))
        return y.reshape(n, t, *y.shape[1:]).transpose(1, 2)


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, layers: int, groups: int, spatial_norm_dim: Optional[int],
                 sampler: Optional[nn.Module], kind: str) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock3D(cin if i == 0 else cout, cout, groups, spatial_norm_dim)
                                     for i in range(layers))
        if kind:  # "downsamplers" / "upsamplers" (diffusers' names); the mid block has none
            setattr(self, kind, nn.ModuleList([sampler]) if sampler is not None else None)
        self.kind = kind

    def forward(self, h: Tensor, zq: Optional[Tensor], cache: dict) -> tuple[Tensor, dict]:
        new = {}
        for i, r in enumerate(self.resnets):
            h, new[f"resnet_{i}"] = r(h, zq, cache.get(f"resnet_{i}", {}))
        samplers = getattr(self, self.kind, None) if self.kind else None
        if samplers is not None:
            h = samplers[0](h)
        return h, new


class Encoder3D(nn.Module):
    def __init__(self, cfg: CogVideoXVAEConfig) -> None:
        super().__init__()
        ch, g = cfg.block_out_channels, cfg.norm_num_groups
        levels = int(math.log2(cfg.temporal_compression_ratio))
        self.conv_in = CausalConv3d(cfg.in_channels, ch[0], 3)
        self.down_blocks = nn.ModuleList(
            _Block(ch[max(i - 1, 0)], c, cfg.layers_per_block, g, None,
                   Downsample3D(c, i < levels) if i < len(ch) - 1 else None, "downsamplers")
            for i, c in enumerate(ch))
        self.mid_block = _Block(ch[-1], ch[-1], 2, g, None, None, "")
        self.norm_out = GroupNorm(g, ch[-1], eps=1e-6, activation="silu")  # + conv_act
        self.conv_out = CausalConv3d(ch[-1], 2 * cfg.latent_channels, 3)

    def forward(self, x: Tensor, cache: dict) -> tuple[Tensor, dict]:
        new = {}
        h, new["conv_in"] = self.conv_in(x, cache.get("conv_in"))
        for i, b in enumerate(self.down_blocks):
            h, new[f"down_block_{i}"] = b(h, None, cache.get(f"down_block_{i}", {}))
        h, new["mid_block"] = self.mid_block(h, None, cache.get("mid_block", {}))
        h, new["conv_out"] = self.conv_out(self.norm_out(h), cache.get("conv_out"))
        return h, new


class Decoder3D(nn.Module):
    def __init__(self, cfg: CogVideoXVAEConfig) -> None:
        super().__init__()
        ch, g, zc = tuple(reversed(cfg.block_out_channels)), cfg.norm_num_groups, cfg.latent_channels
        levels = int(math.log2(cfg.temporal_compression_ratio))
        self.conv_in = CausalConv3d(zc, ch[0], 3)
        self.mid_block = _Block(ch[0], ch[0], 2, g, zc, None, "")
        self.up_blocks = nn.ModuleList(
            _Block(ch[max(i - 1, 0)], c, cfg.layers_per_block + 1, g, zc,
                   Upsample3D(c, i < levels) if i < len(ch) - 1 else None, "upsamplers")
            for i, c in enumerate(ch))
        self.norm_out = SpatialNorm3D(ch[-1], zc, g)
        self.conv_out = CausalConv3d(ch[-1], cfg.out_channels, 3)

    def forward(self, z: Tensor, cache: dict) -> tuple[Tensor, dict]:
        new = {}
        h, new["conv_in"] = self.conv_in(z, cache.get("conv_in"))
        h, new["mid_block"] = self.mid_block(h, z, cache.get("mid_block", {}))
        for i, b in enumerate(self.up_blocks):
            h, new[f"up_block_{i}"] = b(h, z, cache.get(f"up_block_{i}", {}))
        h, new["norm_out"] = self.norm_out(h, z, cache.get("norm_out", {}))
        h, new["conv_out"] = self.conv_out(F.silu(h), cache.get("conv_out"))
        return h, new


def _frame_chunks(frames: int, size: int) -> list[tuple[int, int]]:
    """diffusers' chunking: ``max(T // size, 1)`` chunks, the remainder ``T % size`` added to the first."""
    n, rem = max(frames // size, 1), frames % size
    return [(size * i + (0 if i == 0 else rem), size * (i + 1) + rem) for i in range(n)]


class AutoencoderKLCogVideoX(nn.Module):
    """CogVideoX's video VAE: ``encode(x (N, C, T, H, W))`` -> posterior, ``decode(z)`` -> video (module docstring).

    ``from_diffusers(vae)`` copies a ``diffusers.AutoencoderKLCogVideoX`` (config, weights, device, dtype).
    """

    def __init__(self, config: Optional[CogVideoXVAEConfig] = None, **overrides: Any) -> None:
        super().__init__()
        cfg = dataclasses.replace(config or CogVideoXVAEConfig(), **overrides)
        self.config = cfg
        self.encoder = Encoder3D(cfg)
        self.decoder = Decoder3D(cfg)
        self.num_latent_frames_batch_size = 2
        self.num_sample_frames_batch_size = 8
        self.use_slicing = False
        # diffusers' tiling switches and defaults (enable_tiling); the tiling itself is fastgen's lossless one
        self.use_tiling = False
        self.tile_sample_min_height, self.tile_sample_min_width = cfg.sample_height // 2, cfg.sample_width // 2
        self._set_latent_tile()
        self.tile_overlap_factor_height, self.tile_overlap_factor_width = 1 / 6, 1 / 5

    def _set_latent_tile(self) -> None:
        """``tile_latent_min_height / width``: the sample tile in latent positions (diffusers' ``int(px / f)``)."""
        f = _factor(self)
        self.tile_latent_min_height = int(self.tile_sample_min_height / f)
        self.tile_latent_min_width = int(self.tile_sample_min_width / f)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def enable_slicing(self) -> None:
        self.use_slicing = True

    def disable_slicing(self) -> None:
        self.use_slicing = False

    def enable_tiling(self, tile_sample_min_height: Optional[int] = None, tile_sample_min_width: Optional[int] = None,
                      tile_overlap_factor_height: Optional[float] = None,
                      tile_overlap_factor_width: Optional[float] = None) -> None:
        """diffusers' signature. Afterwards ``decode`` / ``encode`` of inputs larger than one tile use
        fastgen's **lossless** tiling (:func:`fastgen.vae.video_tiling.tiled_decode_video`): tiles of
        ``tile_latent_min_height x tile_latent_min_width`` latent positions (``tile_sample_min_*`` px
        to encode), frame chunks of ``num_latent_frames_batch_size`` latent frames
        (``num_sample_frames_batch_size`` frames), no overlap needed (the factors are kept for
        compatibility), whole-video GroupNorm statistics."""
        self.use_tiling = True
        self.tile_sample_min_height = tile_sample_min_height or self.tile_sample_min_height
        self.tile_sample_min_width = tile_sample_min_width or self.tile_sample_min_width
        self._set_latent_tile()
        self.tile_overlap_factor_height = tile_overlap_factor_height or self.tile_overlap_factor_height
        self.tile_overlap_factor_width = tile_overlap_factor_width or self.tile_overlap_factor_width

    def disable_tiling(self) -> None:
        self.use_tiling = False

    def tiled_decode(self, z: Tensor, **kwargs: Any) -> Tensor:
        """:func:`fastgen.vae.tiled_decode` on this VAE (lossless; ``tile_size``, ``frame_chunk``, ``offload``, ...)."""
        return tiled_decode_video(self, z, **kwargs)

    def tiled_encode(self, x: Tensor, **kwargs: Any) -> DiagonalGaussianDistribution:
        """:func:`fastgen.vae.tiled_encode` on this VAE (lossless)."""
        return tiled_encode_video(self, x, **kwargs)

    def _run(self, net: nn.Module, x: Tensor, size: int) -> Tensor:
        cache: dict = {}
        out = []
        for a, b in _frame_chunks(x.shape[2], size):
            y, cache = net(x[:, :, a:b], cache)
            out.append(y)
        return torch.cat(out, dim=2)

    def encode(self, x: Tensor, return_dict: bool = True) -> Any:
        """Video ``(N, in_channels, T, H, W)`` -> posterior over ``(N, latent_channels, t, H / f, W / f)``."""
        if x.dim() != 5 or x.shape[1] != self.config.in_channels:
            raise ValueError(f"AutoencoderKLCogVideoX.encode: expected (N, {self.config.in_channels}, T, H, W), "
                             f"got {tuple(x.shape)}")
        xs = x.split(1) if self.use_slicing else (x,)
        post = DiagonalGaussianDistribution(torch.cat([self._moments(xi) for xi in xs]))
        return post if return_dict else (post,)

    def _moments(self, x: Tensor) -> Tensor:
        """One slice: the lossless tiled encode if tiling is on and ``x`` exceeds a tile, else frame-batched."""
        tile = (self.tile_sample_min_height, self.tile_sample_min_width)
        if self.use_tiling and (x.shape[-2] > tile[0] or x.shape[-1] > tile[1]):
            return self.tiled_encode(x, tile_size=tile, frame_chunk=self.num_sample_frames_batch_size,
                                     progress=False).parameters
        return self._run(self.encoder, x, self.num_sample_frames_batch_size)

    def decode(self, z: Tensor, return_dict: bool = True) -> Any:
        """Latents ``(N, latent_channels, t, h, w)`` -> video; ``.sample`` as diffusers' ``DecoderOutput``."""
        if z.dim() != 5 or z.shape[1] != self.config.latent_channels:
            raise ValueError(f"AutoencoderKLCogVideoX.decode: expected (N, {self.config.latent_channels}, t, h, w), "
                             f"got {tuple(z.shape)}")
        zs = z.split(1) if self.use_slicing else (z,)
        out = torch.cat([self._decode(zi) for zi in zs])
        return DecoderOutput(out) if return_dict else (out,)

    def _decode(self, z: Tensor) -> Tensor:
        """One slice: the lossless tiled decode if tiling is on and ``z`` exceeds a tile, else frame-batched."""
        tile = (self.tile_latent_min_height, self.tile_latent_min_width)
        if self.use_tiling and (z.shape[-2] > tile[0] or z.shape[-1] > tile[1]):
            return self.tiled_decode(z, tile_size=tile, frame_chunk=self.num_latent_frames_batch_size,
                                     progress=False)
        return self._run(self.decoder, z, self.num_latent_frames_batch_size)

    def forward(self, x: Tensor, sample_posterior: bool = False, return_dict: bool = True,
                generator: Optional[torch.Generator] = None) -> Any:
        post = self.encode(x)
        return self.decode(post.sample(generator) if sample_posterior else post.mode(), return_dict=return_dict)

    @staticmethod
    def config_from_diffusers(diffusers_config: Any) -> CogVideoXVAEConfig:
        c = dict(diffusers_config)
        if c.get("use_quant_conv") or c.get("use_post_quant_conv"):
            raise ValueError("AutoencoderKLCogVideoX.from_diffusers: quant convs are not supported")
        if c.get("act_fn", "silu") != "silu" or c.get("norm_eps", EPS) != EPS:
            raise ValueError("AutoencoderKLCogVideoX.from_diffusers: only act_fn='silu', norm_eps=1e-6 are supported")
        names = [f.name for f in dataclasses.fields(CogVideoXVAEConfig)]
        return CogVideoXVAEConfig(**{k: c[k] for k in names if k in c})

    @classmethod
    def from_diffusers(cls, vae: Any) -> "AutoencoderKLCogVideoX":
        model = cls(cls.config_from_diffusers(vae.config))
        p = next(vae.parameters())
        model.to(device=p.device, dtype=p.dtype)
        model.load_state_dict(vae.state_dict())
        model.num_latent_frames_batch_size = getattr(vae, "num_latent_frames_batch_size", 2)
        model.num_sample_frames_batch_size = getattr(vae, "num_sample_frames_batch_size", 8)
        return model.eval()


__all__ = ["AutoencoderKLCogVideoX", "CogVideoXVAEConfig", "CausalConv3d"]
