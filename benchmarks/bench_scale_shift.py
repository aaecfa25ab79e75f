"""AdaLN modulation benchmark suite: ``y = x * (1 + scale) + shift`` (no norm).

Run it with ``fastgen bench --ops scale_shift``. The variant is where the modulation
varies: the plain rows (no variant, the plotted ones) take a per-sample ``scale`` /
``shift`` ``(B, N)`` broadcast over the tokens (DiT / PixArt / SD3 / Flux); ``token``
takes per-token ``(B, S, N)`` modulation. Providers:

- ``torch``: what diffusers' AdaLN blocks run in eager mode, in the input dtype:
  ``x * (1 + scale[:, None]) + shift[:, None]`` (two kernels, one rounding each);
- ``torch.compile``: that same function under ``torch.compile(dynamic=False)``;
- ``fastgen-triton``: ``fastgen.ops.scale_shift(backend="triton")`` (one pass, fp32 math).

Modes: ``fwd``, ``bwd`` (the backward of one recorded forward), ``fwd+bwd``.
"""

from __future__ import annotations

import torch

from fastgen.backend import interpreter_enabled
from fastgen.ops import scale_shift

from .harness import Case, Unavailable, autograd_step, by_mode, fastgen_backend

OP = "scale_shift"
PROVIDERS = ("torch", "torch.compile", "fastgen-triton")
GPU_ONLY = ("fastgen-triton",)
MODES = ("fwd", "bwd", "fwd+bwd")
PLOT_X = "N"


def cases(device: str, quick: bool) -> list[Case]:
    """Batch B x tokens S x hidden N; bf16 first (the plotted dtype)."""
    bf16 = torch.bfloat16
    if device != "cuda":
        small = {"B": 2, "S": 256, "N": 1152}
        return [Case(small, bf16)] if quick else [Case(small, bf16), Case(small, bf16, "token")]
    # DiT-XL/2 at 256^2 (256 tokens x 1152), PixArt at 1024^2 (4096 x 1152), Flux at 1024^2 (4096 x 3072).
    shapes = [{"B": 32, "S": 256, "N": 1152}, {"B": 4, "S": 4096, "N": 1152}, {"B": 2, "S": 4096, "N": 3072}]
    if quick:
        return [Case(shapes[1], bf16)]
    out = [Case(s, bf16) for s in shapes] + [Case(s, bf16, "token") for s in shapes]
    return out + [Case(shapes[1], dt) for dt in (torch.float16, torch.float32)]


def bytes_moved(case: Case, mode: str) -> int:
    """fwd: read x, write y (2 BSN) plus the modulation (2 BN, or 2 BSN per token);
    bwd: read dy, x and scale, write dx (4 BSN; per token also dscale: + 1 BSN, dshift is dy)."""
    B, S, N = case.shape["B"], case.shape["S"], case.shape["N"]
    e = torch.empty((), dtype=case.dtype).element_size()
    bsn, mod = B * S * N * e, (B * S * N if case.variant == "token" else B * N) * e
    return by_mode(mode, 2 * bsn + 2 * mod, 3 * bsn + mod + (bsn if case.variant == "token" else 0))


def _eager(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    if scale.dim() == 2:
        scale, shift = scale[:, None], shift[:, None]
    return x * (1 + scale) + shift


def _impl(provider: str, device: str):
    if provider == "torch":
        return _eager
    if provider == "torch.compile":
        torch._dynamo.reset()
        return torch.compile(_eager, dynamic=False)
    if provider == "fastgen-triton":
        if device == "cuda" and interpreter_enabled():
            raise Unavailable("TRITON_INTERPRET=1 is set: interpreter timings mean nothing; unset it")
        backend = fastgen_backend(provider, device)
        return lambda x, scale, shift: scale_shift(x, scale, shift, backend=backend)
    raise ValueError(f"unknown provider {provider!r}; expected one of {PROVIDERS}")


def setup(provider: str, case: Case, mode: str, device: str):
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
    f = _impl(provider, device)
    B, S, N = case.shape["B"], case.shape["S"], case.shape["N"]
    gen = torch.Generator(device=device).manual_seed(0)
    need = mode != "fwd"
    mod_shape = (B, S, N) if case.variant == "token" else (B, N)
    x = torch.randn(B, S, N, device=device, dtype=case.dtype, generator=gen).requires_grad_(need)
    scale = (0.1 * torch.randn(mod_shape, device=device, dtype=case.dtype, generator=gen)).requires_grad_(need)
    shift = torch.randn(mod_shape, device=device, dtype=case.dtype, generator=gen).requires_grad_(need)
    grads = [torch.randn(B, S, N, device=device, dtype=case.dtype, generator=gen)] if need else []
    return autograd_step(f, (x, scale, shift), mode, grads, [x, scale, shift])
