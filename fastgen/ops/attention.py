"""Attention: ``softmax(scale * q k^T) v`` with a flash-attention kernel (Triton) behind it.

Per batch, query head ``h`` (kv head ``h // (H // HK)`` for GQA / MQA) and query row
``i``, over the keys ``j`` it sees::

    s_ij  = scale * q_i . k_j                      scale defaults to 1 / sqrt(D)
    lse_i = log(sum_j exp(s_ij))                   natural log, fp32
    o_i   = sum_j exp(s_ij - lse_i) v_j

With ``causal=True`` row ``i`` sees the keys ``j <= i + Sk - Sq``: the causal mask is
aligned to the **bottom-right** corner when the lengths differ (FlashAttention >= 2.1;
with Sq == Sk it is the usual lower triangle). A row that sees no key (causal with
Sq > Sk) gets ``o = 0`` and ``lse = -inf``, and no gradient.

Implementations (``backend=``): ``"triton"`` (``fastgen/kernels/attention.py``,
bf16 / fp16), ``"torch"`` (``attention_ref`` below: fp32 math, explicit softmax).
There is no CUDA C++ attention. See ``fastgen.backend`` for how ``"auto"`` chooses.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fastgen.backend import launcher, resolve
from fastgen.limits import attention_reason

LAYOUTS = ("bshd", "bhsd")


# ----------------------------------------------------------------------------- reference


def _to_bhsd(t: Tensor, layout: str) -> Tensor:
    return t.transpose(1, 2) if layout == "bshd" else t


def _attend(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float):
    """fp32 attention of [B, H, Sq, D] q with [B, HK, Sk, D] k, v -> (o [B, H, Sq, D], lse [B, H, Sq])."""
    H, HK = q.shape[1], k.shape[1]
    if HK != H:
        k = k.repeat_interleave(H // HK, dim=1)
        v = v.repeat_interleave(H // HK, dim=1)
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    Sq, Sk = q.shape[2], k.shape[2]
    if causal:
        i = torch.arange(Sq, device=q.device)[:, None]
        j = torch.arange(Sk, device=q.device)[None, :]
        s = s.masked_fill(j > i + (Sk - Sq), float("-inf"))
    m = s.amax(-1, keepdim=True) if Sk > 0 else s.new_full((*s.shape[:-1], 1), float("-inf"))
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m)).detach()  # rows that see no key
    e = torch.exp(s - m)
    den = e.sum(-1, keepdim=True)
    o = torch.matmul(e / torch.where(den == 0, torch.ones_like(den), den), v)
    lse = (torch.log(den) + m).squeeze(-1)
    return o, lse


def attention_ref(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    causal: bool = False,
    scale: Optional[float] = None,
    layout: str = "bshd",
    cu_seqlens_q: Optional[Tensor] = None,
    cu_seqlens_k: Optional[Tensor] = None,
    return_lse: bool = False,
):
    """Plain-torch attention in fp32 (upcast inputs, explicit softmax), rounded once to q.dtype.

    The truth for tests and the ``backend="torch"`` path; differentiable. Same arguments and
    outputs as :func:`attention` (varlen: one loop iteration per sequence).
    """
    D = q.shape[-1]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    if cu_seqlens_q is not None:
        cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
        outs, lses = [], []
        for b in range(len(cq) - 1):
            qs, ks, vs = (t[lo:hi].transpose(0, 1)[None].float() for t, lo, hi in
                          ((q, cq[b], cq[b + 1]), (k, ck[b], ck[b + 1]), (v, ck[b], ck[b + 1])))
            o, lse = _attend(qs, ks, vs, causal, scale)
            outs.append(o[0].transpose(0, 1))
            lses.append(lse[0])
        o = torch.cat(outs, 0) if outs else q.float().clone()
        lse = torch.cat(lses, -1) if lses else q.new_empty((q.shape[1], 0), dtype=torch.float32)
        o = o.to(q.dtype)
        return (o, lse) if return_lse else o
    o, lse = _attend(_to_bhsd(q, layout).float(), _to_bhsd(k, layout).float(), _to_bhsd(v, layout).float(),
                     causal, scale)
    o = _to_bhsd(o, layout).to(q.dtype)
    return (o, lse) if return_lse else o


# ----------------------------------------------------------------------------- validation


def _validate(q, k, v, causal, scale, layout, cu_q, cu_k, max_q, max_k) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"attention: {name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"attention: {name} must be a floating-point tensor, got dtype {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"attention: q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"attention: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if layout not in LAYOUTS:
        raise ValueError(f"attention: layout must be one of {LAYOUTS}, got {layout!r}")
    varlen = cu_q is not None or cu_k is not None
    want = 3 if varlen else 4
    shape_doc = "(total, H, D) packed with cu_seqlens" if varlen else \
        ("(B, S, H, D)" if layout == "bshd" else "(B, H, S, D)")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != want:
            raise ValueError(f"attention: {name} must be {want}-D {shape_doc}, got shape {tuple(t.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"attention: k and v must have the same shape (same length, heads and head dim), "
                         f"got k {tuple(k.shape)} and v {tuple(v.shape)}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"attention: q and k must have the same head dim, got {q.shape[-1]} and {k.shape[-1]}")
    hdim = 1 if varlen else (2 if layout == "bshd" else 1)
    H, HK = q.shape[hdim], k.shape[hdim]
    if HK == 0 or H % HK != 0:
        raise ValueError(f"attention: the number of query heads ({H}) must be a multiple of the number of "
                         f"key/value heads ({HK})")
    if not varlen and q.shape[0] != k.shape[0]:
        raise ValueError(f"attention: q and k must have the same batch size, got {q.shape[0]} and {k.shape[0]}")
    if varlen:
        if cu_q is None or cu_k is None:
            raise ValueError("attention: pass both cu_seqlens_q and cu_seqlens_k (or neither)")
        if layout != "bshd":
            raise ValueError("attention: varlen (cu_seqlens) inputs are packed (total, H, D); leave layout='bshd'")
        for name, cu, total in (("cu_seqlens_q", cu_q, q.shape[0]), ("cu_seqlens_k", cu_k, k.shape[0])):
            if not isinstance(cu, Tensor) or cu.dtype != torch.int32 or cu.dim() != 1 or cu.numel() < 1:
                raise ValueError(f"attention: {name} must be a 1-D torch.int32 tensor of B + 1 cumulative "
                                 f"lengths starting at 0, got "
                                 f"{getattr(cu, 'dtype', type(cu).__name__)} {tuple(getattr(cu, 'shape', ()))}")
            if cu.device != q.device:
                raise ValueError(f"attention: {name} is on {cu.device} but q is on {q.device}")
        if cu_q.numel() != cu_k.numel():
            raise ValueError(f"attention: cu_seqlens_q and cu_seqlens_k must have the same length B + 1, got "
                             f"{cu_q.numel()} and {cu_k.numel()}")
    if scale is not None and (not isinstance(scale, (int, float)) or not math.isfinite(scale)):
        raise ValueError(f"attention: scale must be a finite number or None, got {scale!r}")
    for name, m in (("max_seqlen_q", max_q), ("max_seqlen_k", max_k)):
        if m is not None and (not isinstance(m, int) or isinstance(m, bool) or m < 0):
            raise ValueError(f"attention: {name} must be a non-negative int or None, got {m!r}")
    if varlen:
        return _check_cu_seqlens(cu_q, cu_k, q.shape[0], k.shape[0], max_q, max_k)
    return max_q, max_k


def _tracing() -> bool:
    """Under torch.compile or CUDA-graph capture a device-to-host read is not allowed."""
    if torch.compiler.is_compiling():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _check_cu_seqlens(cu_q: Tensor, cu_k: Tensor, total_q: int, total_k: int, max_q, max_k):
    """The kernels index q, k, v with cu_seqlens and max_seqlen as given: a wrong value reads and
    writes out of bounds. Checked here with one device-to-host read of both tensors: each must
    start at 0, never decrease and end at the packed length; max_seqlen must cover the longest
    sequence. Returns (max_seqlen_q, max_seqlen_k), computed where not given.

    Under torch.compile and CUDA-graph capture the values cannot be read: pass max_seqlen_q / _k
    there (required), and cu_seqlens that were checked outside (an eager call checks them)."""
    if _tracing():
        if max_q is None or max_k is None:
            raise ValueError("attention: under torch.compile or CUDA-graph capture pass max_seqlen_q and "
                             "max_seqlen_k with cu_seqlens (they cannot be read from the device there)")
        return max_q, max_k
    both = torch.cat([cu_q, cu_k]).tolist()
    n = cu_q.numel()
    out = []
    for name, vals, total, given in (("q", both[:n], total_q, max_q), ("k", both[n:], total_k, max_k)):
        lens = [b - a for a, b in zip(vals, vals[1:])]
        if vals[0] != 0 or vals[-1] != total or min(lens, default=0) < 0:
            raise ValueError(f"attention: cu_seqlens_{name} must start at 0, never decrease and end at the "
                             f"packed length {total} (the first dim of {name}), got {vals}")
        longest = max(lens, default=0)
        if given is not None and given < longest:
            raise ValueError(f"attention: max_seqlen_{name}={given} is smaller than the longest sequence "
                             f"({longest}) in cu_seqlens_{name}; pass at least {longest}, or omit it")
        out.append(longest if given is None else given)
    return tuple(out)


_unsupported = attention_reason  # the name fastgen.patch reads

# The kernels index rows inside one (batch, head) slice with 32-bit offsets (row * row stride):
# 64-bit per-element offsets cost registers and spill on sm_90 (the static tier measured 184 ->
# 255 registers with 268 bytes of spills). A slice whose last row starts past 2^31 elements (packed
# qkv of 24 x 128-dim heads at S > 233k tokens) goes to the reference instead of overflowing.
_MAX_OFFSET = 2**31 - 1


def _offset_reason(q: Tensor, k: Tensor, v: Tensor, layout: str, varlen: bool) -> Optional[str]:
    s_dim = 0 if varlen else (1 if layout == "bshd" else 2)
    for name, t in (("q", q), ("k", k), ("v", v)):
        last = (t.shape[s_dim] - 1) * t.stride(s_dim) + t.shape[-1] if t.numel() else 0
        if last > _MAX_OFFSET:
            return (f"{name}'s sequence is too long for the kernels' 32-bit row offsets ({t.shape[s_dim]} rows of "
                    f"stride {t.stride(s_dim)}); use backend='torch', or split the sequence")
    return None


def _lastdim_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


# ----------------------------------------------------------------------------- torch.library ops


def _decode(launch: Optional[list[int]]):
    """A test's launch override, passed through the ops' schema as ints (None in production)."""
    if launch is None:
        return None
    from fastgen.kernels.attention_configs import LaunchOverride

    return LaunchOverride.decode(launch)


@torch.library.custom_op("fastgen::attention_fwd", mutates_args=())
def _attention_fwd_op(
    q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float, layout: str,
    cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor], max_seqlen_q: int, max_seqlen_k: int,
    deterministic: bool, launch: Optional[list[int]] = None,
) -> tuple[Tensor, Tensor]:
    """(o: q's shape, contiguous; lse fp32 [B, H, Sq] or [H, total_q] varlen). ``launch``: a test's
    ``LaunchOverride`` as ints (``kernels/attention_configs.py``), None in production."""
    return launcher("attention", "triton").attention_fwd(q, k, v, causal, scale, layout, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                            deterministic, _decode(launch))


@_attention_fwd_op.register_fake
def _(q, k, v, causal, scale, layout, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, deterministic,
      launch=None):
    from fastgen.kernels.attention import lse_shape

    lse = q.new_empty(lse_shape(q, layout, cu_seqlens_q is not None), dtype=torch.float32)
    return q.new_empty(q.shape), lse


@torch.library.custom_op("fastgen::attention_bwd", mutates_args=())
def _attention_bwd_op(
    do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, causal: bool, scale: float, layout: str,
    cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor], max_seqlen_q: int, max_seqlen_k: int,
    dlse: Optional[Tensor], deterministic: bool, launch: Optional[list[int]] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv), contiguous, in q's, k's and v's shapes and dtypes; dlse: gradient of lse or None.
    Deterministic (no atomics); ``deterministic``: fixed launch configs, no autotuning."""
    return launcher("attention", "triton").attention_bwd(do, q, k, v, o, lse, causal, scale, layout, cu_seqlens_q, cu_seqlens_k,
                            max_seqlen_q, max_seqlen_k, dlse, deterministic, _decode(launch))


@_attention_bwd_op.register_fake
def _(do, q, k, v, o, lse, causal, scale, layout, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dlse,
      deterministic, launch=None):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


# ----------------------------------------------------------------------------- autograd


class _AttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, scale, layout, cu_q, cu_k, max_q, max_k, deterministic, launch):
        q, k, v = (_lastdim_contiguous(t) for t in (q, k, v))
        o, lse = _attention_fwd_op(q, k, v, causal, scale, layout, cu_q, cu_k, max_q, max_k, deterministic, launch)
        ctx.save_for_backward(q, k, v, o, lse, cu_q, cu_k)
        ctx.args = (causal, scale, layout, max_q, max_k, deterministic, launch)
        ctx.set_materialize_grads(False)
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, o, lse, cu_q, cu_k = ctx.saved_tensors
        causal, scale, layout, max_q, max_k, deterministic, launch = ctx.args
        do = torch.zeros_like(o) if do is None else _lastdim_contiguous(do)  # only lse was used
        dlse = None if dlse is None else dlse.float().contiguous()
        dq, dk, dv = _attention_bwd_op(do, q, k, v, o, lse, causal, scale, layout, cu_q, cu_k, max_q, max_k,
                                       dlse, deterministic, launch)
        return dq, dk, dv, None, None, None, None, None, None, None, None, None


