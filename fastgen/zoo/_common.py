"""Small pieces shared by the zoo's models: input checks, the GroupNorm+SiLU conv stage, and the
helpers of their ``fastgen train`` protocol (``optimizer_step``, ``statistics_distance``)."""

from __future__ import annotations

from torch import Tensor, nn

from fastgen.nn import GroupNorm


def check_images(x: Tensor, channels: int, size: int, what: str = "images") -> None:
    """Raise a ValueError that names the expected shape unless ``x`` is (B, channels, size, size)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4 or x.shape[1] != channels or x.shape[2] != size or x.shape[3] != size:
        raise ValueError(f"{what} must have shape (B, {channels}, {size}, {size}) (the config's channels "
                         f"and image_size), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{what} must be a floating-point tensor, got {x.dtype}")


def check_vectors(x: Tensor, dim: int, what: str = "x") -> None:
    """Raise a ValueError unless ``x`` is (B, dim) floating point."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2 or x.shape[1] != dim:
        raise ValueError(f"{what} must have shape (B, {dim}), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{what} must be a floating-point tensor, got {x.dtype}")


def check_groups(channels, groups: int) -> None:
    for c in channels:
        if c % groups:
            raise ValueError(f"every channel count must be divisible by groups={groups}, got {tuple(channels)}")


def norm_act(channels: int, groups: int, backend: str) -> nn.Module:
    """GroupNorm fused with SiLU (one fastgen.ops.group_norm call)."""
    return GroupNorm(groups, channels, activation="silu", backend=backend)


def optimizer_step(optimizer, loss: Tensor) -> None:
    """One optimizer step on ``loss``: zero the gradients (to None), backward, step."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def statistics_distance(samples: Tensor, reference: Tensor, stats) -> float:
    """||stats(samples) - stats(reference)||_2: how far a sample batch's summary is from the data's."""
    return (stats(samples) - stats(reference)).norm().item()
