"""Device helpers shared by fastgen's Triton kernels."""

from __future__ import annotations

import os

import triton
import triton.language as tl


def interpreting() -> bool:
    """True when kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


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
