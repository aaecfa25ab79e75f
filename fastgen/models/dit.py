"""DiT (Peebles & Xie, 2023): a class-conditional latent diffusion transformer with adaLN-Zero.

Same math and weights as diffusers' ``DiTTransformer2DModel`` (``norm_type="ada_norm_zero"``).
Shapes, for a latent ``(B, C, H, W)``, patch ``p``, ``S = (H/p)(W/p)`` tokens of width ``N = heads * D``::

    x   = conv_p(latent) + pos2d                                (B, S, N)
    per block l (each block has its own timestep / class embedder, as in the checkpoints):
        c_l  = MLP_l(sincos(t)) + E_l[y]                        (B, N)
        shift1, scale1, gate1, shift2, scale2, gate2 = Linear_l(silu(c_l)).chunk(6)   each (B, N)
        h    = LN(x) (1 + scale1) + shift1                       layer_norm_modulate (eps 1e-6)
        a    = Out(attention(QKV(h)))                            one GEMM for Q, K, V
        x    = x + gate1 a;  h = LN(x) (1 + scale2) + shift2     gated_residual_layer_norm_modulate (eps norm_eps)
        x    = x + gate2 FC2(gelu_tanh(FC1(h)))                  gelu_linear + gated_residual

Saved for backward per block (the point of writing the block by hand): the residual stream
(shared with the neighbouring blocks), Q K V (one tensor), the attention output, the attention
projection, the mid-block stream, FC1's output (4N) and the FF output: 12 x (B, S, N) against
diffusers' 20. The two normed tensors are recomputed in backward (``modulated_norm_linear``,
``gated_modulated_norm_linear``) and GELU's output too (``gelu_linear``).
    final: shift, scale = Linear(silu(c_0)).chunk(2);  out = Proj(LN(x)(1 + scale) + shift)
    unpatchify -> (B, out_channels, H, W)

Every op takes the model's ``backend`` ("auto" | "triton" | "torch"). Unlike diffusers, which
assumes a square token grid when unpatchifying, non-square latents come out right.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from fastgen.models._common import (
    FastgenModel,
    GeluFeedForward,
    ModelConfig,
    ModelOutput,
    PatchEmbed2d,
    TimestepMLP,
    check_dtype,
    check_latent,
    gated_modulated_norm_linear,
    fuse_qkv,
    modulated_norm_linear,
    rename_keys,
    split_qkv,
    timestep_embedding,
    unpatchify,
)
from fastgen.ops.attention import attention
from fastgen.ops.modulate import gated_residual, layer_norm_modulate

# ----------------------------------------------------------------------------- config


@dataclasses.dataclass
class DiTConfig(ModelConfig):
    """Field names are diffusers' ``DiTTransformer2DModel`` config keys (pipelines read them)."""

    num_attention_heads: int = 16
    attention_head_dim: int = 72
    in_channels: int = 4
    out_channels: Optional[int] = None  # None: in_channels
    num_layers: int = 28
    sample_size: int = 32  # latent side the sin-cos table is scaled to
    patch_size: int = 2
    num_embeds_ada_norm: int = 1000  # number of classes
    norm_eps: float = 1e-5  # eps of the second (feed-forward) norm; the first is 1e-6
    attention_bias: bool = True
    activation_fn: str = "gelu-approximate"
    class_dropout_prob: float = 0.1  # label dropout in training; adds the null label (index = num classes)

    def __post_init__(self):
        if self.out_channels is None:
            self.out_channels = self.in_channels
        if self.activation_fn not in ("gelu-approximate", "gelu"):
            raise ValueError(f"DiTConfig: activation_fn must be 'gelu-approximate' or 'gelu', got {self.activation_fn!r}")
        if (self.num_attention_heads * self.attention_head_dim) % 4:
            raise ValueError("DiTConfig: the width (heads * head dim) must be a multiple of 4 (2-D sin-cos table)")

    @classmethod
    def preset(cls, name: str) -> "DiTConfig":
        """One of :data:`DIT_PRESETS` (the released facebook/DiT-XL-2 checkpoints)."""
        return cls._from_presets(DIT_PRESETS, name, error=KeyError)


_XL2 = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
            patch_size=2, num_embeds_ada_norm=1000)
DIT_PRESETS = {
    "DiT-XL/2-256": dict(_XL2, sample_size=32),  # 256 px images, 32 x 32 latents, 256 tokens
    "DiT-XL/2-512": dict(_XL2, sample_size=64),  # 512 px images, 64 x 64 latents, 1024 tokens
}

_UNSUPPORTED = {"norm_type": "ada_norm_zero", "norm_elementwise_affine": False}

