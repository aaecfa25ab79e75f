"""GAN: a DCGAN-style generator and discriminator with the non-saturating loss.

Shapes (defaults: 16x16 RGB images in [-1, 1], latent_dim 32, two levels)::

    z          (B, Z)             z ~ N(0, I)
    generator  linear -> (B, c0, S/2^L, S/2^L) -> [GN+SiLU -> upsample x2 -> conv3x3] per level
               -> GN+SiLU -> conv3x3 -> tanh -> x (B, C, S, S)
    discrim.   conv3x3 -> LeakyReLU(0.2) -> [conv4x4 stride 2 -> LeakyReLU(0.2)] per level
               -> flatten -> linear -> logit (B,)
               every conv / linear optionally wrapped in spectral normalisation (Miyato et al.)

Losses (Goodfellow et al. 2014, the non-saturating generator loss), with D the logit and
softplus(u) = log(1 + e^u)::

    L_D = E_x softplus(-D(x)) + E_z softplus(D(G(z)))       (= BCE, real 1 / fake 0)
    L_G = E_z softplus(-D(G(z)))                              (= -log sigmoid(D(G(z))))

The generator's GroupNorm+SiLU pairs are ``fastgen.ops.group_norm(..., activation="silu")``;
the discriminator has no normalisation layers (spectral norm is the option), so its gradient
penalties and statistics never mix samples of a batch. Train with two
``fastgen.optim.FusedAdamW`` (betas (0.5, 0.999), the DCGAN setting): :func:`train_gan`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastgen.zoo._common import (check_groups, check_images, norm_act, optimizer_step, statistics_distance,
                                 train_steps)


@dataclass
class GANConfig:
    image_size: int = 16            # side S (divisible by 2 ** levels, levels = len(g_channels))
    in_channels: int = 3            # image channels C
    latent_dim: int = 32            # Z
    g_channels: tuple = (64, 32)    # generator widths, coarse to fine (one upsampling per entry)
    d_channels: tuple = (32, 64)    # discriminator widths, fine to coarse (one stride-2 conv per entry)
    groups: int = 8                 # GroupNorm groups in the generator
    spectral_norm: bool = False     # spectral normalisation of every discriminator layer
    backend: str = "auto"           # fastgen ops backend

    def __post_init__(self):
        self.g_channels, self.d_channels = tuple(self.g_channels), tuple(self.d_channels)
        if not self.g_channels or not self.d_channels:
            raise ValueError("g_channels and d_channels need at least one entry each")
        for name, ch in (("g_channels", self.g_channels), ("d_channels", self.d_channels)):
            if self.image_size % (2 ** len(ch)):
                raise ValueError(f"image_size={self.image_size} must be divisible by 2 ** len({name}) = "
                                 f"{2 ** len(ch)}")
        check_groups(self.g_channels, self.groups)


class Generator(nn.Module):
    """z (B, Z) -> images (B, C, S, S) in (-1, 1). ``cond`` hooks let subclasses modulate features."""

    def __init__(self, cfg: GANConfig, in_dim: Optional[int] = None) -> None:
        super().__init__()
        ch, g = cfg.g_channels, cfg.groups
        self.side = cfg.image_size // 2 ** len(ch)
        self.fc = nn.Linear(in_dim or cfg.latent_dim, ch[0] * self.side * self.side)
        widths = ch + (ch[-1],)
        self.norms = nn.ModuleList(norm_act(widths[i], g, cfg.backend) for i in range(len(ch)))
        self.convs = nn.ModuleList(nn.Conv2d(widths[i], widths[i + 1], 3, padding=1) for i in range(len(ch)))
        self.norm_out = norm_act(ch[-1], g, cfg.backend)
        self.conv_out = nn.Conv2d(ch[-1], cfg.in_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.fc(z).view(z.shape[0], -1, self.side, self.side)
        for norm, conv in zip(self.norms, self.convs):
            h = conv(F.interpolate(norm(h), scale_factor=2.0, mode="nearest"))
        return torch.tanh(self.conv_out(self.norm_out(h)))


def _sn(module: nn.Module, on: bool) -> nn.Module:
    return nn.utils.parametrizations.spectral_norm(module) if on else module


class Discriminator(nn.Module):
    """images (B, C, S, S) -> features (B, F) -> logit (B,)."""

    def __init__(self, cfg: GANConfig, in_channels: Optional[int] = None) -> None:
        super().__init__()
        ch, sn = cfg.d_channels, cfg.spectral_norm
        self.conv_in = _sn(nn.Conv2d(in_channels or cfg.in_channels, ch[0], 3, padding=1), sn)
        widths = (ch[0],) + ch
        self.convs = nn.ModuleList(_sn(nn.Conv2d(widths[i], widths[i + 1], 4, 2, 1), sn) for i in range(len(ch)))
        side = cfg.image_size // 2 ** len(ch)
        self.feature_dim = ch[-1] * side * side
        self.fc = _sn(nn.Linear(self.feature_dim, 1), sn)

    def features(self, x: Tensor) -> Tensor:
        h = F.leaky_relu(self.conv_in(x), 0.2)
        for conv in self.convs:
            h = F.leaky_relu(conv(h), 0.2)
        return h.flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x)).squeeze(1)


class GANLosses(NamedTuple):
    loss: Tensor       # ()  the loss of the player being trained
    real_logits: Optional[Tensor]
    fake_logits: Tensor


class NoiseToImages:
    """What GAN and WGANGP share: ``self.generator`` maps latents z (B, latent_dim) to images
    (B, in_channels, image_size, image_size) of ``self.config``."""

    def check_input(self, x: Tensor) -> None:
        check_images(x, self.config.in_channels, self.config.image_size)

    def noise(self, n: int, generator: Optional[torch.Generator] = None) -> Tensor:
        p = next(self.generator.parameters())
        return torch.randn(n, self.config.latent_dim, generator=generator, device=p.device, dtype=p.dtype)

    def forward(self, z: Tensor) -> Tensor:
        """Images (B, C, S, S) from latents z (B, Z)."""
        if z.dim() != 2 or z.shape[1] != self.config.latent_dim:
            raise ValueError(f"z must have shape (B, {self.config.latent_dim}), got {tuple(z.shape)}")
        return self.generator(z)

    @torch.no_grad()
    def sample(self, n: int, generator: Optional[torch.Generator] = None) -> Tensor:
        return self(self.noise(n, generator))


class GAN(NoiseToImages, nn.Module):
    """``GAN(config)``: ``.generator``, ``.discriminator``, ``sample``, ``discriminator_loss``,
    ``generator_loss``, ``discriminator_accuracy``."""

    def __init__(self, config: Optional[GANConfig] = None, **overrides) -> None:
        super().__init__()
        config = dataclasses.replace(config, **overrides) if config is not None else GANConfig(**overrides)
        self.config = config
        self.generator = Generator(config)
        self.discriminator = Discriminator(config)

    def discriminator_loss(self, real: Tensor, z: Tensor) -> GANLosses:
        """L_D on a real batch and fakes from ``z`` (the generator is not differentiated)."""
        self.check_input(real)
        with torch.no_grad():
            fake = self(z)
        real_logits, fake_logits = self.discriminator(real), self.discriminator(fake)
        loss = F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()
        return GANLosses(loss, real_logits, fake_logits)

    def generator_loss(self, z: Tensor) -> GANLosses:
        """Non-saturating L_G = E softplus(-D(G(z)))."""
        fake_logits = self.discriminator(self(z))
        return GANLosses(F.softplus(-fake_logits).mean(), None, fake_logits)

    @torch.no_grad()
    def discriminator_accuracy(self, real: Tensor, z: Tensor) -> float:
        """Fraction of real images with logit > 0 and fakes with logit < 0, over both sets."""
        out = self.discriminator_loss(real, z)
        right = (out.real_logits > 0).sum() + (out.fake_logits < 0).sum()
        return right.item() / (out.real_logits.numel() + out.fake_logits.numel())

    # ------------------------------------------------------------------ the fastgen train protocol
    def optimizer_params(self) -> dict:
        """One optimizer per player: {"d": discriminator parameters, "g": generator parameters}."""
        return {"d": list(self.discriminator.parameters()), "g": list(self.generator.parameters())}

    def train_step(self, batch: dict, optimizers: dict, step: int,
                   generator: Optional[torch.Generator] = None) -> dict:
        """One discriminator step, then one generator step, on ``batch["x"]`` (B, C, S, S) with
        fresh noise from ``generator``; returns {"loss_d", "loss_g", "d_accuracy"} (the accuracy
        on this step's real and fake logits)."""
        real = batch["x"]
        d = self.discriminator_loss(real, self.noise(real.shape[0], generator))
        optimizer_step(optimizers["d"], d.loss)
        gl = self.generator_loss(self.noise(real.shape[0], generator))
        optimizer_step(optimizers["g"], gl.loss)
        acc = ((d.real_logits > 0).float().mean() + (d.fake_logits < 0).float().mean()).item() / 2
        return {"loss_d": d.loss.item(), "loss_g": gl.loss.item(), "d_accuracy": acc}

    @torch.no_grad()
    def measure(self, test: dict, generator: Optional[torch.Generator] = None, samples: int = 256,
                sampling_steps: int = 0) -> dict:
        """What the training test asserts: ``stat_distance`` = ||image_statistics(samples) -
        image_statistics(test images)|| (falls as G learns) and ``d_accuracy`` on held-out real
        images against fresh fakes (``sampling_steps`` is unused: one generator pass)."""
        x = test["x"]
        dist = statistics_distance(self.sample(samples, generator), x, image_statistics)
        n = min(samples, x.shape[0])
        return {"stat_distance": dist, "d_accuracy": self.discriminator_accuracy(x[:n], self.noise(n, generator))}


def train_gan(model: GAN, data: Tensor, steps: int, batch_size: int = 64, lr: float = 2e-4,
              betas=(0.5, 0.999), seed: int = 0) -> list[tuple[float, float, float]]:
    """Alternate one discriminator and one generator FusedAdamW step (:meth:`GAN.train_step`);
    returns per step (L_D, L_G, discriminator accuracy on that step's batch)."""
    g = torch.Generator(device=data.device).manual_seed(seed)
    model.train()
    return [(out["loss_d"], out["loss_g"], out["d_accuracy"])
            for out in train_steps(model, {"x": data}, steps, batch_size, g, lr=lr, betas=betas)]


def image_statistics(x: Tensor) -> Tensor:
    """A small summary of an image batch (B, C, S, S), used to compare samples with data:
    per-channel mean (C), per-channel std (C), fraction of saturated pixels |v| > 0.8 (1)."""
    x = x.float()
    return torch.cat([x.mean((0, 2, 3)), x.std((0, 2, 3)), (x.abs() > 0.8).float().mean().view(1)])
