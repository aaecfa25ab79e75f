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

This module is callable: ``fastgen.backend("torch")`` is the same as
``fastgen.backend.use("torch")``.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
import types
from typing import Iterator

import torch

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


def interpreter_enabled() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


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


def resolve(op: str, requested: str | None, device: torch.device, unsupported: str | dict | None = None) -> str:
    """The implementation (``"triton" | "cuda" | "torch"``) that runs ``op`` on ``device``.

    ``unsupported`` is the op's own reason why its kernels cannot serve this call
    (a dtype or size they do not cover), or a dict of such reasons per
    implementation (``{"cuda": "not written yet"}``), or None. ``"auto"`` then takes
    the torch reference; an explicit kernel backend raises :class:`BackendUnavailableError`.
    """
    if not isinstance(unsupported, dict):
        unsupported = {} if unsupported is None else {"triton": unsupported, "cuda": unsupported}
    unsupported = {k: v for k, v in unsupported.items() if v is not None}
    name = default() if requested in (None, "auto") else _check_name(requested, f"{op}(backend=...)")
    if name == "auto":
        if device.type != "cuda":
            return _record(op, "torch")
        choice = AUTO_ON_CUDA.get(op, "torch")
        ok = choice == "torch" or (choice not in unsupported and unavailable_reason(choice, device) is None)
        return _record(op, choice if ok else "torch")
    # Every reason at once (tensors on the wrong device *and* a dtype the kernels lack, say), so
    # that fixing the first does not just reveal the next.
    reasons = [r for r in (unavailable_reason(name, device), unsupported.get(name)) if r is not None]
    if reasons:
        raise BackendUnavailableError(f"{op}: backend={name!r} cannot run: {'; and '.join(reasons)}")
    return _record(op, name)


def launchers(module: str, impl: str):
    """The launcher module of an op's implementation: ``fastgen.kernels.<module>`` for
    ``"triton"``, ``fastgen.cuda.<module>`` for ``"cuda"`` (same launcher signatures)."""
    if impl not in ("triton", "cuda"):
        raise ValueError(f"no kernel implementation named {impl!r}")
    return importlib.import_module(f"fastgen.{'kernels' if impl == 'triton' else 'cuda'}.{module}")


class _CallableModule(types.ModuleType):
    """Lets ``fastgen.backend("torch")`` work as a context manager while
    ``fastgen.backend`` stays this module."""

    def __call__(self, name: str):
        return use(name)


sys.modules[__name__].__class__ = _CallableModule
