"""ComfyUI format: ``diffusion_model.<layer>.<tensor>`` with the model's own (dotted) layer names.

ComfyUI's loader accepts, per layer, ``lora_A.weight`` / ``lora_B.weight`` (what fastgen writes),
``lora_down.weight`` / ``lora_up.weight``, ``alpha`` (0-d; scale = alpha / r, absent = r),
``dora_scale``, and the LyCORIS ``hada_*`` / ``lokr_*`` tensors. rsLoRA is written as
``alpha * sqrt(r)``, as in the kohya format.
"""

from __future__ import annotations

import torch

from fastgen.adapters.formats.common import HADA, LOKR, UnmappableKeyError, default_alphas, group, write_layer
from fastgen.adapters.state import AdapterWeights

PREFIX = "diffusion_model."
SUFFIXES = {"lora_A.weight": ("down", "lora"), "lora_B.weight": ("up", "lora"),
            "lora_down.weight": ("down", "lora"), "lora_up.weight": ("up", "lora"),
            "dora_scale": ("magnitude", "lora"), "alpha": ("alpha", "any")}
SUFFIXES.update({k: (v, "loha") for k, v in HADA.items()})
SUFFIXES.update({k: (v, "lokr") for k, v in LOKR.items()})


def matches(keys: list[str]) -> bool:
    return any(k.startswith(PREFIX) for k in keys)


def read(sd: dict[str, torch.Tensor], meta: dict) -> AdapterWeights:
    items = []
    for key, t in sd.items():
        if not key.startswith(PREFIX):
            raise UnmappableKeyError(f"key {key!r} of the ComfyUI file is not under {PREFIX!r}")
        rest = key[len(PREFIX):]
        for suf in sorted(SUFFIXES, key=len, reverse=True):
            if rest.endswith("." + suf):
                what, family = SUFFIXES[suf]
                items.append((rest[: -len(suf) - 1], what, family, t.reshape(-1) if what == "magnitude" else t))
                break
        else:
            raise UnmappableKeyError(f"key {key!r} of the ComfyUI file is not a known tensor name")
    return AdapterWeights(default_alphas(group(items, "ComfyUI")), format="comfyui")


def write(w: AdapterWeights) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    sd: dict[str, torch.Tensor] = {}
    for layer, m in w.modules.items():
        write_layer(sd, PREFIX + layer, m, ("lora_A.weight", "lora_B.weight"), w.rslora)
    return sd, {}
