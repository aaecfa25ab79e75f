"""CUDA C++ multi-tensor AdamW, 8-bit AdamW, Prodigy, schedule-free AdamW, Lion, gradient clipping and EMA
launchers (``csrc/optim/`` through ``fastgen._C``).

Same signatures as the Triton launchers: ``adamw_step`` / ``lion_step`` as
``fastgen.kernels.adamw`` / ``fastgen.kernels.lion``, ``adamw8bit_step`` as ``fastgen.kernels.adamw8bit``,
``prodigy_moments`` / ``prodigy_update`` as ``fastgen.kernels.prodigy``, ``schedulefree_step`` as
``fastgen.kernels.schedulefree``, ``sum_squares`` / ``scale_`` as
``fastgen.kernels.clip_grad``, ``ema_update_`` as ``fastgen.kernels.ema``; and the same
cached device tables (``fastgen.kernels.multi_tensor``): one launch per call.
``clip_coef`` is the CUDA path of ``fastgen.optim.clip_grad_norm_``: the total p-norm
(p >= 1 or inf) of several same-dtype gradient lists and the clip coefficient, both on
the device, summed in a fixed order (deterministic). Each entry point takes its parameter struct
(``fastgen._C.MultiTensorAdamwParams`` ...), filled here by name.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

from fastgen.cuda import dtype_code, load_extension
from fastgen.kernels.multi_tensor import chunk_table, pointer_table
from fastgen.optim import quant8

__all__ = ["adamw_step", "adamw8bit_step", "lion_step", "prodigy_moments", "prodigy_update", "schedulefree_step",
           "clip_coef", "sum_squares", "scale_", "ema_update_"]

CHUNK = 4096  # elements per block (256 threads, 16 each)


def _stream(device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def _lr_args(lr):
    if isinstance(lr, torch.Tensor):
        assert lr.dtype == torch.float32 and lr.numel() == 1
        return lr.data_ptr(), 0.0
    return 0, float(lr)


def _one_pass(params, coef, shadows, ema_decay) -> tuple[dict, bool]:
    """The one-pass fields of a step's struct, and whether the shadows must be averaged by a launch
    of their own (a shadow dtype the functors do not fold: neither float32 nor the parameters')."""
    if coef is not None:
        assert coef.dtype == torch.float32 and coef.numel() == 1 and coef.device == params[0].device
    fold = bool(shadows) and shadows[0].dtype in (torch.float32, params[0].dtype)
    return dict(sh_list=pointer_table(shadows).data_ptr() if fold else 0,
                sh_dtype=dtype_code(shadows[0].dtype) if fold else 0,
                coef_ptr=coef.data_ptr() if coef is not None else 0,
                ema_weight=1.0 - float(ema_decay) if fold else 0.0), bool(shadows) and not fold


def adamw_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, *, lr, beta1, beta2, eps,
               weight_decay, amsgrad, maximize, stochastic_rounding=False, seed=0, coef=None, shadows=None,
               ema_decay=0.0):
    """Update lists of parameters in place (shared dtypes, one CUDA device, all dense alike). The one-pass
    step: ``coef`` (fp32 [1] device clip coefficient) scales the gradients as they are read, and
    ``shadows`` (EMA shadows, dense like the parameters) fold the stored parameters,
    ``s <- s + (1 - ema_decay) (p - s)``, in the same pass."""
    if not params:
        return
    C = load_extension()
    table = chunk_table(params, CHUNK)
    lr_ptr, lr_value = _lr_args(lr)
    one_pass, ema_apart = _one_pass(params, coef, shadows, ema_decay)
    with torch.cuda.device(params[0].device):
        C.multi_tensor_adamw(C.MultiTensorAdamwParams(
            p_list=pointer_table(params).data_ptr(), g_list=pointer_table(grads).data_ptr(),
            m_list=pointer_table(exp_avgs).data_ptr(), v_list=pointer_table(exp_avg_sqs).data_ptr(),
            vmax_list=pointer_table(max_exp_avg_sqs).data_ptr() if amsgrad else 0,
            step_list=pointer_table(steps).data_ptr(), numels=table.numels.data_ptr(),
            chunk_ids=table.chunk_ids.data_ptr(), chunk_offs=table.chunk_offs.data_ptr(),
            num_chunks=table.num_chunks, chunk=CHUNK, p_dtype=dtype_code(params[0].dtype),
            g_dtype=dtype_code(grads[0].dtype), s_dtype=dtype_code(exp_avgs[0].dtype), lr_ptr=lr_ptr, lr=lr_value,
            beta1=float(beta1), beta2=float(beta2), eps=float(eps), weight_decay=float(weight_decay),
            amsgrad=int(bool(amsgrad)), maximize=int(bool(maximize)),
            stochastic_rounding=int(bool(stochastic_rounding)), seed=int(seed) & 0xFFFFFFFF,
            sh_list=one_pass["sh_list"], sh_dtype=one_pass["sh_dtype"], coef_ptr=one_pass["coef_ptr"],
            ema_weight=one_pass["ema_weight"], stream=_stream(params[0].device),
        ))
    if ema_apart:
        ema_update_(shadows, params, ema_decay)


