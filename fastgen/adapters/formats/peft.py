"""PEFT / diffusers format (written by peft's ``save_pretrained``, diffusers' ``save_lora_weights``
and ``save_lora_adapter``, and the diffusers / SimpleTuner / ai-toolkit training scripts).

Keys: ``[<component>.]<layer>.lora_A.weight`` (down, ``(r, in[, kh, kw])``),
``.lora_B.weight`` (up, ``(out, r[, 1, 1])``), ``.lora_magnitude_vector`` (DoRA, ``(out,)``; PEFT
writes ``(1, out, 1, 1)`` for convolutions), ``.hada_w1_a`` ... (LoHa), ``.lokr_w1`` ... (LoKr).
``<component>`` is ``unet`` / ``transformer`` / ``text_encoder`` ... in a pipeline file,
``base_model.model`` in a PEFT checkpoint, absent in a bare model's file.

Alpha is not a tensor here: diffusers writes the LoraConfig as JSON in the safetensors metadata
under ``lora_adapter_metadata``, keys prefixed by the component in pipeline files
(``{"unet.r": 4, "unet.lora_alpha": 8, "unet.alpha_pattern": {...}, "unet.use_dora": false, ...}``).
Without it diffusers takes alpha = r (scale 1), and so does this reader. LoHa/LoKr are
written with their scale folded into the first factor (alpha = r), so any reader gets it right.
"""

from __future__ import annotations

import collections
import json
import re

import torch

from fastgen.adapters.formats.common import HADA, LOKR, UnmappableKeyError, effective_alpha, group
from fastgen.adapters.state import AdapterWeights, ModuleWeights

META_KEY = "lora_adapter_metadata"
COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "prior", "controlnet")
SUFFIXES = {"lora_A.weight": ("down", "lora"), "lora_B.weight": ("up", "lora"),
            "lora_magnitude_vector": ("magnitude", "lora"), "alpha": ("alpha", "any")}
SUFFIXES.update({k: (v, "loha") for k, v in HADA.items()})
SUFFIXES.update({k: (v, "lokr") for k, v in LOKR.items()})


def matches(keys: list[str]) -> bool:
    return any(re.search(r"\.(lora_A|lora_B)\.weight$|\.lora_magnitude_vector$|\.(hada|lokr)_w[12]", k) for k in keys)


def _split(key: str) -> tuple[str, str, str]:
    """key -> (component, layer, suffix)."""
    rest = key
    if rest.startswith("base_model.model."):
        rest = rest[len("base_model.model."):]
    comp = "denoiser"
    head = rest.split(".", 1)[0]
    if head in COMPONENTS:
        comp, rest = ("denoiser" if head in ("unet", "transformer") else head), rest.split(".", 1)[1]
    for suf in sorted(SUFFIXES, key=len, reverse=True):
        if rest.endswith("." + suf):
            return comp, rest[: -len(suf) - 1], suf
    raise UnmappableKeyError(f"key {key!r} of the PEFT/diffusers file is not a LoRA/DoRA/LoHa/LoKr tensor name")


def _config(meta: dict, component_prefix: str | None) -> dict | None:
    if not meta or META_KEY not in meta:
        return None
    raw = json.loads(meta[META_KEY])
    if component_prefix and any(k.startswith(component_prefix + ".") for k in raw):
        return {k[len(component_prefix) + 1:]: v for k, v in raw.items() if k.startswith(component_prefix + ".")}
    return raw


def _pattern_value(patterns: dict, layer: str, default):
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", layer):
            return value
    return default


