"""Shared pieces of the adapter file formats: tensor-name suffixes, grouping keys by layer,
fastgen's own metadata entry, and the kohya / ComfyUI alpha rule and per-layer tensor names."""

from __future__ import annotations

import json

import torch

from fastgen.adapters.state import AdapterWeights, ModuleWeights

FASTGEN_META = "fastgen_adapter"

# LyCORIS / PEFT tensor names of LoHa and LoKr -> fastgen's
HADA = {"hada_w1_a": "w1a", "hada_w1_b": "w1b", "hada_w2_a": "w2a", "hada_w2_b": "w2b"}
LOKR = {"lokr_w1": "w1", "lokr_w1_a": "w1a", "lokr_w1_b": "w1b", "lokr_w2": "w2", "lokr_w2_a": "w2a", "lokr_w2_b": "w2b"}


class UnmappableKeyError(KeyError):
    """A key of an adapter file that no format rule (or no layer of the model) maps."""

    def __str__(self) -> str:  # KeyError quotes its message otherwise
        return str(self.args[0])


def group(items: list[tuple[str, str, str, torch.Tensor]], fmt: str) -> dict[str, ModuleWeights]:
    """``(layer, canonical tensor name or 'alpha', family, tensor)`` rows -> ModuleWeights by layer;
    family is "lora", "loha" or "lokr"."""
    raw: dict[str, dict] = {}
    for layer, what, family, t in items:
        entry = raw.setdefault(layer, {"tensors": {}, "alpha": None, "family": None})
        if what == "alpha":
            entry["alpha"] = float(t.float().reshape(-1)[0]) if torch.is_tensor(t) else float(t)
            continue
        if family != "any":
            if entry["family"] not in (None, family):
                raise UnmappableKeyError(f"layer {layer!r} mixes {entry['family']} and {family} tensors in one {fmt} file")
            entry["family"] = family
        entry["tensors"][what] = t
    out = {}
    for layer, e in raw.items():
        t, fam = e["tensors"], e["family"] or "lora"
        need = {"lora": ("down", "up"), "loha": ("w1a", "w1b", "w2a", "w2b")}.get(fam)
        if fam == "lokr":
            ok = ("w1" in t or {"w1a", "w1b"} <= t.keys()) and ("w2" in t or {"w2a", "w2b"} <= t.keys())
        else:
            ok = all(k in t for k in need)
        if not ok:
            raise UnmappableKeyError(f"layer {layer!r} of the {fmt} file has an incomplete {fam} ({sorted(t)} only)")
        kind = "dora" if fam == "lora" and "magnitude" in t else fam
        out[layer] = ModuleWeights(kind, t, e["alpha"])
    return out


def fastgen_metadata(w: AdapterWeights, rslora: bool) -> dict[str, str]:
    """``rslora``: whether the file's alphas are rank-stabilised (False where alpha_eff was written)."""
    return {FASTGEN_META: json.dumps({"base": w.base, "base_class": w.base_class, "rslora": rslora,
                                      "kinds": sorted(w.kinds)})}


def read_fastgen_metadata(meta: dict, w: AdapterWeights) -> None:
    if meta and FASTGEN_META in meta:
        info = json.loads(meta[FASTGEN_META])
        w.base, w.base_class = info.get("base"), info.get("base_class")
        w.rslora = bool(info.get("rslora", w.rslora))


def effective_alpha(m: ModuleWeights, rslora: bool) -> float | None:
    """The alpha that gives the same scale without rank-stabilisation (alpha_eff / r = alpha / sqrt(r))."""
    if m.alpha is None:
        return None
    return m.alpha * m.rank**0.5 if rslora and m.kind in ("lora", "dora") else m.alpha


def default_alphas(mods: dict[str, ModuleWeights]) -> dict[str, ModuleWeights]:
    """The kohya / ComfyUI alpha rule, in place: a LoKr with no factored half has none; any other
    module without an ``alpha`` tensor gets alpha = r (scale 1)."""
    for m in mods.values():
        if m.kind == "lokr" and "w1a" not in m.tensors and "w2a" not in m.tensors:
            m.alpha = None
        elif m.alpha is None:
            m.alpha = float(m.rank)
    return mods


def write_layer(sd: dict, base: str, m: ModuleWeights, lora_names: tuple[str, str], rslora: bool) -> None:
    """One layer's tensors under ``base`` (kohya / ComfyUI names): LoRA down / up as ``lora_names``,
    ``dora_scale`` (out, 1[, 1, 1]), LyCORIS ``hada_*`` / ``lokr_*``, and a 0-d ``alpha``."""
    names = {"down": lora_names[0], "up": lora_names[1], **{v: k for k, v in HADA.items()}}
    if m.kind == "lokr":
        names = {v: k for k, v in LOKR.items()}
    for k, t in m.tensors.items():
        if k == "magnitude":
            sd[f"{base}.dora_scale"] = t.reshape(t.shape[0], *([1] * (m.tensors["down"].dim() - 1))).contiguous()
        else:
            sd[f"{base}.{names[k]}"] = t.detach().contiguous()
    alpha = effective_alpha(m, rslora)
    if alpha is not None:
        sd[f"{base}.alpha"] = torch.tensor(float(alpha))
