"""Normalization rules of ``fastgen.patch``: torch and diffusers norms -> fastgen ops.

Each patched ``forward`` computes the module's own function with a fastgen op when the
call is one the op reproduces (checked per call: ranks, dtypes, affine options), and
otherwise calls the original ``forward``. Shapes (N = normalized size):

    nn.LayerNorm / FP32LayerNorm   x (..., N)             -> layer_norm(x, weight, bias, eps)
    nn.RMSNorm / diffusers RMSNorm x (..., N)             -> rms_norm(x, weight, eps) (+ bias)
    nn.GroupNorm                   x (B, C, *spatial)     -> group_norm(x, G, weight, bias, eps)
    AdaLayerNormZero               x (B, S, N), emb (B, E) -> emb = linear(silu(emb)) -> 6 chunks,
                                   x = layer_norm_modulate(x, shift_msa, scale_msa)
    AdaLayerNormZeroSingle         same with 3 chunks
    SD35AdaLayerNormZeroX          9 chunks; the norm modulated twice -> two layer_norm_modulate passes
    AdaLayerNormContinuous         emb -> (scale, shift), x = layer_norm_modulate / rms_norm_modulate
    ResnetBlock2D (SiLU)           silu(norm1(x)), silu(norm2(h)) -> group_norm(..., activation="silu")

The AdaLN forwards are ``fastgen.nn.ada_norm``'s (the projection, the chunks and the fused
modulation, shared with ``fastgen.nn.AdaLayerNormZero`` / ``AdaLayerNormContinuous``); this
file adds the per-call check and diffusers' unfused math for calls the fused op does not
reproduce. Each rule returns a :class:`fastgen.patch.records.Plan`, which the patcher and the
report read.

Numerics: the fastgen ops accumulate in fp32 and round once to ``x.dtype``; for float32
models that is the same function as the originals up to summation order. diffusers'
16-bit Ada* paths round the norm before modulating; the fused op rounds once (closer to
the fp32 truth).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from fastgen.nn import ada_norm as ada
from fastgen.ops import group_norm, layer_norm, rms_norm
from fastgen.patch.core import Skipped, orig_forward, qualname, replaced, run, site, supported_float, swap_forward
from fastgen.patch.records import Plan
from fastgen.patch.serve import mark, param_dtype

try:  # diffusers is optional: without it only the torch rules apply
    from diffusers.models import normalization as _dn
    from diffusers.models.resnet import ResnetBlock2D as _ResnetBlock2D
except Exception:  # pragma: no cover - diffusers missing or broken
    _dn = None
    _ResnetBlock2D = None


def _param_ok(p, x: torch.Tensor, allow_fp32: bool) -> bool:
    return p is None or p.dtype == x.dtype or (allow_fp32 and p.dtype == torch.float32)


# ----------------------------------------------------------------------------- forwards


def _layer_norm_forward(self, x):
    if (isinstance(x, torch.Tensor) and supported_float(x) and x.dim() >= 1
            and _param_ok(self.weight, x, False) and _param_ok(self.bias, x, False)):
        return run(self, "layer_norm", layer_norm, x, self.weight, self.bias, self.eps)
    return orig_forward(self)(x)


def _fp32_layer_norm_forward(self, x):
    # diffusers FP32LayerNorm: F.layer_norm(x.float(), ..., w.float(), b.float()).to(x.dtype)
    if (isinstance(x, torch.Tensor) and supported_float(x) and x.dim() >= 1
            and _param_ok(self.weight, x, True) and _param_ok(self.bias, x, True)):
        return run(self, "layer_norm", layer_norm, x, self.weight, self.bias, self.eps)
    return orig_forward(self)(x)


def _torch_rms_norm_forward(self, x):
    if isinstance(x, torch.Tensor) and supported_float(x) and _param_ok(self.weight, x, False):
        eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps
        return run(self, "rms_norm", rms_norm, x, self.weight, eps)
    return orig_forward(self)(x)


def _diffusers_rms_norm_forward(self, x):
    # diffusers RMSNorm: fp32 statistics; the output has the weight's dtype when the weight is
    # 16-bit, the promoted dtype otherwise. The fused op returns x.dtype, which is the same
    # exactly when weight is None or has x's dtype; other mixes keep the original forward.
    if isinstance(x, torch.Tensor) and supported_float(x) and _param_ok(self.weight, x, False) \
            and (self.bias is None or self.bias.dtype == x.dtype):
        y = run(self, "rms_norm", rms_norm, x, self.weight, self.eps)
        return y if self.bias is None else y + self.bias
    return orig_forward(self)(x)


def _group_norm_forward(self, x):
    if (isinstance(x, torch.Tensor) and supported_float(x) and 3 <= x.dim() <= 5
            and _param_ok(self.weight, x, True) and _param_ok(self.bias, x, True)):
        return run(self, "group_norm", group_norm, x, self.num_groups, self.weight, self.bias, self.eps)
    return orig_forward(self)(x)


def _fused_kind(self, x, pairs):
    """Whether ``self.norm``'s modulation is fused on this call: False for a LayerNorm (layer_norm_modulate),
    True for an RMSNorm (rms_norm_modulate), None when the fused op does not reproduce the call."""
    norm = self.norm
    if not (isinstance(x, torch.Tensor) and x.dim() == 3 and supported_float(x)):
        return None
    if not all(shift.dtype == x.dtype and scale.dtype == x.dtype and shift.dim() == 2 for shift, scale in pairs):
        return None
    if isinstance(norm, nn.LayerNorm):
        fp32 = _dn is not None and isinstance(norm, _dn.FP32LayerNorm)
        return False if _param_ok(norm.weight, x, fp32) and _param_ok(norm.bias, x, fp32) else None
    if _dn is not None and isinstance(norm, _dn.RMSNorm):
        return True if norm.bias is None and _param_ok(norm.weight, x, False) else None
    return None


def _modulate(self, x, pairs) -> list:
    """``self.norm(x) * (1 + scale[:, None]) + shift[:, None]`` for each ``(shift, scale)``: fused
    (``fastgen.nn.ada_norm.norm_modulate``, run as this site runs its ops), else diffusers' own math."""
    rms = _fused_kind(self, x, pairs)
    if rms is None:
        n = self.norm(x)
        return [n * (1 + scale[:, None]) + shift[:, None] for shift, scale in pairs]
    call = functools.partial(run, self)
    return [ada.norm_modulate(self.norm, rms, x, shift, scale, call) for shift, scale in pairs]