def read(sd: dict[str, torch.Tensor], meta: dict) -> AdapterWeights:
    rows: dict[str, list] = collections.defaultdict(list)
    prefixes = {}
    for key, t in sd.items():
        comp, layer, suf = _split(key)
        what, family = SUFFIXES[suf]
        if what == "magnitude":
            t = t.reshape(-1)
        rows[comp].append((layer, what, family, t))
        prefixes[comp] = key.split(".", 1)[0] if key.split(".", 1)[0] in COMPONENTS else None
    comps = {}
    for comp, items in rows.items():
        mods = group(items, "PEFT/diffusers")
        cfg = _config(meta, prefixes[comp])
        rslora = bool(cfg.get("use_rslora", False)) if cfg else False
        for layer, m in mods.items():
            if m.alpha is not None:
                continue
            if cfg and m.kind in ("lora", "dora") and "lora_alpha" in cfg:
                m.alpha = float(_pattern_value(cfg.get("alpha_pattern"), layer, cfg["lora_alpha"]))
            elif cfg and m.kind in ("loha", "lokr") and "alpha" in cfg:
                m.alpha = float(_pattern_value(cfg.get("alpha_pattern"), layer, cfg["alpha"]))
            elif m.kind != "lokr":
                m.alpha = float(m.rank)
        comps[comp] = AdapterWeights(mods, format="peft", rslora=rslora)
    main = comps.pop("denoiser", AdapterWeights({}, format="peft"))
    main.extra = comps
    return main


def _fold(m: ModuleWeights, rslora: bool) -> ModuleWeights:
    """LoHa/LoKr with the scale folded into the first factor (alpha = rank: scale 1)."""
    t = dict(m.tensors)
    alpha = effective_alpha(m, rslora)
    if m.kind == "lokr" and "w2a" not in t and "w1a" not in t:
        return ModuleWeights(m.kind, t, None)
    s = alpha / m.rank
    first = "w1a" if m.kind == "loha" or "w1a" in t else "w1"
    t[first] = t[first] * s
    return ModuleWeights(m.kind, t, float(m.rank))


def write(w: AdapterWeights, prefix: str | None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    p = f"{prefix}." if prefix else ""
    sd: dict[str, torch.Tensor] = {}
    names = {"down": "lora_A.weight", "up": "lora_B.weight", "magnitude": "lora_magnitude_vector"}
    names.update({v: k for k, v in HADA.items()})
    lokr_names = {v: k for k, v in LOKR.items()}
    lora_like = {n: m for n, m in w.modules.items() if m.kind in ("lora", "dora")}
    for layer, m in w.modules.items():
        if m.kind in ("loha", "lokr"):
            m = _fold(m, w.rslora)
        table = lokr_names if m.kind == "lokr" else names
        for k, t in m.tensors.items():
            if k == "magnitude" and m.tensors["down"].dim() == 4:
                t = t.reshape(1, -1, 1, 1)  # PEFT's conv DoRA magnitude layout
            sd[f"{p}{layer}.{table[k]}"] = t.detach().contiguous()
    meta = {}
    if lora_like:
        ranks = {n: m.rank for n, m in lora_like.items()}
        alphas = {n: (m.alpha if m.alpha is not None else m.rank) for n, m in lora_like.items()}
        r = collections.Counter(ranks.values()).most_common(1)[0][0]
        a = collections.Counter(alphas.values()).most_common(1)[0][0]
        cfg = {
            "r": r, "lora_alpha": a,
            "rank_pattern": {f"^{n}": v for n, v in ranks.items() if v != r},
            "alpha_pattern": {f"^{n}": v for n, v in alphas.items() if v != a},
            "target_modules": sorted(lora_like), "use_dora": any(m.kind == "dora" for m in lora_like.values()),
            "use_rslora": w.rslora, "lora_dropout": 0.0, "bias": "none", "init_lora_weights": True,
        }
        if any(m.kind == "dora" for m in lora_like.values()) != all(m.kind == "dora" for m in lora_like.values()):
            raise ValueError("the PEFT/diffusers format cannot hold DoRA and plain LoRA layers in one adapter (use_dora is global)")
        meta[META_KEY] = json.dumps({(f"{prefix}.{k}" if prefix else k): v for k, v in cfg.items()}, sort_keys=True)
    return sd, meta
