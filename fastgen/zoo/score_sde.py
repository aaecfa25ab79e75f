"""ScoreSDE: score-based generative modelling with VE and VP SDEs (Song et al. 2021) on vectors.

Forward SDEs, t in [0, 1], and their Gaussian perturbation kernels p_t(x_t | x_0)::

    VE  dx = sqrt(d sigma^2/dt) dw          sigma(t) = s_min (s_max / s_min)^t
        x_t = x_0 + sigma(t) eps
    VP  dx = -1/2 beta(t) x dt + sqrt(beta(t)) dw,   beta(t) = b_min + t (b_max - b_min)
        x_t = alpha(t) x_0 + std(t) eps,   alpha = exp(-1/2 int_0^t beta),  std = sqrt(1 - alpha^2)

Denoising score matching with lambda(t) = std(t)^2 (t ~ U[eps_t, 1]):

    L = E || std(t) s_theta(x_t, t) + eps ||^2        (the score of the kernel is -eps / std)

Score network: s_theta(x, t) = MLP([c_in x, fourier(t)]) / std(t), c_in = (alpha^2 data_std^2 +
std^2)^(-1/2) so the input has about unit scale at every t; Gaussian Fourier features of t,
blocks Linear -> RMSNorm (fastgen.nn.RMSNorm) -> SiLU, a zero-initialised output layer.

Samplers (``sample``):
    VE  predictor-corrector: reverse-diffusion predictor on the geometric grid sigma_N > ... > sigma_1
        x <- x + (sigma_i^2 - sigma_{i-1}^2) s(x, sigma_i) + sqrt(sigma_i^2 - sigma_{i-1}^2) z
        and Langevin correctors with step 2 (snr ||z|| / ||s||)^2 (the ScoreSdeVeScheduler rules;
        ``sample_diffusers_ve`` runs diffusers' ScoreSdeVeScheduler itself);
    VP  reverse-SDE Euler-Maruyama: x <- x + [1/2 beta x + beta s] dt + sqrt(beta dt) z, plus
        the same Langevin corrector.
Shapes: x (B, D) vectors (the 2-D mixtures of fastgen.zoo.data).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastgen.nn import RMSNorm
from fastgen.zoo._common import check_vectors, optimizer_step, train_steps


@dataclass
class ScoreSDEConfig:
    dim: int = 2                    # D
    sde: str = "ve"                 # "ve" | "vp"
    hidden: int = 128               # MLP width
    num_layers: int = 3             # hidden blocks
    fourier_dim: int = 16           # Gaussian Fourier features of t (even)
    fourier_scale: float = 4.0      # std of their frequencies
    sigma_min: float = 0.01         # VE
    sigma_max: float = 5.0          # VE: about the largest distance between data points
    beta_min: float = 0.1           # VP
    beta_max: float = 20.0          # VP
    data_std: float = 1.0           # about the data's std: the network sees x / sqrt(alpha^2 data_std^2 + std^2)
    t_eps: float = 1e-3             # smallest training / sampling time
    snr: float = 0.15               # Langevin corrector signal-to-noise ratio
    backend: str = "auto"

    def __post_init__(self):
        if self.sde not in ("ve", "vp"):
            raise ValueError(f"sde must be 've' or 'vp', got {self.sde!r}")
        if self.fourier_dim % 2 or self.dim < 1 or self.num_layers < 1:
            raise ValueError("need an even fourier_dim, dim >= 1, num_layers >= 1")
        if not 0 < self.sigma_min < self.sigma_max or not 0 < self.beta_min < self.beta_max:
            raise ValueError("need 0 < sigma_min < sigma_max and 0 < beta_min < beta_max")


class ScoreSDE(nn.Module):
    """``model(x, t)`` -> score (B, D); ``loss(x0)``; ``sample(n)``; ``perturb(x0, t, eps)``."""

    def __init__(self, config: Optional[ScoreSDEConfig] = None, **overrides) -> None:
        super().__init__()
        config = dataclasses.replace(config, **overrides) if config is not None else ScoreSDEConfig(**overrides)
        self.config = c = config
        self.register_buffer("freqs", torch.randn(c.fourier_dim // 2, generator=torch.Generator().manual_seed(0)) * c.fourier_scale)
        self.inp = nn.Linear(c.dim + c.fourier_dim, c.hidden)
        self.blocks = nn.ModuleList(nn.Linear(c.hidden, c.hidden) for _ in range(c.num_layers))
        self.norms = nn.ModuleList(RMSNorm(c.hidden, backend=c.backend) for _ in range(c.num_layers))
        self.out = nn.Linear(c.hidden, c.dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    # ------------------------------------------------------------------ the SDE
    def sigma(self, t: Tensor) -> Tensor:
        c = self.config
        return c.sigma_min * (c.sigma_max / c.sigma_min) ** t

    def beta(self, t: Tensor) -> Tensor:
        c = self.config
        return c.beta_min + t * (c.beta_max - c.beta_min)

    def marginal(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """(alpha(t), std(t)) of the perturbation kernel x_t = alpha x_0 + std eps."""
        c = self.config
        if c.sde == "ve":
            return torch.ones_like(t), self.sigma(t)
        log_alpha = -0.25 * t ** 2 * (c.beta_max - c.beta_min) - 0.5 * t * c.beta_min
        return log_alpha.exp(), (-torch.expm1(2 * log_alpha)).sqrt()

    def perturb(self, x0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        alpha, std = self.marginal(t)
        return alpha[:, None] * x0 + std[:, None] * eps

    # ------------------------------------------------------------------ the network
    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        """Score s(x, t) (B, D) for x (B, D) and t (B,) in [0, 1]."""
        check_vectors(x, self.config.dim)
        if t.shape != (x.shape[0],):
            raise ValueError(f"t must have shape ({x.shape[0]},), got {tuple(t.shape)}")
        alpha, std = self.marginal(t)
        c_in = (alpha ** 2 * self.config.data_std ** 2 + std ** 2).rsqrt()[:, None]
        ang = 2 * math.pi * t[:, None] * self.freqs
        h = self.inp(torch.cat([x * c_in, ang.sin(), ang.cos()], 1))
        for lin, norm in zip(self.blocks, self.norms):
            h = h + lin(F.silu(norm(h)))
        return self.out(F.silu(h)) / std[:, None]

    def loss(self, x0: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        """Denoising score matching, lambda(t) = std(t)^2: E ||std s(x_t, t) + eps||^2 (per dimension)."""
        check_vectors(x0, self.config.dim)
        t = torch.rand(x0.shape[0], generator=generator, device=x0.device) * (1 - self.config.t_eps) + self.config.t_eps
        eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        std = self.marginal(t)[1]
        return (std[:, None] * self(self.perturb(x0, t, eps), t) + eps).pow(2).mean()

    # ------------------------------------------------------------------ sampling
    def _langevin(self, x: Tensor, t: Tensor, generator) -> Tensor:
        s = self(x, t)
        z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        s_norm = s.norm(dim=1).mean()
        step = 2 * (self.config.snr * z.norm(dim=1).mean() / s_norm) ** 2
        # a zero score (the untrained, zero-initialised network) leaves the step size undefined
        # (0 / 0): no correction then, instead of NaN samples
        step = torch.where(s_norm > 0, step, torch.zeros_like(step))
        return x + step * s + (2 * step).sqrt() * z

    @torch.no_grad()
    def sample(self, n: int, num_steps: int = 200, corrector_steps: int = 1,
               generator: Optional[torch.Generator] = None) -> Tensor:
        """``n`` samples (n, D) by the predictor-corrector sampler of the config's SDE."""
        c = self.config
        p = self.out.weight
        ts = torch.linspace(1.0, c.t_eps, num_steps, device=p.device)
        x = torch.randn(n, c.dim, generator=generator, device=p.device) * (c.sigma_max if c.sde == "ve" else 1.0)
        for i in range(num_steps):
            t = ts[i].expand(n)
            for _ in range(corrector_steps):
                x = self._langevin(x, t, generator)
            z = torch.randn(x.shape, generator=generator, device=x.device)
            if c.sde == "ve":
                prev = self.sigma(ts[i + 1]) if i + 1 < num_steps else torch.zeros((), device=x.device)
                var = self.sigma(ts[i]) ** 2 - prev ** 2
                mean = x + var * self(x, t)
                x = mean + var.sqrt() * z if i + 1 < num_steps else mean
            else:
                dt = ts[i] - (ts[i + 1] if i + 1 < num_steps else 0.0)
                b = self.beta(ts[i])
                mean = x + (0.5 * b * x + b * self(x, t)) * dt
                x = mean + (b * dt).sqrt() * z if i + 1 < num_steps else mean
        return x

    # ------------------------------------------------------------------ the fastgen train protocol
    def optimizer_params(self) -> dict:
        """One optimizer: {"model": every parameter}."""
        return {"model": list(self.parameters())}

    def train_step(self, batch: dict, optimizers: dict, step: int,
                   generator: Optional[torch.Generator] = None) -> dict:
        """One denoising-score-matching step on ``batch["x"]`` (B, D) (t and eps from
        ``generator``); returns {"loss"}."""
        loss = self.loss(batch["x"], generator)
        optimizer_step(optimizers["model"], loss)
        return {"loss": loss.item()}

    @torch.no_grad()
    def measure(self, test: dict, generator: Optional[torch.Generator] = None, samples: int = 2000,
                sampling_steps: int = 200) -> dict:
        """What the training test asserts: ``samples`` predictor-corrector samples in
        ``sampling_steps`` steps against the held-out points' moments: ``mean_error`` (largest
        |mean coordinate difference|) and ``cov_error`` (largest |covariance entry difference|)."""
        x = test["x"].float()
        s = self.sample(samples, num_steps=sampling_steps, generator=generator)
        return {"mean_error": (s.mean(0) - x.mean(0)).abs().max().item(),
                "cov_error": (torch.cov(s.T) - torch.cov(x.T)).abs().max().item()}


