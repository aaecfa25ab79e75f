"""CogVideoX: the text-to-video diffusion transformer on fastgen's fused ops.

Same math and weights as diffusers' ``CogVideoXTransformer3DModel`` (CogVideoX-2b / -5b, and
the 1.5 layout with a temporal patch ``patch_size_t``). Shapes, ``N = heads * head_dim``::

    hidden_states          (B, F, C, H, W)     latent video (F latent frames)
    encoder_hidden_states  (B, T, text_dim)    T5 tokens (T = 226)
    timestep               (B,)
    image_rotary_emb       (cos, sin), each (F' * H/p * W/p, head_dim)  3-D RoPE tables (5b)
    -> sample              (B, F, C_out, H, W)

    tokens  = [text_proj(text) ; conv_p(frames) (+ 3-D sin-cos table, 2b)]     (B, T + S, N)
    temb    = MLP(sinusoid(t)) [+ MLP(sinusoid(ofs))]                          (B, time_embed_dim)
    block (video stream x, text stream e; every modulation per sample from silu(temb)):
        x_n = LN(x) (1 + scale) + shift;  e_n = LN(e) (1 + e_scale) + e_shift
        q, k, v = split(W_qkv [e_n ; x_n]);  q, k = LN_head(q), LN_head(k);  RoPE on video rows
        [a_e ; a_x] = W_o attention(q, k, v)
        x = x + gate a_x,  e = e + e_gate a_e      (then the same AdaLN for the feed-forward)
        x = x + gate2 FF(LN(x) (1 + scale2) + shift2),   e likewise
    out     = proj_out(LN_ada(LN(x)))  -> unpatchify

Fused ops: each sublayer starts with one autograd node (``fastgen.models.unet.layer_norm_linear``)
that runs the gated residual of the previous sublayer, the AdaLN and the projection (the
residual, LayerNorm and modulation in one fused LayerNorm kernel) and keeps the residual
stream for backward, not the modulated tensor, which its backward recomputes; the QKV
projection runs per stream (no concatenated input), its outputs are joined for attention;
q / k LayerNorm is fastgen's LayerNorm kernel over the heads of the fused QKV output (read in
place, no copy); RoPE is ``apply_rope`` (interleaved pairs) over the whole sequence with
identity rows (cos 1, sin 0) for the text tokens, so no slicing and re-assembly; one attention
call site ``fastgen.ops.attention``; the feed-forward's GELU(tanh) and second linear are one
autograd node that keeps only the first projection's output
(``fastgen.models._common.gelu_linear``); the residual after the feed-forward is one
``torch.addcmul`` (it keeps only the feed-forward output and the gate). A block keeps ~0.64x
of the bytes diffusers' keeps for backward.

Parameter names are diffusers' except ``attn1.to_qkv`` (q, k, v fused), which
``from_diffusers`` / ``to_diffusers_state_dict`` convert.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from fastgen.models._common import (
    FastgenModel,
    ModelConfig,
    ModelOutput,
    TimestepMLP,
    fuse_self_attention_qkv,
    gelu_linear,
    split_self_attention_qkv,
    timestep_embedding,
)
from fastgen.models.unet import layer_norm_linear
from fastgen.ops import apply_rope, attention, layer_norm, layer_norm_modulate, rope_frequencies, rope_grid_ids
from fastgen.ops.layer_norm import NORM_LAYER, NormModulateFunction
from fastgen.ops.layer_norm import resolve as _ln_resolve

_FIXED = {"activation_fn": ("gelu-approximate",), "timestep_activation_fn": ("silu",), "dropout": (0.0, 0)}


# ----------------------------------------------------------------------------- config


@dataclass
class CogVideoXConfig(ModelConfig):
    """diffusers' ``CogVideoXTransformer3DModel`` config fields (same names and meaning)."""

    num_attention_heads: int = 30
    attention_head_dim: int = 64
    in_channels: int = 16
    out_channels: Optional[int] = 16
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    time_embed_dim: int = 512
    ofs_embed_dim: Optional[int] = None
    text_embed_dim: int = 4096
    num_layers: int = 30
    dropout: float = 0.0
    attention_bias: bool = True
    sample_width: int = 90
    sample_height: int = 60
    sample_frames: int = 49
    patch_size: int = 2
    patch_size_t: Optional[int] = None
    temporal_compression_ratio: int = 4
    max_text_seq_length: int = 226
    activation_fn: str = "gelu-approximate"
    timestep_activation_fn: str = "silu"
    norm_elementwise_affine: bool = True
    norm_eps: float = 1e-5
    spatial_interpolation_scale: float = 1.875
    temporal_interpolation_scale: float = 1.0
    use_rotary_positional_embeddings: bool = False
    use_learned_positional_embeddings: bool = False
    patch_bias: bool = True

    @classmethod
    def preset(cls, name: str) -> "CogVideoXConfig":
        """``"cogvideox-2b"`` or ``"cogvideox-5b"``."""
        key = name.lower().replace("_", "-")
        if not key.startswith("cogvideox-"):
            key = "cogvideox-" + key
        return cls._from_presets(_PRESETS, name, key)


