"""ConditionalGAN: class-conditional generator (AdaGN) and projection discriminator.

Shapes (defaults: 16x16 RGB images, 9 classes)::

    z, y         (B, Z), (B,) int64 in [0, num_classes)
    generator    linear(z) -> (B, c0, S/2^L, S/2^L) -> per level:
                     h = GN(h) * (1 + gamma_l(y)) + beta_l(y)      AdaGN: class-conditional affine
                     h = conv3x3(upsample x2(SiLU(h)))
                 -> AdaGN -> SiLU -> conv3x3 -> tanh -> x (B, C, S, S)
    discriminator  phi(x) (B, F) = the DCGAN discriminator's features (fastgen.zoo.gan)
                   D(x, y) = w . phi(x) + b + <E[y], phi(x)>              projection (Miyato & Koyama)

gamma_l, beta_l are embedding tables (num_classes, c_l), zero-initialised, so the untrained
generator ignores the label. GN is ``fastgen.ops.group_norm`` without affine (the affine is per
sample here, so the SiLU cannot be fused into the norm call). Losses: the non-saturating GAN
losses of fastgen.zoo.gan with D(x, y) on real pairs and on fakes with their sampled labels.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastgen.ops import group_norm
from fastgen.zoo._common import check_images, optimizer_step, train_steps
from fastgen.zoo.gan import Discriminator, GANConfig, GANLosses


@dataclass
class ConditionalGANConfig(GANConfig):
    num_classes: int = 9            # labels 0 .. num_classes - 1

    def __post_init__(self):
        super().__post_init__()
        if self.num_classes < 1:
            raise ValueError("num_classes must be >= 1")


class AdaGN(nn.Module):
    """GroupNorm whose scale and shift come from the class label: (B, C, H, W), (B,) -> (B, C, H, W)."""

    def __init__(self, channels: int, groups: int, num_classes: int, backend: str) -> None:
        super().__init__()
        self.groups, self.backend = groups, backend
        self.gamma = nn.Embedding(num_classes, channels)
        self.beta = nn.Embedding(num_classes, channels)
        nn.init.zeros_(self.gamma.weight)
        nn.init.zeros_(self.beta.weight)

    def forward(self, h: Tensor, y: Tensor) -> Tensor:
        h = group_norm(h, self.groups, backend=self.backend)
        return h * (1 + self.gamma(y)[:, :, None, None]) + self.beta(y)[:, :, None, None]


class ConditionalGenerator(nn.Module):
    def __init__(self, cfg: ConditionalGANConfig) -> None:
        super().__init__()
        ch = cfg.g_channels
        self.side = cfg.image_size // 2 ** len(ch)
        self.fc = nn.Linear(cfg.latent_dim, ch[0] * self.side * self.side)
        widths = ch + (ch[-1],)
        self.norms = nn.ModuleList(AdaGN(widths[i], cfg.groups, cfg.num_classes, cfg.backend) for i in range(len(ch)))
        self.convs = nn.ModuleList(nn.Conv2d(widths[i], widths[i + 1], 3, padding=1) for i in range(len(ch)))
        self.norm_out = AdaGN(ch[-1], cfg.groups, cfg.num_classes, cfg.backend)
        self.conv_out = nn.Conv2d(ch[-1], cfg.in_channels, 3, padding=1)

    def forward(self, z: Tensor, y: Tensor) -> Tensor:
        h = self.fc(z).view(z.shape[0], -1, self.side, self.side)
        for norm, conv in zip(self.norms, self.convs):
            h = conv(F.interpolate(F.silu(norm(h, y)), scale_factor=2.0, mode="nearest"))
        return torch.tanh(self.conv_out(F.silu(self.norm_out(h, y))))


class ProjectionDiscriminator(nn.Module):
    def __init__(self, cfg: ConditionalGANConfig) -> None:
        super().__init__()
        self.body = Discriminator(cfg)
        self.embed = nn.Embedding(cfg.num_classes, self.body.feature_dim)
        nn.init.normal_(self.embed.weight, std=0.02)
        if cfg.spectral_norm:
            self.embed = nn.utils.parametrizations.spectral_norm(self.embed)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        phi = self.body.features(x)
        return self.body.fc(phi).squeeze(1) + (self.embed(y) * phi).sum(1)


class ConditionalGAN(nn.Module):
    def __init__(self, config: Optional[ConditionalGANConfig] = None, **overrides) -> None:
        super().__init__()
        config = (dataclasses.replace(config, **overrides) if config is not None
                  else ConditionalGANConfig(**overrides))
        self.config = config
        self.generator = ConditionalGenerator(config)
        self.discriminator = ProjectionDiscriminator(config)

    def _check_labels(self, y: Tensor, n: int) -> None:
        if not isinstance(y, Tensor) or y.shape != (n,) or y.dtype != torch.long:
            got = (tuple(y.shape), y.dtype) if isinstance(y, Tensor) else type(y).__name__
            raise ValueError(f"labels must be an int64 tensor of shape ({n},), got {got}")
        if n and (int(y.min()) < 0 or int(y.max()) >= self.config.num_classes):
            raise ValueError(f"labels must lie in [0, {self.config.num_classes}), got "
                             f"[{int(y.min())}, {int(y.max())}]")

    def noise(self, n: int, generator: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor]:
        """(z (n, Z), labels (n,)) with uniform labels."""
        p = next(self.generator.parameters())
        z = torch.randn(n, self.config.latent_dim, generator=generator, device=p.device, dtype=p.dtype)
        y = torch.randint(0, self.config.num_classes, (n,), generator=generator, device=p.device)
        return z, y

    def forward(self, z: Tensor, y: Tensor) -> Tensor:
        if z.dim() != 2 or z.shape[1] != self.config.latent_dim:
            raise ValueError(f"z must have shape (B, {self.config.latent_dim}), got {tuple(z.shape)}")
        self._check_labels(y, z.shape[0])
        return self.generator(z, y)

    @torch.no_grad()
    def sample(self, labels: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        """One image per label: (n, C, S, S)."""
        z, _ = self.noise(labels.shape[0], generator)
        return self(z, labels)

    def discriminator_loss(self, real: Tensor, real_y: Tensor, z: Tensor, fake_y: Tensor) -> GANLosses:
        check_images(real, self.config.in_channels, self.config.image_size)
        self._check_labels(real_y, real.shape[0])
        with torch.no_grad():
            fake = self(z, fake_y)
        rl, fl = self.discriminator(real, real_y), self.discriminator(fake, fake_y)
        return GANLosses(F.softplus(-rl).mean() + F.softplus(fl).mean(), rl, fl)

    def generator_loss(self, z: Tensor, y: Tensor) -> GANLosses:
        fl = self.discriminator(self(z, y), y)
        return GANLosses(F.softplus(-fl).mean(), None, fl)

    # ------------------------------------------------------------------ the fastgen train protocol
    def optimizer_params(self) -> dict:
        """{"d": discriminator parameters, "g": generator parameters}."""
        return {"d": list(self.discriminator.parameters()), "g": list(self.generator.parameters())}

    def train_step(self, batch: dict, optimizers: dict, step: int,
                   generator: Optional[torch.Generator] = None) -> dict:
        """One D step on the real pairs (``batch["x"]`` (B, C, S, S), ``batch["y"]`` (B,)) against
        fakes of uniform labels, then one G step; returns {"loss_d", "loss_g"}."""
        n = batch["x"].shape[0]
        d = self.discriminator_loss(batch["x"], batch["y"], *self.noise(n, generator))
        optimizer_step(optimizers["d"], d.loss)
        gl = self.generator_loss(*self.noise(n, generator))
        optimizer_step(optimizers["g"], gl.loss)
        return {"loss_d": d.loss.item(), "loss_g": gl.loss.item()}

    @torch.no_grad()
    def measure(self, test: dict, generator: Optional[torch.Generator] = None, samples: int = 256,
                sampling_steps: int = 0) -> dict:
        """What the training test asserts, on ``samples // num_classes`` samples per class:
        ``colour_accuracy`` (dominant colour of a sample = its class colour, label % 3; chance 1/3)
        and the foreground area per shape (``area_square``, ``area_disc``, ``area_triangle``) next
        to the held-out data's (``data_area_*``). Labels as in fastgen.zoo.data.shapes."""
        c = self.config.num_classes
        y = torch.arange(c, device=test["x"].device).repeat_interleave(max(1, samples // c))
        s = self.sample(y, generator)
        out = {"colour_accuracy": (dominant_colour(s) == y % 3).float().mean().item()}
        for name, imgs, lab in (("area", s, y), ("data_area", test["x"], test["y"])):
            area = (imgs.max(1).values > 0).float().flatten(1).mean(1)
            for k, shape in enumerate(("square", "disc", "triangle")):
                sel = lab // 3 == k
                out[f"{name}_{shape}"] = area[sel].mean().item() if sel.any() else float("nan")
        return out


def train_cgan(model: ConditionalGAN, data: Tensor, labels: Tensor, steps: int, batch_size: int = 64,
               lr: float = 1e-3, betas=(0.5, 0.999), seed: int = 0) -> list[tuple[float, float]]:
    """Alternating FusedAdamW steps (:meth:`ConditionalGAN.train_step`); returns (L_D, L_G) per step."""
    g = torch.Generator(device=data.device).manual_seed(seed)
    return [(out["loss_d"], out["loss_g"])
            for out in train_steps(model, {"x": data, "y": labels}, steps, batch_size, g, lr=lr, betas=betas)]


def dominant_colour(images: Tensor) -> Tensor:
    """(B,) index of the RGB channel with the largest mean over the foreground pixels (any channel
    > 0); the class colour of a shapes image (0 red, 1 green, 2 blue)."""
    fg = (images.max(1, keepdim=True).values > 0).float()
    mean = (images * fg).sum((2, 3)) / fg.sum((2, 3)).clamp_min(1)
    return mean.argmax(1)
