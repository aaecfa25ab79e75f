"""RoPE benchmark suite: ``apply_rope`` on q and k, and the fused ``qk_norm_rope``.

Run it with ``fastgen bench --ops rope`` (see ``harness.py`` for the suite contract).
Variants of a case (q and k of shape ``(B, S, H, D)``, layout "bshd", full rotary):

- ``""``: ``apply_rope(interleaved=True)`` with Flux's tables (the issue's target case:
  (1, 4608, 24, 128) bf16, >= 2.8 TB/s forward on an H100);
- ``"halves"``: ``apply_rope(interleaved=False)`` (GPT-NeoX / Llama pairs);
- ``"qk_norm"``: ``qk_norm_rope`` (per-head RMSNorm, then interleaved RoPE; target
  >= 2x torch.compile of the unfused reference).

Providers:

- ``torch``: the references ``apply_rope_ref`` / ``qk_norm_rope_ref`` in eager mode
  (``qk_norm_rope_ref`` is the unfused ``F.rms_norm`` then the rotation);
- ``torch.compile``: the same references under ``torch.compile(dynamic=False)``;
- ``fastgen-triton`` / ``fastgen-cuda``: the ops with ``backend=...`` (``qk_norm_rope``
  has no CUDA C++ kernel yet: that row says so);
- ``liger-kernel``: ``LigerRopeFunction``, which rotates GPT-NeoX halves of q / k in
  (B, H, S, D) with a full-width (1, S, D) table: it serves the ``"halves"`` variant (fed
  (B, H, S, D) transposed views, as its users do); the interleaved and fused rows say why not.
"""

from __future__ import annotations

import torch

from fastgen.backend import interpreter_enabled
from fastgen.ops import apply_rope, apply_rope_ref, qk_norm_rope, qk_norm_rope_ref

from .harness import Case, Unavailable, autograd_step, by_mode, fastgen_backend, peer

OP = "rope"
PROVIDERS = ("torch", "torch.compile", "fastgen-triton", "fastgen-cuda", "liger-kernel")
GPU_ONLY = ("fastgen-triton", "fastgen-cuda", "liger-kernel")
MODES = ("fwd", "bwd", "fwd+bwd")
PLOT_X = "S"
EPS = 1e-6


def cases(device: str, quick: bool) -> list[Case]:
    """q and k of (B, S, H, D), bf16 first (the plotted dtype)."""
    bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
    if device != "cuda":
        small = {"B": 1, "S": 256, "H": 4, "D": 64}
        if quick:
            return [Case(small, bf16)]
        return [Case(small, bf16), Case(small, bf16, "halves"), Case(small, bf16, "qk_norm"), Case(small, fp32)]
    flux = {"B": 1, "S": 4608, "H": 24, "D": 128}
    if quick:
        return [Case(flux, bf16), Case(flux, bf16, "qk_norm")]
    out = [Case({"B": 1, "S": s, "H": 24, "D": 128}, bf16) for s in (1024, 4608, 16384)]
    out += [Case({"B": 1, "S": s, "H": 24, "D": 128}, bf16, "qk_norm") for s in (1024, 4608, 16384)]
    out += [Case({"B": 4, "S": 4096, "H": 32, "D": 128}, bf16, "halves"),
            Case({"B": 1, "S": 17550, "H": 48, "D": 64}, bf16),  # CogVideoX-like video tokens
            Case(flux, fp16), Case(flux, fp32), Case(flux, fp16, "qk_norm")]
    return out


def rope_bytes(B: int, S: int, H: int, D: int, dtype: torch.dtype, mode: str, fused_norm: bool = False) -> int:
    """Bytes a perfect kernel moves, each tensor read once and written once.

    e = element size; tables are fp32 (S, D) cos and sin; q and k have H heads each.

    - fwd: read q, k and write q_out, k_out (4 * B*S*H*D*e), read cos, sin (2 * S*D*4);
      qk_norm adds the two weights (2 * D*e).
    - bwd: read dq_out, dk_out and write dq, dk (4 * B*S*H*D*e), read the tables;
      qk_norm also reads q, k (2 * B*S*H*D*e: rstd is recomputed) and the weights, and
      writes the two weight gradients (4 * D*e).
    - fwd+bwd: fwd + bwd.
    """
    e = torch.empty((), dtype=dtype).element_size()
    x = B * S * H * D * e
    tables = 2 * S * D * 4
    fwd = 4 * x + tables + (2 * D * e if fused_norm else 0)
    bwd = 4 * x + tables + ((2 * x + 6 * D * e) if fused_norm else 0)
    return by_mode(mode, fwd, bwd)


