"""Which call sites a kernel family can serve: checked at patch time, enforced at call time.

``fastgen.patch(model, backend="triton" | "cuda")`` means "this kernel family wherever it can
serve". A *site* is a patched module or processor; it calls one or more fastgen ops (a Flux
processor: ``qk_norm_rope``, ``apply_rope``, ``attention``). For each op of a site the patcher
asks, with what is known before any call::

    op_reason(backend, op, dtype=..., head_dim=..., channels=..., groups=...)  -> None | why not

- the op has an implementation in that family (``fastgen.cuda.<op>`` for CUDA C++;
  LayerNorm family, GLU and attention are Triton-only);
- the family can run on this machine at all (Triton imports, the CUDA extension is built);
- the op's own rule accepts the site's facts: its parameters' dtype, its head dim (attention:
  multiples of 8 from 16 to 256, float16 / bfloat16), its channels per group (GroupNorm).
  The rules are the ops' own ``unsupported`` checks, asked on ``meta`` tensors of the
  site's shapes, so the patcher and the ops never disagree.

An op that cannot serve the site runs its torch reference there (``backend="torch"``), and the
report says why; a site none of whose ops can serve is left unpatched. What cannot be known
before a call (the tensors' device, a dtype changed after patching) is checked by the op at
the call: :func:`run_op` then runs the reference and warns once per module
(:class:`PatchFallbackWarning`). ``strict=True`` turns both into errors: the patch raises,
naming every site, and the ops raise at the call as ``backend=`` on an op always does.
"""

from __future__ import annotations

import warnings
from typing import Callable, Optional

import torch

from fastgen.backend import BackendUnavailableError, unavailable_reason

FAMILIES = ("triton", "cuda")
REFERENCE_ATTR = "_fastgen_reference"   # {op: why it runs the reference here}
STRICT_ATTR = "_fastgen_strict"
PATH_ATTR = "_fastgen_path"
WARNED_ATTR = "_fastgen_warned"

# The ops a patched model calls.
PATCH_OPS = ("rms_norm", "layer_norm", "layer_norm_modulate", "rms_norm_modulate", "group_norm", "apply_rope",
             "qk_norm_rope", "glu", "attention")


class PatchFallbackWarning(UserWarning):
    """A patched site's kernel could not serve a call; the reference ran instead (once per module)."""


def short(reason: str) -> str:
    """An op's reason without its remedy (``...; use backend='torch'``): in a patched model the
    remedy is what the patcher already did for that site."""
    return reason.split("; ")[0]


def family_reason(backend: str) -> Optional[str]:
    """Why the family cannot run on this machine whatever the site, or None."""
    if backend == "triton":
        why = unavailable_reason("triton", torch.device("cuda"))  # device-independent part: Triton imports
    elif backend == "cuda":
        why = unavailable_reason("cuda", torch.device("cuda"))    # the extension is built and imports
    else:
        return None
    return None if why is None else short(why)


def _has_cuda(op: str) -> bool:
    """Whether ``op`` has a registered CUDA C++ implementation (fastgen.backend's registry)."""
    from fastgen import backend

    return "cuda" in backend.implementations(op)


def _meta(*shape, dtype) -> torch.Tensor:
    return torch.empty(*shape, dtype=dtype, device="meta")


def _rule_reason(op: str, dtype, head_dim, channels, groups) -> Optional[str]:
    """The op's own "cannot serve" rule on meta tensors of the site's facts (None: serves or unknown)."""
    if dtype is None:
        dtype = torch.float16 if op == "attention" else torch.float32  # unknown: let the call decide
    if op == "attention":
        from fastgen.ops.attention import _unsupported

        return _unsupported(_meta(1, 1, 1, head_dim or 64, dtype=dtype))
    if op in ("apply_rope", "qk_norm_rope"):
        from fastgen.ops.rope import unsupported_qk

        table = _meta(1, 2, dtype=torch.float32)
        return unsupported_qk(_meta(1, 1, 1, head_dim or 64, dtype=dtype), table, table)
    if op == "group_norm" and channels is not None and groups:
        from fastgen.ops.group_norm import _unsupported

        return _unsupported(_meta(1, channels, 1, dtype=dtype), groups)
    from fastgen.ops._checks import kernel_dtype_reason

    return kernel_dtype_reason(_meta(1, dtype=dtype))


