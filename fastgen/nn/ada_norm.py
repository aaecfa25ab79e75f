"""AdaLN modules of diffusion transformers, state-dict compatible with diffusers'.

``fastgen.nn.AdaLayerNormZero`` and ``fastgen.nn.AdaLayerNormContinuous`` take the
constructor arguments of ``diffusers.models.normalization.AdaLayerNormZero`` /
``AdaLayerNormContinuous``, hold parameters under the same ``state_dict`` keys and
return the same outputs, with the norm and the modulation fused into one kernel
(``fastgen.ops.layer_norm_modulate`` / ``rms_norm_modulate``). The shift / scale
chunks of the projection output are read in place (no copies).

Numerics: fp32 math with one rounding to the input dtype. For fp32 inputs this is
diffusers' result; for bf16 / fp16, diffusers rounds the norm output before the
modulation, so the two differ by about one unit in the last place.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from fastgen.nn.layer_norm import LayerNorm
from fastgen.nn.rms_norm import RMSNorm
from fastgen.ops.modulate import layer_norm_modulate, rms_norm_modulate


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
        emb = self.linear(self.silu(emb))
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = emb.chunk(6, dim=1)
        x = layer_norm_modulate(x, shift_msa, scale_msa, self.norm.eps, backend=self.backend)
        return x, gate_msa, shift_mlp, scale_mlp, gate_mlp


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
        self.norm_type = norm_type
        self.backend = backend

    def forward(self, x: Tensor, conditioning_embedding: Tensor) -> Tensor:
        # As diffusers: back to x's dtype in case the conditioning was upcast to fp32.
        emb = self.linear(self.silu(conditioning_embedding).to(x.dtype))
        scale, shift = torch.chunk(emb, 2, dim=1)
        if self.norm_type == "layer_norm":
            return layer_norm_modulate(x, shift, scale, self.norm.eps, self.norm.weight, self.norm.bias,
                                       backend=self.backend)
        return rms_norm_modulate(x, shift, scale, self.norm.eps, self.norm.weight, backend=self.backend)