def _quant8_tables(device: torch.device) -> tuple:
    """SMAP, SBOUND, UMAP, UBOUND of ``fastgen.optim.quant8`` on ``device`` (its cached tensors)."""
    return (*quant8.tables(True, device), *quant8.tables(False, device))


@functools.lru_cache(maxsize=None)
def _quant8_maps(device: torch.device) -> torch.Tensor:
    """The four quant8 tables of ``device`` as one [4, 256] fp32 tensor, built once per device."""
    return torch.stack(_quant8_tables(device)).contiguous()


def _maps(tables) -> torch.Tensor:
    """``tables`` as one [4, 256] fp32 tensor: the per-device cached stack for quant8's own tables (the
    optimizer's), else a stack of these (the caller keeps it alive until the launch is queued)."""
    device = tables[0].device
    own = _quant8_tables(device)
    if len(tables) == len(own) and all(t is q for t, q in zip(tables, own)):
        return _quant8_maps(device)
    return torch.stack([t.to(torch.float32) for t in tables]).contiguous()


def adamw8bit_step(params, grads, qms, ams, qvs, avs, steps, *, tables, lr, beta1, beta2, eps, weight_decay,
                   maximize, stochastic_rounding=False, seed=0, coef=None, shadows=None, ema_decay=0.0):
    """8-bit AdamW over lists of parameters and their block-wise quantized moments, in place, one launch
    (shared dtypes and device, all contiguous; csrc/optim/adamw8bit.cu). ``tables``: (SMAP, SBOUND,
    UMAP, UBOUND) fp32 [256] on the device; ``coef`` / ``shadows`` / ``ema_decay``: the one-pass step
    (clip coefficient on the device, EMA shadows folded from the stored parameters)."""
    if not params:
        return
    C = load_extension()
    table = chunk_table(params, CHUNK)
    lr_ptr, lr_value = _lr_args(lr)
    if coef is not None:
        assert coef.dtype == torch.float32 and coef.numel() == 1 and coef.device == params[0].device
    maps = _maps(tables)
    with torch.cuda.device(params[0].device):
        C.multi_tensor_adamw8bit(C.MultiTensorAdamw8bitParams(
            p_list=pointer_table(params).data_ptr(), g_list=pointer_table(grads).data_ptr(),
            qm_list=pointer_table(qms).data_ptr(), am_list=pointer_table(ams).data_ptr(),
            qv_list=pointer_table(qvs).data_ptr(), av_list=pointer_table(avs).data_ptr(),
            step_list=pointer_table(steps).data_ptr(),
            sh_list=pointer_table(shadows).data_ptr() if shadows else 0, numels=table.numels.data_ptr(),
            chunk_ids=table.chunk_ids.data_ptr(), chunk_offs=table.chunk_offs.data_ptr(),
            num_chunks=table.num_chunks, chunk=CHUNK, p_dtype=dtype_code(params[0].dtype),
            g_dtype=dtype_code(grads[0].dtype), sh_dtype=dtype_code(shadows[0].dtype) if shadows else 0,
            maps=maps.data_ptr(), lr_ptr=lr_ptr, lr=lr_value, beta1=float(beta1), beta2=float(beta2),
            eps=float(eps), weight_decay=float(weight_decay), maximize=int(bool(maximize)),
            stochastic_rounding=int(bool(stochastic_rounding)), seed=int(seed) & 0xFFFFFFFF,
            coef_ptr=coef.data_ptr() if coef is not None else 0, ema_weight=1.0 - float(ema_decay),
            stream=_stream(params[0].device),
        ))