# ----------------------------------------------------------------------------- public ops


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    causal: bool = False,
    scale: Optional[float] = None,
    layout: str = "bshd",
    cu_seqlens_q: Optional[Tensor] = None,
    cu_seqlens_k: Optional[Tensor] = None,
    max_seqlen_q: Optional[int] = None,
    max_seqlen_k: Optional[int] = None,
    return_lse: bool = False,
    deterministic: bool = False,
    backend: Optional[str] = "auto",
    _launch=None,
):
    """Scaled dot-product attention, flash-attention style (no S x S matrix in memory).

    ::

        layout="bshd"  q (B, Sq, H, D)   k, v (B, Sk, HK, D)   -> o (B, Sq, H, D)
        layout="bhsd"  q (B, H, Sq, D)   k, v (B, HK, Sk, D)   -> o (B, H, Sq, D)
        varlen         q (Tq, H, D)      k, v (Tk, HK, D)      -> o (Tq, H, D)
                       cu_seqlens_q / _k: int32 (B + 1,) cumulative lengths [0, s0, s0 + s1, ...]
        lse (return_lse=True): float32 (B, H, Sq), or (H, Tq) varlen; natural log

        o = softmax(scale * q @ k^T  [+ causal mask]) @ v,  scale = 1 / sqrt(D) by default

    - Sq != Sk is fine (cross-attention), any lengths; GQA / MQA: H a multiple of HK.
    - ``causal=True``: row i sees keys j <= i + Sk - Sq (bottom-right aligned when the
      lengths differ, as in FlashAttention >= 2.1; rows that see no key give 0 and lse -inf).
    - Strided inputs (e.g. q, k, v sliced from one packed qkv tensor) are read in place as
      long as the last dim is contiguous.
    - dtypes: the Triton kernels take bfloat16 and float16 with head dims every multiple of
      8 from 16 to 256; float32 goes to the reference under ``"auto"`` and is refused by
      ``backend="triton"`` (cast to bf16, or use ``backend="torch"``).
    - Gradients flow to q, k, v from ``o`` and from ``lse`` (what ring / context-parallel
      attention needs to merge partial results). The kernels' backward uses no atomics, so a
      call is bit-identical run to run within a process. On a GPU the launch configs are
      autotuned once per shape class (``FASTGEN_AUTOTUNE=0`` turns it off), and timing noise
      may pick different configs in different processes; ``deterministic=True`` (or
      ``torch.use_deterministic_algorithms(True)``) takes the fixed default configs, so forward
      and gradients are bit-identical across processes too.
    - ``max_seqlen_q`` / ``max_seqlen_k`` (varlen): at least the longest sequence (the kernels'
      grid covers ``max_seqlen_q`` rows per sequence); computed when omitted. ``cu_seqlens``
      must start at 0, never decrease and end at the packed length; both are checked with one
      device-to-host read per call (a clear ``ValueError``, never an out-of-bounds access).
      Under torch.compile / CUDA-graph capture that read is impossible: pass the max lengths,
      and cu_seqlens that an eager call has checked.

    ``backend``: ``"auto"`` (default), ``"triton"`` or ``"torch"``. An explicit ``"triton"`` that
    cannot serve the call raises ``fastgen.backend.BackendUnavailableError``. Registered as
    ``torch.ops.fastgen.attention_fwd`` / ``attention_bwd`` (torch.compile ``fullgraph=True`` works).
    ``_launch`` (tests only): a ``fastgen.kernels.attention_configs.LaunchOverride`` for the kernels'
    launches, forward and backward.
    """
    max_seqlen_q, max_seqlen_k = _validate(q, k, v, causal, scale, layout, cu_seqlens_q, cu_seqlens_k,
                                           max_seqlen_q, max_seqlen_k)
    deterministic = bool(deterministic) or torch.are_deterministic_algorithms_enabled()
    impl = resolve("attention", backend, q.device, _offset_reason(q, k, v, layout, cu_seqlens_q is not None),
                   call=(q,))
    if impl == "torch" or q.numel() == 0 or k.numel() == 0:
        return attention_ref(q, k, v, causal, scale, layout, cu_seqlens_q, cu_seqlens_k, return_lse)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if cu_seqlens_q is None:
        max_seqlen_q = max_seqlen_k = 0
    o, lse = _AttentionFunction.apply(q, k, v, bool(causal), scale, layout, cu_seqlens_q, cu_seqlens_k,
                                      max_seqlen_q, max_seqlen_k, deterministic,
                                      None if _launch is None else _launch.encode())
    return (o, lse) if return_lse else o


