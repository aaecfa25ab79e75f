"""Torch-only shape helpers that the ops and both launcher families share.

Sizes and strides read off tensors, and how many programs a grid-stride launch runs. The ops
(``fastgen.ops.<op>``) normalize shapes and allocate outputs with them; the Triton launchers
(``fastgen.kernels``) and the CUDA C++ launchers (``fastgen.cuda``) read the same sizes and
strides. No Triton import, so ``fastgen.cuda`` takes them without pulling Triton in.
"""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def max_programs(device: torch.device, per_sm: int = 4, interpreted: int = 4) -> int:
    """How many programs a grid-stride launch runs at most (each owning one row of a partial
    buffer, say): ``per_sm`` per SM on a GPU, ``interpreted`` under the interpreter, which pays
    per program."""
    if device.type == "cuda":
        return per_sm * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return interpreted


def bsh_strides(t: torch.Tensor, layout: str) -> tuple[int, int, int]:
    """(batch, sequence, head) strides of a 4-D q / k in ``layout`` ("bshd" or "bhsd")."""
    if layout == "bshd":
        return t.stride(0), t.stride(1), t.stride(2)
    return t.stride(0), t.stride(2), t.stride(1)


def table_strides(t: torch.Tensor) -> tuple[int, int]:
    """(batch, sequence) strides of a (S, R) or (B, S, R) table; batch stride 0 when shared."""
    if t.dim() == 2:
        return 0, t.stride(0)
    return (0 if t.shape[0] == 1 else t.stride(0)), t.stride(1)


def rope_dims(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, layout: str) -> tuple[int, ...]:
    """(B, S, Hq, Hk, D, R) of a RoPE call: q / k in ``layout``, R the rotated dims of the tables."""
    B = q.shape[0]
    S = q.shape[1] if layout == "bshd" else q.shape[2]
    hq = q.shape[2] if layout == "bshd" else q.shape[1]
    hk = k.shape[2] if layout == "bshd" else k.shape[1]
    return B, S, hq, hk, q.shape[3], cos.shape[-1]


def rope_call_is_empty(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, layout: str) -> bool:
    """True when a RoPE-family call has nothing to launch: no tokens, no heads of q or k, or D = 0."""
    B, S, hq, hk, D, _ = rope_dims(q, k, cos, layout)
    return B * S == 0 or hq + hk == 0 or D == 0


def new_like(t: torch.Tensor) -> torch.Tensor:
    """A new contiguous tensor of t's shape, dtype and device (a kernel output)."""
    return torch.empty(t.shape, dtype=t.dtype, device=t.device)


def channels_last_layout(x: torch.Tensor) -> bool:
    """True if x [N, C, S] has channels-last strides (S*C, 1, C), False if contiguous (C*S, S, 1).

    Strides of size-1 dims are ignored; with C == 1 or S == 1 both layouts are the same
    memory order and this returns False. Anything else is an AssertionError.
    """
    N, C, S = x.shape
    ok_n = N <= 1 or x.stride(0) == C * S
    if C > 1 and S > 1 and x.stride(1) == 1 and x.stride(2) == C and ok_n:
        return True
    assert ok_n and (C <= 1 or x.stride(1) == S) and (S <= 1 or x.stride(2) == 1), (
        f"x must be [N, C, S] with contiguous or channels-last strides, got strides {x.stride()}")
    return False
