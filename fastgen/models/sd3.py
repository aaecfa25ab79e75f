"""Stable Diffusion 3 / 3.5: the MMDiT transformer on fastgen's fused ops.

Same math and weights as diffusers' ``SD3Transformer2DModel``. Shapes (D = heads * head_dim,
p = patch size, h = H / p, w = W / p, Si = h * w image tokens, St text tokens)::

    hidden_states          (B, C, H, W)        latent
    encoder_hidden_states  (B, St, joint_dim)  T5 + CLIP token embeddings
    pooled_projections     (B, pooled_dim)     pooled CLIP embeddings
    timestep               (B,)                flow-matching time in [0, 1000]

    x    = conv_p(latent).flatten + pos_embed[crop]                     (B, Si, D)
    c    = context_embedder(encoder_hidden_states)                      (B, St, D)
    temb = MLP(sinusoid(t)) + MLP(pooled);  e = silu(temb)              (B, D)

    block (AdaLN-Zero on both streams, one joint attention over [x; c]):
        shift1, scale1, gate1, shift2, scale2, gate2 = Linear(e)        (per stream)
        h  = LN(x) * (1 + scale1) + shift1                              layer_norm_modulate
        q, k, v = h @ Wqkv  (one GEMM per stream), optional RMSNorm on q, k (SD3.5)
        o  = softmax(q k^T / sqrt(d)) v  over the St + Si tokens        attention (one call)
        x, h = x + gate1 * o Wo,  LN(x) * (1 + scale2) + shift2         gated_residual_layer_norm_modulate
        x  = x + gate2 * FF(h),  FF(h) = gelu_tanh(h W1) W2             gated_residual, fused FF
    SD3.5 "dual attention" layers add a second, image-only attention with its own
    (shift, scale, gate) taken from the same LN(x); the last block updates only x
    (its text stream is "pre only": LN-modulate and QKV, no output).

    out  = (LN(x) * (1 + scale) + shift) W_out  -> unpatchify           (B, C_out, H, W)

The fused FF (``_GeluLinearFunction``) keeps only the pre-activation for backward and
recomputes the GELU there, so a block saves about half of what the diffusers block
saves (measured in tests/test_models_sd3.py).

Weights: the QKV projections are stored fused (``attn.to_qkv``, ``attn.to_added_qkv``, the
names diffusers uses for its own fused projections); ``from_diffusers`` /
``to_diffusers_state_dict`` concatenate and split them. ``from_pretrained`` reads the
diffusers layout and Stability's original single-file layout (``joint_blocks.N...``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from fastgen.ops import attention, gated_residual, gated_residual_layer_norm_modulate, layer_norm_modulate, rms_norm

# ----------------------------------------------------------------------------- config


@dataclass
class SD3Config:
    """The fields of diffusers' ``SD3Transformer2DModel`` config (same names, same defaults)."""

    sample_size: int = 128
    patch_size: int = 2
    in_channels: int = 16
    num_layers: int = 18
    attention_head_dim: int = 64
    num_attention_heads: int = 18
    joint_attention_dim: int = 4096
    caption_projection_dim: int = 1152
    pooled_projection_dim: int = 2048
    out_channels: int = 16
    pos_embed_max_size: int = 96
    dual_attention_layers: tuple = ()
    qk_norm: Optional[str] = None

    def __post_init__(self):
        self.dual_attention_layers = tuple(self.dual_attention_layers)
        if self.qk_norm not in (None, "rms_norm"):
            raise ValueError(f"SD3Config: qk_norm must be None or 'rms_norm', got {self.qk_norm!r}")
        if self.caption_projection_dim != self.num_attention_heads * self.attention_head_dim:
            raise ValueError(
                f"SD3Config: caption_projection_dim ({self.caption_projection_dim}) must equal num_attention_heads * "
                f"attention_head_dim ({self.num_attention_heads * self.attention_head_dim}): the text stream joins "
                "the image stream's attention"
            )

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @classmethod
    def preset(cls, name: str) -> "SD3Config":
        """A released configuration: ``"sd3-medium"``, ``"sd3.5-medium"``, ``"sd3.5-large"``."""
        if name not in SD3_PRESETS:
            raise ValueError(f"SD3Config.preset: unknown preset {name!r}; known: {sorted(SD3_PRESETS)}")
        return cls(**SD3_PRESETS[name])

    @classmethod
    def from_dict(cls, d: dict) -> "SD3Config":
        """From a diffusers ``config.json`` dict (``_class_name`` and other ``_`` keys ignored)."""
        return config_from_dict(cls, d)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def get(self, key: str, default: Any = None) -> Any:  # diffusers pipelines read configs as dicts too
        return getattr(self, key, default)

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)


