"""Multi-tensor AdamW in Triton: one launch updates every parameter of one dtype combination.

Per element, in fp32 (``torch.optim.AdamW``'s update, decoupled weight decay)::

    g     = -grad if maximize else grad
    p     = p * (1 - lr * weight_decay)
    m     = lerp(m, g, 1 - beta1)                         (evaluated as torch.lerp)
    v     = beta2 * v + (1 - beta2) * g * g
    vmax  = max(vmax, v)                                  (amsgrad only; v := vmax below)
    p     = p - lr / (1 - beta1**t) * m / (sqrt(v) / sqrt(1 - beta2**t) + eps)

``t`` is each parameter's own step count, read from its fp32 ``step`` tensor (already
incremented for this step), and ``lr`` may be a device tensor: no host sync, so a step
can be captured in a CUDA graph. Parameters and states are stored in their own dtypes
(states fp32 or bf16) with one rounding per store; ``STOCHASTIC`` rounds bf16
parameters stochastically (add 16 random bits below the bf16 mantissa, truncate), which
keeps tiny updates from vanishing in expectation.

The one-pass step (``CLIP``, ``EMA``): ``g = coef * grad`` with the global clip coefficient
read on the device, and after the store ``shadow = shadow + w (p - shadow)`` from the stored
parameter.

Division and square roots are ``tl.math.div_rn`` / ``tl.math.sqrt_rn`` (IEEE round to
nearest, in Triton 3.6 and 3.9 alike): compiled Triton's ``/`` and ``sqrt`` are approximate
and flush denormals, and the step is memory-bound, so exactness costs nothing.

Bytes per element (e: element size of the parameter; per-row, per-column and per-sample terms omitted):

    step: read p (e), g (e), m (4), v (4); write p (e), m (4), v (4) = 3e + 16
    step amsgrad: read p (e), g (e), m (4), v (4), vmax (4); write p (e), m (4), v (4), vmax (4) = 3e + 24
    step clip+ema: read p (e), g (e), m (4), v (4), shadow (4); write p (e), m (4), v (4), shadow (4) = 3e + 24

States and the EMA shadow are fp32. The one-pass step also needs the clip's norm pass over g
(``kernels/clip_grad.py``, sum_squares).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from fastgen.kernels._common import device_guard, interpreting, round_to
from fastgen.kernels.multi_tensor import (TL_DTYPES, block_ptr, chunk, chunk_table, ld, pointer_table, split_aligned,
                                          st, tensor_ptr)

BLOCK = 2048  # elements per program (8 per thread at 8 warps)


@triton.jit
def _stochastic_bf16(x, seed, offs):
    """fp32 -> bf16, rounding up with probability equal to the dropped fraction."""
    bits = x.to(tl.uint32, bitcast=True)
    noise = tl.randint(seed, offs) & 0xFFFF
    return ((bits + noise) & 0xFFFF0000).to(tl.float32, bitcast=True).to(tl.bfloat16)


@triton.jit
def _one_minus_pow(t, ln_beta):
    """``1 - beta**t = -expm1(t ln beta)`` to float32 precision. ``1 - exp(x)`` would lose the
    leading digits of a small ``1 - beta**t`` (3e-5 relative at t = 1, beta = 0.999); Kahan's
    ``expm1(x) = (u - 1) x / log(u)``, ``u = exp(x)``, keeps them (``u - 1`` is exact where
    ``u`` is near 1; below 0.5 there is no cancellation to fix). ``beta = 0``: ``ln_beta = -inf``."""
    x = t * ln_beta
    u = tl.exp(x)
    em1 = tl.where(u == 1.0, x, tl.math.div_rn((u - 1.0) * x, tl.log(u)))
    return -tl.where(u < 0.5, u - 1.0, em1)


@triton.jit
def _lerp(a, b, w):
    """``torch.lerp(a, b, w)`` as PyTorch evaluates it: ``a + w (b - a)`` for ``w < 0.5``, else
    ``b - (b - a)(1 - w)`` (exact at ``w = 1``; matters for beta1 <= 0.5)."""
    return tl.where(w < 0.5, a + w * (b - a), b - (b - a) * (1.0 - w))


@triton.jit
def _adamw_kernel(
    P_PTRS,  # [T] int64 addresses of the parameters (P_DTYPE)
    G_PTRS,  # [T] int64 addresses of the gradients (G_DTYPE)
    M_PTRS,  # [T] int64 addresses of exp_avg (S_DTYPE)
    V_PTRS,  # [T] int64 addresses of exp_avg_sq (S_DTYPE)
    VMAX_PTRS,  # [T] int64 addresses of max_exp_avg_sq (S_DTYPE; read iff AMSGRAD)
    STEP_PTRS,  # [T] int64 addresses of the fp32 step counts (0-d tensors)
    NUMELS,  # [T] int64
    CHUNK_IDS,  # [C] int32 tensor of each program
    CHUNK_OFFS,  # [C] int64 first element of each program
    LR,  # fp32 scalar, or pointer to an fp32 device scalar when LR_IS_PTR
    beta1,
    beta2,
    ln_beta1,
    ln_beta2,
    eps,
    weight_decay,
    seed,  # stochastic-rounding seed of this step
    COEF,  # [1] fp32 device scalar: the gradient clip coefficient (read iff CLIP)
    SH_PTRS,  # [T] int64 addresses of the EMA shadows (SH_DTYPE; read and written iff EMA)
    ema_weight,  # 1 - EMA decay
    P_DTYPE: tl.constexpr,
    G_DTYPE: tl.constexpr,
    S_DTYPE: tl.constexpr,
    LR_IS_PTR: tl.constexpr,
    AMSGRAD: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    STOCHASTIC: tl.constexpr,
    CLIP: tl.constexpr,
    EMA: tl.constexpr,
    SH_DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
    INTERPRET: tl.constexpr,
    ALIGNED: tl.constexpr = False,  # every per-element base in the tables is 16-byte aligned
):
    t, offs, mask = chunk(CHUNK_IDS, CHUNK_OFFS, NUMELS, BLOCK)
    step = tl.load(tensor_ptr(STEP_PTRS, t, tl.float32))
    if LR_IS_PTR:
        lr = tl.load(LR)
    else:
        lr = LR
    bias1 = _one_minus_pow(step, ln_beta1)
    bias2_sqrt = tl.math.sqrt_rn(_one_minus_pow(step, ln_beta2))
    if CLIP:
        coef = tl.load(COEF)
    else:
        coef = 1.0
    # Full chunks load and store unmasked (16-byte accesses when ALIGNED); a tensor's last chunk masked.
    if tl.load(CHUNK_OFFS + tl.program_id(0)) + BLOCK <= tl.load(NUMELS + t):
        _adamw_body(P_PTRS, G_PTRS, M_PTRS, V_PTRS, VMAX_PTRS, SH_PTRS, t, offs, mask, lr, bias1, bias2_sqrt, coef,
                    beta1, beta2, eps, weight_decay, seed, ema_weight, P_DTYPE, G_DTYPE, S_DTYPE, AMSGRAD, MAXIMIZE,
                    STOCHASTIC, CLIP, EMA, SH_DTYPE, INTERPRET, ALIGNED, False)
    else:
        _adamw_body(P_PTRS, G_PTRS, M_PTRS, V_PTRS, VMAX_PTRS, SH_PTRS, t, offs, mask, lr, bias1, bias2_sqrt, coef,
                    beta1, beta2, eps, weight_decay, seed, ema_weight, P_DTYPE, G_DTYPE, S_DTYPE, AMSGRAD, MAXIMIZE,
                    STOCHASTIC, CLIP, EMA, SH_DTYPE, INTERPRET, ALIGNED, True)


@triton.jit
def _adamw_body(P_PTRS, G_PTRS, M_PTRS, V_PTRS, VMAX_PTRS, SH_PTRS, t, offs, mask, lr, bias1, bias2_sqrt, coef,
                beta1, beta2, eps, weight_decay, seed, ema_weight, P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr,
                S_DTYPE: tl.constexpr, AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr, STOCHASTIC: tl.constexpr,
                CLIP: tl.constexpr, EMA: tl.constexpr, SH_DTYPE: tl.constexpr, INTERPRET: tl.constexpr,
                ALIGNED: tl.constexpr, MASKED: tl.constexpr):
    """The per-element update of one chunk (see the module docstring)."""
    p_ptr = block_ptr(P_PTRS, t, P_DTYPE, offs, ALIGNED)
    m_ptr = block_ptr(M_PTRS, t, S_DTYPE, offs, ALIGNED)
    v_ptr = block_ptr(V_PTRS, t, S_DTYPE, offs, ALIGNED)
    g = ld(block_ptr(G_PTRS, t, G_DTYPE, offs, ALIGNED), mask, MASKED).to(tl.float32)
    if CLIP:
        g = g * coef
    if MAXIMIZE:
        g = -g
    p = ld(p_ptr, mask, MASKED).to(tl.float32)
    m = ld(m_ptr, mask, MASKED).to(tl.float32)
    v = ld(v_ptr, mask, MASKED).to(tl.float32)

    p = p * (1.0 - lr * weight_decay)
    m = _lerp(m, g, 1.0 - beta1)
    v = v * beta2 + (1.0 - beta2) * (g * g)
    st(m_ptr, round_to(m, S_DTYPE, INTERPRET), mask, MASKED)
    st(v_ptr, round_to(v, S_DTYPE, INTERPRET), mask, MASKED)
    if AMSGRAD:
        vmax_ptr = block_ptr(VMAX_PTRS, t, S_DTYPE, offs, ALIGNED)
        v = tl.maximum(ld(vmax_ptr, mask, MASKED).to(tl.float32), v)
        st(vmax_ptr, round_to(v, S_DTYPE, INTERPRET), mask, MASKED)
    # IEEE-rounded division and square root (compiled Triton's `/` and `sqrt` are approximate).
    denom = tl.math.div_rn(tl.math.sqrt_rn(v), bias2_sqrt) + eps
    p = p - tl.math.div_rn(lr, bias1) * tl.math.div_rn(m, denom)
    if STOCHASTIC:
        p_out = _stochastic_bf16(p, seed, offs)
    else:
        p_out = round_to(p, P_DTYPE, INTERPRET)
    st(p_ptr, p_out, mask, MASKED)
    if EMA:  # the EMA kernel's update, from the parameter as stored
        _ema_fold(SH_PTRS, t, offs, mask, p_out.to(tl.float32), ema_weight, SH_DTYPE, INTERPRET, ALIGNED, MASKED)


@triton.jit
def _ema_fold(SH_PTRS, t, offs, mask, p, weight, SH_DTYPE: tl.constexpr, INTERPRET: tl.constexpr,
              ALIGNED: tl.constexpr, MASKED: tl.constexpr):
    """shadow <- shadow + weight * (p - shadow), as kernels/ema.py computes it."""
    s_ptr = block_ptr(SH_PTRS, t, SH_DTYPE, offs, ALIGNED)
    s = ld(s_ptr, mask, MASKED).to(tl.float32)
    st(s_ptr, round_to(s + weight * (p - s), SH_DTYPE, INTERPRET), mask, MASKED)


def adamw_config() -> dict:
    """Launch parameters of _adamw_kernel (the static tests compile these)."""
    return dict(BLOCK=BLOCK, num_warps=8)


@device_guard
def adamw_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, *, lr, beta1, beta2, eps,
               weight_decay, amsgrad, maximize, stochastic_rounding=False, seed=0, coef=None, shadows=None,
               ema_decay=0.0):
    """Update lists of parameters in place, one launch (all share dtypes and a device; all contiguous).

    ``steps``: fp32 0-d tensors, already incremented. ``lr``: float or fp32 0-d device tensor.
    ``stochastic_rounding`` applies to bf16 parameters. The one-pass step: ``coef`` (fp32 [1]
    device tensor) multiplies every gradient as it is read (they are not written), and
    ``shadows`` (one dtype, dense like the parameters) get the EMA update
    ``s <- s + (1 - ema_decay) (p - s)`` from the parameters as stored.
    """
    if not params:
        return
    cfg = adamw_config()
    lr_is_ptr = isinstance(lr, torch.Tensor)
    p_dtype = params[0].dtype
    vmaxs = max_exp_avg_sqs if amsgrad else None
    for aligned, (ps, gs, ms, vs, vms, shs, sts) in split_aligned(params, grads, exp_avgs, exp_avg_sqs, vmaxs,
                                                                   shadows, steps, unchecked=1):
        table = chunk_table(ps, cfg["BLOCK"])
        _adamw_kernel[(table.num_chunks,)](
            pointer_table(ps),
            pointer_table(gs),
            pointer_table(ms),
            pointer_table(vs),
            pointer_table(vms) if amsgrad else pointer_table(ms),
            pointer_table(sts),
            table.numels,
            table.chunk_ids,
            table.chunk_offs,
            lr if lr_is_ptr else float(lr),
            float(beta1),
            float(beta2),
            math.log(beta1) if beta1 > 0 else -math.inf,
            math.log(beta2) if beta2 > 0 else -math.inf,
            float(eps),
            float(weight_decay),
            int(seed),
            coef if coef is not None else table.numels,
            pointer_table(shs) if shs is not None else table.numels,
            1.0 - float(ema_decay),
            P_DTYPE=TL_DTYPES[p_dtype],
            G_DTYPE=TL_DTYPES[gs[0].dtype],
            S_DTYPE=TL_DTYPES[ms[0].dtype],
            LR_IS_PTR=lr_is_ptr,
            AMSGRAD=bool(amsgrad),
            MAXIMIZE=bool(maximize),
            STOCHASTIC=bool(stochastic_rounding) and p_dtype == torch.bfloat16,
            CLIP=coef is not None,
            EMA=shs is not None,
            SH_DTYPE=TL_DTYPES[shs[0].dtype] if shs is not None else tl.float32,
            INTERPRET=interpreting(),
            ALIGNED=aligned,
            **cfg,
        )
