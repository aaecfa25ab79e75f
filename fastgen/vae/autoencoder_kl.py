"""``fastgen.vae.AutoencoderKL``: diffusers' KL autoencoder on fastgen layers.

The network (Rombach et al., *High-Resolution Image Synthesis with Latent Diffusion
Models*), with ``f = 2 ** (len(block_out_channels) - 1)`` the spatial factor::

    encode:  x (N, in_channels, H, W)
             -> Encoder -> (N, 2 * latent_channels, H / f, W / f) -> quant_conv (1x1, optional)
             -> DiagonalGaussianDistribution(mean, logvar)        (chunked along channels)
    decode:  z (N, latent_channels, h, w)
             -> post_quant_conv (1x1, optional) -> Decoder -> (N, out_channels, h * f, w * f)

    Encoder: conv_in, down_blocks[i] (layers_per_block ResnetBlocks, then a stride-2
             Downsample except in the last block), mid_block (Resnet, Attention, Resnet),
             conv_norm_out + SiLU, conv_out (2 * latent_channels).
    Decoder: conv_in, mid_block, up_blocks[i] (layers_per_block + 1 ResnetBlocks, then a
             nearest x2 Upsample + conv except in the last block), conv_norm_out + SiLU, conv_out.
    ResnetBlock: h = conv1(silu(norm1(x))); h = conv2(silu(norm2(h))); out = shortcut(x) + h,
             shortcut a 1x1 conv when the channel count changes.
    Attention (single head over the H * W positions): h = group_norm(x); softmax(q k^T / sqrt(C)) v;
             out = to_out(attn) + x.

Every ``GroupNorm -> SiLU`` pair is one fused ``fastgen.nn.GroupNorm(..., activation="silu")``
(eps 1e-6), which keeps ``torch.nn.GroupNorm``'s state-dict keys; attention runs
``F.scaled_dot_product_attention`` behind one call site (:func:`attention`). Parameter
names are those of ``diffusers.AutoencoderKL``, so ``load_state_dict(diffusers_vae.state_dict())``
works as it is, and :meth:`AutoencoderKL.from_diffusers` does the whole conversion.

Scaling: as in diffusers, ``decode`` does **not** apply ``scaling_factor`` / ``shift_factor``.
A diffusion pipeline encodes ``z = (posterior.sample() - shift_factor) * scaling_factor`` and
decodes ``vae.decode(z / scaling_factor + shift_factor)`` (``shift_factor`` 0 when ``None``);
:meth:`AutoencoderKL.scale_latents` / :meth:`AutoencoderKL.unscale_latents` do exactly that.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastgen.nn import GroupNorm

NORM_EPS = 1e-6


# ----------------------------------------------------------------------------- config


@dataclass
class AutoencoderKLConfig:
    """The architecture, with diffusers' ``AutoencoderKL`` config names and defaults of SD 1.x."""

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    shift_factor: Optional[float] = None
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    # Image size the VAE was trained on; diffusers' default tile size (in pixels) for tiling.
    sample_size: int = 512
    # Read by diffusers pipelines (SDXL upcasts an fp16 VAE when force_upcast; some VAEs carry
    # per-channel latent statistics); kept as given, unused by the model itself.
    force_upcast: bool = True
    latents_mean: Optional[tuple] = None
    latents_std: Optional[tuple] = None

    def __post_init__(self) -> None:
        self.block_out_channels = tuple(int(c) for c in self.block_out_channels)
        if isinstance(self.sample_size, (list, tuple)):
            self.sample_size = int(self.sample_size[0])
        if not self.block_out_channels:
            raise ValueError("AutoencoderKLConfig: block_out_channels must not be empty")
        for c in self.block_out_channels:
            if c % self.norm_num_groups != 0:
                raise ValueError(
                    f"AutoencoderKLConfig: every block_out_channels entry must be divisible by "
                    f"norm_num_groups={self.norm_num_groups}, got {self.block_out_channels}"
                )

    @property
    def downsample_factor(self) -> int:
        """Pixels per latent position along each axis: ``2 ** (len(block_out_channels) - 1)``."""
        return 2 ** (len(self.block_out_channels) - 1)


def sd_config(**overrides: Any) -> AutoencoderKLConfig:
    """SD 1.x / 2.x VAE (4 latent channels, scaling 0.18215). SDXL: ``scaling_factor=0.13025, sample_size=1024``."""
    return dataclasses.replace(AutoencoderKLConfig(), **overrides)


