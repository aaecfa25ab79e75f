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

Each rule returns a typed :class:`fastgen.patch.records.Plan` (the ops a site calls, the children
its kernel absorbs): the patcher decides on it, and the report's text is written from it.

Every patched forward checks at call time that the fastgen op computes the same
function for these inputs (dtypes, ranks, optional arguments) and otherwise calls
the original forward, so a patched model never returns a different kind of answer.
After ``unpatch`` the model runs the original code again: its outputs are
bit-identical to those before patching.

``backend="triton" | "cuda"``: each site's ops are checked at patch time
(``fastgen/patch/serve.py``); what the family cannot serve runs the reference and is
reported, and a call that turns out unservable runs the reference with a warning
once per module. ``strict=True`` raises instead, naming every site.

Pickling: a patched module pickles (``torch.save(model)``, ``copy.deepcopy``) as the
patched module: its fastgen subclass is rebuilt on load from the original class and
the patched forward's importable name.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Callable, Optional

import torch
from torch import nn

from fastgen.backend import BACKENDS
from fastgen.patch import serve
from fastgen.patch.records import Plan

ORIG_CLASS = "_fastgen_orig_class"
ORIG_PROCESSOR = "_fastgen_orig_processor"
BACKEND_ATTR = "_fastgen_backend"


class PatchError(RuntimeError):
    """``fastgen.patch(..., strict=True)`` met something it does not know how to patch."""


@dataclasses.dataclass(frozen=True)
class Replacement:
    path: str      # module path in the model ("" for the root), pipeline components prefixed
    before: str    # what ran before ("torch.nn.LayerNorm", "AttnProcessor2_0")
    after: str     # what runs now ("fastgen.ops.layer_norm"): text for people, written from `plan`
    reference: tuple = ()  # ((op, why), ...): ops of this site that run the torch reference
    plan: Optional[Plan] = None  # what the site runs (fastgen/patch/records.py); None: a swapped component


@dataclasses.dataclass(frozen=True)
class Fused:
    path: str      # a child module whose work a patched parent does
    what: str      # its class name ("RMSNorm")
    kernel: str    # the fastgen op that does it ("fastgen.ops.qk_norm_rope")
    by: str        # the patched parent's path


@dataclasses.dataclass(frozen=True)
class Skipped:
    path: str
    what: str      # class name of the module or processor left alone
    reason: str
    strict_error: bool = False  # what strict=True raises on (unknown classes, sites the backend cannot serve)
    reference: tuple = ()  # ((op, why), ...) when left alone because the backend serves none of its ops


@dataclasses.dataclass
class PatchReport:
    """What ``fastgen.patch`` replaced (and which of a site's ops still run the reference there),
    which children a patched parent's kernel absorbed (``fused``), what it left alone (with the
    reason), and notes about the whole model."""

    backend: str = "auto"
    replaced: list = dataclasses.field(default_factory=list)   # [Replacement]
    skipped: list = dataclasses.field(default_factory=list)    # [Skipped]
    fused: list = dataclasses.field(default_factory=list)      # [Fused]
    notes: list = dataclasses.field(default_factory=list)      # [str]: about the whole model

    def paths(self) -> list:
        return [r.path for r in self.replaced]

    def on_reference(self) -> dict:
        """``{path: why}`` for every site that runs (some of) its ops on the torch reference
        because the backend cannot serve them: sites left unpatched and partly served ones."""
        out = {s.path: s.reason for s in self.skipped if s.reference}
        out.update({r.path: serve.describe(dict(r.reference)) for r in self.replaced if r.reference})
        return out

    def count(self, after_contains: str = "") -> int:
        """How many replacements name ``after_contains`` in their ``after`` (all if empty)."""
        return sum(after_contains in r.after for r in self.replaced)

    def __len__(self) -> int:
        return len(self.replaced)

    def __str__(self) -> str:
        lines = [f"fastgen.patch (backend={self.backend!r}): {len(self.replaced)} replaced, "
                 f"{len(self.fused)} fused into a parent, {len(self.skipped)} left alone"]
        lines += [f"note: {n}" for n in self.notes]
        width = max([len(r.path or "<root>") for r in self.replaced + self.skipped + self.fused] + [4])
        for r in self.replaced:
            lines.append(f"  {(r.path or '<root>'):<{width}}  {r.before} -> {r.after}")
            for op, why in r.reference:
                lines.append(f"  {'':<{width}}    {op} runs the reference here: {why}")
        if self.fused:
            lines.append("fused into a patched parent:")
            for f in self.fused:
                lines.append(f"  {f.path:<{width}}  {f.what} -> {f.kernel} (in {f.by or '<root>'})")
        if self.skipped:
            lines.append("left alone:")
            for s in self.skipped:
                lines.append(f"  {(s.path or '<root>'):<{width}}  {s.what}: {s.reason}")
        return "\n".join(lines)

    __repr__ = __str__


