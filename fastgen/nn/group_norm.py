"""``fastgen.nn.GroupNorm``: a drop-in for ``torch.nn.GroupNorm`` running ``fastgen.ops.group_norm``."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastgen.ops.group_norm import ACTIVATIONS, group_norm


class GroupNorm(torch.nn.GroupNorm):
    """``torch.nn.GroupNorm`` with fastgen's kernels, optionally fused with SiLU.

    Same constructor arguments, attributes and ``state_dict`` keys as
    ``torch.nn.GroupNorm`` (it *is* one, by inheritance), so state dicts move
    between the two in both directions. Extras, keyword-only:

    - ``activation=None | "silu"``: ``"silu"`` returns ``silu(group_norm(x))`` from
      one fused pass (the ``norm -> nonlinearity`` pair of UNet / VAE ResNet blocks);
    - ``backend="auto" | "triton" | "cuda" | "torch"``.

    Input ``(N, C, *spatial)`` with 0 to 3 spatial dims (``(N, C)`` is treated as one
    spatial position), contiguous or channels-last; the output keeps the input's
    memory format. The math is done in fp32 and rounded once to the input dtype.
    """

    def __init__(
        self,
        num_groups: int,
        num_channels: int,
        eps: float = 1e-5,
        affine: bool = True,
        device=None,
        dtype=None,
        *,
        activation: Optional[str] = None,
        backend: str = "auto",
    ) -> None:
        if activation not in ACTIVATIONS:
            raise ValueError(f"GroupNorm: unknown activation {activation!r}; expected None or 'silu'")
        super().__init__(num_groups, num_channels, eps=eps, affine=affine, device=device, dtype=dtype)
        self.activation = activation
        self.backend = backend

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() < 2 or x.shape[1] != self.num_channels:
            raise ValueError(
                f"GroupNorm: expected input of shape (N, {self.num_channels}, *spatial), got {tuple(x.shape)}"
            )
        if x.dim() == 2:
            out = group_norm(x.unsqueeze(-1), self.num_groups, self.weight, self.bias, self.eps,
                             self.activation, backend=self.backend)
            return out.squeeze(-1)
        return group_norm(x, self.num_groups, self.weight, self.bias, self.eps, self.activation, backend=self.backend)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", activation={self.activation!r}, backend={self.backend!r}"