def sdxl_config(**overrides: Any) -> AutoencoderKLConfig:
    """SDXL VAE: the SD architecture with ``scaling_factor=0.13025`` and 1024-px samples."""
    return dataclasses.replace(AutoencoderKLConfig(scaling_factor=0.13025, sample_size=1024), **overrides)


def flux_config(**overrides: Any) -> AutoencoderKLConfig:
    """Flux VAE: 16 latent channels, no quant convs, ``scaling_factor=0.3611``, ``shift_factor=0.1159``.

    SD3's VAE is the same architecture with ``scaling_factor=1.5305, shift_factor=0.0609``.
    """
    cfg = AutoencoderKLConfig(latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159,
                              use_quant_conv=False, use_post_quant_conv=False, sample_size=1024)
    return dataclasses.replace(cfg, **overrides)


# ----------------------------------------------------------------------------- posterior


class DiagonalGaussianDistribution:
    """``N(mean, exp(logvar))`` per latent element, from the encoder's ``(N, 2 * Cz, h, w)`` moments.

    Same fields and methods as diffusers': ``parameters``, ``mean``, ``logvar`` (clamped to
    [-30, 20]), ``std``, ``var``, ``sample(generator)``, ``mode()``, ``kl()``.
    """

    def __init__(self, parameters: Tensor, deterministic: bool = False) -> None:
        self.parameters = parameters
        self.mean, logvar = torch.chunk(parameters, 2, dim=1)
        self.logvar = torch.clamp(logvar, -30.0, 20.0)
        self.deterministic = deterministic
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)
        if deterministic:
            self.var = self.std = torch.zeros_like(self.mean)

    def sample(self, generator: Optional[torch.Generator] = None) -> Tensor:
        """``mean + std * eps``, ``eps ~ N(0, 1)`` drawn on the generator's device (as diffusers does)."""
        device = self.mean.device if generator is None else generator.device
        eps = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * eps.to(self.mean.device)

    def mode(self) -> Tensor:
        return self.mean

    @property
    def latent_dist(self) -> "DiagonalGaussianDistribution":
        """Itself: so ``vae.encode(x).latent_dist.sample()`` (diffusers' pipelines) works as well."""
        return self

    def kl(self) -> Tensor:
        """``KL(q || N(0, 1))`` per sample, summed over (C, h, w)."""
        if self.deterministic:
            return torch.zeros(self.mean.shape[0], device=self.mean.device)
        return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=[1, 2, 3])


# ----------------------------------------------------------------------------- outputs, diffusers-style


class DecodedImage(Tensor):
    """What ``AutoencoderKL.decode(z)`` returns: a plain tensor (ops on it give plain tensors) that
    also answers diffusers' ``.sample``, so ``vae.decode(z).sample`` in a pipeline works unchanged."""

    __torch_function__ = torch._C._disabled_torch_function_impl

    @property
    def sample(self) -> Tensor:
        return self.as_subclass(Tensor)


@dataclass
class DecoderOutput:
    """``decode(z, return_dict=True)``: diffusers' ``DecoderOutput`` fields (``sample``), ``out[0]`` too."""

    sample: Tensor

    def __getitem__(self, i: Any) -> Tensor:
        if i in (0, "sample"):
            return self.sample
        raise KeyError(i)

    def to_tuple(self) -> tuple:
        return (self.sample,)


def _as_decoded(x: Tensor) -> Tensor:
    if torch.compiler.is_compiling():
        return x
    return x.as_subclass(DecodedImage)


# ----------------------------------------------------------------------------- layers


def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """The single attention call site: ``softmax(q k^T / sqrt(d)) v`` on ``(N, heads, L, d)``."""
    return F.scaled_dot_product_attention(q, k, v)


class ResnetBlock(nn.Module):
    """diffusers' ``ResnetBlock2D`` without time embedding: ``shortcut(x) + conv2(silu(norm2(conv1(silu(norm1(x))))))``."""

    def __init__(self, in_channels: int, out_channels: int, groups: int) -> None:
        super().__init__()
        self.norm1 = GroupNorm(groups, in_channels, eps=NORM_EPS, activation="silu")
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = GroupNorm(groups, out_channels, eps=NORM_EPS, activation="silu")
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv2(self.norm2(self.conv1(self.norm1(x))))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h


