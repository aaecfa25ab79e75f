"""CUDA C++ RoPE launchers (``csrc/rope/rope.cu`` through ``fastgen._C``).

Same signatures as the Triton launchers in ``fastgen.kernels.rope``; no autograd
here (that is ``fastgen.ops.rope``). Inputs are validated upstream; the asserts
only guard what the kernel relies on.

    forward  a' = a ca - b sa,  b' = b cb + a sb     (pairs (2j, 2j+1) or (j, j+R/2))
    inverse  a' = a ca + b sb,  b' = b cb - a sa     (the backward)

The fused QK-RMSNorm + RoPE has its own launchers, ``fastgen.cuda.qk_norm_rope``
(kernels in ``csrc/qk_norm_rope/``).
"""

from __future__ import annotations

import torch

from fastgen.cuda import dtype_code, load_extension, named_strides, named_tables
from fastgen.ops._shapes import bsh_strides, rope_dims, table_strides
from fastgen.limits import MAX_HEAD_DIM

__all__ = ["apply_rope_fwd", "apply_rope_bwd"]


def _launch(q, k, cos, sin, qo, ko, layout, interleaved, inverse):
    C = load_extension()
    B, S, hq, hk, D, R = rope_dims(q, k, cos, layout)
    if B * S == 0 or hq + hk == 0 or D == 0:
        return
    assert q.is_cuda and q.stride(3) == 1 and k.stride(3) == 1 and qo.stride(3) == 1 and ko.stride(3) == 1
    assert cos.stride(-1) == 1 and sin.stride(-1) == 1 and cos.dtype == sin.dtype and R <= D <= MAX_HEAD_DIM
    if cos.dtype not in (q.dtype, torch.float32):  # the kernel takes x's dtype or fp32 tables
        cos, sin = cos.float(), sin.float()
    with torch.cuda.device(q.device):
        stream = torch.cuda.current_stream(q.device).cuda_stream
        C.apply_rope(C.ApplyRopeParams(
            q_ptr=q.data_ptr(), k_ptr=k.data_ptr(), qo_ptr=qo.data_ptr(), ko_ptr=ko.data_ptr(),
            cos_ptr=cos.data_ptr(), sin_ptr=sin.data_ptr(), B=B, S=S, Hq=hq, Hk=hk, D=D, R=R,
            **named_strides(sq=bsh_strides(q, layout), sk=bsh_strides(k, layout), soq=bsh_strides(qo, layout),
                            sok=bsh_strides(ko, layout)),
            **named_tables(table_strides(cos), table_strides(sin)),
            x_dtype=dtype_code(q.dtype), table_dtype=dtype_code(cos.dtype), interleaved=int(bool(interleaved)),
            inverse=int(bool(inverse)), copy_pass=int(D > R and (qo is not q or ko is not k)), stream=stream,
        ))


def apply_rope_fwd(q, k, cos, sin, layout: str, interleaved: bool, inplace: bool = False):
    """q_out, k_out = apply_rope_fwd(q, k, cos, sin, layout, interleaved, inplace); see fastgen.kernels.rope."""
    if inplace:
        qo, ko = q, k
    else:
        qo = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        ko = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    _launch(q, k, cos, sin, qo, ko, layout, interleaved, inverse=False)
    return qo, ko


def apply_rope_bwd(dq_out, dk_out, cos, sin, layout: str, interleaved: bool):
    """dq, dk = apply_rope_bwd(dq_out, dk_out, cos, sin, layout, interleaved): the inverse rotation."""
    dq = torch.empty(dq_out.shape, dtype=dq_out.dtype, device=dq_out.device)
    dk = torch.empty(dk_out.shape, dtype=dk_out.dtype, device=dk_out.device)
    _launch(dq_out, dk_out, cos, sin, dq, dk, layout, interleaved, inverse=True)
    return dq, dk
