"""CUDA C++ multi-tensor AdamW and Lion launchers (``csrc/optim/`` through ``fastgen._C``).

Same signatures as ``fastgen.kernels.adamw.adamw_step`` / ``fastgen.kernels.lion.lion_step``,
and the same cached device tables (``fastgen.kernels.multi_tensor``): one launch per call.
"""

from __future__ import annotations

import torch

from fastgen.cuda import dtype_code, load_extension
from fastgen.kernels.multi_tensor import chunk_table, pointer_table

CHUNK = 4096  # elements per block (256 threads, 16 each)


def _stream(device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def _lr_args(lr):
    if isinstance(lr, torch.Tensor):
        assert lr.dtype == torch.float32 and lr.numel() == 1
        return lr.data_ptr(), 0.0
    return 0, float(lr)


def adamw_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, *, lr, beta1, beta2, eps,
               weight_decay, amsgrad, maximize, stochastic_rounding=False, seed=0):
    """Update lists of parameters in place (shared dtypes, one CUDA device, all dense alike)."""
    if not params:
        return
    C = load_extension()
    table = chunk_table(params, CHUNK)
    lr_ptr, lr_value = _lr_args(lr)
    with torch.cuda.device(params[0].device):
        C.multi_tensor_adamw(
            pointer_table(params).data_ptr(), pointer_table(grads).data_ptr(), pointer_table(exp_avgs).data_ptr(),
            pointer_table(exp_avg_sqs).data_ptr(),
            pointer_table(max_exp_avg_sqs).data_ptr() if amsgrad else 0, pointer_table(steps).data_ptr(),
            table.numels.data_ptr(), table.chunk_ids.data_ptr(), table.chunk_offs.data_ptr(), table.num_chunks,
            CHUNK, dtype_code(params[0].dtype), dtype_code(grads[0].dtype), dtype_code(exp_avgs[0].dtype),
            lr_ptr, lr_value, float(beta1), float(beta2), float(eps), float(weight_decay), bool(amsgrad),
            bool(maximize), bool(stochastic_rounding), int(seed) & 0xFFFFFFFF, _stream(params[0].device),
        )


def lion_step(params, grads, exp_avgs, *, lr, beta1, beta2, weight_decay, maximize):
    """Update lists of parameters in place (shared dtypes, one CUDA device, all dense alike)."""
    if not params:
        return
    C = load_extension()
    table = chunk_table(params, CHUNK)
    lr_ptr, lr_value = _lr_args(lr)
    with torch.cuda.device(params[0].device):
        C.multi_tensor_lion(
            pointer_table(params).data_ptr(), pointer_table(grads).data_ptr(), pointer_table(exp_avgs).data_ptr(),
            table.numels.data_ptr(), table.chunk_ids.data_ptr(), table.chunk_offs.data_ptr(), table.num_chunks,
            CHUNK, dtype_code(params[0].dtype), dtype_code(grads[0].dtype), dtype_code(exp_avgs[0].dtype),
            lr_ptr, lr_value, float(beta1), float(beta2), float(weight_decay), bool(maximize),
            _stream(params[0].device),
        )