class Attention(nn.Module):
    """diffusers' VAE mid-block ``Attention``: one head of width C over the H * W positions, residual."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.group_norm = GroupNorm(groups, channels, eps=NORM_EPS)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels), nn.Dropout(0.0)])

    def core(self, h: Tensor) -> Tensor:
        """Everything but the norm and the residual: ``(N, C, H, W)`` normalized -> ``(N, C, H, W)``."""
        n, c, hh, ww = h.shape
        t = h.reshape(n, c, hh * ww).transpose(1, 2)  # (N, L, C)
        q, k, v = (lin(t).unsqueeze(1) for lin in (self.to_q, self.to_k, self.to_v))  # (N, 1, L, C)
        o = attention(q, k, v).squeeze(1)
        o = self.to_out[1](self.to_out[0](o))
        return o.transpose(1, 2).reshape(n, c, hh, ww).contiguous()

    def forward(self, x: Tensor) -> Tensor:
        return self.core(self.group_norm(x)) + x


class Downsample(nn.Module):
    """Pad (right, bottom) by one zero, then a stride-2 3x3 conv (diffusers' ``Downsample2D``, padding=0)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest x2 upsampling, then a 3x3 conv (diffusers' ``Upsample2D``)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class DownBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, layers: int, groups: int, downsample: bool) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock(in_channels if i == 0 else out_channels, out_channels, groups) for i in range(layers)
        )
        self.downsamplers = nn.ModuleList([Downsample(out_channels)]) if downsample else None

    def forward(self, x: Tensor) -> Tensor:
        for r in self.resnets:
            x = r(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        return x


class UpBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, layers: int, groups: int, upsample: bool) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock(in_channels if i == 0 else out_channels, out_channels, groups) for i in range(layers)
        )
        self.upsamplers = nn.ModuleList([Upsample(out_channels)]) if upsample else None

    def forward(self, x: Tensor) -> Tensor:
        for r in self.resnets:
            x = r(x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class MidBlock(nn.Module):
    """Resnet, (Attention), Resnet at the lowest resolution."""

    def __init__(self, channels: int, groups: int, add_attention: bool) -> None:
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, groups), ResnetBlock(channels, channels, groups)])
        self.attentions = nn.ModuleList([Attention(channels, groups)]) if add_attention else None

    def forward(self, x: Tensor) -> Tensor:
        x = self.resnets[0](x)
        if self.attentions is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x)


