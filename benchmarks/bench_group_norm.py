"""GroupNorm + SiLU benchmark suite: ``y = silu(group_norm(x, G, w, b))`` on ``(N, C, H, W)``.

Run it with ``fastgen bench --ops group_norm`` (see ``harness.py`` for the suite
contract). The measured op is the ``norm -> SiLU`` pair of UNet / VAE ResNet blocks.
Providers:

- ``torch``: ``F.group_norm`` + ``F.silu`` in eager mode, in the input dtype (what a
  diffusers ResNet block runs);
- ``torch.compile``: the same two calls under ``torch.compile(dynamic=False)``;
- ``fastgen-triton`` / ``fastgen-cuda``: ``fastgen.ops.group_norm(..., activation="silu",
  backend=...)`` (one fused pass; fp32 math, one rounding);
- ``liger-kernel``: ``LigerGroupNormFunction`` (its GroupNorm has no fused SiLU, so
  ``F.silu`` follows it; it takes contiguous inputs, so a channels-last input is copied).

Variants: ``""`` is a contiguous (NCHW) input, ``"channels_last"`` an NHWC one.

Modes: ``fwd`` is an inference forward (inputs do not require grad); ``bwd`` times
only the backward of one recorded forward (``retain_graph=True``, grads reset to
None outside the timed region); ``fwd+bwd`` times both.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastgen.backend import interpreter_enabled
from fastgen.ops import group_norm

from .harness import Case, Unavailable, autograd_step, by_mode, fastgen_backend, peer

OP = "group_norm"
PROVIDERS = ("torch", "torch.compile", "fastgen-triton", "fastgen-cuda", "liger-kernel")
GPU_ONLY = ("fastgen-triton", "fastgen-cuda", "liger-kernel")
MODES = ("fwd", "bwd", "fwd+bwd")
PLOT_X = "H"
EPS = 1e-6


def _case(n, c, h, w, g, dtype=torch.bfloat16, variant=""):
    return Case({"N": n, "C": c, "H": h, "W": w, "G": g}, dtype, variant)


def cases(device: str, quick: bool) -> list[Case]:
    """Shapes to measure: UNet / VAE activations, bf16 first (the plotted dtype)."""
    if device != "cuda":  # small enough that the CPU run takes seconds
        if quick:
            return [_case(2, 64, 32, 32, 32)]
        return [_case(2, 64, 32, 32, 32), _case(2, 128, 64, 64, 32), _case(2, 64, 32, 32, 32, torch.float32),
                _case(2, 64, 32, 32, 32, variant="channels_last")]
    if quick:
        return [_case(8, 512, 128, 128, 32), _case(1, 128, 1024, 1024, 32),
                _case(8, 512, 128, 128, 32, variant="channels_last")]
    return [
        _case(8, 512, 64, 64, 32),  # SD UNet mid block at 512 px
        _case(8, 512, 128, 128, 32),  # the first target
        _case(2, 256, 256, 256, 32),  # VAE decoder, 1024 px
        _case(1, 128, 1024, 1024, 32),  # VAE decoder last blocks at 1024 px: 4M elements per group
        _case(1, 128, 2048, 2048, 32),  # ... at 2048 px: 16M elements per group
        _case(8, 320, 64, 64, 32, torch.float16),
        _case(8, 512, 128, 128, 32, torch.float32),
        _case(8, 512, 128, 128, 32, variant="channels_last"),
        _case(1, 128, 1024, 1024, 32, variant="channels_last"),
    ]


def group_norm_bytes(N: int, C: int, S: int, G: int, dtype: torch.dtype, mode: str,
                     weight_dtype: torch.dtype | None = None) -> int:
    """Bytes a perfect kernel moves, each tensor read once and written once.

    e = element size of x, ew = of weight and bias (default: x's), S = H * W.

    - fwd: read x (N*C*S*e), write y (N*C*S*e), read w and b (2*C*ew).
    - bwd: read dy and x (2*N*C*S*e), w and b (2*C*ew), mean and rstd (2*N*G*4 fp32);
      write dx (N*C*S*e), dw and db (2*C*ew).
    - fwd+bwd: fwd + bwd.
    """
    e = torch.empty((), dtype=dtype).element_size()
    ew = torch.empty((), dtype=weight_dtype or dtype).element_size()
    ncs = N * C * S * e
    fwd = 2 * ncs + 2 * C * ew
    bwd = 3 * ncs + 4 * C * ew + 2 * N * G * 4
    return by_mode(mode, fwd, bwd)


def bytes_moved(case: Case, mode: str) -> int:
    s = case.shape
    return group_norm_bytes(s["N"], s["C"], s["H"] * s["W"], s["G"], case.dtype, mode)


def _eager(x, w, b, G):
    return F.silu(F.group_norm(x, G, w, b, EPS))


def _impl(provider: str, device: str):
    """The function ``f(x, w, b, G) -> y`` that ``provider`` runs."""
    if provider in ("fastgen-triton", "liger-kernel") and device == "cuda" and interpreter_enabled():
        raise Unavailable("TRITON_INTERPRET=1 is set: Triton would run in its CPU interpreter, "
                          "whose timings mean nothing; unset it to benchmark")
    if provider == "torch":
        return _eager
    if provider == "torch.compile":
        torch._dynamo.reset()  # a fresh cache per case: one compiled graph per shape
        return torch.compile(_eager, dynamic=False)
    if provider in ("fastgen-triton", "fastgen-cuda"):
        backend = fastgen_backend(provider, device)
        return lambda x, w, b, G: group_norm(x, G, w, b, EPS, "silu", backend=backend)
    if provider == "liger-kernel":
        LigerGroupNormFunction = peer("liger_kernel.ops.group_norm", "LigerGroupNormFunction", device=device)
        # apply(X, weight, bias, num_channels, num_groups, eps); no fused SiLU.
        return lambda x, w, b, G: F.silu(LigerGroupNormFunction.apply(x, w, b, x.shape[1], G, EPS))
    raise ValueError(f"unknown provider {provider!r}; expected one of {PROVIDERS}")


def setup(provider: str, case: Case, mode: str, device: str):
    """Inputs for ``case`` and the function one measured step calls (speed and memory runs)."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
    f = _impl(provider, device)
    s = case.shape
    N, C, H, W, G = s["N"], s["C"], s["H"], s["W"], s["G"]
    grad = mode != "fwd"
    fmt = torch.channels_last if case.variant == "channels_last" else torch.contiguous_format
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(N, C, H, W, device=device, dtype=case.dtype, generator=gen)
    x = x.contiguous(memory_format=fmt).requires_grad_(grad)
    w = (1 + 0.1 * torch.randn(C, device=device, generator=gen)).to(case.dtype).requires_grad_(grad)
    b = (0.1 * torch.randn(C, device=device, generator=gen)).to(case.dtype).requires_grad_(grad)
    dy = [torch.randn(N, C, H, W, device=device, dtype=case.dtype, generator=gen).contiguous(memory_format=fmt)]
    return autograd_step(lambda: f(x, w, b, G), (), mode, dy if grad else [], [x, w, b])
