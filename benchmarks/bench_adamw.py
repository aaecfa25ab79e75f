"""AdamW step benchmark: fastgen.optim.FusedAdamW against torch.optim.AdamW (foreach and fused).

One ``step`` over 1B parameters in 200 tensors of mixed sizes (GPU). Bytes per
parameter, each tensor read once and written once: fp32 parameters with fp32 states
move 28 (read p, g, m, v; write p, m, v); bf16 parameters with fp32 states move 22.
The ``host ms`` column is the CPU time of issuing one step.

Mode ``clip+step+ema``: a whole training-step tail, gradient clipping to norm 1 then the
step then an fp32 EMA. fastgen runs it as the one-pass step (``FusedAdamW(...,
max_grad_norm=1.0, ema=ema)``: one norm read of the gradients, then one pass); torch as
``clip_grad_norm_`` + ``AdamW`` + ``torch._foreach_lerp_`` of the shadow. Its bytes are those
of the one pass, for every provider (``P`` parameter = gradient bytes, states and shadow fp32)::

    one pass:        P (norm) + 3P + 16 (update: p, g, m, v read; p, m, v written) + 8 (shadow)  = 4P + 24
    separate calls:  P (norm) + 2P (scale) + 3P + 16 (update) + P + 8 (EMA reads p)           = 7P + 24

i.e. 32 against 38 bytes for bf16 parameters, 40 against 52 for fp32.
"""

from __future__ import annotations

import torch

from fastgen.optim import EMA, FusedAdamW

from ._optim_params import cases as _cases
from ._optim_params import make_params
from .harness import Case, Unavailable, fastgen_backend

OP = "adamw"
PROVIDERS = ("torch", "torch-fused", "fastgen-triton", "fastgen-cuda")
GPU_ONLY = ("torch-fused", "fastgen-triton", "fastgen-cuda")
MODES = ("step", "clip+step+ema")
PLOT_X = "params"


def cases(device: str, quick: bool) -> list[Case]:
    return _cases(device, quick, ((torch.float32, ""), (torch.bfloat16, "stochastic")))


def bytes_per_param(mode: str, param_bytes: int, one_pass: bool = True) -> int:
    """Bytes per parameter element of ``mode`` (fp32 states and EMA shadow); ``one_pass=False``
    counts the separate calls (clip scales the gradients in place, the EMA reads the parameter)."""
    e = param_bytes
    step = 2 * e + e + 2 * 4 + 2 * 4  # p read+write, g read, m and v (fp32) read+write
    if mode == "step":
        return step
    if mode != "clip+step+ema":
        raise ValueError(f"unknown mode {mode!r}")
    return e + step + 2 * 4 if one_pass else e + 2 * e + step + e + 2 * 4


def bytes_moved(case: Case, mode: str) -> int:
    return case.shape["params"] * bytes_per_param(mode, case.dtype.itemsize)


def setup(provider: str, case: Case, mode: str, device: str):
    sr = case.variant == "stochastic"
    if provider in GPU_ONLY and device != "cuda":
        raise Unavailable("needs a CUDA GPU")
    backend = fastgen_backend(provider, device) if provider.startswith("fastgen") else None
    params = make_params(case, device)
    tail = mode == "clip+step+ema"
    if provider in ("torch", "torch-fused"):
        if sr:
            raise Unavailable("torch.optim.AdamW has no stochastic rounding (its bf16 states are bf16)")
        opt = torch.optim.AdamW(params, lr=1e-3, fused=provider == "torch-fused" or None)
        if not tail:
            return opt.step
        shadows = [p.detach().float() for p in params]

        def fn():
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            torch._foreach_lerp_(shadows, [p.detach().float() for p in params] if params[0].dtype != torch.float32
                                 else [p.detach() for p in params], 1e-3)

        return fn
    ema = EMA(params, decay=0.999, warmup=False, backend=backend) if tail else None
    opt = FusedAdamW(params, lr=1e-3, backend=backend, stochastic_rounding=sr,
                     max_grad_norm=1.0 if tail else None, ema=ema)
    return opt.step