# ----------------------------------------------------------------------------- modules


class SelfAttention(nn.Module):
    """``Out(attention(Q, K, V))`` with Q, K, V from one GEMM; keys to_qkv / to_out."""

    def __init__(self, dim: int, heads: int, head_dim: int, bias: bool, backend):
        super().__init__()
        self.heads, self.head_dim, self.backend = heads, head_dim, backend
        self.to_qkv = nn.Linear(dim, 3 * heads * head_dim, bias=bias)
        self.to_out = nn.Linear(heads * head_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.attend(self.to_qkv(x))

    def attend(self, qkv: Tensor) -> Tensor:
        """The rest after the QKV GEMM: ``qkv`` (B, S, 3 * H * D) -> (B, S, dim)."""
        B, S, _ = qkv.shape
        qkv = qkv.unflatten(-1, (3, self.heads, self.head_dim))  # (B, S, 3, H, D), a view
        o = attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], layout="bshd", backend=self.backend)
        return self.to_out(o.reshape(B, S, self.heads * self.head_dim))


class ClassEmbedding(nn.Module):
    """``E[y]``, with diffusers' label dropout in training (a dropped label becomes the null class)."""

    def __init__(self, num_classes: int, dim: int, dropout_prob: float):
        super().__init__()
        self.num_classes, self.dropout_prob = num_classes, dropout_prob
        self.embedding_table = nn.Embedding(num_classes + (dropout_prob > 0), dim)

    def forward(self, labels: Tensor) -> Tensor:
        if self.training and self.dropout_prob > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
            labels = torch.where(drop, self.num_classes, labels)
        return self.embedding_table(labels)


class TimestepLabelEmbedding(nn.Module):
    """``c = MLP(sincos_256(t)) + E[y]`` (diffusers' CombinedTimestepLabelEmbeddings)."""

    def __init__(self, num_classes: int, dim: int, dropout_prob: float):
        super().__init__()
        self.timestep_embedder = TimestepMLP(256, dim)
        self.class_embedder = ClassEmbedding(num_classes, dim, dropout_prob)

    def forward(self, t: Tensor, labels: Tensor, dtype: torch.dtype) -> Tensor:
        temb = self.timestep_embedder(timestep_embedding(t, 256, True, 1).to(dtype))
        return temb + self.class_embedder(labels)


