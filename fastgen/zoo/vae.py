"""VAE and beta-VAE: a convolutional Gaussian-latent autoencoder trained on the (beta-)ELBO.

Shapes (defaults: 16x16 RGB images, channels (32, 64), latent_dim 16)::

    x        (B, C, S, S)            images, e.g. in [-1, 1]
    encoder  conv3x3 -> [GN+SiLU -> conv3x3 stride 2] per level -> GN+SiLU -> flatten -> linear
             -> (mu, logvar)  (B, D) each
    z        mu + exp(logvar / 2) * eps,  eps ~ N(0, I)           (B, D)   reparametrisation
    decoder  linear -> (B, c_last, S/2^L, S/2^L) -> [GN+SiLU -> upsample x2 -> conv3x3] per level
             -> GN+SiLU -> conv3x3 -> x_hat (B, C, S, S)   the mean of p(x | z)

Loss per image (nats), with a Gaussian decoder of fixed std sigma (``recon_std``)::

    recon = ||x - x_hat||^2 / (2 sigma^2)                 (= -log p(x|z) up to a constant)
    KL    = 1/2 sum_d (mu_d^2 + exp(logvar_d) - 1 - logvar_d)    (= KL(q(z|x) || N(0, I)))
    loss  = mean_B(recon + beta_t KL),   beta_t = beta * min(1, (step + 1) / kl_anneal_steps)

beta = 1 is the ELBO (VAE); beta > 1 is the beta-VAE (Higgins et al.), which pays more for
information in z: lower KL (rate), higher reconstruction error (distortion). The GroupNorm+SiLU
pairs run as one ``fastgen.ops.group_norm(..., activation="silu")`` each; train with
``fastgen.optim.FusedAdamW``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
from torch import Tensor, nn

from fastgen.zoo._common import check_groups, check_images, norm_act, optimizer_step, train_steps


@dataclass
class VAEConfig:
    image_size: int = 16            # side S of the square input (divisible by 2 ** len(channels))
    in_channels: int = 3            # image channels C
    channels: tuple = (32, 64)      # conv widths per level; each level halves the side
    latent_dim: int = 16            # D
    groups: int = 8                 # GroupNorm groups (divides every width)
    beta: float = 1.0               # weight of the KL term (1 = ELBO)
    kl_anneal_steps: int = 0        # beta ramps linearly from beta/N to beta over N steps; 0 = off
    recon_std: float = 0.2          # sigma of the Gaussian decoder p(x|z) = N(x_hat, sigma^2 I)
    backend: str = "auto"           # fastgen ops backend

    def __post_init__(self):
        self.channels = tuple(self.channels)
        if not self.channels:
            raise ValueError("channels must name at least one level")
        if self.image_size % (2 ** len(self.channels)):
            raise ValueError(f"image_size={self.image_size} must be divisible by 2 ** len(channels) = "
                             f"{2 ** len(self.channels)}")
        check_groups(self.channels, self.groups)
        if self.beta < 0 or self.recon_std <= 0 or self.latent_dim < 1 or self.kl_anneal_steps < 0:
            raise ValueError("need beta >= 0, recon_std > 0, latent_dim >= 1, kl_anneal_steps >= 0")


class VAEOutput(NamedTuple):
    loss: Tensor       # ()       mean over the batch of recon + beta_t * KL
    recon: Tensor      # ()       mean per-image reconstruction NLL, nats (||x - x_hat||^2 / 2 sigma^2)
    kl: Tensor         # ()       mean per-image KL(q(z|x) || p(z)), nats
    mse: Tensor        # ()       mean per-pixel squared error
    x_hat: Tensor      # (B, C, S, S)
    mu: Tensor         # (B, D)
    logvar: Tensor     # (B, D)


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        ch, g = cfg.channels, cfg.groups
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        widths = (ch[0],) + ch
        self.down = nn.ModuleList(
            nn.Sequential(norm_act(widths[i], g, cfg.backend), nn.Conv2d(widths[i], widths[i + 1], 3, 2, 1))
            for i in range(len(ch)))
        self.norm_out = norm_act(ch[-1], g, cfg.backend)
        side = cfg.image_size // 2 ** len(ch)
        self.to_stats = nn.Linear(ch[-1] * side * side, 2 * cfg.latent_dim)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.conv_in(x)
        for block in self.down:
            h = block(h)
        mu, logvar = self.to_stats(self.norm_out(h).flatten(1)).chunk(2, dim=1)
        return mu, logvar.clamp(-30.0, 20.0)


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        ch, g = cfg.channels[::-1], cfg.groups
        self.side = cfg.image_size // 2 ** len(ch)
        self.from_latent = nn.Linear(cfg.latent_dim, ch[0] * self.side * self.side)
        widths = ch + (ch[-1],)
        self.up = nn.ModuleList(
            nn.Sequential(norm_act(widths[i], g, cfg.backend), nn.Upsample(scale_factor=2, mode="nearest"),
                          nn.Conv2d(widths[i], widths[i + 1], 3, padding=1))
            for i in range(len(ch)))
        self.norm_out = norm_act(ch[-1], g, cfg.backend)
        self.conv_out = nn.Conv2d(ch[-1], cfg.in_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.from_latent(z).view(z.shape[0], -1, self.side, self.side)
        for block in self.up:
            h = block(h)
        return self.conv_out(self.norm_out(h))


class VAE(nn.Module):
    """Gaussian VAE: ``model(x)`` returns a :class:`VAEOutput` (loss, recon, kl, mse, x_hat, mu, logvar)."""

    default_beta = 1.0

    def __init__(self, config: Optional[VAEConfig] = None, **overrides) -> None:
        super().__init__()
        if config is None:
            overrides.setdefault("beta", self.default_beta)
            config = VAEConfig(**overrides)
        elif overrides:
            config = dataclasses.replace(config, **overrides)
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)

    def check_input(self, x: Tensor) -> None:
        check_images(x, self.config.in_channels, self.config.image_size)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(mu, logvar), each (B, D), of q(z | x)."""
        self.check_input(x)
        return self.encoder(x)

    def decode(self, z: Tensor) -> Tensor:
        """x_hat (B, C, S, S), the mean of p(x | z), from z (B, D)."""
        if z.dim() != 2 or z.shape[1] != self.config.latent_dim:
            raise ValueError(f"z must have shape (B, {self.config.latent_dim}), got {tuple(z.shape)}")
        return self.decoder(z)

    def beta_at(self, step: Optional[int]) -> float:
        """The KL weight at optimizer step ``step`` (linear annealing; ``None`` = fully annealed)."""
        c = self.config
        if step is None or c.kl_anneal_steps == 0:
            return c.beta
        return c.beta * min(1.0, (step + 1) / c.kl_anneal_steps)

    def forward(self, x: Tensor, step: Optional[int] = None, generator: Optional[torch.Generator] = None,
                sample_posterior: bool = True) -> VAEOutput:
        mu, logvar = self.encode(x)
        if sample_posterior:
            eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
            z = mu + torch.exp(0.5 * logvar) * eps
        else:
            z = mu
        x_hat = self.decoder(z)
        sq = (x_hat.float() - x.float()).pow(2).flatten(1)
        recon = sq.sum(1) / (2 * self.config.recon_std ** 2)
        kl = 0.5 * (mu.float().pow(2) + logvar.float().exp() - 1 - logvar.float()).sum(1)
        loss = (recon + self.beta_at(step) * kl).mean()
        return VAEOutput(loss, recon.mean(), kl.mean(), sq.mean(), x_hat, mu, logvar)

    @torch.no_grad()
    def sample(self, n: int, generator: Optional[torch.Generator] = None) -> Tensor:
        """``n`` images (n, C, S, S): decoder means at z ~ N(0, I)."""
        p = next(self.parameters())
        z = torch.randn(n, self.config.latent_dim, generator=generator, device=p.device, dtype=p.dtype)
        return self.decoder(z)

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        """Decoder mean at the posterior mean: (B, C, S, S)."""
        return self.decoder(self.encode(x)[0])

    # ------------------------------------------------------------------ the fastgen train protocol
    def optimizer_params(self) -> dict:
        """One optimizer: {"model": every parameter}."""
        return {"model": list(self.parameters())}

    def train_step(self, batch: dict, optimizers: dict, step: int,
                   generator: Optional[torch.Generator] = None) -> dict:
        """One step on the (annealed) beta-ELBO of ``batch["x"]`` (B, C, S, S); returns {"loss",
        "recon", "kl", "mse", "beta"} (beta_t of this step)."""
        out = self(batch["x"], step=step, generator=generator)
        optimizer_step(optimizers["model"], out.loss)
        return {"loss": out.loss.item(), "recon": out.recon.item(), "kl": out.kl.item(), "mse": out.mse.item(),
                "beta": self.beta_at(step)}

    @torch.no_grad()
    def measure(self, test: dict, generator: Optional[torch.Generator] = None, samples: int = 256,
                sampling_steps: int = 0) -> dict:
        """What the training test asserts, on the held-out images (all of them; ``samples`` and
        ``sampling_steps`` are unused): the rate ``kl`` (nats per image), the distortion ``mse``
        (per pixel) and ``data_var``, the per-pixel variance of those images (a model that
        reconstructs has mse far below it)."""
        x = test["x"]
        out = self(x, generator=generator)
        return {"kl": out.kl.item(), "mse": out.mse.item(), "data_var": x.var(0).mean().item()}


class BetaVAE(VAE):
    """The beta-VAE: the same model with the KL term weighted by ``beta`` (default 4)."""

    default_beta = 4.0


def train_vae(model: VAE, data: Tensor, steps: int, batch_size: int = 64, lr: float = 2e-3,
              seed: int = 0) -> list[float]:
    """Minimal training loop (FusedAdamW, fixed seed, :meth:`VAE.train_step`); returns the loss per step."""
    g = torch.Generator(device=data.device).manual_seed(seed)
    model.train()
    return [out["loss"] for out in train_steps(model, {"x": data}, steps, batch_size, g, lr=lr)]