def _ada_zero_forward(self, x, timestep=None, class_labels=None, hidden_dtype=None, emb=None):
    if self.emb is not None:
        emb = self.emb(timestep, class_labels, hidden_dtype=hidden_dtype)
    return ada.zero_forward(self, x, emb, _modulate)


def _ada_zero_single_forward(self, x, emb=None):
    return ada.zero_single_forward(self, x, emb, _modulate)


def _sd35_ada_zero_x_forward(self, hidden_states, emb=None):
    """SD 3.5's AdaLayerNormZeroX: one LayerNorm, modulated twice (attention and the dual
    attention branch) -> two layer_norm_modulate passes, no normalized tensor in memory."""
    return ada.zero_x_forward(self, hidden_states, emb, _modulate)


def _ada_continuous_forward(self, x, conditioning_embedding):
    return ada.continuous_forward(self, x, conditioning_embedding, _modulate)


def _group_norm_silu(block, norm: nn.GroupNorm, x):
    if (supported_float(x) and 3 <= x.dim() <= 5
            and _param_ok(norm.weight, x, True) and _param_ok(norm.bias, x, True)):
        return run(block, "group_norm", group_norm, x, norm.num_groups, norm.weight, norm.bias, norm.eps,
                   activation="silu")
    return torch.nn.functional.silu(norm(x))


