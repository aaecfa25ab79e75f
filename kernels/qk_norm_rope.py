"""Fused per-head RMSNorm of q and k followed by RoPE, in Triton (forward and backward).

For each head row ``x`` of ``D`` elements (q or k), with weight ``w (D,)`` (q's or
k's), in fp32 with one rounding at the store::

    rstd = 1 / sqrt(mean(x ** 2) + eps)
    n    = x * rstd * w                          (RMSNorm, as F.rms_norm in fp32)
    y    = rope(n)                               (kernels/rope.py: pairs (a, b) of the
                                                  first R dims rotated, the rest passed)

The normalized ``n`` is never rounded: this is the unfused pair
``apply_rope(rms_norm(x))`` without the intermediate rounding to x.dtype.

Backward, with ``xhat = x * rstd`` (rstd recomputed from x, not stored)::

    dn   = rope^T(dy)                            (the inverse rotation, exact transpose)
    g    = dn * w
    dx   = rstd * (g - xhat * mean(g * xhat))
    dw   = sum over tokens and heads of dn * xhat

The weight gradients are deterministic: backward program ``(p, hb)`` accumulates its
token tiles (p, p + G, p + 2G, ...) into its own fp32 partial row
``DW_PARTIAL[p, hb, :]``; the launcher sums the partials in a fixed order.

Shapes and tiling as in ``kernels/rope.py``: q ``(B, S, Hq, D)`` / k ``(B, S, Hk, D)``
("bshd") or ``(B, H, S, D)`` ("bhsd") with (batch, sequence, head) strides and a
contiguous last dim; one program holds BLOCK_S tokens x BLOCK_H heads x the whole
head dim (pairs + pass-through dims), so the row sums stay in registers. The backward's
warps give each thread 8 elements of every load of dy, x and dx (16 bytes in bf16 / fp16);
in the halves layout with R / 2 a power of two it reads a and b as one contiguous block of R
columns (JOINED), so a thread holds half the registers that two R / 2-wide loads would need.

Bytes per element (e: element size of q and k; per-row, per-column and per-sample terms omitted):

    fwd: read x (e); write out (e) = 2e
    bwd: read dout (e), x (e); write dx (e) = 3e

x is q or k (an element is one of q's or k's); rstd is recomputed in the backward (nothing per row is stored).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastgen.kernels._common import device_guard, interpreting, max_programs, round_to
from fastgen.ops._shapes import bsh_strides, rope_dims, table_strides
from fastgen.kernels.rope import _load_pairs, _load_tables, _store_pairs, tile_config
from fastgen.limits import MAX_HEAD_DIM

TARGET_TILE_FWD = 2048
# The backward keeps more live tiles (x, dy, their pairs, g, xhat). Chosen by ptxas on sm_90
# (tests/test_static_sm90.py): 1024 spilled for D=256, 2048 for D=128 with partial rotary.
TARGET_TILE_BWD = 1024
TARGET_TILE_BWD_WIDE = 2048  # D > 128


@triton.jit
def _load_pass(ptr, off, mask, R, D, BLOCK_P: tl.constexpr):
    p = tl.arange(0, BLOCK_P)[None, None, :]
    return tl.load(ptr + off + R + p, mask=mask & (p < D - R), other=0.0).to(tl.float32)


@triton.jit
def _store_pass(ptr, off, mask, v, R, D, BLOCK_P: tl.constexpr, INTERPRET: tl.constexpr):
    p = tl.arange(0, BLOCK_P)[None, None, :]
    tl.store(ptr + off + R + p, round_to(v, ptr.dtype.element_ty, INTERPRET), mask=mask & (p < D - R))


@triton.jit
def _load_rot(ptr, off, mask, R, A: tl.constexpr, B: tl.constexpr, HALF: tl.constexpr,
              INTERLEAVED: tl.constexpr, JOINED: tl.constexpr):
    """_load_pairs, or (JOINED: halves layout with R == 2 * HALF) one contiguous load of the
    2 * HALF rotated columns, split into a (the first HALF) and b (the second). The same values
    as _load_pairs; only the layout differs."""
    if JOINED:
        c = tl.arange(0, 2 * HALF)[None, None, :]
        v = tl.load(ptr + off + c, mask=mask & (c < R), other=0.0).to(tl.float32)
        a, b = tl.split(tl.permute(tl.reshape(v, (A, B, 2, HALF)), (0, 1, 3, 2)))
    else:
        a, b = _load_pairs(ptr, off, mask, R, A, B, HALF, INTERLEAVED)
    return a, b


@triton.jit
def _store_rot(ptr, off, mask, a, b, R, A: tl.constexpr, B: tl.constexpr, HALF: tl.constexpr,
               INTERLEAVED: tl.constexpr, JOINED: tl.constexpr, INTERPRET: tl.constexpr):
    """Store a, b where _load_rot read them, rounded to ptr's dtype."""
    if JOINED:
        c = tl.arange(0, 2 * HALF)[None, None, :]
        v = tl.reshape(tl.permute(tl.join(a, b), (0, 1, 3, 2)), (A, B, 2 * HALF))
        tl.store(ptr + off + c, round_to(v, ptr.dtype.element_ty, INTERPRET), mask=mask & (c < R))
    else:
        _store_pairs(ptr, off, mask, a, b, R, A, B, HALF, INTERLEAVED, INTERPRET)


