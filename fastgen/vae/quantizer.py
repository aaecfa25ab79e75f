"""``fastgen.vae.VectorQuantizer``: codebook lookup for VQ-VAEs and token models.

Vectors ``z`` of width ``D`` (the channel dim of ``(N, D, H, W)`` images, or the last dim of
``(..., D)`` tokens) against a codebook ``e`` (K, D)::

    k*(z) = argmin_k ||z - e_k||^2                      nearest code (fused Triton kernel, see below)
    z_q   = e[k*]
    loss  = ||sg(z_q) - z||^2 + beta ||z_q - sg(z)||^2   (legacy=True: diffusers' VectorQuantizer default;
                                                          legacy=False swaps the two weights)
    out   = z + sg(z_q - z)                             straight-through: d out / d z = identity

``sg`` is stop-gradient, ``||.||^2`` a mean over elements. Options:

- ``ema=True`` (VQ-VAE-2; the update of vector-quantize-pytorch's ``VectorQuantize``): the codebook
  is no parameter but a running average, updated in training after the lookup::

      n_k <- decay n_k + (1 - decay) count_k,      s_k <- decay s_k + (1 - decay) sum_{z: k*(z)=k} z
      e_k  = s_k / ((n_k + eps) / (sum n + K eps) * sum n)        (Laplace-smoothed counts)

  and the loss is the commitment term alone, ``beta ||sg(z_q) - z||^2``.
- ``num_quantizers=N``: residual VQ, N codebooks; layer i quantizes what the layers before left,
  ``r_0 = z``, ``q_i = VQ_i(r_i)``, ``r_{i+1} = r_i - sg(q_i)``, ``out = sum_i q_i``, loss summed,
  indices ``(..., N)``.
- ``lfq=True``: lookup-free quantization (MAGVIT-v2): the implicit codebook ``{-1, 1}^D``,
  ``z_q = sign(z)`` (``+1`` where ``z > 0``), index ``sum_i [z_i > 0] 2^(D-1-i)`` (vector-quantize-pytorch's
  bit order), loss ``beta ||sg(z_q) - z||^2`` (MAGVIT-v2's entropy penalty is not included).

The nearest-code search is :func:`nearest_code`: the torch reference computes
``||e||^2 - 2 z e^T`` in row chunks; ``backend="triton"`` (or ``auto`` once recorded on a GPU)
runs the registered launcher ``vq_nearest`` (``kernels/vq.py``), which never materialises the
(M, K) distance matrix.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastgen import backend as _backend

REF_CHUNK_ELEMENTS = 2**24  # rows x codes per chunk of the torch reference's distance matrix


def nearest_code_ref(x: Tensor, codebook: Tensor) -> tuple[Tensor, Tensor]:
    """Torch reference of :func:`nearest_code`, fp32 math, the (M, K) matrix in row chunks."""
    e = codebook.float()
    e2 = e.square().sum(1)
    step = max(1, REF_CHUNK_ELEMENTS // max(e.shape[0], 1))
    idx, dist = [], []
    for xc in x.float().split(step):
        d = torch.addmm(e2[None, :], xc, e.t(), alpha=-2.0)  # ||e||^2 - 2 x e^T
        m, i = d.min(1)
        idx.append(i)
        dist.append((m + xc.square().sum(1)).clamp_min(0.0))
    if not idx:
        return x.new_empty(0, dtype=torch.int64), x.new_empty(0, dtype=torch.float32)
    return torch.cat(idx), torch.cat(dist)


def nearest_code(x: Tensor, codebook: Tensor, backend: Optional[str] = "auto") -> tuple[Tensor, Tensor]:
    """``idx (M,) int64, dist (M,) fp32 = nearest_code(x (M, D), codebook (K, D))``: the nearest code per
    row (lowest index on ties) and its squared distance. fp32 / fp16 / bf16, math in fp32.
    Backends: ``"torch"`` (reference), ``"triton"`` (fused distance + argmin), ``"auto"``."""
    if x.dim() != 2 or codebook.dim() != 2 or x.shape[1] != codebook.shape[1]:
        raise ValueError(f"nearest_code: expected x (M, D) and codebook (K, D), got {tuple(x.shape)} and "
                         f"{tuple(codebook.shape)}")
    if codebook.shape[0] == 0:
        raise ValueError("nearest_code: the codebook is empty")
    if x.device != codebook.device:
        raise ValueError(f"nearest_code: x is on {x.device} but the codebook on {codebook.device}")
    bad = None if x.dtype in (torch.float32, torch.float16, torch.bfloat16) else f"dtype {x.dtype} is not supported"
    impl = _backend.resolve("vq_nearest", backend, x.device, {"triton": bad})  # the registry: no CUDA C++ kernel
    if impl == "torch":
        return nearest_code_ref(x, codebook)
    return _backend.launcher("vq_nearest", "triton").vq_nearest(x.detach(), codebook.detach().to(x.dtype))


class VQOutput(NamedTuple):
    """``quantized`` (input's shape, straight-through), ``loss`` (scalar), ``indices`` (input's shape
    without the channel dim; ``(..., N)`` for residual VQ)."""

    quantized: Tensor
    loss: Tensor
    indices: Tensor


class VectorQuantizer(nn.Module):
    """Nearest-code quantizer (module docstring): ``VectorQuantizer(num_codes, dim)(z) -> VQOutput``.

    Args:
        num_codes: codebook size ``K`` (ignored with ``lfq=True``: ``2 ** dim``).
        dim: vector width ``D``.
        beta: commitment weight.
        channel_dim: where ``D`` sits in the input: ``1`` for ``(N, D, H, W)`` (default, diffusers'
            layout), ``-1`` for ``(..., D)`` tokens.
        ema / decay / eps: EMA codebook updates (in training mode).
        num_quantizers: residual VQ with that many codebooks.
        lfq: lookup-free quantization.
        legacy: diffusers' loss weighting (``beta`` on the codebook term).
        backend: the nearest-code search's backend.

    The single-codebook, non-EMA quantizer stores its codebook as ``embedding.weight`` (diffusers'
    ``VectorQuantizer`` key); EMA adds the buffers ``cluster_size`` and ``embed_avg``; residual
    layers are ``layers.<i>``.
    """

    def __init__(self, num_codes: int, dim: int, beta: float = 0.25, channel_dim: int = 1, ema: bool = False,
                 decay: float = 0.99, eps: float = 1e-5, num_quantizers: int = 1, lfq: bool = False,
                 legacy: bool = True, backend: Optional[str] = "auto") -> None:
        super().__init__()
        if num_quantizers < 1 or dim < 1 or (num_codes < 1 and not lfq):
            raise ValueError(f"VectorQuantizer: need num_codes, dim, num_quantizers >= 1, got {num_codes}, {dim}, "
                             f"{num_quantizers}")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"VectorQuantizer: decay must be in [0, 1), got {decay}")
        self.num_codes, self.dim, self.beta, self.channel_dim = (2**dim if lfq else num_codes), dim, beta, channel_dim
        self.ema, self.decay, self.eps, self.lfq, self.legacy, self.backend = ema, decay, eps, lfq, legacy, backend
        self.num_quantizers = num_quantizers
        if num_quantizers > 1:
            self.layers = nn.ModuleList(
                VectorQuantizer(num_codes, dim, beta, -1, ema, decay, eps, 1, lfq, legacy, backend)
                for _ in range(num_quantizers))
        elif lfq:
            self.register_buffer("bits", 2 ** torch.arange(dim - 1, -1, -1), persistent=False)
        else:
            self.embedding = nn.Embedding(num_codes, dim)
            nn.init.uniform_(self.embedding.weight, -1.0 / num_codes, 1.0 / num_codes)  # diffusers' init
            if ema:
                self.embedding.weight.requires_grad_(False)
                self.register_buffer("cluster_size", torch.ones(num_codes))
                self.register_buffer("embed_avg", self.embedding.weight.detach().clone())

    @property
    def codebook(self) -> Tensor:
        """``(K, D)`` (single codebook, not LFQ)."""
        return self.embedding.weight

    def _to_last(self, z: Tensor) -> Tensor:
        if z.dim() < 2 or z.shape[self.channel_dim] != self.dim:
            raise ValueError(f"VectorQuantizer: expected {self.dim} channels in dim {self.channel_dim}, "
                             f"got shape {tuple(z.shape)}")
        return z.movedim(self.channel_dim, -1)

    def forward(self, z: Tensor) -> VQOutput:
        zl = self._to_last(z)
        q, loss, idx = self._quantize(zl)
        return VQOutput(q.movedim(-1, self.channel_dim), loss, idx)

    def _quantize(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``z (..., D)`` -> (straight-through ``z_q``, loss, indices)."""
        if self.num_quantizers > 1:
            residual, out, loss, idx = z, torch.zeros_like(z), z.new_zeros(()), []
            for layer in self.layers:
                q, l_i, i = layer._quantize(residual)
                residual = residual - q.detach()
                out, loss = out + q, loss + l_i
                idx.append(i)
            return out, loss, torch.stack(idx, dim=-1)
        if self.lfq:
            pos = z > 0
            zq = torch.where(pos, 1.0, -1.0).to(z.dtype)
            idx = (pos.long() * self.bits).sum(-1)
            loss = self.beta * F.mse_loss(z, zq.detach())
            return z + (zq - z).detach(), loss, idx
        flat = z.reshape(-1, self.dim)
        idx, _ = nearest_code(flat.detach(), self.codebook.detach().to(flat.dtype), self.backend)
        zq = F.embedding(idx, self.codebook).view(z.shape).to(z.dtype)
        if self.ema:
            if self.training:
                self._ema_update(flat.detach(), idx)
            loss = self.beta * F.mse_loss(zq.detach(), z)
        elif self.legacy:
            loss = F.mse_loss(zq.detach(), z) + self.beta * F.mse_loss(zq, z.detach())
        else:
            loss = self.beta * F.mse_loss(zq.detach(), z) + F.mse_loss(zq, z.detach())
        return z + (zq - z).detach(), loss, idx.view(z.shape[:-1])

    @torch.no_grad()
    def _ema_update(self, flat: Tensor, idx: Tensor) -> None:
        """EMA of the counts and sums per code, then the Laplace-smoothed means (module docstring).
        On CUDA the per-code sums use ``index_add_`` (atomics: not bit-deterministic)."""
        k = self.num_codes
        counts = torch.bincount(idx, minlength=k).to(self.cluster_size.dtype)
        sums = torch.zeros_like(self.embed_avg).index_add_(0, idx, flat.to(self.embed_avg.dtype))
        self.cluster_size.lerp_(counts, 1.0 - self.decay)
        self.embed_avg.lerp_(sums, 1.0 - self.decay)
        n = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (n + k * self.eps) * n
        self.embedding.weight.copy_(self.embed_avg / smoothed[:, None])

    def lookup(self, indices: Tensor) -> Tensor:
        """Indices (as ``forward`` returns them) -> the quantized vectors, channel dim where the input had it."""
        q = self._lookup_last(indices)
        return q if self.channel_dim in (-1, q.dim() - 1) else q.movedim(-1, self.channel_dim)

    def _lookup_last(self, indices: Tensor) -> Tensor:
        if self.num_quantizers > 1:
            return sum(layer._lookup_last(indices[..., i]) for i, layer in enumerate(self.layers))
        if self.lfq:
            return torch.where((indices[..., None] & self.bits) > 0, 1.0, -1.0)
        return F.embedding(indices, self.codebook)

    def extra_repr(self) -> str:
        kind = "lfq" if self.lfq else ("ema" if self.ema else "learned")
        return (f"num_codes={self.num_codes}, dim={self.dim}, beta={self.beta}, {kind}, "
                f"num_quantizers={self.num_quantizers}")


__all__ = ["VectorQuantizer", "VQOutput", "nearest_code", "nearest_code_ref"]
