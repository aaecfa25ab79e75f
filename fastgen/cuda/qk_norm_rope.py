"""CUDA C++ fused QK-RMSNorm + RoPE launchers (``csrc/qk_norm_rope/`` through ``fastgen._C``).

Same signatures as the Triton launchers in ``fastgen.kernels.qk_norm_rope``: they launch into
outputs that ``fastgen.ops.qk_norm_rope`` allocated and never see an empty call; no autograd
here. Inputs are validated upstream; the asserts only guard what the kernels rely on. For each
head row ``x`` of q or k, in fp32 with one rounding at the store::

    n  = x * rsqrt(mean(x ** 2) + eps) * w          (never rounded)
    y  = rope(n)                                    (fastgen.cuda.rope's rotation)

    dn = rope^T(dy),  g = dn * w,  xhat = x * rstd  (rstd recomputed from x)
    dx = rstd * (g - xhat * mean(g * xhat))
    dw = sum over tokens and heads of dn * xhat     (fp32 per-block partials, summed here
                                                     in a fixed order: deterministic)
"""

from __future__ import annotations

import torch

from fastgen.cuda import dtype_code, load_extension, named_strides, named_tables
from fastgen.ops._shapes import bsh_strides, max_programs, rope_dims, table_strides
from fastgen.limits import MAX_HEAD_DIM

__all__ = ["qk_norm_rope_fwd", "qk_norm_rope_bwd"]


def _strides(t: torch.Tensor, layout: str) -> tuple[int, int, int]:
    """(batch, sequence, head) strides; 0 for a dim of size 1 (never stepped, so it cannot
    spoil the alignment that the vectorized path checks)."""
    sizes = (t.shape[0], t.shape[1], t.shape[2]) if layout == "bshd" else (t.shape[0], t.shape[2], t.shape[1])
    return tuple(0 if n == 1 else st for n, st in zip(sizes, bsh_strides(t, layout)))


def _table_strides(t: torch.Tensor) -> tuple[int, int]:
    sb, ss = table_strides(t)
    return sb, (0 if t.shape[-2] == 1 else ss)


def _tables(cos, sin, dtype):
    """cos / sin in a dtype the kernels take: x's dtype or fp32, the same for both."""
    if cos.dtype != sin.dtype or cos.dtype not in (dtype, torch.float32):
        cos, sin = cos.float(), sin.float()
    return cos, sin


def _check(xs, wq, wk, cos, sin, D, R):
    q = xs[0]
    assert q.is_cuda and all(x.device == q.device and x.dtype == q.dtype and x.stride(3) == 1 for x in xs)
    for w in (wq, wk):
        assert w.shape == (D,) and w.is_contiguous() and w.device == q.device and w.dtype in (q.dtype, torch.float32)
    assert cos.stride(-1) == 1 and sin.stride(-1) == 1 and cos.shape == sin.shape
    assert cos.device == q.device and sin.device == q.device
    assert R % 2 == 0 and 2 <= R <= D <= MAX_HEAD_DIM