@triton.jit
def _norm_rope_fwd_tile(X, W, Y, b, s, t_mask, h0, H, R, D, sxb, sxs, sxh, syb, sys, syh, eps, ca, cb, sa, sb,
                        HAS_PASS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_H: tl.constexpr,
                        HALF: tl.constexpr, BLOCK_P: tl.constexpr, INTERLEAVED: tl.constexpr,
                        INTERPRET: tl.constexpr):
    h = (h0 + tl.arange(0, BLOCK_H)).to(tl.int64)
    mask = t_mask[:, None, None] & (h < H)[None, :, None]
    x_off = (b * sxb + s * sxs)[:, None, None] + (h * sxh)[None, :, None]
    y_off = (b * syb + s * sys)[:, None, None] + (h * syh)[None, :, None]
    w_off = tl.zeros([1, 1, 1], dtype=tl.int64)
    w_mask = tl.full([1, 1, 1], 1, tl.int1)
    xa, xb = _load_pairs(X, x_off, mask, R, BLOCK_S, BLOCK_H, HALF, INTERLEAVED)
    wa, wb = _load_pairs(W, w_off, w_mask, R, 1, 1, HALF, INTERLEAVED)
    ss = tl.sum(xa * xa, axis=2) + tl.sum(xb * xb, axis=2)
    if HAS_PASS:
        xp = _load_pass(X, x_off, mask, R, D, BLOCK_P)
        ss += tl.sum(xp * xp, axis=2)
    rstd = tl.rsqrt(ss / D + eps)[:, :, None]
    na = xa * rstd * wa
    nb = xb * rstd * wb
    _store_pairs(Y, y_off, mask, na * ca - nb * sa, nb * cb + na * sb, R, BLOCK_S, BLOCK_H, HALF, INTERLEAVED,
                 INTERPRET)
    if HAS_PASS:
        wp = _load_pass(W, w_off, w_mask, R, D, BLOCK_P)
        _store_pass(Y, y_off, mask, xp * rstd * wp, R, D, BLOCK_P, INTERPRET)


