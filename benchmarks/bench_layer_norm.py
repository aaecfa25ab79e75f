"""LayerNorm / AdaLN modulation benchmark suite (``fastgen bench --ops layer_norm``).

Variants (``Case.variant``), all on ``x (B, S, N)``:

- ``""``: ``layer_norm(x, weight, bias)``;
- ``"modulate"``: ``layer_norm_modulate(x, shift, scale)`` with per-sample shift / scale
  taken as chunks of one ``(B, 6N)`` projection (how DiTs produce them); the issue's
  target is >= 2.8 TB/s forward at (2, 4096, 3072) bf16 on an H100;
- ``"gated"``: ``gated_residual_layer_norm_modulate(x, y, gate, shift, scale)`` returning
  ``(h, x_new)`` (the fused pair between two DiT sublayers).

Providers: ``torch`` (the fp32 references of ``fastgen.ops`` in eager mode),
``torch.compile`` (the same references compiled), ``fastgen-triton``, and
``liger-kernel`` (``LigerLayerNormFunction``, plain LayerNorm only: it has no
modulation or gated form). There is no CUDA C++ version of this family.
Modes: ``fwd`` (inference), ``bwd`` (backward of one recorded forward), ``fwd+bwd``.
"""

from __future__ import annotations

import torch

from fastgen.backend import interpreter_enabled
from fastgen.ops import (
    gated_residual_layer_norm_modulate,
    gated_residual_layer_norm_modulate_ref,
    layer_norm,
    layer_norm_modulate,
    layer_norm_modulate_ref,
    layer_norm_ref,
)

from .harness import Case, Unavailable, autograd_step, by_mode, fastgen_backend, peer

OP = "layer_norm"
PROVIDERS = ("torch", "torch.compile", "fastgen-triton", "liger-kernel")
GPU_ONLY = ("fastgen-triton", "liger-kernel")
MODES = ("fwd", "bwd", "fwd+bwd")
PLOT_X = "N"
EPS = 1e-6


def cases(device: str, quick: bool) -> list[Case]:
    """(B, S, N) shapes, bf16 first (the plotted dtype)."""
    bf16, fp32 = torch.bfloat16, torch.float32
    if device != "cuda":
        if quick:
            return [Case({"B": 2, "S": 128, "N": 1024}, bf16, "modulate")]
        return [Case({"B": 2, "S": 128, "N": 1024}, bf16, v) for v in ("", "modulate", "gated")]
    if quick:
        return [Case({"B": 2, "S": 4096, "N": 3072}, bf16, v) for v in ("", "modulate", "gated")]
    out = [Case({"B": 2, "S": 4096, "N": n}, bf16, v) for v in ("", "modulate", "gated")
           for n in (1152, 1536, 3072, 4096, 5120)]
    out += [Case({"B": 2, "S": 4096, "N": 3072}, fp32, v) for v in ("", "modulate", "gated")]
    return out


def layer_norm_bytes(B: int, S: int, N: int, dtype: torch.dtype, mode: str, variant: str = "") -> int:
    """Bytes a perfect kernel moves, each tensor read once and written once (e = element size).

    - ``""``: fwd reads x, writes y (2*M*N*e) and reads w, b (2*N*e); bwd reads dy, x and
      mean / rstd (2*M*N*e + 8*M), w, b, writes dx and dw, db (M*N*e + 4*N*e).
    - ``"modulate"``: fwd reads x, shift, scale (per sample: 2*B*N*e), writes out;
      bwd reads dout, x, scale, mean / rstd, writes dx, dshift, dscale.
    - ``"gated"``: fwd reads x, y, gate, shift, scale, writes h and x_new (4*M*N*e + 3*B*N*e);
      bwd reads dh, dx_new, x_new, y, gate, scale, mean / rstd and writes dx, dy, dgate,
      dshift, dscale (6*M*N*e + 6*B*N*e + 8*M).
    """
    e = torch.empty((), dtype=dtype).element_size()
    M = B * S
    mn, bn = M * N * e, B * N * e
    if variant == "":
        fwd, bwd = 2 * mn + 2 * N * e, 3 * mn + 8 * M + 4 * N * e
    elif variant == "modulate":
        fwd, bwd = 2 * mn + 2 * bn, 3 * mn + 8 * M + 3 * bn
    elif variant == "gated":
        fwd, bwd = 4 * mn + 3 * bn, 6 * mn + 8 * M + 6 * bn
    else:
        raise ValueError(f"unknown variant {variant!r}")
    return by_mode(mode, fwd, bwd)


def bytes_moved(case: Case, mode: str) -> int:
    s = case.shape
    return layer_norm_bytes(s["B"], s["S"], s["N"], case.dtype, mode, case.variant)


_REFS = {"": layer_norm_ref, "modulate": layer_norm_modulate_ref, "gated": gated_residual_layer_norm_modulate_ref}
_OPS = {"": layer_norm, "modulate": layer_norm_modulate, "gated": gated_residual_layer_norm_modulate}


def _impl(provider: str, variant: str, device: str):
    """The function ``f(*inputs)`` that ``provider`` runs for ``variant``."""
    if provider in ("fastgen-triton", "liger-kernel") and device == "cuda" and interpreter_enabled():
        raise Unavailable("TRITON_INTERPRET=1 is set: Triton would run in its CPU interpreter, "
                          "whose timings mean nothing; unset it to benchmark")
    if provider == "torch":
        return _REFS[variant]
    if provider == "torch.compile":
        torch._dynamo.reset()
        return torch.compile(_REFS[variant], dynamic=False)
    if provider == "fastgen-triton":
        fastgen_backend(provider, device)
        op = _OPS[variant]
        return lambda *a: op(*a, backend="triton")
    if provider == "liger-kernel":
        LigerLayerNormFunction = peer("liger_kernel.ops.layer_norm", "LigerLayerNormFunction", device=device)
        if variant:
            raise Unavailable("liger-kernel has no fused AdaLN modulation / gated residual form")
        return lambda x, w, b: LigerLayerNormFunction.apply(x, w, b, 1e-5)
    raise ValueError(f"unknown provider {provider!r}; expected one of {PROVIDERS}")


def setup(provider: str, case: Case, mode: str, device: str):
    """Inputs for ``case`` and the function one measured step calls (speed and memory runs)."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
    f = _impl(provider, case.variant, device)
    B, S, N = case.shape["B"], case.shape["S"], case.shape["N"]
    grad = mode != "fwd"
    gen = torch.Generator(device=device).manual_seed(0)

    def rnd(*shape, s=1.0):
        return (s * torch.randn(*shape, device=device, generator=gen)).to(case.dtype)

    x = rnd(B, S, N).requires_grad_(grad)
    if case.variant == "":
        w, b = (1 + rnd(N, s=0.1)).requires_grad_(grad), rnd(N, s=0.1).requires_grad_(grad)
        inputs, leaves = (x, w, b), [x, w, b]
    else:
        emb = rnd(B, 6 * N, s=0.5).requires_grad_(grad)
        shift, scale, gate = emb.chunk(6, dim=1)[:3]
        if case.variant == "modulate":
            inputs, leaves = (x, shift, scale), [x, emb]
        else:
            y = rnd(B, S, N).requires_grad_(grad)
            inputs, leaves = (x, y, gate, shift, scale), [x, y, emb]

    grads = [rnd(B, S, N) for _ in range(2 if case.variant == "gated" else 1)] if grad else []
    return autograd_step(f, inputs, mode, grads, leaves)
