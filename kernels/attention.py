"""Flash attention in Triton: FlashAttention-2-style forward and backward.

Math, per (batch, query head h) and query row i, with kv head ``h // GROUP`` (GQA/MQA),
scale ``c`` (default ``1/sqrt(D)``) and visible keys ``j`` (all keys, or with ``causal``
``j <= i + Sk - Sq``: bottom-right aligned, as in FlashAttention >= 2.1)::

    s_ij = c * q_i . k_j
    lse_i = log(sum_j exp(s_ij))            (natural log; -inf for a row that sees no key)
    o_i  = sum_j exp(s_ij - lse_i) * v_j    (0 for a row that sees no key)

Forward (``_attn_fwd_kernel``): one program per (query block of BLOCK_M rows, batch*head),
looping over key blocks of BLOCK_N with the online softmax in fp32 and in base 2
(``exp2(s * c * log2(e) - m)``): running max ``m``, running sum ``l``, accumulator
``acc`` rescaled by ``exp2(m_old - m_new)``; at the end ``o = acc / l`` and
``lse = (m + log2(l)) * ln(2)``. Memory: O(S*D) — the S x S scores are never stored;
the only extra output is the fp32 ``lse [B, H, Sq]``.

Backward (``kernels/attention_bwd.py``; FlashAttention-2, split so that no atomics are needed
and the gradients are deterministic by construction):

1. ``_attn_bwd_preprocess_kernel``: ``delta_i = sum_d dO_id * O_id`` (fp32);
2. ``_attn_bwd_dkdv_kernel``: one program per (key block, batch * kv head) recomputes
   ``p_ij = exp2(s_ij * log2(e) - lse_i * log2(e))`` for every query block (and, for GQA,
   every query head of its group) and accumulates ``dv_j += p_ij dO_i`` and
   ``dk_j += c * p_ij (dp_ij - delta_i) q_i`` with ``dp_ij = dO_i . v_j``;
3. ``_attn_bwd_dq_kernel``: one program per (query block, batch * head) accumulates
   ``dq_i += c * p_ij (dp_ij - delta_i) k_j`` over key blocks.

The scores are recomputed twice in the backward (once per kernel) instead of the
atomic ``dq`` accumulation of FlashAttention-2: about 20% more FLOPs in exchange for
determinism and no fp32 ``dq`` scratch buffer.

Layouts: every tensor is addressed through (batch, head, sequence) strides with a unit
last-dim stride, so ``(B, S, H, D)``, ``(B, H, S, D)`` and strided views (q, k, v sliced
out of one packed qkv tensor) run without copies. Varlen (``VARLEN``): q/k/v are packed
``(total, H, D)`` and each program reads its sequence's start and length from
``cu_seqlens_q`` / ``cu_seqlens_k``; the grid covers ``max_seqlen_q``.

Head dims: any multiple of 8 in [16, 256]. Triton blocks are powers of two, so the head dim
is covered by a power-of-two block ``BLOCK_D`` plus, for D = 40 / 48 / 72 / 80, a 16-wide
remainder block ``BLOCK_DR`` (two dots per product: 40 = 32 + 16, 80 = 64 + 16), which pays
the MMA work of 48 / 48 / 80 / 80 instead of 64 / 64 / 128 / 128; the forward also splits
D = 88 / 96 as 64 + 32. Other cases take the next power of two with masked loads (no extra
memory traffic, but dot products on zeros): the backward of D = 96 pays for 128 (25% wasted),
D = 160 for 256 (38%) in both directions. The remainders that would avoid it (64 + 32 in the
backward, 128 + 32) need second accumulators that do not fit the 255-register limit on
sm_90 (``attention_configs.kernel_head_blocks``).

Lengths are arbitrary (rows and columns past the end are masked). Causal programs on a
GPU skip the key (query) blocks that their rows cannot see; under the interpreter the
loops run over every block with masks (loop bounds there must be host integers:
bounds derived from ``tl.program_id`` break Triton 3.6's interpreter).

Interpreter: ``DOT_F32`` (set by the launchers for bf16 under ``TRITON_INTERPRET=1``) upcasts
every loaded block to fp32 and runs the dots in fp32 (bf16 ``tl.dot`` is wrong in the
interpreter); on the GPU, and for fp16 in the interpreter too, the dots take bf16 / fp16
operands (tensor cores), with ``p`` and ``ds`` rounded to the input dtype before their dots,
as in FlashAttention. So the fp16 interpreter tests run the GPU's dot code path.

Launch configs live in ``kernels/attention_configs.py`` as data: per kernel one default rule and
one candidate list that ``kernels/autotune.py`` times on the GPU once per shape class;
``deterministic`` launches the default. Tests pass a ``LaunchOverride`` down the call (``launch=``).

TMA (Hopper): where ``tma_ok`` allows (sm_90+, not varlen, 16-byte aligned bases and strides),
the forward's candidates also read q, k and v through 4-D ``[B, H, S, D]`` tensor descriptors
(``TMA=True``): the tiles land in shared memory without passing through registers, rows past
``S`` and columns past ``D`` are zero-filled by the descriptor's bounds (so the split head-dim
blocks need no masks), and fewer registers are live, which affords 128 x 128 tiles. Scores
are masked as on the pointer path; outputs are stored with pointer stores. TMA tiles may also
split head dims that the pointer loads pad
(``TMA_SPLITS``: 96 = 64 + 32 in the backward, 160 = 128 + 32, 192 = 128 + 64), since the
descriptor bounds zero-fill the remainder. The backward kernels do the same for q, k, v and dO
(``kernels/attention_bwd.py``). The tuner keeps a TMA tile only where it is faster; the default
(and ``deterministic``) uses pointer loads.

What differs from FlashAttention: no dq atomics (see above), no head-dim padding of
the inputs (split blocks and masking instead), no dropout, no ALiBi / sliding window / softcap, and no
warp-specialized path.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from fastgen.kernels import autotune
from fastgen.kernels._common import device_guard, interpreting, round_to
from fastgen.kernels.attention_configs import (
    LaunchOverride,
    attention_fwd_candidates,
    host_bounds,
    launch_config,
    tune_key,
)

LOG2E = 1.4426950408889634


@triton.jit
def dot(a, b, DOT_F32: tl.constexpr):
    """a @ b with fp32 accumulation; fp32 operands in exact IEEE mode when DOT_F32."""
    if DOT_F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def masked_load(ptrs, mask, DOT_F32: tl.constexpr):
    """A masked block load, upcast to fp32 at once under the interpreter (DOT_F32)."""
    x = tl.load(ptrs, mask=mask, other=0.0)
    if DOT_F32:
        x = x.to(tl.float32)
    return x


@triton.jit
def desc_tile(desc, b, h, row, col, ROWS: tl.constexpr, COLS: tl.constexpr, DOT_F32: tl.constexpr):
    """The [ROWS, COLS] tile at (batch b, head h, row, col) of a 4-D [B, H, S, D] tensor descriptor:
    a TMA copy on Hopper; rows past S and columns past D read as 0 (the descriptor's bounds)."""
    x = desc.load([b, h, row, col]).reshape(ROWS, COLS)
    if DOT_F32:
        x = x.to(tl.float32)
    return x


@triton.jit
def block_and_head(S, BLOCK: tl.constexpr):
    """(block index along the sequence, batch * head index) of this program. Both live on grid
    axis 0 (blocks fastest, so the programs of one head run together): axes 1 and 2 stop at
    65,535 programs, which batch * heads passes (varlen: 4,096 sequences x 24 heads)."""
    pid = tl.program_id(0)
    n = tl.cdiv(S, BLOCK)
    return pid % n, pid // n


@triton.jit
def seq_bounds(CU, b, S, VARLEN: tl.constexpr):
    """(start offset in the packed token dim, length) of sequence ``b``."""
    if VARLEN:
        start = tl.load(CU + b).to(tl.int64)
        length = (tl.load(CU + b + 1).to(tl.int64) - start).to(tl.int32)
    else:
        start = (b * 0).to(tl.int64)  # a 0-d int64 tensor on every Triton version
        length = S
    return start, length


@triton.jit
def _attn_fwd_kernel(
    Q,  # [B, Sq, H, D] / [B, H, Sq, D] / [Tq, H, D] (varlen), strides (sqb, sqh, sqs, 1)
    K,  # like Q with HK heads and Sk keys, strides (skb, skh, sks, 1)
    V,  # like K, strides (svb, svh, svs, 1)
    O,  # like Q, q.dtype, strides (sob, soh, sos, 1)
    LSE,  # [B, H, Sq] (or [H, Tq] varlen) fp32 out, strides (slb, slh, 1)
    CU_Q,  # [B + 1] int32 cumulative query lengths (read only when VARLEN)
    CU_K,  # [B + 1] int32 cumulative key lengths (read only when VARLEN)
    QD,  # TMA: descriptor of Q as [B, H, Sq, D], block [1, 1, BLOCK_M, BLOCK_D]; else None
    KD,  # TMA: descriptor of K as [B, HK, Sk, D], block [1, 1, BLOCK_N, BLOCK_D]; else None
    VD,  # TMA: descriptor of V, like KD; else None
    QDR,  # TMA and BLOCK_DR > 0: Q's head-dim remainder blocks [1, 1, BLOCK_M, BLOCK_DR]; else None
    KDR,  # likewise for K, block [1, 1, BLOCK_N, BLOCK_DR]
    VDR,  # likewise for V
    sqb, sqh, sqs, skb, skh, sks, svb, svh, svs, sob, soh, sos, slb, slh,
    H,  # query heads
    GROUP,  # query heads per kv head (H // HK)
    Sq,  # query length (max_seqlen_q when VARLEN)
    Sk,  # key length (unused when VARLEN)
    D,  # head dim
    qk_scale,  # scale * log2(e)
    n_kv_blocks,  # cdiv(Sk or max_seqlen_k, BLOCK_N): the interpreter's loop bound
    CAUSAL: tl.constexpr,
    VARLEN: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,  # power-of-two block over the head dim (masked past D)
    BLOCK_DR: tl.constexpr,  # 0, or a second head-dim block at columns [BLOCK_D, BLOCK_D + BLOCK_DR)
    DOT_F32: tl.constexpr,
    INTERPRET: tl.constexpr,
    HOST_BOUNDS: tl.constexpr,  # loop over every block (host loop bounds): needed by the interpreter
    TMA: tl.constexpr,  # q / k / v tiles through the tensor descriptors (not with VARLEN)
):
    pid_m, bh = block_and_head(Sq, BLOCK_M)
    b = bh // H
    h = bh % H
    hk = h // GROUP
    q_start, seqlen_q = seq_bounds(CU_Q, b, Sq, VARLEN)
    k_start, seqlen_k = seq_bounds(CU_K, b, Sk, VARLEN)
    b64 = b.to(tl.int64)
    Q += b64 * sqb + h.to(tl.int64) * sqh + q_start * sqs
    K += b64 * skb + hk.to(tl.int64) * skh + k_start * sks
    V += b64 * svb + hk.to(tl.int64) * svh + k_start * svs
    O += b64 * sob + h.to(tl.int64) * soh + q_start * sos
    LSE += b64 * slb + h.to(tl.int64) * slh + q_start

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    dd = tl.arange(0, BLOCK_D)
    row_ok = rows < seqlen_q
    d_ok = dd < D
    if TMA:
        q = desc_tile(QD, b, h, pid_m * BLOCK_M, 0, BLOCK_M, BLOCK_D, DOT_F32)
    else:
        q = masked_load(Q + rows[:, None] * sqs + dd[None, :], row_ok[:, None] & d_ok[None, :], DOT_F32)
    if BLOCK_DR > 0:  # the head-dim remainder, e.g. D = 80 = 64 + 16
        dr = BLOCK_D + tl.arange(0, BLOCK_DR)
        dr_ok = dr < D
        if TMA:
            q_r = desc_tile(QDR, b, h, pid_m * BLOCK_M, BLOCK_D, BLOCK_M, BLOCK_DR, DOT_F32)
        else:
            q_r = masked_load(Q + rows[:, None] * sqs + dr[None, :], row_ok[:, None] & dr_ok[None, :], DOT_F32)
        acc_r = tl.zeros([BLOCK_M, BLOCK_DR], dtype=tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    diag = seqlen_k - seqlen_q  # key j is visible to row i iff j <= i + diag (causal)

    if HOST_BOUNDS:
        hi = n_kv_blocks
    else:
        hi_k = seqlen_k
        if CAUSAL:
            hi_k = tl.minimum(seqlen_k, (pid_m + 1) * BLOCK_M + diag)
        hi = tl.cdiv(tl.maximum(hi_k, 0), BLOCK_N)
    for nb in range(0, hi):
        kcols = nb * BLOCK_N + cols
        col_ok = kcols < seqlen_k
        if TMA:
            kt = tl.trans(desc_tile(KD, b, hk, nb * BLOCK_N, 0, BLOCK_N, BLOCK_D, DOT_F32))
        else:
            kt = masked_load(K + kcols[None, :] * sks + dd[:, None], col_ok[None, :] & d_ok[:, None], DOT_F32)
        s = dot(q, kt, DOT_F32)
        if BLOCK_DR > 0:
            if TMA:
                kt_r = tl.trans(desc_tile(KDR, b, hk, nb * BLOCK_N, BLOCK_D, BLOCK_N, BLOCK_DR, DOT_F32))
            else:
                kt_r = masked_load(K + kcols[None, :] * sks + dr[:, None], col_ok[None, :] & dr_ok[:, None], DOT_F32)
            s += dot(q_r, kt_r, DOT_F32)
        s = s * qk_scale
        ok = col_ok[None, :]
        if CAUSAL:
            ok = ok & (kcols[None, :] <= rows[:, None] + diag)
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if TMA:
            v = desc_tile(VD, b, hk, nb * BLOCK_N, 0, BLOCK_N, BLOCK_D, DOT_F32)
        else:
            v = masked_load(V + kcols[:, None] * svs + dd[None, :], col_ok[:, None] & d_ok[None, :], DOT_F32)
        acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, DOT_F32)
        if BLOCK_DR > 0:
            if TMA:
                v_r = desc_tile(VDR, b, hk, nb * BLOCK_N, BLOCK_D, BLOCK_N, BLOCK_DR, DOT_F32)
            else:
                v_r = masked_load(V + kcols[:, None] * svs + dr[None, :], col_ok[:, None] & dr_ok[None, :], DOT_F32)
            acc_r = acc_r * alpha[:, None] + dot(p.to(v_r.dtype), v_r, DOT_F32)
        m_i = m_new

    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    tl.store(LSE + rows, lse, mask=row_ok)
    tl.store(O + rows[:, None] * sos + dd[None, :], round_to(out, O.dtype.element_ty, INTERPRET),
             mask=row_ok[:, None] & d_ok[None, :])
    if BLOCK_DR > 0:
        out_r = acc_r / tl.where(empty, 1.0, l_i)[:, None]
        tl.store(O + rows[:, None] * sos + dr[None, :], round_to(out_r, O.dtype.element_ty, INTERPRET),
                 mask=row_ok[:, None] & dr_ok[None, :])


# ----------------------------------------------------------------------------- TMA


def tma_ok(q, k, v, layout: str, varlen: bool) -> bool:
    """Whether the forward may read q, k, v through TMA descriptors: a Hopper-class GPU (or the
    interpreter), not varlen, and the 16-byte alignment TMA needs (base pointers and the strides
    of every dim longer than 1). ``FASTGEN_TMA=0`` turns the TMA candidates off."""
    if varlen or os.environ.get("FASTGEN_TMA", "1") == "0":
        return False
    if not interpreting() and not (q.is_cuda and torch.cuda.get_device_capability(q.device)[0] >= 9):
        return False
    for t in (q, k, v):
        e = t.element_size()
        if t.data_ptr() % 16 or t.stride(-1) != 1:
            return False
        # A descriptor's strides must be positive multiples of 16 bytes: a broadcast (stride-0,
        # expanded) dim longer than 1 takes pointer loads.
        if any(st <= 0 or (st * e) % 16 for st, n in zip(t.stride()[:-1], t.shape[:-1]) if n > 1):
            return False
    return True


# cuTensorMapEncodeTiled's limits on a tile (the descriptor's box): at most 256 elements per
# dim, the inner dim a multiple of 16 bytes.
TMA_BOX_MAX = 256


def tma_box_ok(rows: int, cols: int, element_size: int) -> bool:
    """Whether a [rows, cols] tile of ``element_size``-byte elements is a legal TMA box. Every TMA
    candidate's q / k / v / do tiles are checked against it (tests/test_attention.py)."""
    return 0 < rows <= TMA_BOX_MAX and 0 < cols <= TMA_BOX_MAX and (cols * element_size) % 16 == 0


def tma_descriptor(t, layout: str, rows: int, col_block: int):
    """A 4-D [B, H, S, D] TMA descriptor of t (either layout) with block [1, 1, rows, col_block].
    The strides of length-1 dims are replaced by packed ones (any index into them is 0)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    if layout == "bshd":
        (B, S, H, D), (sb, ss, sh, _) = t.shape, t.stride()
    else:
        (B, H, S, D), (sb, sh, ss, _) = t.shape, t.stride()
    ss = ss if S > 1 else D
    sh = sh if H > 1 else S * ss
    sb = sb if B > 1 else H * sh
    return TensorDescriptor(t, [B, H, S, D], [sb, sh, ss, 1], [1, 1, rows, col_block])


def dots_in_f32(q: torch.Tensor) -> bool:
    """Upcast the dot operands to fp32: only for bf16 under the interpreter, whose bf16 dots are
    wrong. fp16 runs the GPU's code path there too (fp16 operands, p and ds rounded to fp16)."""
    return interpreting() and q.dtype != torch.float16


# ----------------------------------------------------------------------------- launchers


def bhs_strides(t: torch.Tensor, layout: str, varlen: bool) -> tuple[int, int, int]:
    """(batch, head, sequence) strides of t in ``layout`` (batch stride 0 when packed varlen)."""
    assert t.stride(-1) == 1 or t.shape[-1] <= 1
    if varlen:
        return 0, t.stride(1), t.stride(0)
    if layout == "bshd":
        return t.stride(0), t.stride(2), t.stride(1)
    return t.stride(0), t.stride(1), t.stride(2)


def call_dims(q, k, layout, varlen, cu_q, max_q, max_k):
    """(B, H, HK, Sq, Sk, D) of the call."""
    if varlen:
        return cu_q.numel() - 1, q.shape[1], k.shape[1], max_q, max_k, q.shape[2]
    if layout == "bshd":
        return q.shape[0], q.shape[2], k.shape[2], q.shape[1], k.shape[1], q.shape[3]
    return q.shape[0], q.shape[1], k.shape[1], q.shape[2], k.shape[2], q.shape[3]


def lse_shape(q, layout: str, varlen: bool) -> tuple[int, ...]:
    """Shape of the fp32 log-sum-exp: (B, H, Sq), or (H, total_q) for packed varlen input."""
    if varlen:
        return (q.shape[1], q.shape[0])
    if layout == "bshd":
        return (q.shape[0], q.shape[2], q.shape[1])
    return (q.shape[0], q.shape[1], q.shape[2])


def lse_strides(lse: torch.Tensor, varlen: bool) -> tuple[int, int]:
    return (0, lse.stride(0)) if varlen else (lse.stride(0), lse.stride(1))


@device_guard
def attention_fwd(q, k, v, causal, scale, layout="bshd", cu_q=None, cu_k=None, max_q=0, max_k=0,
                  deterministic=False, launch: Optional[LaunchOverride] = None):
    """o, lse = attention_fwd(q, k, v, causal, scale, layout, cu_seqlens_q, cu_seqlens_k, max_q, max_k).

    q [B, Sq, H, D] ("bshd") or [B, H, Sq, D] ("bhsd") or packed [Tq, H, D] with cu_q (varlen);
    k, v the same with HK heads (H % HK == 0) and Sk keys. o: contiguous, q's shape and dtype;
    lse: fp32 [B, H, Sq] (or [H, Tq] varlen), natural log. The launch config is autotuned on the
    GPU (kernels/autotune.py) unless ``deterministic`` (then the fixed default); ``launch``: a
    test's override (``kernels/attention_configs.py``).
    """
    varlen = cu_q is not None
    B, H, HK, Sq, Sk, D = call_dims(q, k, layout, varlen, cu_q, max_q, max_k)
    new = torch.zeros if varlen else torch.empty  # varlen: rows past cu_seqlens_q[-1] stay 0
    o = new(q.shape, dtype=q.dtype, device=q.device)
    lse = new(lse_shape(q, layout, varlen), dtype=torch.float32, device=q.device)
    if B == 0 or H == 0 or Sq == 0:
        return o, lse
    cu_q_arg = cu_q if varlen else lse
    cu_k_arg = cu_k if varlen else lse
    interp = interpreting()

    def run(cfg):
        nw, ns, tma = cfg.pop("num_warps"), cfg.pop("num_stages"), cfg.pop("TMA", False)
        descs = [None] * 6
        if tma:
            bm, bn, bd, br = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_D"], cfg["BLOCK_DR"]
            descs[:3] = [tma_descriptor(q, layout, bm, bd), tma_descriptor(k, layout, bn, bd),
                         tma_descriptor(v, layout, bn, bd)]
            if br:
                descs[3:] = [tma_descriptor(q, layout, bm, br), tma_descriptor(k, layout, bn, br),
                             tma_descriptor(v, layout, bn, br)]
        _attn_fwd_kernel[(triton.cdiv(Sq, cfg["BLOCK_M"]) * B * H,)](
            q, k, v, o, lse, cu_q_arg, cu_k_arg, *descs,
            *bhs_strides(q, layout, varlen), *bhs_strides(k, layout, varlen), *bhs_strides(v, layout, varlen),
            *bhs_strides(o, layout, varlen), *lse_strides(lse, varlen),
            H, H // HK, Sq, Sk, D, scale * LOG2E, triton.cdiv(Sk, cfg["BLOCK_N"]),
            CAUSAL=bool(causal), VARLEN=varlen, DOT_F32=dots_in_f32(q), INTERPRET=interp,
            HOST_BOUNDS=host_bounds(launch, interp), TMA=tma,
            num_warps=nw, num_stages=ns, **cfg,
        )

    tma = Sk > 0 and tma_ok(q, k, v, layout, varlen)
    # The default (pointer loads) first; with TMA possible, the tuner keeps a TMA tile only where
    # it is faster on this GPU. The interpreter and a test's override run one config.
    cfg = launch_config("fwd", D, tma, launch, interp)
    if cfg is None:
        key = tune_key("fwd", q, D, causal, varlen, H // HK, Sq, Sk, tma)
        cfg = autotune.pick(key, lambda: attention_fwd_candidates(D, tma), run, fixed=deterministic)
    run(cfg)
    return o, lse


# The helpers above without an underscore are shared with the backward (kernels/attention_bwd.py).
__all__ = ["attention_fwd", "lse_shape", "tma_ok", "tma_box_ok", "tma_descriptor", "LOG2E", "dot", "masked_load",
           "desc_tile", "block_and_head", "seq_bounds", "bhs_strides", "call_dims", "lse_strides", "dots_in_f32"]