@torch.no_grad()
def sample_diffusers_ve(model: ScoreSDE, n: int, num_steps: int = 200, generator: Optional[torch.Generator] = None):
    """Sample a VE model with diffusers' ``ScoreSdeVeScheduler`` (its predictor and corrector),
    the loop of diffusers' ``ScoreSdeVePipeline``; the network is called at the scheduler's sigmas."""
    c = model.config
    if c.sde != "ve":
        raise ValueError("ScoreSdeVeScheduler implements the VE SDE only; use model.sample for VP")
    from diffusers import ScoreSdeVeScheduler

    sched = ScoreSdeVeScheduler(num_train_timesteps=num_steps, snr=c.snr, sigma_min=c.sigma_min,
                                sigma_max=c.sigma_max, sampling_eps=c.t_eps, correct_steps=1)
    sched.set_timesteps(num_steps)
    sched.set_sigmas(num_steps)
    x = torch.randn(n, c.dim, generator=generator) * sched.init_noise_sigma
    log_ratio = math.log(c.sigma_max / c.sigma_min)
    mean = x
    for i, ts in enumerate(sched.timesteps):
        t = (torch.log(sched.sigmas[i] / c.sigma_min) / log_ratio).float().expand(n)  # sigma -> t
        x = sched.step_correct(model(x, t), x, generator=generator).prev_sample
        out = sched.step_pred(model(x, t), ts, x, generator=generator)
        x, mean = out.prev_sample, out.prev_sample_mean
    return mean


def train_score(model: ScoreSDE, data: Tensor, steps: int, batch_size: int = 256, lr: float = 2e-3,
                seed: int = 0) -> list[float]:
    """FusedAdamW on the DSM loss with a fixed seed (:meth:`ScoreSDE.train_step`); returns the loss per step."""
    g = torch.Generator(device=data.device).manual_seed(seed)
    return [out["loss"] for out in train_steps(model, {"x": data}, steps, batch_size, g, lr=lr)]
