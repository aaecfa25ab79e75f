"""AdaLN modules of diffusion transformers, state-dict compatible with diffusers'.

``fastgen.nn.AdaLayerNormZero`` and ``fastgen.nn.AdaLayerNormContinuous`` take the
constructor arguments of ``diffusers.models.normalization.AdaLayerNormZero`` /
``AdaLayerNormContinuous``, hold parameters under the same ``state_dict`` keys and
return the same outputs, with the norm and the modulation fused into one kernel
(``fastgen.ops.layer_norm_modulate`` / ``rms_norm_modulate``). The shift / scale
chunks of the projection output are read in place (no copies).

The forwards are written once, as functions of the module and of a ``modulate`` callable,
and serve both these modules and the diffusers modules ``fastgen.patch`` swaps forwards on
(``AdaLayerNormZero``, ``AdaLayerNormZeroSingle``, ``SD35AdaLayerNormZeroX``,
``AdaLayerNormContinuous``; ``fastgen/patch/norms.py``)::

    modulation(m, emb, n)   linear(silu(emb)) (B, n*N) -> n chunks (B, N)
    zero_forward            6 chunks: (modulate(x, shift_msa, scale_msa), gate_msa, shift_mlp, scale_mlp, gate_mlp)
    zero_single_forward     3 chunks: (modulate(x, shift_msa, scale_msa), gate_msa)
    zero_x_forward          9 chunks: the norm modulated twice (SD 3.5's dual attention)
    continuous_forward      2 chunks, (scale, shift) in that order: modulate(x, shift, scale)

    modulate(m, x, pairs)   -> [norm(x) * (1 + scale[:, None]) + shift[:, None] for (shift, scale) in pairs]
    norm_modulate           one pair on layer_norm_modulate / rms_norm_modulate

Numerics: fp32 math with one rounding to the input dtype. For fp32 inputs this is
diffusers' result; for bf16 / fp16, diffusers rounds the norm output before the
modulation, so the two differ by about one unit in the last place.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from fastgen.nn.layer_norm import LayerNorm
from fastgen.nn.rms_norm import RMSNorm
from fastgen.ops.modulate import layer_norm_modulate, rms_norm_modulate


def modulation(module: nn.Module, emb: Tensor, chunks: int, dtype: Optional[torch.dtype] = None) -> tuple:
    """``module.linear(module.silu(emb))`` split into ``chunks`` views (B, N) along dim 1; ``dtype``:
    cast silu's output first (AdaLayerNormContinuous, whose conditioning may be upcast)."""
    h = module.silu(emb)
    if dtype is not None:
        h = h.to(dtype)
    return module.linear(h).chunk(chunks, dim=1)


def norm_modulate(norm: nn.Module, rms: bool, x: Tensor, shift: Tensor, scale: Tensor, call: Callable) -> Tensor:
    """``norm(x) * (1 + scale) + shift`` fused, with ``norm``'s eps, weight (and bias: LayerNorm);
    ``call(op, fn, *args)`` runs the op (on a backend, or as a patched site runs it)."""
    if rms:
        return call("rms_norm_modulate", rms_norm_modulate, x, shift, scale, norm.eps, norm.weight)
    return call("layer_norm_modulate", layer_norm_modulate, x, shift, scale, norm.eps, norm.weight, norm.bias)


def zero_forward(module: nn.Module, x: Tensor, emb: Tensor, modulate: Callable) -> tuple:
    """adaLN-Zero: ``(x_modulated, gate_msa, shift_mlp, scale_mlp, gate_mlp)``."""
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation(module, emb, 6)
    (out,) = modulate(module, x, ((shift_msa, scale_msa),))
    return out, gate_msa, shift_mlp, scale_mlp, gate_mlp


def zero_single_forward(module: nn.Module, x: Tensor, emb: Tensor, modulate: Callable) -> tuple:
    """adaLN-Zero of Flux's single blocks: ``(x_modulated, gate_msa)``."""
    shift_msa, scale_msa, gate_msa = modulation(module, emb, 3)
    (out,) = modulate(module, x, ((shift_msa, scale_msa),))
    return out, gate_msa


def zero_x_forward(module: nn.Module, x: Tensor, emb: Tensor, modulate: Callable) -> tuple:
    """SD 3.5's AdaLayerNormZeroX: one norm modulated twice (attention and the dual attention branch)."""
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp, shift_msa2, scale_msa2, gate_msa2 = \
        modulation(module, emb, 9)
    out, out2 = modulate(module, x, ((shift_msa, scale_msa), (shift_msa2, scale_msa2)))
    return out, gate_msa, shift_mlp, scale_mlp, gate_mlp, out2, gate_msa2


def continuous_forward(module: nn.Module, x: Tensor, conditioning_embedding: Tensor, modulate: Callable) -> Tensor:
    """AdaLayerNormContinuous: ``norm(x) * (1 + scale) + shift``; back to x's dtype before the
    projection in case the conditioning was upcast to fp32, as diffusers does."""
    scale, shift = modulation(module, conditioning_embedding, 2, x.dtype)
    (out,) = modulate(module, x, ((shift, scale),))
    return out


