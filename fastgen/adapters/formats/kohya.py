"""kohya sd-scripts / A1111 / LyCORIS format.

Keys: ``lora_unet_<layer with '.' -> '_'>.<tensor>`` (``lora_te_``, ``lora_te1_``, ``lora_te2_`` for
text encoders; ``lora_transformer_`` from some trainers), tensors:

- LoRA / LoCoN: ``lora_down.weight (r, in[, kh, kw])``, ``lora_up.weight (out, r[, 1, 1])``;
- ``alpha`` (a 0-d tensor; scale = alpha / r; absent means alpha = r);
- DoRA (LyCORIS): ``dora_scale`` = the magnitude, ``(out, 1)`` / ``(out, 1, 1, 1)``;
- LoHa: ``hada_w1_a (out, r)``, ``hada_w1_b (r, in_flat)``, ``hada_w2_a``, ``hada_w2_b``;
- LoKr: ``lokr_w1`` or ``lokr_w1_a/_b``, ``lokr_w2`` or ``lokr_w2_a/_b`` (alpha counts only for
  factored ones, as LyCORIS and ComfyUI apply it).

The flattened name loses the dots, so it is resolved against a model (:func:`resolve`): each
adaptable layer's name with ``.`` -> ``_`` must equal it. There is no rank-stabilised flag in
this format: rsLoRA adapters are written with ``alpha * sqrt(r)``, which gives the same scale.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from fastgen.adapters import targets as _targets
from fastgen.adapters.formats.common import HADA, LOKR, UnmappableKeyError, default_alphas, group, write_layer
from fastgen.adapters.state import AdapterWeights

PREFIXES = {"lora_unet_": "denoiser", "lora_transformer_": "denoiser", "lora_te_": "text_encoder",
            "lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2", "lora_te3_": "text_encoder_3"}
SUFFIXES = {"lora_down.weight": ("down", "lora"), "lora_up.weight": ("up", "lora"),
            "dora_scale": ("magnitude", "lora"), "alpha": ("alpha", "any")}
SUFFIXES.update({k: (v, "loha") for k, v in HADA.items()})
SUFFIXES.update({k: (v, "lokr") for k, v in LOKR.items()})


def matches(keys: list[str]) -> bool:
    return any(k.startswith(tuple(PREFIXES)) for k in keys)


def flat(name: str) -> str:
    return name.replace(".", "_")


def _split(key: str) -> tuple[str, str, str]:
    for pre in sorted(PREFIXES, key=len, reverse=True):
        if key.startswith(pre):
            rest = key[len(pre):]
            for suf in sorted(SUFFIXES, key=len, reverse=True):
                if rest.endswith("." + suf):
                    return PREFIXES[pre], rest[: -len(suf) - 1], suf
            break
    raise UnmappableKeyError(f"key {key!r} of the kohya/LyCORIS file is not a known tensor name")


def read(sd: dict[str, torch.Tensor], meta: dict) -> AdapterWeights:
    rows: dict[str, list] = {}
    keys: dict[str, dict] = {}
    for key, t in sd.items():
        comp, layer, suf = _split(key)
        what, family = SUFFIXES[suf]
        if what == "magnitude":
            t = t.reshape(-1)
        rows.setdefault(comp, []).append((layer, what, family, t))
        keys.setdefault(comp, {})[layer] = key.rsplit(".", 2 if suf.endswith(".weight") else 1)[0]
    comps = {}
    for comp, items in rows.items():
        mods = default_alphas(group(items, "kohya/LyCORIS"))
        comps[comp] = AdapterWeights(mods, format="kohya", names="flat", keys=keys[comp])
    main = comps.pop("denoiser", AdapterWeights({}, format="kohya", names="flat"))
    main.extra = comps
    return main


def resolve(w: AdapterWeights, model: nn.Module, names: list[str] | None = None) -> AdapterWeights:
    """Replace flattened layer names by the model's dotted ones (or by ``names``, when given);
    unmatched names are an error that lists the file's keys."""
    if w.names != "flat":
        return w
    if names is None:
        names = [n for n, m in model.named_modules() if n and _targets.adaptable(m)]
    table = {flat(n): n for n in names}
    missing = [w.keys.get(n, n) for n in w.modules if n not in table]
    if missing:
        more = f" (and {len(missing) - 10} more)" if len(missing) > 10 else ""
        raise UnmappableKeyError(
            f"{len(missing)} of the file's {len(w.modules)} layers match no Linear/Conv2d layer of "
            f"{type(model).__name__}: {', '.join(sorted(missing)[:10])}{more}. Is the file for another model "
            "(or in another layout, such as Flux's original fused-qkv names)?"
        )
    out = AdapterWeights({table[n]: m for n, m in w.modules.items()}, format=w.format, rslora=w.rslora,
                         base=w.base, base_class=w.base_class, metadata=w.metadata, extra=w.extra)
    return out


def write(w: AdapterWeights, prefix: str = "lora_unet") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    sd: dict[str, torch.Tensor] = {}
    for layer, m in w.modules.items():
        base = f"{prefix}_{flat(layer)}"
        if not re.fullmatch(r"[A-Za-z0-9_]+", base):
            raise UnmappableKeyError(f"layer name {layer!r} cannot be written as a kohya key")
        write_layer(sd, base, m, ("lora_down.weight", "lora_up.weight"), w.rslora)
    return sd, {}