@triton.jit
def _qk_norm_rope_fwd_kernel(
    Q,  # (B, S, Hq, D) / (B, Hq, S, D), strides (sqb, sqs, sqh), unit last stride
    K,  # same for k with Hk heads
    WQ,  # (D,) q norm weight, contiguous
    WK,  # (D,) k norm weight, contiguous
    QO,  # output q, strides (soqb, soqs, soqh)
    KO,  # output k, strides (sokb, soks, sokh)
    COS,  # (S, R) or (B, S, R), strides (scb, scs)
    SIN,  # same shape as COS, strides (ssb, sss)
    T, S, HQ, HK, R, D,
    sqb, sqs, sqh, skb, sks, skh,
    soqb, soqs, soqh, sokb, soks, sokh,
    scb, scs, ssb, sss,
    eps,
    n_q_hblocks,  # program_id(1) < n_q_hblocks: q, else k
    INTERLEAVED: tl.constexpr,
    HAS_PASS: tl.constexpr,  # D > R
    BLOCK_S: tl.constexpr,
    BLOCK_H: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_P: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    hb = tl.program_id(1)
    t = (tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)).to(tl.int64)
    t_mask = t < T
    b = t // S
    s = t % S
    ca, cb, sa, sb = _load_tables(COS, SIN, b, s, t_mask, R, scb, scs, ssb, sss, BLOCK_S, HALF, INTERLEAVED)
    if hb < n_q_hblocks:
        _norm_rope_fwd_tile(Q, WQ, QO, b, s, t_mask, hb * BLOCK_H, HQ, R, D, sqb, sqs, sqh, soqb, soqs, soqh, eps,
                            ca, cb, sa, sb, HAS_PASS, BLOCK_S, BLOCK_H, HALF, BLOCK_P, INTERLEAVED, INTERPRET)
    else:
        _norm_rope_fwd_tile(K, WK, KO, b, s, t_mask, (hb - n_q_hblocks) * BLOCK_H, HK, R, D, skb, sks, skh,
                            sokb, soks, sokh, eps, ca, cb, sa, sb, HAS_PASS, BLOCK_S, BLOCK_H, HALF, BLOCK_P,
                            INTERLEAVED, INTERPRET)


