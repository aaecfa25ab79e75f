"""Adding, scaling, switching, merging and removing named adapters on a model.

Every targeted layer gets ``layer.fastgen_adapters`` (an :class:`AdapterSet`) and one forward
hook, so the base model's own state-dict keys stay as they were; adapter parameters appear as
``<layer>.fastgen_adapters.<adapter>.<tensor>``. Several adapters can live on one layer:
the layer computes ``base(x) + sum_i multiplier_i * scale_i * branch_i(x)`` over the enabled,
unmerged ones. ``merge`` folds ``multiplier * scale * dW`` into the base weight (DoRA: adds
``(f - 1) W0 + f s dW`` with ``f = m / ||W0 + s dW||`` and ``W0`` the weight without merged adapters,
remembering ``f`` so that ``unmerge`` is exact up to rounding, in any order).

The model also carries ``model.fastgen_adapter_info[name]`` (kind, rank, alpha, targets, the base
model's fingerprint), which the file formats write into their metadata.
"""

from __future__ import annotations

import contextlib
import hashlib
from typing import Iterable, Iterator

import torch
from torch import nn

from fastgen.adapters import targets as _targets
from fastgen.adapters.layers import (
    AdapterSet, LoHa, LoKr, LoRA, base_weight, forward_hook, layer_shape, row_norm, shape_rows, true_base,
)
from fastgen.adapters.state import AdapterWeights, branch_to_weights, weights_to_branch


def fingerprint(model: nn.Module) -> str:
    """A short hash of the names and shapes of the model's adaptable layers: equal for two
    instances of one architecture, different for different base models."""
    h = hashlib.sha256()
    for name, module in model.named_modules():
        if name and _targets.adaptable(module):
            h.update(f"{name}:{layer_shape(module)};".encode())
    return h.hexdigest()[:16]


def _info(model: nn.Module) -> dict:
    if not hasattr(model, "fastgen_adapter_info"):
        model.fastgen_adapter_info = {}
    return model.fastgen_adapter_info


def attach(layer: nn.Module) -> AdapterSet:
    """The layer's AdapterSet, created (with its forward hook) on first use."""
    if not hasattr(layer, "fastgen_adapters"):
        layer.fastgen_adapters = AdapterSet()
        layer.fastgen_adapter_hook = layer.register_forward_hook(forward_hook)
    return layer.fastgen_adapters


def adapted_layers(model: nn.Module, name: str | None = None) -> Iterator[tuple[str, nn.Module]]:
    """(qualified name, layer) of every layer holding adapter ``name`` (any adapter if None)."""
    for lname, m in model.named_modules():
        s = getattr(m, "fastgen_adapters", None)
        if isinstance(s, AdapterSet) and (name is None and len(s) or name in s):
            yield lname, m


def adapter_names(model: nn.Module) -> list[str]:
    names: list[str] = []
    for _, m in adapted_layers(model):
        names += [n for n in m.fastgen_adapters if n not in names]
    return names


def _check_new(model: nn.Module, name: str) -> None:
    if not name or "." in name:
        raise ValueError(f"adapter name {name!r} must be non-empty and contain no '.'")
    if name in adapter_names(model):
        raise ValueError(f"the model already has an adapter named {name!r}; remove it or pick another name")


def _freeze_base(model: nn.Module) -> None:
    for pname, p in model.named_parameters():
        if ".fastgen_adapters." not in f".{pname}":
            p.requires_grad_(False)


def _refuse_fastgen_model(model: nn.Module) -> None:
    from fastgen.adapters.fastgen_models import HOOK_ERROR, is_fastgen_model

    if is_fastgen_model(model):
        raise TypeError(HOOK_ERROR.format(cls=type(model).__name__))


