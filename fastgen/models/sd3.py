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
        q, k, v = (LN(x) * (1 + scale1) + shift1) @ Wqkv               modulated_norm_linear (one GEMM)
        q, k = RMSNorm(q), RMSNorm(k)  (SD3.5 only)                     qk_norm_rope, zero angle
        o  = softmax(q k^T / sqrt(d)) v  over the Si + St tokens        attention (one call)
        x, m = x + gate1 * o Wo,  (LN(x) * (1 + scale2) + shift2) W1    gated_modulated_norm_linear
        x  = x + gate2 * gelu_tanh(m) W2                                gelu_linear, gated_residual
    SD3.5 "dual attention" layers add a second, image-only attention with its own
    (shift, scale, gate) taken from the same LN(x); the last block updates only x
    (its text stream is "pre only": LN-modulate and QKV, no output).

    out  = (LN(x) * (1 + scale) + shift) W_out  -> unpatchify           (B, C_out, H, W)

For backward a block keeps the joint ``[image; text]`` QKV once (the norms and attention
read q, k, v from it in place); the modulated norms feeding a GEMM are recomputed from their
input instead of saved, and the FF keeps its pre-activation and recomputes the GELU: with
the kernel backends a block saves about 0.52-0.54x of what the diffusers block saves
(measured in tests/test_models_sd3.py).

Weights: the QKV projections are stored fused (``attn.to_qkv``, ``attn.to_added_qkv``, the
names diffusers uses for its own fused projections); ``from_diffusers`` /
``to_diffusers_state_dict`` concatenate and split them. ``from_pretrained`` reads the
diffusers layout and Stability's original single-file layout (``joint_blocks.N...``).
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
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
    TimestepMLP,
    check_latent,
    gated_modulated_norm_linear,
    gelu_linear,
    modulated_norm_linear,
    sincos_pos_embed_2d,
    timestep_embedding,
    unpatchify,
)
from fastgen.ops import attention, gated_residual, qk_norm_rope


# ----------------------------------------------------------------------------- config


