"""UNet2DCondition: the Stable Diffusion 1.x / 2.x / SDXL denoiser on fastgen's fused ops.

Same math and weights as diffusers' ``UNet2DConditionModel`` (the configurations SD 1.5 and
SDXL base use: ``CrossAttnDownBlock2D`` / ``DownBlock2D``, ``UNetMidBlock2DCrossAttn``,
``CrossAttnUpBlock2D`` / ``UpBlock2D``, positional time embedding, SDXL's ``text_time``
addition embedding, LCM's ``time_cond_proj_dim`` guidance embedding). Shapes, with ``C_i = block_out_channels[i]``::

    sample                 (B, in_channels, H, W)          the noisy latent (any H, W)
    timestep               scalar or (B,)
    encoder_hidden_states  (B, L, cross_attention_dim)     text tokens (L = 77 for CLIP)
    added_cond_kwargs      SDXL: text_embeds (B, P), time_ids (B, 6)
    timestep_cond          (B, time_cond_proj_dim)         LCM's guidance-scale (w) embedding, optional
    -> sample              (B, out_channels, H, W)

    temb  = MLP(sinusoid(t) [+ W_c timestep_cond]) [+ MLP([text_embeds, sinusoid(time_ids)])]   (B, 4 C_0)
    ResNet(x)       = x' + conv2(GNSiLU(conv1(GNSiLU(x)) + W silu(temb)))     x' = x or a 1x1 conv of x
    Transformer(x)  = x + proj_out(blocks(proj_in(GN(x))))  over the H*W tokens
    block(h):  h += Wo attn(qkv(LN1 h))                     self-attention, one GEMM for q, k, v
               h += Wo attn(Wq LN2 h, Wk ctx, Wv ctx)       cross-attention to the text
               h += W2 (a * gelu(g)),  [a, g] = W1 LN3 h     GEGLU feed-forward

Fused ops: every ``GroupNorm -> SiLU -> conv`` is one autograd node
(:func:`group_norm_silu_conv`: fastgen's fused GroupNorm+SiLU kernel, then the conv) that
keeps the GroupNorm input and its statistics for backward, not the activated tensor; each LayerNorm and the projection after it are one autograd node
(:func:`layer_norm_linear`, fastgen's LayerNorm kernels) that keeps the block input, not
the normalized tensor; the one attention call site is ``fastgen.ops.attention`` (q, k, v
read in place from the fused projection); GEGLU and the linear after it are one autograd
node (:func:`glu_linear`, ``fastgen.ops.glu`` kernels) that keeps only the projection
output. The recomputed tensors cost one elementwise / normalization pass each in the
backward; a transformer block keeps ~0.62x and a ResNet block ~0.34x of what diffusers'
keeps for backward.

Parameter names are diffusers' except the fused ``attn1.to_qkv`` and ``proj_in`` /
``proj_out``, which are linear layers here (diffusers keeps 1x1 convs when
``use_linear_projection=False``); ``from_diffusers`` / ``to_diffusers_state_dict`` convert.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from fastgen.backend import resolve
from fastgen.models._common import (FastgenModel, ModelConfig, ModelOutput, TimestepMLP, fuse_self_attention_qkv,
                                    split_self_attention_qkv, timestep_embedding)
from fastgen.ops import attention, gated_residual, glu, group_norm, layer_norm, layer_norm_modulate
from fastgen.ops._checks import kernel_dtype_reason
from fastgen.ops.group_norm import _as_ncs, _group_norm_bwd_op, _group_norm_fwd_op
from fastgen.ops.group_norm import _layout as _gn_layout
from fastgen.ops.group_norm import _unsupported as _gn_unsupported
from fastgen.ops.layer_norm import NORM_LAYER, _layer_norm_bwd_op, _layer_norm_fwd_op, _opt, as_rows3, unit_last
from fastgen.ops.layer_norm import resolve as _ln_resolve

try:  # what diffusers pipelines expect back with return_dict=True
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput
except Exception:  # diffusers absent: the same ``.sample`` (B, out_channels, H, W) holder
    UNet2DConditionOutput = ModelOutput  # type: ignore[misc]


DOWN_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")
MID_TYPES = ("UNetMidBlock2DCrossAttn", None)

# diffusers config keys this file implements only at one value: {key: accepted values}.
_FIXED = {
    "class_embed_type": (None,), "encoder_hid_dim": (None,), "encoder_hid_dim_type": (None,),
    "time_embedding_type": ("positional",), "resnet_time_scale_shift": ("default",),
    "dual_cross_attention": (False,), "only_cross_attention": (False,), "attention_type": ("default",),
    "num_attention_heads": (None,), "conv_in_kernel": (3,), "conv_out_kernel": (3,),
    "time_embedding_act_fn": (None,), "timestep_post_act": (None,),
    "cross_attention_norm": (None,), "class_embeddings_concat": (False,), "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1.0, 1), "mid_block_only_cross_attention": (None, False),
    "reverse_transformer_layers_per_block": (None,), "time_embedding_dim": (None,), "act_fn": ("silu", "swish"),
    "addition_embed_type": (None, "text_time"), "num_class_embeds": (None,),
}


# ----------------------------------------------------------------------------- config


@dataclass
class UNet2DConditionConfig(ModelConfig):
    """diffusers' ``UNet2DConditionModel`` config fields (same names, same meaning).

    As in diffusers, ``attention_head_dim`` is the number of attention **heads** per block
    (the head dim is ``channels // attention_head_dim``).
    """

    sample_size: Optional[int] = 64
    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: tuple = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
    mid_block_type: Optional[str] = "UNetMidBlock2DCrossAttn"
    up_block_types: tuple = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
    block_out_channels: tuple = (320, 640, 1280, 1280)
    layers_per_block: Union[int, tuple] = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    act_fn: str = "silu"
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: Union[int, tuple] = 768
    transformer_layers_per_block: Union[int, tuple] = 1
    attention_head_dim: Union[int, tuple] = 8
    use_linear_projection: bool = False
    upcast_attention: bool = False
    addition_embed_type: Optional[str] = None
    addition_time_embed_dim: Optional[int] = None
    projection_class_embeddings_input_dim: Optional[int] = None
    # LCM students (w-conditioned): the width of ``timestep_cond``, the guidance-scale embedding that
    # ``time_embedding.cond_proj`` (Linear(time_cond_proj_dim, block_out_channels[0], bias=False)) adds to
    # the sinusoidal timestep features before ``time_embedding.linear_1``; None: no such input.
    time_cond_proj_dim: Optional[int] = None

    @classmethod
    def preset(cls, name: str) -> "UNet2DConditionConfig":
        """``"sd15"`` (Stable Diffusion 1.5) or ``"sdxl"`` (SDXL base 1.0)."""
        key = name.lower().replace("-", "").replace("_", "").replace(".", "")
        return cls._from_presets(_PRESETS, name, key)

    # per-block lists (diffusers accepts an int for all blocks)
    def _per_block(self, value) -> list:
        n = len(self.down_block_types)
        return [value] * n if isinstance(value, (int, float)) or value is None else list(value)

    @property
    def time_embed_dim(self) -> int:
        return self.block_out_channels[0] * 4


_PRESETS = {
    "sd15": dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8),
    "sdxl": dict(
        sample_size=128, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(320, 640, 1280), cross_attention_dim=2048, transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(5, 10, 20), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    ),
}
_PRESETS["stablediffusion15"] = _PRESETS["sd15"]
_PRESETS["sdxlbase"] = _PRESETS["sdxl"]


def _layers_per_transformer(spec, num_layers: int) -> list:
    return [spec] * num_layers if isinstance(spec, int) else list(spec)


# ----------------------------------------------------------------------------- GEGLU + linear


class _GLULinear(torch.autograd.Function):
    """``y = glu(u) @ W^T + b`` keeping only ``u`` for backward (``glu(u)`` is recomputed).

    u (M, 2N) -> glu(u) = a * act(g) (M, N), W (O, N). Saving ``u`` (which the projection
    before produced anyway) instead of ``glu(u)`` removes an (M, N) tensor (4x the model
    width in a GEGLU feed-forward) from what the block keeps for backward. Backward:
    ``h = glu(u)``; ``dW = dy^T h``, ``db = sum dy``, ``du = glu'(u) (dy W)``. On the torch
    path the derivative is a closed form in fp32; on a kernel backend the
    ``fastgen::glu_fwd`` / ``glu_bwd`` kernels run.
    """

    @staticmethod
    def forward(ctx, u, weight, bias, activation, impl):
        ctx.save_for_backward(u, weight)
        ctx.activation, ctx.impl, ctx.has_bias = activation, impl, bias is not None
        return F.linear(_glu(u, activation, impl), weight, bias)

    @staticmethod
    def backward(ctx, dy):
        u, weight = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1])
        dw = None
        if ctx.needs_input_grad[1]:
            h = _glu(u, ctx.activation, ctx.impl)
            dw = dy2.t().mm(h.reshape(-1, h.shape[-1]))
        db = dy2.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        du = _glu_grad(dy.matmul(weight), u, ctx.activation, ctx.impl) if ctx.needs_input_grad[0] else None
        return du, dw, db, None, None


def _acc(t: Tensor) -> torch.dtype:
    """fp32 math, float64 for float64 tensors."""
    return torch.promote_types(t.dtype, torch.float32)


def _glu(u: Tensor, activation: str, impl: str) -> Tensor:
    if impl == "torch":
        return glu(u, activation, backend="torch")
    from fastgen.ops.glu import _as_rows, _glu_fwd_op

    return _glu_fwd_op(_as_rows(u), activation, impl).view(*u.shape[:-1], u.shape[-1] // 2)


def _glu_grad(da: Tensor, u: Tensor, activation: str, impl: str) -> Tensor:
    if impl != "torch":
        from fastgen.ops.glu import _as_rows, _glu_bwd_op

        rows = _as_rows(u)
        return _glu_bwd_op(da.reshape(rows.shape[0], -1).contiguous(), rows, activation, impl).view(u.shape)
    x, g = u.to(_acc(u)).chunk(2, dim=-1)
    d = da.to(x.dtype)
    if activation == "gelu":
        cdf = 0.5 * (1.0 + torch.erf(g * (1.0 / math.sqrt(2.0))))
        act, dact = g * cdf, cdf + g * torch.exp(-0.5 * g * g) * (1.0 / math.sqrt(2.0 * math.pi))
    elif activation == "silu":
        s = torch.sigmoid(g)
        act, dact = g * s, s * (1.0 + g * (1.0 - s))
    else:
        raise ValueError(f"glu_linear: activation {activation!r} not supported (gelu = GEGLU, silu = SwiGLU)")
    return torch.cat([d * act, d * x * dact], dim=-1).to(u.dtype)


def glu_linear(u: Tensor, linear: nn.Linear, activation: str = "gelu", backend: Optional[str] = "auto") -> Tensor:
    """``linear(fastgen.ops.glu(u, activation))`` without storing the GLU output for backward.

    ``u`` (..., 2N) -> (..., linear.out_features); ``activation`` "gelu" (GEGLU) or "silu" (SwiGLU).
    """
    impl = resolve("glu", backend, u.device, {"triton": kernel_dtype_reason(u), "cuda": "glu has no CUDA kernel"})
    if not torch.is_grad_enabled() or not (u.requires_grad or linear.weight.requires_grad):
        return F.linear(glu(u, activation, backend=impl), linear.weight, linear.bias)
    return _GLULinear.apply(u, linear.weight, linear.bias, activation, impl)


# ----------------------------------------------------------------------------- LayerNorm + linear


def _b(t: Optional[Tensor]) -> Optional[Tensor]:
    """Per-sample modulation (B, N) -> (B, 1, N) with a unit last stride (the kernels' form)."""
    return None if t is None else unit_last(t.unsqueeze(1) if t.dim() == 2 else t)


class _NormLinear(torch.autograd.Function):
    """``[x_new = x + gate * r;]  n = LN(x_new) [* (1 + scale) + shift];  out = n W^T + b``.

    One autograd node for what starts a pre-norm sublayer: the optional gated residual of the
    previous sublayer, the LayerNorm (optionally AdaLN-modulated, per sample) and the projection.
    Forward: one fused LayerNorm kernel (``fastgen::layer_norm_fwd``: residual, norm and
    modulation in one pass) and the GEMM. Saved for backward: ``x_new`` (or ``x``), ``r``, the
    per-row statistics and the small per-sample vectors — not ``n``, which the backward
    recomputes (one normalization pass) for ``dW = dout^T n``. Returns ``out`` or ``(out, x_new)``.

    Shapes: x, r (B, S, N) (x may be any (..., N) without modulation); gate / shift / scale (B, N);
    W (O, N). The torch path is fp32 math with one rounding per output (``x_new`` rounded to x's
    dtype before it is normalized, as the fused kernel does) and closed-form backward formulas.
    """

    @staticmethod
    def forward(ctx, x, r, gate, shift, scale, ln_w, ln_b, eps, weight, bias, impl):
        ctx.eps, ctx.impl, ctx.has_bias, ctx.shape = eps, impl, bias is not None, x.shape
        ctx.has_res, ctx.mod_shapes = r is not None, [None if t is None else t.shape for t in (gate, shift, scale)]
        if impl == "torch":
            cd = _acc(x)
            h = x if r is None else (x.to(cd) + gate.to(cd).unsqueeze(1) * r.to(cd)).to(x.dtype)
            n = _norm_mod_torch(h, shift, scale, ln_w, ln_b, eps)
            ctx.save_for_backward(h, r, gate, shift, scale, ln_w, ln_b, weight)
        else:
            x3 = as_rows3(x) if r is None and shift is None else unit_last(x)
            n, x_new, mean, rstd = _layer_norm_fwd_op(x3, unit_last(r), _b(gate), _b(shift), _b(scale), ln_w, ln_b,
                                                      eps, NORM_LAYER, impl)
            h = x3 if r is None else x_new
            ctx.save_for_backward(h, unit_last(r), _b(gate), _b(shift), _b(scale), ln_w, ln_b, weight, mean, rstd)
            n, h = n.view(x.shape), h.view(x.shape)
        ctx.set_materialize_grads(False)  # x_new's gradient may be absent
        out = F.linear(n, weight, bias)
        return out if r is None else (out, h)

    @staticmethod
    def backward(ctx, dout, dxnew=None):
        need = ctx.needs_input_grad
        if ctx.impl == "torch":
            h, r, gate, shift, scale, ln_w, ln_b, weight = ctx.saved_tensors
            n = _norm_mod_torch(h, shift, scale, ln_w, ln_b, ctx.eps)
        else:
            h, r, gate, shift, scale, ln_w, ln_b, weight, mean, rstd = ctx.saved_tensors
            n = _layer_norm_fwd_op(h, None, None, shift, scale, ln_w, ln_b, ctx.eps, NORM_LAYER, ctx.impl)[0]
        N = h.shape[-1]
        d2 = dout.reshape(-1, dout.shape[-1])
        dw = d2.t().mm(n.reshape(-1, N)) if need[8] else None
        db = d2.sum(0) if ctx.has_bias and need[9] else None
        dn = dout.matmul(weight).reshape(h.shape)
        if ctx.impl == "torch":
            dh, dg, dsh, dsc, dlw, dlb = _norm_mod_backward_torch(dn, dxnew, h, r, gate, scale, ln_w, ln_b, ctx.eps)
        else:
            grads = [_opt(g) for g in _layer_norm_bwd_op(
                dn.contiguous(), None if dxnew is None else unit_last(dxnew.reshape(h.shape)), h, r, gate, scale,
                ln_w, ln_b, mean, rstd, True, NORM_LAYER, ctx.impl)]
            dh, dg, dsh, dsc, dlw, dlb = grads[0], grads[2], grads[3], grads[4], grads[5], grads[6]
            if dh is None:
                dh = dxnew
            if scale is not None and dsh is None:
                dsh = dn.sum(1, keepdim=True)
        dr = None
        if ctx.has_res and need[1]:
            if ctx.impl == "torch":
                cd = _acc(dh)
                dr = (dh.to(cd) * gate.to(cd).reshape(gate.shape[0], 1, -1)).to(r.dtype)
            else:
                dr = _opt(grads[1])
        gs, ss, cs = ctx.mod_shapes
        return (dh.reshape(ctx.shape) if need[0] else None, dr,
                dg.reshape(gs) if dg is not None and need[2] else None,
                dsh.reshape(ss) if dsh is not None and need[3] else None,
                dsc.reshape(cs) if dsc is not None and need[4] else None,
                dlw if need[5] else None, dlb if need[6] else None, None, dw, db, None)


def _norm_mod_torch(h, shift, scale, ln_w, ln_b, eps):
    if shift is None:
        return layer_norm(h, ln_w, ln_b, eps, backend="torch")
    return layer_norm_modulate(h, shift, scale, eps, ln_w, ln_b, backend="torch")


def _norm_mod_backward_torch(dn, dxnew, h, r, gate, scale, ln_w, ln_b, eps):
    """Closed-form fp32 backward of x_new = x + gate r; n = (LN(x_new) w + b) (1 + scale) + shift."""
    N, cd = h.shape[-1], _acc(h)
    hf = h.to(cd)
    xc = hf - hf.mean(-1, keepdim=True)
    rs = torch.rsqrt(xc.square().mean(-1, keepdim=True) + eps)
    xhat, d = xc * rs, dn.to(cd)
    dsh = dsc = None
    if scale is not None:
        aff = xhat if ln_w is None else xhat * ln_w.to(cd)
        aff = aff if ln_b is None else aff + ln_b.to(cd)
        dsc, dsh = (d * aff).sum(1).to(scale.dtype), d.sum(1).to(scale.dtype)
        d = d * (1 + scale.to(cd).unsqueeze(1))
    dlw = None if ln_w is None else (d * xhat).reshape(-1, N).sum(0).to(ln_w.dtype)
    dlb = None if ln_b is None else d.reshape(-1, N).sum(0).to(ln_b.dtype)
    g = d if ln_w is None else d * ln_w.to(cd)
    dh = rs * (g - g.mean(-1, keepdim=True) - xhat * (g * xhat).mean(-1, keepdim=True))
    if dxnew is not None:
        dh = dh + dxnew.to(cd).reshape(dh.shape)
    dg = None if r is None else (dh * r.to(cd)).sum(1).to(gate.dtype)
    return dh.to(h.dtype), dg, dsh, dsc, dlw, dlb


def layer_norm_linear(x: Tensor, norm: nn.LayerNorm, linear: nn.Linear, backend: Optional[str] = "auto",
                      shift: Optional[Tensor] = None, scale: Optional[Tensor] = None,
                      residual: Optional[Tensor] = None, gate: Optional[Tensor] = None):
    """``linear(LN(x_new) [* (1 + scale) + shift])`` without storing the normalized tensor for backward.

    ::

        x                  (..., N), or (B, S, N) with modulation / residual
        shift, scale       (B, N) per-sample AdaLN modulation (optional, together)
        residual, gate     (B, S, N), (B, N): x_new = x + gate * residual first (optional, together)
        -> out (..., linear.out_features), or (out, x_new) when a residual is given

    What a pre-norm transformer sublayer starts with; ``norm`` holds the LayerNorm's eps and
    (optional) affine parameters. Kernel backends run fastgen's fused LayerNorm kernels.
    """
    impl = _ln_resolve("layer_norm", backend, x)
    w = None if norm.weight is None else norm.weight.contiguous()
    b = None if norm.bias is None else norm.bias.contiguous()
    if not torch.is_grad_enabled():
        h = x if residual is None else gated_residual(x, residual, gate, backend=impl)
        n = layer_norm(h, w, b, norm.eps, backend=impl) if shift is None else \
            layer_norm_modulate(h, shift, scale, norm.eps, w, b, backend=impl)
        out = F.linear(n, linear.weight, linear.bias)
        return out if residual is None else (out, h)
    return _NormLinear.apply(x, residual, gate, shift, scale, w, b, float(norm.eps), linear.weight, linear.bias, impl)


# ----------------------------------------------------------------------------- GroupNorm + SiLU + conv


class _GroupNormSiLUConv(torch.autograd.Function):
    """``y = conv2d(silu(GroupNorm(x)), W, b)`` keeping ``x`` (and the per-group statistics) for
    backward, not ``silu(GroupNorm(x))``, which the backward recomputes (one pass over x) for the
    weight gradient ``dW = conv2d_weight(a, dy)``; ``da = conv2d_input(W, dy)`` then goes through the
    GroupNorm+SiLU backward. x (N, C, H, W), W (O, C, k, k), stride 1. Torch path: fp32 math
    (F.group_norm + SiLU, one rounding; closed-form backward); a kernel backend runs the
    ``fastgen::group_norm_fwd`` / ``group_norm_bwd`` kernels (contiguous or channels-last x).
    """

    @staticmethod
    def forward(ctx, x, gn_w, gn_b, groups, eps, weight, bias, padding, impl):
        ctx.groups, ctx.eps, ctx.padding, ctx.impl, ctx.has_bias = groups, eps, padding, impl, bias is not None
        if impl == "torch":
            a = group_norm(x, groups, gn_w, gn_b, eps, "silu", backend="torch")
            ctx.save_for_backward(x, gn_w, gn_b, weight)
        else:
            ctx.fmt, ctx.shape = _gn_layout(x), x.shape
            x3 = _as_ncs(x, ctx.fmt)
            a, mean, rstd = _group_norm_fwd_op(x3, gn_w, gn_b, groups, eps, True, impl)
            a = a.view(x.shape)
            ctx.save_for_backward(x3, gn_w, gn_b, weight, mean, rstd)
        return F.conv2d(a, weight, bias, padding=padding)

    @staticmethod
    def backward(ctx, dy):
        need = ctx.needs_input_grad
        if ctx.impl == "torch":
            x, gn_w, gn_b, weight = ctx.saved_tensors
            a = group_norm(x, ctx.groups, gn_w, gn_b, ctx.eps, "silu", backend="torch")
        else:
            x3, gn_w, gn_b, weight, mean, rstd = ctx.saved_tensors
            x = x3.view(ctx.shape)
            a = _group_norm_fwd_op(x3, gn_w, gn_b, ctx.groups, ctx.eps, True, ctx.impl)[0].view(ctx.shape)
        dw = torch.nn.grad.conv2d_weight(a, weight.shape, dy, padding=ctx.padding) if need[5] else None
        db = dy.sum((0, 2, 3)) if ctx.has_bias and need[6] else None
        da = torch.nn.grad.conv2d_input(x.shape, weight, dy, padding=ctx.padding)
        if ctx.impl == "torch":
            dx, dgw, dgb = _gn_silu_backward_torch(da, x, gn_w, gn_b, ctx.groups, ctx.eps)
        else:
            da3 = _as_ncs(da, ctx.fmt)
            if da3.stride() != x3.stride():
                da3 = torch.empty_like(x3).copy_(da3)
            dx, dgw, dgb = _group_norm_bwd_op(da3, x3, gn_w, gn_b, mean, rstd, ctx.groups, True, ctx.impl)
            dx = dx.view(ctx.shape)
        return (dx if need[0] else None, dgw if need[1] else None, dgb if need[2] else None, None, None,
                dw, db, None, None)


def _gn_silu_backward_torch(da: Tensor, x: Tensor, w: Tensor, b: Tensor, groups: int, eps: float):
    """Closed-form backward of silu(GroupNorm(x) * w + b) in fp32 (float64 for float64)."""
    cd = _acc(x)
    N, C = x.shape[:2]
    xg = x.to(cd).reshape(N, groups, -1)
    xc = xg - xg.mean(-1, keepdim=True)
    r = torch.rsqrt(xc.square().mean(-1, keepdim=True) + eps)
    xhat = (xc * r).reshape(x.shape)
    shp = (1, C) + (1,) * (x.dim() - 2)
    z = xhat * w.to(cd).view(shp) + b.to(cd).view(shp)
    sg = torch.sigmoid(z)
    dz = da.to(cd) * sg * (1 + z * (1 - sg))
    red = [0] + list(range(2, x.dim()))
    dw, db = (dz * xhat).sum(red), dz.sum(red)
    g = (dz * w.to(cd).view(shp)).reshape(N, groups, -1)
    xh = xhat.reshape(N, groups, -1)
    dx = r * (g - g.mean(-1, keepdim=True) - xh * (g * xh).mean(-1, keepdim=True))
    return dx.reshape(x.shape).to(x.dtype), dw.to(w.dtype), db.to(b.dtype)


def group_norm_silu_conv(x: Tensor, norm: nn.GroupNorm, conv: nn.Conv2d, backend: Optional[str] = "auto") -> Tensor:
    """``conv(silu(norm(x)))`` (GroupNorm with affine parameters, a stride-1 conv) without storing the
    normalized and activated tensor for backward. x (N, C, H, W) -> (N, conv.out_channels, H', W')."""
    impl = resolve("group_norm", backend, x.device, _gn_unsupported(x, norm.num_groups))
    if not torch.is_grad_enabled() or conv.stride != (1, 1) or conv.dilation != (1, 1) or conv.groups != 1:
        a = group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps, "silu", backend=impl)
        return conv(a)
    return _GroupNormSiLUConv.apply(x, norm.weight, norm.bias, norm.num_groups, float(norm.eps), conv.weight,
                                    conv.bias, conv.padding, impl)


# ----------------------------------------------------------------------------- resnet / sampling


class ResnetBlock2D(nn.Module):
    """``x' + conv2(GNSiLU(conv1(GNSiLU(x)) + time_emb_proj(silu(temb))))`` (diffusers keys).

    Each ``conv(GNSiLU(.))`` is one :func:`group_norm_silu_conv` node: the block keeps x and the
    conv1 output (+ temb) for backward, not the two normalized-and-activated tensors."""

    def __init__(self, cin: int, cout: int, temb_dim: int, groups: int, eps: float, scale: float = 1.0,
                 backend: Optional[str] = "auto"):
        super().__init__()
        self.scale, self.backend = float(scale), backend
        self.norm1 = nn.GroupNorm(groups, cin, eps=eps)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_dim, cout)
        self.norm2 = nn.GroupNorm(groups, cout, eps=eps)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x: Tensor, temb_act: Tensor) -> Tensor:
        """x (B, cin, H, W), temb_act = silu(temb) (B, temb_dim) -> (B, cout, H, W)."""
        h = group_norm_silu_conv(x, self.norm1, self.conv1, self.backend)
        h = h + self.time_emb_proj(temb_act)[:, :, None, None]
        h = group_norm_silu_conv(h, self.norm2, self.conv2, self.backend)
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        out = skip + h
        return out if self.scale == 1.0 else out / self.scale


