"""Flux.1: the double-stream + single-stream MMDiT with rotary positions, on fastgen's fused ops.

Same math and weights as diffusers' ``FluxTransformer2DModel``. Shapes (D = heads * d, Si
packed image tokens, St text tokens, S = St + Si, R = sum(axes_dims_rope) = d)::

    hidden_states          (B, Si, in_channels)   packed 2x2 latent patches
    encoder_hidden_states  (B, St, joint_dim)     T5 token embeddings
    pooled_projections     (B, pooled_dim)        pooled CLIP embedding
    timestep, guidance     (B,)                   in [0, 1]; both scaled by 1000 (guidance: Flux-dev)
    txt_ids, img_ids       (St, 3), (Si, 3)       rotary ids (0, row, col) per token

    x = x_embedder(hidden_states), c = context_embedder(encoder_hidden_states)
    temb = MLP_t(sin(1000 t)) [+ MLP_g(sin(1000 g))] + MLP_y(pooled);  e = silu(temb)
    cos, sin = rope tables of [txt_ids; img_ids]  (S, d), interleaved pairs, per-axis frequencies

    double block (per stream AdaLN-Zero, as SD3's, text tokens FIRST in the joint sequence):
        h = LN(x)(1 + scale) + shift;  q, k, v = h Wqkv            one GEMM per stream
        q, k = rope(RMSNorm(q)), rope(RMSNorm(k))                  qk_norm_rope (one pass per stream)
        o = attention([q_c; q_x], [k_c; k_x], [v_c; v_x])          one call over S tokens
        x, h = x + gate1 o Wo, LN(.)(1 + scale2) + shift2          gated_residual_layer_norm_modulate
        x = x + gate2 FF(h)                                        gated_residual, fused FF
    single block (on the joint sequence z = [c; x]):
        h = LN(z)(1 + scale) + shift;  [q k v m] = h W1            one GEMM: QKV and the MLP input
        q, k = rope(RMSNorm(q)), rope(RMSNorm(k));  o = attention(q, k, v)
        z = z + gate ([o, gelu_tanh(m)] W2)                        W2 applied as o W2a + gelu(m) W2b
    out = (LN(x)(1 + scale) + shift) W_out                          (B, Si, p^2 C_out)

The single block never builds ``[o, gelu(m)]`` nor keeps ``gelu(m)`` for backward (it is
recomputed from ``m``, a view of the W1 output that attention's v already keeps alive), and
no block keeps a modulated norm's output (recomputed from its input in backward): with the
kernel backends the blocks save 0.55-0.56x of what diffusers' blocks save.

Weights: fastgen fuses ``attn.to_q/k/v`` into ``attn.to_qkv``, ``add_q/k/v_proj`` into
``attn.to_added_qkv`` and, in single blocks, q, k, v and ``proj_mlp`` into ``linear1`` (BFL's
own layout). ``from_pretrained`` reads the diffusers layout and BFL's single files.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from fastgen.models._common import GeluFeedForward, ModelOutput, gelu_linear
from fastgen.models.sd3 import (
    AdaLN,
    MMDiTConfig,
    MMDiTModel,
    TimeTextEmbed,
    _shapes,
    _Weight,
    check_tensor,
    feed_forward,
    norm_linear,
)
from fastgen.ops import attention, gated_residual, qk_norm_rope, rope_frequencies


# ----------------------------------------------------------------------------- config


@dataclass
class FluxConfig(MMDiTConfig):
    """The fields of diffusers' ``FluxTransformer2DModel`` config (same names, same defaults)."""

    patch_size: int = 1
    in_channels: int = 64
    out_channels: Optional[int] = None
    num_layers: int = 19
    num_single_layers: int = 38
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 4096
    pooled_projection_dim: int = 768
    guidance_embeds: bool = False
    axes_dims_rope: tuple = (16, 56, 56)

    def __post_init__(self):
        self.axes_dims_rope = tuple(self.axes_dims_rope)
        if sum(self.axes_dims_rope) != self.attention_head_dim:
            raise ValueError(f"FluxConfig: axes_dims_rope {self.axes_dims_rope} must sum to attention_head_dim "
                             f"({self.attention_head_dim}): the rotation covers the whole head")

    @property
    def mlp_hidden_dim(self) -> int:
        return 4 * self.inner_dim

    @property
    def out_dim(self) -> int:
        return self.patch_size ** 2 * (self.out_channels or self.in_channels)

    @classmethod
    def preset(cls, name: str) -> "FluxConfig":
        """A released configuration: ``"flux.1-dev"`` or ``"flux.1-schnell"``."""
        return cls._from_presets(FLUX_PRESETS, name)


FLUX_PRESETS: dict[str, dict] = {
    "flux.1-dev": dict(guidance_embeds=True),
    "flux.1-schnell": dict(guidance_embeds=False),
}


