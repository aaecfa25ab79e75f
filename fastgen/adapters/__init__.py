"""fastgen.adapters: LoRA, LoCoN, LoHa, LoKr and DoRA on any torch model's Linear / Conv2d layers,
their file formats (PEFT/diffusers, kohya/A1111/LyCORIS, ComfyUI), a fused LoRA kernel and
weight-only quantized bases for adapter training.

Train::

    fastgen.adapters.add_adapter(model, "style", kind="lora", rank=16, targets="attention+ff")
    opt = torch.optim.AdamW(fastgen.adapters.adapter_parameters(model), lr=1e-4)
    fastgen.adapters.save(model, "style.safetensors", format="kohya", name="style")

Use a file from any tool::

    w = fastgen.adapters.load("file.safetensors")     # w.format: "peft" | "kohya" | "comfyui"
    fastgen.adapters.apply(pipe_or_model, w, name="style", scale=0.8)
    fastgen.adapters.remove(pipe_or_model)

See docs/adapters.md.
"""

from __future__ import annotations

import os

from torch import nn

from fastgen.adapters import fastgen_models as _fgm
from fastgen.adapters import formats
from fastgen.adapters.formats import FORMATS, UnmappableKeyError, detect
from fastgen.adapters.formats import kohya as _kohya
from fastgen.adapters.formats import via_diffusers as _via_diffusers
from fastgen.adapters.inject import (
    adapter_names, adapter_parameters, add_adapter, add_weights, disable, disabled, enable, fingerprint,
    get_weights, merge, set_scale, unmerge, use_backend,
)
from fastgen.adapters.inject import merge as _merge
from fastgen.adapters.inject import remove as _remove
from fastgen.adapters.quantize import base_nbytes, dequantize, load_quantized, quantize, save_quantized
from fastgen.adapters.state import AdapterWeights, ModuleWeights

__all__ = [
    "AdapterWeights", "FORMATS", "ModuleWeights", "UnmappableKeyError", "adapter_names", "adapter_parameters",
    "add_adapter", "add_weights", "apply", "base_nbytes", "convert", "dequantize", "detect", "disable", "disabled", "enable", "fingerprint",
    "get_weights", "load", "load_quantized", "merge", "quantize", "remove", "save", "save_quantized", "set_scale",
    "unmerge", "use_backend",
]

_DENOISERS = ("transformer", "unet")


def _components(target) -> dict[str, nn.Module]:
    """{"denoiser": model} for a module; the denoiser and text encoders of a diffusers pipeline."""
    if isinstance(target, nn.Module):
        return {"denoiser": target}
    comps = {}
    for attr in _DENOISERS:
        if isinstance(getattr(target, attr, None), nn.Module):
            comps["denoiser"] = getattr(target, attr)
            break
    for attr in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        if isinstance(getattr(target, attr, None), nn.Module):
            comps[attr] = getattr(target, attr)
    if "denoiser" not in comps:
        raise TypeError(f"expected an nn.Module or a diffusers pipeline with a unet/transformer, got {type(target).__name__}")
    return comps


def load(path: str | os.PathLike) -> AdapterWeights:
    """Read an adapter file (safetensors) of any supported format; ``.format`` names the one found."""
    return formats.read_file(path)


