"""Which implementation of an op runs: ``"auto" | "triton" | "cuda" | "torch"``.

Precedence, highest first:

1. the ``backend=`` argument of the op, unless it is ``"auto"`` (its default) or ``None``;
2. the innermost ``with fastgen.backend("triton"):`` block;
3. the ``FASTGEN_BACKEND`` environment variable;
4. ``"auto"``.

``"auto"`` picks, for CUDA tensors, the implementation listed in ``AUTO_ON_CUDA``
for the op — the fastest one in a *recorded* ``scripts/gpu_suite.sh`` run that
also passed the GPU test tier there — and for CPU tensors the torch reference.
If the listed implementation cannot run here (the extension was not built, say),
``auto`` falls back to the torch reference, which computes the same function.
An explicitly requested backend that cannot serve a call raises
:class:`BackendUnavailableError` saying why and what to do.

The kernel implementations of each op are **registered**, beside their launchers
(``fastgen/kernels/__init__.py`` for Triton, ``fastgen/cuda/__init__.py`` for CUDA C++),
with :func:`implements`: the op, the implementation, the launcher module (imported
the first time the implementation runs) and its own "can I serve this call" check.
:func:`resolve` is the one place that decides which implementation runs, and it
reads that registry; so do ``fastgen info``, the benchmarks and the tests.

This module is callable: ``fastgen.backend("torch")`` is the same as
``fastgen.backend.use("torch")``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import os
import sys
import types
from typing import Callable, Iterator, Optional

import torch

from fastgen.limits import interpreter_enabled  # noqa: F401  (fastgen.backend.interpreter_enabled)

BACKENDS = ("auto", "triton", "cuda", "torch")
IMPLEMENTATIONS = ("triton", "cuda", "torch")

# What "auto" runs on CUDA tensors, per op. An entry may name "triton" or "cuda"
# only once a recorded gpu_suite run (benchmarks/results/<device>/) shows that
# implementation passing `pytest -m gpu` and beating the alternatives. No such
# run has been recorded for these ops yet, so "auto" keeps the reference.
AUTO_ON_CUDA: dict[str, str] = {
    "rms_norm": "torch",
    "group_norm": "torch",
    "layer_norm": "torch",
    "layer_norm_modulate": "torch",
    "rms_norm_modulate": "torch",
    "gated_residual": "torch",
    "gated_residual_layer_norm_modulate": "torch",
    "apply_rope": "torch",
    "qk_norm_rope": "torch",
    "adamw": "torch",
    "lion": "torch",
    "clip_grad_norm_": "torch",
    "ema": "torch",
    "attention": "torch",
    "glu": "torch",
}

_override: list[str] = []  # stack of `with fastgen.backend(...)` values
_traces: list[list[tuple[str, str]]] = []  # open `with fastgen.backend.trace()` blocks


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot serve this call; the message says why."""


# ----------------------------------------------------------------------------- the registry

_LABELS = {"triton": "Triton", "cuda": "CUDA C++"}


@dataclasses.dataclass(frozen=True)
class Implementation:
    """One kernel implementation of an op, as registered beside its launchers.

    ``modules``: the launcher modules (forward and backward may live apart), imported when the
    implementation first runs. ``serves(*call)`` says why this implementation cannot serve a
    call (a dtype or a size its kernels lack), or returns None; ``call`` is what the op passes
    to :func:`resolve`."""

    op: str
    name: str  # "triton" | "cuda"
    modules: tuple[str, ...]
    serves: Optional[Callable[..., Optional[str]]] = None

    def launchers(self) -> "_Launchers":
        return _Launchers(tuple(importlib.import_module(m) for m in self.modules))

    def reason(self, call: tuple) -> Optional[str]:
        return None if self.serves is None else self.serves(*call)


class _Launchers:
    """The launchers of an implementation: attribute lookup through its modules, in order."""

    def __init__(self, modules: tuple[types.ModuleType, ...]):
        self._modules = modules

    def __getattr__(self, name: str):
        for module in self._modules:
            if hasattr(module, name):
                return getattr(module, name)
        raise AttributeError(f"no launcher {name!r} in {[m.__name__ for m in self._modules]}")


REGISTRY: dict[str, dict[str, Implementation]] = {}


def implements(op: str, name: str, *modules: str, serves: Optional[Callable[..., Optional[str]]] = None
               ) -> Implementation:
    """Register ``modules`` (their launchers) as implementation ``name`` of ``op``; ``serves``:
    the implementation's own check, ``serves(*call) -> reason | None``."""
    if name not in _LABELS:
        raise ValueError(f"implementation of {op!r} must be one of {tuple(_LABELS)}, got {name!r}")
    if not modules:
        raise ValueError(f"implementation {name!r} of {op!r} names no launcher module")
    impl = Implementation(op, name, modules, serves)
    REGISTRY.setdefault(op, {})[name] = impl
    return impl


def implementations(op: str) -> tuple[str, ...]:
    """The implementations registered for ``op``, plus the torch reference that every op has."""
    return tuple(REGISTRY.get(op, {})) + ("torch",)


def launcher(op: str, name: str) -> _Launchers:
    """The launcher module of ``op``'s registered implementation ``name``."""
    try:
        return REGISTRY[op][name].launchers()
    except KeyError:
        raise BackendUnavailableError(_missing(op, name)) from None