# ----------------------------------------------------------------------------- model


class Flux(MMDiTModel):
    """Flux.1 transformer (diffusers ``FluxTransformer2DModel`` math and weights).

    ``Flux(config | preset name, backend="auto")``; ``backend`` goes to every fastgen op call.
    """

    config_class = FluxConfig
    FUSED = (("transformer_blocks.", "attn.to_qkv", ("attn.to_q", "attn.to_k", "attn.to_v")),
             ("transformer_blocks.", "attn.to_added_qkv", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")),
             ("single_transformer_blocks.", "linear1", ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")))
    ORIGINAL_MARKER = "double_blocks."

    def __init__(self, config: "FluxConfig | str | None" = None, backend: Optional[str] = "auto", **overrides):
        if config is None or isinstance(config, str):
            config = FluxConfig.preset(config) if config else FluxConfig()
        if overrides:
            config = dataclasses.replace(config, **overrides)
        super().__init__(config, backend)
        cfg, D = config, config.inner_dim
        self.time_text_embed = TimeTextEmbed(D, cfg.pooled_projection_dim, guidance=cfg.guidance_embeds)
        self.context_embedder = nn.Linear(cfg.joint_attention_dim, D)
        self.x_embedder = nn.Linear(cfg.in_channels, D)
        self.transformer_blocks = nn.ModuleList([FluxTransformerBlock(cfg, backend) for _ in range(cfg.num_layers)])
        self.single_transformer_blocks = nn.ModuleList(
            [FluxSingleTransformerBlock(cfg, backend) for _ in range(cfg.num_single_layers)]
        )
        self.norm_out = AdaLN(D, 2)
        self.proj_out = nn.Linear(D, cfg.out_dim)

    def rope_tables(self, txt_ids: Tensor, img_ids: Tensor) -> tuple[Tensor, Tensor]:
        """cos, sin ``(St + Si, d)`` fp32 of ``[txt_ids; img_ids]`` (diffusers' ``FluxPosEmbed(10000, axes)``)."""
        return rope_frequencies(torch.cat([txt_ids, img_ids], 0), self.config.axes_dims_rope, 10000.0,
                                interleaved=True)

    def forward(
        self,
        hidden_states: Tensor,
        encoder_hidden_states: Optional[Tensor] = None,
        pooled_projections: Optional[Tensor] = None,
        timestep: Optional[Tensor] = None,
        img_ids: Optional[Tensor] = None,
        txt_ids: Optional[Tensor] = None,
        guidance: Optional[Tensor] = None,
        joint_attention_kwargs: Optional[dict] = None,
        controlnet_block_samples=None,
        controlnet_single_block_samples=None,
        return_dict: bool = True,
        controlnet_blocks_repeat: bool = False,
    ):
        """Arguments and result as ``FluxTransformer2DModel.forward`` (see the module docstring for shapes)."""
        txt_ids, img_ids = self._validate(hidden_states, encoder_hidden_states, pooled_projections, timestep,
                                          img_ids, txt_ids, guidance)
        self._check_joint_kwargs(joint_attention_kwargs)
        x = self.x_embedder(hidden_states)
        t = timestep.to(x.dtype) * 1000
        g = guidance.to(x.dtype) * 1000 if guidance is not None else None
        e = F.silu(self.time_text_embed(t, pooled_projections, g))
        c = self.context_embedder(encoder_hidden_states)
        cos, sin = self.rope_tables(txt_ids, img_ids)
        cos, sin = cos.to(x.device), sin.to(x.device)
        for i, block in enumerate(self.transformer_blocks):
            c, x = self._maybe_checkpoint(block, x, c, e, cos, sin)
            if controlnet_block_samples is not None:
                n = len(controlnet_block_samples)
                every = -(-len(self.transformer_blocks) // n)
                x = x + controlnet_block_samples[i % n if controlnet_blocks_repeat else i // every]
        St = c.shape[1]
        z = torch.cat([c, x], 1)
        for i, block in enumerate(self.single_transformer_blocks):
            z = self._maybe_checkpoint(block, z, e, cos, sin)
            if controlnet_single_block_samples is not None:
                every = -(-len(self.single_transformer_blocks) // len(controlnet_single_block_samples))
                z = torch.cat([z[:, :St], z[:, St:] + controlnet_single_block_samples[i // every]], 1)
        x = z[:, St:]
        scale, shift = self.norm_out(e.to(x.dtype))
        sample = norm_linear(x, shift, scale, self.proj_out, self.backend)
        return ModelOutput(sample=sample) if return_dict else (sample,)

    def _validate(self, x, ctx, pooled, t, img_ids, txt_ids, guidance):
        cfg, name = self.config, "Flux"
        if not isinstance(x, Tensor) or x.dim() != 3:
            raise ValueError(f"{name}: hidden_states must be packed latent tokens (B, Si, {cfg.in_channels}), got "
                             f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
        B, Si, C = x.shape
        if C != cfg.in_channels:
            raise ValueError(f"{name}: hidden_states has {C} channels, the config expects in_channels={cfg.in_channels}"
                             " (Flux packs 2x2 patches of a 16-channel latent into 64)")
        check_tensor(name, "encoder_hidden_states", ctx, 3, cfg.joint_attention_dim, B)
        check_tensor(name, "pooled_projections", pooled, 2, cfg.pooled_projection_dim, B)
        if t is None:
            raise ValueError(f"{name}: timestep is required")
        if cfg.guidance_embeds and guidance is None:
            raise ValueError(f"{name}: guidance is required: this config has guidance_embeds=True (Flux.1-dev)")
        if not cfg.guidance_embeds and guidance is not None:
            raise ValueError(f"{name}: guidance was given but this config has guidance_embeds=False (Flux.1-schnell)")
        ids = []
        for nm, v, n in (("txt_ids", txt_ids, ctx.shape[1]), ("img_ids", img_ids, Si)):
            if v is None:
                raise ValueError(f"{name}: {nm} is required ({n}, {len(cfg.axes_dims_rope)}) rotary ids")
            v = v[0] if v.dim() == 3 else v  # diffusers' deprecated batched ids
            if v.shape != (n, len(cfg.axes_dims_rope)):
                raise ValueError(f"{name}: {nm} must have shape ({n}, {len(cfg.axes_dims_rope)}), got {tuple(v.shape)}")
            ids.append(v)
        return ids[0], ids[1]

    # ------------------------------------------------------------------ layouts

    @staticmethod
    def fused_rows(cfg: FluxConfig) -> dict:
        """Rows of each part of a fused tensor, by fused name."""
        D = cfg.inner_dim
        return {"attn.to_qkv": [D] * 3, "attn.to_added_qkv": [D] * 3, "linear1": [D, D, D, cfg.mlp_hidden_dim]}

    @staticmethod
    def original_table(cfg: FluxConfig):
        from fastgen.models._original_layout import flux_table

        return flux_table(cfg)

    @staticmethod
    def infer_config(sd: dict) -> FluxConfig:
        """The FluxConfig of a BFL-layout state dict (tensors or shapes), from its keys and shapes. The
        rotary axes are Flux's (d/8, 7d/16, 7d/16) split of the head dim d ((16, 56, 56) at d = 128)."""
        need = ["img_in.weight", "txt_in.weight", "vector_in.in_layer.weight", "final_layer.linear.weight",
                "double_blocks.0.img_attn.norm.query_norm.scale"]
        shape = _shapes(sd, need, "Flux")
        D, C = shape["img_in.weight"]
        d = shape["double_blocks.0.img_attn.norm.query_norm.scale"][0]
        out = shape["final_layer.linear.weight"][0]
        axes = (d // 8, 7 * d // 16, d - d // 8 - 7 * d // 16)
        if any(a % 2 for a in axes):
            raise ValueError(f"Flux.from_pretrained: cannot infer axes_dims_rope for head dim {d} (Flux's split "
                             f"{axes} has odd parts); pass config= (a FluxConfig, a dict or a preset name)")
        return FluxConfig(
            in_channels=C, out_channels=None if out == C else out, num_attention_heads=D // d, attention_head_dim=d,
            num_layers=len({int(k.split(".")[1]) for k in sd if k.startswith("double_blocks.")}),
            num_single_layers=len({int(k.split(".")[1]) for k in sd if k.startswith("single_blocks.")}),
            joint_attention_dim=shape["txt_in.weight"][1], pooled_projection_dim=shape["vector_in.in_layer.weight"][1],
            guidance_embeds=any(k.startswith("guidance_in.") for k in sd),
            axes_dims_rope=axes,
        )


# ----------------------------------------------------------------------------- blocks


class FluxTransformerBlock(nn.Module):
    """Double-stream block (diffusers' ``FluxTransformerBlock``): ``(x, c) -> (c, x)``."""

    def __init__(self, cfg: FluxConfig, backend: str):
        super().__init__()
        D = cfg.inner_dim
        self.backend = backend
        self.norm1, self.norm1_context = AdaLN(D, 6), AdaLN(D, 6)
        self.attn = FluxAttention(cfg, backend)
        self.ff, self.ff_context = GeluFeedForward(D, 4 * D), GeluFeedForward(D, 4 * D)

    def forward(self, x: Tensor, c: Tensor, e: Tensor, cos: Tensor, sin: Tensor):
        be, attn = self.backend, self.attn
        shift1, scale1, gate1, shift2, scale2, gate2 = self.norm1(e)
        cshift1, cscale1, cgate1, cshift2, cscale2, cgate2 = self.norm1_context(e)
        o, co = attn(norm_linear(x, shift1, scale1, attn.to_qkv, be),
                     norm_linear(c, cshift1, cscale1, attn.to_added_qkv, be), cos, sin)
        x = feed_forward(x, o, gate1, shift2, scale2, gate2, self.ff, be)
        c = feed_forward(c, co, cgate1, cshift2, cscale2, cgate2, self.ff_context, be)
        return _clip_fp16(c), x  # as diffusers: only the text stream is clipped here


class FluxSingleTransformerBlock(nn.Module):
    """Single-stream block (diffusers' ``FluxSingleTransformerBlock``) on the joint sequence ``z = [c; x]``."""

    def __init__(self, cfg: FluxConfig, backend: str):
        super().__init__()
        D, d = cfg.inner_dim, cfg.attention_head_dim
        self.heads, self.head_dim, self.dim, self.backend = cfg.num_attention_heads, d, D, backend
        self.norm = AdaLN(D, 3)
        self.linear1 = nn.Linear(D, 3 * D + cfg.mlp_hidden_dim)
        self.attn = _QKNorms(d)
        self.proj_out = nn.Linear(D + cfg.mlp_hidden_dim, D)

    def forward(self, z: Tensor, e: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        be, D = self.backend, self.dim
        shift, scale, gate = self.norm(e)
        p = norm_linear(z, shift, scale, self.linear1, be)  # (B, S, 3D + mlp), LN(z) recomputed in backward
        qkv, m = p[..., :3 * D].unflatten(-1, (3, self.heads, self.head_dim)), p[..., 3 * D:]
        q, k = qk_norm_rope(qkv[:, :, 0], qkv[:, :, 1], self.attn.norm_q.weight, self.attn.norm_k.weight, cos, sin,
                            1e-6, "bshd", interleaved=True, backend=be)
        o = attention(q, k, qkv[:, :, 2], layout="bshd", backend=be).flatten(2)
        w = self.proj_out.weight
        y = F.linear(o, w[:, :D], self.proj_out.bias) + gelu_linear(m, w[:, D:], None)
        return _clip_fp16(gated_residual(z, y, gate, backend=be))


class FluxAttention(nn.Module):
    """The double block's joint attention: QKV per stream in one GEMM, ``qk_norm_rope`` per stream,
    one ``fastgen.ops.attention`` over ``[text; image]``."""

    def __init__(self, cfg: FluxConfig, backend: str):
        super().__init__()
        D, d = cfg.inner_dim, cfg.attention_head_dim
        self.heads, self.head_dim, self.backend = cfg.num_attention_heads, d, backend
        self.to_qkv, self.to_added_qkv = nn.Linear(D, 3 * D), nn.Linear(D, 3 * D)
        self.to_out, self.to_add_out = nn.Linear(D, D), nn.Linear(D, D)
        self.norm_q, self.norm_k = _Weight(d), _Weight(d)
        self.norm_added_q, self.norm_added_k = _Weight(d), _Weight(d)

    def forward(self, qkv: Tensor, cqkv: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        """``qkv`` (B, Si, 3D), ``cqkv`` (B, St, 3D): the streams' projections (computed by the block with the
        modulated norm) -> (image output, text output)."""
        St = cqkv.shape[1]
        shape = (3, self.heads, self.head_dim)
        # one joint copy of [text; image] qkv: the norms read it in place and attention reads v from it,
        # so backward keeps this tensor and the normed q, k only
        j = torch.cat([cqkv.unflatten(-1, shape), qkv.unflatten(-1, shape)], 1)
        cq, ck = qk_norm_rope(j[:, :St, 0], j[:, :St, 1], self.norm_added_q.weight, self.norm_added_k.weight,
                              cos[:St], sin[:St], 1e-6, "bshd", interleaved=True, backend=self.backend)
        q, k = qk_norm_rope(j[:, St:, 0], j[:, St:, 1], self.norm_q.weight, self.norm_k.weight, cos[St:], sin[St:],
                            1e-6, "bshd", interleaved=True, backend=self.backend)
        o = attention(torch.cat([cq, q], 1), torch.cat([ck, k], 1), j[:, :, 2], layout="bshd",
                      backend=self.backend).flatten(2)  # (B, S, D)
        return self.to_out(o[:, St:]), self.to_add_out(o[:, :St])


class _QKNorms(nn.Module):
    """The per-head RMSNorm weights of a single block's attention (keys ``attn.norm_q/k.weight``)."""

    def __init__(self, d: int):
        super().__init__()
        self.norm_q, self.norm_k = _Weight(d), _Weight(d)


def _clip_fp16(x: Tensor) -> Tensor:
    """diffusers clips fp16 residual streams to the finite range (the text stream after a double block,
    the joint stream after a single block)."""
    return x.clip(-65504, 65504) if x.dtype == torch.float16 else x