def _resnet_forward(self, input_tensor, temb, *args, **kwargs):
    """diffusers ResnetBlock2D.forward with silu(norm(x)) fused (SiLU blocks only)."""
    hidden_states = _group_norm_silu(self, self.norm1, input_tensor)
    if self.upsample is not None:
        if hidden_states.shape[0] >= 64:
            input_tensor = input_tensor.contiguous()
            hidden_states = hidden_states.contiguous()
        input_tensor = self.upsample(input_tensor)
        hidden_states = self.upsample(hidden_states)
    elif self.downsample is not None:
        input_tensor = self.downsample(input_tensor)
        hidden_states = self.downsample(hidden_states)
    hidden_states = self.conv1(hidden_states)
    if self.time_emb_proj is not None:
        if not self.skip_time_act:
            temb = self.nonlinearity(temb)
        temb = self.time_emb_proj(temb)[:, :, None, None]
    if self.time_embedding_norm == "scale_shift":
        if temb is None:
            raise ValueError(f" `temb` should not be None when `time_embedding_norm` is {self.time_embedding_norm}")
        time_scale, time_shift = torch.chunk(temb, 2, dim=1)
        hidden_states = self.norm2(hidden_states)
        hidden_states = hidden_states * (1 + time_scale) + time_shift
        hidden_states = self.nonlinearity(hidden_states)
    else:
        if self.time_embedding_norm == "default" and temb is not None:
            hidden_states = hidden_states + temb
        hidden_states = _group_norm_silu(self, self.norm2, hidden_states)
    hidden_states = self.dropout(hidden_states)
    hidden_states = self.conv2(hidden_states)
    if self.conv_shortcut is not None:
        if self.training:
            input_tensor = input_tensor.contiguous()
        input_tensor = self.conv_shortcut(input_tensor)
    return (input_tensor + hidden_states) / self.output_scale_factor


# ----------------------------------------------------------------------------- rules


def _ada_norm_reason(module) -> str | None:
    norm = getattr(module, "norm", None)
    if isinstance(norm, nn.LayerNorm):
        return None if len(norm.normalized_shape) == 1 else "its LayerNorm normalizes more than one dim"
    if _dn is not None and isinstance(norm, _dn.RMSNorm):
        return None if len(norm.dim) == 1 else "its RMSNorm normalizes more than one dim"
    return f"its norm is a {type(norm).__name__}, not a LayerNorm / RMSNorm"


# diffusers AdaLN class -> (patched forward, modulations per forward)
_ADA = {} if _dn is None else {_dn.AdaLayerNormZero: (_ada_zero_forward, 1),
                               _dn.AdaLayerNormZeroSingle: (_ada_zero_single_forward, 1),
                               _dn.AdaLayerNormContinuous: (_ada_continuous_forward, 1)}
if _dn is not None and hasattr(_dn, "SD35AdaLayerNormZeroX"):
    _ADA[_dn.SD35AdaLayerNormZeroX] = (_sd35_ada_zero_x_forward, 2)
_LAYER_NORM, _RMS_NORM, _GROUP_NORM = Plan.of("layer_norm"), Plan.of("rms_norm"), Plan.of("group_norm")
_ONE_DIM = "normalizes more than one dim"


def _modulate_plan(module, passes: int = 1) -> Plan:
    """An AdaLN module's plan: its norm's fused modulation (``passes`` per forward), ``norm`` fused into it."""
    rms = _dn is not None and isinstance(getattr(module, "norm", None), _dn.RMSNorm)
    return Plan.of("rms_norm_modulate" if rms else "layer_norm_modulate", passes=passes, fuses=("norm",))


def _diffusers_rule(module):
    """``(forward, plan, reason)`` for the diffusers norms this file knows, or None."""
    cls = type(module)
    if cls is _dn.FP32LayerNorm:
        return _fp32_layer_norm_forward, _LAYER_NORM, None if len(module.normalized_shape) == 1 else _ONE_DIM
    if cls is _dn.RMSNorm:
        return _diffusers_rms_norm_forward, _RMS_NORM, None if len(module.dim) == 1 else _ONE_DIM
    if cls in _ADA:
        forward, passes = _ADA[cls]
        return forward, _modulate_plan(module, passes), _ada_norm_reason(module)
    return None


def _rule(module):
    """``(forward, plan, reason)`` for a module this file knows, or None.

    Exact classes only (a user subclass may have its own forward): a subclass is left alone.
    """
    cls = type(module)
    if _dn is not None:
        rule = _diffusers_rule(module)
        if rule is not None:
            return rule
    if cls is nn.LayerNorm:
        return _layer_norm_forward, _LAYER_NORM, None if len(module.normalized_shape) == 1 else _ONE_DIM
    if cls is nn.RMSNorm:
        return _torch_rms_norm_forward, _RMS_NORM, None if len(module.normalized_shape) == 1 else _ONE_DIM
    if cls is nn.GroupNorm:
        return _group_norm_forward, _GROUP_NORM, None
    return None


