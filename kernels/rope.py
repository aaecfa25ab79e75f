"""Rotary position embeddings (RoPE) in Triton: q and k rotated in one launch.

Convention (diffusers' ``apply_rotary_emb(use_real=True)``): ``cos`` / ``sin`` are
tables of ``R`` entries per position, entry ``i`` being the cosine / sine of the
angle of the pair that contains dim ``i`` (so both members of a pair normally hold
the same value). The first ``R <= D`` dims of each head are rotated, dims
``R .. D-1`` pass through unchanged. A pair is ``(a, b)`` with

    interleaved=True   a = x[2j],  b = x[2j + 1]      (Flux, GPT-J; unbind_dim=-1)
    interleaved=False  a = x[j],   b = x[j + R/2]     (GPT-NeoX, Llama; unbind_dim=-2)

for ``j < R/2``, and with ``ca, sa`` the table entries at a's dim, ``cb, sb`` at b's::

    forward  a' = a * ca - b * sa          b' = b * cb + a * sb
    inverse  a' = a * ca + b * sb          b' = b * cb - a * sa

The inverse is the transpose of the forward map (the backward of RoPE: a rotation
by minus the angle), exact even for tables whose pair entries differ. Math in fp32,
one rounding at the store.

Shapes: ``q (B, S, Hq, D)`` and ``k (B, S, Hk, D)`` (layout "bshd"), or with ``S`` and
``H`` swapped ("bhsd"): the launcher passes (batch, sequence, head) strides, so any
strides work as long as the last dim is contiguous (q, k, v may be views of one
fused qkv projection). ``cos`` / ``sin`` are ``(S, R)`` or ``(B, S, R)`` (batch
stride 0 for a shared table), last dim contiguous, any float dtype.

One program owns a tile of BLOCK_S tokens x BLOCK_H heads of q or of k; the cos /
sin rows of its tokens are loaded once and broadcast over the heads. Grid:
``(cdiv(B*S, BLOCK_S), cdiv(Hq, BLOCK_H) + cdiv(Hk, BLOCK_H))``: the second axis
walks q's head blocks, then k's.

Bytes per element (e: element size of q and k; per-row, per-column and per-sample terms omitted):

    fwd: read x (e); write out (e) = 2e
    bwd: read dout (e); write dx (e) = 2e

x is q or k (an element is one of q's or k's). The fp32 cos / sin rows of a token block are read
once for all its heads.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastgen.kernels._common import device_guard, interpreting, round_to
from fastgen.ops._shapes import bsh_strides, rope_dims, table_strides
from fastgen.limits import MAX_HEAD_DIM  # widest head the kernels hold in registers

# Elements of one tensor's tile (tokens x heads x padded head dim) per program:
# about 8 per thread of each live tile (tests/test_static_sm90.py checks no spills).
TARGET_TILE = 2048


# ----------------------------------------------------------------------------- device helpers


@triton.jit
def _load_pairs(ptr, off, mask, R, A: tl.constexpr, B: tl.constexpr, HALF: tl.constexpr, INTERLEAVED: tl.constexpr):
    """(a, b) fp32 [A, B, HALF]: the pair members of the rows at ``ptr + off`` (off [A, B, 1])."""
    if INTERLEAVED:
        c = tl.arange(0, 2 * HALF)[None, None, :]
        v = tl.load(ptr + off + c, mask=mask & (c < R), other=0.0).to(tl.float32)
        a, b = tl.split(tl.reshape(v, (A, B, HALF, 2)))
    else:
        j = tl.arange(0, HALF)[None, None, :]
        m = mask & (j < R // 2)
        a = tl.load(ptr + off + j, mask=m, other=0.0).to(tl.float32)
        b = tl.load(ptr + off + j + R // 2, mask=m, other=0.0).to(tl.float32)
    return a, b


@triton.jit
def _store_pairs(ptr, off, mask, a, b, R, A: tl.constexpr, B: tl.constexpr, HALF: tl.constexpr,
                 INTERLEAVED: tl.constexpr, INTERPRET: tl.constexpr):
    """Store fp32 pair members a, b [A, B, HALF] where _load_pairs read them, rounded to ptr's dtype."""
    if INTERLEAVED:
        c = tl.arange(0, 2 * HALF)[None, None, :]
        v = tl.reshape(tl.join(a, b), (A, B, 2 * HALF))
        tl.store(ptr + off + c, round_to(v, ptr.dtype.element_ty, INTERPRET), mask=mask & (c < R))
    else:
        j = tl.arange(0, HALF)[None, None, :]
        m = mask & (j < R // 2)
        tl.store(ptr + off + j, round_to(a, ptr.dtype.element_ty, INTERPRET), mask=m)
        tl.store(ptr + off + j + R // 2, round_to(b, ptr.dtype.element_ty, INTERPRET), mask=m)


@triton.jit
def _load_tables(COS, SIN, b, s, t_mask, R, stride_cb, stride_cs, stride_sb, stride_ss,
                 BLOCK_S: tl.constexpr, HALF: tl.constexpr, INTERLEAVED: tl.constexpr):
    """cos / sin pair entries (ca, cb, sa, sb), fp32 [BLOCK_S, 1, HALF], of the tokens (b, s)."""
    m = t_mask[:, None, None]
    c_off = (b * stride_cb + s * stride_cs)[:, None, None]
    s_off = (b * stride_sb + s * stride_ss)[:, None, None]
    ca, cb = _load_pairs(COS, c_off, m, R, BLOCK_S, 1, HALF, INTERLEAVED)
    sa, sb = _load_pairs(SIN, s_off, m, R, BLOCK_S, 1, HALF, INTERLEAVED)
    return ca, cb, sa, sb


@triton.jit
def _rope_tile(X, Y, b, s, t_mask, h0, H, R, D, sxb, sxs, sxh, syb, sys, syh, ca, cb, sa, sb,
               COPY_PASS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_H: tl.constexpr, HALF: tl.constexpr,
               BLOCK_P: tl.constexpr, INTERLEAVED: tl.constexpr, INTERPRET: tl.constexpr):
    h = (h0 + tl.arange(0, BLOCK_H)).to(tl.int64)
    mask = t_mask[:, None, None] & (h < H)[None, :, None]
    x_off = (b * sxb + s * sxs)[:, None, None] + (h * sxh)[None, :, None]
    y_off = (b * syb + s * sys)[:, None, None] + (h * syh)[None, :, None]
    xa, xb = _load_pairs(X, x_off, mask, R, BLOCK_S, BLOCK_H, HALF, INTERLEAVED)
    ya = xa * ca - xb * sa
    yb = xb * cb + xa * sb
    _store_pairs(Y, y_off, mask, ya, yb, R, BLOCK_S, BLOCK_H, HALF, INTERLEAVED, INTERPRET)
    if COPY_PASS:  # dims R .. D-1 pass through (skipped in place: they are already there)
        p = tl.arange(0, BLOCK_P)[None, None, :]
        pm = mask & (p < D - R)
        v = tl.load(X + x_off + R + p, mask=pm, other=0.0).to(tl.float32)
        tl.store(Y + y_off + R + p, round_to(v, Y.dtype.element_ty, INTERPRET), mask=pm)


@triton.jit
def _rope_kernel(
    Q,  # (B, S, Hq, D) or (B, Hq, S, D) input q, strides (sqb, sqs, sqh), unit last stride
    K,  # same for k with Hk heads, strides (skb, sks, skh)
    QO,  # output q (may be Q itself: in place), strides (soqb, soqs, soqh)
    KO,  # output k (may be K itself), strides (sokb, soks, sokh)
    COS,  # (S, R) or (B, S, R) table, strides (scb, scs), scb = 0 for a shared table
    SIN,  # same shape as COS, strides (ssb, sss)
    T,  # B * S tokens
    S,
    HQ,
    HK,
    R,  # rotary dims (even, <= D)
    D,  # head dim
    sqb, sqs, sqh, skb, sks, skh,
    soqb, soqs, soqh, sokb, soks, sokh,
    scb, scs, ssb, sss,
    n_q_hblocks,  # cdiv(HQ, BLOCK_H): program_id(1) below this is q, else k
    INVERSE: tl.constexpr,  # rotate by minus the angle (the backward)
    INTERLEAVED: tl.constexpr,
    COPY_PASS: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_H: tl.constexpr,
    HALF: tl.constexpr,  # next_power_of_2(R // 2)
    BLOCK_P: tl.constexpr,  # next_power_of_2(D - R), 1 when D == R
    INTERPRET: tl.constexpr,
):
    hb = tl.program_id(1)
    t = (tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)).to(tl.int64)
    t_mask = t < T
    b = t // S
    s = t % S
    ca, cb, sa, sb = _load_tables(COS, SIN, b, s, t_mask, R, scb, scs, ssb, sss, BLOCK_S, HALF, INTERLEAVED)
    if INVERSE:  # transpose of the forward map: a' = a ca + b sb, b' = b cb - a sa
        sa, sb = -sb, -sa
    if hb < n_q_hblocks:
        _rope_tile(Q, QO, b, s, t_mask, hb * BLOCK_H, HQ, R, D, sqb, sqs, sqh, soqb, soqs, soqh, ca, cb, sa, sb,
                   COPY_PASS, BLOCK_S, BLOCK_H, HALF, BLOCK_P, INTERLEAVED, INTERPRET)
    else:
        _rope_tile(K, KO, b, s, t_mask, (hb - n_q_hblocks) * BLOCK_H, HK, R, D, skb, sks, skh, sokb, soks, sokh,
                   ca, cb, sa, sb, COPY_PASS, BLOCK_S, BLOCK_H, HALF, BLOCK_P, INTERLEAVED, INTERPRET)


# ----------------------------------------------------------------------------- launch configs


def pick_block_h(hq: int, hk: int, cap: int) -> int:
    """Largest power of two <= cap whose head padding costs at most 25 % over (hq + hk)."""
    best, p = 1, 1
    while p <= cap:
        if triton.cdiv(hq, p) * p + triton.cdiv(hk, p) * p <= 1.25 * (hq + hk):
            best = p
        p *= 2
    return best


def tile_config(T: int, hq: int, hk: int, D: int, R: int, target: int = TARGET_TILE, *,
                interleaved: bool) -> dict:
    """BLOCK_S, BLOCK_H, HALF, BLOCK_P and num_warps for a (tokens x heads x head dim) tile.

    The tile holds about ``target`` elements of a row of ``2 * HALF + BLOCK_P`` columns. The
    warps give each thread 8 elements of every rotated load, one
    16-byte access of bf16 / fp16: a load spans ``2 * HALF`` columns in the interleaved layout
    but only ``HALF`` in the halves layout (a and b are two loads), so the halves layout runs half
    the warps on the same tile.
    """
    half = triton.next_power_of_2(R // 2)
    block_p = triton.next_power_of_2(D - R) if D > R else 1
    row = 2 * half + (block_p if D > R else 0)
    block_h = pick_block_h(hq, hk, max(1, target // row))
    room = max(1, target // (row * block_h))
    block_s = min(1 << (room.bit_length() - 1), triton.next_power_of_2(max(T, 1)))  # powers of two
    load = 2 * half if interleaved else half  # columns per rotated load of a thread-row
    num_warps = max(1, min(32, block_s * block_h * load // 256))
    return dict(BLOCK_S=block_s, BLOCK_H=block_h, HALF=half, BLOCK_P=block_p, num_warps=num_warps)


def rope_config(T: int, hq: int, hk: int, D: int, R: int, interleaved: bool) -> dict:
    """Launch parameters of _rope_kernel (the static sm_90 test compiles exactly these)."""
    cfg = tile_config(T, hq, hk, D, R, interleaved=interleaved)
    n_q = triton.cdiv(hq, cfg["BLOCK_H"])
    cfg["grid"] = (triton.cdiv(T, cfg["BLOCK_S"]), n_q + triton.cdiv(hk, cfg["BLOCK_H"]))
    cfg["n_q_hblocks"] = n_q
    return cfg


# ----------------------------------------------------------------------------- launchers


@device_guard
def _launch(q, k, cos, sin, qo, ko, layout, interleaved, inverse):
    B, S, hq, hk, D, R = rope_dims(q, k, cos, layout)
    T = B * S
    assert T > 0 and hq + hk > 0 and D > 0, "empty calls are answered by fastgen.ops.rope"
    assert q.stride(3) == 1 and k.stride(3) == 1 and qo.stride(3) == 1 and ko.stride(3) == 1
    assert cos.stride(-1) == 1 and sin.stride(-1) == 1 and R % 2 == 0 and 2 <= R <= D <= MAX_HEAD_DIM
    cfg = rope_config(T, hq, hk, D, R, interleaved)
    grid = cfg.pop("grid")
    _rope_kernel[grid](
        q, k, qo, ko, cos, sin, T, S, hq, hk, R, D,
        *bsh_strides(q, layout), *bsh_strides(k, layout), *bsh_strides(qo, layout), *bsh_strides(ko, layout),
        *table_strides(cos), *table_strides(sin),
        INVERSE=inverse, INTERLEAVED=interleaved, COPY_PASS=(D > R and (qo is not q or ko is not k)),
        INTERPRET=interpreting(), **cfg,
    )


def apply_rope_fwd(q, k, cos, sin, layout: str, interleaved: bool, *, q_out, k_out):
    """Rotate q and k into q_out and k_out (allocated by ``fastgen.ops.rope``; q_out is q and
    k_out is k in place).

    q (B, S, Hq, D) / k (B, S, Hk, D) ("bshd") or (B, H, S, D) ("bhsd"), unit last stride,
    not empty; cos / sin (S, R) or (B, S, R); q_out / k_out of q's / k's shape, unit last stride.
    """
    _launch(q, k, cos, sin, q_out, k_out, layout, interleaved, inverse=False)


def apply_rope_bwd(dq_out, dk_out, cos, sin, layout: str, interleaved: bool, *, dq, dk):
    """The inverse rotation (transpose of the forward map) of dq_out / dk_out into dq / dk
    (allocated by ``fastgen.ops.rope``)."""
    _launch(dq_out, dk_out, cos, sin, dq, dk, layout, interleaved, inverse=True)