class _Conv(nn.Module):
    """Holds ``conv`` (diffusers' ``downsamplers.0.conv`` / ``upsamplers.0.conv`` keys)."""

    def __init__(self, c: int, stride: int = 1, padding: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=stride, padding=padding)


class Downsample2D(_Conv):
    def __init__(self, c: int, padding: int):
        super().__init__(c, stride=2, padding=padding)
        self.pad = padding

    def forward(self, x: Tensor) -> Tensor:
        if self.pad == 0:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample2D(_Conv):
    def forward(self, x: Tensor, size=None) -> Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest") if size is None else \
            F.interpolate(x, size=size, mode="nearest")
        return self.conv(x)


# ----------------------------------------------------------------------------- transformer


class Attention(nn.Module):
    """Self-attention (fused ``to_qkv``) or cross-attention (``to_q``, ``to_k``, ``to_v``)."""

    def __init__(self, dim: int, heads: int, context_dim: Optional[int], backend: Optional[str] = "auto"):
        super().__init__()
        self.heads, self.backend, self.cross = heads, backend, context_dim is not None
        if self.cross:
            self.to_q = nn.Linear(dim, dim, bias=False)
            self.to_k = nn.Linear(context_dim, dim, bias=False)
            self.to_v = nn.Linear(context_dim, dim, bias=False)
        else:
            self.to_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])

    def forward(self, h: Tensor, norm: nn.LayerNorm, context: Optional[Tensor] = None) -> Tensor:
        """h (B, S, C) the residual stream (normalized here by ``norm``), context (B, L, C_ctx)."""
        B, S, C = h.shape
        H = self.heads
        if self.cross:
            q = layer_norm_linear(h, norm, self.to_q, self.backend).view(B, S, H, C // H)
            k = self.to_k(context).view(B, context.shape[1], H, C // H)
            v = self.to_v(context).view(B, context.shape[1], H, C // H)
        else:
            q, k, v = layer_norm_linear(h, norm, self.to_qkv, self.backend).view(B, S, 3, H, C // H).unbind(2)
        o = attention(q, k, v, layout="bshd", backend=self.backend)
        return self.to_out[0](o.reshape(B, S, C))


class _GEGLUProj(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner)


class FeedForward(nn.Module):
    """GEGLU feed-forward, keys ``net.0.proj`` and ``net.2`` as diffusers' FeedForward."""

    def __init__(self, dim: int, backend: Optional[str] = "auto"):
        super().__init__()
        self.backend = backend
        self.net = nn.ModuleList([_GEGLUProj(dim, 4 * dim), nn.Identity(), nn.Linear(4 * dim, dim)])

    def forward(self, h: Tensor, norm: nn.LayerNorm) -> Tensor:
        return glu_linear(layer_norm_linear(h, norm, self.net[0].proj, self.backend), self.net[2], "gelu", self.backend)


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, context_dim: int, backend: Optional[str] = "auto"):
        super().__init__()
        self.backend = backend
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, None, backend)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, context_dim, backend)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, backend)

    def forward(self, h: Tensor, context: Tensor) -> Tensor:
        h = self.attn1(h, self.norm1) + h
        h = self.attn2(h, self.norm2, context) + h
        return self.ff(h, self.norm3) + h


