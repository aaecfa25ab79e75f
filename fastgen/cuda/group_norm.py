"""CUDA C++ GroupNorm (+ fused SiLU) launchers (``csrc/group_norm/group_norm.cu`` through ``fastgen._C``).

Same signatures as the Triton launchers in ``fastgen.kernels.group_norm``: they launch
into outputs that ``fastgen.ops.group_norm`` allocated and never see an empty tensor; no
autograd here. Inputs are validated upstream; the asserts below only guard the
invariants the kernels rely on.

``x`` is ``[N, C, S]``, contiguous or with channels-last strides ``(S*C, 1, C)``;
outputs have the strides of ``x``. With ``K = C / G`` and ``L = K * S`` per group:

Forward:  mean, var over each group (Welford per thread, Chan's merge across threads and
          across the ``splits`` blocks of a group), rstd = 1/sqrt(var + eps),
          y = act((x - mean) * rstd * w + b), act = identity or SiLU. A group of at most
          ``SPLIT_ELEMENTS`` elements is one block (one launch each way); larger groups
          take the split reduction (stats, combine, apply).
Backward: xhat = (x - mean) * rstd, dyn = dy (through the SiLU when fused), g = dyn * w,
          dx = rstd * (g - mean_L(g) - xhat * mean_L(g * xhat)),
          dw = sum dyn * xhat, db = sum dyn over N and S — deterministic: fp32 per-block
          partials [N * splits, C] summed here, no atomics.
"""

from __future__ import annotations

import torch

from fastgen.cuda import dtype_code, load_extension
from fastgen.ops._shapes import channels_last_layout

__all__ = ["group_norm_fwd", "group_norm_bwd", "cuda_config"]

# Elements (K * chunk_s) one block covers; a larger group is split along S over several blocks.
SPLIT_ELEMENTS = 32768


def cuda_config(N: int, C: int, S: int, G: int) -> dict:
    """``splits`` blocks per group, each over ``chunk_s`` positions (no split is empty)."""
    K = C // G
    chunk_s = max(1, min(S, SPLIT_ELEMENTS // max(K, 1)))
    splits = -(-S // chunk_s) if S > 0 else 1
    return dict(splits=splits, chunk_s=chunk_s)


def _param_dtype(weight, bias, x):
    for t in (weight, bias):
        if t is not None:
            return t.dtype
    return x.dtype


def group_norm_fwd(x, weight, bias, num_groups, eps, silu, *, y, mean, rstd):
    """Launch the forward into y, mean and rstd (allocated by ``fastgen.ops.group_norm``); the
    arguments of ``fastgen.kernels.group_norm.group_norm_fwd``: x [N, C, S] not empty."""
    ext = load_extension()
    assert x.is_cuda and x.dim() == 3
    N, C, S = x.shape
    G = num_groups
    cl = channels_last_layout(x)
    pdt = _param_dtype(weight, bias, x)
    for t in (weight, bias):
        assert t is None or (t.shape == (C,) and t.is_contiguous() and t.device == x.device and t.dtype == pdt)
    assert x.numel() > 0 and y.stride() == x.stride(), "empty calls are answered by fastgen.ops.group_norm"
    assert mean.shape == rstd.shape == (N * G,)
    cfg = cuda_config(N, C, S, G)
    part = None
    if cfg["splits"] > 1:
        part = torch.empty((N * G, cfg["splits"], 3), dtype=torch.float32, device=x.device)
    with torch.cuda.device(x.device):
        stream = torch.cuda.current_stream(x.device).cuda_stream
        ext.group_norm_fwd(ext.GroupNormFwdParams(
            x_ptr=x.data_ptr(),
            w_ptr=weight.data_ptr() if weight is not None else 0,
            b_ptr=bias.data_ptr() if bias is not None else 0,
            y_ptr=y.data_ptr(),
            mean_ptr=mean.data_ptr(),
            rstd_ptr=rstd.data_ptr(),
            part_ptr=part.data_ptr() if part is not None else 0,
            N=N, C=C, S=S, G=G, channels_last=int(cl), splits=cfg["splits"], chunk_s=cfg["chunk_s"],
            x_dtype=dtype_code(x.dtype), w_dtype=dtype_code(pdt), eps=float(eps), silu=int(bool(silu)), stream=stream,
        ))


def group_norm_bwd(dy, x, weight, bias, mean, rstd, num_groups, silu, *, dx, dw, db):
    """Launch the backward into dx, dw and db (allocated by ``fastgen.ops.group_norm``); the
    arguments of ``fastgen.kernels.group_norm.group_norm_bwd``. Deterministic (no atomics)."""
    ext = load_extension()
    assert x.is_cuda and x.dim() == 3 and dy.shape == x.shape and dy.dtype == x.dtype
    N, C, S = x.shape
    G = num_groups
    cl = channels_last_layout(x)
    assert x.numel() > 0, "empty calls are answered by fastgen.ops.group_norm"
    assert dy.stride() == x.stride() == dx.stride()
    assert mean.dtype == rstd.dtype == torch.float32 and mean.numel() == rstd.numel() == N * G
    pdt = _param_dtype(weight, bias, x)
    for t in (weight, bias):
        assert t is None or (t.shape == (C,) and t.is_contiguous() and t.dtype == pdt)
    cfg = cuda_config(N, C, S, G)
    dwp = torch.empty((N * cfg["splits"], C), dtype=torch.float32, device=x.device)
    dbp = torch.empty((N * cfg["splits"], C), dtype=torch.float32, device=x.device)
    c = torch.empty((2, N * G), dtype=torch.float32, device=x.device)
    with torch.cuda.device(x.device):
        stream = torch.cuda.current_stream(x.device).cuda_stream
        ext.group_norm_bwd(ext.GroupNormBwdParams(
            dy_ptr=dy.data_ptr(),
            x_ptr=x.data_ptr(),
            w_ptr=weight.data_ptr() if weight is not None else 0,
            b_ptr=bias.data_ptr() if bias is not None else 0,
            mean_ptr=mean.data_ptr(),
            rstd_ptr=rstd.data_ptr(),
            dwp_ptr=dwp.data_ptr(),
            dbp_ptr=dbp.data_ptr(),
            c_ptr=c.data_ptr(),
            dx_ptr=dx.data_ptr(),
            N=N, C=C, S=S, G=G, channels_last=int(cl), splits=cfg["splits"], chunk_s=cfg["chunk_s"],
            x_dtype=dtype_code(x.dtype), w_dtype=dtype_code(pdt), silu=int(bool(silu)), stream=stream,
        ))
        # Fixed-order sums of the per-block partials: the deterministic second pass.
        if dw is not None:
            dw.copy_(dwp.sum(0))
        if db is not None:
            db.copy_(dbp.sum(0))
