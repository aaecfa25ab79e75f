"""``fastgen.patch(obj)`` / ``fastgen.unpatch(obj)``: fastgen kernels in an existing model, in place.

How a module is patched, so that nothing else about it changes:

- **class swap** — the instance's ``__class__`` becomes a fastgen subclass of its own
  class (``FastgenLayerNorm(nn.LayerNorm)``) whose only difference is ``forward``; the
  parameters, buffers, hooks and ``state_dict`` keys are the instance's own and stay
  as they are, and ``isinstance`` checks still hold. The original class is kept on
  the instance (``_fastgen_orig_class``); ``unpatch`` puts it back.
- **processor swap** — a diffusers ``Attention`` / ``FluxAttention`` gets a fastgen
  processor; the original processor object is kept (``_fastgen_orig_processor``) and
  restored as is by ``unpatch``.

Every patched forward checks at call time that the fastgen op computes the same
function for these inputs (dtypes, ranks, optional arguments) and otherwise calls
the original forward, so a patched model never returns a different kind of answer.
After ``unpatch`` the model runs the original code again: its outputs are
bit-identical to those before patching.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch
from torch import nn

from fastgen.backend import BACKENDS

ORIG_CLASS = "_fastgen_orig_class"
ORIG_PROCESSOR = "_fastgen_orig_processor"
BACKEND_ATTR = "_fastgen_backend"


class PatchError(RuntimeError):
    """``fastgen.patch(..., strict=True)`` met something it does not know how to patch."""


@dataclasses.dataclass(frozen=True)
class Replacement:
    path: str      # module path in the model ("" for the root), pipeline components prefixed
    before: str    # what ran before ("torch.nn.LayerNorm", "AttnProcessor2_0")
    after: str     # what runs now ("fastgen.ops.layer_norm")


@dataclasses.dataclass(frozen=True)
class Skipped:
    path: str
    what: str      # class name of the module or processor left alone
    reason: str


@dataclasses.dataclass
class PatchReport:
    """What ``fastgen.patch`` replaced and what it left alone (with the reason)."""

    backend: str = "auto"
    replaced: list = dataclasses.field(default_factory=list)   # [Replacement]
    skipped: list = dataclasses.field(default_factory=list)    # [Skipped]

    def paths(self) -> list:
        return [r.path for r in self.replaced]

    def count(self, after_contains: str = "") -> int:
        """How many replacements name ``after_contains`` in their ``after`` (all if empty)."""
        return sum(after_contains in r.after for r in self.replaced)

    def __len__(self) -> int:
        return len(self.replaced)

    def __str__(self) -> str:
        lines = [f"fastgen.patch (backend={self.backend!r}): {len(self.replaced)} replaced, "
                 f"{len(self.skipped)} left alone"]
        width = max([len(r.path or "<root>") for r in self.replaced + self.skipped] + [4])
        for r in self.replaced:
            lines.append(f"  {(r.path or '<root>'):<{width}}  {r.before} -> {r.after}")
        if self.skipped:
            lines.append("left alone:")
            for s in self.skipped:
                lines.append(f"  {(s.path or '<root>'):<{width}}  {s.what}: {s.reason}")
        return "\n".join(lines)

    __repr__ = __str__


# ----------------------------------------------------------------------------- class swap

_SUBCLASSES: dict = {}


def swap_forward(module: nn.Module, forward: Callable, tag: str, backend: str) -> None:
    """Give ``module`` a fastgen subclass of its class whose ``forward`` is ``forward``
    (``forward(self, *args)`` may call ``orig_forward(self, *args)`` to fall back)."""
    cls = type(module)
    key = (cls, tag)
    sub = _SUBCLASSES.get(key)
    if sub is None:
        sub = type(f"Fastgen{cls.__name__}", (cls,), {"forward": forward, "__module__": __name__,
                                                     "_fastgen_tag": tag})
        _SUBCLASSES[key] = sub
    module.__dict__[ORIG_CLASS] = cls
    module.__dict__[BACKEND_ATTR] = backend
    module.__class__ = sub


def orig_forward(module: nn.Module):
    """The forward of the class the module had before patching (bound to it)."""
    return module.__dict__[ORIG_CLASS].forward.__get__(module)


def is_patched(module: nn.Module) -> bool:
    return ORIG_CLASS in module.__dict__ or ORIG_PROCESSOR in module.__dict__


def qualname(cls: type) -> str:
    mod = cls.__module__
    if mod.startswith("torch.nn.modules"):
        mod = "torch.nn"
    elif mod.startswith("diffusers."):
        mod = "diffusers"
    return f"{mod}.{cls.__qualname__}"


# ----------------------------------------------------------------------------- walking


def _components(obj) -> list:
    """``[(prefix, module)]``: the module itself, or every nn.Module component of a pipeline."""
    if isinstance(obj, nn.Module):
        return [("", obj)]
    comps = getattr(obj, "components", None)
    if isinstance(comps, dict):
        mods = [(name, m) for name, m in comps.items() if isinstance(m, nn.Module)]
        if mods:
            return mods
    raise TypeError(f"fastgen.patch: expected a torch.nn.Module or a diffusers pipeline (an object with a "
                    f"`components` dict holding nn.Modules), got {type(obj).__name__}")


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else (prefix or name)


def patch(obj, attention: bool = True, norms: bool = True, rope: bool = True, activations: bool = True,
          backend: str = "auto", strict: bool = False) -> PatchReport:
    """Swap fastgen's fused ops into ``obj`` (an ``nn.Module`` or a diffusers pipeline), in place.

    ::

        norms=True        nn.LayerNorm, diffusers FP32LayerNorm       -> fastgen.ops.layer_norm
                          nn.GroupNorm                                -> fastgen.ops.group_norm
                          nn.RMSNorm, diffusers RMSNorm               -> fastgen.ops.rms_norm
                          diffusers AdaLayerNormZero / ...ZeroSingle  -> emb -> shift/scale/gate, then
                          / AdaLayerNormContinuous                       fastgen.ops.layer_norm_modulate
                                                                         (rms_norm_modulate for an RMS norm)
        activations=True  diffusers ResnetBlock2D with SiLU           -> GroupNorm + SiLU fused
                                                                         (fastgen.ops.group_norm(activation="silu"))
                          diffusers GEGLU / SwiGLU                    -> proj, then fastgen.ops.glu (split,
                                                                         activation and product in one pass)
        attention=True    diffusers AttnProcessor2_0, JointAttnProcessor2_0, FluxAttnProcessor
                                                                      -> fastgen processors on
                                                                         fastgen.ops.scaled_dot_product_attention
        rope=True         inside the Flux processor: fastgen.ops.apply_rope (interleaved)

    Parameters, buffers and ``state_dict`` keys are untouched; ``unpatch(obj)`` restores the
    original classes and processors exactly. ``backend`` ("auto" | "triton" | "cuda" | "torch")
    is passed to every fastgen op (an op without that implementation raises
    ``fastgen.backend.BackendUnavailableError`` when called). A module already patched is
    re-patched with the new options. Attention processors and norm modules the patcher does
    not know (another diffusers norm, a subclass of ``nn.LayerNorm``) are left alone and listed
    in the report; ``strict=True`` raises :class:`PatchError` instead (and leaves the model
    unpatched).
    Returns a :class:`PatchReport`.
    """
    from fastgen.patch import activations as act_rules
    from fastgen.patch import attention as attn_rules
    from fastgen.patch import norms as norm_rules

    if backend not in BACKENDS:
        raise ValueError(f"fastgen.patch: backend must be one of {BACKENDS}, got {backend!r}")
    comps = _components(obj)
    unpatch(obj)
    report = PatchReport(backend=backend)
    try:
        for prefix, root in comps:
            absorbed: dict = {}  # id(child) -> the parent path whose fused forward does the child's work
            for name, module in root.named_modules():
                path = _join(prefix, name)
                if id(module) in absorbed:
                    parent = absorbed[id(module)] or "<root>"
                    report.skipped.append(Skipped(path, type(module).__name__,
                                                  f"fused into the patched forward of {parent}"))
                    continue
                if norms or activations:
                    for child in norm_rules.patch_module(module, path, report, backend, norms=norms,
                                                         activations=activations, strict=strict):
                        absorbed[id(child)] = path
                if activations:
                    act_rules.patch_module(module, path, report, backend)
                if attention and hasattr(module, "processor") and hasattr(module, "set_processor"):
                    attn_rules.patch_attention(module, path, report, backend, rope=rope, strict=strict)
    except PatchError:
        unpatch(obj)  # all or nothing
        raise
    return report


def unpatch(obj) -> None:
    """Undo :func:`patch`: original classes and attention processors back, exactly as they were."""
    for _, root in _components(obj):
        for module in root.modules():
            d = module.__dict__
            if ORIG_CLASS in d:
                module.__class__ = d.pop(ORIG_CLASS)
            if ORIG_PROCESSOR in d:
                original = d.pop(ORIG_PROCESSOR)
                if hasattr(module.processor, "fastgen_backend"):  # not replaced by the user since
                    module.processor = original
            d.pop(BACKEND_ATTR, None)


def backend_of(module) -> Optional[str]:
    return module.__dict__.get(BACKEND_ATTR)


def supported_float(t: torch.Tensor) -> bool:
    return t.dtype in (torch.float32, torch.float16, torch.bfloat16)