@triton.jit
def _norm_rope_bwd_loop(DY, X, W, DX, DWP, pid_t, num_t_programs, tiles_per_program, T, S, h0, H, R, D,
                        sdb, sds, sdh, sxb, sxs, sxh, sob, sos, soh, COS, SIN, scb, scs, ssb, sss, eps,
                        HAS_PASS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_H: tl.constexpr,
                        HALF: tl.constexpr, BLOCK_P: tl.constexpr, INTERLEAVED: tl.constexpr,
                        JOINED: tl.constexpr, INTERPRET: tl.constexpr):
    h = (h0 + tl.arange(0, BLOCK_H)).to(tl.int64)
    h_mask = (h < H)[None, :, None]
    w_off = tl.zeros([1, 1, 1], dtype=tl.int64)
    w_mask = tl.full([1, 1, 1], 1, tl.int1)
    wa, wb = _load_pairs(W, w_off, w_mask, R, 1, 1, HALF, INTERLEAVED)
    dwa = tl.zeros([1, 1, HALF], dtype=tl.float32)
    dwb = tl.zeros([1, 1, HALF], dtype=tl.float32)
    if HAS_PASS:
        wp = _load_pass(W, w_off, w_mask, R, D, BLOCK_P)
        dwp = tl.zeros([1, 1, BLOCK_P], dtype=tl.float32)
    for i in range(0, tiles_per_program):
        # Tiles past the last one (at most one per program) are fully masked.
        t = ((pid_t + i * num_t_programs) * BLOCK_S + tl.arange(0, BLOCK_S)).to(tl.int64)
        t_mask = t < T
        b = t // S
        s = t % S
        ca, cb, sa, sb = _load_tables(COS, SIN, b, s, t_mask, R, scb, scs, ssb, sss, BLOCK_S, HALF, INTERLEAVED)
        mask = t_mask[:, None, None] & h_mask
        d_off = (b * sdb + s * sds)[:, None, None] + (h * sdh)[None, :, None]
        x_off = (b * sxb + s * sxs)[:, None, None] + (h * sxh)[None, :, None]
        o_off = (b * sob + s * sos)[:, None, None] + (h * soh)[None, :, None]
        xa, xb = _load_rot(X, x_off, mask, R, BLOCK_S, BLOCK_H, HALF, INTERLEAVED, JOINED)
        ss = tl.sum(xa * xa, axis=2) + tl.sum(xb * xb, axis=2)
        if HAS_PASS:
            xp = _load_pass(X, x_off, mask, R, D, BLOCK_P)
            ss += tl.sum(xp * xp, axis=2)
        rstd = tl.rsqrt(ss / D + eps)[:, :, None]
        xa = xa * rstd  # xhat from here on
        xb = xb * rstd
        ya, yb = _load_rot(DY, d_off, mask, R, BLOCK_S, BLOCK_H, HALF, INTERLEAVED, JOINED)
        dna = ya * ca + yb * sb  # rope^T: the inverse rotation
        dnb = yb * cb - ya * sa
        dwa += tl.sum(tl.sum(dna * xa, axis=0, keep_dims=True), axis=1, keep_dims=True)
        dwb += tl.sum(tl.sum(dnb * xb, axis=0, keep_dims=True), axis=1, keep_dims=True)
        ga = dna * wa
        gb = dnb * wb
        dot = tl.sum(ga * xa, axis=2) + tl.sum(gb * xb, axis=2)
        if HAS_PASS:
            xp = xp * rstd
            dnp = _load_pass(DY, d_off, mask, R, D, BLOCK_P)
            dwp += tl.sum(tl.sum(dnp * xp, axis=0, keep_dims=True), axis=1, keep_dims=True)
            gp = dnp * wp
            dot += tl.sum(gp * xp, axis=2)
        c = (dot / D)[:, :, None]
        _store_rot(DX, o_off, mask, rstd * (ga - xa * c), rstd * (gb - xb * c), R, BLOCK_S, BLOCK_H, HALF,
                   INTERLEAVED, JOINED, INTERPRET)
        if HAS_PASS:
            _store_pass(DX, o_off, mask, rstd * (gp - xp * c), R, D, BLOCK_P, INTERPRET)
    _store_pairs(DWP, w_off, w_mask, dwa, dwb, R, 1, 1, HALF, INTERLEAVED, INTERPRET)
    if HAS_PASS:
        _store_pass(DWP, w_off, w_mask, dwp, R, D, BLOCK_P, INTERPRET)


@triton.jit
def _qk_norm_rope_bwd_kernel(
    DQO,  # gradient of q_out, strides (sdqb, sdqs, sdqh), unit last stride
    DKO,  # gradient of k_out, strides (sdkb, sdks, sdkh)
    Q,  # saved input q, strides (sqb, sqs, sqh)
    K,  # saved input k, strides (skb, sks, skh)
    WQ,  # (D,)
    WK,  # (D,)
    DQ,  # out: gradient of q, strides (soqb, soqs, soqh)
    DK,  # out: gradient of k, strides (sokb, soks, sokh)
    DW_PARTIAL,  # out: [num_t_programs, n_hblocks, D] fp32 per-program weight-gradient partials
    COS,
    SIN,
    T, S, HQ, HK, R, D,
    sdqb, sdqs, sdqh, sdkb, sdks, sdkh,
    sqb, sqs, sqh, skb, sks, skh,
    soqb, soqs, soqh, sokb, soks, sokh,
    scb, scs, ssb, sss,
    eps,
    n_q_hblocks,
    n_hblocks,  # grid[1]
    num_t_programs,  # grid[0]
    tiles_per_program,  # cdiv(cdiv(T, BLOCK_S), grid[0]), host-computed
    INTERLEAVED: tl.constexpr,
    HAS_PASS: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_H: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_P: tl.constexpr,
    JOINED: tl.constexpr,  # halves layout with R == 2 * HALF: a and b read as one contiguous block
    INTERPRET: tl.constexpr,
):
    pid_t = tl.program_id(0)
    hb = tl.program_id(1)
    dwp = DW_PARTIAL + (pid_t * n_hblocks + hb).to(tl.int64) * D
    if hb < n_q_hblocks:
        _norm_rope_bwd_loop(DQO, Q, WQ, DQ, dwp, pid_t, num_t_programs, tiles_per_program, T, S, hb * BLOCK_H, HQ,
                            R, D, sdqb, sdqs, sdqh, sqb, sqs, sqh, soqb, soqs, soqh, COS, SIN, scb, scs, ssb, sss,
                            eps, HAS_PASS, BLOCK_S, BLOCK_H, HALF, BLOCK_P, INTERLEAVED, JOINED, INTERPRET)
    else:
        _norm_rope_bwd_loop(DKO, K, WK, DK, dwp, pid_t, num_t_programs, tiles_per_program, T, S,
                            (hb - n_q_hblocks) * BLOCK_H, HK, R, D, sdkb, sdks, sdkh, skb, sks, skh, sokb, soks,
                            sokh, COS, SIN, scb, scs, ssb, sss, eps, HAS_PASS, BLOCK_S, BLOCK_H, HALF, BLOCK_P,
                            INTERLEAVED, JOINED, INTERPRET)


