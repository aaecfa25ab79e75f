"""``fastgen.patch(pipe, models=True)``: a diffusers pipeline's denoiser and VAE replaced by fastgen's models.

::

    pipe.transformer  DiTTransformer2DModel        -> fastgen.models.DiT
                      PixArtTransformer2DModel     -> fastgen.models.PixArt
                      SD3Transformer2DModel        -> fastgen.models.SD3
                      FluxTransformer2DModel       -> fastgen.models.Flux
                      CogVideoXTransformer3DModel  -> fastgen.models.CogVideoX
    pipe.unet         UNet2DConditionModel         -> fastgen.models.UNet2DCondition
    pipe.vae          AutoencoderKL                -> fastgen.vae.AutoencoderKL
                      AutoencoderKLCogVideoX       -> fastgen.vae.AutoencoderKLCogVideoX

Each swap is ``setattr(pipe, name, Fastgen.from_diffusers(original))``: the pipeline's own
``__setattr__`` records the new component, and nothing else about the pipeline changes. The
fastgen models compute the same function (same weights, fused across module boundaries), so
the pipeline gives the same images up to summation order. The original modules are kept on
the pipeline (``pipe.__dict__[ORIG_COMPONENTS]``, ``{name: module}``) and :func:`restore` sets
them back. The transformers' ``from_diffusers`` shares parameter storage with the original
where the layouts agree (fused QKV projections are new tensors), so keeping the originals
costs only those fused copies; the VAE is a copy.

A component is left alone, with the reason in the report, when it is not a class in the table
(the exact diffusers class, not a subclass), is already a fastgen model, holds adapters
(PEFT or fastgen: ``from_diffusers`` reads the base weights only, the adapter would be
lost), carries accelerate hooks (CPU offload, ``device_map``: they would not follow the new
module), or when ``from_diffusers`` refuses its config (the error's message is the reason).
"""

from __future__ import annotations

import importlib
from typing import Optional

from torch import nn

ORIG_COMPONENTS = "_fastgen_orig_components"

# diffusers class name -> (fastgen module, class name)
SWAPS = {
    "DiTTransformer2DModel": ("fastgen.models", "DiT"),
    "PixArtTransformer2DModel": ("fastgen.models", "PixArt"),
    "SD3Transformer2DModel": ("fastgen.models", "SD3"),
    "FluxTransformer2DModel": ("fastgen.models", "Flux"),
    "CogVideoXTransformer3DModel": ("fastgen.models", "CogVideoX"),
    "UNet2DConditionModel": ("fastgen.models", "UNet2DCondition"),
    "AutoencoderKL": ("fastgen.vae", "AutoencoderKL"),
    "AutoencoderKLCogVideoX": ("fastgen.vae", "AutoencoderKLCogVideoX"),
}
# the pipeline attributes models=True looks at, in this order
COMPONENTS = ("transformer", "unet", "vae")


def is_fastgen_module(module) -> bool:
    """A fastgen model or VAE (already runs fastgen's fused ops)."""
    mod = type(module).__module__
    return mod.startswith("fastgen.models") or mod.startswith("fastgen.vae")


def swapped(pipe) -> dict:
    """``{name: original module}`` of the components ``models=True`` replaced (empty if none)."""
    return getattr(pipe, "__dict__", {}).get(ORIG_COMPONENTS, {})


def _why_not(module: nn.Module) -> Optional[str]:
    """Why ``module`` must not be swapped (None: it may be)."""
    cls = type(module)
    if is_fastgen_module(module):
        return "already a fastgen model"
    if not cls.__module__.startswith("diffusers.") or cls.__name__ not in SWAPS:
        return (f"no fastgen model for {cls.__module__}.{cls.__qualname__} (fastgen has: "
                f"{', '.join(sorted(SWAPS))})")
    if getattr(module, "peft_config", None) or getattr(module, "fastgen_adapter_info", None):
        return ("it holds adapters (PEFT or fastgen.adapters), which from_diffusers would drop: fuse them first "
                "(pipe.fuse_lora(), fastgen.adapters.merge) or keep the diffusers model (adapters=PATH runs a "
                "file unmerged on it)")
    if any(hasattr(m, "_hf_hook") for m in module.modules()):
        return ("it carries accelerate hooks (enable_model_cpu_offload / device_map), which would not follow the "
                "new module: call fastgen.patch(pipe, models=True) before enabling offload")
    return None


def swap(pipe, report, backend: str) -> None:
    """Replace every supported component of ``pipe`` (see the module docstring), in place, and
    record each swap (``report.replaced``) and each component left alone (``report.skipped``)."""
    from fastgen.patch.core import Replacement, Skipped, qualname

    done = pipe.__dict__.setdefault(ORIG_COMPONENTS, {})
    for name in COMPONENTS:
        module = getattr(pipe, name, None)
        if not isinstance(module, nn.Module):
            continue
        why = _why_not(module)
        if why is not None:
            report.skipped.append(Skipped(name, type(module).__name__, f"models=True: {why}",
                                          strict_error=not is_fastgen_module(module)))
            continue
        where, cls_name = SWAPS[type(module).__name__]
        cls = getattr(importlib.import_module(where), cls_name)
        try:
            kw = {"backend": backend} if where == "fastgen.models" else {}  # the VAEs take no backend
            new = cls.from_diffusers(module, **kw)
        except (ValueError, TypeError, KeyError, NotImplementedError) as exc:
            report.skipped.append(Skipped(name, type(module).__name__,
                                          f"models=True: {cls_name}.from_diffusers refused it: {exc}",
                                          strict_error=True))
            continue
        setattr(pipe, name, new)
        done[name] = module
        report.replaced.append(Replacement(name, qualname(type(module)), f"{where}.{cls_name}"))
    if not done:
        pipe.__dict__.pop(ORIG_COMPONENTS, None)


def offer(pipe) -> Optional[str]:
    """A note for ``patch(pipe)`` without ``models=True``: which components it would replace, or None."""
    if isinstance(pipe, nn.Module):
        return None
    can = [f"{name} ({type(m).__name__} -> {'.'.join(SWAPS[type(m).__name__])})" for name in COMPONENTS
           if isinstance(m := getattr(pipe, name, None), nn.Module) and _why_not(m) is None]
    if not can:
        return None
    return (f"fastgen.patch(pipe, models=True) would replace {', '.join(can)} by fastgen's own models "
            f"(fused across module boundaries; same weights, unpatch restores)")


def restore(pipe) -> None:
    """Put back the components :func:`swap` replaced (only where the fastgen one is still there)."""
    originals = getattr(pipe, "__dict__", {}).pop(ORIG_COMPONENTS, {})
    for name, module in originals.items():
        if is_fastgen_module(getattr(pipe, name, None)):  # not replaced by the user since
            setattr(pipe, name, module)
