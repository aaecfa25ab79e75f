"""Attention benchmark suite: ``softmax(q k^T / sqrt(D)) v``, forward and backward.

Run it with ``fastgen bench --ops attention``. Providers (inputs in SDPA's (B, H, S, D)
layout, except flash-attn which takes its native (B, S, H, D)):

- ``torch``: ``F.scaled_dot_product_attention`` with PyTorch's default backend choice
  (what a model calls today; the baseline of the "x eager" column);
- ``torch.compile``: the same call under ``torch.compile(dynamic=False)``;
- ``sdpa-flash`` / ``sdpa-efficient`` / ``sdpa-cudnn`` / ``sdpa-math``: SDPA pinned to one
  backend with ``torch.nn.attention.sdpa_kernel``; a backend that refuses the case
  (head dim, dtype, device) is a row that says so;
- ``fastgen-triton``: ``fastgen.ops.attention(layout="bhsd", backend="triton")``;
- ``flash-attn``: ``flash_attn_func`` when the package imports.

Cases are the issue's diffusion and token-model shapes (variant ``causal`` for the causal
ones, always with Sq == Sk: SDPA's ``is_causal`` is top-left aligned when lengths differ,
fastgen's bottom-right). GQA cases (HK < H) use SDPA's ``enable_gqa``.

FLOPs (``flops``): forward ``4 * B * H * Sq * Sk * D`` (two matmuls), halved for causal;
backward 2.5x the forward (five matmuls, the FlashAttention convention, recomputation not
counted); fwd+bwd 3.5x. The harness reports TFLOP/s from it. ``bytes_moved`` counts q, k,
v, o (and lse) once, plus dO, dq, dk, dv for the backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastgen.backend import interpreter_enabled, unavailable_reason
from fastgen.ops import attention

from .harness import Case, Unavailable, autograd_step, peer

OP = "attention"
PROVIDERS = ("torch", "torch.compile", "sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "sdpa-math",
             "fastgen-triton", "flash-attn")
GPU_ONLY = ("sdpa-efficient", "sdpa-cudnn", "fastgen-triton", "flash-attn")
MODES = ("fwd", "bwd", "fwd+bwd")
PLOT_X = "Sq"

_SDPA_BACKENDS = {"sdpa-flash": "FLASH_ATTENTION", "sdpa-efficient": "EFFICIENT_ATTENTION",
                  "sdpa-cudnn": "CUDNN_ATTENTION", "sdpa-math": "MATH"}


def _case(B, H, Sq, Sk, D, HK=None, causal=False, dtype=torch.bfloat16) -> Case:
    return Case({"B": B, "H": H, "HK": HK or H, "Sq": Sq, "Sk": Sk, "D": D}, dtype, "causal" if causal else "")


def cases(device: str, quick: bool) -> list[Case]:
    """Shapes to measure, bf16 first (the plotted dtype)."""
    if device != "cuda":  # small enough that the CPU run takes seconds
        if quick:
            return [_case(1, 2, 128, 128, 64)]
        return [_case(1, 2, 128, 128, 64), _case(1, 2, 128, 77, 40), _case(1, 4, 128, 128, 64, HK=2, causal=True)]
    if quick:
        return [_case(1, 24, 4608, 4608, 128), _case(8, 16, 1024, 1024, 72), _case(2, 16, 4096, 4096, 128, causal=True)]
    out = [
        _case(1, 24, 4096, 4096, 128),  # SD3
        _case(1, 24, 4608, 4608, 128),  # Flux
        _case(1, 48, 17550, 17550, 64),  # long video
        _case(8, 16, 1024, 1024, 72),  # DiT-XL / PixArt
        _case(2, 8, 4096, 4096, 40),  # SD 1.5, 64x64 latents
        _case(2, 8, 1024, 1024, 80),
        _case(2, 8, 256, 256, 160),
        _case(2, 8, 4096, 77, 40),  # SD 1.5 cross-attention to the text
        _case(1, 24, 4096, 300, 128),  # cross-attention to 300 text tokens
    ]
    for S in (1024, 4096, 8192):
        out.append(_case(max(1, 8192 // S), 32, S, S, 64, causal=True))
        out.append(_case(max(1, 8192 // S), 16, S, S, 128, causal=True))
    out.append(_case(2, 32, 4096, 4096, 128, HK=8, causal=True))  # GQA
    out.append(_case(1, 24, 4608, 4608, 128, dtype=torch.float16))
    return out


def attention_flops(B: int, H: int, Sq: int, Sk: int, D: int, causal: bool, mode: str) -> int:
    """FLOPs of one step: fwd 4*B*H*Sq*Sk*D (halved for causal), bwd 2.5x fwd, fwd+bwd 3.5x fwd."""
    fwd = 4 * B * H * Sq * Sk * D // (2 if causal else 1)
    return {"fwd": fwd, "bwd": int(2.5 * fwd), "fwd+bwd": int(3.5 * fwd)}[mode]


def flops(case: Case, mode: str) -> int:
    s = case.shape
    return attention_flops(s["B"], s["H"], s["Sq"], s["Sk"], s["D"], case.variant == "causal", mode)


def bytes_moved(case: Case, mode: str) -> int:
    """fwd: read q, k, v, write o and the fp32 lse; bwd: read q, k, v, o, dO, lse, write dq, dk, dv."""
    s = case.shape
    e = torch.empty((), dtype=case.dtype).element_size()
    q = s["B"] * s["H"] * s["Sq"] * s["D"] * e
    kv = 2 * s["B"] * s["HK"] * s["Sk"] * s["D"] * e
    lse = s["B"] * s["H"] * s["Sq"] * 4
    fwd = 2 * q + kv + lse
    bwd = 4 * q + 2 * kv + lse
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


def _sdpa(gqa: bool, causal: bool):
    kw = dict(is_causal=causal, enable_gqa=True) if gqa else dict(is_causal=causal)
    return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, **kw)


def _impl(provider: str, case: Case, device: str):
    """(f(q, k, v) -> o, layout) that ``provider`` runs."""
    s = case.shape
    causal, gqa = case.variant == "causal", s["HK"] != s["H"]
    if provider == "torch":
        return _sdpa(gqa, causal), "bhsd"
    if provider == "torch.compile":
        torch._dynamo.reset()  # one compiled graph per case, no recompile limit
        return torch.compile(_sdpa(gqa, causal), dynamic=False), "bhsd"
    if provider in _SDPA_BACKENDS:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = getattr(SDPBackend, _SDPA_BACKENDS[provider])
        if device != "cuda" and provider in GPU_ONLY:
            raise Unavailable(f"needs a CUDA GPU (SDPA's {_SDPA_BACKENDS[provider]} backend)")
        f = _sdpa(gqa, causal)

        def pinned(q, k, v):
            with sdpa_kernel(backend):
                return f(q, k, v)
        return pinned, "bhsd"
    if provider == "fastgen-triton":
        if device != "cuda":
            raise Unavailable("needs a CUDA GPU (the Triton kernels are not timed on CPU)")
        if interpreter_enabled():
            raise Unavailable("TRITON_INTERPRET=1 is set: Triton would run in its CPU interpreter, "
                              "whose timings mean nothing; unset it to benchmark")
        reason = unavailable_reason("triton", torch.device(device))
        if reason is not None:
            raise Unavailable(reason)
        return (lambda q, k, v: attention(q, k, v, causal=causal, layout="bhsd", backend="triton")), "bhsd"
    if provider == "flash-attn":
        flash_attn_func = peer("flash_attn", "flash_attn_func", device=device, package="flash-attn", kind="CUDA-only")
        return (lambda q, k, v: flash_attn_func(q, k, v, causal=causal)), "bshd"
    raise ValueError(f"unknown provider {provider!r}; expected one of {PROVIDERS}")


def setup(provider: str, case: Case, mode: str, device: str):
    """Inputs for ``case`` and the function one measured step calls (speed and memory runs)."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
    f, layout = _impl(provider, case, device)
    s = case.shape
    grad = mode != "fwd"
    gen = torch.Generator(device=device).manual_seed(0)

    def make(h, S):
        shape = (s["B"], h, S, s["D"]) if layout == "bhsd" else (s["B"], S, h, s["D"])
        return torch.randn(shape, device=device, dtype=case.dtype, generator=gen).requires_grad_(grad)

    q, k, v = make(s["H"], s["Sq"]), make(s["HK"], s["Sk"]), make(s["HK"], s["Sk"])
    if provider in _SDPA_BACKENDS or provider == "flash-attn":
        try:  # a pinned backend that cannot take this case raises here: a row that says so
            with torch.no_grad():
                f(q, k, v)
        except RuntimeError as exc:
            raise Unavailable(f"{provider} cannot run this case: {str(exc).splitlines()[0][:160]}") from None
    do = torch.randn(q.shape, device=device, dtype=case.dtype, generator=gen)
    return autograd_step(f, (q, k, v), mode, [do], [q, k, v])