# ----------------------------------------------------------------------------- configs and launchers


def qk_norm_rope_fwd_config(T: int, hq: int, hk: int, D: int, R: int, interleaved: bool) -> dict:
    """Launch parameters of _qk_norm_rope_fwd_kernel (compiled by the static sm_90 test): 16-byte
    accesses to every rotated load (rope.tile_config)."""
    cfg = tile_config(T, hq, hk, D, R, TARGET_TILE_FWD, interleaved=interleaved)
    n_q = triton.cdiv(hq, cfg["BLOCK_H"])
    cfg["grid"] = (triton.cdiv(T, cfg["BLOCK_S"]), n_q + triton.cdiv(hk, cfg["BLOCK_H"]))
    cfg["n_q_hblocks"] = n_q
    return cfg


def qk_norm_rope_bwd_config(T: int, hq: int, hk: int, D: int, R: int, max_t_programs: int,
                            interleaved: bool) -> dict:
    """Launch parameters of _qk_norm_rope_bwd_kernel: grid (token programs, head blocks of q then k).

    16-byte accesses to every per-element load and store (rope.tile_config). The halves layout
    with R == 2 * HALF reads a and b as one 2 * HALF block (JOINED): the warps of the interleaved
    layout, half the registers per thread (the partial-rotary D=128 R=64 tile: 168 on sm_90 with
    2 warps; as two HALF-wide loads it needs 1 warp and 255).
    The interleaved layout with rotated rows of 128 columns or more (D = R = 128 / 256) runs half
    those warps, 16 elements (two 16-byte accesses) per thread per load: at 8 per thread ptxas
    spills 8-16 bytes in the code a contiguous launch compiles (tests/test_static_sm90.py, the
    launch specialization); at 16, 128 registers at D=128 and 96 at D=256, no spills."""
    joined = not interleaved and R == 2 * triton.next_power_of_2(R // 2)
    cfg = tile_config(T, hq, hk, D, R, TARGET_TILE_BWD if D <= 128 else TARGET_TILE_BWD_WIDE,
                      interleaved=interleaved or joined)
    cfg["JOINED"] = joined
    if interleaved and 2 * cfg["HALF"] >= 128:
        cfg["num_warps"] = max(1, cfg["num_warps"] // 2)
    n_q = triton.cdiv(hq, cfg["BLOCK_H"])
    n_hb = n_q + triton.cdiv(hk, cfg["BLOCK_H"])
    tiles = triton.cdiv(max(T, 1), cfg["BLOCK_S"])
    g = max(1, min(tiles, max(1, max_t_programs // n_hb)))
    cfg.update(grid=(g, n_hb), n_q_hblocks=n_q, n_hblocks=n_hb, num_t_programs=g,
               tiles_per_program=triton.cdiv(tiles, g))
    return cfg


@device_guard
def qk_norm_rope_fwd(q, k, wq, wk, cos, sin, eps: float, layout: str, interleaved: bool, *, q_out, k_out):
    """Launch the forward into q_out / k_out (allocated by ``fastgen.ops.qk_norm_rope``).

    q / k not empty, unit last stride; wq / wk (D,) contiguous; q_out / k_out of q's / k's shape."""
    B, S, hq, hk, D, R = rope_dims(q, k, cos, layout)
    T = B * S
    assert T > 0 and hq + hk > 0 and D > 0, "empty calls are answered by fastgen.ops.qk_norm_rope"
    assert q.stride(3) == 1 and k.stride(3) == 1 and wq.is_contiguous() and wk.is_contiguous()
    assert cos.stride(-1) == 1 and sin.stride(-1) == 1 and R % 2 == 0 and 2 <= R <= D <= MAX_HEAD_DIM
    cfg = qk_norm_rope_fwd_config(T, hq, hk, D, R, interleaved)
    grid = cfg.pop("grid")
    _qk_norm_rope_fwd_kernel[grid](
        q, k, wq, wk, q_out, k_out, cos, sin, T, S, hq, hk, R, D,
        *bsh_strides(q, layout), *bsh_strides(k, layout), *bsh_strides(q_out, layout), *bsh_strides(k_out, layout),
        *table_strides(cos), *table_strides(sin), eps,
        INTERLEAVED=interleaved, HAS_PASS=D > R, INTERPRET=interpreting(), **cfg,
    )


@device_guard
def qk_norm_rope_bwd(dqo, dko, q, k, wq, wk, cos, sin, eps: float, layout: str, interleaved: bool, *,
                     dq, dk, dwq, dwk):
    """Launch the backward into dq / dk (of q's / k's shape) and dwq / dwk ((D,) in the weights'
    dtypes), allocated by ``fastgen.ops.qk_norm_rope``. The weight gradients are fp32
    per-program partials summed in a fixed order (deterministic)."""
    B, S, hq, hk, D, R = rope_dims(q, k, cos, layout)
    T = B * S
    assert T > 0 and hq + hk > 0 and D > 0, "empty calls are answered by fastgen.ops.qk_norm_rope"
    assert dqo.stride(3) == 1 and dko.stride(3) == 1 and q.stride(3) == 1 and k.stride(3) == 1
    assert wq.is_contiguous() and wk.is_contiguous() and cos.stride(-1) == 1 and sin.stride(-1) == 1
    cfg = qk_norm_rope_bwd_config(T, hq, hk, D, R, max_programs(q.device, interpreted=2), interleaved)
    grid = cfg.pop("grid")
    n_q = cfg["n_q_hblocks"]
    partial = torch.empty((grid[0], grid[1], D), dtype=torch.float32, device=q.device)
    _qk_norm_rope_bwd_kernel[grid](
        dqo, dko, q, k, wq, wk, dq, dk, partial, cos, sin, T, S, hq, hk, R, D,
        *bsh_strides(dqo, layout), *bsh_strides(dko, layout), *bsh_strides(q, layout), *bsh_strides(k, layout),
        *bsh_strides(dq, layout), *bsh_strides(dk, layout), *table_strides(cos), *table_strides(sin), eps,
        INTERLEAVED=interleaved, HAS_PASS=D > R, INTERPRET=interpreting(), **cfg,
    )
    # Fixed-order sums of the per-program partials: the deterministic second pass.
    dwq.copy_(partial[:, :n_q].sum((0, 1)))
    dwk.copy_(partial[:, n_q:].sum((0, 1)))
