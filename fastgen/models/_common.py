"""Pieces shared by the model files in ``fastgen.models``.

API (stable: later additions only, no renames)
----------------------------------------------

Embeddings::

    timestep_embedding(t, dim, flip_sin_to_cos=True, downscale_freq_shift=1.0, scale=1.0, max_period=10000)
        t (B,) any dtype -> (B, dim) float32;   same numbers as diffusers' get_timestep_embedding:
        f_i = exp(-ln(max_period) * i / (dim/2 - shift)),  emb = [cos(s t f), sin(s t f)] (flipped) or [sin, cos]
    sincos_pos_embed_2d(dim, height, width, base_size, interpolation_scale=1.0, device=None)
        -> (height * width, dim) float32, row-major over (h, w); first half encodes the column
        (w / (width / base_size) / interpolation_scale), second half the row; float64 math like diffusers.
    TimestepMLP(in_dim, out_dim, hidden_dim=None, act="silu")   linear_1 -> act -> linear_2
        (state-dict keys of diffusers' TimestepEmbedding / PixArtAlphaTextProjection: linear_1, linear_2)
    PatchEmbed2d(in_channels, dim, patch_size, base_size, interpolation_scale=1.0)
        (B, C, H, W) -> (B, H/p * W/p, dim) = conv_p(x) + sincos_pos_embed_2d(...)   (key: proj.weight/bias)
    GeluFeedForward(dim, inner_dim, approximate="tanh", bias=True)   fc2(gelu(fc1(x))), keys fc1 / fc2;
        .project(u) = fc2(gelu(u)) (the part after fc1, for callers that fused fc1 with a norm);
        the GELU is recomputed in the backward (gelu_linear): saves fc1's output only, not also gelu's
    gelu_linear(u, weight, bias, approximate="tanh")     linear(gelu(u)) saving only u for backward
    modulated_norm_linear(x, shift, scale, weight, bias=None, eps=1e-6, backend="auto")
        linear(LN(x)(1 + scale) + shift): the normed tensor is recomputed in backward, not saved
    gated_modulated_norm_linear(x, y, gate, shift, scale, weight, bias=None, eps=1e-6, backend="auto")
        x1 = x + gate y;  (linear(LN(x1)(1 + scale) + shift), x1), the normed tensor recomputed
    check_latent(model, x, in_channels, patch_size)      clear errors for bad latents
    check_dtype(model, x, weight_dtype, backend)         latent vs weight dtype; a dtype the explicit
                                                         backend's kernels do not serve (fp32 on "triton")
    unpatchify(x, h, w, p, c)    (B, h*w, p*p*c) -> (B, c, h*p, w*p)  (diffusers' "nhwpqc->nchpwq")

Model plumbing::

    ModelConfig           base of the config dataclasses: cfg["key"], cfg.get, cfg.keys(), cfg.to_dict(),
                          attribute access (what diffusers pipelines read: transformer.config.sample_size);
                          .inner_dim = num_attention_heads * attention_head_dim (transformers);
                          _from_presets(presets, name, key=None, error=ValueError)   the body of preset()
    FastgenModel(nn.Module)   mixin for the models:
        .config, .dtype, .device, .backend, set_backend(name) (every submodule's ``backend``),
        .gradient_checkpointing, enable_/disable_gradient_checkpointing(),
        _maybe_checkpoint(fn, *args)                  per-block activation checkpointing when enabled
        fuse_qkv_projections() / unfuse_qkv_projections()   no-ops (fused already)
        set_attn_processor / set_default_attn_processor / enable_xformers_memory_efficient_attention
                                                      NotImplementedError saying why
        from_diffusers(m, backend="auto")             same weights (parameters share storage where the
                                                      layouts agree; fused QKV etc. are new tensors)
        to_diffusers_state_dict()                     loads into the diffusers class with strict=True
        from_pretrained(path, torch_dtype=None, device="cpu", backend="auto", config=None, subfolder=None)
        Subclasses define:
            config_class                               the dataclass
            config_from_diffusers(dict) -> config      (classmethod)
            state_dict_from_diffusers(sd) -> sd        (classmethod; diffusers keys -> this model's keys)
            to_diffusers_state_dict(self) -> sd
            _init_buffers(self)                        optional: rebuild non-persistent buffers after a
                                                       meta-device load
    rename_keys(sd, [(ours, diffusers'), ...], to_diffusers)   substring renames, either direction
    fuse_qkv(sd, prefix, names=("to_q", "to_k", "to_v"), fused="to_qkv")   concatenate projections (dim 0)
    split_qkv(sd, prefix, names=..., fused=...)                            the inverse (copies)
    fuse_self_attention_qkv(sd) / split_self_attention_qkv(sd)   the same for every ".attn1." (new dicts;
                                                                 the split parts are views)
    CheckpointMismatchError(ValueError)
    load_safetensors_dir(path, subfolder=None) -> (config dict or None, {key: (file, shape)})
    check_state_dict(expected, found, what)       missing / unexpected / shape errors naming the first keys
    ModelOutput(sample)                           diffusers' Transformer2DModelOutput when importable

Loading (from_pretrained): the model is built on the meta device (no memory), the checkpoint's
keys and shapes are checked against ``to_diffusers_state_dict()`` of that skeleton (read from
the safetensors headers, nothing loaded yet), then the tensors are read straight onto ``device``,
cast to ``torch_dtype``, converted, and assigned with ``load_state_dict(assign=True)``: the model
never exists twice in memory.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

# ----------------------------------------------------------------------------- embeddings


def timestep_embedding(t: Tensor, dim: int, flip_sin_to_cos: bool = True, downscale_freq_shift: float = 1.0,
                       scale: float = 1.0, max_period: int = 10000) -> Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps: ``(B,) -> (B, dim)`` float32."""
    if t.dim() != 1:
        raise ValueError(f"timestep_embedding: timesteps must be 1-D (B,), got shape {tuple(t.shape)}")
    half = dim // 2
    expo = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(expo / (half - downscale_freq_shift))
    arg = scale * (t[:, None].float() * freqs[None, :])
    if flip_sin_to_cos:
        emb = torch.cat([torch.cos(arg), torch.sin(arg)], dim=-1)
    else:
        emb = torch.cat([torch.sin(arg), torch.cos(arg)], dim=-1)
    if dim % 2 == 1:
        emb = F.pad(emb, (0, 1))
    return emb


