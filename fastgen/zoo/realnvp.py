"""RealNVP: a normalizing flow of affine coupling layers, exact log-likelihood and exact sampling.

Affine coupling with a binary mask m (1 = passes through, conditions the rest)::

    y = m * x + (1 - m) * (x * exp(s(m * x)) + t(m * x))        s = scale * tanh(s_raw)
    log |det dy/dx| = sum over (1 - m) of s                       (the Jacobian is triangular)
    x = m * y + (1 - m) * (y - t(m * y)) * exp(-s(m * y))         (exact inverse)

Masks: vectors (B, D) alternate even / odd features; images (B, C, H, W) use checkerboard masks
(pixel parity) and, after a squeeze (C, H, W) -> (4C, H/2, W/2), channel masks (first / second
half of the channels). Multi-scale (Dinh et al. 2017): each scale but the last runs 3
checkerboard couplings, a squeeze, 3 channel couplings, then factors out half the channels
straight to the latent; the last scale runs 4 checkerboard couplings. The latent z is the
concatenation of every factored-out part, flattened: (B, prod(data_shape)).

    log p(x) = sum_i log N(z_i; 0, 1) + sum_couplings log|det|            (nats, per sample)

The s, t networks: vectors, an MLP Linear -> RMSNorm -> SiLU (twice) -> Linear; images,
conv3x3 -> GN+SiLU -> conv3x3 -> GN+SiLU -> conv3x3 (fastgen.nn.RMSNorm and the fused
fastgen.ops.group_norm(..., activation="silu")). Each net's last layer starts at zero, so the
untrained flow is the identity. No normalisation mixes samples, so per-sample Jacobians are exact.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from fastgen.nn import RMSNorm
from fastgen.zoo._common import check_groups, norm_act, optimizer_step, train_steps


@dataclass
class RealNVPConfig:
    data_shape: tuple = (2,)        # (D,) for vectors or (C, H, W) for images (H, W divisible by 2^(scales-1))
    num_couplings: int = 8          # vectors: coupling layers (masks alternate)
    num_scales: int = 2             # images: scales of the multi-scale architecture
    hidden: int = 64                # width of the s/t networks (MLP units or conv channels)
    groups: int = 8                 # images: GroupNorm groups in the s/t networks
    scale_bound: float = 2.0        # |s| <= scale_bound (s = scale_bound * tanh(raw)) for stability
    backend: str = "auto"           # fastgen ops backend

    def __post_init__(self):
        self.data_shape = tuple(int(d) for d in self.data_shape)
        if len(self.data_shape) == 1:
            if self.data_shape[0] < 2 or self.num_couplings < 1:
                raise ValueError("vector data needs at least 2 features and 1 coupling")
        elif len(self.data_shape) == 3:
            _, h, w = self.data_shape
            f = 2 ** (self.num_scales - 1)
            if self.num_scales < 1 or h % f or w % f:
                raise ValueError(f"image side {h}x{w} must be divisible by 2 ** (num_scales - 1) = {f}")
            check_groups((self.hidden,), self.groups)
        else:
            raise ValueError(f"data_shape must be (D,) or (C, H, W), got {self.data_shape}")


class _MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, backend: str) -> None:
        super().__init__()
        self.fc1, self.n1 = nn.Linear(dim, hidden), RMSNorm(hidden, backend=backend)
        self.fc2, self.n2 = nn.Linear(hidden, hidden), RMSNorm(hidden, backend=backend)
        self.out = nn.Linear(hidden, 2 * dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.nn.functional.silu(self.n1(self.fc1(x)))
        h = torch.nn.functional.silu(self.n2(self.fc2(h)))
        return self.out(h)


class _ConvNet(nn.Module):
    def __init__(self, channels: int, hidden: int, groups: int, backend: str) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(channels, hidden, 3, padding=1), norm_act(hidden, groups, backend),
                                 nn.Conv2d(hidden, hidden, 3, padding=1), norm_act(hidden, groups, backend),
                                 nn.Conv2d(hidden, 2 * channels, 3, padding=1))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class AffineCoupling(nn.Module):
    """One coupling layer with a fixed mask (broadcast against the input's per-sample shape)."""

    def __init__(self, mask: Tensor, net: nn.Module, scale_bound: float) -> None:
        super().__init__()
        self.register_buffer("mask", mask)
        self.net = net
        self.scale_bound = scale_bound

    def _st(self, x_cond: Tensor) -> tuple[Tensor, Tensor]:
        s, t = self.net(x_cond).chunk(2, dim=1)
        inv = 1 - self.mask
        return self.scale_bound * torch.tanh(s) * inv, t * inv

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x -> (y, log|det dy/dx|) with log-det of shape (B,)."""
        s, t = self._st(x * self.mask)
        y = x * self.mask + (1 - self.mask) * (x * torch.exp(s) + t)
        return y, s.flatten(1).sum(1)

    def inverse(self, y: Tensor) -> Tensor:
        s, t = self._st(y * self.mask)
        return y * self.mask + (1 - self.mask) * (y - t) * torch.exp(-s)


def checkerboard(h: int, w: int, parity: int) -> Tensor:
    """(1, h, w) mask, 1 where (i + j) % 2 == parity."""
    i, j = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return ((i + j) % 2 == parity).float().unsqueeze(0)


def channel_mask(c: int, first: bool) -> Tensor:
    """(c, 1, 1) mask, 1 on the first (or second) half of the channels."""
    m = torch.zeros(c, 1, 1)
    m[: c // 2] = 1.0
    return m if first else 1 - m


def squeeze(x: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, 4C, H/2, W/2): each 2x2 patch becomes 4 channels."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, 4 * c, h // 2, w // 2)


def unsqueeze(x: Tensor) -> Tensor:
    b, c, h, w = x.shape
    return x.view(b, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c // 4, 2 * h, 2 * w)


class RealNVP(nn.Module):
    """``log_prob(x)`` (B,) nats, ``forward(x) -> (z, logdet)``, ``inverse(z)``, ``sample(n)``."""

    def __init__(self, config: Optional[RealNVPConfig] = None, **overrides) -> None:
        super().__init__()
        config = dataclasses.replace(config, **overrides) if config is not None else RealNVPConfig(**overrides)
        self.config = config
        cfg = config
        self.dim = math.prod(cfg.data_shape)
        if len(cfg.data_shape) == 1:
            d = cfg.data_shape[0]
            even = (torch.arange(d) % 2 == 0).float()
            self.couplings = nn.ModuleList(
                AffineCoupling(even if i % 2 == 0 else 1 - even, _MLP(d, cfg.hidden, cfg.backend), cfg.scale_bound)
                for i in range(cfg.num_couplings))
            return
        # images: per scale, checkerboard couplings [, squeeze, channel couplings, split]
        c, h, w = cfg.data_shape
        self.scales = nn.ModuleList()
        self.split_sizes: list[int] = []
        for k in range(cfg.num_scales):
            last = k == cfg.num_scales - 1
            scale = nn.Module()
            scale.checker = nn.ModuleList(
                AffineCoupling(checkerboard(h, w, i % 2), _ConvNet(c, cfg.hidden, cfg.groups, cfg.backend),
                               cfg.scale_bound) for i in range(4 if last else 3))
            if last:
                self.split_sizes.append(c * h * w)
            else:
                c, h, w = 4 * c, h // 2, w // 2
                scale.channel = nn.ModuleList(
                    AffineCoupling(channel_mask(c, i % 2 == 0), _ConvNet(c, cfg.hidden, cfg.groups, cfg.backend),
                                   cfg.scale_bound) for i in range(3))
                self.split_sizes.append((c // 2) * h * w)
                c = c // 2
            self.scales.append(scale)

    def check_input(self, x: Tensor) -> None:
        shape = self.config.data_shape
        if not isinstance(x, Tensor) or x.dim() != len(shape) + 1 or tuple(x.shape[1:]) != shape:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x must have shape (B, {', '.join(map(str, shape))}) (config.data_shape), got {got}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x (B, *data_shape) -> latent z (B, prod(data_shape)) and log|det dz/dx| (B,)."""
        self.check_input(x)
        logdet = x.new_zeros(x.shape[0])
        if len(self.config.data_shape) == 1:
            for layer in self.couplings:
                x, ld = layer(x)
                logdet = logdet + ld
            return x, logdet
        zs, h = [], x
        for scale in self.scales:
            for layer in scale.checker:
                h, ld = layer(h)
                logdet = logdet + ld
            if not hasattr(scale, "channel"):
                zs.append(h.flatten(1))
                break
            h = squeeze(h)
            for layer in scale.channel:
                h, ld = layer(h)
                logdet = logdet + ld
            half = h.shape[1] // 2
            zs.append(h[:, :half].flatten(1))
            h = h[:, half:]
        return torch.cat(zs, 1), logdet

    def inverse(self, z: Tensor) -> Tensor:
        """Latent z (B, prod(data_shape)) -> x (B, *data_shape), the exact inverse of ``forward``."""
        if z.dim() != 2 or z.shape[1] != self.dim:
            raise ValueError(f"z must have shape (B, {self.dim}), got {tuple(z.shape)}")
        if len(self.config.data_shape) == 1:
            for layer in reversed(self.couplings):
                z = layer.inverse(z)
            return z
        parts = list(torch.split(z, self.split_sizes, dim=1))
        c, h, w = self.config.data_shape
        shapes = []  # per scale: shape entering it
        for k in range(len(self.scales)):
            shapes.append((c, h, w))
            c, h, w = 2 * c, h // 2, w // 2
        b = z.shape[0]
        x = None
        for k in reversed(range(len(self.scales))):
            scale, (c, h, w) = self.scales[k], shapes[k]
            if hasattr(scale, "channel"):
                factored = parts[k].view(b, 2 * c, h // 2, w // 2)
                y = torch.cat([factored, x], 1)
                for layer in reversed(scale.channel):
                    y = layer.inverse(y)
                x = unsqueeze(y)
            else:
                x = parts[k].view(b, c, h, w)
            for layer in reversed(scale.checker):
                x = layer.inverse(x)
        return x

    def log_prob(self, x: Tensor) -> Tensor:
        """Exact log-density (B,) in nats under the standard-normal base distribution."""
        z, logdet = self(x)
        base = -0.5 * (z.pow(2).sum(1) + self.dim * math.log(2 * math.pi))
        return base + logdet

    def nll(self, x: Tensor) -> Tensor:
        """Mean negative log-likelihood in nats per sample (the training loss)."""
        return -self.log_prob(x).mean()

    @torch.no_grad()
    def sample(self, n: int, generator: Optional[torch.Generator] = None, temperature: float = 1.0) -> Tensor:
        p = next(self.parameters())
        z = torch.randn(n, self.dim, generator=generator, device=p.device, dtype=p.dtype) * temperature
        return self.inverse(z)

    # ------------------------------------------------------------------ the fastgen train protocol
    def optimizer_params(self) -> dict:
        """One optimizer: {"model": every parameter}."""
        return {"model": list(self.parameters())}

    def train_step(self, batch: dict, optimizers: dict, step: int,
                   generator: Optional[torch.Generator] = None) -> dict:
        """One maximum-likelihood step on ``batch["x"]`` (B, *data_shape); returns {"nll"} (nats per sample)."""
        loss = self.nll(batch["x"])
        optimizer_step(optimizers["model"], loss)
        return {"nll": loss.item()}

    @torch.no_grad()
    def measure(self, test: dict, generator: Optional[torch.Generator] = None, samples: int = 256,
                sampling_steps: int = 0) -> dict:
        """What the training test asserts: the held-out ``nll`` (nats per sample, all test points)
        and ``gaussian_nll``, the NLL of the best full-covariance Gaussian fitted to those same
        points (a lower bound for any Gaussian there: a flow below it has learned a non-Gaussian
        density). ``samples``, ``sampling_steps`` are unused."""
        x = test["x"].flatten(1).double()
        cov = torch.cov(x.T) + 1e-6 * torch.eye(x.shape[1], dtype=x.dtype, device=x.device)
        gauss = -torch.distributions.MultivariateNormal(x.mean(0), cov).log_prob(x).mean().item()
        return {"nll": self.nll(test["x"]).item(), "gaussian_nll": gauss}


def train_flow(model: RealNVP, data: Tensor, steps: int, batch_size: int = 256, lr: float = 3e-3,
               seed: int = 0) -> list[float]:
    """Maximum likelihood with FusedAdamW (fixed seed, :meth:`RealNVP.train_step`); returns the NLL per step."""
    g = torch.Generator(device=data.device).manual_seed(seed)
    return [out["nll"] for out in train_steps(model, {"x": data}, steps, batch_size, g, lr=lr)]