class MMDiTConfig(ModelConfig):
    """Base of SD3Config and FluxConfig: ``from_dict`` of a diffusers ``config.json``."""

    @classmethod
    def from_dict(cls, d: dict):
        """From a diffusers ``config.json`` dict (``_class_name`` and other ``_`` keys ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in d if not k.startswith("_") and k not in names)
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown config keys {unknown}; expected a subset of {sorted(names)}")
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in names})


@dataclass
class SD3Config(MMDiTConfig):
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

    @classmethod
    def preset(cls, name: str) -> "SD3Config":
        """A released configuration: ``"sd3-medium"``, ``"sd3.5-medium"``, ``"sd3.5-large"``."""
        return cls._from_presets(SD3_PRESETS, name)


SD3_PRESETS: dict[str, dict] = {
    "sd3-medium": dict(num_layers=24, num_attention_heads=24, caption_projection_dim=1536, pos_embed_max_size=192),
    "sd3.5-medium": dict(num_layers=24, num_attention_heads=24, caption_projection_dim=1536, pos_embed_max_size=384,
                         dual_attention_layers=tuple(range(13)), qk_norm="rms_norm"),
    "sd3.5-large": dict(num_layers=38, num_attention_heads=38, caption_projection_dim=2432, pos_embed_max_size=192,
                        qk_norm="rms_norm"),
}


# ----------------------------------------------------------------------------- model


class MMDiTModel(FastgenModel):
    """FastgenModel plus what the SD3 / Flux pipelines call and the fused-QKV state-dict conversion."""

    # (scope, fused name, [diffusers names]) per block: fastgen's tensor = the parts concatenated on dim 0
    FUSED: tuple = ()

    @contextlib.contextmanager
    def cache_context(self, name: str):  # FluxPipeline wraps its calls in it; fastgen keeps no cache
        yield

    def _unsupported(self, what: str):
        raise NotImplementedError(
            f"{type(self).__name__}.{what}: fastgen models have no forward chunking or PEFT / LoRA adapter hooks; "
            "run the diffusers model for this (weights: to_diffusers_state_dict())")

    def enable_forward_chunking(self, *args, **kwargs):
        self._unsupported("enable_forward_chunking")

    def load_lora_adapter(self, *args, **kwargs):
        self._unsupported("load_lora_adapter")

    def set_adapters(self, *args, **kwargs):
        self._unsupported("set_adapters")

    def _check_joint_kwargs(self, joint_attention_kwargs: Optional[dict]) -> None:
        if joint_attention_kwargs:
            raise NotImplementedError(
                f"{type(self).__name__}: joint_attention_kwargs {sorted(joint_attention_kwargs)} are not supported "
                "(no attention processors, IP-adapters or LoRA scales); run the diffusers model for those"
            )

    @classmethod
    def config_from_diffusers(cls, config) -> ModelConfig:
        return cls.config_class.from_dict(dict(config))

    @staticmethod
    def rename(key: str) -> str:
        """fastgen key -> diffusers key of every tensor that is not fused."""
        return key.replace(".to_out.", ".to_out.0.").replace(".fc1.", ".net.0.proj.").replace(".fc2.", ".net.2.")

    @staticmethod
    def unrename(key: str) -> str:
        return key.replace(".to_out.0.", ".to_out.").replace(".net.0.proj.", ".fc1.").replace(".net.2.", ".fc2.")

    @classmethod
    def state_dict_from_diffusers(cls, sd: dict) -> dict:
        from fastgen.models._original_layout import fuse_blocks

        return fuse_blocks(sd, cls.FUSED, cls.unrename)

    def to_diffusers_state_dict(self) -> dict:
        """A state dict that the diffusers class loads with ``strict=True``."""
        from fastgen.models._original_layout import split_blocks

        return split_blocks(self.state_dict(), self.FUSED, self.rename, self.fused_rows(self.config))

    def to_original_state_dict(self) -> dict:
        """The weights in the reference repository's single-file layout."""
        from fastgen.models._original_layout import diffusers_to_original

        return diffusers_to_original(self.to_diffusers_state_dict(), self.original_table(self.config))

    @classmethod
    def from_pretrained(cls, path, torch_dtype: Optional[torch.dtype] = None, device="cpu",
                        backend: Optional[str] = "auto", config=None, subfolder: Optional[str] = None):
        """Load safetensors in diffusers layout (a model folder with ``config.json``, a pipeline folder with
        ``transformer/``, a single or a sharded file) or the reference repository's original single file
        (optionally under ``model.diffusion_model.``; its VAE and text encoders are ignored). Without
        ``config`` (a config, a dict or a preset name) it is read from ``config.json`` (diffusers layout) or
        inferred from the tensor shapes (original layout). The model is built on the
        meta device, keys and shapes are checked before any tensor is read, and each tensor is
        materialised once, on ``device`` in ``torch_dtype``."""
        from fastgen.models._original_layout import from_pretrained

        return from_pretrained(cls, path, torch_dtype, device, backend, config, subfolder)


