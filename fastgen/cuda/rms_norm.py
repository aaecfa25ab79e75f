"""CUDA C++ RMSNorm launchers (``csrc/rms_norm/rms_norm.cu`` through ``fastgen._C``).

Same signatures as the Triton launchers in ``fastgen.kernels.rms_norm``: they launch
into outputs that ``fastgen.ops.rms_norm`` allocated (and never see an empty
problem); no autograd here. Inputs are validated upstream; the asserts below only
guard the invariants the kernels rely on.

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
from fastgen.ops._shapes import max_programs

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


def rms_norm_fwd(x, weight, residual, eps, *, y, h, rstd):
    """Launch the forward into ``y``, ``h`` and ``rstd`` (allocated by ``fastgen.ops.rms_norm``);
    the arguments of ``fastgen.kernels.rms_norm.rms_norm_fwd``: x [M, N] with M, N > 0."""
    C = load_extension()
    x, residual = _no_overlap(x), _no_overlap(residual)
    assert x.is_cuda and x.dim() == 2 and _unit_stride(x)
    M, N = x.shape
    assert y.shape == (M, N) and y.is_contiguous() and rstd.shape == (M,) and rstd.dtype == torch.float32
    if residual is not None:
        assert residual.shape == x.shape and residual.dtype == x.dtype and _unit_stride(residual)
        assert residual.device == x.device and h is not None and h.is_contiguous()
    if weight is not None:
        assert weight.shape == (N,) and weight.is_contiguous() and weight.device == x.device
    x_code = dtype_code(x.dtype)
    w_code = dtype_code(weight.dtype) if weight is not None else x_code
    with torch.cuda.device(x.device):
        stream = torch.cuda.current_stream(x.device).cuda_stream
        C.rms_norm_fwd(C.RmsNormFwdParams(
            x_ptr=x.data_ptr(),
            w_ptr=weight.data_ptr() if weight is not None else 0,
            r_ptr=residual.data_ptr() if residual is not None else 0,
            y_ptr=y.data_ptr(),
            h_ptr=h.data_ptr() if residual is not None else 0,
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


def rms_norm_bwd(dy, h, weight, rstd, dh_out, *, dx, dw):
    """Launch the backward into ``dx`` and ``dw`` (allocated by ``fastgen.ops.rms_norm``); the
    arguments of ``fastgen.kernels.rms_norm.rms_norm_bwd``: h [M, N] with M, N > 0. Deterministic."""
    C = load_extension()
    dy, h, dh_out = _no_overlap(dy), _no_overlap(h), _no_overlap(dh_out)
    assert h.is_cuda and h.dim() == 2 and dy.shape == h.shape and _unit_stride(dy) and _unit_stride(h)
    assert dy.dtype == h.dtype and rstd.dtype == torch.float32 and rstd.is_contiguous()
    M, N = h.shape
    assert rstd.numel() == M and dx.shape == (M, N) and dx.is_contiguous()
    if dh_out is not None:
        assert dh_out.shape == h.shape and dh_out.dtype == h.dtype and _unit_stride(dh_out)
    if weight is not None:
        assert weight.shape == (N,) and weight.is_contiguous() and dw is not None and dw.shape == (N,)
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
        if dw_partial is not None:
            dw.copy_(dw_partial.sum(0))