class Transformer2DModel(nn.Module):
    """``x + proj_out(blocks(proj_in(GroupNorm(x))))`` over the H*W tokens of x."""

    def __init__(self, channels: int, heads: int, layers: int, context_dim: int, groups: int,
                 backend: Optional[str] = "auto"):
        super().__init__()
        self.groups, self.backend = groups, backend
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, channels)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(channels, heads, context_dim, backend) for _ in range(layers)])
        self.proj_out = nn.Linear(channels, channels)

    def forward(self, x: Tensor, context: Tensor, ckpt) -> Tensor:
        B, C, H, W = x.shape
        h = group_norm(x, self.groups, self.norm.weight, self.norm.bias, 1e-6, None, self.backend)
        h = self.proj_in(h.permute(0, 2, 3, 1).reshape(B, H * W, C))
        for blk in self.transformer_blocks:
            h = ckpt(blk, h, context)
        h = self.proj_out(h).reshape(B, H, W, C).permute(0, 3, 1, 2).contiguous()
        return h + x


# ----------------------------------------------------------------------------- U-Net blocks


class _TimeEmbedding(TimestepMLP):
    """diffusers' ``TimestepEmbedding`` with optional ``cond_proj``:
    ``linear_2(silu(linear_1(x [+ cond_proj(cond)])))``, x ``(B, C_0)``, cond ``(B, time_cond_proj_dim)``."""

    def __init__(self, in_dim: int, out_dim: int, cond_proj_dim: Optional[int] = None):
        super().__init__(in_dim, out_dim)
        self.cond_proj = nn.Linear(cond_proj_dim, in_dim, bias=False) if cond_proj_dim is not None else None

    def forward(self, x: Tensor, cond: Optional[Tensor] = None) -> Tensor:
        if cond is not None:
            x = x + self.cond_proj(cond)
        return super().forward(x)


