"""EMA update benchmark: fastgen.optim.EMA against ``torch._foreach_lerp_`` over the same tensors.

1B parameters in 200 tensors (GPU); fp32 shadow. Bytes per parameter: read the shadow
and the parameter, write the shadow: 12 for fp32 parameters.
"""

from __future__ import annotations

import torch

from fastgen.optim import EMA

from ._optim_params import cases as _cases
from ._optim_params import make_params
from .harness import Case, fastgen_backend

OP = "ema"
PROVIDERS = ("torch", "fastgen-triton", "fastgen-cuda")
GPU_ONLY = ("fastgen-triton", "fastgen-cuda")
MODES = ("update",)
PLOT_X = "params"


def cases(device: str, quick: bool) -> list[Case]:
    return _cases(device, quick)


def bytes_moved(case: Case, mode: str) -> int:
    return case.shape["params"] * (4 + case.dtype.itemsize + 4)


def setup(provider: str, case: Case, mode: str, device: str):
    backend = "torch" if provider == "torch" else fastgen_backend(provider, device)
    model = torch.nn.Module()
    model.params = torch.nn.ParameterList(make_params(case, device, with_grads=False))
    ema = EMA(model, decay=0.999, warmup=False, backend=backend)

    def fn():
        ema.update(model)

    return fn
