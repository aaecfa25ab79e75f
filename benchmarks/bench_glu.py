"""Gated linear unit benchmark suite: ``y = a * act(g)`` with ``a, g = x.chunk(2, -1)``.

Run it with ``fastgen bench --ops glu``. The variant is the activation: the plain rows
(no variant, the plotted ones) are GEGLU with the exact GELU (the feed-forward of SD
1.x/2.x/SDXL UNets), ``gelu_tanh`` and ``silu`` (SwiGLU) the others.
Providers:

- ``torch``: what diffusers' ``GEGLU`` / ``SwiGLU`` run in eager mode, in the input
  dtype: ``a, g = x.chunk(2, -1); a * act(g)`` (two kernels);
- ``torch.compile``: that same function under ``torch.compile(dynamic=False)``;
- ``fastgen-triton``: ``fastgen.ops.glu(backend="triton")`` (one pass);
- ``liger-kernel``: ``LigerSiLUMulFunction`` / ``LigerGELUMulFunction`` (tanh GELU),
  which take the two halves as separate tensors (the chunk views are passed).

Modes: ``fwd``, ``bwd`` (the backward of one recorded forward), ``fwd+bwd``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastgen.backend import interpreter_enabled
from fastgen.ops import glu

from .harness import Case, Unavailable, autograd_step, by_mode, fastgen_backend, peer

OP = "glu"
PROVIDERS = ("torch", "torch.compile", "fastgen-triton", "liger-kernel")
GPU_ONLY = ("fastgen-triton", "liger-kernel")
MODES = ("fwd", "bwd", "fwd+bwd")
PLOT_X = "N"


def cases(device: str, quick: bool) -> list[Case]:
    """Tokens M x hidden N of the output (x is M x 2N); bf16 first (the plotted dtype)."""
    bf16 = torch.bfloat16
    if device != "cuda":
        if quick:
            return [Case({"M": 256, "N": 1280}, bf16)]
        return [Case({"M": 256, "N": 1280}, bf16), Case({"M": 256, "N": 1280}, bf16, "silu"),
                Case({"M": 256, "N": 1280}, torch.float32)]
    # SD 1.5 at 512^2 (4096 tokens x 1280), SDXL at 1024^2 (4096 tokens x 5120, batch 2), a DiT-style MLP.
    shapes = [{"M": 2 * 4096, "N": 1280}, {"M": 2 * 4096, "N": 5120}, {"M": 8192, "N": 10240}]
    if quick:
        return [Case(shapes[1], bf16)]
    out = [Case(s, bf16, act) for act in ("", "gelu_tanh", "silu") for s in shapes]
    out += [Case(shapes[1], dt) for dt in (torch.float16, torch.float32)]
    return out


def activation(case: Case) -> str:
    """The activation of a case: its variant, GEGLU's exact "gelu" for the plain rows."""
    return case.variant or "gelu"


def bytes_moved(case: Case, mode: str) -> int:
    """fwd: read x (2MN), write y (MN); bwd: read dy (MN) and x (2MN), write dx (2MN)."""
    mn = case.shape["M"] * case.shape["N"] * torch.empty((), dtype=case.dtype).element_size()
    return by_mode(mode, 3 * mn, 5 * mn)


def _eager(x: torch.Tensor, act: str) -> torch.Tensor:
    a, g = x.chunk(2, dim=-1)
    if act == "silu":
        return a * F.silu(g)
    return a * F.gelu(g, approximate="tanh" if act == "gelu_tanh" else "none")


def _impl(provider: str, act: str, device: str):
    if provider == "torch":
        return lambda x: _eager(x, act)
    if provider == "torch.compile":
        torch._dynamo.reset()
        compiled = torch.compile(_eager, dynamic=False)
        return lambda x: compiled(x, act)
    if provider == "fastgen-triton":
        if device == "cuda" and interpreter_enabled():
            raise Unavailable("TRITON_INTERPRET=1 is set: interpreter timings mean nothing; unset it")
        backend = fastgen_backend(provider, device)
        return lambda x: glu(x, act, backend=backend)
    if provider == "liger-kernel":
        if act == "silu":
            fn = peer("liger_kernel.ops.swiglu", "LigerSiLUMulFunction", device=device)
        elif act == "gelu_tanh":
            fn = peer("liger_kernel.ops.geglu", "LigerGELUMulFunction", device=device)
        else:
            raise Unavailable("liger-kernel's GEGLU uses the tanh approximation only")
        return lambda x: fn.apply(*x.chunk(2, dim=-1))
    raise ValueError(f"unknown provider {provider!r}; expected one of {PROVIDERS}")


def setup(provider: str, case: Case, mode: str, device: str):
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
    f = _impl(provider, activation(case), device)
    M, N = case.shape["M"], case.shape["N"]
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(M, 2 * N, device=device, dtype=case.dtype, generator=gen).requires_grad_(mode != "fwd")
    grads = [torch.randn(M, N, device=device, dtype=case.dtype, generator=gen)] if mode != "fwd" else []
    return autograd_step(f, (x,), mode, grads, [x])
