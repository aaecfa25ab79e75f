"""fastgen.models: diffusion backbones as single readable files on fastgen's fused ops.

Each model lives in ``fastgen/models/<name>.py``: a config dataclass with the released
configurations as presets, the modules top-down, one attention call site
(``fastgen.ops.attention``), and ``from_diffusers`` / ``to_diffusers_state_dict`` /
``from_pretrained`` for weights interchangeable with diffusers.

Names are imported on first use, so ``import fastgen`` stays light.
"""

from __future__ import annotations

import importlib

_MODULES = {
    "DiT": "fastgen.models.dit",
    "DiTConfig": "fastgen.models.dit",
    "PixArt": "fastgen.models.pixart",
    "PixArtConfig": "fastgen.models.pixart",
    "SD3": "fastgen.models.sd3",
    "SD3Config": "fastgen.models.sd3",
    "Flux": "fastgen.models.flux",
    "FluxConfig": "fastgen.models.flux",
    "UNet2DCondition": "fastgen.models.unet",
    "UNet2DConditionConfig": "fastgen.models.unet",
    "CogVideoX": "fastgen.models.cogvideox",
    "CogVideoXConfig": "fastgen.models.cogvideox",
}

__all__ = sorted(_MODULES)


def __getattr__(name: str):
    if name not in _MODULES:
        raise AttributeError(f"module 'fastgen.models' has no attribute {name!r}")
    return getattr(importlib.import_module(_MODULES[name]), name)


def __dir__():
    return __all__