SD3_PRESETS: dict[str, dict] = {
    "sd3-medium": dict(num_layers=24, num_attention_heads=24, caption_projection_dim=1536, pos_embed_max_size=192),
    "sd3.5-medium": dict(num_layers=24, num_attention_heads=24, caption_projection_dim=1536, pos_embed_max_size=384,
                         dual_attention_layers=tuple(range(13)), qk_norm="rms_norm"),
    "sd3.5-large": dict(num_layers=38, num_attention_heads=38, caption_projection_dim=2432, pos_embed_max_size=192,
                        qk_norm="rms_norm"),
}


def config_from_dict(cls, d: dict):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(k for k in d if not k.startswith("_") and k not in names)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown config keys {unknown}; expected a subset of {sorted(names)}")
    return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in names})


# ----------------------------------------------------------------------------- shared MMDiT pieces (SD3, Flux)


def timestep_sinusoid(t: Tensor, dim: int = 256, max_period: float = 10000.0) -> Tensor:
    """``[cos(t f), sin(t f)]`` with ``f_i = max_period ** (-i / (dim/2))``: (B,) -> (B, dim) fp32
    (diffusers' ``Timesteps(dim, flip_sin_to_cos=True, downscale_freq_shift=0)``)."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    ang = t[:, None].float() * torch.exp(exponent)[None, :]
    return torch.cat([torch.cos(ang), torch.sin(ang)], dim=-1)


class MLPEmbedder(nn.Module):
    """``linear_2(silu(linear_1(x)))`` (diffusers' ``TimestepEmbedding`` / ``PixArtAlphaTextProjection``)."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class TimeTextEmbed(nn.Module):
    """``temb = MLP_t(sinusoid(t)) [+ MLP_g(sinusoid(guidance))] + MLP_y(pooled)``  -> (B, D)."""

    def __init__(self, dim: int, pooled_dim: int, guidance: bool = False):
        super().__init__()
        self.timestep_embedder = MLPEmbedder(256, dim)
        self.guidance_embedder = MLPEmbedder(256, dim) if guidance else None
        self.text_embedder = MLPEmbedder(pooled_dim, dim)

    def forward(self, timestep: Tensor, pooled: Tensor, guidance: Optional[Tensor] = None) -> Tensor:
        temb = self.timestep_embedder(timestep_sinusoid(timestep).to(pooled.dtype))
        if self.guidance_embedder is not None:
            temb = temb + self.guidance_embedder(timestep_sinusoid(guidance).to(pooled.dtype))
        return temb + self.text_embedder(pooled)


class AdaLN(nn.Module):
    """The modulation projection of an AdaLN(-Zero) norm: ``silu(temb) @ W -> n chunks of (B, D)``.

    The model computes ``e = silu(temb)`` once and passes it to every block."""

    def __init__(self, dim: int, n: int):
        super().__init__()
        self.n = n
        self.linear = nn.Linear(dim, n * dim)

    def forward(self, e: Tensor) -> tuple[Tensor, ...]:
        return self.linear(e).chunk(self.n, dim=1)


class _GeluLinearFunction(torch.autograd.Function):
    """``y = gelu_tanh(m) @ w^T + b`` saving only ``m`` (the GELU is recomputed in backward)."""

    @staticmethod
    def forward(ctx, m, w, b):
        ctx.save_for_backward(m, w)
        return F.linear(F.gelu(m, approximate="tanh"), w, b)

    @staticmethod
    def backward(ctx, dy):
        m, w = ctx.saved_tensors
        need = ctx.needs_input_grad
        dm = dw = db = None
        dy2 = dy.reshape(-1, dy.shape[-1])
        if need[0]:
            dm = torch.ops.aten.gelu_backward(dy @ w.to(dy.dtype), m, approximate="tanh")
        if need[1]:
            a = F.gelu(m, approximate="tanh")
            dw = (dy2.t() @ a.reshape(-1, a.shape[-1])).to(w.dtype)
        if need[2]:
            db = dy2.sum(0)
        return dm, dw, db


def gelu_linear(m: Tensor, w: Tensor, b: Optional[Tensor]) -> Tensor:
    """``F.linear(F.gelu(m, approximate="tanh"), w, b)`` that saves ``m`` instead of ``gelu(m)``."""
    return _GeluLinearFunction.apply(m, w, b)


class FeedForward(nn.Module):
    """``gelu_tanh(x W1 + b1) W2 + b2`` (diffusers' ``FeedForward(activation_fn="gelu-approximate")``);
    saves ``x`` and the pre-activation for backward, not the activation."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return gelu_linear(self.fc1(x), self.fc2.weight, self.fc2.bias)


class ModelOutputMixin:
    """What diffusers pipelines read from a transformer besides its forward."""

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def enable_gradient_checkpointing(self) -> None:
        """Recompute each block in backward (``torch.utils.checkpoint``, non-reentrant)."""
        self.gradient_checkpointing = True

    def disable_gradient_checkpointing(self) -> None:
        self.gradient_checkpointing = False

    @contextlib.contextmanager
    def cache_context(self, name: str):  # FluxPipeline wraps its calls in it; fastgen keeps no cache
        yield

    def _run_block(self, block, *args):
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def _check_joint_kwargs(self, joint_attention_kwargs: Optional[dict]) -> None:
        if joint_attention_kwargs:
            raise NotImplementedError(
                f"{type(self).__name__}: joint_attention_kwargs {sorted(joint_attention_kwargs)} are not supported "
                "(no attention processors, IP-adapters or LoRA scales); run the diffusers model for those"
            )


def output(sample: Tensor, return_dict: bool):
    """``(sample,)`` or diffusers' ``Transformer2DModelOutput`` (a dataclass with ``.sample`` without diffusers)."""
    if not return_dict:
        return (sample,)
    try:
        from diffusers.models.modeling_outputs import Transformer2DModelOutput
    except Exception:  # diffusers is optional
        return TransformerOutput(sample=sample)
    return Transformer2DModelOutput(sample=sample)


@dataclass
class TransformerOutput:
    sample: Tensor


def check_tensor(model: str, name: str, t, dims: int, last: Optional[int] = None, batch: Optional[int] = None):
    if t is None:
        raise ValueError(f"{model}: {name} is required")
    if not isinstance(t, Tensor) or t.dim() != dims:
        raise ValueError(f"{model}: {name} must be a {dims}-D tensor, got "
                         f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
    if last is not None and t.shape[-1] != last:
        raise ValueError(f"{model}: {name} must have {last} features in its last dim, got shape {tuple(t.shape)}")
    if batch is not None and t.shape[0] != batch:
        raise ValueError(f"{model}: {name} has batch {t.shape[0]}, hidden_states has {batch}")


# ----------------------------------------------------------------------------- SD3 modules


class PatchEmbed(nn.Module):
    """``conv_p(latent)`` flattened to tokens plus the centre crop of a fixed 2-D sin-cos table
    (diffusers' ``PatchEmbed(pos_embed_max_size=...)``; the table is a persistent buffer)."""

    def __init__(self, cfg: SD3Config):
        super().__init__()
        self.patch_size, self.max_size = cfg.patch_size, cfg.pos_embed_max_size
        self.proj = nn.Conv2d(cfg.in_channels, cfg.inner_dim, cfg.patch_size, stride=cfg.patch_size)
        base = cfg.sample_size // cfg.patch_size
        self.register_buffer("pos_embed", sincos_2d(cfg.inner_dim, cfg.pos_embed_max_size, base)[None])

    def forward(self, latent: Tensor) -> Tensor:
        h, w = latent.shape[-2] // self.patch_size, latent.shape[-1] // self.patch_size
        x = self.proj(latent).flatten(2).transpose(1, 2)
        top, left = (self.max_size - h) // 2, (self.max_size - w) // 2
        pos = self.pos_embed.reshape(1, self.max_size, self.max_size, -1)[:, top:top + h, left:left + w]
        return (x + pos.reshape(1, h * w, -1)).to(x.dtype)


def sincos_2d(dim: int, grid: int, base_size: int) -> Tensor:
    """The (grid * grid, dim) 2-D sin-cos table of MAE / DiT (diffusers' ``get_2d_sincos_pos_embed``,
    interpolation scale 1): half the features encode the column, half the row."""
    coords = torch.arange(grid, dtype=torch.float32) / (grid / base_size)
    col, row = torch.meshgrid(coords, coords, indexing="xy")  # col[i, j] = coords[j], row[i, j] = coords[i]

    def one(pos: Tensor, d: int) -> Tensor:
        omega = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float64) / (d / 2.0))
        out = torch.outer(pos.reshape(-1).double(), omega)
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    return torch.cat([one(col, dim // 2), one(row, dim // 2)], dim=1).float()


class JointAttention(nn.Module):
    """Attention over image tokens (and, when ``joint``, text tokens after them), one QKV GEMM per
    stream, optional per-head RMSNorm of q and k (SD3.5), one ``fastgen.ops.attention`` call."""

    def __init__(self, cfg: SD3Config, joint: bool, context_out: bool, backend: str):
        super().__init__()
        D = cfg.inner_dim
        self.heads, self.head_dim, self.backend = cfg.num_attention_heads, cfg.attention_head_dim, backend
        self.to_qkv = nn.Linear(D, 3 * D)
        self.to_out = nn.Linear(D, D)
        self.to_added_qkv = nn.Linear(D, 3 * D) if joint else None
        self.to_add_out = nn.Linear(D, D) if joint and context_out else None
        qk = cfg.qk_norm == "rms_norm"
        d = self.head_dim
        self.norm_q = _Weight(d) if qk else None
        self.norm_k = _Weight(d) if qk else None
        self.norm_added_q = _Weight(d) if qk and joint else None
        self.norm_added_k = _Weight(d) if qk and joint else None

    def _qkv(self, lin: nn.Linear, x: Tensor, nq, nk):
        qkv = lin(x).unflatten(-1, (3, self.heads, self.head_dim))  # (B, S, 3, H, d)
        q, k, v = qkv.unbind(2)
        if nq is not None:
            q = rms_norm(q, nq.weight, 1e-6, backend=self.backend)
            k = rms_norm(k, nk.weight, 1e-6, backend=self.backend)
        return q, k, v

    def forward(self, x: Tensor, c: Optional[Tensor] = None):
        q, k, v = self._qkv(self.to_qkv, x, self.norm_q, self.norm_k)
        Si = x.shape[1]
        if c is not None:
            cq, ck, cv = self._qkv(self.to_added_qkv, c, self.norm_added_q, self.norm_added_k)
            q, k, v = torch.cat([q, cq], 1), torch.cat([k, ck], 1), torch.cat([v, cv], 1)
        o = attention(q, k, v, layout="bshd", backend=self.backend).flatten(2)  # (B, Si + St, D)
        out = self.to_out(o[:, :Si])
        if c is None:
            return out, None
        return out, (self.to_add_out(o[:, Si:]) if self.to_add_out is not None else None)


class _Weight(nn.Module):
    """A norm's weight alone (key ``<name>.weight``, as diffusers' ``RMSNorm``)."""

    def __init__(self, d: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))


class JointTransformerBlock(nn.Module):
    """One MMDiT block (diffusers' ``JointTransformerBlock``): returns ``(c, x)``, ``c`` None when
    the text stream is pre-only (the last block)."""

    def __init__(self, cfg: SD3Config, index: int, backend: str):
        super().__init__()
        D = cfg.inner_dim
        self.dual = index in cfg.dual_attention_layers
        self.context_pre_only = index == cfg.num_layers - 1
        self.backend = backend
        self.norm1 = AdaLN(D, 9 if self.dual else 6)
        self.norm1_context = AdaLN(D, 2 if self.context_pre_only else 6)
        self.attn = JointAttention(cfg, joint=True, context_out=not self.context_pre_only, backend=backend)
        self.attn2 = JointAttention(cfg, joint=False, context_out=False, backend=backend) if self.dual else None
        self.ff = FeedForward(D, 4 * D)
        self.ff_context = None if self.context_pre_only else FeedForward(D, 4 * D)

    def forward(self, x: Tensor, c: Tensor, e: Tensor):
        be = self.backend
        mod = self.norm1(e)
        shift1, scale1, gate1, shift2, scale2, gate2 = mod[:6]
        h = layer_norm_modulate(x, shift1, scale1, 1e-6, backend=be)
        if self.context_pre_only:
            cscale, cshift = self.norm1_context(e)  # diffusers' AdaLayerNormContinuous order: scale, shift
            ch = layer_norm_modulate(c, cshift, cscale, 1e-6, backend=be)
        else:
            cshift1, cscale1, cgate1, cshift2, cscale2, cgate2 = self.norm1_context(e)
            ch = layer_norm_modulate(c, cshift1, cscale1, 1e-6, backend=be)
        o, co = self.attn(h, ch)
        if self.dual:
            shift3, scale3, gate3 = mod[6:]
            h3 = layer_norm_modulate(x, shift3, scale3, 1e-6, backend=be)
            x = gated_residual(x, o, gate1, backend=be)
            o, _ = self.attn2(h3)
            gate1 = gate3
        h, x = gated_residual_layer_norm_modulate(x, o, gate1, shift2, scale2, 1e-6, backend=be)
        x = gated_residual(x, self.ff(h), gate2, backend=be)
        if self.context_pre_only:
            return None, x
        ch, c = gated_residual_layer_norm_modulate(c, co, cgate1, cshift2, cscale2, 1e-6, backend=be)
        c = gated_residual(c, self.ff_context(ch), cgate2, backend=be)
        return c, x


class SD3(ModelOutputMixin, nn.Module):
    """SD3 / SD3.5 MMDiT transformer (diffusers ``SD3Transformer2DModel`` math and weights).

    ``SD3(config | preset name, backend="auto")``; ``backend`` goes to every fastgen op call.
    """

    def __init__(self, config: "SD3Config | str | None" = None, backend: str = "auto", **overrides):
        super().__init__()
        if config is None or isinstance(config, str):
            config = SD3Config.preset(config) if config else SD3Config()
        if overrides:
            config = dataclasses.replace(config, **overrides)
        self.config = cfg = config
        self.backend = backend
        self.gradient_checkpointing = False
        D = cfg.inner_dim
        self.pos_embed = PatchEmbed(cfg)
        self.time_text_embed = TimeTextEmbed(D, cfg.pooled_projection_dim)
        self.context_embedder = nn.Linear(cfg.joint_attention_dim, cfg.caption_projection_dim)
        self.transformer_blocks = nn.ModuleList(
            [JointTransformerBlock(cfg, i, backend) for i in range(cfg.num_layers)]
        )
        self.norm_out = AdaLN(D, 2)
        self.proj_out = nn.Linear(D, cfg.patch_size ** 2 * cfg.out_channels)

    def forward(
        self,
        hidden_states: Tensor,
        encoder_hidden_states: Optional[Tensor] = None,
        pooled_projections: Optional[Tensor] = None,
        timestep: Optional[Tensor] = None,
        block_controlnet_hidden_states: Optional[list] = None,
        joint_attention_kwargs: Optional[dict] = None,
        return_dict: bool = True,
        skip_layers: Optional[list] = None,
    ):
        """Arguments and result as ``SD3Transformer2DModel.forward`` (see the module docstring for shapes)."""
        cfg = self._validate(hidden_states, encoder_hidden_states, pooled_projections, timestep)
        self._check_joint_kwargs(joint_attention_kwargs)
        H, W = hidden_states.shape[-2:]
        x = self.pos_embed(hidden_states)
        temb = self.time_text_embed(timestep, pooled_projections)
        e = F.silu(temb)
        c = self.context_embedder(encoder_hidden_states)
        skip = set(skip_layers or ())
        for i, block in enumerate(self.transformer_blocks):
            if i not in skip:
                c, x = self._run_block(block, x, c, e)
            if block_controlnet_hidden_states is not None and not block.context_pre_only:
                every = len(self.transformer_blocks) / len(block_controlnet_hidden_states)
                x = x + block_controlnet_hidden_states[int(i / every)]
        scale, shift = self.norm_out(e.to(x.dtype))
        x = layer_norm_modulate(x, shift, scale, 1e-6, backend=self.backend)
        x = self.proj_out(x)
        p, C = cfg.patch_size, cfg.out_channels
        x = x.reshape(x.shape[0], H // p, W // p, p, p, C)
        sample = torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], C, H, W)
        return output(sample, return_dict)

    def _validate(self, x, ctx, pooled, t) -> SD3Config:
        cfg, name = self.config, "SD3"
        if not isinstance(x, Tensor) or x.dim() != 4:
            raise ValueError(f"{name}: hidden_states must be a (B, C, H, W) latent, got "
                             f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
        B, C, H, W = x.shape
        if C != cfg.in_channels:
            raise ValueError(f"{name}: hidden_states has {C} channels, the config expects in_channels={cfg.in_channels}")
        p = cfg.patch_size
        if H % p or W % p:
            raise ValueError(f"{name}: latent size {H}x{W} is not divisible by the patch size {p}")
        if H // p > cfg.pos_embed_max_size or W // p > cfg.pos_embed_max_size:
            raise ValueError(f"{name}: latent size {H}x{W} is {H // p}x{W // p} patches, more than "
                             f"pos_embed_max_size={cfg.pos_embed_max_size}")
        check_tensor(name, "encoder_hidden_states", ctx, 3, cfg.joint_attention_dim, B)
        check_tensor(name, "pooled_projections", pooled, 2, cfg.pooled_projection_dim, B)
        if t is None:
            raise ValueError(f"{name}: timestep is required")
        return cfg

    # ------------------------------------------------------------------ weights

    config_class = SD3Config

    @staticmethod
    def fused_parts(cfg: SD3Config) -> dict[str, list[tuple[str, int]]]:
        """fastgen key -> [(diffusers key, rows)] for the fused QKV tensors (concatenated along dim 0)."""
        D = cfg.inner_dim
        parts: dict[str, list[tuple[str, int]]] = {}
        for i in range(cfg.num_layers):
            for attn in ["attn", "attn2"] if i in cfg.dual_attention_layers else ["attn"]:
                pre = f"transformer_blocks.{i}.{attn}."
                for kind in ("weight", "bias"):
                    parts[f"{pre}to_qkv.{kind}"] = [(f"{pre}to_{n}.{kind}", D) for n in "qkv"]
                    if attn == "attn":
                        parts[f"{pre}to_added_qkv.{kind}"] = [(f"{pre}add_{n}_proj.{kind}", D) for n in "qkv"]
        return parts

    @staticmethod
    def rename(key: str) -> str:
        """fastgen key -> diffusers key of every tensor that is not fused."""
        return (key.replace(".to_out.", ".to_out.0.").replace(".fc1.", ".net.0.proj.").replace(".fc2.", ".net.2."))

    @classmethod
    def from_diffusers(cls, model, backend: str = "auto") -> "SD3":
        """The fastgen model with the weights of a diffusers ``SD3Transformer2DModel``, on its device and in its
        dtype. Unfused weights share storage with ``model``; the fused QKV weights are new tensors."""
        from fastgen.models._original_layout import load_fused

        cfg = SD3Config.from_dict(dict(model.config))
        return load_fused(cls, cfg, model.state_dict(), backend=backend)

    def to_diffusers_state_dict(self) -> dict:
        """A state dict that ``SD3Transformer2DModel(**config).load_state_dict(sd, strict=True)`` accepts."""
        from fastgen.models._original_layout import split_fused

        return split_fused(self.state_dict(), self.fused_parts(self.config), self.rename)

    def to_original_state_dict(self) -> dict:
        """The weights in Stability's original single-file layout (``joint_blocks.N...``)."""
        from fastgen.models._original_layout import diffusers_to_original, sd3_table

        return diffusers_to_original(self.to_diffusers_state_dict(), sd3_table(self.config))

    @classmethod
    def from_pretrained(cls, path, torch_dtype: Optional[torch.dtype] = None, device=None,
                        config: "SD3Config | str | dict | None" = None, backend: str = "auto",
                        subfolder: Optional[str] = None) -> "SD3":
        """Load safetensors in diffusers layout (a model folder with ``config.json``, a pipeline folder with
        ``transformer/``, a single or a sharded file) or Stability's original single file (``joint_blocks.N...``,
        optionally under ``model.diffusion_model.``). Without ``config`` (an SD3Config, a dict or a preset name)
        it is read from ``config.json`` or inferred from the tensor shapes. The model is built on the meta
        device and each tensor materialised once, on ``device`` in ``torch_dtype``."""
        from fastgen.models import _original_layout as lay

        return lay.from_pretrained(cls, path, torch_dtype, device, config, backend, subfolder,
                                   original_table=lay.sd3_table, infer_config=infer_sd3_config,
                                   original_marker="joint_blocks.", diffusers_marker="transformer_blocks.")


def infer_sd3_config(sd: dict, layout: str) -> SD3Config:
    """The SD3Config of a state dict in the original or the diffusers layout, from its keys and shapes
    (head dim: the qk-norm weight's size, else 64 as in every released SD3)."""
    from fastgen.models._original_layout import PREFIX

    sd = {k[len(PREFIX):] if k.startswith(PREFIX) else k: v for k, v in sd.items()}
    orig = layout == "original"
    names = dict(
        proj="x_embedder.proj.weight" if orig else "pos_embed.proj.weight",
        pos="pos_embed" if orig else "pos_embed.pos_embed",
        ctx="context_embedder.weight",
        pooled="y_embedder.mlp.0.weight" if orig else "time_text_embed.text_embedder.linear_1.weight",
        out="final_layer.linear.weight" if orig else "proj_out.weight",
    )
    absent = [k for k in names.values() if k not in sd]
    if absent:
        raise ValueError(f"SD3.from_pretrained: cannot infer the config, the checkpoint lacks {absent}; "
                         "pass config= (an SD3Config, a dict or a preset name)")
    blocks, attn2, qk = "joint_blocks." if orig else "transformer_blocks.", ".attn2.", ".ln_q." if orig else ".norm_q."
    layers = sorted({int(k.split(".")[1]) for k in sd if k.startswith(blocks)})
    proj = sd[names["proj"]]
    D, C, p = proj.shape[0], proj.shape[1], proj.shape[-1]
    qk_key = next((k for k in sd if qk in k), None)
    head = sd[qk_key].shape[0] if qk_key else 64
    return SD3Config(
        patch_size=p, in_channels=C, num_layers=len(layers), attention_head_dim=head, num_attention_heads=D // head,
        joint_attention_dim=sd[names["ctx"]].shape[1], caption_projection_dim=sd[names["ctx"]].shape[0],
        pooled_projection_dim=sd[names["pooled"]].shape[1], out_channels=sd[names["out"]].shape[0] // (p * p),
        pos_embed_max_size=int(round(sd[names["pos"]].shape[1] ** 0.5)),
        dual_attention_layers=tuple(sorted({int(k.split(".")[1]) for k in sd if k.startswith(blocks) and attn2 in k})),
        qk_norm="rms_norm" if qk_key else None,
    )