ON_REFERENCE = "stays on the reference"


def site(path: str, report: PatchReport, backend: str, what: str, ops: dict) -> Optional[dict]:
    """Check a site's ops against ``backend`` (``ops``: ``{op: facts}``, see ``serve.plan``).

    Returns ``{op: why}`` for the ops that will run the reference there (empty: all served),
    or None when none can be served: then the site is reported as left alone, with the
    reasons, and must not be patched."""
    reference = serve.plan(backend, ops)
    if ops and len(reference) == len(ops):
        report.skipped.append(Skipped(path, what, f"{ON_REFERENCE} (backend={backend!r}): "
                                                  f"{serve.describe(reference)}", strict_error=True,
                                      reference=tuple(reference.items())))
        return None
    return reference


def replaced(report: PatchReport, path: str, before: str, plan: Plan, reference: dict) -> None:
    """Record a patched site: its plan, and the report's text written from it."""
    report.replaced.append(Replacement(path, before, plan.text(reference), tuple(reference.items()), plan))


# ----------------------------------------------------------------------------- class swap

_SUBCLASSES: dict = {}


def _forward_ref(forward: Callable) -> tuple:
    """``(module, name)`` under which ``forward`` can be imported again (for pickling)."""
    ref = (forward.__module__, forward.__qualname__)
    if getattr(importlib.import_module(ref[0]), ref[1], None) is not forward:
        raise ValueError(f"fastgen.patch: forward {ref[0]}.{ref[1]} is not importable by that name")
    return ref


def _subclass(cls: type, forward: Callable, tag: str) -> type:
    key = (cls, tag)
    sub = _SUBCLASSES.get(key)
    if sub is None:
        sub = type(f"Fastgen{cls.__name__}", (cls,), {"forward": forward, "__module__": __name__,
                                                     "_fastgen_tag": tag, "__reduce_ex__": _reduce_ex})
        _SUBCLASSES[key] = sub
    return sub


def _reduce_ex(self, protocol):
    """Pickle a class-swapped module as (original class, patched forward's name, state)."""
    cls = type(self)
    return (_rebuild, (self.__dict__[ORIG_CLASS], cls._fastgen_tag, _forward_ref(cls.forward)),
            self.__getstate__())


def _rebuild(orig_cls: type, tag: str, ref: tuple):
    forward = getattr(importlib.import_module(ref[0]), ref[1])
    sub = _subclass(orig_cls, forward, tag)
    return sub.__new__(sub)


def swap_forward(module: nn.Module, forward: Callable, tag: str, backend: str) -> None:
    """Give ``module`` a fastgen subclass of its class whose ``forward`` is ``forward``
    (``forward(self, *args)`` may call ``orig_forward(self, *args)`` to fall back)."""
    _forward_ref(forward)
    cls = type(module)
    module.__dict__[ORIG_CLASS] = cls
    module.__dict__[BACKEND_ATTR] = backend
    module.__class__ = _subclass(cls, forward, tag)


def orig_forward(module: nn.Module):
    """The forward of the class the module had before patching (bound to it)."""
    return module.__dict__[ORIG_CLASS].forward.__get__(module)


def _own_patch(module) -> bool:
    return ORIG_CLASS in module.__dict__ or ORIG_PROCESSOR in module.__dict__


def is_patched(obj) -> bool:
    """True when ``obj`` (any module of a model, the model itself, or a diffusers pipeline)
    or any module inside it runs fastgen code put there by :func:`patch`: a patched module,
    a component swapped by ``models=True`` or adapters put on by ``adapters=``."""
    from fastgen.patch import adapter_files, components

    if components.swapped(obj) or adapter_files.applied(obj):
        return True
    return any(_own_patch(m) for _, root in _components(obj) for m in root.modules())


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


def _device_note(comps, backend: str) -> Optional[str]:
    """What the model's current device means for ``backend`` (it may still move: a note, not a skip)."""
    if backend not in serve.FAMILIES or serve.family_reason(backend) is not None:
        return None
    from fastgen.backend import unavailable_reason

    for _, root in comps:
        p = next(root.parameters(), None)
        if p is not None:
            why = None if p.device.type == "meta" else unavailable_reason(backend, p.device)
            if why is None:
                return None
            return (f"the model is on {p.device.type}: {serve.short(why)}; until it moves, its patched calls "
                    f"run the reference (a warning once per module)")
    return None


