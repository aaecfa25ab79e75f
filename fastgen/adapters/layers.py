"""Adapter branches for ``nn.Linear`` / ``nn.Conv2d`` and the per-layer set that runs them.

A base layer computes ``y = x W^T + b`` with ``W`` of shape ``(out, in)`` (Linear) or
``(out, in, kh, kw)`` (Conv2d; ``in_flat = in * kh * kw``). Each adapter adds a weight
update ``dW`` of W's shape, times ``s = scale * multiplier``:

- **LoRA / LoCoN**: ``dW = up @ down`` with ``down (r, in[, kh, kw])``, ``up (out, r[, 1, 1])``;
  ``scale = alpha / r`` (``alpha / sqrt(r)`` with rank-stabilised scaling). On a conv, ``down``
  is a conv with the base's kernel, stride, padding and dilation and ``up`` a 1x1 conv.
- **LoHa**: ``dW = (w1a @ w1b) * (w2a @ w2b)`` (Hadamard product), ``w?a (out, r)``,
  ``w?b (r, in_flat)``; ``scale = alpha / r``.
- **LoKr**: ``dW = kron(w1, w2)``, ``w1 (out/f, in/f')`` and ``w2 (f, f'[, kh, kw])``, each either a
  full matrix or a rank-r product ``w?a @ w?b``; ``scale = alpha / r`` when ``w2`` is factored,
  1 when both are full matrices (the LyCORIS / ComfyUI convention).
- **DoRA** (LoRA with a magnitude ``m (out,)``): ``W' = m * (W + s dW) / ||W + s dW||_row``, the norm
  over every axis but the output one, treated as a constant in backward (DoRA paper, section
  4.3, as PEFT does). Output: ``y + (m/n - 1) * (x W^T) + (m/n) * s * (x dW^T)``.

``AdapterSet`` (a ``ModuleDict`` of branches named by adapter) is attached to the base layer as
``layer.fastgen_adapters``; a forward hook adds each enabled, unmerged branch to the base output.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fastgen.adapters.fused import dora_row_norm, lora_add

KINDS = ("lora", "loha", "lokr", "dora")


def layer_shape(layer: nn.Module) -> tuple[int, int, tuple[int, int]]:
    """(out_features, in_features, kernel) of a Linear-like or Conv2d layer (kernel (1, 1) for Linear)."""
    if isinstance(layer, nn.Conv2d):
        if layer.groups != 1:
            raise ValueError(f"adapters on grouped convolutions (groups={layer.groups}) are not supported")
        return layer.out_channels, layer.in_channels, tuple(layer.kernel_size)
    if hasattr(layer, "in_features") and hasattr(layer, "out_features"):
        return layer.out_features, layer.in_features, (1, 1)
    raise TypeError(f"adapters need an nn.Linear or nn.Conv2d, got {type(layer).__name__}")


def base_weight(layer: nn.Module) -> torch.Tensor:
    """The base layer's weight as a float tensor (dequantized for fastgen's quantized layers)."""
    if hasattr(layer, "dequantize_weight"):
        return layer.dequantize_weight()
    return layer.weight


def is_conv(layer: nn.Module) -> bool:
    return isinstance(layer, nn.Conv2d)


def _conv_args(layer: nn.Conv2d) -> dict:
    return dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation)


class Branch(nn.Module):
    """Common part of the adapter branches: alpha, rank, dropout, the scale and ``delta_weight``."""

    kind = "base"

    def __init__(self, rank: int, alpha: float, dropout: float, weight_shape: tuple[int, ...]):
        super().__init__()
        self.rank = int(rank)
        self.alpha = float(alpha)
        self.weight_shape = tuple(weight_shape)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta_weight(self) -> torch.Tensor:
        """``dW`` (without ``scale``), shaped like the base weight."""
        raise NotImplementedError

    def apply_delta(self, x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
        """``x dW^T`` (no scale, no bias): the branch as the base layer's op with ``dW``."""
        dw = self.delta_weight().to(x.dtype)
        if is_conv(layer):
            return F.conv2d(x, dw, None, **_conv_args(layer))
        return F.linear(x, dw)