_PRESETS = {
    "cogvideox-2b": dict(num_attention_heads=30, num_layers=30),
    "cogvideox-5b": dict(num_attention_heads=48, num_layers=42, use_rotary_positional_embeddings=True),
}


# ----------------------------------------------------------------------------- embeddings


def _sincos_1d(dim: int, pos: Tensor) -> Tensor:
    """(M,) -> (M, dim) [sin | cos], float64 (diffusers' get_1d_sincos_pos_embed_from_grid)."""
    omega = torch.arange(dim // 2, dtype=torch.float64, device=pos.device) / (dim / 2.0)
    out = torch.outer(pos.reshape(-1).to(torch.float64), 1.0 / 10000 ** omega)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_pos_embed_3d(dim: int, frames: int, height: int, width: int, spatial_scale: float,
                        temporal_scale: float, device=None) -> Tensor:
    """CogVideoX-2b's fixed position table ``(frames * height * width, dim)`` float64.

    Token (f, i, j) (row-major) gets ``[sincos_{dim/4}(f / ts) | sincos_{3dim/8}(j / ss) |
    sincos_{3dim/8}(i / ss)]`` (time first; the spatial half for the column comes first).
    """
    if dim % 16:
        raise ValueError(f"CogVideoX: the sin-cos table needs an inner dim divisible by 16, got {dim}")
    ds = 3 * dim // 4
    col = (torch.arange(width, dtype=torch.float32, device=device) / spatial_scale)[None, :].expand(height, width)
    row = (torch.arange(height, dtype=torch.float32, device=device) / spatial_scale)[:, None].expand(height, width)
    spatial = torch.cat([_sincos_1d(ds // 2, col), _sincos_1d(ds // 2, row)], dim=1)  # (h*w, 3D/4)
    temporal = _sincos_1d(dim // 4, torch.arange(frames, dtype=torch.float32, device=device) / temporal_scale)
    return torch.cat([temporal[:, None, :].expand(frames, height * width, dim // 4),
                      spatial[None].expand(frames, height * width, ds)], dim=-1).reshape(-1, dim)


class CogVideoXPatchEmbed(nn.Module):
    """Text projection + per-frame patch conv (or the 1.5 spatio-temporal patch linear)."""

    def __init__(self, c: CogVideoXConfig):
        super().__init__()
        N, p = c.inner_dim, c.patch_size
        if c.patch_size_t is None:
            self.proj = nn.Conv2d(c.in_channels, N, p, stride=p, bias=c.patch_bias)
        else:
            self.proj = nn.Linear(c.in_channels * p * p * c.patch_size_t, N)
        self.text_proj = nn.Linear(c.text_embed_dim, N)
        if c.use_learned_positional_embeddings:
            frames = (c.sample_frames - 1) // c.temporal_compression_ratio + 1
            S = frames * (c.sample_height // p) * (c.sample_width // p)
            self.register_buffer("pos_embedding", torch.zeros(1, c.max_text_seq_length + S, N))

    def forward(self, text: Tensor, video: Tensor, c: CogVideoXConfig) -> Tensor:
        B, Fr, C, H, W = video.shape
        p = c.patch_size
        text = self.text_proj(text)
        if c.patch_size_t is None:
            x = self.proj(video.reshape(B * Fr, C, H, W))
            x = x.view(B, Fr, *x.shape[1:]).flatten(3).transpose(2, 3).flatten(1, 2)
        else:
            pt = c.patch_size_t
            x = video.permute(0, 1, 3, 4, 2).reshape(B, Fr // pt, pt, H // p, p, W // p, p, C)
            x = self.proj(x.permute(0, 1, 3, 5, 7, 2, 4, 6).flatten(4, 7).flatten(1, 3))
        x = torch.cat([text, x], dim=1)
        if c.use_learned_positional_embeddings:
            if (H, W) != (c.sample_height, c.sample_width):
                raise ValueError(f"CogVideoX: learned position embeddings cover only {c.sample_height} x "
                                 f"{c.sample_width} latents, got {H} x {W}")
            x = x + self.pos_embedding.to(x.dtype)
        elif not c.use_rotary_positional_embeddings:
            if text.shape[1] != c.max_text_seq_length:
                raise ValueError(f"CogVideoX: with sin-cos position embeddings the text must have exactly "
                                 f"max_text_seq_length={c.max_text_seq_length} tokens (pad the prompt), got "
                                 f"{text.shape[1]}")
            pos = sincos_pos_embed_3d(x.shape[-1], Fr, H // p, W // p, c.spatial_interpolation_scale,
                                      c.temporal_interpolation_scale, x.device)
            T = text.shape[1]
            x = torch.cat([x[:, :T], x[:, T:] + pos.to(x.dtype)], dim=1)
        return x


# ----------------------------------------------------------------------------- blocks


class _AdaLNZero(nn.Module):
    """diffusers' CogVideoXLayerNormZero parameters: ``linear`` (6N) and ``norm``."""

    def __init__(self, tdim: int, dim: int, affine: bool, eps: float):
        super().__init__()
        self.linear = nn.Linear(tdim, 6 * dim)
        self.norm = nn.LayerNorm(dim, eps=eps, elementwise_affine=affine)


class Attention(nn.Module):
    def __init__(self, c: CogVideoXConfig, backend):
        super().__init__()
        N, D = c.inner_dim, c.attention_head_dim
        self.heads, self.backend = c.num_attention_heads, backend
        self.to_qkv = nn.Linear(N, 3 * N, bias=c.attention_bias)
        self.norm_q = nn.LayerNorm(D, eps=1e-6)
        self.norm_k = nn.LayerNorm(D, eps=1e-6)
        self.to_out = nn.ModuleList([nn.Linear(N, N)])

    def forward(self, qkv_e: Tensor, qkv_x: Tensor, rope) -> tuple[Tensor, Tensor]:
        """qkv_e (B, T, 3N), qkv_x (B, S, 3N): the fused projections of the two streams -> (a_e, a_x)."""
        B, T, N3 = qkv_e.shape
        N, H = N3 // 3, self.heads
        L = T + qkv_x.shape[1]
        q, k, v = torch.cat([qkv_e, qkv_x], dim=1).view(B, L, 3, H, N // H).unbind(2)
        q, k = _head_norm(q, self.norm_q, self.backend), _head_norm(k, self.norm_k, self.backend)
        if rope is not None:
            q, k = apply_rope(q, k, rope[0], rope[1], layout="bshd", interleaved=True, backend=self.backend)
        o = self.to_out[0](attention(q, k, v, layout="bshd", backend=self.backend).reshape(B, L, N))
        return o[:, :T], o[:, T:]


def _head_norm(x: Tensor, norm: nn.LayerNorm, backend) -> Tensor:
    """LayerNorm over the head dim of q or k, read in place from the fused QKV output.

    x (B, L, H, D) is a strided view of the (B, L, 3, H, D) projection; ``fastgen.ops.layer_norm``
    would copy it into rows first (and keep that copy for backward), so the kernel's autograd
    function gets the (B * L, H, D) view directly: rows of a 3-D tensor may have any strides.
    """
    impl = _ln_resolve("layer_norm", backend, x)
    if impl == "torch" or x.numel() == 0:
        return layer_norm(x, norm.weight, norm.bias, norm.eps, backend="torch")
    B, L, H, D = x.shape
    w = None if norm.weight is None else norm.weight.contiguous()
    b = None if norm.bias is None else norm.bias.contiguous()
    y = NormModulateFunction.apply(x.reshape(B * L, H, D), None, None, None, None, w, b, float(norm.eps),
                                   NORM_LAYER, impl)
    return y.reshape(B, L, H, D)


class _FeedForward(nn.Module):
    """diffusers' FeedForward("gelu-approximate") parameters: ``net.0.proj`` and ``net.2``."""

    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.ModuleList([_Proj(dim, 4 * dim), nn.Identity(), nn.Linear(4 * dim, dim)])

    def out(self, u: Tensor) -> Tensor:
        """``net.2(gelu_tanh(u))`` for u = net.0.proj(...) (GELU recomputed in the backward)."""
        return gelu_linear(u, self.net[2].weight, self.net[2].bias, "tanh")


class _Proj(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner)


class CogVideoXBlock(nn.Module):
    def __init__(self, c: CogVideoXConfig, backend):
        super().__init__()
        self.backend = backend
        self.norm1 = _AdaLNZero(c.time_embed_dim, c.inner_dim, c.norm_elementwise_affine, c.norm_eps)
        self.attn1 = Attention(c, backend)
        self.norm2 = _AdaLNZero(c.time_embed_dim, c.inner_dim, c.norm_elementwise_affine, c.norm_eps)
        self.ff = _FeedForward(c.inner_dim)

    def forward(self, x: Tensor, e: Tensor, temb_act: Tensor, rope):
        """x (B, S, N) video stream, e (B, T, N) text stream, temb_act = silu(temb) -> (x, e)."""
        be, n1, n2 = self.backend, self.norm1.norm, self.norm2.norm
        sh, sc, g, esh, esc, eg = self.norm1.linear(temb_act).chunk(6, dim=1)
        sh2, sc2, g2, esh2, esc2, eg2 = self.norm2.linear(temb_act).chunk(6, dim=1)
        qkv = self.attn1.to_qkv
        ae, ax = self.attn1(layer_norm_linear(e, n1, qkv, be, esh, esc), layer_norm_linear(x, n1, qkv, be, sh, sc),
                            rope)
        proj = self.ff.net[0].proj
        ux, x = layer_norm_linear(x, n2, proj, be, sh2, sc2, residual=ax, gate=g)
        ue, e = layer_norm_linear(e, n2, proj, be, esh2, esc2, residual=ae, gate=eg)
        # x + gate * ff: addcmul keeps only ff's output and the gate for backward (fastgen's
        # gated_residual would also keep x_new, which a residual add does not need).
        x = torch.addcmul(x, g2.unsqueeze(1), self.ff.out(ux))
        e = torch.addcmul(e, eg2.unsqueeze(1), self.ff.out(ue))
        return x, e


class _AdaLN(nn.Module):
    """diffusers' AdaLayerNorm(chunk_dim=1) parameters: ``linear`` (shift, scale) and ``norm``."""

    def __init__(self, tdim: int, dim: int, affine: bool, eps: float):
        super().__init__()
        self.linear = nn.Linear(tdim, 2 * dim)
        self.norm = nn.LayerNorm(dim, eps=eps, elementwise_affine=affine)


# ----------------------------------------------------------------------------- model


class CogVideoX(FastgenModel):
    """``CogVideoX(CogVideoXConfig.preset("cogvideox-5b"))``, ``CogVideoX.from_diffusers(pipe.transformer)``
    or ``CogVideoX.from_pretrained(dir)``; ``backend`` is passed to every op."""

    config_class = CogVideoXConfig

    def __init__(self, config: Optional[CogVideoXConfig] = None, backend: Optional[str] = "auto"):
        c = CogVideoXConfig() if config is None else config
        if c.use_learned_positional_embeddings and not c.use_rotary_positional_embeddings:
            raise ValueError("CogVideoX: learned position embeddings come with rotary ones (the I2V checkpoints)")
        if c.num_attention_heads < 1 or c.attention_head_dim % 2:
            raise ValueError(f"CogVideoX: attention_head_dim must be even, got {c.attention_head_dim}")
        super().__init__(c, backend)
        N = c.inner_dim
        self.patch_embed = CogVideoXPatchEmbed(c)
        self.time_embedding = TimestepMLP(N, c.time_embed_dim)
        if c.ofs_embed_dim:
            self.ofs_embedding = TimestepMLP(c.ofs_embed_dim, c.ofs_embed_dim)
        self.transformer_blocks = nn.ModuleList([CogVideoXBlock(c, backend) for _ in range(c.num_layers)])
        self.norm_final = nn.LayerNorm(N, c.norm_eps, c.norm_elementwise_affine)
        self.norm_out = _AdaLN(c.time_embed_dim, N, c.norm_elementwise_affine, c.norm_eps)
        pt = c.patch_size_t or 1
        self.proj_out = nn.Linear(N, c.patch_size * c.patch_size * pt * (c.out_channels or c.in_channels))

    def forward(
        self,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor,
        timestep: Union[Tensor, int, float],
        timestep_cond: Optional[Tensor] = None,
        ofs: Optional[Union[Tensor, int, float]] = None,
        image_rotary_emb: Optional[tuple] = None,
        attention_kwargs: Optional[dict] = None,
        return_dict: bool = True,
    ):
        """diffusers' ``CogVideoXTransformer3DModel.forward`` arguments; returns ``ModelOutput(sample)``
        (``return_dict=True``) or ``(sample,)``."""
        c, be = self.config, self.backend
        if timestep_cond is not None:
            raise NotImplementedError("CogVideoX: timestep_cond is not supported (no CogVideoX checkpoint uses it)")
        if attention_kwargs:
            raise NotImplementedError(f"CogVideoX: attention_kwargs {sorted(attention_kwargs)} are not supported "
                                      "(LoRA scales / custom processors: use the diffusers model)")
        B, Fr, C, H, W = self._check_inputs(hidden_states, encoder_hidden_states)
        T = encoder_hidden_states.shape[1]
        t = timestep
        if not torch.is_tensor(t):
            t = torch.tensor([t], device=hidden_states.device)
        t = t.reshape(-1).expand(B) if t.numel() == 1 else t
        emb = self.time_embedding(timestep_embedding(t, c.inner_dim, c.flip_sin_to_cos, c.freq_shift)
                                  .to(hidden_states.dtype))
        if c.ofs_embed_dim:
            if ofs is None:
                raise ValueError("CogVideoX: this config has ofs_embed_dim set (CogVideoX 1.5 I2V) and needs ofs=")
            o = ofs if torch.is_tensor(ofs) else torch.tensor([ofs], device=hidden_states.device)
            o = o.reshape(-1).expand(B) if o.numel() == 1 else o
            emb = emb + self.ofs_embedding(timestep_embedding(o, c.ofs_embed_dim, c.flip_sin_to_cos, c.freq_shift)
                                           .to(hidden_states.dtype))
        temb_act = F.silu(emb)

        tokens = self.patch_embed(encoder_hidden_states, hidden_states, c)
        e, x = tokens[:, :T], tokens[:, T:]
        rope = self._rope_tables(image_rotary_emb, T, x.shape[1], x.dtype)
        for blk in self.transformer_blocks:
            x, e = self._maybe_checkpoint(blk, x, e, temb_act, rope)

        x = layer_norm(x, self.norm_final.weight, self.norm_final.bias, self.norm_final.eps, backend=be)
        shift, scale = self.norm_out.linear(temb_act).chunk(2, dim=1)
        n = self.norm_out.norm
        x = self.proj_out(layer_norm_modulate(x, shift, scale, n.eps, n.weight, n.bias, backend=be))

        p, pt = c.patch_size, c.patch_size_t
        if pt is None:
            out = x.reshape(B, Fr, H // p, W // p, -1, p, p).permute(0, 1, 4, 2, 5, 3, 6).flatten(5, 6).flatten(3, 4)
        else:
            out = x.reshape(B, (Fr + pt - 1) // pt, H // p, W // p, -1, pt, p, p)
            out = out.permute(0, 1, 5, 4, 2, 6, 3, 7).flatten(6, 7).flatten(4, 5).flatten(1, 2)
        return ModelOutput(sample=out) if return_dict else (out,)

    def _check_inputs(self, x: Tensor, text: Tensor):
        c = self.config
        if not isinstance(x, Tensor) or x.dim() != 5:
            raise ValueError("CogVideoX: hidden_states must be a 5-D latent video (B, F, C, H, W), got "
                             f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
        B, Fr, C, H, W = x.shape
        if C != c.in_channels:
            raise ValueError(f"CogVideoX: hidden_states has {C} channels (dim 2 of (B, F, C, H, W)) but the model "
                             f"takes in_channels={c.in_channels} (shape {tuple(x.shape)})")
        p = c.patch_size
        if H % p or W % p:
            raise ValueError(f"CogVideoX: latent height and width ({H} x {W}) must be multiples of the patch size "
                             f"{p}")
        if c.patch_size_t is not None and Fr % c.patch_size_t:
            raise ValueError(f"CogVideoX: {Fr} latent frames are not a multiple of patch_size_t={c.patch_size_t} "
                             "(the pipeline pads the first frame; pad before calling the model)")
        if not isinstance(text, Tensor) or text.dim() != 3 or text.shape[-1] != c.text_embed_dim:
            raise ValueError(f"CogVideoX: encoder_hidden_states must be (B, T, text_embed_dim={c.text_embed_dim}), "
                             f"got {tuple(text.shape) if isinstance(text, Tensor) else type(text).__name__}")
        if text.shape[0] != B:
            raise ValueError(f"CogVideoX: encoder_hidden_states batch {text.shape[0]} != hidden_states batch {B}")
        return B, Fr, C, H, W

    def rotary_tables(self, frames: int, height: int, width: int, device=None) -> tuple[Tensor, Tensor]:
        """3-D RoPE ``(cos, sin)``, each ``(F' * height/p * width/p, head_dim)`` fp32, for a latent of
        ``frames`` x ``height`` x ``width`` (F' = frames / patch_size_t): angles of the (t, i, j) patch ids
        over ``head_dim / 4, 3 head_dim / 8, 3 head_dim / 8`` dims, interleaved pairs. Equal (to an ulp) to
        the tables CogVideoX pipelines pass as ``image_rotary_emb`` when the latent fills the model's base
        grid (``get_3d_rotary_pos_embed`` with the crop covering the grid)."""
        c, D = self.config, self.config.attention_head_dim
        if D % 8:
            raise ValueError(f"CogVideoX.rotary_tables: head_dim must be a multiple of 8, got {D}")
        p, pt = c.patch_size, c.patch_size_t or 1
        ids = rope_grid_ids(frames // pt, height // p, width // p, device=device)
        return rope_frequencies(ids, (D // 4, 3 * D // 8, 3 * D // 8), interleaved=True)

    @staticmethod
    def _rope_tables(rope, T: int, S: int, dtype):
        """(cos, sin) for the S video tokens -> tables over all T + S tokens (identity on text)."""
        if rope is None:
            return None
        cos, sin = rope
        if cos.dim() != 2 or cos.shape != sin.shape or cos.shape[0] != S:
            raise ValueError(f"CogVideoX: image_rotary_emb must be (cos, sin) of shape ({S}, head_dim) for the {S} "
                             f"video tokens, got {tuple(cos.shape)} and {tuple(sin.shape)}")
        ones, zeros = cos.new_ones(T, cos.shape[1]), sin.new_zeros(T, sin.shape[1])
        return torch.cat([ones, cos], dim=0), torch.cat([zeros, sin], dim=0)

    # ------------------------------------------------------------------ what pipelines may call

    @contextlib.contextmanager
    def cache_context(self, name: str, **kwargs):
        """No-op (diffusers' cache hooks are not supported; CogVideoXPipeline enters this each step)."""
        yield

    def fuse_qkv_projections(self) -> None:
        """No-op: q, k, v are always one projection here."""

    def unfuse_qkv_projections(self) -> None:
        """No-op: the fused projection computes what the separate ones would."""

    def set_attn_processor(self, processor) -> None:
        raise NotImplementedError("CogVideoX: custom attention processors are not supported; attention is "
                                  "fastgen.ops.attention. Use the diffusers CogVideoXTransformer3DModel for them")

    # ------------------------------------------------------------------ interchange

    @classmethod
    def config_from_diffusers(cls, config) -> CogVideoXConfig:
        config = dict(config)
        bad = {k: config[k] for k, ok in _FIXED.items() if k in config and config[k] not in ok}
        if bad:
            raise NotImplementedError(f"CogVideoX: diffusers config values not supported: {bad}")
        names = {f.name for f in dataclasses.fields(CogVideoXConfig)}
        return CogVideoXConfig(**{k: v for k, v in config.items() if k in names})

    @classmethod
    def state_dict_from_diffusers(cls, sd: dict) -> dict:
        return fuse_self_attention_qkv(sd)

    def to_diffusers_state_dict(self) -> dict:
        return split_self_attention_qkv(self.state_dict())
