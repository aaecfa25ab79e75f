"""CUDA C++ RMSNorm launchers (``csrc/rms_norm/rms_norm.cu`` through ``fastgen._C``).

Same signatures as the Triton launchers in ``fastgen.kernels.rms_norm``; no
autograd here (that is ``fastgen.ops.rms_norm``). Inputs are validated
upstream; the asserts below only guard the invariants the kernels rely on.

Forward:  h = x + residual (rounded to x.dtype), rstd = 1/sqrt(mean(h^2) + eps),
          y = (h * rstd) * weight.
Backward: xhat = h * rstd, g = dy * weight,
          dx = rstd * (g - xhat * mean(g * xhat)) + dh_out,
          dw = sum over rows of dy * xhat — deterministic: fp32 per-block
          partials [P, N] summed here, no atomics.
"""

from __future__ import annotations

import torch

from fastgen.cuda import dtype_code, load_extension
from fastgen.kernels._layout import max_programs

__all__ = ["rms_norm_fwd", "rms_norm_bwd"]


def _unit_stride(t: torch.Tensor) -> bool:
    return t.stride(1) == 1 or t.shape[1] <= 1


def _row_stride(t: torch.Tensor) -> int:
    return t.stride(0) if t.shape[0] > 1 else t.shape[1]


def _no_overlap(t):
    """The kernels take rows at least N elements apart; broadcast rows (stride 0) are copied."""
    if t is None or t.shape[0] <= 1 or t.stride(0) >= t.shape[1]:
        return t
    return t.contiguous()


def rms_norm_fwd(x, weight, residual, eps):
    """y, h, rstd = rms_norm_fwd(x [M, N], weight [N] | None, residual [M, N] | None, eps).

    y [M, N] contiguous in x.dtype; h = x + residual [M, N] in x.dtype, or None
    without a residual; rstd [M] fp32.
    """
    C = load_extension()
    x, residual = _no_overlap(x), _no_overlap(residual)
    assert x.is_cuda and x.dim() == 2 and _unit_stride(x)
    M, N = x.shape
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    rstd = torch.empty((M,), dtype=torch.float32, device=x.device)
    h = None
    if residual is not None:
        assert residual.shape == x.shape and residual.dtype == x.dtype and _unit_stride(residual)
        assert residual.device == x.device
        h = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if weight is not None:
        assert weight.shape == (N,) and weight.is_contiguous() and weight.device == x.device
    if M == 0 or N == 0:
        return y, h, rstd
    x_code = dtype_code(x.dtype)
    w_code = dtype_code(weight.dtype) if weight is not None else x_code
    with torch.cuda.device(x.device):
        stream = torch.cuda.current_stream(x.device).cuda_stream
        C.rms_norm_fwd(C.RmsNormFwdParams(
            x_ptr=x.data_ptr(),
            w_ptr=weight.data_ptr() if weight is not None else 0,
            r_ptr=residual.data_ptr() if residual is not None else 0,
            y_ptr=y.data_ptr(),
            h_ptr=h.data_ptr() if h is not None else 0,
            rstd_ptr=rstd.data_ptr(),
            M=M,
            N=N,
            stride_x=_row_stride(x),
            stride_r=_row_stride(residual) if residual is not None else 0,
            x_dtype=x_code,
            w_dtype=w_code,
            eps=float(eps),
            stream=stream,
        ))
    return y, h, rstd


def rms_norm_bwd(dy, h, weight, rstd, dh_out):
    """dx, dw = rms_norm_bwd(dy [M, N], h [M, N], weight [N] | None, rstd [M], dh_out [M, N] | None).

    dx [M, N] contiguous in h.dtype is the whole gradient of h (dh_out included);
    dw [N] in weight.dtype, or None without a weight. Deterministic.
    """
    C = load_extension()
    dy, h, dh_out = _no_overlap(dy), _no_overlap(h), _no_overlap(dh_out)
    assert h.is_cuda and h.dim() == 2 and dy.shape == h.shape and _unit_stride(dy) and _unit_stride(h)
    assert dy.dtype == h.dtype and rstd.dtype == torch.float32 and rstd.is_contiguous()
    M, N = h.shape
    assert rstd.numel() == M
    if dh_out is not None:
        assert dh_out.shape == h.shape and dh_out.dtype == h.dtype and _unit_stride(dh_out)
    if weight is not None:
        assert weight.shape == (N,) and weight.is_contiguous()
    dx = torch.empty((M, N), dtype=h.dtype, device=h.device)
    if M == 0 or N == 0:
        return dx, (None if weight is None else torch.zeros_like(weight))
    x_code = dtype_code(h.dtype)
    w_code = dtype_code(weight.dtype) if weight is not None else x_code
    with torch.cuda.device(h.device):
        stream = torch.cuda.current_stream(h.device).cuda_stream
        if weight is not None:
            num_partials = max(1, min(M, max_programs(h.device, per_sm=2)))
            dw_partial = torch.empty((num_partials, N), dtype=torch.float32, device=h.device)
        else:
            num_partials, dw_partial = 0, None
        C.rms_norm_bwd(C.RmsNormBwdParams(
            dy_ptr=dy.data_ptr(),
            h_ptr=h.data_ptr(),
            w_ptr=weight.data_ptr() if weight is not None else 0,
            rstd_ptr=rstd.data_ptr(),
            dhout_ptr=dh_out.data_ptr() if dh_out is not None else 0,
            dx_ptr=dx.data_ptr(),
            dw_partial_ptr=dw_partial.data_ptr() if dw_partial is not None else 0,
            M=M,
            N=N,
            stride_dy=_row_stride(dy),
            stride_h=_row_stride(h),
            stride_dhout=_row_stride(dh_out) if dh_out is not None else 0,
            x_dtype=x_code,
            w_dtype=w_code,
            num_partials=num_partials,
            stream=stream,
        ))
        dw = None if dw_partial is None else dw_partial.sum(0).to(weight.dtype)
    return dx, dw