class LoRA(Branch):
    """LoRA on a Linear, LoCoN on a Conv2d; ``magnitude`` set makes it DoRA."""

    kind = "lora"

    def __init__(self, rank, alpha, dropout, weight_shape, rslora=False, dora=False, init="kaiming"):
        super().__init__(rank, alpha, dropout, weight_shape)
        out_f, in_f = weight_shape[0], weight_shape[1]
        kernel = tuple(weight_shape[2:])
        self.rslora = bool(rslora)
        self.down = nn.Parameter(torch.empty(rank, in_f, *kernel))
        self.up = nn.Parameter(torch.zeros(out_f, rank, *([1] * len(kernel))))
        nn.init.kaiming_uniform_(self.down, a=math.sqrt(5))
        self.magnitude = nn.Parameter(torch.ones(out_f)) if dora else None

    @property
    def kind_name(self) -> str:
        return "dora" if self.magnitude is not None else "lora"

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def delta_weight(self):
        r = self.rank
        dw = self.up.reshape(self.up.shape[0], r) @ self.down.reshape(r, -1)
        return dw.reshape(self.weight_shape)

    def apply_delta(self, x, layer):
        if is_conv(layer):
            h = F.conv2d(x, self.down.to(x.dtype), None, **_conv_args(layer))
            return F.conv2d(h, self.up.to(x.dtype))
        return F.linear(F.linear(x, self.down.to(x.dtype)), self.up.to(x.dtype))

    def init_magnitude(self, weight: torch.Tensor) -> None:
        """DoRA: ``m = ||W + s dW||_row`` so that the adapted layer starts equal to the base."""
        with torch.no_grad():
            self.magnitude.copy_(row_norm(weight.float() + self.scale * self.delta_weight().float()))


class LoHa(Branch):
    """LoHa: Hadamard product of two rank-r products."""

    kind = "loha"
    kind_name = "loha"

    def __init__(self, rank, alpha, dropout, weight_shape):
        super().__init__(rank, alpha, dropout, weight_shape)
        out_f, in_flat = weight_shape[0], math.prod(weight_shape[1:])
        self.w1a = nn.Parameter(torch.empty(out_f, rank))
        self.w1b = nn.Parameter(torch.empty(rank, in_flat))
        self.w2a = nn.Parameter(torch.zeros(out_f, rank))
        self.w2b = nn.Parameter(torch.empty(rank, in_flat))
        for p in (self.w1a, self.w1b, self.w2b):
            nn.init.normal_(p, std=0.1)

    def delta_weight(self):
        return ((self.w1a @ self.w1b) * (self.w2a @ self.w2b)).reshape(self.weight_shape)


