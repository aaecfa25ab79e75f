"""fastgen: fused Triton and CUDA C++ kernels for generative models.

Public entry points:

- ``fastgen.ops``     functional ops (``fastgen.ops.rms_norm``, ...)
- ``fastgen.nn``      drop-in ``nn.Module`` layers (``fastgen.nn.RMSNorm``, ...)
- ``fastgen.optim``   fused optimizers, gradient clipping and EMA
- ``fastgen.models``  DiT, PixArt, SD3, Flux, UNet2DCondition, CogVideoX on the fused ops
- ``fastgen.vae``     a diffusers-compatible AutoencoderKL and tiled, colour-consistent encode/decode
- ``fastgen.patch(model)`` / ``fastgen.unpatch(model)``: fastgen's ops in an existing diffusers or torch model
- ``fastgen.backend`` which implementation runs; also callable as a context
  manager: ``with fastgen.backend("torch"): ...``
"""

from fastgen import backend  # noqa: F401  (module, callable as a context manager)
from fastgen import models, nn, ops, optim, patch, vae  # noqa: F401  (patch: package, callable: fastgen.patch(model))
from fastgen.patch import unpatch  # noqa: F401
from fastgen import adapters  # noqa: F401,E402  (LoRA/LoCoN/LoHa/LoKr/DoRA, their file formats, quantized bases)

__version__ = "0.1.0"
__all__ = ["backend", "models", "nn", "ops", "optim", "patch", "unpatch", "vae", "__version__"]
