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
parameter. Bytes per element: p, g, m, v read; p, m, v written (+ shadow read and written).

Division and square roots are ``tl.math.div_rn`` / ``tl.math.sqrt_rn`` (IEEE round to
nearest, in Triton 3.6 and 3.9 alike): compiled Triton's ``/`` and ``sqrt`` are approximate
and flush denormals, and the step is memory-bound, so exactness costs nothing.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from fastgen.kernels._common import interpreting, round_to
from fastgen.kernels.multi_tensor import TL_DTYPES, chunk, chunk_table, pointer_table, tensor_ptr

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
):
    t, offs, mask = chunk(CHUNK_IDS, CHUNK_OFFS, NUMELS, BLOCK)
    p_ptr = tensor_ptr(P_PTRS, t, P_DTYPE)
    g_ptr = tensor_ptr(G_PTRS, t, G_DTYPE)
    m_ptr = tensor_ptr(M_PTRS, t, S_DTYPE)
    v_ptr = tensor_ptr(V_PTRS, t, S_DTYPE)
    step = tl.load(tensor_ptr(STEP_PTRS, t, tl.float32))
    if LR_IS_PTR:
        lr = tl.load(LR)
    else:
        lr = LR
    bias1 = _one_minus_pow(step, ln_beta1)
    bias2_sqrt = tl.math.sqrt_rn(_one_minus_pow(step, ln_beta2))

    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if CLIP:
        g = g * tl.load(COEF)
    if MAXIMIZE:
        g = -g
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)

    p = p * (1.0 - lr * weight_decay)
    m = _lerp(m, g, 1.0 - beta1)
    v = v * beta2 + (1.0 - beta2) * (g * g)
    tl.store(m_ptr + offs, round_to(m, S_DTYPE, INTERPRET), mask=mask)
    tl.store(v_ptr + offs, round_to(v, S_DTYPE, INTERPRET), mask=mask)
    if AMSGRAD:
        vmax_ptr = tensor_ptr(VMAX_PTRS, t, S_DTYPE)
        v = tl.maximum(tl.load(vmax_ptr + offs, mask=mask, other=0.0).to(tl.float32), v)
        tl.store(vmax_ptr + offs, round_to(v, S_DTYPE, INTERPRET), mask=mask)
    # IEEE-rounded division and square root (compiled Triton's `/` and `sqrt` are approximate).
    denom = tl.math.div_rn(tl.math.sqrt_rn(v), bias2_sqrt) + eps
    p = p - tl.math.div_rn(lr, bias1) * tl.math.div_rn(m, denom)
    if STOCHASTIC:
        p_out = _stochastic_bf16(p, seed, offs)
    else:
        p_out = round_to(p, P_DTYPE, INTERPRET)
    tl.store(p_ptr + offs, p_out, mask=mask)
    if EMA:  # the EMA kernel's update, from the parameter as stored
        _ema_fold(SH_PTRS, t, offs, mask, p_out.to(tl.float32), ema_weight, SH_DTYPE, INTERPRET)


@triton.jit
def _ema_fold(SH_PTRS, t, offs, mask, p, weight, SH_DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    """shadow <- shadow + weight * (p - shadow), as kernels/ema.py computes it."""
    s_ptr = tensor_ptr(SH_PTRS, t, SH_DTYPE) + offs
    s = tl.load(s_ptr, mask=mask, other=0.0).to(tl.float32)
    tl.store(s_ptr, round_to(s + weight * (p - s), SH_DTYPE, INTERPRET), mask=mask)


def adamw_config() -> dict:
    """Launch parameters of _adamw_kernel (the static tests compile these)."""
    return dict(BLOCK=BLOCK, num_warps=8)


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
    table = chunk_table(params, cfg["BLOCK"])
    lr_is_ptr = isinstance(lr, torch.Tensor)
    p_dtype = params[0].dtype
    _adamw_kernel[(table.num_chunks,)](
        pointer_table(params),
        pointer_table(grads),
        pointer_table(exp_avgs),
        pointer_table(exp_avg_sqs),
        pointer_table(max_exp_avg_sqs) if amsgrad else pointer_table(exp_avgs),
        pointer_table(steps),
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
        pointer_table(shadows) if shadows is not None else table.numels,
        1.0 - float(ema_decay),
        P_DTYPE=TL_DTYPES[p_dtype],
        G_DTYPE=TL_DTYPES[grads[0].dtype],
        S_DTYPE=TL_DTYPES[exp_avgs[0].dtype],
        LR_IS_PTR=lr_is_ptr,
        AMSGRAD=bool(amsgrad),
        MAXIMIZE=bool(maximize),
        STOCHASTIC=bool(stochastic_rounding) and p_dtype == torch.bfloat16,
        CLIP=coef is not None,
        EMA=shadows is not None,
        SH_DTYPE=TL_DTYPES[shadows[0].dtype] if shadows is not None else tl.float32,
        INTERPRET=interpreting(),
        **cfg,
    )
