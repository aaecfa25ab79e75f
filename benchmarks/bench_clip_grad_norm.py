"""Gradient clipping benchmark: fastgen.optim.clip_grad_norm_ against torch.nn.utils.clip_grad_norm_.

1B gradients in 200 tensors (GPU). Bytes per gradient: read it twice (norm, then
scale) and write it once: 12 for fp32 (a perfect single-pass kernel cannot do less
than read + write, but the norm must be known before the first write).
"""

from __future__ import annotations

from fastgen.optim import clip_grad_norm_

from ._optim_params import cases as _cases
from ._optim_params import make_params
from .harness import Case, fastgen_backend

OP = "clip_grad_norm"
PROVIDERS = ("torch", "fastgen-triton", "fastgen-cuda")
GPU_ONLY = ("fastgen-triton", "fastgen-cuda")
MODES = ("clip",)
PLOT_X = "params"


def cases(device: str, quick: bool) -> list[Case]:
    return _cases(device, quick)


def bytes_moved(case: Case, mode: str) -> int:
    return case.shape["params"] * 3 * case.dtype.itemsize


def setup(provider: str, case: Case, mode: str, device: str):
    backend = "torch" if provider == "torch" else fastgen_backend(provider, device)
    params = make_params(case, device)

    def fn():
        # max_norm above any total: the grads are scaled by 1 and stay the same run to run
        clip_grad_norm_(params, 1e9, backend=backend)

    return fn
