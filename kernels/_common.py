"""Device helpers shared by fastgen's Triton kernels."""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from fastgen.ops._shapes import max_programs  # noqa: F401  (torch-only, shared with fastgen.cuda)
from fastgen.limits import interpreter_enabled as interpreting  # noqa: F401  (the one interpreter check)


def _cuda_device(args, kwargs) -> torch.device | None:
    """The device of the first CUDA tensor among the arguments (or inside a list / tuple of them)."""
    for a in (*args, *kwargs.values()):
        for t in (a if isinstance(a, (list, tuple)) else (a,)):
            if isinstance(t, torch.Tensor) and t.is_cuda:
                return t.device
    return None


def device_guard(launcher):
    """Run ``launcher`` with its tensors' GPU as the current device.

    Triton launches on (and takes the stream of) the *current* device, not the tensors': a call
    with tensors on ``cuda:1`` while ``cuda:0`` is current would run on the wrong GPU. Every
    public launcher in ``fastgen/kernels`` carries this decorator (a test checks it); autotune
    timings happen inside the launcher, so they are guarded too."""

    @functools.wraps(launcher)
    def guarded(*args, **kwargs):
        device = _cuda_device(args, kwargs)
        if device is None or device.index is None or device.index == torch.cuda.current_device():
            return launcher(*args, **kwargs)
        with torch.cuda.device(device):
            return launcher(*args, **kwargs)

    guarded.device_guarded = True
    return guarded


def warps_for(elements: int) -> int:
    """num_warps for a tile of ``elements``: about 8 elements of each live tensor per thread, 1 to 32 warps."""
    return max(1, min(32, elements // 256))


@triton.jit
def round_to(x, dtype: tl.constexpr, INTERPRET: tl.constexpr):
    """Cast fp32 ``x`` to ``dtype`` with round-to-nearest-even.

    On the GPU this is a plain cast. Triton's interpreter truncates fp32 -> bf16
    instead of rounding (checked on Triton 3.9), so there the bf16 rounding is done
    in integer arithmetic: add half an ulp (ties to even) and drop the low 16 bits,
    which makes the following cast exact.
    """
    if INTERPRET and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + (0x7FFF + ((bits >> 16) & 1))
        x = (bits & 0xFFFF0000).to(tl.float32, bitcast=True)
    return x.to(dtype)
