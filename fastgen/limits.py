"""What the kernels serve: dtypes, sizes and the checks built on them, defined once.

Torch-only (no Triton import), so the ops, the Triton launchers (``fastgen.kernels``),
the CUDA C++ launchers (``fastgen.cuda``) and the registry in ``fastgen.backend`` all
read the same numbers. Each ``*_reason`` function is an implementation's "can I serve
this call" check: it returns why the kernels cannot take the call, or None.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

# Dtypes of the normalization, RoPE and GLU kernels (Triton and CUDA C++).
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Dtypes of the flash-attention kernels (tensor-core dots).
ATTENTION_DTYPES = (torch.float16, torch.bfloat16)
# Most channels per group of the GroupNorm kernels (a tile spans all channels of a group;
# at 2048 channels the channels-last stats kernel spills on sm_90).
MAX_CHANNELS_PER_GROUP = 1024
# Widest head the RoPE kernels hold in registers.
MAX_HEAD_DIM = 1024
# The norm a fused LayerNorm-family kernel applies (a constexpr of the kernels).
NORM_NONE, NORM_LAYER, NORM_RMS = 0, 1, 2


def interpreter_enabled() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def kernel_dtype_reason(x: Tensor, *_) -> Optional[str]:
    """Why the float kernels cannot take x's dtype, or None."""
    if x.dtype not in KERNEL_DTYPES:
        return f"dtype {x.dtype} is not supported by the kernels (float32, float16, bfloat16); use backend='torch'"
    return None


def group_norm_reason(x: Tensor, num_groups: int) -> Optional[str]:
    """GroupNorm kernels: a kernel dtype and at most MAX_CHANNELS_PER_GROUP channels per group."""
    reason = kernel_dtype_reason(x)
    if reason is not None:
        return reason
    k = x.shape[1] // num_groups
    if k > MAX_CHANNELS_PER_GROUP:
        return (
            f"{k} channels per group exceed the kernels' limit of {MAX_CHANNELS_PER_GROUP}; "
            "use more groups or backend='torch'"
        )
    return None


def rope_reason(q: Tensor, cos: Tensor, sin: Tensor) -> Optional[str]:
    """RoPE and QK-norm + RoPE kernels: kernel dtypes for q and the tables, head dim <= MAX_HEAD_DIM."""
    if q.dtype not in KERNEL_DTYPES:
        return f"dtype {q.dtype} is not supported by the kernels (float32, float16, bfloat16); use backend='torch'"
    for name, t in (("cos", cos), ("sin", sin)):
        if t.dtype not in KERNEL_DTYPES:
            return f"{name} dtype {t.dtype} is not supported by the kernels; pass float32 tables or backend='torch'"
    if q.shape[3] > MAX_HEAD_DIM:
        return f"head dim D={q.shape[3]} exceeds the kernels' limit {MAX_HEAD_DIM}; use backend='torch'"
    return None


def attention_reason(q: Tensor) -> Optional[str]:
    """Flash-attention kernels: fp16 / bf16, head dims multiple of 8 from 16 to 256."""
    if q.dtype not in ATTENTION_DTYPES:
        return (f"dtype {q.dtype} is not supported by the flash-attention kernels (bfloat16, float16); "
                f"cast q, k, v to torch.bfloat16 (or float16), or use backend='torch'")
    D = q.shape[-1]
    if D % 8 != 0 or not 16 <= D <= 256:
        return f"head dim {D} is not supported by the kernels (multiples of 8 from 16 to 256); use backend='torch'"
    return None
