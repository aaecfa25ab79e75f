"""RMSNorm benchmark suite: ``y = x / sqrt(mean(x^2) + eps) * w`` over the last dim.

Run it with ``fastgen bench --ops rms_norm`` (see ``harness.py`` for the suite
contract). Providers:

- ``torch``: ``fastgen.ops.rms_norm_ref`` in eager mode (the reference);
- ``torch.compile``: the same reference under ``torch.compile(dynamic=False)``;
- ``fastgen-triton`` / ``fastgen-cuda``: ``fastgen.ops.rms_norm(backend=...)``;
- ``liger-kernel``: ``LigerRMSNormFunction`` with ``casting_mode="llama"`` (fp32
  inverse RMS, like ours) and ``in_place=False`` (so ``dy`` is not overwritten
  between timed backward calls); it has no residual form, so residual rows say so.

The ``residual`` variant is the fused pre-norm ``h = x + residual; y = rmsnorm(h)``
returning ``(y, h)``; its backward takes gradients for both outputs.

Modes: ``fwd`` is an inference forward (inputs do not require grad); ``bwd`` times
only the backward of one recorded forward (``retain_graph=True``, grads reset to
None outside the timed region); ``fwd+bwd`` times both.
"""

from __future__ import annotations

import inspect

import torch

from fastgen.backend import interpreter_enabled
from fastgen.ops import rms_norm, rms_norm_ref

from .harness import Case, Unavailable, autograd_step, by_mode, fastgen_backend, peer

OP = "rms_norm"
PROVIDERS = ("torch", "torch.compile", "fastgen-triton", "fastgen-cuda", "liger-kernel")
GPU_ONLY = ("fastgen-triton", "fastgen-cuda", "liger-kernel")
MODES = ("fwd", "bwd", "fwd+bwd")
PLOT_X = "N"
EPS = 1e-6

_M = 32768


def cases(device: str, quick: bool) -> list[Case]:
    """Shapes to measure: rows M x hidden size N, bf16 first (the plotted dtype)."""
    bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
    if device != "cuda":  # small enough that the CPU run takes seconds
        if quick:
            return [Case({"M": 256, "N": 1024}, bf16)]
        return [
            Case({"M": 256, "N": 1024}, bf16),
            Case({"M": 256, "N": 4096}, bf16),
            Case({"M": 256, "N": 4096}, fp32),
            Case({"M": 256, "N": 1024}, bf16, "residual"),
        ]
    if quick:
        return [
            Case({"M": _M, "N": 4096}, bf16),
            Case({"M": _M, "N": 16384}, bf16),
            Case({"M": _M, "N": 4096}, bf16, "residual"),
        ]
    out = [Case({"M": _M, "N": n}, bf16) for n in (1024, 4096, 8192, 16384, 65536)]
    out.append(Case({"M": 8192, "N": 131072}, bf16))
    out += [Case({"M": _M, "N": n}, dt) for dt in (fp16, fp32) for n in (4096, 16384)]
    out += [Case({"M": _M, "N": n}, bf16, "residual") for n in (1024, 4096, 8192, 16384)]
    return out


def rms_norm_bytes(M: int, N: int, dtype: torch.dtype, mode: str, residual: bool = False,
                   weight_dtype: torch.dtype | None = None) -> int:
    """Bytes a perfect kernel moves, each tensor read once and written once.

    e = element size of x, ew = element size of the weight (default: x's).

    - fwd: read x (M*N*e), write y (M*N*e), read w (N*ew);
      residual adds read residual (M*N*e) and write h = x + residual (M*N*e).
    - bwd: read dy (M*N*e), x (M*N*e; h with residual), w (N*ew), rstd (M*4 fp32);
      write dx (M*N*e) and dw (N*ew); residual adds read dh (M*N*e) — the gradient
      flowing into h — while d(residual) equals dx, one tensor written once.
    - fwd+bwd: fwd + bwd.
    """
    e = torch.empty((), dtype=dtype).element_size()
    ew = torch.empty((), dtype=weight_dtype or dtype).element_size()
    mn = M * N * e
    fwd = 2 * mn + N * ew + (2 * mn if residual else 0)
    bwd = 3 * mn + 2 * N * ew + M * 4 + (mn if residual else 0)
    return by_mode(mode, fwd, bwd)


def bytes_moved(case: Case, mode: str) -> int:
    return rms_norm_bytes(case.shape["M"], case.shape["N"], case.dtype, mode,
                          residual=case.variant == "residual")


_INTERPRETED = ("fastgen-triton", "liger-kernel")  # Triton code: never timed in the interpreter


def _impl(provider: str, residual: bool, device: str):
    """The function ``f(x, w, r) -> y | (y, h)`` that ``provider`` runs."""
    if provider in _INTERPRETED and device == "cuda":
        if interpreter_enabled():
            raise Unavailable("TRITON_INTERPRET=1 is set: Triton would run in its CPU interpreter, "
                              "whose timings mean nothing; unset it to benchmark")
    if provider == "torch":
        return lambda x, w, r: rms_norm_ref(x, w, EPS, r)
    if provider == "torch.compile":
        # A fresh cache per case: one compiled graph per shape, no recompile limit.
        torch._dynamo.reset()
        compiled = torch.compile(rms_norm_ref, dynamic=False)
        return lambda x, w, r: compiled(x, w, EPS, r)
    if provider in ("fastgen-triton", "fastgen-cuda"):
        backend = fastgen_backend(provider, device)
        return lambda x, w, r: rms_norm(x, w, EPS, r, backend=backend)
    if provider == "liger-kernel":
        LigerRMSNormFunction = peer("liger_kernel.ops.rms_norm", "LigerRMSNormFunction", device=device)
        if residual:
            raise Unavailable("LigerRMSNormFunction has no residual (fused add) form")
        # forward(X, W, eps, offset=0.0, casting_mode="llama", in_place=True, ...); releases
        # before in_place existed take the first five only.
        args = (EPS, 0.0, "llama")
        if "in_place" in inspect.signature(LigerRMSNormFunction.forward).parameters:
            args += (False,)
        return lambda x, w, r: LigerRMSNormFunction.apply(x, w, *args)
    raise ValueError(f"unknown provider {provider!r}; expected one of {PROVIDERS}")


def setup(provider: str, case: Case, mode: str, device: str):
    """Inputs for ``case`` and the function one measured step calls (speed and memory runs)."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
    residual = case.variant == "residual"
    f = _impl(provider, residual, device)
    M, N = case.shape["M"], case.shape["N"]
    grad = mode != "fwd"
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(M, N, device=device, dtype=case.dtype, generator=gen).requires_grad_(grad)
    w = (1 + 0.1 * torch.randn(N, device=device, generator=gen)).to(case.dtype).requires_grad_(grad)
    r = (torch.randn(M, N, device=device, dtype=case.dtype, generator=gen).requires_grad_(grad)
         if residual else None)
    leaves = [t for t in (x, w, r) if t is not None]
    grads = [torch.randn(M, N, device=device, dtype=case.dtype, generator=gen)
             for _ in range(2 if residual else 1)] if grad else []
    return autograd_step(lambda: f(x, w, r), (), mode, grads, leaves)
