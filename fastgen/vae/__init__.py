"""VAEs on fastgen layers: a diffusers-compatible ``AutoencoderKL`` and tiled encode / decode.

- :class:`AutoencoderKL` (+ :class:`AutoencoderKLConfig`, :func:`sd_config`, :func:`sdxl_config`,
  :func:`flux_config`): loads a diffusers ``AutoencoderKL`` state dict as it is.
- :func:`tiled_decode` / :func:`tiled_encode`: any image size, linear (diffusers-identical) or
  cosine blending, and ``consistent_colors=True`` for GroupNorm statistics over the whole image.
  They also take a diffusers ``AutoencoderKL`` directly.
"""

from fastgen.vae.autoencoder_kl import (
    AutoencoderKL,
    AutoencoderKLConfig,
    DiagonalGaussianDistribution,
    flux_config,
    sd_config,
    sdxl_config,
)
from fastgen.vae.tiling import tiled_decode, tiled_encode

__all__ = [
    "AutoencoderKL", "AutoencoderKLConfig", "DiagonalGaussianDistribution",
    "sd_config", "sdxl_config", "flux_config", "tiled_decode", "tiled_encode",
]