def factorization(dim: int, factor: int = -1) -> tuple[int, int]:
    """Split ``dim = a * b`` with ``a <= b``: ``a = factor`` when it divides ``dim``, else the most
    square split (with ``factor > 0`` also ``a <= factor``)."""
    if factor > 0 and dim % factor == 0:
        a = factor
        return (a, dim // a) if a <= dim // a else (dim // a, a)
    best = (1, dim)
    for a in range(1, int(math.isqrt(dim)) + 1):
        if dim % a == 0 and (factor <= 0 or a <= factor):
            best = (a, dim // a)
    return best


class LoKr(Branch):
    """LoKr: Kronecker product ``kron(w1, w2)``; ``w2`` is a rank-r product unless ``full_matrix``
    (or the rank is at least half of w2's smaller side, as LyCORIS decides)."""

    kind = "lokr"
    kind_name = "lokr"

    def __init__(self, rank, alpha, dropout, weight_shape, factor=-1, full_matrix=False, decompose_w1=False):
        super().__init__(rank, alpha, dropout, weight_shape)
        out_f, in_f = weight_shape[0], weight_shape[1]
        kernel = tuple(weight_shape[2:])
        out_l, out_k = factorization(out_f, factor)
        in_m, in_n = factorization(in_f, factor)
        self.factored_w1 = bool(decompose_w1)
        self.factored_w2 = not full_matrix and rank < max(out_k, in_n) / 2
        if self.factored_w1:
            self.w1a = nn.Parameter(torch.empty(out_l, rank))
            self.w1b = nn.Parameter(torch.empty(rank, in_m))
        else:
            self.w1 = nn.Parameter(torch.empty(out_l, in_m))
        if self.factored_w2:
            self.w2a = nn.Parameter(torch.zeros(out_k, rank))
            self.w2b = nn.Parameter(torch.empty(rank, in_n * math.prod(kernel)))
        else:
            self.w2 = nn.Parameter(torch.zeros(out_k, in_n, *kernel))
        self.kernel = kernel
        if not self.factored_w1 and not self.factored_w2:
            self.alpha = float(rank)  # full matrices: no alpha scaling (LyCORIS / ComfyUI)
        for name, p in self.named_parameters():
            if name in ("w1", "w1a", "w1b", "w2b"):
                nn.init.normal_(p, std=0.1)

    @classmethod
    def from_tensors(cls, tensors: dict, alpha: float | None, weight_shape) -> "LoKr":
        """A LoKr holding the given factors (``w1`` or ``w1a/w1b``; ``w2`` or ``w2a/w2b``)."""
        self = Branch.__new__(cls)
        rank = tensors["w2a"].shape[1] if "w2a" in tensors else tensors["w1a"].shape[1] if "w1a" in tensors else 1
        Branch.__init__(self, rank, alpha if alpha is not None else rank, 0.0, weight_shape)
        self.factored_w1 = "w1a" in tensors
        self.factored_w2 = "w2a" in tensors
        self.kernel = tuple(weight_shape[2:])
        for k, v in tensors.items():
            setattr(self, k, nn.Parameter(v.detach().clone()))
        if not self.factored_w2 and not self.factored_w1:
            self.alpha = float(self.rank)  # full matrices: no alpha scaling
        return self

    def _w1(self):
        return self.w1a @ self.w1b if self.factored_w1 else self.w1

    def _w2(self):
        if self.factored_w2:
            w2 = self.w2a @ self.w2b
            return w2.reshape(w2.shape[0], -1, *self.kernel)
        return self.w2

    def delta_weight(self):
        return self.kron().reshape(self.weight_shape)

    def kron(self):
        """``kron(w1, w2)`` before the reshape to the weight's shape."""
        w1, w2 = self._w1(), self._w2()
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        elif len(self.weight_shape) == 4:  # 1x1 conv with a 2-D w2
            w2 = w2[:, :, None, None]
            w1 = w1[:, :, None, None]
        return torch.kron(w1, w2)


def row_norm(w: torch.Tensor) -> torch.Tensor:
    """L2 norm of each output row of a weight (every axis but the first): shape (out,)."""
    return w.reshape(w.shape[0], -1).norm(dim=1)


def shape_rows(v: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """A per-row vector ``(out,)`` shaped to broadcast over a weight like ``w``."""
    return v.view(-1, *([1] * (w.dim() - 1)))


def true_base(layer: nn.Module) -> torch.Tensor:
    """The base weight without the layer's merged adapters, fp32. A merged plain adapter added
    ``s dW``, a merged DoRA ``(f - 1) W0 + f s dW`` (``f`` kept per row), so
    ``W0 = (W - sum_plain s dW - sum_dora f s dW) / (1 + sum_dora (f - 1))``."""
    sset = layer.fastgen_adapters
    w = base_weight(layer).float()
    denom = torch.ones(w.shape[0], device=w.device)
    for n, f in sset.merged.items():
        br = sset[n]
        sdw = br.scale * sset.multipliers.get(n, 1.0) * br.delta_weight().float()
        if f is None:
            w = w - sdw
        else:
            w = w - shape_rows(f, w) * sdw
            denom = denom + (f - 1)
    return w / shape_rows(denom, w)


class AdapterSet(nn.ModuleDict):
    """The adapters of one base layer, by name, with their multipliers and enabled/merged state."""

    def __init__(self):
        super().__init__()
        self.multipliers: dict[str, float] = {}
        self.disabled: set[str] = set()
        self.merged: dict[str, torch.Tensor | None] = {}  # name -> DoRA row factor used at merge (None: plain)
        self.fused = "auto"  # "auto" | "triton" | "torch": who runs the linear LoRA branch

    def active(self):
        for name, branch in self.items():
            if name not in self.disabled and name not in self.merged:
                yield name, branch, self.multipliers.get(name, 1.0)


def forward_hook(layer: nn.Module, args, output):
    """Adds every enabled, unmerged adapter of ``layer`` to its output ``y = base(x)``."""
    adapters: AdapterSet = layer.fastgen_adapters
    active = list(adapters.active())
    if not active:
        return output
    x = args[0]
    conv = is_conv(layer)
    bias = getattr(layer, "bias", None)
    base_nobias, w0 = None, None
    if any(getattr(b, "magnitude", None) is not None for _, b, _ in active):
        if adapters.merged:  # DoRA sees the base alone: take the merged adapters back out
            w0 = true_base(layer).to(x.dtype)
            base_nobias = F.conv2d(x, w0, None, **_conv_args(layer)) if conv else F.linear(x, w0)
        else:  # DoRA scales the base output without its bias; taken before any branch is added (in place)
            base_nobias = output.clone() if bias is None else output - (bias.view(1, -1, 1, 1) if conv else bias)
    for name, branch, mult in active:
        s = branch.scale * mult
        plain = isinstance(branch.dropout, nn.Identity) or not branch.training
        xd = x if plain else branch.dropout(x)
        if getattr(branch, "magnitude", None) is not None:
            w = base_weight(layer).to(x.dtype) if w0 is None else w0
            norm = dora_row_norm(w, branch.up.detach().to(x.dtype), branch.down.detach().to(x.dtype), s,
                                 backend=adapters.fused)
            factor = branch.magnitude.to(x.dtype) / norm
            factor = factor.view(1, -1, 1, 1) if conv else factor
            if plain:
                base = base_nobias
            else:  # dropout: the magnitude term sees the same dropped input as the branch (as PEFT)
                base = F.conv2d(xd, w, None, **_conv_args(layer)) if conv else F.linear(xd, w)
            output = output + (factor - 1) * base + factor * s * branch.apply_delta(xd, layer)
        elif isinstance(branch, LoRA) and not conv:
            output = lora_add(output, xd, branch.down, branch.up, s, backend=adapters.fused)
        else:
            output = output + s * branch.apply_delta(xd, layer)
    return output