class AdaLNZero(nn.Module):
    """The block's conditioning: ``Linear(silu(c))`` -> six (B, N) modulation vectors (views)."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        N = cfg.inner_dim
        self.emb = TimestepLabelEmbedding(cfg.num_embeds_ada_norm, N, cfg.class_dropout_prob)
        self.linear = nn.Linear(N, 6 * N)

    def forward(self, t: Tensor, labels: Tensor, dtype: torch.dtype):
        return self.linear(F.silu(self.emb(t, labels, dtype))).chunk(6, dim=1)


class DiTBlock(nn.Module):
    def __init__(self, cfg: DiTConfig, backend):
        super().__init__()
        N = cfg.inner_dim
        self.eps, self.backend = cfg.norm_eps, backend
        self.norm1 = AdaLNZero(cfg)
        self.attn1 = SelfAttention(N, cfg.num_attention_heads, cfg.attention_head_dim, cfg.attention_bias, backend)
        approx = "tanh" if cfg.activation_fn == "gelu-approximate" else "none"
        self.ff = GeluFeedForward(N, 4 * N, approximate=approx)

    def forward(self, x: Tensor, t: Tensor, labels: Tensor) -> Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.norm1(t, labels, x.dtype)
        qkv, fc1 = self.attn1.to_qkv, self.ff.fc1
        # LN-modulate + QKV GEMM; the normed tensor is recomputed in backward, not kept
        a = self.attn1.attend(modulated_norm_linear(x, shift1, scale1, qkv.weight, qkv.bias, eps=1e-6,
                                                    backend=self.backend))
        # x += gate1 * a; LN-modulate; FC1 GEMM (one fused kernel before the GEMM)
        u, x = gated_modulated_norm_linear(x, a, gate1, shift2, scale2, fc1.weight, fc1.bias, eps=self.eps,
                                           backend=self.backend)
        return gated_residual(x, self.ff.project(u), gate2, backend=self.backend)


# ----------------------------------------------------------------------------- model


class DiT(FastgenModel):
    """``DiT(config, backend="auto")``: a drop-in for diffusers' ``DiTTransformer2DModel``.

    ``forward(hidden_states (B, C, H, W), timestep (B,) | scalar, class_labels (B,) int64,
    return_dict=True)`` -> ``ModelOutput(sample=(B, out_channels, H, W))`` or ``(sample,)``.
    """

    config_class = DiTConfig

    def __init__(self, config: DiTConfig, backend: Optional[str] = "auto"):
        super().__init__(config, backend)
        N, p = config.inner_dim, config.patch_size
        self.pos_embed = PatchEmbed2d(config.in_channels, N, p, base_size=config.sample_size // p)
        self.transformer_blocks = nn.ModuleList(DiTBlock(config, backend) for _ in range(config.num_layers))
        self.norm_eps_out = 1e-6
        self.proj_out_1 = nn.Linear(N, 2 * N)
        self.proj_out_2 = nn.Linear(N, p * p * config.out_channels)

    def forward(self, hidden_states: Tensor, timestep=None, class_labels: Optional[Tensor] = None,
                cross_attention_kwargs: Optional[dict] = None, return_dict: bool = True):
        cfg = self.config
        check_latent("DiT", hidden_states, cfg.in_channels, cfg.patch_size)
        check_dtype("DiT", hidden_states, self.pos_embed.proj.weight.dtype, self.backend)
        B = hidden_states.shape[0]
        if class_labels is None:
            raise ValueError(f"DiT: class_labels (B,) int64 are required (0..{cfg.num_embeds_ada_norm - 1}, or "
                             f"{cfg.num_embeds_ada_norm} for the null label of classifier-free guidance)")
        if timestep is None:
            raise ValueError("DiT: timestep (B,) or a scalar is required")
        if cross_attention_kwargs:
            warnings.warn(f"DiT: cross_attention_kwargs {sorted(cross_attention_kwargs)} are ignored")
        t = torch.as_tensor(timestep, device=hidden_states.device)
        t = t.expand(B) if t.dim() == 0 else t
        labels = torch.as_tensor(class_labels, device=hidden_states.device)
        labels = labels.expand(B) if labels.dim() == 0 else labels
        for name, v in (("timestep", t), ("class_labels", labels)):
            if v.shape != (B,):
                raise ValueError(f"DiT: {name} must be a scalar or of shape ({B},), got {tuple(v.shape)}")

        h, w = hidden_states.shape[-2] // cfg.patch_size, hidden_states.shape[-1] // cfg.patch_size
        x = self.pos_embed(hidden_states)
        for block in self.transformer_blocks:
            x = self._maybe_checkpoint(block, x, t, labels)

        c = self.transformer_blocks[0].norm1.emb(t, labels, x.dtype)
        shift, scale = self.proj_out_1(F.silu(c)).chunk(2, dim=1)
        x = layer_norm_modulate(x, shift, scale, eps=self.norm_eps_out, backend=self.backend)
        out = unpatchify(self.proj_out_2(x), h, w, cfg.patch_size, cfg.out_channels)
        return ModelOutput(sample=out) if return_dict else (out,)

    # ------------------------------------------------------------------------- interchange

    @classmethod
    def config_from_diffusers(cls, config) -> DiTConfig:
        config = dict(config)
        for k, want in _UNSUPPORTED.items():
            if k in config and config[k] != want:
                raise NotImplementedError(f"DiT: diffusers config {k}={config[k]!r} is not supported (only {want!r})")
        if config.get("dropout", 0.0):
            raise NotImplementedError(f"DiT: dropout={config['dropout']} is not supported (the released models use 0)")
        names = {f.name for f in dataclasses.fields(DiTConfig)}
        return DiTConfig(**{k: v for k, v in config.items() if k in names})

    def diffusers_config(self) -> dict:
        """Constructor kwargs of the matching ``DiTTransformer2DModel``."""
        d = self.config.to_dict()
        d.pop("class_dropout_prob")
        return d

    @classmethod
    def state_dict_from_diffusers(cls, sd: dict) -> dict:
        return _convert(sd, to_diffusers=False)

    def to_diffusers_state_dict(self) -> dict:
        return _convert(self.state_dict(), to_diffusers=True)


# ----------------------------------------------------------------------------- key maps

# (fastgen suffix, diffusers suffix) inside each transformer block
_RENAMES = (("attn1.to_out.", "attn1.to_out.0."), ("ff.fc1.", "ff.net.0.proj."), ("ff.fc2.", "ff.net.2."))


def _block_prefixes(sd: dict) -> list:
    return sorted({k[: k.index(".", len("transformer_blocks.")) + 1] for k in sd if k.startswith("transformer_blocks.")})


def _convert(sd: dict, to_diffusers: bool) -> dict:
    sd = rename_keys(dict(sd), _RENAMES, to_diffusers)
    for pre in _block_prefixes(sd):
        (split_qkv if to_diffusers else fuse_qkv)(sd, pre + "attn1.")
    return sd
