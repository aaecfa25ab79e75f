"""Input checks shared by the ops: one wording for the same mistake everywhere."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from fastgen.limits import KERNEL_DTYPES, kernel_dtype_reason  # noqa: F401  (defined once, read here too)


def check_eps(op: str, eps) -> None:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"{op}: eps must be a finite number >= 0, got {eps!r}")


def check_param(op: str, name: str, p, x: Tensor, dim: int = -1, what: Optional[str] = None) -> None:
    """A per-feature parameter (weight, bias): shape ``(x.shape[dim],)``, x's device, x.dtype or float32.
    ``what`` says what the values are for, in the shape error (default: the dim of x they match)."""
    if p is None:
        return
    n = x.shape[dim]
    if not isinstance(p, Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor or None, got {type(p).__name__}")
    if p.shape != (n,):
        what = what or ("to match the last dim of x" if dim == -1 else f"to match dim {dim} of x")
        raise ValueError(f"{op}: {name} must have shape ({n},) {what} {tuple(x.shape)}, got {tuple(p.shape)}")
    if p.device != x.device:
        raise ValueError(f"{op}: {name} is on {p.device} but x is on {x.device}; put both on one device")
    if p.dtype not in (x.dtype, torch.float32):
        raise TypeError(f"{op}: {name} dtype {p.dtype} does not match x dtype {x.dtype}; {param_dtype_remedy(name, x)}")


def param_dtype_remedy(name: str, x: Tensor) -> str:
    """What to do about a parameter of the wrong dtype: the dtypes the op takes for it, once each."""
    if x.dtype == torch.float32:
        return f"cast {name} to torch.float32 ({name}.float())"
    return f"cast {name} to {x.dtype} or torch.float32 ({name}.to(x.dtype) or {name}.float())"

