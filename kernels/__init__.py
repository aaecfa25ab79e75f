"""fastgen's Triton kernels, one module per op; installed as ``fastgen.kernels``.

The implementations these modules provide are registered here, one line each beside
the launcher modules, so that ``fastgen.backend``'s registry knows them without
importing Triton: the op, the launcher module (imported when the implementation first
runs) and its own "can I serve this call" check from ``fastgen.limits``.
"""

from fastgen.backend import implements
from fastgen.limits import attention_reason, group_norm_reason, kernel_dtype_reason, rope_reason

implements("rms_norm", "triton", "fastgen.kernels.rms_norm", serves=kernel_dtype_reason)
for _op in ("layer_norm", "layer_norm_modulate", "rms_norm_modulate", "gated_residual",
            "gated_residual_layer_norm_modulate"):
    implements(_op, "triton", "fastgen.kernels.layer_norm", serves=kernel_dtype_reason)
implements("group_norm", "triton", "fastgen.kernels.group_norm", serves=group_norm_reason)
implements("apply_rope", "triton", "fastgen.kernels.rope", serves=rope_reason)
implements("qk_norm_rope", "triton", "fastgen.kernels.qk_norm_rope", serves=rope_reason)
implements("glu", "triton", "fastgen.kernels.glu", serves=kernel_dtype_reason)
implements("attention", "triton", "fastgen.kernels.attention", "fastgen.kernels.attention_bwd",
           serves=attention_reason)
implements("scale_shift", "triton", "fastgen.kernels.scale_shift", serves=kernel_dtype_reason)

# The optimizers' multi-tensor steps (fastgen.optim): they pass their own reasons to resolve
# (layouts, dtypes, norm types) instead of a call, so they register no check here.
for _op, _module in (("adamw", "adamw"), ("lion", "lion"), ("ema", "ema"), ("clip_grad_norm_", "clip_grad"),
                     ("adamw8bit", "adamw8bit"), ("prodigy", "prodigy"), ("schedulefree", "schedulefree")):
    implements(_op, "triton", f"fastgen.kernels.{_module}")

# The adapters' kernels (fastgen.adapters) and the VQ search (fastgen.vae.quantizer): they pass
# their own reasons to resolve as well.
implements("lora", "triton", "fastgen.kernels.lora")
implements("dora_row_norm", "triton", "fastgen.kernels.lora")
implements("quant_linear", "triton", "fastgen.kernels.quant_matmul")
implements("vq_nearest", "triton", "fastgen.kernels.vq")