def _num_partials(rows_q: int, rows_k: int, total: int) -> tuple[int, int]:
    """Backward blocks (= fp32 partial rows) for q and for k, about proportional to their rows."""
    if rows_q == 0 or rows_k == 0:
        return min(rows_q, total), min(rows_k, total)
    pq = min(rows_q, max(1, total * rows_q // (rows_q + rows_k)))
    return pq, min(rows_k, max(1, total - pq))


def qk_norm_rope_fwd(q, k, wq, wk, cos, sin, eps: float, layout: str, interleaved: bool, *, q_out, k_out):
    """Launch the forward into q_out / k_out (allocated by ``fastgen.ops.qk_norm_rope``);
    the arguments of ``fastgen.kernels.qk_norm_rope.qk_norm_rope_fwd``."""
    B, S, hq, hk, D, R = rope_dims(q, k, cos, layout)
    assert B * S > 0 and hq + hk > 0 and D > 0, "empty calls are answered by fastgen.ops.qk_norm_rope"
    C = load_extension()
    qo, ko = q_out, k_out
    _check((q, k, qo, ko), wq, wk, cos, sin, D, R)
    cos, sin = _tables(cos, sin, q.dtype)
    with torch.cuda.device(q.device):
        stream = torch.cuda.current_stream(q.device).cuda_stream
        C.qk_norm_rope_fwd(C.QkNormRopeFwdParams(
            q_ptr=q.data_ptr(), k_ptr=k.data_ptr(), wq_ptr=wq.data_ptr(), wk_ptr=wk.data_ptr(),
            qo_ptr=qo.data_ptr(), ko_ptr=ko.data_ptr(), cos_ptr=cos.data_ptr(), sin_ptr=sin.data_ptr(),
            B=B, S=S, Hq=hq, Hk=hk, D=D, R=R,
            **named_strides(sq=_strides(q, layout), sk=_strides(k, layout), soq=_strides(qo, layout),
                            sok=_strides(ko, layout)),
            **named_tables(_table_strides(cos), _table_strides(sin)),
            x_dtype=dtype_code(q.dtype), wq_dtype=dtype_code(wq.dtype), wk_dtype=dtype_code(wk.dtype),
            table_dtype=dtype_code(cos.dtype), eps=float(eps), interleaved=int(bool(interleaved)), stream=stream,
        ))


def qk_norm_rope_bwd(dqo, dko, q, k, wq, wk, cos, sin, eps: float, layout: str, interleaved: bool, *,
                     dq, dk, dwq, dwk):
    """Launch the backward into dq / dk / dwq / dwk (allocated by ``fastgen.ops.qk_norm_rope``); the
    arguments of ``fastgen.kernels.qk_norm_rope.qk_norm_rope_bwd``. Deterministic."""
    B, S, hq, hk, D, R = rope_dims(q, k, cos, layout)
    T = B * S
    assert T > 0 and hq + hk > 0 and D > 0, "empty calls are answered by fastgen.ops.qk_norm_rope"
    C = load_extension()
    assert dqo.shape == q.shape and dko.shape == k.shape
    _check((q, k, dqo, dko, dq, dk), wq, wk, cos, sin, D, R)
    cos, sin = _tables(cos, sin, q.dtype)
    with torch.cuda.device(q.device):
        stream = torch.cuda.current_stream(q.device).cuda_stream
        pq, pk = _num_partials(T * hq, T * hk, max_programs(q.device))
        partial = torch.empty((pq + pk, D), dtype=torch.float32, device=q.device)
        C.qk_norm_rope_bwd(C.QkNormRopeBwdParams(
            dqo_ptr=dqo.data_ptr(), dko_ptr=dko.data_ptr(), q_ptr=q.data_ptr(), k_ptr=k.data_ptr(),
            wq_ptr=wq.data_ptr(), wk_ptr=wk.data_ptr(), dq_ptr=dq.data_ptr(), dk_ptr=dk.data_ptr(),
            dw_partial_ptr=partial.data_ptr(), cos_ptr=cos.data_ptr(), sin_ptr=sin.data_ptr(),
            B=B, S=S, Hq=hq, Hk=hk, D=D, R=R,
            **named_strides(sdq=_strides(dqo, layout), sdk=_strides(dko, layout), sq=_strides(q, layout),
                            sk=_strides(k, layout), soq=_strides(dq, layout), sok=_strides(dk, layout)),
            **named_tables(_table_strides(cos), _table_strides(sin)),
            x_dtype=dtype_code(q.dtype), wq_dtype=dtype_code(wq.dtype), wk_dtype=dtype_code(wk.dtype),
            table_dtype=dtype_code(cos.dtype), eps=float(eps), interleaved=int(bool(interleaved)),
            num_partials_q=pq, num_partials_k=pk, stream=stream,
        ))
        # Fixed-order sums of the per-block partials: the deterministic second pass.
        dwq.copy_(partial[:pq].sum(0))
        dwk.copy_(partial[pq:].sum(0))