def _sincos_1d(dim: int, pos: Tensor) -> Tensor:
    """(M,) positions -> (M, dim) [sin | cos], float64 frequencies (as diffusers on CPU / CUDA)."""
    omega = torch.arange(dim // 2, dtype=torch.float64, device=pos.device) / (dim / 2.0)
    omega = 1.0 / 10000 ** omega
    out = torch.outer(pos.reshape(-1).to(torch.float64), omega)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_pos_embed_2d(dim: int, height: int, width: int, base_size: int, interpolation_scale: float = 1.0,
                        device=None) -> Tensor:
    """2-D sin-cos position table ``(height * width, dim)`` float32, tokens in row-major (h, w) order."""
    if dim % 4 != 0:
        raise ValueError(f"sincos_pos_embed_2d: dim must be a multiple of 4, got {dim}")
    gh = torch.arange(height, dtype=torch.float32, device=device) / (height / base_size) / interpolation_scale
    gw = torch.arange(width, dtype=torch.float32, device=device) / (width / base_size) / interpolation_scale
    col = gw[None, :].expand(height, width)
    row = gh[:, None].expand(height, width)
    return torch.cat([_sincos_1d(dim // 2, col), _sincos_1d(dim // 2, row)], dim=1).float()


_ACTS: dict[str, Callable[[Tensor], Tensor]] = {
    "silu": F.silu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
}


class TimestepMLP(nn.Module):
    """``linear_2(act(linear_1(x)))`` — diffusers' TimestepEmbedding / PixArtAlphaTextProjection keys."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: Optional[int] = None, act: str = "silu",
                 bias: bool = True):
        super().__init__()
        if act not in _ACTS:
            raise ValueError(f"TimestepMLP: act must be one of {sorted(_ACTS)}, got {act!r}")
        hidden_dim = out_dim if hidden_dim is None else hidden_dim
        self.act = act
        self.linear_1 = nn.Linear(in_dim, hidden_dim, bias=bias)
        self.linear_2 = nn.Linear(hidden_dim, out_dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(_ACTS[self.act](self.linear_1(x)))


class _GeluLinear(torch.autograd.Function):
    """``y = gelu(u) @ W^T + b`` saving ``u`` (not also ``gelu(u)``); gelu(u) is recomputed in backward."""

    @staticmethod
    def forward(ctx, u, weight, bias, approximate):
        ctx.save_for_backward(u, weight)
        ctx.approximate, ctx.has_bias = approximate, bias is not None
        return F.linear(F.gelu(u, approximate=approximate), weight, bias)

    @staticmethod
    def backward(ctx, dy):
        u, weight = ctx.saved_tensors
        du = dw = db = None
        ct = dy.dtype  # the forward's GEMM dtype (bf16 under autocast with fp32 weights)
        if ctx.needs_input_grad[0]:
            du = torch.ops.aten.gelu_backward((dy @ weight.to(ct)).to(u.dtype), u, approximate=ctx.approximate)
        if ctx.needs_input_grad[1]:
            g = F.gelu(u, approximate=ctx.approximate).to(ct)
            dw = (dy.reshape(-1, dy.shape[-1]).t() @ g.reshape(-1, g.shape[-1])).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy.reshape(-1, dy.shape[-1]).sum(0).to(weight.dtype)
        return du, dw, db, None


def gelu_linear(u: Tensor, weight: Tensor, bias: Optional[Tensor] = None, approximate: str = "tanh") -> Tensor:
    """``F.linear(F.gelu(u, approximate), weight, bias)``, keeping only ``u`` for the backward pass.

    ``u`` (..., K), ``weight`` (M, K), ``bias`` (M,) -> (..., M). Same gradients as autograd of the
    two ops (``aten.gelu_backward``); the activation memory of the pair halves (one K-wide tensor
    saved instead of two), at the price of one elementwise GELU in the backward.
    """
    if torch.is_grad_enabled() and (u.requires_grad or weight.requires_grad or
                                    (bias is not None and bias.requires_grad)):
        return _GeluLinear.apply(u, weight, bias, approximate)
    return F.linear(F.gelu(u, approximate=approximate), weight, bias)


class GeluFeedForward(nn.Module):
    """``fc2(gelu(fc1(x)))`` (diffusers' FeedForward with "gelu" / "gelu-approximate"), via gelu_linear."""

    def __init__(self, dim: int, inner_dim: int, approximate: str = "tanh", bias: bool = True,
                 out_dim: Optional[int] = None):
        super().__init__()
        self.approximate = approximate
        self.fc1 = nn.Linear(dim, inner_dim, bias=bias)
        self.fc2 = nn.Linear(inner_dim, dim if out_dim is None else out_dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.project(self.fc1(x))

    def project(self, u: Tensor) -> Tensor:
        """The rest after the FC1 GEMM: ``fc2(gelu(u))`` saving only ``u``."""
        return gelu_linear(u, self.fc2.weight, self.fc2.bias, self.approximate)


# --------------------------------------------------------------- norm + linear, norm recomputed
#
# A block's norm output h = LN(x)(1 + scale) + shift only feeds a linear layer, whose weight
# gradient needs h. Keeping h costs one (B, S, N) tensor per norm; recomputing it in the
# backward pass from x (which is saved anyway: it is the residual stream) costs one
# elementwise pass (what TransformerEngine's LayerNormLinear and Megatron's selective
# recompute do). Under torch.compile the plain composition is used: the partitioner already
# decides what to recompute.


def _mod_grad(g: Tensor, like: Tensor, x: Tensor) -> Tensor:
    """Reduce an (B, S, N) gradient to the shape of a gate/shift/scale (B, N), (B, 1, N) or (B, S, N)."""
    if like.dim() == 2:
        return g.sum(1, dtype=torch.float32).to(like.dtype)
    if like.shape[1] == 1 and x.shape[1] != 1:
        return g.sum(1, keepdim=True, dtype=torch.float32).to(like.dtype)
    return g.to(like.dtype)


def _linear_backward(dy: Tensor, h: Tensor, weight: Tensor, has_bias: bool, needs):
    """Gradients of ``F.linear(h, weight, bias)``: the GEMMs run in ``dy``'s dtype (the forward's,
    bf16 under autocast with fp32 weights, as autocast's own linear does); each gradient comes back
    in its input's dtype. Without autocast every cast is a no-op."""
    ct = dy.dtype
    dh = (dy @ weight.to(ct)).to(h.dtype)
    dw = db = None
    if needs[0]:
        dw = (dy.reshape(-1, dy.shape[-1]).t() @ h.to(ct).reshape(-1, h.shape[-1])).to(weight.dtype)
    if has_bias and needs[1]:
        db = dy.reshape(-1, dy.shape[-1]).sum(0).to(weight.dtype)
    return dh, dw, db


def _renorm(x, shift, scale, eps, backend, needs):
    """h = layer_norm_modulate(x, shift, scale) recomputed with a graph to the inputs in ``needs``."""
    from fastgen.ops.modulate import layer_norm_modulate

    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(bool(n)) for t, n in zip((x, shift, scale), needs)]
        h = layer_norm_modulate(*leaves, eps=eps, backend=backend)
    return h, leaves


def _norm_grads(h, leaves, needs, dh):
    wrt = [t for t, n in zip(leaves, needs) if n]
    got = iter(torch.autograd.grad(h, wrt, dh) if wrt else ())
    return tuple(next(got) if n else None for n in needs)


class _ModulatedNormLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, shift, scale, weight, bias, eps, backend):
        from fastgen.ops.modulate import layer_norm_modulate

        h = layer_norm_modulate(x, shift, scale, eps=eps, backend=backend)
        ctx.save_for_backward(x, shift, scale, weight)
        ctx.eps, ctx.backend, ctx.has_bias = eps, backend, bias is not None
        return F.linear(h, weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, shift, scale, weight = ctx.saved_tensors
        need = ctx.needs_input_grad
        h, leaves = _renorm(x, shift, scale, ctx.eps, ctx.backend, need[:3])
        dh, dw, db = _linear_backward(dy, h.detach(), weight, ctx.has_bias, need[3:5])
        dx, dshift, dscale = _norm_grads(h, leaves, need[:3], dh) if any(need[:3]) else (None,) * 3
        return dx, dshift, dscale, dw, db, None, None


class _GatedModulatedNormLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, gate, shift, scale, weight, bias, eps, backend):
        from fastgen.ops.modulate import gated_residual_layer_norm_modulate

        h, x1 = gated_residual_layer_norm_modulate(x, y, gate, shift, scale, eps=eps, backend=backend)
        ctx.save_for_backward(x1, y, gate, shift, scale, weight)
        ctx.eps, ctx.backend, ctx.has_bias = eps, backend, bias is not None
        return F.linear(h, weight, bias), x1

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout, dx1):
        x1, y, gate, shift, scale, weight = ctx.saved_tensors
        need = ctx.needs_input_grad
        dx_norm = dshift = dscale = dw = db = None
        if dout is not None:
            needs = (True, need[3], need[4])
            h, leaves = _renorm(x1, shift, scale, ctx.eps, ctx.backend, needs)
            dh, dw, db = _linear_backward(dout, h.detach(), weight, ctx.has_bias, need[5:7])
            dx_norm, dshift, dscale = _norm_grads(h, leaves, needs, dh)
        parts = [g for g in (dx1, dx_norm) if g is not None]
        d = (parts[0] + parts[1] if len(parts) == 2 else parts[0]) if parts else torch.zeros_like(x1)
        g = gate.unsqueeze(1) if gate.dim() == 2 else gate
        dy = (d.float() * g.float()).to(y.dtype) if need[1] else None
        dgate = _mod_grad(d.float() * y.float(), gate, x1) if need[2] else None
        return d, dy, dgate, dshift, dscale, dw, db, None, None


def _wants_grad(*ts) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in ts)


def modulated_norm_linear(x: Tensor, shift: Tensor, scale: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                          eps: float = 1e-6, backend: Optional[str] = "auto") -> Tensor:
    """``F.linear(layer_norm_modulate(x, shift, scale, eps), weight, bias)`` without saving the normed
    tensor for backward (recomputed there from ``x``). x (B, S, N); shift / scale (B, N) | (B, 1, N) |
    (B, S, N); weight (M, N) -> (B, S, M). Same gradients as the composition."""
    from fastgen.ops.modulate import layer_norm_modulate

    if torch.compiler.is_compiling() or not _wants_grad(x, shift, scale, weight, bias):
        return F.linear(layer_norm_modulate(x, shift, scale, eps=eps, backend=backend), weight, bias)
    return _ModulatedNormLinear.apply(x, shift, scale, weight, bias, eps, backend)


def gated_modulated_norm_linear(x: Tensor, y: Tensor, gate: Tensor, shift: Tensor, scale: Tensor, weight: Tensor,
                                bias: Optional[Tensor] = None, eps: float = 1e-6,
                                backend: Optional[str] = "auto") -> tuple[Tensor, Tensor]:
    """``x1 = x + gate * y;  (F.linear(LN(x1)(1 + scale) + shift, weight, bias), x1)`` — one fused
    ``gated_residual_layer_norm_modulate`` kernel and a GEMM; the normed tensor is recomputed in the
    backward pass from ``x1`` instead of saved."""
    from fastgen.ops.modulate import gated_residual_layer_norm_modulate

    if torch.compiler.is_compiling() or not _wants_grad(x, y, gate, shift, scale, weight, bias):
        h, x1 = gated_residual_layer_norm_modulate(x, y, gate, shift, scale, eps=eps, backend=backend)
        return F.linear(h, weight, bias), x1
    return _GatedModulatedNormLinear.apply(x, y, gate, shift, scale, weight, bias, eps, backend)


def check_latent(model: str, x: Tensor, in_channels: int, patch_size: int) -> None:
    """A clear error for a latent that the patch embedding cannot take."""
    if not isinstance(x, Tensor) or x.dim() != 4:
        raise ValueError(f"{model}: hidden_states must be a 4-D latent (B, C, H, W), got "
                         f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    if x.shape[1] != in_channels:
        raise ValueError(f"{model}: hidden_states has {x.shape[1]} channels but the model takes "
                         f"in_channels={in_channels} (shape {tuple(x.shape)})")
    H, W = x.shape[-2:]
    if H % patch_size or W % patch_size:
        raise ValueError(f"{model}: latent height and width ({H} x {W}) must be multiples of the patch size "
                         f"{patch_size}; crop or pad the latent (image size a multiple of "
                         f"{patch_size} x the VAE factor)")


KERNEL_DTYPES = (torch.float16, torch.bfloat16)


def check_dtype(model: str, x: Tensor, weight_dtype: torch.dtype, backend: Optional[str]) -> None:
    """Clear errors before any kernel runs: a latent in another dtype than the weights, and a model
    dtype that an explicitly requested kernel backend cannot serve (the attention kernels take
    bfloat16 / float16 only; ``"auto"`` falls back to the reference instead)."""
    if x.dtype != weight_dtype:
        raise TypeError(f"{model}: hidden_states is {x.dtype} but the model's weights are {weight_dtype}; "
                        f"cast the latent (x.to(model.dtype)) or the model")
    if backend in ("triton", "cuda") and weight_dtype not in KERNEL_DTYPES:
        from fastgen.backend import BackendUnavailableError

        raise BackendUnavailableError(f"{model}: backend={backend!r} runs the attention kernels in bfloat16 / "
                                      f"float16, the model is {weight_dtype}; use model.to(torch.bfloat16), "
                                      f"or backend='auto' / 'torch'")


class PatchEmbed2d(nn.Module):
    """``(B, C, H, W) -> (B, H/p * W/p, dim)``: a stride-p conv plus the 2-D sin-cos table.

    Same math as diffusers' ``PatchEmbed`` with ``pos_embed_type="sincos"`` and no
    ``pos_embed_max_size``: the table is computed for the latent's own grid (no stored buffer, so
    non-square and other resolutions need nothing special), ``base_size`` = sample_size // p.
    """

    def __init__(self, in_channels: int, dim: int, patch_size: int, base_size: int,
                 interpolation_scale: float = 1.0, bias: bool = True):
        super().__init__()
        self.patch_size, self.base_size, self.interpolation_scale = patch_size, base_size, interpolation_scale
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        tokens = self.proj(x).flatten(2).transpose(1, 2)
        pos = sincos_pos_embed_2d(tokens.shape[-1], h, w, self.base_size, self.interpolation_scale, x.device)
        return (tokens + pos[None]).to(tokens.dtype)


def unpatchify(x: Tensor, h: int, w: int, p: int, c: int) -> Tensor:
    """``(B, h*w, p*p*c) -> (B, c, h*p, w*p)``; token (i, j) channel (a, b, ch) -> pixel (ch, i*p+a, j*p+b)."""
    B = x.shape[0]
    x = x.reshape(B, h, w, p, p, c).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(B, c, h * p, w * p)


# ----------------------------------------------------------------------------- outputs and configs


try:  # what diffusers pipelines expect back with return_dict=True
    from diffusers.models.modeling_outputs import Transformer2DModelOutput as ModelOutput
except Exception:  # diffusers absent

    @dataclasses.dataclass
    class ModelOutput:  # type: ignore[no-redef]
        """``.sample``: the model's output tensor."""

        sample: Tensor

        def __getitem__(self, i):
            return (self.sample,)[i]

        def to_tuple(self):
            return (self.sample,)


class ModelConfig:
    """Base of the config dataclasses: attribute *and* mapping access (``cfg["sample_size"]``)."""

    def __getitem__(self, key: str):
        try:
            return getattr(self, key)
        except AttributeError:
            raise KeyError(key) from None

    def __contains__(self, key: str) -> bool:
        return key in self.keys()

    def get(self, key: str, default: Any = None):
        return getattr(self, key, default)

    def keys(self):
        return [f.name for f in dataclasses.fields(self)]  # type: ignore[arg-type]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]

    @property
    def inner_dim(self) -> int:
        """The transformer width: heads * head dim."""
        return self.num_attention_heads * self.attention_head_dim  # type: ignore[attr-defined]

    @classmethod
    def _from_presets(cls, presets: dict, name: str, key: Optional[str] = None, error: type = ValueError):
        """``cls(**presets[key])`` (key: ``name`` unless given); ``error`` names the known presets."""
        key = name if key is None else key
        if key not in presets:
            raise error(f"{cls.__name__}.preset: unknown preset {name!r}; one of {sorted(presets)}")
        return cls(**presets[key])


# ----------------------------------------------------------------------------- checkpoints


def rename_keys(sd: dict, renames, to_diffusers: bool) -> dict:
    """Rename by substring pairs (ours, diffusers'), in either direction."""
    out = {}
    for k, v in sd.items():
        for ours, theirs in renames:
            a, b = (ours, theirs) if to_diffusers else (theirs, ours)
            if a in k:
                k = k.replace(a, b)
                break
        out[k] = v
    return out


def fuse_qkv(sd: dict, prefix: str, names=("to_q", "to_k", "to_v"), fused: str = "to_qkv") -> dict:
    """diffusers' separate projections under ``prefix`` -> one concatenated ``fused`` projection."""
    for p in ("weight", "bias"):
        keys = [f"{prefix}{n}.{p}" for n in names]
        if all(k in sd for k in keys):
            sd[f"{prefix}{fused}.{p}"] = torch.cat([sd.pop(k) for k in keys], dim=0)
    return sd


def fuse_self_attention_qkv(sd: dict) -> dict:
    """diffusers' self-attention (``.attn1.``) to_q / to_k / to_v -> one ``to_qkv`` (rows concatenated),
    the other keys as they are, in order."""
    out = {}
    for k, v in sd.items():
        if ".attn1.to_k." in k or ".attn1.to_v." in k:
            continue
        if ".attn1.to_q." in k:
            out[k.replace(".to_q.", ".to_qkv.")] = torch.cat(
                [v, sd[k.replace(".to_q.", ".to_k.")], sd[k.replace(".to_q.", ".to_v.")]], dim=0)
        else:
            out[k] = v
    return out


def split_self_attention_qkv(sd: dict) -> dict:
    """Inverse of :func:`fuse_self_attention_qkv` (the parts are views of the fused tensor)."""
    out = {}
    for k, v in sd.items():
        if ".attn1.to_qkv." in k:
            for name, part in zip(("to_q", "to_k", "to_v"), v.chunk(3, dim=0)):
                out[k.replace("to_qkv", name)] = part
        else:
            out[k] = v
    return out


def split_qkv(sd: dict, prefix: str, names=("to_q", "to_k", "to_v"), fused: str = "to_qkv") -> dict:
    """Inverse of :func:`fuse_qkv` (equal chunks, copied: safetensors refuses shared storage)."""
    for p in ("weight", "bias"):
        k = f"{prefix}{fused}.{p}"
        if k in sd:
            for n, part in zip(names, sd.pop(k).chunk(len(names), dim=0)):
                sd[f"{prefix}{n}.{p}"] = part.clone()
    return sd


class CheckpointMismatchError(ValueError):
    """The checkpoint does not fit the model: names the first missing / unexpected / mis-shaped keys."""


_SHOW = 5


def check_state_dict(expected: dict, found: dict, what: str) -> None:
    """``expected`` / ``found``: {key: shape}. Raises CheckpointMismatchError naming the first offenders."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    bad = [(k, tuple(found[k]), tuple(expected[k])) for k in expected
           if k in found and tuple(found[k]) != tuple(expected[k])]
    if not (missing or unexpected or bad):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s), first: {missing[:_SHOW]}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s), first: {unexpected[:_SHOW]}")
    if bad:
        shown = ", ".join(f"{k}: checkpoint {s} vs model {e}" for k, s, e in bad[:_SHOW])
        parts.append(f"{len(bad)} shape mismatch(es), first: {shown}")
    raise CheckpointMismatchError(f"{what}: the checkpoint does not match the model ("
                                  f"a checkpoint of another model or size?): " + "; ".join(parts))


_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "model.safetensors")


def load_safetensors_dir(path: str, subfolder: Optional[str] = None):
    """Index a diffusers-layout checkpoint without reading tensors.

    ``path``: a directory (``config.json`` + ``diffusion_pytorch_model.safetensors`` or the sharded
    ``...safetensors.index.json``), a model-repo directory with ``subfolder`` (e.g. ``"transformer"``),
    or one ``.safetensors`` file. Returns ``(config dict or None, {key: (file, shape)})``.
    """
    from safetensors import safe_open

    if subfolder:
        path = os.path.join(path, subfolder)
    if not os.path.exists(path):
        raise FileNotFoundError(f"from_pretrained: {path!r} does not exist (a local directory or "
                                f".safetensors file; download from the Hub first)")
    config, files = None, []
    if os.path.isdir(path):
        cfg_path = os.path.join(path, "config.json")
        if os.path.exists(cfg_path):
            with open(cfg_path) as f:
                config = json.load(f)
        index = [n for n in sorted(os.listdir(path)) if n.endswith(".safetensors.index.json")]
        single = [n for n in _WEIGHT_FILES if os.path.exists(os.path.join(path, n))]
        if index:
            with open(os.path.join(path, index[0])) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        elif single:
            files = single[:1]
        else:
            files = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
        if not files:
            raise FileNotFoundError(f"from_pretrained: no .safetensors weights in {path!r} (found "
                                    f"{sorted(os.listdir(path))[:10]}); .bin checkpoints are not read")
        files = [os.path.join(path, n) for n in files]
    else:
        files = [path]
    where = {}
    for fn in files:
        with safe_open(fn, framework="pt") as f:
            for k in f.keys():
                where[k] = (fn, tuple(f.get_slice(k).get_shape()))
    return config, where


def _read_tensors(where: dict, device, dtype) -> dict:
    from safetensors import safe_open

    by_file: dict = {}
    for k, (fn, _) in where.items():
        by_file.setdefault(fn, []).append(k)
    out = {}
    dev = str(torch.device(device)) if device is not None else "cpu"
    for fn, keys in by_file.items():
        with safe_open(fn, framework="pt", device=dev) as f:
            for k in keys:
                t = f.get_tensor(k)
                if dtype is not None and t.is_floating_point():
                    t = t.to(dtype)
                out[k] = t
    return out


# ----------------------------------------------------------------------------- the model mixin


class FastgenModel(nn.Module):
    """What every fastgen model shares: config / dtype / device, checkpointing, interchange."""

    config_class: type = ModelConfig
    _supports_gradient_checkpointing = True

    def __init__(self, config: ModelConfig, backend: Optional[str] = "auto"):
        super().__init__()
        self.config = config
        self.backend = backend
        self.gradient_checkpointing = False

    # -- what diffusers pipelines read
    @property
    def dtype(self) -> torch.dtype:
        for p in self.parameters():
            if p.is_floating_point():
                return p.dtype
        return torch.get_default_dtype()

    @property
    def device(self) -> torch.device:
        for p in self.parameters():
            return p.device
        return torch.device("cpu")

    def set_backend(self, backend: Optional[str]) -> "FastgenModel":
        """Switch every op of the model to ``backend`` ("auto" | "triton" | "torch" | "cuda")."""
        for mod in self.modules():
            if hasattr(mod, "backend"):
                mod.backend = backend
        return self

    # -- training
    def enable_gradient_checkpointing(self) -> "FastgenModel":
        """Recompute each block in the backward pass instead of keeping its activations."""
        self.gradient_checkpointing = True
        return self

    def disable_gradient_checkpointing(self) -> "FastgenModel":
        self.gradient_checkpointing = False
        return self

    def _maybe_checkpoint(self, fn, *args):
        if self.gradient_checkpointing and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    # -- diffusers hooks that pipelines or users may call
    def fuse_qkv_projections(self) -> None:
        """No-op: the projections are fused already (one QKV GEMM)."""

    def unfuse_qkv_projections(self) -> None:
        """No-op: the fused projections are this model's layout (see ``to_diffusers_state_dict``)."""

    def _no_processors(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__}: attention processors are not supported: the model has "
                                  f"one attention call site, fastgen.ops.attention, chosen by backend= "
                                  f"(flash attention, memory-efficient already); use the diffusers model for "
                                  f"custom processors")

    set_attn_processor = _no_processors
    set_default_attn_processor = _no_processors
    enable_xformers_memory_efficient_attention = _no_processors

    # -- interchange (subclasses provide the key maps)
    @classmethod
    def config_from_diffusers(cls, config) -> ModelConfig:
        raise NotImplementedError

    @classmethod
    def state_dict_from_diffusers(cls, sd: dict) -> dict:
        raise NotImplementedError

    def to_diffusers_state_dict(self) -> dict:
        raise NotImplementedError

    def _init_buffers(self) -> None:
        """Rebuild non-persistent buffers after a meta-device load (none by default)."""

    @classmethod
    def _skeleton(cls, config: ModelConfig, backend) -> "FastgenModel":
        with torch.device("meta"):
            return cls(config, backend=backend)

    def _assign(self, sd: dict) -> "FastgenModel":
        own = {k: tuple(v.shape) for k, v in self.state_dict().items()}
        check_state_dict(own, {k: tuple(v.shape) for k, v in sd.items()}, type(self).__name__)
        self.load_state_dict(sd, strict=True, assign=True)
        self._init_buffers()
        left = [n for n, t in list(self.named_parameters()) + list(self.named_buffers()) if t.is_meta]
        if left:
            raise RuntimeError(f"{type(self).__name__}: tensors left on the meta device after loading: {left[:_SHOW]}")
        return self

    @classmethod
    def _resolve_config(cls, config) -> ModelConfig:
        """A config object, a preset name or a diffusers config dict -> the config."""
        if isinstance(config, str):
            return cls.config_class.preset(config)
        if isinstance(config, dict):
            return cls.config_from_diffusers(config)
        return config

    @classmethod
    def from_diffusers(cls, model, backend: Optional[str] = "auto"):
        """The fastgen model with ``model``'s weights (a diffusers model of the matching class).

        Parameters share storage with ``model`` where the layouts agree (no copy); fused
        projections (QKV) are new tensors. Build a fresh copy with ``copy.deepcopy`` first if
        both must be trained independently.
        """
        cfg = cls.config_from_diffusers(dict(model.config))
        m = cls._skeleton(cfg, backend)
        m._assign(cls.state_dict_from_diffusers({k: v.detach() for k, v in model.state_dict().items()}))
        m.train(model.training)
        return m

    @classmethod
    def from_pretrained(cls, path: str, torch_dtype: Optional[torch.dtype] = None, device="cpu",
                        backend: Optional[str] = "auto", config=None, subfolder: Optional[str] = None):
        """Load diffusers-layout safetensors (single file, or sharded with an index) onto ``device``.

        ``config``: a config object or a preset name, overriding (or standing in for) the
        ``config.json`` next to the weights. Keys and shapes are checked before any tensor is
        read; a mismatch raises :class:`CheckpointMismatchError` naming the first keys.
        """
        raw, where = load_safetensors_dir(path, subfolder)
        if config is None:
            if raw is None:
                raise ValueError(f"{cls.__name__}.from_pretrained: no config.json next to {path!r}; pass "
                                 f"config= (a {cls.config_class.__name__} or a preset name)")
            config = cls.config_from_diffusers(raw)
        m = cls._skeleton(cls._resolve_config(config), backend)
        expected = {k: tuple(v.shape) for k, v in m.to_diffusers_state_dict().items()}
        check_state_dict(expected, {k: s for k, (_, s) in where.items()}, f"{cls.__name__}.from_pretrained")
        sd = _read_tensors(where, device, torch_dtype)
        m._assign(cls.state_dict_from_diffusers(sd))
        return m.eval()