class Encoder(nn.Module):
    """``(N, in_channels, H, W) -> (N, 2 * latent_channels, H / f, W / f)`` (the posterior's moments)."""

    def __init__(self, cfg: AutoencoderKLConfig) -> None:
        super().__init__()
        chans, g = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, chans[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            DownBlock(chans[max(i - 1, 0)], c, cfg.layers_per_block, g, downsample=i < len(chans) - 1)
            for i, c in enumerate(chans)
        )
        self.mid_block = MidBlock(chans[-1], g, cfg.mid_block_add_attention)
        self.conv_norm_out = GroupNorm(g, chans[-1], eps=NORM_EPS, activation="silu")  # + conv_act
        self.conv_out = nn.Conv2d(chans[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv_in(x)
        for b in self.down_blocks:
            x = b(x)
        x = self.mid_block(x)
        return self.conv_out(self.conv_norm_out(x))


class Decoder(nn.Module):
    """``(N, latent_channels, h, w) -> (N, out_channels, h * f, w * f)``."""

    def __init__(self, cfg: AutoencoderKLConfig) -> None:
        super().__init__()
        rev, g = tuple(reversed(cfg.block_out_channels)), cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.latent_channels, rev[0], 3, padding=1)
        self.mid_block = MidBlock(rev[0], g, cfg.mid_block_add_attention)
        self.up_blocks = nn.ModuleList(
            UpBlock(rev[max(i - 1, 0)], c, cfg.layers_per_block + 1, g, upsample=i < len(rev) - 1)
            for i, c in enumerate(rev)
        )
        self.conv_norm_out = GroupNorm(g, rev[-1], eps=NORM_EPS, activation="silu")  # + conv_act
        self.conv_out = nn.Conv2d(rev[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        x = self.mid_block(self.conv_in(z))
        for b in self.up_blocks:
            x = b(x)
        return self.conv_out(self.conv_norm_out(x))


# ----------------------------------------------------------------------------- the model


class AutoencoderKL(nn.Module):
    """A diffusers-compatible KL autoencoder (SD 1.x/2.x/SDXL, SD3, Flux VAEs) on fastgen layers.

    ``AutoencoderKL(config)`` builds random weights; ``from_diffusers(vae)`` copies a
    ``diffusers.AutoencoderKL`` (config and weights, device and dtype). The state dict has
    diffusers' keys.

    - ``encode(x)``: ``x (N, in_channels, H, W)`` -> :class:`DiagonalGaussianDistribution`
      over ``(N, latent_channels, H / f, W / f)`` (``H``, ``W`` multiples of ``f`` decode back
      to the same size).
    - ``decode(z)``: ``z (N, latent_channels, h, w)`` -> ``(N, out_channels, h * f, w * f)``.
      No scaling inside (as in diffusers): pass ``unscale_latents(z)`` for latents from a pipeline.
    - ``tiled_decode`` / ``tiled_encode``: see :mod:`fastgen.vae.tiling`.
    """

    def __init__(self, config: Optional[AutoencoderKLConfig] = None, **overrides: Any) -> None:
        super().__init__()
        cfg = dataclasses.replace(config or AutoencoderKLConfig(), **overrides)
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        lc = cfg.latent_channels
        self.quant_conv = nn.Conv2d(2 * lc, 2 * lc, 1) if cfg.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(lc, lc, 1) if cfg.use_post_quant_conv else None
        # diffusers' tiling / slicing switches (enable_tiling / enable_slicing), same names and defaults
        self.use_tiling = False
        self.use_slicing = False
        self.tile_sample_min_size = cfg.sample_size
        self.tile_latent_min_size = cfg.sample_size // cfg.downsample_factor
        self.tile_overlap_factor = 0.25

    # -- what diffusers pipelines read besides config: dtype, device, the tiling / slicing switches

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def enable_tiling(self, use_tiling: bool = True) -> None:
        """Decode / encode inputs larger than one tile with fastgen's **lossless** tiling
        (:func:`fastgen.vae.tiled_decode` with ``consistent_colors=True``: equal to the full pass up
        to summation order), tiles of ``tile_latent_min_size`` latent positions / ``tile_sample_min_size`` px."""
        self.use_tiling = use_tiling

    def disable_tiling(self) -> None:
        self.enable_tiling(False)

    def enable_slicing(self) -> None:
        """Decode / encode a batch one sample at a time (lower peak memory, same result)."""
        self.use_slicing = True

    def disable_slicing(self) -> None:
        self.use_slicing = False

    # -- factors, as diffusers exposes them (vae.config.scaling_factor; here also as attributes)

    @property
    def scaling_factor(self) -> float:
        return self.config.scaling_factor

    @property
    def shift_factor(self) -> Optional[float]:
        return self.config.shift_factor

    @property
    def downsample_factor(self) -> int:
        return self.config.downsample_factor

    def scale_latents(self, z: Tensor) -> Tensor:
        """Encoder sample -> diffusion latent: ``(z - shift_factor) * scaling_factor``."""
        return (z - (self.shift_factor or 0.0)) * self.scaling_factor

    def unscale_latents(self, z: Tensor) -> Tensor:
        """Diffusion latent -> decoder input: ``z / scaling_factor + shift_factor``."""
        return z / self.scaling_factor + (self.shift_factor or 0.0)

    # -- encode / decode

    def _check(self, x: Tensor, channels: int, what: str) -> None:
        if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[1] != channels:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"AutoencoderKL.{what}: expected a tensor of shape (N, {channels}, H, W), got {shape}")

    def moments(self, x: Tensor) -> Tensor:
        """``(N, in_channels, H, W)`` -> ``(N, 2 * latent_channels, H / f, W / f)``: mean and logvar, stacked."""
        self._check(x, self.config.in_channels, "encode")
        if self.use_slicing and x.shape[0] > 1:
            return torch.cat([self._moments(xi) for xi in x.split(1)])
        return self._moments(x)

    def _moments(self, x: Tensor) -> Tensor:
        t = self.tile_sample_min_size
        if self.use_tiling and (x.shape[-1] > t or x.shape[-2] > t):
            from fastgen.vae.tiling import tiled_encode

            return tiled_encode(self, x, tile_size=t, consistent_colors=True, progress=False).parameters
        h = self.encoder(x)
        return self.quant_conv(h) if self.quant_conv is not None else h

    def encode(self, x: Tensor, return_dict: bool = True) -> Any:
        """Images -> the posterior (``.mean``, ``.logvar``, ``.sample(generator)``, ``.mode()``; also
        ``.latent_dist`` as diffusers' output has it). ``return_dict=False``: ``(posterior,)``."""
        post = DiagonalGaussianDistribution(self.moments(x))
        return post if return_dict else (post,)

    def decode(self, z: Tensor, return_dict: Optional[bool] = None, generator: Any = None) -> Any:
        """Latents ``(N, latent_channels, h, w)`` -> images ``(N, out_channels, h * f, w * f)`` (no scaling).

        Returns a tensor (a :class:`DecodedImage`: ``.sample`` gives the same tensor, as diffusers'
        ``vae.decode(z).sample`` expects); ``return_dict=True``: a :class:`DecoderOutput`;
        ``return_dict=False``: ``(images,)`` as diffusers. After :meth:`enable_tiling`, latents larger
        than one tile go through the lossless tiled decode; after :meth:`enable_slicing`, one sample
        at a time. ``generator`` is accepted for diffusers' signature and unused.
        """
        self._check(z, self.config.latent_channels, "decode")
        if self.use_slicing and z.shape[0] > 1:
            out = torch.cat([self._decode(zi) for zi in z.split(1)])
        else:
            out = self._decode(z)
        if return_dict is None:
            return _as_decoded(out)
        return DecoderOutput(out) if return_dict else (out,)

    def _decode(self, z: Tensor) -> Tensor:
        t = self.tile_latent_min_size
        if self.use_tiling and (z.shape[-1] > t or z.shape[-2] > t):
            from fastgen.vae.tiling import tiled_decode

            return tiled_decode(self, z, tile_size=t, consistent_colors=True, progress=False)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def forward(self, x: Tensor, sample_posterior: bool = False, return_dict: Optional[bool] = None,
                generator: Optional[torch.Generator] = None) -> Any:
        """Reconstruction: ``decode(encode(x).sample())`` or ``.mode()`` (``return_dict`` as in :meth:`decode`)."""
        post = self.encode(x)
        return self.decode(post.sample(generator) if sample_posterior else post.mode(), return_dict=return_dict)

    def tiled_decode(self, z: Tensor, **kwargs: Any) -> Tensor:
        """:func:`fastgen.vae.tiled_decode` on this VAE."""
        from fastgen.vae.tiling import tiled_decode

        return tiled_decode(self, z, **kwargs)

    def tiled_encode(self, x: Tensor, **kwargs: Any) -> DiagonalGaussianDistribution:
        """:func:`fastgen.vae.tiled_encode` on this VAE."""
        from fastgen.vae.tiling import tiled_encode

        return tiled_encode(self, x, **kwargs)

    # -- diffusers interop

    @staticmethod
    def config_from_diffusers(diffusers_config: Any) -> AutoencoderKLConfig:
        """An :class:`AutoencoderKLConfig` from a diffusers ``AutoencoderKL.config`` (a dict-like)."""
        c = dict(diffusers_config)
        if c.get("act_fn", "silu") != "silu":
            raise ValueError(f"from_diffusers: only act_fn='silu' is supported, got {c['act_fn']!r}")
        for key, want in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            bad = [t for t in c.get(key, (want,)) if t != want]
            if bad:
                raise ValueError(f"from_diffusers: only {want} blocks are supported in {key}, got {bad}")
        names = [f.name for f in dataclasses.fields(AutoencoderKLConfig)]
        return AutoencoderKLConfig(**{k: c[k] for k in names if k in c and (c[k] is not None or k == "shift_factor")})

    @classmethod
    def from_diffusers(cls, vae: Any) -> "AutoencoderKL":
        """Copy a ``diffusers.AutoencoderKL``: config, weights, device and dtype; outputs match within tolerance."""
        model = cls(cls.config_from_diffusers(vae.config))
        p = next(vae.parameters())
        model.to(device=p.device, dtype=p.dtype)
        model.load_state_dict(vae.state_dict())
        return model.eval()


__all__ = [
    "AutoencoderKL", "AutoencoderKLConfig", "DiagonalGaussianDistribution", "DecodedImage", "DecoderOutput",
    "Encoder", "Decoder",
    "ResnetBlock", "Attention", "MidBlock", "DownBlock", "UpBlock", "Downsample", "Upsample",
    "attention", "sd_config", "sdxl_config", "flux_config",
]