def _resnet_reason(module) -> str | None:
    if not isinstance(module.nonlinearity, nn.SiLU):
        return f"its nonlinearity is {type(module.nonlinearity).__name__}, not SiLU (no fused GroupNorm + that)"
    if type(module.norm1) is not nn.GroupNorm or type(module.norm2) is not nn.GroupNorm:
        return "norm1 / norm2 are not plain nn.GroupNorm"
    return None


def _known_skip_reason(module) -> str | None:
    """Why a diffusers module the patcher knows is deliberately left alone (not an error under strict)."""
    if _dn is not None and type(module) is getattr(_dn, "AdaLayerNormSingle", None):
        return ("holds no norm (timestep embedding -> 6 modulation vectors); PixArt applies the modulation "
                "inside BasicTransformerBlock, whose norm1 / norm2 LayerNorms are patched on their own")
    return None


def _unknown_norm_reason(module) -> str | None:
    """Why a norm-like module the rules do not cover is left alone (None: not a norm at all)."""
    cls = type(module)
    for base in (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm):
        if isinstance(module, base):
            return (f"a subclass of torch.nn.{base.__name__} (it may have its own forward); "
                    f"fastgen.patch patches exact classes only")
    if _dn is not None and cls.__module__ == _dn.__name__ and "Norm" in cls.__name__:
        return "this diffusers norm is not known to fastgen.patch (left as is)"
    return None


def _ops(module, plan: Plan) -> dict:
    """The fastgen ops a patched norm module calls, with what the patcher knows of their calls."""
    if plan.ops == ("group_norm",):
        return {"group_norm": dict(dtype=param_dtype(module), channels=module.num_channels,
                                   groups=module.num_groups)}
    return {op: dict(dtype=param_dtype(module)) for op in plan.ops}


def _resnet_ops(module) -> dict:
    dtype = param_dtype(module.norm1, module.conv1)
    return {"group_norm": [dict(dtype=dtype, channels=n.num_channels, groups=n.num_groups)
                           for n in (module.norm1, module.norm2)]}


def _swap(module, path, report, backend, strict, forward, plan: Plan, ops: dict):
    """Check the site's ops against the backend, then swap its forward; returns ``plan``, or None if left alone."""
    before = qualname(type(module))
    reference = site(path, report, backend, type(module).__name__, ops)
    if reference is None:
        return None
    swap_forward(module, forward, forward.__name__, backend)
    mark(module, backend, path, reference, strict)
    replaced(report, path, before, plan, reference)
    return plan


def _resnet_plan(module) -> Plan:
    """GroupNorm + SiLU fused for norm1, and for norm2 unless a scale-shift time embedding sits between."""
    fuses = ("norm1",) if module.time_embedding_norm == "scale_shift" else ("norm1", "norm2")
    return Plan.of("group_norm", args="activation='silu'", fuses=fuses,
                   detail=f"for {' and '.join(fuses)} + SiLU")


def patch_module(module, path: str, report, backend: str, norms: bool, activations: bool, strict: bool = False):
    """Patch ``module`` if a rule knows it; returns the :class:`Plan` it now runs (its ``fuses``: the
    child modules whose work the new forward does; the walk reports them as fused and leaves them
    alone), or None."""
    if activations and _ResnetBlock2D is not None and type(module) is _ResnetBlock2D:
        reason = _resnet_reason(module)
        if reason is not None:
            report.skipped.append(Skipped(path, type(module).__name__, reason))
            return None
        return _swap(module, path, report, backend, strict, _resnet_forward, _resnet_plan(module),
                     _resnet_ops(module))
    if not norms:
        return None
    rule = _rule(module)
    if rule is None:
        reason = _known_skip_reason(module)
        if reason is not None:
            report.skipped.append(Skipped(path, type(module).__name__, reason))
            return None
        reason = _unknown_norm_reason(module)
        if reason is not None:
            report.skipped.append(Skipped(path, type(module).__name__, reason, strict_error=True))
        return None
    forward, plan, reason = rule
    if reason is not None:
        report.skipped.append(Skipped(path, type(module).__name__, reason))
        return None
    return _swap(module, path, report, backend, strict, forward, plan, _ops(module, plan))