def prodigy_moments(params, grads, p0s, ms, vs, ss, coefs, *, beta1, beta2, beta3, weight_decay, coupled_wd):
    """Prodigy pass 1 over lists (one dtype, one device, contiguous, ``slice_p = 1``; csrc/optim/prodigy.cu):
    m, v, s in place; returns the fp32 per-chunk partial sums (dot, abs), as ``fastgen.kernels.prodigy``.
    ``weight_decay`` / ``coupled_wd`` keep the Triton launcher's signature: the gradients come with any
    coupled weight decay already applied (``FusedProdigy`` adds it first), so ``coupled_wd`` must be False."""
    assert not coupled_wd, "prodigy_moments (CUDA C++): coupled weight decay is applied to the gradients first"
    C = load_extension()
    table = chunk_table(params, CHUNK)
    device = params[0].device
    dot = torch.empty(table.num_chunks, dtype=torch.float32, device=device)
    ab = torch.empty_like(dot)
    assert coefs.dtype == torch.float32 and coefs.numel() == 3 and coefs.is_contiguous() and coefs.device == device
    with torch.cuda.device(device):
        C.multi_tensor_prodigy_moments(C.MultiTensorProdigyMomentsParams(
            p_list=pointer_table(params).data_ptr(), g_list=pointer_table(grads).data_ptr(),
            p0_list=pointer_table(p0s).data_ptr(), m_list=pointer_table(ms).data_ptr() if ms else 0,
            v_list=pointer_table(vs).data_ptr(), s_list=pointer_table(ss).data_ptr(), numels=table.numels.data_ptr(),
            chunk_ids=table.chunk_ids.data_ptr(), chunk_offs=table.chunk_offs.data_ptr(),
            num_chunks=table.num_chunks, chunk=CHUNK, p_dtype=dtype_code(params[0].dtype),
            g_dtype=dtype_code(grads[0].dtype), coefs_ptr=coefs.data_ptr(), dot_ptr=dot.data_ptr(),
            abs_ptr=ab.data_ptr(), beta1=float(beta1), beta2=float(beta2), beta3=float(beta3),
            stream=_stream(device),
        ))
    return dot, ab


def prodigy_update(params, nums, vs, coefs, *, decoupled_wd):
    """Prodigy pass 2 over lists (one dtype, one device, contiguous): p += w p, p += a n / (sqrt(v) + e)."""
    if not params:
        return
    C = load_extension()
    table = chunk_table(params, CHUNK)
    device = params[0].device
    assert coefs.dtype == torch.float32 and coefs.numel() == 3 and coefs.is_contiguous() and coefs.device == device
    with torch.cuda.device(device):
        C.multi_tensor_prodigy_update(C.MultiTensorProdigyUpdateParams(
            p_list=pointer_table(params).data_ptr(), n_list=pointer_table(nums).data_ptr(),
            v_list=pointer_table(vs).data_ptr(), numels=table.numels.data_ptr(),
            chunk_ids=table.chunk_ids.data_ptr(), chunk_offs=table.chunk_offs.data_ptr(),
            num_chunks=table.num_chunks, chunk=CHUNK, p_dtype=dtype_code(params[0].dtype),
            n_dtype=dtype_code(nums[0].dtype), coefs_ptr=coefs.data_ptr(), decoupled_wd=int(bool(decoupled_wd)),
            stream=_stream(device),
        ))


