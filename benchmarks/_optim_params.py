"""Parameter lists for the optimizer, clipping and EMA benchmarks."""

from __future__ import annotations

import torch

from .harness import Case


def cases(device: str, quick: bool, variants=((torch.float32, ""),)) -> list[Case]:
    """1B parameters in 200 tensors of mixed sizes on a GPU (100M with --quick); 2M on a CPU."""
    total = 2_000_000 if device != "cuda" else (100_000_000 if quick else 1_000_000_000)
    tensors = 20 if device != "cuda" else 200
    return [Case({"params": total, "tensors": tensors}, dtype, variant) for dtype, variant in variants]


def make_params(case: Case, device: str, with_grads: bool = True) -> list[torch.nn.Parameter]:
    """``tensors`` parameters whose sizes cycle through 1x..8x of a base size, ``params`` in all."""
    n, total = case.shape["tensors"], case.shape["params"]
    weights = [1 + (i % 8) for i in range(n)]
    sizes = [max(1, total * w // sum(weights)) for w in weights]
    gen = torch.Generator(device=device).manual_seed(0)
    params = []
    for size in sizes:
        p = torch.nn.Parameter(torch.randn(size, device=device, generator=gen).to(case.dtype))
        if with_grads:
            p.grad = torch.randn(size, device=device, generator=gen).to(case.dtype) * 1e-3
        params.append(p)
    return params
