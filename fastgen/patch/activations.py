"""Activation rules of ``fastgen.patch``: gated feed-forward units -> ``fastgen.ops.glu``.

    diffusers GEGLU    proj(x) -> (a, g) -> a * gelu(g)   -> glu(proj(x), "gelu")   (SD/SDXL UNets)
    diffusers SwiGLU   proj(x) -> (a, g) -> a * silu(g)   -> glu(proj(x), "silu")

The projection stays the module's own ``nn.Linear``; the split, activation and product
become one pass. The un-gated activations (diffusers ``GELU`` with or without the tanh
approximation, ``ApproximateGELU``, ``LinearActivation``) are a Linear followed by one
elementwise op that PyTorch already runs in a single kernel; only a GEMM epilogue would
fuse them further, so they are left alone and listed in the report with that reason.
"""

from __future__ import annotations

import torch

from fastgen.ops import glu
from fastgen.patch.core import Skipped, orig_forward, qualname, replaced, run, site, supported_float, swap_forward
from fastgen.patch.records import Plan
from fastgen.patch.serve import mark, param_dtype

try:  # diffusers is optional
    from diffusers.models import activations as _da
except Exception:  # pragma: no cover - diffusers missing or broken
    _da = None

UNFUSED_REASON = ("a Linear then one elementwise activation, which PyTorch already runs as one kernel; "
                  "fusing further needs a GEMM epilogue (not in fastgen)")


def _glu(self, activation: str, hidden_states, args, kwargs):
    if args or kwargs or not isinstance(hidden_states, torch.Tensor) or not supported_float(hidden_states):
        return orig_forward(self)(hidden_states, *args, **kwargs)
    return run(self, "glu", glu, self.proj(hidden_states), activation)


def _geglu_forward(self, hidden_states, *args, **kwargs):
    return _glu(self, "gelu", hidden_states, args, kwargs)


def _swiglu_forward(self, hidden_states, *args, **kwargs):
    return _glu(self, "silu", hidden_states, args, kwargs)


def _rules() -> dict:
    if _da is None:
        return {}
    rules = {_da.GEGLU: (_geglu_forward, Plan.of("glu", args="activation='gelu'"))}
    if hasattr(_da, "SwiGLU"):
        rules[_da.SwiGLU] = (_swiglu_forward, Plan.of("glu", args="activation='silu'"))
    return rules


def _unfused_classes() -> tuple:
    if _da is None:
        return ()
    return tuple(getattr(_da, n) for n in ("GELU", "ApproximateGELU", "LinearActivation") if hasattr(_da, n))


def patch_module(module, path: str, report, backend: str, strict: bool = False):
    """Swap in the fused GLU forward when ``module`` is a known gated unit (returns its :class:`Plan`);
    note the others (None)."""
    cls = type(module)
    rule = _rules().get(cls)
    if rule is not None:
        if cls is getattr(_da, "SwiGLU", None) and not isinstance(module.activation, torch.nn.SiLU):
            report.skipped.append(Skipped(path, cls.__name__, "its activation is not SiLU"))
            return None
        forward, plan = rule
        reference = site(path, report, backend, cls.__name__, {op: dict(dtype=param_dtype(module.proj))
                                                              for op in plan.ops})
        if reference is None:
            return None
        swap_forward(module, forward, forward.__name__, backend)
        mark(module, backend, path, reference, strict)
        replaced(report, path, qualname(cls), plan, reference)
        return plan
    if cls in _unfused_classes():
        report.skipped.append(Skipped(path, cls.__name__, UNFUSED_REASON))
    return None