def patch(obj, attention: bool = True, norms: bool = True, rope: bool = True, activations: bool = True,
          backend: str = "auto", strict: bool = False, models: bool = False, adapters=None,
          adapter_scale: float = 1.0) -> PatchReport:
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
        rope=True         inside the Flux processor: fastgen.ops.qk_norm_rope (norm_q / norm_k fused
                          into it) or apply_rope (interleaved)

    Parameters, buffers and ``state_dict`` keys are untouched; ``unpatch(obj)`` restores the
    original classes and processors exactly. A module already patched is re-patched with the
    new options.

    ``backend``: ``"auto"`` (default) and ``"torch"`` are passed to every fastgen op.
    ``"triton"`` / ``"cuda"`` mean "this kernel family wherever it can serve": each site's ops
    are checked at patch time (the op's implementations, parameter dtypes, head dims, channels
    per group); an op the family cannot serve runs the torch reference at that site, a site
    none of whose ops it can serve is left unpatched, and the report says why for each. A call
    the family turns out unable to serve (CPU tensors, a dtype changed after patching) runs
    the reference and warns once per module (``fastgen.patch.PatchFallbackWarning``).

    ``models=True`` (a diffusers pipeline only): first replace the pipeline's ``transformer`` /
    ``unet`` by the matching ``fastgen.models`` class (``from_diffusers``, on ``backend``) and its
    ``vae`` by ``fastgen.vae.AutoencoderKL`` (``AutoencoderKLCogVideoX``), the originals kept for
    ``unpatch``; a component that cannot be swapped is reported with the reason and patched
    module by module as usual (``fastgen/patch/components.py``).

    ``adapters=PATH`` (a path, ``fastgen.adapters.AdapterWeights``, a list of them or
    ``{name: either}``): run the adapter file(s) unmerged on the pipeline's (or model's)
    layers through ``fastgen.adapters`` (fused LoRA kernel), with multiplier ``adapter_scale``;
    ``unpatch`` removes them (``fastgen/patch/adapter_files.py``). Not together with
    ``models=True``: fastgen's models take adapters only merged into their weights.

    Attention processors and norm modules the patcher does not know (another diffusers norm, a
    subclass of ``nn.LayerNorm``) are left alone and listed in the report. ``strict=True``
    raises :class:`PatchError` instead, naming every such site and every site the backend
    cannot serve (and leaves the model unpatched); its patched ops then raise at a call the
    backend cannot serve, as ``backend=`` on an op always does.
    Returns a :class:`PatchReport`.
    """
    _check_args(obj, backend, models, adapters)
    unpatch(obj)
    report = PatchReport(backend=backend)
    for prefix, root in _prepare(obj, report, backend, models, adapters, adapter_scale):
        _walk(root, prefix, report, backend, dict(attention=attention, norms=norms, rope=rope,
                                                  activations=activations), strict)
    if strict:
        _raise_strict(obj, report, backend)
    note = _auto_note(report)
    if note is not None:
        report.notes.append(note)
    return report


def _check_args(obj, backend: str, models: bool, adapters) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"fastgen.patch: backend must be one of {BACKENDS}, got {backend!r}")
    _components(obj)
    if models and isinstance(obj, nn.Module):
        raise TypeError("fastgen.patch(models=True) swaps a diffusers pipeline's components; for a single "
                        "model use fastgen.models.<Model>.from_diffusers(model) (or "
                        "fastgen.vae.AutoencoderKL.from_diffusers)")
    if models and adapters is not None:
        raise ValueError("fastgen.patch: adapters= runs adapter files unmerged on the diffusers components, and "
                         "models=True replaces those by fastgen models, which take adapters only merged "
                         "(fastgen.adapters.apply(model, path, merge=True)); pass one of the two")


def _prepare(obj, report: PatchReport, backend: str, models: bool, adapters, adapter_scale: float) -> list:
    """The component swaps (``models=True``) or the note offering them, the adapters, the device note;
    returns the components that run now."""
    from fastgen.patch import adapter_files, components

    if models:
        components.swap(obj, report, backend)
    else:
        offer = components.offer(obj)
        if offer is not None:
            report.notes.append(offer)
    comps = _components(obj)  # after unpatch / the swaps: the components that run now
    if adapters is not None:
        adapter_files.apply(obj, comps, adapters, report, backend, adapter_scale)
    note = _device_note(comps, backend)
    if note is not None:
        report.notes.append(note)
    return comps


def _walk(root: nn.Module, prefix: str, report: PatchReport, backend: str, rules: dict, strict: bool) -> None:
    """Patch every module of ``root`` a rule knows; a child whose work a patched parent's plan
    fuses is reported as fused and left alone."""
    from fastgen.patch import activations as act_rules
    from fastgen.patch import attention as attn_rules
    from fastgen.patch import components
    from fastgen.patch import norms as norm_rules

    if components.is_fastgen_module(root):
        return  # fastgen's own model: its fused ops already
    absorbed: dict = {}  # id(child) -> (the parent path whose fused forward does its work, the kernel)
    for name, module in root.named_modules():
        path = _join(prefix, name)
        if id(module) in absorbed:
            parent, kernel = absorbed[id(module)]
            report.fused.append(Fused(path, type(module).__name__, kernel, parent))
            continue
        plans = []
        if rules["norms"] or rules["activations"]:
            plans.append(norm_rules.patch_module(module, path, report, backend, norms=rules["norms"],
                                                 activations=rules["activations"], strict=strict))
        if rules["activations"]:
            plans.append(act_rules.patch_module(module, path, report, backend, strict=strict))
        if rules["attention"] and hasattr(module, "processor") and hasattr(module, "set_processor"):
            plans.append(attn_rules.patch_attention(module, path, report, backend, rope=rules["rope"], strict=strict))
        for plan in plans:
            for child in plan.children(module) if plan is not None else ():
                absorbed[id(child)] = (path, plan.kernel())


def _raise_strict(obj, report: PatchReport, backend: str) -> None:
    """``strict=True``: unpatch and raise, naming every site left alone as an error or partly on the reference."""
    errors = [f"{s.path or '<root>'}: {s.reason}" for s in report.skipped if s.strict_error]
    errors += [f"{r.path or '<root>'}: {ON_REFERENCE} for {serve.describe(dict(r.reference))}"
               for r in report.replaced if r.reference]
    if errors:
        unpatch(obj)  # all or nothing
        raise PatchError(f"fastgen.patch(strict=True, backend={backend!r}): {len(errors)} site(s) cannot "
                         f"be patched as asked:\n  " + "\n  ".join(errors))


def _auto_note(report: PatchReport) -> Optional[str]:
    """With ``backend="auto"``: say so when auto runs the reference for every op the patch uses."""
    if report.backend != "auto" or not report.replaced:
        return None
    from fastgen.backend import AUTO_ON_CUDA, default

    if default() != "auto" or any(AUTO_ON_CUDA.get(op, "torch") != "torch" for op in serve.PATCH_OPS):
        return None
    return ("backend='auto' runs the torch reference for these ops on every device until a recorded GPU run "
            "lists a kernel in fastgen/backend.py (AUTO_ON_CUDA); fastgen.patch(model, backend='triton') runs "
            "the Triton kernels wherever they can serve")


def unpatch(obj) -> None:
    """Undo :func:`patch`: original classes and attention processors back, exactly as they were;
    the adapters of ``adapters=`` removed and the components ``models=True`` swapped put back."""
    from fastgen.patch import adapter_files, components

    adapter_files.remove(obj)
    comps = _components(obj)
    components.restore(obj)
    for _, root in comps + _components(obj):
        for module in root.modules():
            d = module.__dict__
            if ORIG_CLASS in d:
                module.__class__ = d.pop(ORIG_CLASS)
            if ORIG_PROCESSOR in d:
                original = d.pop(ORIG_PROCESSOR)
                if hasattr(module.processor, "fastgen_backend"):  # not replaced by the user since
                    module.processor = original
            d.pop(BACKEND_ATTR, None)
            serve.unmark(module)


def backend_of(module) -> Optional[str]:
    return module.__dict__.get(BACKEND_ATTR)


def run(module, op: str, fn: Callable, *args, **kwargs):
    """Call fastgen op ``fn`` (named ``op``) as the patched ``module`` (or processor) runs it:
    its backend, the reference where the patch or the call decides so (``serve.run_op``)."""
    d = module.__dict__
    b = d[BACKEND_ATTR] if BACKEND_ATTR in d else d.get("fastgen_backend")  # class-swapped module / processor
    return serve.run_op(module, b, op, fn, *args, **kwargs)


def supported_float(t: torch.Tensor) -> bool:
    return t.dtype in (torch.float32, torch.float16, torch.bfloat16)