class SD3(MMDiTModel):
    """SD3 / SD3.5 MMDiT transformer (diffusers ``SD3Transformer2DModel`` math and weights).

    ``SD3(config | preset name, backend="auto")``; ``backend`` goes to every fastgen op call.
    """

    config_class = SD3Config
    FUSED = (("transformer_blocks.", "attn.to_qkv", ("attn.to_q", "attn.to_k", "attn.to_v")),
             ("transformer_blocks.", "attn.to_added_qkv", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")),
             ("transformer_blocks.", "attn2.to_qkv", ("attn2.to_q", "attn2.to_k", "attn2.to_v")))

    def __init__(self, config: "SD3Config | str | None" = None, backend: Optional[str] = "auto", **overrides):
        if config is None or isinstance(config, str):
            config = SD3Config.preset(config) if config else SD3Config()
        if overrides:
            config = dataclasses.replace(config, **overrides)
        super().__init__(config, backend)
        cfg, D = config, config.inner_dim
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
                c, x = self._maybe_checkpoint(block, x, c, e)
            if block_controlnet_hidden_states is not None and not block.context_pre_only:
                every = len(self.transformer_blocks) / len(block_controlnet_hidden_states)
                x = x + block_controlnet_hidden_states[int(i / every)]
        scale, shift = self.norm_out(e.to(x.dtype))
        x = norm_linear(x, shift, scale, self.proj_out, self.backend)
        p = cfg.patch_size
        sample = unpatchify(x, H // p, W // p, p, cfg.out_channels)
        return ModelOutput(sample=sample) if return_dict else (sample,)

    def _validate(self, x, ctx, pooled, t) -> SD3Config:
        cfg, name = self.config, "SD3"
        check_latent(name, x, cfg.in_channels, cfg.patch_size)
        B, _, H, W = x.shape
        p = cfg.patch_size
        if H // p > cfg.pos_embed_max_size or W // p > cfg.pos_embed_max_size:
            raise ValueError(f"{name}: latent size {H}x{W} is {H // p}x{W // p} patches, more than "
                             f"pos_embed_max_size={cfg.pos_embed_max_size}")
        check_tensor(name, "encoder_hidden_states", ctx, 3, cfg.joint_attention_dim, B)
        check_tensor(name, "pooled_projections", pooled, 2, cfg.pooled_projection_dim, B)
        if t is None:
            raise ValueError(f"{name}: timestep is required")
        return cfg

    # ------------------------------------------------------------------ layouts

    @staticmethod
    def fused_rows(cfg: SD3Config) -> dict:
        """Rows of each part of a fused tensor, by fused name."""
        D = cfg.inner_dim
        return {"attn.to_qkv": [D] * 3, "attn.to_added_qkv": [D] * 3, "attn2.to_qkv": [D] * 3}

    @staticmethod
    def original_table(cfg: SD3Config):
        from fastgen.models._original_layout import sd3_table

        return sd3_table(cfg)

    ORIGINAL_MARKER = "joint_blocks."

    @staticmethod
    def infer_config(sd: dict) -> SD3Config:
        """The SD3Config of an original-layout state dict (tensors or shapes), from its keys and shapes
        (head dim: the qk-norm weight's size, else 64 as in every released SD3)."""
        need = ["x_embedder.proj.weight", "pos_embed", "context_embedder.weight", "y_embedder.mlp.0.weight",
                "final_layer.linear.weight"]
        shape = _shapes(sd, need, "SD3")
        layers = {int(k.split(".")[1]) for k in sd if k.startswith("joint_blocks.")}
        D, C, p = shape["x_embedder.proj.weight"][:2] + shape["x_embedder.proj.weight"][-1:]
        qk_key = next((k for k in sd if ".ln_q." in k), None)
        head = _shape(sd[qk_key])[0] if qk_key else 64
        ctx = shape["context_embedder.weight"]
        return SD3Config(
            patch_size=p, in_channels=C, num_layers=len(layers), attention_head_dim=head,
            num_attention_heads=D // head, joint_attention_dim=ctx[1], caption_projection_dim=ctx[0],
            pooled_projection_dim=shape["y_embedder.mlp.0.weight"][1],
            out_channels=shape["final_layer.linear.weight"][0] // (p * p),
            pos_embed_max_size=int(round(shape["pos_embed"][1] ** 0.5)),
            dual_attention_layers=tuple(sorted({int(k.split(".")[1]) for k in sd
                                                if k.startswith("joint_blocks.") and ".attn2." in k})),
            qk_norm="rms_norm" if qk_key else None,
        )


# ----------------------------------------------------------------------------- blocks


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
        self.ff = GeluFeedForward(D, 4 * D)
        self.ff_context = None if self.context_pre_only else GeluFeedForward(D, 4 * D)

    def forward(self, x: Tensor, c: Tensor, e: Tensor):
        be, attn = self.backend, self.attn
        mod = self.norm1(e)
        shift1, scale1, gate1, shift2, scale2, gate2 = mod[:6]
        qkv = norm_linear(x, shift1, scale1, attn.to_qkv, be)
        if self.context_pre_only:
            cscale, cshift = self.norm1_context(e)  # diffusers' AdaLayerNormContinuous order: scale, shift
            cqkv = norm_linear(c, cshift, cscale, attn.to_added_qkv, be)
        else:
            cshift1, cscale1, cgate1, cshift2, cscale2, cgate2 = self.norm1_context(e)
            cqkv = norm_linear(c, cshift1, cscale1, attn.to_added_qkv, be)
        o, co = attn(qkv, cqkv)
        if self.dual:  # a second, image-only attention on LN(x) of the block input, its own modulation
            shift3, scale3, gate3 = mod[6:]
            qkv2 = norm_linear(x, shift3, scale3, self.attn2.to_qkv, be)
            x = gated_residual(x, o, gate1, backend=be)
            o, _ = self.attn2(qkv2)
            gate1 = gate3
        x = feed_forward(x, o, gate1, shift2, scale2, gate2, self.ff, be)
        if self.context_pre_only:
            return None, x
        return feed_forward(c, co, cgate1, cshift2, cscale2, cgate2, self.ff_context, be), x


def norm_linear(x: Tensor, shift: Tensor, scale: Tensor, lin: nn.Linear, backend) -> Tensor:
    """``lin(LN(x) (1 + scale) + shift)``; the normed tensor is recomputed in backward, not saved."""
    return modulated_norm_linear(x, shift, scale, lin.weight, lin.bias, 1e-6, backend)


def feed_forward(x: Tensor, o: Tensor, gate1: Tensor, shift: Tensor, scale: Tensor, gate2: Tensor,
                 ff: GeluFeedForward, backend) -> Tensor:
    """The second half of an AdaLN-Zero block: ``x1 = x + gate1 o``;  ``x1 + gate2 FF(LN(x1)(1 + scale) + shift)``.

    One fused gated-residual + modulated-norm kernel feeding fc1 (normed tensor recomputed in backward),
    the GELU recomputed in backward (``gelu_linear``), one fused gated residual."""
    m, x1 = gated_modulated_norm_linear(x, o, gate1, shift, scale, ff.fc1.weight, ff.fc1.bias, 1e-6, backend)
    return gated_residual(x1, gelu_linear(m, ff.fc2.weight, ff.fc2.bias), gate2, backend=backend)


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

    def _qk_norm(self, q: Tensor, k: Tensor, nq: "_Weight", nk: "_Weight") -> tuple[Tensor, Tensor]:
        """RMSNorm of q and k over the head dim: ``qk_norm_rope`` with a zero-angle rotation (cos 1, sin 0
        on two dims), which is exactly the identity, so the op is the plain per-head RMSNorm."""
        cos = torch.ones(q.shape[1], 2, device=q.device)
        return qk_norm_rope(q, k, nq.weight, nk.weight, cos, torch.zeros_like(cos), 1e-6, "bshd",
                            backend=self.backend)

    def forward(self, qkv: Tensor, cqkv: Optional[Tensor] = None):
        """``qkv`` (B, Si, 3D) = h @ to_qkv (and ``cqkv`` (B, St, 3D) = ch @ to_added_qkv), computed by the
        block together with the modulated norm -> (image output, text output or None)."""
        shape, Si = (3, self.heads, self.head_dim), qkv.shape[1]
        j = qkv.unflatten(-1, shape)  # (B, Si, 3, H, d)
        if cqkv is not None:  # one joint copy of [image; text] qkv, read in place by the norms and attention
            j = torch.cat([j, cqkv.unflatten(-1, shape)], 1)
        q, k, v = j.unbind(2)
        if self.norm_q is not None:  # per-head RMSNorm of q and k, one pass per stream, read in place
            q, k = self._qk_norm(j[:, :Si, 0], j[:, :Si, 1], self.norm_q, self.norm_k)
            if cqkv is not None:
                cq, ck = self._qk_norm(j[:, Si:, 0], j[:, Si:, 1], self.norm_added_q, self.norm_added_k)
                q, k = torch.cat([q, cq], 1), torch.cat([k, ck], 1)
        o = attention(q, k, v, layout="bshd", backend=self.backend).flatten(2)  # (B, Si + St, D)
        out = self.to_out(o[:, :Si])
        if cqkv is None:
            return out, None
        return out, (self.to_add_out(o[:, Si:]) if self.to_add_out is not None else None)


# ----------------------------------------------------------------------------- parts (Flux uses them too)


class PatchEmbed(nn.Module):
    """``conv_p(latent)`` flattened to tokens plus the centre crop of a fixed 2-D sin-cos table
    (diffusers' ``PatchEmbed(pos_embed_max_size=...)``; the table is a persistent buffer)."""

    def __init__(self, cfg: SD3Config):
        super().__init__()
        self.patch_size, self.max_size = cfg.patch_size, cfg.pos_embed_max_size
        self.proj = nn.Conv2d(cfg.in_channels, cfg.inner_dim, cfg.patch_size, stride=cfg.patch_size)
        n, base = cfg.pos_embed_max_size, cfg.sample_size // cfg.patch_size
        self.register_buffer("pos_embed", sincos_pos_embed_2d(cfg.inner_dim, n, n, base)[None])  # (1, n*n, D)

    def forward(self, latent: Tensor) -> Tensor:
        h, w = latent.shape[-2] // self.patch_size, latent.shape[-1] // self.patch_size
        x = self.proj(latent).flatten(2).transpose(1, 2)
        top, left = (self.max_size - h) // 2, (self.max_size - w) // 2
        pos = self.pos_embed.reshape(1, self.max_size, self.max_size, -1)[:, top:top + h, left:left + w]
        return (x + pos.reshape(1, h * w, -1)).to(x.dtype)


class TimeTextEmbed(nn.Module):
    """``temb = MLP_t(sinusoid(t)) [+ MLP_g(sinusoid(guidance))] + MLP_y(pooled)``  -> (B, D)
    (diffusers' ``CombinedTimestep[Guidance]TextProjEmbeddings``: 256 sinusoids, cos first)."""

    def __init__(self, dim: int, pooled_dim: int, guidance: bool = False):
        super().__init__()
        self.timestep_embedder = TimestepMLP(256, dim)
        self.guidance_embedder = TimestepMLP(256, dim) if guidance else None
        self.text_embedder = TimestepMLP(pooled_dim, dim)

    def forward(self, timestep: Tensor, pooled: Tensor, guidance: Optional[Tensor] = None) -> Tensor:
        def sinusoid(t: Tensor) -> Tensor:
            return timestep_embedding(t, 256, flip_sin_to_cos=True, downscale_freq_shift=0).to(pooled.dtype)

        temb = self.timestep_embedder(sinusoid(timestep))
        if self.guidance_embedder is not None:
            temb = temb + self.guidance_embedder(sinusoid(guidance))
        return temb + self.text_embedder(pooled)


class AdaLN(nn.Module):
    """The modulation projection of an AdaLN(-Zero) norm: ``silu(temb) @ W -> n chunks of (B, D)``,
    read in place by the fused modulate ops. The model computes ``e = silu(temb)`` once for all blocks."""

    def __init__(self, dim: int, n: int):
        super().__init__()
        self.n = n
        self.linear = nn.Linear(dim, n * dim)

    def forward(self, e: Tensor) -> tuple[Tensor, ...]:
        return self.linear(e).chunk(self.n, dim=1)


class _Weight(nn.Module):
    """A norm's weight alone (key ``<name>.weight``, as diffusers' ``RMSNorm``)."""

    def __init__(self, d: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))


# ----------------------------------------------------------------------------- checks


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


def _shape(v) -> tuple:
    return tuple(v.shape) if isinstance(v, Tensor) else tuple(v)


def _shapes(sd: dict, need: list, model: str) -> dict:
    absent = [k for k in need if k not in sd]
    if absent:
        raise ValueError(f"{model}.from_pretrained: cannot infer the config, the checkpoint lacks {absent}; "
                         "pass config= (a config, a dict or a preset name)")
    return {k: _shape(sd[k]) for k in need}