def schedulefree_step(ys, grads, zs, vs, *, scalars, beta2, eps, weight_decay):
    """One schedule-free step over lists (y, g, z, v of one dtype, one CUDA device, dense alike;
    csrc/optim/schedulefree.cu). ``scalars``: fp32 [4] tensor on that device, this step's
    ``[1 - beta2^(k+1), c, lr (beta1 (1 - c) - 1), lr]`` (``fastgen.optim.schedulefree.advance_schedule``
    computes them on the device, so a step can be captured in a CUDA graph). Per element (fp32 math,
    one rounding per store)::

        v = beta2 v + (1 - beta2) g^2;   u = g / (sqrt(v / bc2) + eps) + weight_decay y
        y = lerp(y, z, c) + y_coef u;    z = z - lr u
    """
    if not ys:
        return
    if scalars.dtype != torch.float32 or scalars.numel() != 4 or scalars.device != ys[0].device:
        raise ValueError(f"schedulefree_step: scalars must be 4 fp32 values on {ys[0].device}, got {scalars.dtype} "
                         f"{tuple(scalars.shape)} on {scalars.device}")
    C = load_extension()
    table = chunk_table(ys, CHUNK)
    device = ys[0].device
    with torch.cuda.device(device):
        C.multi_tensor_schedulefree(C.MultiTensorSchedulefreeParams(
            y_list=pointer_table(ys).data_ptr(), g_list=pointer_table(grads).data_ptr(),
            z_list=pointer_table(zs).data_ptr(), v_list=pointer_table(vs).data_ptr(),
            numels=table.numels.data_ptr(), chunk_ids=table.chunk_ids.data_ptr(),
            chunk_offs=table.chunk_offs.data_ptr(), num_chunks=table.num_chunks, chunk=CHUNK,
            p_dtype=dtype_code(ys[0].dtype), g_dtype=dtype_code(grads[0].dtype), scalars_ptr=scalars.data_ptr(),
            beta2=float(beta2), eps=float(eps), weight_decay=float(weight_decay), stream=_stream(device),
        ))


def lion_step(params, grads, exp_avgs, *, lr, beta1, beta2, weight_decay, maximize, coef=None, shadows=None,
              ema_decay=0.0):
    """Update lists of parameters in place (shared dtypes, one CUDA device, all dense alike); ``coef`` /
    ``shadows`` / ``ema_decay``: the one-pass step, as :func:`adamw_step`."""
    if not params:
        return
    C = load_extension()
    table = chunk_table(params, CHUNK)
    lr_ptr, lr_value = _lr_args(lr)
    one_pass, ema_apart = _one_pass(params, coef, shadows, ema_decay)
    with torch.cuda.device(params[0].device):
        C.multi_tensor_lion(C.MultiTensorLionParams(
            p_list=pointer_table(params).data_ptr(), g_list=pointer_table(grads).data_ptr(),
            m_list=pointer_table(exp_avgs).data_ptr(), numels=table.numels.data_ptr(),
            chunk_ids=table.chunk_ids.data_ptr(), chunk_offs=table.chunk_offs.data_ptr(),
            num_chunks=table.num_chunks, chunk=CHUNK, p_dtype=dtype_code(params[0].dtype),
            g_dtype=dtype_code(grads[0].dtype), s_dtype=dtype_code(exp_avgs[0].dtype), lr_ptr=lr_ptr, lr=lr_value,
            beta1=float(beta1), beta2=float(beta2), weight_decay=float(weight_decay), maximize=int(bool(maximize)),
            sh_list=one_pass["sh_list"], sh_dtype=one_pass["sh_dtype"], coef_ptr=one_pass["coef_ptr"],
            ema_weight=one_pass["ema_weight"], stream=_stream(params[0].device),
        ))
    if ema_apart:
        ema_update_(shadows, params, ema_decay)


def _norm_partials(grads, norm_type, partial, offset, C) -> int:
    """Launch the per-chunk partials of ``grads`` into ``partial[offset:]``; returns the chunk count."""
    table = chunk_table(grads, CHUNK)
    C.multi_tensor_norm(C.MultiTensorNormParams(
        g_list=pointer_table(grads).data_ptr(), numels=table.numels.data_ptr(), chunk_ids=table.chunk_ids.data_ptr(),
        chunk_offs=table.chunk_offs.data_ptr(), num_chunks=table.num_chunks, chunk=CHUNK,
        g_dtype=dtype_code(grads[0].dtype), norm_type=float(norm_type),
        partial_ptr=partial.data_ptr() + 4 * offset if table.num_chunks else 0, stream=_stream(grads[0].device),
    ))
    return table.num_chunks