def scaled_dot_product_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
    *,
    backend: Optional[str] = "auto",
) -> Tensor:
    """Drop-in for ``torch.nn.functional.scaled_dot_product_attention`` ((B, H, S, D) layout).

    Served by :func:`attention` (``layout="bhsd"``) when it gives the same answer; everything
    else goes to PyTorch's SDPA, never to a wrong answer:

    - ``attn_mask`` (bool or float), ``dropout_p > 0``, inputs that are not 4-D, a value head
      dim different from the query's, or fewer kv heads without ``enable_gqa=True``;
    - ``is_causal=True`` with Sq != Sk: SDPA aligns that mask to the **top-left** corner
      (row i sees j <= i), :func:`attention` to the bottom-right, so those calls go to SDPA;
    - what the chosen backend cannot serve (float32 and odd head dims on ``"auto"``).

    ``backend`` (keyword only, not in SDPA's signature): ``"torch"`` always calls SDPA;
    ``"triton"`` raises if the Triton backend cannot run at all (CPU tensors without
    ``TRITON_INTERPRET=1``, or float32), and otherwise behaves as above.
    """
    sdpa = dict(attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale)
    if enable_gqa:
        sdpa["enable_gqa"] = True
    tensors = all(isinstance(t, Tensor) for t in (query, key, value))
    servable = (
        tensors and attn_mask is None and dropout_p == 0.0
        and query.dim() == 4 and key.dim() == 4 and value.dim() == 4
        and key.shape == value.shape and query.shape[-1] == key.shape[-1]
        and query.dtype == key.dtype == value.dtype and query.device == key.device == value.device
        and query.shape[0] == key.shape[0] and key.shape[1] > 0 and query.shape[1] % key.shape[1] == 0
        and (enable_gqa or query.shape[1] == key.shape[1])
        and not (is_causal and query.shape[2] != key.shape[2])
    )
    if not servable:
        return F.scaled_dot_product_attention(query, key, value, **sdpa)
    impl = resolve("attention", backend, query.device, call=(query,))
    if impl == "torch":
        return F.scaled_dot_product_attention(query, key, value, **sdpa)
    return attention(query, key, value, causal=is_causal, scale=scale, layout="bhsd", backend=impl)