def _missing(op: str, name: str) -> str:
    others = " or ".join(f"backend={n!r}" for n in implementations(op) if n != name)
    return f"this op has no {_LABELS.get(name, name)} implementation; use {others}"


def _check_name(name: str, where: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r} from {where}; expected one of {BACKENDS}")
    return name


def default() -> str:
    """The backend that ``backend="auto"`` (or ``None``) on an op stands for right now."""
    if _override:
        return _override[-1]
    return _check_name(os.environ.get("FASTGEN_BACKEND", "auto") or "auto", "FASTGEN_BACKEND")


@contextlib.contextmanager
def use(name: str) -> Iterator[None]:
    """Run the ops called inside the block with backend ``name``."""
    _override.append(_check_name(name, "fastgen.backend()"))
    try:
        yield
    finally:
        _override.pop()


@contextlib.contextmanager
def trace() -> Iterator[list[tuple[str, str]]]:
    """Record which implementation each op resolved to inside the block::

        with fastgen.backend.trace() as ran:
            y = fastgen.ops.rms_norm(x, w)
        print(ran)  # [("rms_norm", "torch")]

    The GPU test tier uses it to prove that the implementation a test names is the one that ran."""
    record: list[tuple[str, str]] = []
    _traces.append(record)
    try:
        yield record
    finally:
        _traces.remove(record)


def _record(op: str, impl: str) -> str:
    for record in _traces:
        record.append((op, impl))
    return impl


def _triton_import_error() -> str | None:
    try:
        import triton  # noqa: F401
    except Exception as exc:  # pragma: no cover - triton is a dependency
        return f"{type(exc).__name__}: {exc}"
    return None


def unavailable_reason(name: str, device: torch.device) -> str | None:
    """Why implementation ``name`` cannot run on tensors of ``device``, or None if it can."""
    if name == "torch":
        return None
    if name == "triton":
        err = _triton_import_error()
        if err is not None:
            return f"Triton does not import ({err}); install triton>=3.6 or use backend='torch'"
        if device.type == "cuda":
            return None
        if device.type == "cpu" and interpreter_enabled():
            return None
        return (
            f"the Triton backend needs CUDA tensors, got tensors on {device.type}; "
            "move them to a GPU, use backend='torch', or set TRITON_INTERPRET=1 to run "
            "the kernels in Triton's CPU interpreter (slow, meant for tests)"
        )
    if name == "cuda":
        if device.type != "cuda":
            return (
                f"the CUDA C++ backend needs CUDA tensors, got tensors on {device.type}; "
                "move them to a GPU or use backend='torch'"
            )
        from fastgen.cuda import extension_info

        info = extension_info()
        if not info["built"]:
            return str(info["error"])
        return None
    raise ValueError(f"unknown implementation {name!r}; expected one of {IMPLEMENTATIONS}")


def _reasons(op: str, name: str, device: torch.device, unsupported: dict, call: tuple) -> list[str]:
    """Every reason why implementation ``name`` cannot run this call (none: it can)."""
    if name == "torch":
        return []
    registered = REGISTRY.get(op)
    impl = None if registered is None else registered.get(name)
    reasons = [_missing(op, name)] if registered is not None and impl is None else []
    reasons.append(unavailable_reason(name, device))
    if impl is not None and call:
        reasons.append(impl.reason(call))
    elif impl is not None or registered is None:  # a caller that gives its own reasons, not its call
        reasons.append(unsupported.get(name))
    return [r for r in reasons if r is not None]


def resolve(
    op: str, requested: str | None, device: torch.device, unsupported: str | dict | None = None, *, call: tuple = ()
) -> str:
    """The implementation (``"triton" | "cuda" | "torch"``) that runs ``op`` on ``device``: the one
    place that decides.

    For an op in the registry, an implementation serves a call when it is registered, can run on
    ``device`` and its own check ``serves(*call)`` passes. ``unsupported`` is the caller's own reason
    why its kernels cannot serve this call, or a dict of reasons per implementation, for the
    registered kernels that give their reasons instead of their call (the optimizers' steps, the
    adapters' and the VQ search: layouts, ranks, norm types) and for unregistered names.
    ``"auto"`` then takes the torch reference; an explicit kernel backend raises
    :class:`BackendUnavailableError` with every reason at once (fixing the first does not just
    reveal the next).
    """
    if not isinstance(unsupported, dict):
        unsupported = {} if unsupported is None else {"triton": unsupported, "cuda": unsupported}
    name = default() if requested in (None, "auto") else _check_name(requested, f"{op}(backend=...)")
    if name == "auto":
        if device.type != "cuda":
            return _record(op, "torch")
        choice = AUTO_ON_CUDA.get(op, "torch")
        return _record(op, "torch" if _reasons(op, choice, device, unsupported, call) else choice)
    reasons = _reasons(op, name, device, unsupported, call)
    if reasons:
        raise BackendUnavailableError(f"{op}: backend={name!r} cannot run: {'; and '.join(reasons)}")
    return _record(op, name)


class _CallableModule(types.ModuleType):
    """Lets ``fastgen.backend("torch")`` work as a context manager while
    ``fastgen.backend`` stays this module."""

    def __call__(self, name: str):
        return use(name)


sys.modules[__name__].__class__ = _CallableModule

# The registrations, beside the launchers (torch-only: neither imports Triton or fastgen._C).
from fastgen import kernels as _triton_launchers  # noqa: E402,F401
from fastgen import cuda as _cuda_launchers  # noqa: E402,F401