def clip_coef(grad_lists, norm_type: float, max_norm: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(total, coef)`` of gradient lists (each one dtype, all on one CUDA device, dense):
    ``total`` the fp32 0-d ``norm_type``-norm of all their elements together (``norm_type`` >= 1
    or inf), ``coef`` the fp32 ``[1]`` tensor ``min(1, max_norm / (total + 1e-6))``. One launch
    per list and one final launch; no host sync, deterministic."""
    grad_lists = [gs for gs in grad_lists if gs]
    device = grad_lists[0][0].device
    C = load_extension()
    n = sum(chunk_table(gs, CHUNK).num_chunks for gs in grad_lists)
    partial = torch.empty(n, dtype=torch.float32, device=device)
    out = torch.empty(2, dtype=torch.float32, device=device)  # total, coef
    with torch.cuda.device(device):
        offset = 0
        for gs in grad_lists:
            offset += _norm_partials(gs, norm_type, partial, offset, C)
        C.multi_tensor_norm_finalize(C.MultiTensorNormFinalizeParams(
            partial_ptr=partial.data_ptr() if n else 0, n=n, norm_type=float(norm_type), max_norm=float(max_norm),
            total_ptr=out.data_ptr(), coef_ptr=out.data_ptr() + 4, stream=_stream(device)))
    return out[0], out[1:]


def sum_squares(grads: list[torch.Tensor]) -> torch.Tensor:
    """fp32 0-d tensor: the sum of squares of all elements (same dtype and device, all dense)."""
    C = load_extension()
    device = grads[0].device
    n = chunk_table(grads, CHUNK).num_chunks
    partial = torch.empty(n, dtype=torch.float32, device=device)
    total = torch.empty((), dtype=torch.float32, device=device)
    with torch.cuda.device(device):
        _norm_partials(grads, 2.0, partial, 0, C)
        # partials of |g|^2 summed with norm_type 1 (no root): the plain sum of squares
        C.multi_tensor_norm_finalize(C.MultiTensorNormFinalizeParams(
            partial_ptr=partial.data_ptr() if n else 0, n=n, norm_type=1.0, max_norm=0.0, total_ptr=total.data_ptr(),
            coef_ptr=0, stream=_stream(device)))
    return total


def scale_(grads: list[torch.Tensor], coef: torch.Tensor) -> None:
    """grads *= coef (an fp32 device scalar), in place, one launch."""
    if not grads:
        return
    assert coef.dtype == torch.float32 and coef.numel() == 1 and coef.device == grads[0].device
    C = load_extension()
    table = chunk_table(grads, CHUNK)
    with torch.cuda.device(grads[0].device):
        C.multi_tensor_scale(C.MultiTensorScaleParams(
            g_list=pointer_table(grads).data_ptr(), numels=table.numels.data_ptr(),
            chunk_ids=table.chunk_ids.data_ptr(), chunk_offs=table.chunk_offs.data_ptr(),
            num_chunks=table.num_chunks, chunk=CHUNK, g_dtype=dtype_code(grads[0].dtype), coef_ptr=coef.data_ptr(),
            stream=_stream(grads[0].device),
        ))


def ema_update_(shadows: list[torch.Tensor], params: list[torch.Tensor], decay: Optional[float] = None, *,
                weight: Optional[torch.Tensor] = None) -> None:
    """shadow <- lerp(shadow, param, 1 - decay) for every pair, one launch (dense, alike, one device).
    Give either the host float ``decay`` or ``weight``, an fp32 0-d tensor on the tensors' device
    holding ``1 - decay`` (read by the kernel: no host sync, so a captured warm-up replays right)."""
    if (decay is None) == (weight is None):
        raise ValueError("ema_update_: give exactly one of decay (a float) and weight (an fp32 device scalar)")
    if not shadows:
        return
    if weight is not None and (weight.dtype != torch.float32 or weight.numel() != 1
                               or weight.device != shadows[0].device):
        raise ValueError(f"ema_update_: weight must be one fp32 element on {shadows[0].device}, got "
                         f"{weight.dtype} {tuple(weight.shape)} on {weight.device}")
    C = load_extension()
    table = chunk_table(shadows, CHUNK)
    with torch.cuda.device(shadows[0].device):
        C.multi_tensor_ema(C.MultiTensorEmaParams(
            s_list=pointer_table(shadows).data_ptr(), p_list=pointer_table(params).data_ptr(),
            numels=table.numels.data_ptr(), chunk_ids=table.chunk_ids.data_ptr(),
            chunk_offs=table.chunk_offs.data_ptr(), num_chunks=table.num_chunks, chunk=CHUNK,
            s_dtype=dtype_code(shadows[0].dtype), p_dtype=dtype_code(params[0].dtype),
            weight=1.0 - float(decay) if weight is None else 0.0,
            weight_ptr=weight.data_ptr() if weight is not None else 0, stream=_stream(shadows[0].device),
        ))
