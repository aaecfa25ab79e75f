"""PixArt-α / PixArt-Σ: a text-conditional DiT with adaLN-single and cross-attention to T5 tokens.

Same math and weights as diffusers' ``PixArtTransformer2DModel`` (``norm_type="ada_norm_single"``).
Latent ``(B, C, H, W)``, patch ``p``, ``S = (H/p)(W/p)`` tokens of width ``N``, text ``(B, L, C_text)``::

    x    = conv_p(latent) + pos2d (interpolation_scale)                    (B, S, N)
    e    = MLP(sincos(t)) [+ MLP_res(sincos(res)) | MLP_ar(sincos(ar))]    (B, N)   additional conditions
    m    = Linear(silu(e))                                                 (B, 6N)  shared by all blocks
    txt  = MLP_gelu(caption)                                               (B, L, N)
    per block l, with its own table T_l (6, N):
        shift1, scale1, gate1, shift2, scale2, gate2 = T_l + m.view(B, 6, N)     each (B, 1, N)
        h = LN(x)(1 + scale1) + shift1                     layer_norm_modulate
        x = x + gate1 Out(attention(QKV(h)))               one QKV GEMM, gated_residual
        x = x + Out2(attention(Q(x), KV(txt), mask))       no norm (as PixArt); one KV GEMM; the text
                                                           mask packs the kept keys (varlen attention)
        h = LN(x)(1 + scale2) + shift2                     layer_norm_modulate
        x = x + gate2 FC2(gelu_tanh(FC1(h)))               gelu_linear + gated_residual
    final: shift, scale = T_out + e[:, None];  out = Proj(LN(x)(1 + scale) + shift) -> unpatchify

The text mask (``encoder_attention_mask`` (B, L), 1 keep / 0 drop, or diffusers' bias (B, 1, L)
of 0 / -10000) is exact here: diffusers adds -10000 to dropped keys, whose softmax weight is
then 0 in fp32 and bf16; a sample with every key dropped gets the same constant bias on every
key, i.e. plain attention over all keys, which is what this model does for such a sample.
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
    fuse_qkv,
    modulated_norm_linear,
    rename_keys,
    split_qkv,
    timestep_embedding,
    unpatchify,
)
from fastgen.models.dit import SelfAttention
from fastgen.ops.attention import attention
from fastgen.ops.modulate import gated_residual, layer_norm_modulate

# ----------------------------------------------------------------------------- config


@dataclasses.dataclass
class PixArtConfig(ModelConfig):
    """Field names are diffusers' ``PixArtTransformer2DModel`` config keys.

    ``interpolation_scale`` None -> max(sample_size // 64, 1) and ``use_additional_conditions``
    None -> (sample_size == 128), resolved at construction exactly as diffusers does.
    """

    num_attention_heads: int = 16
    attention_head_dim: int = 72
    in_channels: int = 4
    out_channels: Optional[int] = 8
    num_layers: int = 28
    cross_attention_dim: int = 1152
    attention_bias: bool = True
    sample_size: int = 128
    patch_size: int = 2
    activation_fn: str = "gelu-approximate"
    num_embeds_ada_norm: int = 1000
    norm_eps: float = 1e-6
    interpolation_scale: Optional[float] = None
    use_additional_conditions: Optional[bool] = None
    caption_channels: Optional[int] = None

    def __post_init__(self):
        if self.out_channels is None:
            self.out_channels = self.in_channels
        if self.interpolation_scale is None:
            self.interpolation_scale = max(self.sample_size // 64, 1)
        if self.use_additional_conditions is None:
            self.use_additional_conditions = self.sample_size == 128
        if self.activation_fn not in ("gelu-approximate", "gelu"):
            raise ValueError(f"PixArtConfig: activation_fn must be 'gelu-approximate' or 'gelu', got "
                             f"{self.activation_fn!r}")
        if self.use_additional_conditions and self.inner_dim % 3:
            raise ValueError(f"PixArtConfig: with additional conditions the width {self.inner_dim} must be a "
                             f"multiple of 3 (resolution and aspect-ratio embeddings of width N / 3)")
        if self.inner_dim % 4:
            raise ValueError("PixArtConfig: the width (heads * head dim) must be a multiple of 4")

    @classmethod
    def preset(cls, name: str) -> "PixArtConfig":
        """One of :data:`PIXART_PRESETS` (the released PixArt-α / PixArt-Σ transformers)."""
        return cls._from_presets(PIXART_PRESETS, name, error=KeyError)


_XL2 = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
            cross_attention_dim=1152, caption_channels=4096, patch_size=2, norm_eps=1e-6)
PIXART_PRESETS = {
    "PixArt-alpha-512": dict(_XL2, sample_size=64, interpolation_scale=1, use_additional_conditions=False),
    "PixArt-alpha-1024": dict(_XL2, sample_size=128, interpolation_scale=2, use_additional_conditions=True),
    "PixArt-Sigma-512": dict(_XL2, sample_size=64, interpolation_scale=1, use_additional_conditions=False),
    "PixArt-Sigma-1024": dict(_XL2, sample_size=128, interpolation_scale=2, use_additional_conditions=False),
    "PixArt-Sigma-2K": dict(_XL2, sample_size=256, interpolation_scale=4, use_additional_conditions=False),
}

_UNSUPPORTED = {"norm_type": "ada_norm_single", "norm_elementwise_affine": False, "attention_type": "default"}

# ----------------------------------------------------------------------------- modules


class TimestepSizeEmbedding(nn.Module):
    """``e = MLP(sincos(t)) [+ cat(MLP_res(sincos(h, w)), MLP_ar(sincos(ar)))]`` (B, N)."""

    def __init__(self, dim: int, additional: bool):
        super().__init__()
        self.additional = additional
        self.timestep_embedder = TimestepMLP(256, dim)
        if additional:
            self.resolution_embedder = TimestepMLP(256, dim // 3)
            self.aspect_ratio_embedder = TimestepMLP(256, dim // 3)

    def forward(self, t: Tensor, resolution, aspect_ratio, B: int, dtype: torch.dtype) -> Tensor:
        e = self.timestep_embedder(timestep_embedding(t, 256, True, 0).to(dtype))
        if self.additional:
            res = self.resolution_embedder(timestep_embedding(resolution.flatten(), 256, True, 0).to(dtype))
            ar = self.aspect_ratio_embedder(timestep_embedding(aspect_ratio.flatten(), 256, True, 0).to(dtype))
            e = e + torch.cat([res.reshape(B, -1), ar.reshape(B, -1)], dim=1)
        return e


class AdaLNSingle(nn.Module):
    """``(Linear(silu(e)) (B, 6N), e (B, N))``: one modulation for all blocks."""

    def __init__(self, dim: int, additional: bool):
        super().__init__()
        self.emb = TimestepSizeEmbedding(dim, additional)
        self.linear = nn.Linear(dim, 6 * dim)

    def forward(self, t, resolution, aspect_ratio, B, dtype):
        e = self.emb(t, resolution, aspect_ratio, B, dtype)
        return self.linear(F.silu(e)), e


class CrossAttention(nn.Module):
    """``Out(attention(Q(x), K(txt), V(txt)))``, K and V from one GEMM; masked keys are dropped."""

    def __init__(self, dim: int, context_dim: int, heads: int, head_dim: int, bias: bool, backend):
        super().__init__()
        self.heads, self.head_dim, self.backend = heads, head_dim, backend
        inner = heads * head_dim
        self.to_q = nn.Linear(dim, inner, bias=bias)
        self.to_kv = nn.Linear(context_dim, 2 * inner, bias=bias)
        self.to_out = nn.Linear(inner, dim)

    def forward(self, x: Tensor, context: Tensor, keep: Optional[Tensor]) -> Tensor:
        B, S, _ = x.shape
        H, D = self.heads, self.head_dim
        q = self.to_q(x).unflatten(-1, (H, D))  # (B, S, H, D)
        kv = self.to_kv(context).unflatten(-1, (2, H, D))  # (B, L, 2, H, D)
        if keep is None:
            o = attention(q, kv[:, :, 0], kv[:, :, 1], layout="bshd", backend=self.backend)
        else:  # varlen: every sample's S queries against its kept keys only
            L = kv.shape[1]
            kv = kv[keep]  # (T, 2, H, D), samples in order
            counts = keep.sum(1, dtype=torch.int32)
            cu_k = F.pad(torch.cumsum(counts, 0, dtype=torch.int32), (1, 0))
            cu_q = torch.arange(B + 1, device=x.device, dtype=torch.int32) * S
            o = attention(q.reshape(B * S, H, D), kv[:, 0], kv[:, 1], cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                          max_seqlen_q=S, max_seqlen_k=L, backend=self.backend)
        return self.to_out(o.reshape(B, S, H * D))


class PixArtBlock(nn.Module):
    def __init__(self, cfg: PixArtConfig, backend):
        super().__init__()
        N, heads, hd = cfg.inner_dim, cfg.num_attention_heads, cfg.attention_head_dim
        self.eps, self.backend = cfg.norm_eps, backend
        self.scale_shift_table = nn.Parameter(torch.randn(6, N) / N ** 0.5)
        self.attn1 = SelfAttention(N, heads, hd, cfg.attention_bias, backend)
        self.attn2 = CrossAttention(N, cfg.cross_attention_dim, heads, hd, cfg.attention_bias, backend)
        approx = "tanh" if cfg.activation_fn == "gelu-approximate" else "none"
        self.ff = GeluFeedForward(N, 4 * N, approximate=approx)

    def forward(self, x: Tensor, mod: Tensor, context: Tensor, keep: Optional[Tensor]) -> Tensor:
        B, N = x.shape[0], x.shape[-1]
        shift1, scale1, gate1, shift2, scale2, gate2 = (self.scale_shift_table[None] + mod.view(B, 6, N)).chunk(6, 1)
        qkv, fc1 = self.attn1.to_qkv, self.ff.fc1
        # LN-modulate + QKV GEMM, the normed tensor recomputed in backward (not kept)
        a = self.attn1.attend(modulated_norm_linear(x, shift1, scale1, qkv.weight, qkv.bias, eps=self.eps,
                                                    backend=self.backend))
        x = gated_residual(x, a, gate1, backend=self.backend)
        x = x + self.attn2(x, context, keep)
        u = modulated_norm_linear(x, shift2, scale2, fc1.weight, fc1.bias, eps=self.eps, backend=self.backend)
        return gated_residual(x, self.ff.project(u), gate2, backend=self.backend)


# ----------------------------------------------------------------------------- model


def _keep_mask(mask: Optional[Tensor], B: int, L: int) -> Optional[Tensor]:
    """diffusers' encoder_attention_mask (B, L) 1/0 or bias (B, 1, L) 0/-10000 -> keep (B, L) bool or None."""
    if mask is None:
        return None
    if mask.dim() == 3 and mask.shape[1] == 1:
        if not mask.is_floating_point() or bool(((mask != 0) & (mask > -1000)).any()):
            raise ValueError("PixArt: a 3-D encoder_attention_mask must be diffusers' bias (B, 1, L) of 0 (keep) "
                             "and -10000 (drop); other additive biases are not supported")
        keep = mask[:, 0] == 0
    elif mask.dim() == 2:
        keep = mask.bool() if mask.dtype == torch.bool else mask != 0
    else:
        raise ValueError(f"PixArt: encoder_attention_mask must be (B, L) or (B, 1, L), got {tuple(mask.shape)}")
    if keep.shape != (B, L):
        raise ValueError(f"PixArt: encoder_attention_mask covers {tuple(keep.shape)} but the text is ({B}, {L})")
    if bool(keep.all()):
        return None
    # a sample with no kept key: diffusers' constant bias cancels in the softmax -> attend to all keys
    return keep | ~keep.any(1, keepdim=True)


class PixArt(FastgenModel):
    """``PixArt(config, backend="auto")``: a drop-in for diffusers' ``PixArtTransformer2DModel``.

    ``forward(hidden_states (B, C, H, W), encoder_hidden_states (B, L, caption_channels),
    timestep (B,) | scalar, added_cond_kwargs={"resolution": (B, 2), "aspect_ratio": (B, 1)},
    encoder_attention_mask (B, L), return_dict=True)`` -> ``ModelOutput(sample)`` or ``(sample,)``.
    """

    config_class = PixArtConfig

    def __init__(self, config: PixArtConfig, backend: Optional[str] = "auto"):
        super().__init__(config, backend)
        N, p = config.inner_dim, config.patch_size
        self.pos_embed = PatchEmbed2d(config.in_channels, N, p, base_size=config.sample_size // p,
                                      interpolation_scale=config.interpolation_scale)
        self.adaln_single = AdaLNSingle(N, config.use_additional_conditions)
        self.caption_projection = None
        if config.caption_channels is not None:
            self.caption_projection = TimestepMLP(config.caption_channels, N, act="gelu_tanh")
        self.transformer_blocks = nn.ModuleList(PixArtBlock(config, backend) for _ in range(config.num_layers))
        self.scale_shift_table = nn.Parameter(torch.randn(2, N) / N ** 0.5)
        self.proj_out = nn.Linear(N, p * p * config.out_channels)

    def forward(self, hidden_states: Tensor, encoder_hidden_states: Optional[Tensor] = None, timestep=None,
                added_cond_kwargs: Optional[dict] = None, cross_attention_kwargs: Optional[dict] = None,
                attention_mask: Optional[Tensor] = None, encoder_attention_mask: Optional[Tensor] = None,
                return_dict: bool = True):
        cfg = self.config
        check_latent("PixArt", hidden_states, cfg.in_channels, cfg.patch_size)
        check_dtype("PixArt", hidden_states, self.pos_embed.proj.weight.dtype, self.backend)
        B, dev = hidden_states.shape[0], hidden_states.device
        if attention_mask is not None:
            raise NotImplementedError("PixArt: attention_mask (a mask on the image self-attention) is not "
                                      "supported; the text mask is encoder_attention_mask")
        if cross_attention_kwargs:
            warnings.warn(f"PixArt: cross_attention_kwargs {sorted(cross_attention_kwargs)} are ignored")
        if timestep is None:
            raise ValueError("PixArt: timestep (B,) or a scalar is required")
        ctx_dim = cfg.caption_channels if cfg.caption_channels is not None else cfg.cross_attention_dim
        if encoder_hidden_states is None or encoder_hidden_states.dim() != 3 or \
                encoder_hidden_states.shape[0] != B or encoder_hidden_states.shape[-1] != ctx_dim:
            got = None if encoder_hidden_states is None else tuple(encoder_hidden_states.shape)
            raise ValueError(f"PixArt: encoder_hidden_states (B={B}, L, {ctx_dim}) text embeddings are required, "
                             f"got {got}")
        resolution = aspect_ratio = None
        if cfg.use_additional_conditions:
            added_cond_kwargs = added_cond_kwargs or {}
            resolution, aspect_ratio = added_cond_kwargs.get("resolution"), added_cond_kwargs.get("aspect_ratio")
            if resolution is None or aspect_ratio is None:
                raise ValueError("PixArt: this config uses additional conditions: pass added_cond_kwargs="
                                 "{'resolution': (B, 2) height and width in pixels, 'aspect_ratio': (B, 1)}")
        t = torch.as_tensor(timestep, device=dev)
        t = t.expand(B) if t.dim() == 0 else t
        if t.shape != (B,):
            raise ValueError(f"PixArt: timestep must be a scalar or of shape ({B},), got {tuple(t.shape)}")
        keep = _keep_mask(encoder_attention_mask, B, encoder_hidden_states.shape[1])

        h, w = hidden_states.shape[-2] // cfg.patch_size, hidden_states.shape[-1] // cfg.patch_size
        x = self.pos_embed(hidden_states)
        mod, e = self.adaln_single(t, resolution, aspect_ratio, B, x.dtype)
        context = encoder_hidden_states
        if self.caption_projection is not None:
            context = self.caption_projection(context)
        for block in self.transformer_blocks:
            x = self._maybe_checkpoint(block, x, mod, context, keep)

        shift, scale = (self.scale_shift_table[None] + e[:, None]).chunk(2, dim=1)
        x = layer_norm_modulate(x, shift, scale, eps=1e-6, backend=self.backend)
        out = unpatchify(self.proj_out(x), h, w, cfg.patch_size, cfg.out_channels)
        return ModelOutput(sample=out) if return_dict else (out,)

    # ------------------------------------------------------------------------- interchange

    @classmethod
    def config_from_diffusers(cls, config) -> PixArtConfig:
        config = dict(config)
        for k, want in _UNSUPPORTED.items():
            if config.get(k, want) != want:
                raise NotImplementedError(f"PixArt: diffusers config {k}={config[k]!r} is not supported (only {want!r})")
        if config.get("dropout", 0.0):
            raise NotImplementedError(f"PixArt: dropout={config['dropout']} is not supported")
        names = {f.name for f in dataclasses.fields(PixArtConfig)}
        return PixArtConfig(**{k: v for k, v in config.items() if k in names})

    def diffusers_config(self) -> dict:
        """Constructor kwargs of the matching ``PixArtTransformer2DModel``."""
        return self.config.to_dict()

    @classmethod
    def state_dict_from_diffusers(cls, sd: dict) -> dict:
        return _convert(sd, to_diffusers=False)

    def to_diffusers_state_dict(self) -> dict:
        return _convert(self.state_dict(), to_diffusers=True)


# ----------------------------------------------------------------------------- key maps

_RENAMES = (("attn1.to_out.", "attn1.to_out.0."), ("attn2.to_out.", "attn2.to_out.0."),
            ("ff.fc1.", "ff.net.0.proj."), ("ff.fc2.", "ff.net.2."))


def _convert(sd: dict, to_diffusers: bool) -> dict:
    sd = rename_keys(dict(sd), _RENAMES, to_diffusers)
    blocks = sorted({k[: k.index(".", len("transformer_blocks.")) + 1] for k in sd
                     if k.startswith("transformer_blocks.")})
    for pre in blocks:
        if to_diffusers:
            split_qkv(sd, pre + "attn1.")
            split_qkv(sd, pre + "attn2.", names=("to_k", "to_v"), fused="to_kv")
        else:
            fuse_qkv(sd, pre + "attn1.")
            fuse_qkv(sd, pre + "attn2.", names=("to_k", "to_v"), fused="to_kv")
    return sd
