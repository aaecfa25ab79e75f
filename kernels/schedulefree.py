"""Multi-tensor schedule-free AdamW step in Triton (``fastgen.optim.FusedAdamWScheduleFree``).

Per element, in fp32, with this step's scalars read from the device (``SCALARS`` = fp32
``[bc2, c, y_coef, lr]``: ``bc2 = 1 - beta2^(k+1)``, ``c`` the averaging weight, ``y_coef =
lr (beta1 (1 - c) - 1)``, ``lr`` the scheduled learning rate; computed on the device by
``fastgen.optim.schedulefree.advance_schedule``, so a captured step replays with each
step's own schedule)::

    v = beta2 * v + (1 - beta2) * g^2
    u = g / (sqrt(v / bc2) + eps) + weight_decay * y
    y = lerp(y, z, c) + y_coef * u
    z = z - lr * u

``y`` (the parameter), ``z`` and ``v`` are stored in the parameter's dtype, as the
``schedulefree`` package keeps them.

Bytes per element (e: element size of the parameter; per-row, per-column and per-sample terms omitted):

    step: read y (e), g (e), z (e), v (e); write y (e), z (e), v (e) = 7e

z and v are in the parameter's dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastgen.kernels._common import device_guard, interpreting, round_to
from fastgen.kernels.adamw import _lerp
from fastgen.kernels.multi_tensor import TL_DTYPES, block_ptr, chunk, chunk_table, ld, pointer_table, split_aligned, st

BLOCK = 2048


@triton.jit
def _schedulefree_kernel(
    Y_PTRS,  # [T] int64 addresses of the parameters y (P_DTYPE)
    G_PTRS,  # [T] int64 addresses of the gradients (G_DTYPE)
    Z_PTRS,  # [T] int64 addresses of z (P_DTYPE)
    V_PTRS,  # [T] int64 addresses of exp_avg_sq (P_DTYPE)
    NUMELS,  # [T] int64
    CHUNK_IDS,  # [C] int32
    CHUNK_OFFS,  # [C] int64
    SCALARS,  # [4] fp32 device tensor: 1 - beta2^(k+1), the averaging weight c, lr (beta1 (1 - c) - 1), lr
    beta2,
    eps,
    weight_decay,
    P_DTYPE: tl.constexpr,
    G_DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
    INTERPRET: tl.constexpr,
    ALIGNED: tl.constexpr = False,  # every base in the tables is 16-byte aligned
):
    t, offs, mask = chunk(CHUNK_IDS, CHUNK_OFFS, NUMELS, BLOCK)
    bias_correction2 = tl.load(SCALARS)
    ckp1 = tl.load(SCALARS + 1)
    y_coef = tl.load(SCALARS + 2)
    lr = tl.load(SCALARS + 3)
    if tl.load(CHUNK_OFFS + tl.program_id(0)) + BLOCK <= tl.load(NUMELS + t):
        _schedulefree_body(Y_PTRS, G_PTRS, Z_PTRS, V_PTRS, t, offs, mask, beta2, bias_correction2, eps, weight_decay,
                           ckp1, y_coef, lr, P_DTYPE, G_DTYPE, INTERPRET, ALIGNED, False)
    else:
        _schedulefree_body(Y_PTRS, G_PTRS, Z_PTRS, V_PTRS, t, offs, mask, beta2, bias_correction2, eps, weight_decay,
                           ckp1, y_coef, lr, P_DTYPE, G_DTYPE, INTERPRET, ALIGNED, True)


@triton.jit
def _schedulefree_body(Y_PTRS, G_PTRS, Z_PTRS, V_PTRS, t, offs, mask, beta2, bias_correction2, eps, weight_decay,
                       ckp1, y_coef, lr, P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, INTERPRET: tl.constexpr,
                       ALIGNED: tl.constexpr, MASKED: tl.constexpr):
    y_ptr = block_ptr(Y_PTRS, t, P_DTYPE, offs, ALIGNED)
    z_ptr = block_ptr(Z_PTRS, t, P_DTYPE, offs, ALIGNED)
    v_ptr = block_ptr(V_PTRS, t, P_DTYPE, offs, ALIGNED)
    g = ld(block_ptr(G_PTRS, t, G_DTYPE, offs, ALIGNED), mask, MASKED).to(tl.float32)
    y = ld(y_ptr, mask, MASKED).to(tl.float32)
    z = ld(z_ptr, mask, MASKED).to(tl.float32)
    v = ld(v_ptr, mask, MASKED).to(tl.float32)
    v = v * beta2 + (1.0 - beta2) * (g * g)
    v = round_to(v, P_DTYPE, INTERPRET).to(tl.float32)  # the package's v is stored before it is used
    u = tl.math.div_rn(g, tl.math.sqrt_rn(tl.math.div_rn(v, bias_correction2)) + eps)
    u = u + weight_decay * y
    y = _lerp(y, z, ckp1) + y_coef * u
    z = z - lr * u
    st(v_ptr, round_to(v, P_DTYPE, INTERPRET), mask, MASKED)
    st(y_ptr, round_to(y, P_DTYPE, INTERPRET), mask, MASKED)
    st(z_ptr, round_to(z, P_DTYPE, INTERPRET), mask, MASKED)


def schedulefree_config() -> dict:
    """Launch parameters of _schedulefree_kernel (the static tests compile these)."""
    return dict(BLOCK=BLOCK, num_warps=8)


@device_guard
def schedulefree_step(ys, grads, zs, vs, *, scalars, beta2, eps, weight_decay):
    """One schedule-free step over lists (parameters, z and v of one dtype, gradients of one dtype,
    one device, contiguous), one launch per alignment class. ``scalars``: fp32 [4] tensor on the
    lists' device, ``[1 - beta2^(k+1), c, lr (beta1 (1 - c) - 1), lr]`` of this step."""
    if scalars.dtype != torch.float32 or scalars.numel() != 4 or scalars.device != ys[0].device:
        raise ValueError(f"schedulefree_step: scalars must be 4 fp32 values on {ys[0].device}, got {scalars.dtype} "
                         f"{tuple(scalars.shape)} on {scalars.device}")
    cfg = schedulefree_config()
    for aligned, (y, g, z, v) in split_aligned(ys, grads, zs, vs):
        table = chunk_table(y, cfg["BLOCK"])
        _schedulefree_kernel[(table.num_chunks,)](
            pointer_table(y), pointer_table(g), pointer_table(z), pointer_table(v),
            table.numels, table.chunk_ids, table.chunk_offs, scalars,
            float(beta2), float(eps), float(weight_decay),
            P_DTYPE=TL_DTYPES[y[0].dtype], G_DTYPE=TL_DTYPES[g[0].dtype], INTERPRET=interpreting(), ALIGNED=aligned,
            **cfg,
        )
