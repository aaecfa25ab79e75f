"""``fastgen.patch(pipe, adapters=PATH)``: adapter files run unmerged inside a diffusers pipeline.

Every layer ``y = base(x)`` that the file names gets fastgen's adapter branch added to its
output, the weights themselves untouched:

    y = base(x) + adapter_scale * s * B (A x)      s = alpha / rank (LoRA / LoCoN; LoHa, LoKr, DoRA likewise)

The linear LoRA branch runs in fastgen's fused kernel (``fastgen.adapters.fused.lora_add``:
``x @ A^T @ B^T`` added into the base output in place, no ``(tokens x out)`` temporary), the
others through their own reference. It goes through ``fastgen.adapters``' public API:
``load`` (PEFT / diffusers, kohya / A1111 / LyCORIS, ComfyUI files, detected), ``apply`` (onto
the pipeline's unet / transformer and its text encoders, every key placed or an error naming
the unmatched ones), ``use_backend`` and ``remove``. The base weights of the components stop
requiring grad while the adapters are on (``fastgen.adapters`` freezes them);
:func:`remove` puts the adapters' layers back and the ``requires_grad`` flags as they were.

State on the patched object (pipeline or module): ``obj.__dict__[ADAPTERS]`` =
``{"names": [adapter names], "requires_grad": [(parameter, flag)]}``.
"""

from __future__ import annotations

import os
from pathlib import Path

ADAPTERS = "_fastgen_patch_adapters"
_BACKENDS = {"torch": "torch", "triton": "triton"}  # anything else: "auto" (the fused kernel where recorded fastest)


def applied(obj) -> list:
    """Names of the adapters ``patch(obj, adapters=...)`` put on ``obj`` (empty if none)."""
    return list(getattr(obj, "__dict__", {}).get(ADAPTERS, {}).get("names", []))


def _items(adapters) -> list:
    """``[(name, path or AdapterWeights)]`` from a path, loaded weights, a list of them or ``{name: either}``."""
    from fastgen.adapters import AdapterWeights

    if isinstance(adapters, dict):
        return list(adapters.items())
    many = adapters if isinstance(adapters, (list, tuple)) else [adapters]
    out, seen = [], set()
    for i, a in enumerate(many):
        if isinstance(a, (str, os.PathLike)):
            base = Path(a).stem.replace(".", "_") or f"adapter{i}"
        elif isinstance(a, AdapterWeights):
            base = f"adapter{i}"
        else:
            raise TypeError(f"fastgen.patch(adapters=...): expected a path, fastgen.adapters.AdapterWeights, a list "
                            f"of them or {{name: either}}, got {type(a).__name__}")
        name, k = base, 1
        while name in seen:
            name, k = f"{base}_{k}", k + 1
        seen.add(name)
        out.append((name, a))
    return out


def apply(obj, comps: list, adapters, report, backend: str, scale: float) -> None:
    """Put every adapter of ``adapters`` on ``obj`` unmerged with multiplier ``scale``; one
    ``report.replaced`` row per component and adapter. All or nothing: on an error the adapters
    already added are removed again before it propagates."""
    import fastgen.adapters as A
    from fastgen.adapters.inject import adapted_layers
    from fastgen.patch.core import Replacement

    state = {"names": [], "requires_grad": [(p, p.requires_grad) for _, m in comps for p in m.parameters()]}
    obj.__dict__[ADAPTERS] = state
    try:
        for name, src in _items(adapters):
            w = A.apply(obj, src, name=name, scale=scale)
            state["names"].append(name)
            for prefix, model in comps:
                layers = list(adapted_layers(model, name))
                if not layers:
                    continue
                A.use_backend(model, _BACKENDS.get(backend, "auto"))
                kinds = sorted({type(layer.fastgen_adapters[name]).__name__ for _, layer in layers})
                report.replaced.append(Replacement(
                    prefix, f"{len(layers)} Linear/Conv2d layers",
                    f"fastgen.adapters '{name}' ({w.format} file; {', '.join(kinds)}; unmerged, scale {scale:g})"))
    except Exception:
        remove(obj)
        raise


def remove(obj) -> None:
    """Take the adapters :func:`apply` added off ``obj`` and restore the ``requires_grad`` flags."""
    state = getattr(obj, "__dict__", {}).pop(ADAPTERS, None)
    if state is None:
        return
    import fastgen.adapters as A

    if state["names"]:
        A.remove(obj, state["names"])
    for p, flag in state["requires_grad"]:
        p.requires_grad_(flag)