def apply(target, adapter: str | os.PathLike | AdapterWeights, name: str = "default", scale: float = 1.0,
          check_base: bool = True, merge: bool = False) -> AdapterWeights:
    """Add the adapter (a path or loaded weights) to a model or a diffusers pipeline as adapter
    ``name`` with multiplier ``scale``, unmerged (``merge=True`` folds it into the weights). Every
    layer of the file must map to a layer of the target, else the error names the unmatched keys.
    fastgen.models take adapters merged only (their fused kernels bypass layer hooks); the file's
    to_q / to_k / to_v land on the fused to_qkv rows. Returns the weights that were applied."""
    w = adapter if isinstance(adapter, AdapterWeights) else load(adapter)
    comps = _components(target)
    unplaced = [c for c in w.extra if c not in comps]
    if unplaced:
        keys = [w.extra[c].keys.get(n, f"{c}.{n}") for c in unplaced for n in list(w.extra[c].modules)[:5]]
        raise UnmappableKeyError(
            f"the file holds adapters for {unplaced} that {type(target).__name__} does not have; e.g. keys {keys}"
        )
    parts = [("denoiser", w)] + list(w.extra.items())
    for comp, part in parts:
        if not part.modules:
            continue
        model = comps[comp]
        if _fgm.is_fastgen_model(model):
            if not merge:
                raise TypeError(_fgm.HOOK_ERROR.format(cls=type(model).__name__))
            _fgm.merge_weights(model, _kohya.resolve(part, model, _fgm.diffusers_layer_names(model)), scale)
            continue
        part = _resolve(part, w, model, comp)
        add_weights(model, part, name=name, check_base=check_base and comp == "denoiser")
        set_scale(model, name, scale)
        if merge:
            _merge(model, name)
    return w


def _resolve(part: AdapterWeights, whole: AdapterWeights, model: nn.Module, comp: str) -> AdapterWeights:
    """Map kohya's flattened names onto the model; names in the model's original layout (Flux's
    fused qkv, SDXL's SGM blocks) go through diffusers' own converter when it is installed."""
    try:
        return _kohya.resolve(part, model)
    except UnmappableKeyError as exc:
        conv = _via_diffusers.convert(whole.source, model) if comp == "denoiser" and whole.source else None
        if conv is None or not conv.modules:
            raise UnmappableKeyError(f"{exc} (diffusers' converter could not map it either, or is not installed)") from exc
        conv.extra, conv.base, conv.base_class = {}, part.base, part.base_class
        return conv


def convert(src: str | os.PathLike, dst: str | os.PathLike, format: str, model: nn.Module | None = None,
            prefix: str | None = None) -> AdapterWeights:
    """Rewrite adapter file ``src`` as ``dst`` in ``format``. A kohya file's flattened names need the
    ``model`` they belong to (to put the dots back); other formats convert without it. Returns
    the weights read from ``src`` (``.format`` is its format)."""
    w = load(src)
    out = w
    if w.names == "flat":
        if model is None:
            raise ValueError(f"{os.fspath(src)} is a kohya file: its flattened layer names need the model "
                             "(convert(src, dst, format, model=...))")
        out = _resolve(w, w, _components(model)["denoiser"], "denoiser")
        out.base, out.base_class = w.base, w.base_class
    if out.extra:
        raise ValueError(f"{os.fspath(src)} holds adapters for {sorted(out.extra)} too; convert writes the denoiser's only")
    formats.write_file(out, dst, format=format, prefix=prefix)
    return w


def remove(target, names=None) -> None:
    """Remove adapters (all by default) from a model or pipeline, restoring the base layers."""
    for model in _components(target).values():
        have = adapter_names(model)
        todo = have if names is None else [n for n in ([names] if isinstance(names, str) else names) if n in have]
        if todo:
            _remove(model, todo)


def _default_prefix(model: nn.Module, format: str) -> str | None:
    if format == "kohya":
        return "lora_unet"
    if format in ("peft", "diffusers") and type(model).__module__.startswith("diffusers"):
        return "unet" if "UNet" in type(model).__name__ else "transformer"
    return None


def save(target, path: str | os.PathLike, format: str = "peft", name: str = "default", prefix: str | None = None,
         dtype=None) -> None:
    """Write adapter ``name`` of a model (or a pipeline's denoiser) as safetensors in ``format``
    ("peft" = "diffusers", "kohya", "comfyui"). ``prefix``: the component prefix of PEFT keys
    ("unet" / "transformer" for diffusers models by default, none for other models) or the kohya
    key prefix ("lora_unet")."""
    model = _components(target)["denoiser"]
    w = get_weights(model, name)
    formats.write_file(w, path, format=format, prefix=prefix or _default_prefix(model, format), dtype=dtype)