class _Stage(nn.Module):
    """One down / up block or the mid block: resnets, optional transformers, optional resampler."""

    def __init__(self, resnets, attentions, sampler=None, kind="down"):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList(attentions) if attentions else None
        if sampler is not None:
            setattr(self, "downsamplers" if kind == "down" else "upsamplers", nn.ModuleList([sampler]))


class UNet2DCondition(FastgenModel):
    """The SD / SDXL U-Net. ``UNet2DCondition(UNet2DConditionConfig.preset("sdxl"))``, or
    ``UNet2DCondition.from_diffusers(pipe.unet)`` / ``.from_pretrained(dir)``; ``backend`` is
    passed to every op."""

    config_class = UNet2DConditionConfig

    def __init__(self, config: Optional[UNet2DConditionConfig] = None, backend: Optional[str] = "auto"):
        config = UNet2DConditionConfig() if config is None else config
        _validate_config(config)
        super().__init__(config, backend)
        c = config
        ch = list(c.block_out_channels)
        n = len(ch)
        heads = c._per_block(c.attention_head_dim)
        ctx = c._per_block(c.cross_attention_dim)
        lpb = c._per_block(c.layers_per_block)
        tlpb = c._per_block(c.transformer_layers_per_block)
        G, eps, T = c.norm_num_groups, c.norm_eps, c.time_embed_dim

        def res(cin, cout, scale=1.0):
            return ResnetBlock2D(cin, cout, T, G, eps, scale, backend)

        def tf(chn, i, layers):
            return Transformer2DModel(chn, heads[i], layers, ctx[i], G, backend)

        self.conv_in = nn.Conv2d(c.in_channels, ch[0], 3, padding=1)
        self.time_embedding = _TimeEmbedding(ch[0], T, c.time_cond_proj_dim)
        if c.addition_embed_type == "text_time":
            self.add_embedding = TimestepMLP(c.projection_class_embeddings_input_dim, T)
        self.down_blocks = nn.ModuleList()
        cout = ch[0]
        for i, kind in enumerate(c.down_block_types):
            cin, cout = cout, ch[i]
            layers = _layers_per_transformer(tlpb[i], lpb[i])
            resnets = [res(cin if j == 0 else cout, cout) for j in range(lpb[i])]
            attns = [tf(cout, i, layers[j]) for j in range(lpb[i])] if kind == "CrossAttnDownBlock2D" else None
            down = Downsample2D(cout, c.downsample_padding) if i < n - 1 else None
            self.down_blocks.append(_Stage(resnets, attns, down, "down"))
        self.mid_block = None
        if c.mid_block_type is not None:
            layers = tlpb[-1] if isinstance(tlpb[-1], int) else tlpb[-1][0]
            self.mid_block = _Stage([res(ch[-1], ch[-1], c.mid_block_scale_factor),
                                     res(ch[-1], ch[-1], c.mid_block_scale_factor)],
                                    [tf(ch[-1], n - 1, layers)])
        self.up_blocks = nn.ModuleList()
        rch, rheads, rctx = ch[::-1], heads[::-1], ctx[::-1]
        rlpb, rtlpb = lpb[::-1], tlpb[::-1]
        cout = rch[0]
        for i, kind in enumerate(c.up_block_types):
            prev, cout = cout, rch[i]
            cin = rch[min(i + 1, n - 1)]
            nl = rlpb[i] + 1
            layers = _layers_per_transformer(rtlpb[i], nl)
            resnets = [res((prev if j == 0 else cout) + (cin if j == nl - 1 else cout), cout) for j in range(nl)]
            attns = None
            if kind == "CrossAttnUpBlock2D":
                attns = [Transformer2DModel(cout, rheads[i], layers[j], rctx[i], G, backend) for j in range(nl)]
            up = Upsample2D(cout) if i < n - 1 else None
            self.up_blocks.append(_Stage(resnets, attns, up, "up"))
        self.conv_norm_out = nn.GroupNorm(G, ch[0], eps=eps)
        self.conv_out = nn.Conv2d(ch[0], c.out_channels, 3, padding=1)

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        sample: Tensor,
        timestep: Union[Tensor, float, int],
        encoder_hidden_states: Tensor,
        class_labels: Optional[Tensor] = None,
        timestep_cond: Optional[Tensor] = None,
        attention_mask: Optional[Tensor] = None,
        cross_attention_kwargs: Optional[dict] = None,
        added_cond_kwargs: Optional[dict] = None,
        down_block_additional_residuals: Optional[tuple] = None,
        mid_block_additional_residual: Optional[Tensor] = None,
        down_intrablock_additional_residuals: Optional[tuple] = None,
        encoder_attention_mask: Optional[Tensor] = None,
        return_dict: bool = True,
    ):
        """diffusers' ``UNet2DConditionModel.forward`` arguments; returns ``UNet2DConditionOutput``
        (``return_dict=True``) or ``(sample,)``. ``timestep_cond`` (B, time_cond_proj_dim): the LCM
        guidance embedding, for a config with ``time_cond_proj_dim`` (omitted: no term is added, as in
        diffusers). Masks, ControlNet / adapter residuals, class
        labels and attention-processor kwargs are not supported (a clear error)."""
        c = self.config
        unsupported = dict(class_labels=class_labels, attention_mask=attention_mask,
                           encoder_attention_mask=encoder_attention_mask,
                           down_block_additional_residuals=down_block_additional_residuals,
                           mid_block_additional_residual=mid_block_additional_residual,
                           down_intrablock_additional_residuals=down_intrablock_additional_residuals)
        given = [k for k, v in unsupported.items() if v is not None]
        if cross_attention_kwargs:
            given.append(f"cross_attention_kwargs={sorted(cross_attention_kwargs)}")
        if given:
            raise NotImplementedError(f"UNet2DCondition.forward: {', '.join(given)} not supported by the fastgen "
                                      "U-Net (use the diffusers model for masks, ControlNet / adapter residuals, "
                                      "class labels, LoRA scales or custom attention processors)")
        self._check_inputs(sample, encoder_hidden_states)
        B = sample.shape[0]
        if timestep_cond is not None:
            timestep_cond = self._check_timestep_cond(timestep_cond, B)
        up_factor = 2 ** sum(1 for b in self.up_blocks if hasattr(b, "upsamplers"))
        forward_size = any(s % up_factor for s in sample.shape[-2:])
        if c.center_input_sample:
            sample = 2 * sample - 1.0

        # time (+ SDXL addition) embedding
        t = timestep
        if not torch.is_tensor(t):
            t = torch.tensor([t], dtype=torch.float64 if isinstance(t, float) else torch.int64, device=sample.device)
        elif t.dim() == 0:
            t = t[None].to(sample.device)
        t = t.expand(B)
        t_emb = timestep_embedding(t, c.block_out_channels[0], c.flip_sin_to_cos, c.freq_shift).to(sample.dtype)
        emb = self.time_embedding(t_emb, None if timestep_cond is None else timestep_cond.to(sample.dtype))
        if c.addition_embed_type == "text_time":
            emb = emb + self.add_embedding(self._add_embeds(added_cond_kwargs, B).to(emb.dtype))
        temb = F.silu(emb)  # every resnet's time_emb_proj reads silu(temb)
        ctx = encoder_hidden_states
        ckpt = self._maybe_checkpoint

        h = self.conv_in(sample)
        skips = [h]
        for blk in self.down_blocks:
            for j, r in enumerate(blk.resnets):
                h = ckpt(r, h, temb)
                if blk.attentions is not None:
                    h = blk.attentions[j](h, ctx, ckpt)
                skips.append(h)
            if hasattr(blk, "downsamplers"):
                h = blk.downsamplers[0](h)
                skips.append(h)
        if self.mid_block is not None:
            h = ckpt(self.mid_block.resnets[0], h, temb)
            h = self.mid_block.attentions[0](h, ctx, ckpt)
            h = ckpt(self.mid_block.resnets[1], h, temb)
        for i, blk in enumerate(self.up_blocks):
            for j, r in enumerate(blk.resnets):
                h = ckpt(r, torch.cat([h, skips.pop()], dim=1), temb)
                if blk.attentions is not None:
                    h = blk.attentions[j](h, ctx, ckpt)
            if hasattr(blk, "upsamplers"):
                size = skips[-1].shape[2:] if forward_size else None
                h = blk.upsamplers[0](h, size)
        out = group_norm_silu_conv(h, self.conv_norm_out, self.conv_out, self.backend)
        return UNet2DConditionOutput(sample=out) if return_dict else (out,)

    def _check_inputs(self, sample: Tensor, ctx: Tensor) -> None:
        c = self.config
        if not isinstance(sample, Tensor) or sample.dim() != 4:
            raise ValueError(f"UNet2DCondition: sample must be a 4-D latent (B, C, H, W), got "
                             f"{tuple(sample.shape) if isinstance(sample, Tensor) else type(sample).__name__}")
        if sample.shape[1] != c.in_channels:
            raise ValueError(f"UNet2DCondition: sample has {sample.shape[1]} channels but the model takes "
                             f"in_channels={c.in_channels} (sample shape {tuple(sample.shape)})")
        if not isinstance(ctx, Tensor) or ctx.dim() != 3:
            raise ValueError("UNet2DCondition: encoder_hidden_states must be (B, L, cross_attention_dim), got "
                             f"{tuple(ctx.shape) if isinstance(ctx, Tensor) else type(ctx).__name__}")
        dims = set(c._per_block(c.cross_attention_dim))
        if ctx.shape[-1] not in dims or len(dims) != 1:
            raise ValueError(f"UNet2DCondition: encoder_hidden_states has {ctx.shape[-1]} features but the model's "
                             f"cross_attention_dim is {c.cross_attention_dim} (shape {tuple(ctx.shape)})")
        if ctx.shape[0] != sample.shape[0]:
            raise ValueError(f"UNet2DCondition: encoder_hidden_states batch {ctx.shape[0]} != sample batch "
                             f"{sample.shape[0]}")

    def _check_timestep_cond(self, cond, B: int) -> Tensor:
        d = self.config.time_cond_proj_dim
        if d is None:
            raise ValueError("UNet2DCondition: timestep_cond was given but this config has time_cond_proj_dim=None "
                             "(no time_embedding.cond_proj); build the model with time_cond_proj_dim set (LCM "
                             "students: the width of the guidance-scale embedding, e.g. 256) or omit timestep_cond")
        if not isinstance(cond, Tensor) or cond.dim() != 2 or cond.shape[-1] != d or cond.shape[0] not in (1, B):
            raise ValueError(f"UNet2DCondition: timestep_cond must be (B={B}, time_cond_proj_dim={d}), got "
                             f"{tuple(cond.shape) if isinstance(cond, Tensor) else type(cond).__name__}")
        return cond

    def _add_embeds(self, added: Optional[dict], B: int) -> Tensor:
        c = self.config
        if not added or "text_embeds" not in added or "time_ids" not in added:
            have = sorted(added) if added else added
            raise ValueError("UNet2DCondition: this config has addition_embed_type='text_time' (SDXL) and needs "
                             "added_cond_kwargs={'text_embeds': (B, pooled_dim), 'time_ids': (B, 6)}; got "
                             f"{have}")
        text, ids = added["text_embeds"], added["time_ids"]
        time = timestep_embedding(ids.flatten(), c.addition_time_embed_dim, c.flip_sin_to_cos, c.freq_shift)
        add = torch.cat([text, time.reshape(text.shape[0], -1).to(text.dtype)], dim=-1)
        if add.shape[-1] != c.projection_class_embeddings_input_dim:
            raise ValueError(f"UNet2DCondition: text_embeds {tuple(text.shape)} and time_ids {tuple(ids.shape)} give "
                             f"{add.shape[-1]} addition features; the model takes "
                             f"projection_class_embeddings_input_dim={c.projection_class_embeddings_input_dim}")
        return add

    # ------------------------------------------------------------------ what pipelines may call

    def fuse_qkv_projections(self) -> None:
        """No-op: self-attention q, k, v are always one projection here."""

    def unfuse_qkv_projections(self) -> None:
        """No-op: the fused projection computes what the separate ones would."""

    def set_default_attn_processor(self) -> None:
        """No-op: ``fastgen.ops.attention`` computes diffusers' default attention."""

    def set_attn_processor(self, processor) -> None:
        raise NotImplementedError("UNet2DCondition: custom attention processors (IP-adapter, LoRA processors, "
                                  "attention slicing) are not supported; attention is fastgen.ops.attention. Use "
                                  "the diffusers UNet2DConditionModel for them")

    def enable_freeu(self, *args, **kwargs) -> None:
        raise NotImplementedError("UNet2DCondition: FreeU is not supported; use the diffusers UNet2DConditionModel")

    # ------------------------------------------------------------------ interchange

    @classmethod
    def config_from_diffusers(cls, config) -> UNet2DConditionConfig:
        config = dict(config)
        bad = {k: config[k] for k, ok in _FIXED.items() if k in config and config[k] not in ok}
        if bad:
            raise NotImplementedError(f"UNet2DCondition: diffusers config values not supported: {bad} (supported: "
                                      f"{ {k: _FIXED[k] for k in bad} })")
        names = {f.name for f in dataclasses.fields(UNet2DConditionConfig)}
        kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in config.items() if k in names}
        for k in ("transformer_layers_per_block",):
            if isinstance(kw.get(k), tuple):
                kw[k] = tuple(tuple(v) if isinstance(v, list) else v for v in kw[k])
        return UNet2DConditionConfig(**kw)

    @classmethod
    def state_dict_from_diffusers(cls, sd: dict) -> dict:
        """Fused self-attention QKV; 1x1-conv proj_in / proj_out weights as linear ones."""
        return {k: v.reshape(v.shape[0], v.shape[1]) if _is_proj(k) and v.dim() == 4 else v
                for k, v in fuse_self_attention_qkv(sd).items()}

    def to_diffusers_state_dict(self) -> dict:
        conv = not self.config.use_linear_projection
        return {k: v.reshape(*v.shape, 1, 1) if conv and _is_proj(k) else v
                for k, v in split_self_attention_qkv(self.state_dict()).items()}


