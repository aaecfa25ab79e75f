"""CUDA C++ multi-tensor schedule-free AdamW launcher (``csrc/optim/schedulefree.cu`` through ``fastgen._C``).

Same signature as the Triton launcher ``fastgen.kernels.schedulefree.schedulefree_step`` and the
same cached device tables (``fastgen.kernels.multi_tensor``): one launch per call. The step's
scalars ``[1 - beta2^(k+1), c, lr (beta1 (1 - c) - 1), lr]`` are an fp32 device tensor read by
the kernel (``fastgen.optim.schedulefree.advance_schedule`` computes them on the device), so a
step can be captured in a CUDA graph. Per element (fp32 math, one rounding per store)::

    v = beta2 v + (1 - beta2) g^2;   u = g / (sqrt(v / bc2) + eps) + weight_decay y
    y = lerp(y, z, c) + y_coef u;    z = z - lr u

y, g, z, v are dense tensors of one dtype (float32, float16 or bfloat16) on one device.
"""

from __future__ import annotations

import torch

from fastgen.cuda import dtype_code, load_extension
from fastgen.kernels.multi_tensor import chunk_table, pointer_table

CHUNK = 4096  # elements per block (256 threads; 8 elements per thread per round, two rounds)


def schedulefree_step(ys, grads, zs, vs, *, scalars, beta2, eps, weight_decay):
    """One schedule-free step over lists (y, g, z, v of one dtype, one CUDA device, dense alike).
    ``scalars``: fp32 [4] tensor on that device."""
    if not ys:
        return
    if scalars.dtype != torch.float32 or scalars.numel() != 4 or scalars.device != ys[0].device:
        raise ValueError(f"schedulefree_step: scalars must be 4 fp32 values on {ys[0].device}, got {scalars.dtype} "
                         f"{tuple(scalars.shape)} on {scalars.device}")
    scalars = scalars.contiguous()
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
            beta2=float(beta2), eps=float(eps), weight_decay=float(weight_decay),
            stream=torch.cuda.current_stream(device).cuda_stream,
        ))
