"""VAEs on fastgen layers: a diffusers-compatible ``AutoencoderKL`` and tiled encode / decode.

- :class:`AutoencoderKL` (+ :class:`AutoencoderKLConfig`, :func:`sd_config`, :func:`sdxl_config`,
  :func:`flux_config`): loads a diffusers ``AutoencoderKL`` state dict as it is.
- :func:`tiled_decode` / :func:`tiled_encode`: any image size, linear (diffusers-identical) or
  cosine blending, and ``consistent_colors=True`` for GroupNorm statistics over the whole image.
  They also take a diffusers ``AutoencoderKL`` directly. ``consistent_colors=True`` is lossless
  (halo exchange, :mod:`fastgen.vae.halo`): equal to the full pass up to summation order.
- :class:`AutoencoderKLCogVideoX`: CogVideoX's causal 3-D video VAE (diffusers' weights and math);
  ``tiled_decode`` / ``tiled_encode`` of it (5-D) are lossless in space and time
  (:mod:`fastgen.vae.video_tiling`, ``frame_chunk``).
- :class:`VectorQuantizer` (nearest code with a fused Triton search, commitment loss,
  straight-through, EMA codebooks, residual VQ, LFQ) and :class:`VQModel` (diffusers' ``VQModel``).
"""

from fastgen.vae.autoencoder_kl import (
    AutoencoderKL,
    AutoencoderKLConfig,
    DecodedImage,
    DecoderOutput,
    DiagonalGaussianDistribution,
    flux_config,
    sd_config,
    sdxl_config,
)
from fastgen.vae.cogvideox import AutoencoderKLCogVideoX, CogVideoXVAEConfig
from fastgen.vae.quantizer import VectorQuantizer, VQOutput, nearest_code
from fastgen.vae.tiling import tiled_decode, tiled_encode
from fastgen.vae.vq_model import VQModel, VQModelConfig

__all__ = [
    "AutoencoderKL", "AutoencoderKLConfig", "DiagonalGaussianDistribution",
    "sd_config", "sdxl_config", "flux_config", "tiled_decode", "tiled_encode",
    "AutoencoderKLCogVideoX", "CogVideoXVAEConfig",
    "DecodedImage", "DecoderOutput", "VectorQuantizer", "VQOutput", "nearest_code", "VQModel", "VQModelConfig",
]
