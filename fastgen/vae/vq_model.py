"""``fastgen.vae.VQModel``: diffusers' ``VQModel`` (VQ-GAN style autoencoder) on fastgen layers.

    encode:  x (N, in_channels, H, W) -> Encoder (conv_out: latent_channels, no "double z")
             -> quant_conv (1x1) -> h (N, vq_embed_dim, H / f, W / f)
    decode:  h -> quantize (nearest code, commitment loss, straight-through; see
             :mod:`fastgen.vae.quantizer`) -> post_quant_conv (1x1) -> Decoder -> (N, out_channels, H, W)

The Encoder / Decoder are :class:`fastgen.vae.AutoencoderKL`'s (fused GroupNorm+SiLU), the
quantizer is :class:`fastgen.vae.VectorQuantizer` with diffusers' legacy loss
``||sg(z_q) - h||^2 + 0.25 ||z_q - sg(h)||^2`` and its codebook at ``quantize.embedding.weight``,
so diffusers' state dict loads as it is. ``norm_type="spatial"`` (MoVQ's SpatialNorm decoder) is
not supported. Outputs mirror diffusers': ``encode(x).latents``, ``decode(h).sample`` and
``.commit_loss``, ``return_dict=False`` tuples.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor, nn

from fastgen.vae.autoencoder_kl import AutoencoderKLConfig, Decoder, Encoder
from fastgen.vae.quantizer import VectorQuantizer


@dataclass
class VQModelConfig:
    """diffusers' ``VQModel`` config names and defaults."""

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 3
    block_out_channels: tuple = (64,)
    layers_per_block: int = 1
    norm_num_groups: int = 32
    num_vq_embeddings: int = 256
    vq_embed_dim: Optional[int] = None
    scaling_factor: float = 0.18215
    mid_block_add_attention: bool = True
    sample_size: int = 32
    force_upcast: bool = False

    def __post_init__(self) -> None:
        self.block_out_channels = tuple(int(c) for c in self.block_out_channels)
        if isinstance(self.sample_size, (list, tuple)):
            self.sample_size = int(self.sample_size[0])
        if self.vq_embed_dim is None:
            self.vq_embed_dim = self.latent_channels

    def autoencoder(self) -> AutoencoderKLConfig:
        """The Encoder / Decoder shape as an :class:`AutoencoderKLConfig`."""
        return AutoencoderKLConfig(in_channels=self.in_channels, out_channels=self.out_channels,
                                   latent_channels=self.latent_channels, block_out_channels=self.block_out_channels,
                                   layers_per_block=self.layers_per_block, norm_num_groups=self.norm_num_groups,
                                   mid_block_add_attention=self.mid_block_add_attention, sample_size=self.sample_size)


@dataclass
class VQEncoderOutput:
    latents: Tensor


@dataclass
class VQDecoderOutput:
    sample: Tensor
    commit_loss: Tensor


class VQModel(nn.Module):
    """A diffusers-compatible VQ autoencoder. ``VQModel(config)`` random weights; ``from_diffusers(vq)``
    copies a ``diffusers.VQModel`` (config, weights, device, dtype)."""

    def __init__(self, config: Optional[VQModelConfig] = None, backend: Optional[str] = "auto", **overrides: Any) -> None:
        super().__init__()
        cfg = dataclasses.replace(config or VQModelConfig(), **overrides)
        self.config = cfg
        ae = cfg.autoencoder()
        self.encoder = Encoder(ae)
        self.encoder.conv_out = nn.Conv2d(cfg.block_out_channels[-1], cfg.latent_channels, 3, padding=1)
        self.quant_conv = nn.Conv2d(cfg.latent_channels, cfg.vq_embed_dim, 1)
        self.quantize = VectorQuantizer(cfg.num_vq_embeddings, cfg.vq_embed_dim, beta=0.25, channel_dim=1,
                                        legacy=True, backend=backend)
        self.post_quant_conv = nn.Conv2d(cfg.vq_embed_dim, cfg.latent_channels, 1)
        self.decoder = Decoder(ae)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def encode(self, x: Tensor, return_dict: bool = True) -> Any:
        """Images -> pre-quantization latents ``h (N, vq_embed_dim, H / f, W / f)``."""
        if x.dim() != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(f"VQModel.encode: expected (N, {self.config.in_channels}, H, W), got {tuple(x.shape)}")
        h = self.quant_conv(self.encoder(x))
        return VQEncoderOutput(h) if return_dict else (h,)

    def decode(self, h: Tensor, force_not_quantize: bool = False, return_dict: bool = True) -> Any:
        """Latents -> images (quantized first unless ``force_not_quantize``), with the commitment loss."""
        if h.dim() != 4 or h.shape[1] != self.config.vq_embed_dim:
            raise ValueError(f"VQModel.decode: expected (N, {self.config.vq_embed_dim}, h, w), got {tuple(h.shape)}")
        if force_not_quantize:
            quant, loss = h, torch.zeros(h.shape[0], device=h.device, dtype=h.dtype)
        else:
            quant, loss, _ = self.quantize(h)
        dec = self.decoder(self.post_quant_conv(quant))
        return VQDecoderOutput(dec, loss) if return_dict else (dec, loss)

    def forward(self, sample: Tensor, return_dict: bool = True) -> Any:
        dec = self.decode(self.encode(sample).latents)
        return dec if return_dict else (dec.sample, dec.commit_loss)

    @staticmethod
    def config_from_diffusers(diffusers_config: Any) -> VQModelConfig:
        c = dict(diffusers_config)
        if c.get("norm_type", "group") != "group":
            raise ValueError(f"VQModel.from_diffusers: only norm_type='group' is supported, got {c['norm_type']!r}")
        if c.get("act_fn", "silu") != "silu":
            raise ValueError(f"VQModel.from_diffusers: only act_fn='silu' is supported, got {c['act_fn']!r}")
        if c.get("lookup_from_codebook", False):
            raise ValueError("VQModel.from_diffusers: lookup_from_codebook=True is not supported")
        for key, want in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            bad = [t for t in c.get(key, (want,)) if t != want]
            if bad:
                raise ValueError(f"VQModel.from_diffusers: only {want} blocks are supported in {key}, got {bad}")
        names = [f.name for f in dataclasses.fields(VQModelConfig)]
        return VQModelConfig(**{k: c[k] for k in names if k in c})

    @classmethod
    def from_diffusers(cls, vq: Any, backend: Optional[str] = "auto") -> "VQModel":
        """Copy a ``diffusers.VQModel``: config, weights (state dict as it is), device and dtype."""
        model = cls(cls.config_from_diffusers(vq.config), backend=backend)
        p = next(vq.parameters())
        model.to(device=p.device, dtype=p.dtype)
        model.load_state_dict(vq.state_dict())
        return model.eval()


__all__ = ["VQModel", "VQModelConfig", "VQEncoderOutput", "VQDecoderOutput"]
