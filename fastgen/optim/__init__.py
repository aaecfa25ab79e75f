"""Fused optimizers: drop-ins for torch.optim with multi-tensor kernels."""

from fastgen.optim.adamw import FusedAdamW

__all__ = ["FusedAdamW"]