def _on_backend(backend: Optional[str], op: str, fn: Callable, *args) -> Tensor:
    return fn(*args, backend=backend)


def fused_modulate(module: nn.Module, x: Tensor, pairs) -> list:
    """The ``modulate`` of these modules: ``module.norm``'s fused op on ``module.backend`` per pair."""
    rms = isinstance(module.norm, nn.RMSNorm)
    call = functools.partial(_on_backend, module.backend)
    return [norm_modulate(module.norm, rms, x, shift, scale, call) for shift, scale in pairs]


class AdaLayerNormZero(nn.Module):
    """adaLN-Zero (DiT, PixArt, SD3, Flux double blocks): ``LN(x) * (1 + scale_msa) + shift_msa``.

    ``__init__(embedding_dim, num_embeddings=None, norm_type="layer_norm", bias=True, *, backend="auto")``;
    ``forward(x, timestep=None, class_labels=None, hidden_dtype=None, emb=None)`` returns
    ``(x_modulated, gate_msa, shift_mlp, scale_mlp, gate_mlp)`` as diffusers does::

        x    (B, S, N)        emb (B, N)  (or timestep / class_labels with num_embeddings)
        emb  = linear(silu(emb))  -> 6 chunks of (B, N)

    ``norm_type``: ``"layer_norm"`` (eps 1e-6) or ``"fp32_layer_norm"`` (eps 1e-5); both
    are computed in fp32 here. ``num_embeddings`` builds diffusers'
    ``CombinedTimestepLabelEmbeddings`` (needs diffusers installed).
    """

    def __init__(self, embedding_dim: int, num_embeddings: Optional[int] = None, norm_type: str = "layer_norm",
                 bias: bool = True, *, backend: str = "auto") -> None:
        super().__init__()
        if num_embeddings is not None:
            try:
                from diffusers.models.embeddings import CombinedTimestepLabelEmbeddings
            except ImportError as exc:
                raise ImportError(
                    f"AdaLayerNormZero(num_embeddings={num_embeddings}) uses diffusers' "
                    f"CombinedTimestepLabelEmbeddings; install diffusers ({exc})"
                ) from None
            self.emb = CombinedTimestepLabelEmbeddings(num_embeddings, embedding_dim)
        else:
            self.emb = None
        self.silu = nn.SiLU()
        self.linear = nn.Linear(embedding_dim, 6 * embedding_dim, bias=bias)
        if norm_type == "layer_norm":
            eps = 1e-6
        elif norm_type == "fp32_layer_norm":
            eps = 1e-5
        else:
            raise ValueError(
                f"Unsupported `norm_type` ({norm_type}) provided. Supported ones are: 'layer_norm', 'fp32_layer_norm'."
            )
        # No parameters (as in diffusers); kept for its eps and for the module tree.
        self.norm = nn.LayerNorm(embedding_dim, elementwise_affine=False, eps=eps)
        self.backend = backend

    def forward(self, x: Tensor, timestep: Optional[Tensor] = None, class_labels: Optional[Tensor] = None,
                hidden_dtype: Optional[torch.dtype] = None, emb: Optional[Tensor] = None):
        if self.emb is not None:
            emb = self.emb(timestep, class_labels, hidden_dtype=hidden_dtype)
        if emb is None:
            raise ValueError("AdaLayerNormZero: pass emb (or timestep and class_labels with num_embeddings)")
        return zero_forward(self, x, emb, fused_modulate)


class AdaLayerNormContinuous(nn.Module):
    """``norm(x) * (1 + scale) + shift`` with ``scale, shift = linear(silu(cond)).chunk(2)`` (SD3, Flux: norm_out).

    ``__init__(embedding_dim, conditioning_embedding_dim, elementwise_affine=True, eps=1e-5, bias=True,
    norm_type="layer_norm", *, backend="auto")``; ``forward(x, conditioning_embedding)``::

        x (B, S, N), conditioning_embedding (B, C)  ->  (B, S, N)

    ``norm_type``: ``"layer_norm"`` (parameters ``norm.weight`` / ``norm.bias`` when
    ``elementwise_affine`` / ``bias``) or ``"rms_norm"`` (``norm.weight`` when
    ``elementwise_affine``).
    """

    def __init__(self, embedding_dim: int, conditioning_embedding_dim: int, elementwise_affine: bool = True,
                 eps: float = 1e-5, bias: bool = True, norm_type: str = "layer_norm", *,
                 backend: str = "auto") -> None:
        super().__init__()
        self.silu = nn.SiLU()
        self.linear = nn.Linear(conditioning_embedding_dim, embedding_dim * 2, bias=bias)
        if norm_type == "layer_norm":
            self.norm = LayerNorm(embedding_dim, eps, elementwise_affine, bias, backend=backend)
        elif norm_type == "rms_norm":
            self.norm = RMSNorm(embedding_dim, eps, elementwise_affine, backend=backend)
        else:
            raise ValueError(f"unknown norm_type {norm_type}")
        self.backend = backend

    def forward(self, x: Tensor, conditioning_embedding: Tensor) -> Tensor:
        return continuous_forward(self, x, conditioning_embedding, fused_modulate)