def bytes_moved(case: Case, mode: str) -> int:
    s = case.shape
    return rope_bytes(s["B"], s["S"], s["H"], s["D"], case.dtype, mode, fused_norm=case.variant == "qk_norm")


def liger_adapter(rope_function):
    """``f(q, k, wq, wk, cos, sin)`` over Liger-Kernel's ``LigerRopeFunction``, which takes
    (B, H, S, D) q / k and (1, S, D) full-width tables: our (B, S, H, D) tensors as views.
    It rotates q and k in place (and returns them); repeated timed calls keep rotating the
    same buffers, which changes nothing about the work done."""
    def liger(q, k, wq, wk, cos, sin):
        qo, ko = rope_function.apply(q.transpose(1, 2), k.transpose(1, 2), cos[None], sin[None])
        return qo.transpose(1, 2), ko.transpose(1, 2)
    return liger


def _impl(provider: str, variant: str, device: str):
    """``f(q, k, wq, wk, cos, sin) -> (q_out, k_out)`` for ``provider``."""
    inter = variant != "halves"
    if provider in ("fastgen-triton", "liger-kernel") and device == "cuda" and interpreter_enabled():
        raise Unavailable("TRITON_INTERPRET=1 is set: Triton would run in its CPU interpreter, "
                          "whose timings mean nothing; unset it to benchmark")
    if provider in ("torch", "torch.compile"):
        if variant == "qk_norm":
            def ref(q, k, wq, wk, cos, sin):
                return qk_norm_rope_ref(q, k, wq, wk, cos, sin, EPS, "bshd", True)
        else:
            def ref(q, k, wq, wk, cos, sin):
                return apply_rope_ref(q, k, cos, sin, "bshd", inter)
        if provider == "torch":
            return ref
        torch._dynamo.reset()  # one compiled graph per case
        return torch.compile(ref, dynamic=False)
    if provider in ("fastgen-triton", "fastgen-cuda"):
        backend = fastgen_backend(provider, device)
        if variant == "qk_norm":
            return lambda q, k, wq, wk, cos, sin: qk_norm_rope(q, k, wq, wk, cos, sin, EPS, "bshd", True,
                                                               backend=backend)
        return lambda q, k, wq, wk, cos, sin: apply_rope(q, k, cos, sin, "bshd", inter, backend=backend)
    if provider == "liger-kernel":
        fn = peer("liger_kernel.ops.rope", "LigerRopeFunction", device=device)
        if variant != "halves":
            raise Unavailable("LigerRopeFunction only rotates GPT-NeoX halves with a full-width table; it has no "
                              "interleaved (Flux) pairs" + (" and no fused QK-RMSNorm" if variant == "qk_norm" else ""))
        return liger_adapter(fn)
    raise ValueError(f"unknown provider {provider!r}; expected one of {PROVIDERS}")


def setup(provider: str, case: Case, mode: str, device: str):
    """Inputs for ``case`` and the function one measured step calls (speed and memory runs)."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
    f = _impl(provider, case.variant, device)
    B, S, H, D = (case.shape[n] for n in ("B", "S", "H", "D"))
    grad = mode != "fwd"
    gen = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(B, S, H, D, device=device, dtype=case.dtype, generator=gen).requires_grad_(grad)
    k = torch.randn(B, S, H, D, device=device, dtype=case.dtype, generator=gen).requires_grad_(grad)
    fused = case.variant == "qk_norm"
    wq = (1 + 0.1 * torch.randn(D, device=device, generator=gen)).to(case.dtype).requires_grad_(grad and fused)
    wk = (1 + 0.1 * torch.randn(D, device=device, generator=gen)).to(case.dtype).requires_grad_(grad and fused)
    ang = torch.rand(S, D // 2, device=device, generator=gen) * 6.28
    ang = torch.cat([ang, ang], -1) if case.variant == "halves" else ang.repeat_interleave(2, -1)
    cos, sin = ang.cos(), ang.sin()
    leaves = [q, k] + ([wq, wk] if fused else [])

    grads = [torch.randn(B, S, H, D, device=device, dtype=case.dtype, generator=gen) for _ in range(2)] if grad else []
    return autograd_step(f, (q, k, wq, wk, cos, sin), mode, grads, leaves)
