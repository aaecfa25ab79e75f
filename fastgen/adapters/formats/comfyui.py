"""ComfyUI format: ``diffusion_model.<layer>.<tensor>`` with the model's own (dotted) layer names.

ComfyUI's loader accepts, per layer, ``lora_A.weight`` / ``lora_B.weight`` (what fastgen writes),
``lora_down.weight`` / ``lora_up.weight``, ``alpha`` (0-d; scale = alpha / r, absent = r),
``dora_scale``, and the LyCORIS ``hada_*`` / ``lokr_*`` tensors. rsLoRA is written as
``alpha * sqrt(r)``, as in the kohya format.
"""

from __future__ import annotations

import torch

from fastgen.adapters.formats.common import HADA, LOKR, UnmappableKeyError, effective_alpha, group
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
    mods = group(items, "ComfyUI")
    for m in mods.values():
        if m.kind == "lokr" and "w1a" not in m.tensors and "w2a" not in m.tensors:
            m.alpha = None
        elif m.alpha is None:
            m.alpha = float(m.rank)
    return AdapterWeights(mods, format="comfyui")


def write(w: AdapterWeights) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    sd: dict[str, torch.Tensor] = {}
    names = {"down": "lora_A.weight", "up": "lora_B.weight"}
    names.update({v: k for k, v in HADA.items()})
    lokr = {v: k for k, v in LOKR.items()}
    for layer, m in w.modules.items():
        base = PREFIX + layer
        for k, t in m.tensors.items():
            if k == "magnitude":
                sd[f"{base}.dora_scale"] = t.reshape(t.shape[0], *([1] * (m.tensors["down"].dim() - 1))).contiguous()
            else:
                sd[f"{base}.{(lokr if m.kind == 'lokr' else names)[k]}"] = t.detach().contiguous()
        alpha = effective_alpha(m, w.rslora)
        if alpha is not None:
            sd[f"{base}.alpha"] = torch.tensor(float(alpha))
    return sd, {}
