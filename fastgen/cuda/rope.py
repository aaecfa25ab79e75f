"""CUDA C++ RoPE launchers (``csrc/rope/rope.cu`` through ``fastgen._C``).

Same signatures as the Triton launchers in ``fastgen.kernels.rope``: they launch into
outputs that ``fastgen.ops.rope`` allocated and never see an empty call; no autograd
here. Inputs are validated upstream; the asserts only guard what the kernel relies on.

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
    assert B * S > 0 and hq + hk > 0 and D > 0, "empty calls are answered by fastgen.ops.rope"
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


def apply_rope_fwd(q, k, cos, sin, layout: str, interleaved: bool, *, q_out, k_out):
    """Rotate q and k into q_out and k_out (q_out is q in place); see fastgen.kernels.rope."""
    _launch(q, k, cos, sin, q_out, k_out, layout, interleaved, inverse=False)


def apply_rope_bwd(dq_out, dk_out, cos, sin, layout: str, interleaved: bool, *, dq, dk):
    """The inverse rotation of dq_out / dk_out into dq / dk; see fastgen.kernels.rope."""
    _launch(dq_out, dk_out, cos, sin, dq, dk, layout, interleaved, inverse=True)
