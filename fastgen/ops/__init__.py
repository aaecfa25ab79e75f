"""Functional ops. Each lives in its own module, ``fastgen/ops/<op>.py``."""

from fastgen.ops.rms_norm import rms_norm, rms_norm_ref
from fastgen.ops.group_norm import group_norm, group_norm_ref
from fastgen.ops.layer_norm import layer_norm, layer_norm_ref
from fastgen.ops.modulate import (
    gated_residual,
    gated_residual_layer_norm_modulate,
    gated_residual_layer_norm_modulate_ref,
    gated_residual_ref,
    layer_norm_modulate,
    layer_norm_modulate_ref,
    rms_norm_modulate,
    rms_norm_modulate_ref,
)

__all__ = ["rms_norm", "rms_norm_ref"]
__all__ += ["layer_norm", "layer_norm_ref", "layer_norm_modulate", "layer_norm_modulate_ref",
            "rms_norm_modulate", "rms_norm_modulate_ref", "gated_residual", "gated_residual_ref",
            "gated_residual_layer_norm_modulate", "gated_residual_layer_norm_modulate_ref"]
__all__ += ["group_norm", "group_norm_ref"]
from fastgen.ops.rope import apply_rope, apply_rope_ref, rope_frequencies, rope_grid_ids  # noqa: E402
from fastgen.ops.qk_norm_rope import qk_norm_rope, qk_norm_rope_ref  # noqa: E402

__all__ += ["apply_rope", "apply_rope_ref", "rope_frequencies", "rope_grid_ids", "qk_norm_rope", "qk_norm_rope_ref"]
from fastgen.ops.attention import attention, attention_ref, scaled_dot_product_attention  # noqa: E402

__all__ += ["attention", "attention_ref", "scaled_dot_product_attention"]
from fastgen.ops.glu import glu, glu_ref  # noqa: E402

__all__ += ["glu", "glu_ref"]
from fastgen.ops.scale_shift import scale_shift, scale_shift_ref  # noqa: E402

__all__ += ["scale_shift", "scale_shift_ref"]