def _is_proj(key: str) -> bool:
    return key.endswith(".proj_in.weight") or key.endswith(".proj_out.weight")


def _validate_config(c: UNet2DConditionConfig) -> None:
    n = len(c.down_block_types)
    bad = [t for t in c.down_block_types if t not in DOWN_TYPES] + [t for t in c.up_block_types if t not in UP_TYPES]
    if bad or c.mid_block_type not in MID_TYPES:
        raise NotImplementedError(f"UNet2DCondition: block types {bad or [c.mid_block_type]} not supported; down "
                                  f"blocks {DOWN_TYPES}, up blocks {UP_TYPES}, mid block {MID_TYPES}")
    if len(c.up_block_types) != n or len(c.block_out_channels) != n:
        raise ValueError(f"UNet2DCondition: down_block_types ({n}), up_block_types ({len(c.up_block_types)}) and "
                         f"block_out_channels ({len(c.block_out_channels)}) must have the same length")
    for name in ("attention_head_dim", "cross_attention_dim", "layers_per_block", "transformer_layers_per_block"):
        if len(c._per_block(getattr(c, name))) != n:
            raise ValueError(f"UNet2DCondition: {name}={getattr(c, name)} must be an int or {n} values")
    for ch, h in zip(c.block_out_channels, c._per_block(c.attention_head_dim)):
        if ch % c.norm_num_groups or ch % h:
            raise ValueError(f"UNet2DCondition: block channels {ch} must be divisible by norm_num_groups="
                             f"{c.norm_num_groups} and by the head count {h} (attention_head_dim)")
    if c.addition_embed_type == "text_time" and (c.addition_time_embed_dim is None
                                                 or c.projection_class_embeddings_input_dim is None):
        raise ValueError("UNet2DCondition: addition_embed_type='text_time' needs addition_time_embed_dim and "
                         "projection_class_embeddings_input_dim")
    if c.addition_embed_type not in (None, "text_time"):
        raise NotImplementedError("UNet2DCondition: only addition_embed_type None or 'text_time' is supported")
    d = c.time_cond_proj_dim
    if d is not None and (isinstance(d, bool) or not isinstance(d, int) or d < 1):
        raise ValueError(f"UNet2DCondition: time_cond_proj_dim must be None or a positive int, got {d!r}")