def op_reason(backend: str, op: str, dtype=None, head_dim=None, channels=None, groups=None) -> Optional[str]:
    """Why ``backend`` cannot serve ``op`` at a site with these facts (None: it can, or the call decides)."""
    if backend not in FAMILIES:
        return None
    if backend == "cuda" and not _has_cuda(op):
        return "no CUDA C++ implementation (Triton only)"
    why = family_reason(backend)
    if why is not None:
        return why
    why = _rule_reason(op, dtype, head_dim, channels, groups)
    return None if why is None else short(why)


def plan(backend: str, ops: dict) -> dict:
    """``{op: reason}`` for the ops of a site that run the reference; ``ops`` is ``{op: facts}``
    (facts: a dict of op_reason keywords, or a list of such dicts when the op runs at several
    shapes in the site: the first reason counts)."""
    out = {}
    for op, facts in ops.items():
        for f in facts if isinstance(facts, list) else [facts]:
            why = op_reason(backend, op, **f)
            if why is not None:
                out[op] = why
                break
    return out


def param_dtype(*modules) -> Optional[torch.dtype]:
    """The dtype of the first floating-point parameter of ``modules`` (None when they have none)."""
    for m in modules:
        if m is None:
            continue
        for p in m.parameters():
            if p.is_floating_point():
                return p.dtype
    return None


def describe(reference: dict) -> str:
    return "; ".join(f"{op}: {why}" for op, why in reference.items())


# ----------------------------------------------------------------------------- call time


def _state(owner):
    return owner.__dict__ if hasattr(owner, "__dict__") else {}


def mark(owner, backend: str, path: str, reference: dict, strict: bool) -> None:
    """Record on a patched module / processor what :func:`run_op` needs."""
    d = owner.__dict__
    d[REFERENCE_ATTR] = dict(reference)
    d[STRICT_ATTR] = bool(strict)
    d[PATH_ATTR] = path
    d.pop(WARNED_ATTR, None)


def unmark(owner) -> None:
    for key in (REFERENCE_ATTR, STRICT_ATTR, PATH_ATTR, WARNED_ATTR):
        owner.__dict__.pop(key, None)


def run_op(owner, backend: Optional[str], op: str, fn: Callable, *args, **kwargs):
    """``fn(*args, backend=..., **kwargs)`` as the site ``owner`` runs ``op``.

    The reference when the patch decided so; else the site's backend, and when that backend
    cannot serve this very call (``BackendUnavailableError``: CPU tensors, a dtype changed
    after patching) the reference, with a :class:`PatchFallbackWarning` once per module.
    ``strict=True`` sites raise instead.
    """
    d = _state(owner)
    if op in d.get(REFERENCE_ATTR, ()):
        return fn(*args, backend="torch", **kwargs)
    if backend not in FAMILIES or d.get(STRICT_ATTR, True):
        return fn(*args, backend=backend, **kwargs)
    try:
        return fn(*args, backend=backend, **kwargs)
    except BackendUnavailableError as exc:
        warned = d.setdefault(WARNED_ATTR, set())
        if not warned:
            warnings.warn(f"fastgen.patch: {d.get(PATH_ATTR) or '<root>'}: {exc}; this call runs the reference "
                          f"instead (warned once per module; fastgen.patch(..., strict=True) raises)",
                          PatchFallbackWarning, stacklevel=3)
        warned.add(op)
        return fn(*args, backend="torch", **kwargs)
