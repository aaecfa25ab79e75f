"""fastgen.zoo: the catalogue's smaller generative models on fastgen's fused ops.

One readable file per model, ``fastgen/zoo/<name>.py``: a config dataclass at the top, the
modules, the loss and the sampler. ``fastgen.zoo.data`` generates the datasets the tests and
docs train on (16x16 coloured shapes, 2-D two moons and Gaussian mixtures). Pages: ``docs/zoo/``.

Every model speaks one training protocol (``optimizer_params()``, ``train_step(batch, optimizers,
step, generator)``, ``measure(test, ...)``), which ``fastgen train configs/zoo/<model>.toml``
drives: ``fastgen.zoo.train`` (the runner) and ``fastgen.zoo.train_config`` (its TOML schema).

Names are imported on first use, so ``import fastgen`` stays light.
"""

from __future__ import annotations

import importlib

_MODULES = {
    "VAE": "fastgen.zoo.vae",
    "VAEConfig": "fastgen.zoo.vae",
    "BetaVAE": "fastgen.zoo.vae",
    "GAN": "fastgen.zoo.gan",
    "GANConfig": "fastgen.zoo.gan",
    "RealNVP": "fastgen.zoo.realnvp",
    "RealNVPConfig": "fastgen.zoo.realnvp",
    "WGANGP": "fastgen.zoo.wgangp",
    "WGANGPConfig": "fastgen.zoo.wgangp",
    "ConditionalGAN": "fastgen.zoo.cgan",
    "ConditionalGANConfig": "fastgen.zoo.cgan",
    "ScoreSDE": "fastgen.zoo.score_sde",
    "ScoreSDEConfig": "fastgen.zoo.score_sde",
    "VQVAE": "fastgen.zoo.vqvae",
    "VQVAEConfig": "fastgen.zoo.vqvae",
    "CycleGAN": "fastgen.zoo.cyclegan",
    "CycleGANConfig": "fastgen.zoo.cyclegan",
    "ConsistencyModel": "fastgen.zoo.consistency",
    "ConsistencyModelConfig": "fastgen.zoo.consistency",
}

__all__ = sorted(_MODULES)


def __getattr__(name: str):
    if name not in _MODULES:
        raise AttributeError(f"module 'fastgen.zoo' has no attribute {name!r}")
    return getattr(importlib.import_module(_MODULES[name]), name)


def __dir__():
    return __all__
