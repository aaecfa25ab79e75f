"""AdamW step benchmark: fastgen.optim.FusedAdamW against torch.optim.AdamW (foreach and fused).

One ``step`` over 1B parameters in 200 tensors of mixed sizes (GPU). Bytes per
parameter, each tensor read once and written once: fp32 parameters with fp32 states
move 28 (read p, g, m, v; write p, m, v); bf16 parameters with fp32 states move 22.
The ``host ms`` column is the CPU time of issuing one step.
"""

from __future__ import annotations

import torch

from fastgen.optim import FusedAdamW

from ._optim_params import cases as _cases
from ._optim_params import make_params
from .harness import Case, Unavailable, fastgen_backend

OP = "adamw"
PROVIDERS = ("torch", "torch-fused", "fastgen-triton", "fastgen-cuda")
GPU_ONLY = ("torch-fused", "fastgen-triton", "fastgen-cuda")
MODES = ("step",)
PLOT_X = "params"


def cases(device: str, quick: bool) -> list[Case]:
    return _cases(device, quick, ((torch.float32, ""), (torch.bfloat16, "stochastic")))


def bytes_moved(case: Case, mode: str) -> int:
    e = torch.empty((), dtype=case.dtype).element_size()
    per_param = 2 * e + e + 2 * 4 + 2 * 4  # p read+write, g read, m and v (fp32) read+write
    return case.shape["params"] * per_param


def setup(provider: str, case: Case, mode: str, device: str):
    sr = case.variant == "stochastic"
    if provider in GPU_ONLY and device != "cuda":
        raise Unavailable("needs a CUDA GPU")
    backend = fastgen_backend(provider, device) if provider.startswith("fastgen") else None
    params = make_params(case, device)
    if provider in ("torch", "torch-fused"):
        if sr:
            raise Unavailable("torch.optim.AdamW has no stochastic rounding (its bf16 states are bf16)")
        opt = torch.optim.AdamW(params, lr=1e-3, fused=provider == "torch-fused" or None)
    else:
        opt = FusedAdamW(params, lr=1e-3, backend=backend, stochastic_rounding=sr)

    def fn():
        opt.step()

    return fn