def add_adapter(
    model: nn.Module,
    name: str = "default",
    kind: str = "lora",
    rank: int = 8,
    alpha: float | None = None,
    targets: str | Iterable[str] = "attention",
    exclude: Iterable[str] = (),
    dropout: float = 0.0,
    rslora: bool = False,
    factor: int = -1,
    full_matrix: bool = False,
    freeze_base: bool = True,
) -> list[str]:
    """Add a new adapter to every layer of ``model`` that ``targets`` selects; returns their names.

    kind: ``"lora"`` (LoCoN on convolutions), ``"dora"``, ``"loha"`` or ``"lokr"`` (``factor``,
    ``full_matrix``). ``alpha`` defaults to ``rank`` (scale 1). New adapters leave the output
    unchanged (their last factor starts at zero; DoRA's magnitude starts at ``||W||``). With
    ``freeze_base`` every non-adapter parameter of the model stops requiring grad.
    """
    _refuse_fastgen_model(model)
    if kind not in ("lora", "dora", "loha", "lokr"):
        raise ValueError(f"unknown adapter kind {kind!r}; expected 'lora', 'dora', 'loha' or 'lokr'")
    alpha = float(rank if alpha is None else alpha)
    if not alpha > 0:
        raise ValueError(f"adapter alpha must be > 0, got {alpha}")
    if not (isinstance(rank, int) and rank >= 1):
        raise ValueError(f"adapter rank must be a positive integer, got {rank!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"adapter dropout must be in [0, 1), got {dropout}")
    _check_new(model, name)
    chosen = _targets.select(model, targets, exclude)
    modules = dict(model.named_modules())
    for lname in chosen:
        out_f, in_f, kernel = layer_shape(modules[lname])
        limit = min(out_f, in_f * kernel[0] * kernel[1])
        if rank > limit:
            raise ValueError(
                f"rank {rank} is larger than layer {lname!r} allows (weight {out_f} x {in_f * kernel[0] * kernel[1]}, "
                f"so rank <= {limit}); lower the rank or exclude the layer"
            )
    for lname in chosen:
        layer = modules[lname]
        out_f, in_f, kernel = layer_shape(layer)
        shape = (out_f, in_f, *kernel) if isinstance(layer, nn.Conv2d) else (out_f, in_f)
        w = base_weight(layer)
        if kind in ("lora", "dora"):
            branch = LoRA(rank, alpha, dropout, shape, rslora=rslora, dora=kind == "dora")
        elif kind == "loha":
            branch = LoHa(rank, alpha, dropout, shape)
        else:
            branch = LoKr(rank, alpha, dropout, shape, factor=factor, full_matrix=full_matrix)
        branch.to(device=w.device, dtype=torch.float32)
        if kind == "dora":
            branch.init_magnitude(w)
        attach(layer)[name] = branch
    _info(model)[name] = dict(kind=kind, rank=rank, alpha=alpha, rslora=rslora, targets=chosen, base=fingerprint(model))
    if freeze_base:
        _freeze_base(model)
    return chosen


def add_weights(model: nn.Module, weights: AdapterWeights, name: str = "default", check_base: bool = True) -> list[str]:
    """Add an adapter from loaded weights. Raises, naming them, when layers of the file are not
    in the model or do not fit, and when the file records a different base model."""
    _refuse_fastgen_model(model)
    _check_new(model, name)
    here = fingerprint(model)
    modules = dict(model.named_modules())
    missing = sorted(n for n in weights.modules if n not in modules or not _targets.adaptable(modules[n]))
    if missing:
        more = f" (and {len(missing) - 10} more)" if len(missing) > 10 else ""
        raise KeyError(
            f"{len(missing)} of the adapter's {len(weights.modules)} layers are not Linear/Conv2d layers of "
            f"{type(model).__name__}: {', '.join(missing[:10])}{more}. Is the file for another model?"
        )
    if check_base and weights.base is not None and weights.base != here:
        raise ValueError(
            f"the adapter was made for a different base model ({weights.base_class or '?'}, fingerprint {weights.base}); "
            f"this {type(model).__name__} has fingerprint {here}. Pass check_base=False to load it anyway."
        )
    others = {i.get("base") for i in _info(model).values()} - {None, here}
    if others:
        raise ValueError(f"the model holds adapters made for another base model (fingerprints {sorted(others)})")
    branches = {n: weights_to_branch(w, modules[n], n, rslora=weights.rslora) for n, w in weights.modules.items()}
    for n, b in branches.items():
        b.to(device=base_weight(modules[n]).device)
        attach(modules[n])[name] = b
    kinds = weights.kinds
    _info(model)[name] = dict(
        kind=kinds.pop() if len(kinds) == 1 else "mixed",
        rank=max((w.rank for w in weights.modules.values()), default=0),
        alpha=None, rslora=weights.rslora, targets=sorted(weights.modules), base=here, format=weights.format,
    )
    _freeze_base(model)
    return sorted(branches)


def get_weights(model: nn.Module, name: str = "default") -> AdapterWeights:
    """The adapter ``name`` as format-independent weights (what the formats save)."""
    layers = dict(adapted_layers(model, name))
    if not layers:
        raise KeyError(f"the model has no adapter named {name!r} (it has {adapter_names(model)})")
    info = _info(model).get(name, {})
    return AdapterWeights(
        modules={n: branch_to_weights(m.fastgen_adapters[name]) for n, m in layers.items()},
        rslora=bool(info.get("rslora", False)), base=fingerprint(model), base_class=type(model).__name__,
    )


def _names(model: nn.Module, names: str | Iterable[str] | None) -> list[str]:
    have = adapter_names(model)
    if names is None:
        return have
    names = [names] if isinstance(names, str) else list(names)
    for n in names:
        if n not in have:
            raise KeyError(f"the model has no adapter named {n!r} (it has {have})")
    return names


def set_scale(model: nn.Module, name: str, multiplier: float) -> None:
    """Multiply adapter ``name``'s contribution by ``multiplier`` (1 = as trained)."""
    for _, m in adapted_layers(model, _names(model, name)[0]):
        if name in m.fastgen_adapters.merged:
            raise RuntimeError(f"adapter {name!r} is merged; unmerge it before changing its scale")
        m.fastgen_adapters.multipliers[name] = float(multiplier)


def enable(model: nn.Module, names: str | Iterable[str] | None = None) -> None:
    for n in _names(model, names):
        for _, m in adapted_layers(model, n):
            m.fastgen_adapters.disabled.discard(n)


def disable(model: nn.Module, names: str | Iterable[str] | None = None) -> None:
    """Switch adapters off (all when ``names`` is None) without removing them. Merged adapters
    stay in the weights: unmerge them first."""
    for n in _names(model, names):
        for _, m in adapted_layers(model, n):
            if n in m.fastgen_adapters.merged:
                raise RuntimeError(f"adapter {n!r} is merged into the weights; unmerge it before disabling it")
            m.fastgen_adapters.disabled.add(n)


@contextlib.contextmanager
def disabled(model: nn.Module, names: str | Iterable[str] | None = None):
    """``with disabled(model): ...`` runs the base model alone."""
    names = _names(model, names)
    before = {n for n in names if all(n in m.fastgen_adapters.disabled for _, m in adapted_layers(model, n))}
    disable(model, names)
    try:
        yield
    finally:
        enable(model, [n for n in names if n not in before])


def _weight_param(layer: nn.Module) -> torch.Tensor:
    if getattr(layer, "fastgen_quantized", False):
        raise RuntimeError("cannot merge an adapter into a quantized layer; run it unmerged")
    return layer.weight


@torch.no_grad()
def merge(model: nn.Module, names: str | Iterable[str] | None = None) -> None:
    """Fold enabled adapters into the base weights (they then cost nothing at run time). The
    merged model computes what the unmerged one did, DoRA included (its norm is of the base
    weight plus its own update only, as when unmerged)."""
    for n in _names(model, names):
        for _, layer in adapted_layers(model, n):
            s_ = layer.fastgen_adapters
            if n in s_.merged or n in s_.disabled:
                continue
            br = s_[n]
            w = _weight_param(layer)
            sdw = br.scale * s_.multipliers.get(n, 1.0) * br.delta_weight().float()
            if getattr(br, "magnitude", None) is not None:
                w0 = true_base(layer)
                factor = br.magnitude.float() / row_norm(w0 + sdw)
                w.copy_(w.float() + (shape_rows(factor, w0) - 1) * w0 + shape_rows(factor, w0) * sdw)
                s_.merged[n] = factor
            else:
                w.copy_(w.float() + sdw)
                s_.merged[n] = None


@torch.no_grad()
def unmerge(model: nn.Module, names: str | Iterable[str] | None = None) -> None:
    """Undo :func:`merge` (exact up to rounding, in any order)."""
    for n in reversed(_names(model, names)):
        for _, layer in adapted_layers(model, n):
            s_ = layer.fastgen_adapters
            if n not in s_.merged:
                continue
            br = s_[n]
            w = _weight_param(layer)
            sdw = br.scale * s_.multipliers.get(n, 1.0) * br.delta_weight().float()
            factor = s_.merged[n]
            if factor is not None:
                w0 = true_base(layer)
                w.copy_(w.float() - (shape_rows(factor, w0) - 1) * w0 - shape_rows(factor, w0) * sdw)
            else:
                w.copy_(w.float() - sdw)
            del s_.merged[n]


def remove(model: nn.Module, names: str | Iterable[str] | None = None) -> None:
    """Delete adapters (unmerging them first); a layer left with none loses its hook."""
    names = _names(model, names)
    unmerge(model, names)
    for n in names:
        for _, layer in list(adapted_layers(model, n)):
            del layer.fastgen_adapters[n]
            layer.fastgen_adapters.multipliers.pop(n, None)
            layer.fastgen_adapters.disabled.discard(n)
            if not len(layer.fastgen_adapters):
                layer.fastgen_adapter_hook.remove()
                del layer.fastgen_adapters
                del layer.fastgen_adapter_hook
        _info(model).pop(n, None)


def use_backend(model: nn.Module, backend: str) -> None:
    """Which implementation runs the linear LoRA branches and the quantized base layers:
    "auto" | "triton" | "torch"."""
    for _, layer in adapted_layers(model):
        layer.fastgen_adapters.fused = backend
    for layer in model.modules():
        if getattr(layer, "fastgen_quantized", False):
            layer.backend = backend


def adapter_parameters(model: nn.Module, name: str | None = None) -> list[nn.Parameter]:
    """The parameters of adapter ``name`` (all adapters if None), for the optimizer."""
    out = []
    for _, layer in adapted_layers(model, name):
        for n, br in layer.fastgen_adapters.items():
            if name is None or n == name:
                out += list(br.parameters())
    return out
