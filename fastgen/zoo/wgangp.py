"""WGAN-GP: a Wasserstein GAN whose critic is kept 1-Lipschitz by a gradient penalty.

Shapes (defaults: 16x16 RGB images in [-1, 1])::

    generator  the DCGAN generator of fastgen.zoo.gan (z (B, Z) -> x (B, C, S, S), tanh)
    critic     conv3x3 -> [conv4x4 stride 2 -> GN+SiLU] per level -> flatten -> linear -> (B,)
               GroupNorm normalises each sample on its own (no batch statistics), which the
               per-sample gradient penalty needs; GN+SiLU is one fastgen.ops.group_norm call.

Losses (Gulrajani et al. 2017), with x_hat = eps x_real + (1 - eps) x_fake, eps ~ U[0, 1] per
sample::

    GP   = E_xhat (||grad_xhat D(xhat)||_2 - 1)^2
    L_D  = E D(x_fake) - E D(x_real) + lambda GP          (lambda = gp_weight, 10)
    L_G  = -E D(G(z))

GP is differentiated with respect to the critic's weights, so the critic's forward is
differentiated twice (``create_graph=True``). Every op in the critic must have a double
backward: conv2d, linear and the torch path of ``fastgen.ops.group_norm`` do; the Triton and
CUDA backward kernels of ``fastgen.ops.group_norm`` do not (their backward is a custom op with
no autograd formula). So the critic runs its norms on ``critic_backend="torch"`` by default, and
:meth:`WGANGP.gradient_penalty` refuses, naming the op, a critic whose group_norm resolves to a
kernel backend. The generator (first-order only) uses ``backend``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
from torch import Tensor, nn

from fastgen.backend import resolve
from fastgen.zoo._common import check_groups, norm_act, optimizer_step, statistics_distance
from fastgen.zoo.gan import GANConfig, Generator, NoiseToImages, image_statistics


@dataclass
class WGANGPConfig:
    image_size: int = 16
    in_channels: int = 3
    latent_dim: int = 32
    g_channels: tuple = (64, 32)    # generator widths, coarse to fine
    d_channels: tuple = (32, 64)    # critic widths, fine to coarse
    groups: int = 8
    gp_weight: float = 10.0         # lambda
    n_critic: int = 5               # critic steps per generator step
    backend: str = "auto"           # generator's fastgen ops backend
    critic_backend: str = "torch"   # critic's group_norm backend: must have a double backward

    def __post_init__(self):
        self.g_channels, self.d_channels = tuple(self.g_channels), tuple(self.d_channels)
        GANConfig(self.image_size, self.in_channels, self.latent_dim, self.g_channels, self.d_channels,
                  self.groups)  # validates the shared fields
        check_groups(self.d_channels, self.groups)
        if self.gp_weight < 0 or self.n_critic < 1:
            raise ValueError("need gp_weight >= 0 and n_critic >= 1")


class Critic(nn.Module):
    def __init__(self, cfg: WGANGPConfig) -> None:
        super().__init__()
        ch = cfg.d_channels
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        widths = (ch[0],) + ch
        self.convs = nn.ModuleList(nn.Conv2d(widths[i], widths[i + 1], 4, 2, 1) for i in range(len(ch)))
        self.norms = nn.ModuleList(norm_act(c, cfg.groups, cfg.critic_backend) for c in ch)
        side = cfg.image_size // 2 ** len(ch)
        self.fc = nn.Linear(ch[-1] * side * side, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for conv, norm in zip(self.convs, self.norms):
            h = norm(conv(h))
        return self.fc(h.flatten(1)).squeeze(1)


class CriticLosses(NamedTuple):
    loss: Tensor          # ()  L_D
    wasserstein: Tensor   # ()  E D(real) - E D(fake), the critic's estimate of W1 (up to scale)
    gp: Tensor            # ()  the gradient penalty (unweighted)


class WGANGP(NoiseToImages, nn.Module):
    def __init__(self, config: Optional[WGANGPConfig] = None, **overrides) -> None:
        super().__init__()
        config = dataclasses.replace(config, **overrides) if config is not None else WGANGPConfig(**overrides)
        self.config = config
        c = config
        self.generator = Generator(GANConfig(c.image_size, c.in_channels, c.latent_dim, c.g_channels,
                                             c.d_channels, c.groups, False, c.backend))
        self.critic = Critic(config)

    def gradient_penalty(self, real: Tensor, fake: Tensor, eps: Tensor) -> Tensor:
        """E (||grad D(eps real + (1 - eps) fake)||_2 - 1)^2, differentiable w.r.t. the critic."""
        impl = resolve("group_norm", self.config.critic_backend, real.device)
        if impl != "torch":
            raise NotImplementedError(
                f"WGAN-GP differentiates the critic twice, but fastgen.ops.group_norm's {impl!r} backward "
                "has no double backward (no autograd formula for fastgen.group_norm_bwd); build the model "
                "with critic_backend='torch'")
        if eps.shape != (real.shape[0],):
            raise ValueError(f"eps must have shape ({real.shape[0]},), got {tuple(eps.shape)}")
        e = eps.view(-1, 1, 1, 1).to(real.dtype)
        x_hat = (e * real + (1 - e) * fake).requires_grad_(True)
        (grad,) = torch.autograd.grad(self.critic(x_hat).sum(), x_hat, create_graph=True)
        return (grad.flatten(1).norm(dim=1) - 1).pow(2).mean()

    def critic_loss(self, real: Tensor, z: Tensor, eps: Tensor) -> CriticLosses:
        self.check_input(real)
        with torch.no_grad():
            fake = self(z)
        w = self.critic(real).mean() - self.critic(fake).mean()
        gp = self.gradient_penalty(real, fake, eps)
        return CriticLosses(-w + self.config.gp_weight * gp, w.detach(), gp)

    def generator_loss(self, z: Tensor) -> Tensor:
        return -self.critic(self(z)).mean()

    # ------------------------------------------------------------------ the fastgen train protocol
    @property
    def batches_per_step(self) -> int:
        """Real batches one :meth:`train_step` consumes: one per critic step (``n_critic``)."""
        return self.config.n_critic

    def optimizer_params(self) -> dict:
        """{"d": critic parameters, "g": generator parameters}."""
        return {"d": list(self.critic.parameters()), "g": list(self.generator.parameters())}

    def train_step(self, batch: dict, optimizers: dict, step: int,
                   generator: Optional[torch.Generator] = None) -> dict:
        """``n_critic`` critic steps, one per chunk of ``batch["x"]`` (n_critic * B, C, S, S), each
        with fresh eps and noise, then one generator step; returns {"loss_d", "loss_g",
        "wasserstein", "gp"} (the critic terms of its last step)."""
        chunks = batch["x"].chunk(self.config.n_critic)
        for real in chunks:
            eps = torch.rand(real.shape[0], generator=generator, device=real.device)
            out = self.critic_loss(real, self.noise(real.shape[0], generator), eps)
            optimizer_step(optimizers["d"], out.loss)
        loss_g = self.generator_loss(self.noise(chunks[0].shape[0], generator))
        optimizer_step(optimizers["g"], loss_g)
        return {"loss_d": out.loss.item(), "loss_g": loss_g.item(), "wasserstein": out.wasserstein.item(),
                "gp": out.gp.item()}

    @torch.no_grad()
    def measure(self, test: dict, generator: Optional[torch.Generator] = None, samples: int = 256,
                sampling_steps: int = 0) -> dict:
        """What the training test asserts: ``stat_distance`` = ||image_statistics(samples) -
        image_statistics(test images)|| and the critic's ``wasserstein`` estimate E D(real) -
        E D(fake) on held-out images (``sampling_steps`` is unused)."""
        x = test["x"]
        fake = self.sample(samples, generator)
        n = min(samples, x.shape[0])
        return {"stat_distance": statistics_distance(fake, x, image_statistics),
                "wasserstein": (self.critic(x[:n]).mean() - self.critic(fake[:n]).mean()).item()}


def train_wgangp(model: WGANGP, data: Tensor, steps: int, batch_size: int = 64, lr: float = 1e-4,
                 betas=(0.0, 0.9), seed: int = 0) -> list[tuple[float, float]]:
    """``steps`` generator steps, each after ``n_critic`` critic steps (FusedAdamW, the paper's
    Adam settings); returns per generator step (Wasserstein estimate, GP) of its last critic step."""
    from fastgen.optim import FusedAdamW

    g = torch.Generator(device=data.device).manual_seed(seed)
    opt_d = FusedAdamW(model.critic.parameters(), lr=lr, betas=betas, weight_decay=0.0)
    opt_g = FusedAdamW(model.generator.parameters(), lr=lr, betas=betas, weight_decay=0.0)
    log = []
    for _ in range(steps):
        for _ in range(model.config.n_critic):
            real = data[torch.randint(0, data.shape[0], (batch_size,), generator=g, device=data.device)]
            eps = torch.rand(batch_size, generator=g, device=data.device)
            out = model.critic_loss(real, model.noise(batch_size, g), eps)
            opt_d.zero_grad(set_to_none=True)
            out.loss.backward()
            opt_d.step()
        loss_g = model.generator_loss(model.noise(batch_size, g))
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
        log.append((out.wasserstein.item(), out.gp.item()))
    return log
