"""Small pieces shared by the zoo's models: input checks, the GroupNorm+SiLU conv stage, and the
helpers of their ``fastgen train`` protocol (``optimizer_step``, ``statistics_distance``, ``draw``,
``train_steps``)."""

from __future__ import annotations

import torch
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


def draw(data: dict, groups: list, n: int, generator: torch.Generator) -> dict:
    """A batch of ``n`` rows of every tensor in ``data``, drawn with replacement by ``generator``: one
    index draw per group of keys in ``groups`` (the keys of a group share it, e.g. images and labels)."""
    batch = {}
    for keys in groups:
        first = data[keys[0]]
        idx = torch.randint(0, first.shape[0], (n,), generator=generator, device=first.device)
        batch.update({k: data[k][idx] for k in keys})
    return batch


def train_steps(model, data: dict, steps: int, batch_size: int, generator: torch.Generator, groups=None,
                **adamw) -> list[dict]:
    """``steps`` calls of ``model.train_step`` on batches :func:`draw` takes from ``data`` (all keys one
    group unless ``groups``; ``batch_size * model.batches_per_step`` rows, as the zoo runner draws),
    with one FusedAdamW (``adamw`` keywords, no weight decay) per entry of ``model.optimizer_params()``;
    returns each step's outputs."""
    from fastgen.optim import FusedAdamW

    opts = {name: FusedAdamW(params, weight_decay=0.0, **adamw) for name, params in model.optimizer_params().items()}
    groups, n = groups or [list(data)], batch_size * getattr(model, "batches_per_step", 1)
    return [model.train_step(draw(data, groups, n, generator), opts, step, generator) for step in range(steps)]
