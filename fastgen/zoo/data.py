"""Generated datasets for the zoo's tests and examples (no downloads).

``shapes(n, generator=)``  16x16 RGB images of one coloured shape on a black background::

    images  (n, 3, 16, 16) float32 in [-1, 1]   background -1, shape pixels at its colour
    labels  (n,)           int64 in [0, 9)       label = 3 * shape + colour
            shape  0 square | 1 disc | 2 triangle;  colour 0 red | 1 green | 2 blue

  The shape's centre and size are jittered (centre 6..9, half-size 3..5 pixels), so a class is
  a distribution, not a single image. ``colour_swap(images)`` maps red -> green (the CycleGAN
  domains: ``colour_domain(n, 0)`` red shapes vs ``colour_domain(n, 1)`` green shapes).

``two_moons(n, noise=0.05, generator=)``  (n, 2): two interleaved half circles, standardised by
  the fixed affine map ``(x - (0.5, 0.25)) / (0.87, 0.5)`` so it has about zero mean, unit scale.

``gaussian_mixture(n, generator=)``  (n, 2): 8 isotropic Gaussians (std 0.1) on a circle of
  radius 2, equal weights; ``GMM_MEAN`` (0, 0) and ``GMM_COV`` (2.01 I) are its exact moments.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

SHAPES = ("square", "disc", "triangle")
COLOURS = ("red", "green", "blue")
NUM_CLASSES = len(SHAPES) * len(COLOURS)
_RGB = torch.tensor([[1.0, -1.0, -1.0], [-1.0, 1.0, -1.0], [-1.0, -1.0, 1.0]])

GMM_MODES = 8
GMM_RADIUS = 2.0
GMM_STD = 0.1
GMM_MEAN = torch.zeros(2)
GMM_COV = torch.eye(2) * (GMM_RADIUS ** 2 / 2 + GMM_STD ** 2)


def shape_masks(shape: Tensor, cy: Tensor, cx: Tensor, r: Tensor, size: int = 16) -> Tensor:
    """(n, size, size) bool masks of the given shapes, centres and half-sizes (all (n,) tensors)."""
    yy = torch.arange(size, dtype=torch.float32).view(1, size, 1)
    xx = torch.arange(size, dtype=torch.float32).view(1, 1, size)
    dy, dx = yy - cy.view(-1, 1, 1), xx - cx.view(-1, 1, 1)
    r = r.view(-1, 1, 1)
    square = (dy.abs() <= r) & (dx.abs() <= r)
    disc = dy ** 2 + dx ** 2 <= r ** 2 + 0.5
    # isosceles triangle, apex up: rows from -r to r, half-width grows linearly from 0 to r
    triangle = (dy >= -r) & (dy <= r) & (dx.abs() <= (dy + r) / 2)
    s = shape.view(-1, 1, 1)
    return torch.where(s == 0, square, torch.where(s == 1, disc, triangle))


def shapes(n: int, generator: Optional[torch.Generator] = None, size: int = 16,
           labels: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """``n`` images (n, 3, size, size) in [-1, 1] and their labels (n,); see the module docstring.

    ``labels`` (n,) int64 in [0, 9) fixes the classes (else uniform)."""
    if labels is None:
        labels = torch.randint(0, NUM_CLASSES, (n,), generator=generator)
    elif labels.shape != (n,) or labels.min() < 0 or labels.max() >= NUM_CLASSES:
        raise ValueError(f"labels must be ({n},) in [0, {NUM_CLASSES}), got {tuple(labels.shape)}")
    shape, colour = labels // 3, labels % 3
    c = size / 16
    cy = (6 + torch.randint(0, 4, (n,), generator=generator)).float() * c
    cx = (6 + torch.randint(0, 4, (n,), generator=generator)).float() * c
    r = (3 + torch.randint(0, 3, (n,), generator=generator)).float() * c
    mask = shape_masks(shape, cy, cx, r, size).unsqueeze(1)               # (n, 1, S, S)
    rgb = _RGB[colour].view(n, 3, 1, 1)
    return torch.where(mask, rgb, torch.full_like(rgb, -1.0)).float(), labels


def colour_domain(n: int, colour: int, generator: Optional[torch.Generator] = None, size: int = 16) -> Tensor:
    """``n`` images (n, 3, size, size) of shapes of one colour (0 red, 1 green, 2 blue), uniform
    shapes: the CycleGAN domains (red shapes = A, green shapes = B, ``colour_swap`` maps one to
    the other)."""
    if colour not in range(len(COLOURS)):
        raise ValueError(f"colour must be 0, 1 or 2 ({', '.join(COLOURS)}), got {colour}")
    labels = 3 * torch.randint(0, len(SHAPES), (n,), generator=generator) + colour
    return shapes(n, generator, size, labels=labels)[0]


def colour_swap(images: Tensor) -> Tensor:
    """Swap the red and green channels (the CycleGAN pair: red shapes <-> green shapes)."""
    return images[:, [1, 0, 2]]


def two_moons(n: int, noise: float = 0.05, generator: Optional[torch.Generator] = None) -> Tensor:
    """(n, 2) float32 samples of the standardised two-moons distribution (module docstring)."""
    upper = torch.rand(n, generator=generator) < 0.5
    t = torch.rand(n, generator=generator) * math.pi
    x = torch.where(upper, torch.cos(t), 1 - torch.cos(t))
    y = torch.where(upper, torch.sin(t), 0.5 - torch.sin(t))
    pts = torch.stack([x, y], 1) + noise * torch.randn(n, 2, generator=generator)
    return (pts - torch.tensor([0.5, 0.25])) / torch.tensor([0.87, 0.5])


def gaussian_mixture(n: int, generator: Optional[torch.Generator] = None) -> Tensor:
    """(n, 2) float32 samples of the 8-mode ring mixture (module docstring)."""
    k = torch.randint(0, GMM_MODES, (n,), generator=generator).float()
    ang = 2 * math.pi * k / GMM_MODES
    centres = GMM_RADIUS * torch.stack([torch.cos(ang), torch.sin(ang)], 1)
    return centres + GMM_STD * torch.randn(n, 2, generator=generator)
