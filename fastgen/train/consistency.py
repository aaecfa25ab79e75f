"""Consistency training (Song et al. 2023) with the improved recipe of Song & Dhariwal 2023 (iCT), and
consistency distillation from a frozen teacher (:class:`ConsistencyDistillationObjective`, Algorithm 2).

Shapes: ``x0`` ``(B, C, H, W)``; per-sample sigmas and weights ``(B,)``.

Consistency function (EDM parametrization, ``sigma_data = 0.5``, boundary ``f(x, sigma_min) = x``)::

    f(x, s) = c_skip(s) x + c_out(s) F(c_in(s) x, c_noise(s))
    c_skip  = sigma_data^2 / ((s - sigma_min)^2 + sigma_data^2)
    c_out   = (s - sigma_min) sigma_data / sqrt(s^2 + sigma_data^2)
    c_in    = 1 / sqrt(s^2 + sigma_data^2),   c_noise = 250 ln(s)  (the model's timestep)

Discretization (Karras et al. 2022, rho = 7) with N(k) points at training step k of K::

    sigma_i = (sigma_min^(1/rho) + (i-1)/(N-1) (sigma_max^(1/rho) - sigma_min^(1/rho)))^rho,  i = 1..N
    N(k)    = min(s0 2^floor(k / K'), s1) + 1,   K' = floor(K / (log2 floor(s1 / s0) + 1))

Noise levels: ``i`` in 1..N-1 with ``p(i) ~ erf((ln sigma_{i+1} - P_mean) / (sqrt 2 P_std)) -
erf((ln sigma_i - P_mean) / (sqrt 2 P_std))`` (lognormal, ``P_mean = -1.1``, ``P_std = 2``).

Loss (no EMA teacher in iCT: the teacher is the same network without gradient)::

    z ~ N(0, I)
    L = lambda(sigma_i) d(f_theta(x0 + sigma_{i+1} z, sigma_{i+1}), stopgrad f_theta(x0 + sigma_i z, sigma_i))
    lambda(sigma_i) = 1 / (sigma_{i+1} - sigma_i),   d(a, b) = sqrt(||a - b||^2 + c^2) - c,  c = 0.00054 sqrt(dim)
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from fastgen.train.objectives import _generator_device, _model_output, _per_sample


def karras_sigmas(n: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> torch.Tensor:
    """``(n,)`` float64 sigmas, ascending from ``sigma_min`` to ``sigma_max``."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (lo + ramp * (hi - lo)) ** rho


def pseudo_huber(a: torch.Tensor, b: torch.Tensor, c: Optional[float] = None) -> torch.Tensor:
    """``(B,)``: ``sqrt(||a_b - b_b||^2 + c^2) - c`` in fp32, ``c = 0.00054 sqrt(dim)`` by default."""
    dim = a[0].numel()
    c = 0.00054 * math.sqrt(dim) if c is None else c
    sq = (a.float() - b.float()).pow(2).flatten(1).sum(1)
    return torch.sqrt(sq + c * c) - c


class ConsistencyTrainingObjective:
    """Improved consistency training (see the module docstring). ``set_step(k)`` before ``loss``."""

    def __init__(self, total_steps: int, s0: int = 10, s1: int = 1280, sigma_min: float = 0.002,
                 sigma_max: float = 80.0, rho: float = 7.0, p_mean: float = -1.1, p_std: float = 2.0,
                 sigma_data: float = 0.5, huber_c: Optional[float] = None):
        if total_steps < 1 or s0 < 1 or s1 < s0:
            raise ValueError(f"consistency: need total_steps >= 1 and 1 <= s0 <= s1, got {total_steps}, {s0}, {s1}")
        self.total_steps, self.s0, self.s1 = total_steps, s0, s1
        self.sigma_min, self.sigma_max, self.rho = sigma_min, sigma_max, rho
        self.p_mean, self.p_std, self.sigma_data, self.huber_c = p_mean, p_std, sigma_data, huber_c
        self.step = 0

    def set_step(self, step: int) -> None:
        self.step = step

    def num_scales(self, step: Optional[int] = None) -> int:
        """``N(k)``: the number of discretization points at training step ``k``."""
        k = self.step if step is None else step
        k_prime = max(1, math.floor(self.total_steps / (math.log2(math.floor(self.s1 / self.s0)) + 1)))
        return min(self.s0 * 2 ** (k // k_prime), self.s1) + 1

    def sigmas(self, n: Optional[int] = None) -> torch.Tensor:
        return karras_sigmas(n or self.num_scales(), self.sigma_min, self.sigma_max, self.rho)

    def index_probabilities(self, n: Optional[int] = None) -> torch.Tensor:
        """``(N-1,)`` float64: the probability of each pair ``(sigma_i, sigma_{i+1})``."""
        log_s = self.sigmas(n).log()
        cdf = torch.erf((log_s - self.p_mean) / (math.sqrt(2) * self.p_std))
        p = cdf[1:] - cdf[:-1]
        return p / p.sum()

    def sample_indices(self, batch: int, n: Optional[int] = None, generator=None) -> torch.Tensor:
        """``(B,)`` int64 indices ``i`` (0-based) into ``sigmas``; the pair is ``(i, i + 1)``."""
        probs = self.index_probabilities(n).float().to(_generator_device(generator))
        return torch.multinomial(probs, batch, replacement=True, generator=generator)

    def scalings(self, sigma: torch.Tensor):
        sd, smin = self.sigma_data, self.sigma_min
        c_skip = sd ** 2 / ((sigma - smin) ** 2 + sd ** 2)
        c_out = (sigma - smin) * sd / (sigma ** 2 + sd ** 2).sqrt()
        c_in = 1 / (sigma ** 2 + sd ** 2).sqrt()
        return c_skip, c_out, c_in

    def model_timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        return 250.0 * sigma.log()

    def denoise(self, model: Callable, x: torch.Tensor, sigma: torch.Tensor, cond=None) -> torch.Tensor:
        """``f(x, sigma)``: the consistency function (``f(x, sigma_min) = x`` whatever the model)."""
        c_skip, c_out, c_in = (_per_sample(c.float(), x) for c in self.scalings(sigma))
        out = _model_output(model((c_in * x.float()).to(x.dtype), self.model_timestep(sigma).float(),
                                  class_labels=cond), x.shape[1])
        return c_skip * x.float() + c_out * out.float()

    def loss(self, model: Callable, x0: torch.Tensor, cond=None, generator=None) -> torch.Tensor:
        sig = self.sigmas().to(x0.device)
        i = self.sample_indices(x0.shape[0], len(sig), generator).to(x0.device)
        s_lo, s_hi = sig[i].float(), sig[i + 1].float()
        z = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        student = self.denoise(model, x0 + _per_sample(s_hi, x0) * z, s_hi, cond)
        with torch.no_grad():
            teacher = self.denoise(model, x0 + _per_sample(s_lo, x0) * z, s_lo, cond)
        weight = 1.0 / (s_hi - s_lo)
        return (weight * pseudo_huber(student, teacher, self.huber_c)).mean()

    @torch.no_grad()
    def sample(self, model: Callable, noise: torch.Tensor, cond=None, sigmas=(80.0,), generator=None) -> torch.Tensor:
        """Multistep consistency sampling: ``x = f(sigma_max z)``, then for each further sigma
        ``x = f(x + sqrt(s^2 - sigma_min^2) z', s)``. One sigma is one-step generation."""
        def level(s):
            return torch.full((noise.shape[0],), float(s), device=noise.device)

        x = self.denoise(model, noise * sigmas[0], level(sigmas[0]), cond)
        for s in sigmas[1:]:
            z = torch.randn(noise.shape, generator=generator, device=_generator_device(generator)).to(noise.device)
            x = self.denoise(model, x + math.sqrt(s * s - self.sigma_min ** 2) * z, level(s), cond)
        return x


# --------------------------------------------------------------------------- distillation

class ModelDenoiser:
    """A flow or denoising model as an EDM denoiser ``D(x, sigma)`` (the CD teacher's convention).

    ``denoiser(model, x, sigma, cond) -> (B, ...)`` fp32 x0 estimate of ``x = x0 + sigma z``
    (``sigma`` ``(B,)``), for a model trained on another convention:

    - ``kind="flow"`` (``x_s = (1 - s) x0 + s z``, velocity ``v = z - x0``, model timestep ``T s``)::

          s = sigma / (1 + sigma),  x_s = x / (1 + sigma),  D = x_s - s v(x_s, T s)

    - ``kind="denoising"`` (DDPM, ``abar_t`` of ``T`` steps; ``prediction`` eps / v / sample)::

          abar = 1 / (1 + sigma^2),  x_t = x sqrt(abar),  t = the fractional step whose
          ln sqrt((1 - abar_t) / abar_t) equals ln sigma (linear interpolation, as diffusers'
          EulerDiscreteScheduler), then x0 from the prediction at abar

    ``sigma_max`` is the largest sigma the model was trained on (``inf`` for flow).
    """

    def __init__(self, kind: str = "flow", num_train_timesteps: int = 1000,
                 alphas_cumprod: Optional[torch.Tensor] = None, prediction: str = "epsilon"):
        if kind not in ("flow", "denoising") or prediction not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"ModelDenoiser: kind must be flow|denoising and prediction epsilon|v_prediction|"
                             f"sample; got {kind!r}, {prediction!r}")
        if kind == "denoising" and alphas_cumprod is None:
            raise ValueError("ModelDenoiser: kind='denoising' needs alphas_cumprod")
        self.kind, self.T, self.prediction = kind, num_train_timesteps, prediction
        if kind == "denoising":
            a = alphas_cumprod.double()
            self.log_sigmas = (((1 - a) / a).sqrt()).log()  # (T,) ascending; moved to the model's device once
            self.sigma_min, self.sigma_max = float(self.log_sigmas[0].exp()), float(self.log_sigmas[-1].exp())
        else:
            self.sigma_max = math.inf

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """The model's ``(B,)`` fp32 timestep at ``sigma``."""
        if self.kind == "flow":
            return self.T * (sigma.double() / (1 + sigma.double())).float()
        if self.log_sigmas.device != sigma.device:
            self.log_sigmas = self.log_sigmas.to(sigma.device)
        ls = self.log_sigmas
        x = sigma.double().clamp(min=self.sigma_min, max=self.sigma_max).log()
        hi = torch.searchsorted(ls, x).clamp(1, len(ls) - 1)
        lo = hi - 1
        frac = (x - ls[lo]) / (ls[hi] - ls[lo])
        return (lo.double() + frac).float()

    def __call__(self, model: Callable, x: torch.Tensor, sigma: torch.Tensor, cond=None) -> torch.Tensor:
        sig = _per_sample(sigma.float(), x)
        t = self.timestep(sigma)
        if self.kind == "flow":
            s = sig / (1 + sig)
            xs = x.float() / (1 + sig)
            v = _model_output(model(xs.to(x.dtype), t, class_labels=cond), x.shape[1]).float()
            return xs - s * v
        a = 1 / (1 + sig * sig)
        xt = x.float() * a.sqrt()
        out = _model_output(model(xt.to(x.dtype), t, class_labels=cond), x.shape[1]).float()
        if self.prediction == "epsilon":
            return (xt - (1 - a).sqrt() * out) / a.sqrt()
        if self.prediction == "v_prediction":
            return a.sqrt() * xt - (1 - a).sqrt() * out
        return out


def update_target(target: torch.nn.Module, online: torch.nn.Module, decay: float) -> None:
    """The CD target network: ``theta^- <- mu theta^- + (1 - mu) stopgrad(theta)`` in place."""
    with torch.no_grad():
        tgt = list(target.parameters())
        torch._foreach_lerp_(tgt, [po.detach().to(pt.dtype) for pt, po in zip(tgt, online.parameters())], 1.0 - decay)


class ConsistencyDistillationObjective(ConsistencyTrainingObjective):
    """Consistency distillation (Song et al. 2023, Algorithm 2) from a frozen teacher denoiser.

    ``teacher(x, sigma, cond) -> D(x, sigma)`` is the teacher's x0 estimate on the probability-flow
    ODE ``dx/dsigma = (x - D(x, sigma)) / sigma`` (EDM / variance-exploding convention). With the
    fixed Karras discretization ``sigma_1 < ... < sigma_N`` and ``n ~ U{1..N-1}``::

        x_{n+1}  = x0 + sigma_{n+1} z
        d        = (x_{n+1} - D(x_{n+1}, sigma_{n+1})) / sigma_{n+1}
        x^_n     = x_{n+1} + (sigma_n - sigma_{n+1}) d                        (Euler)
        heun:      d' = (x^_n - D(x^_n, sigma_n)) / sigma_n,  x^_n = x_{n+1} + (sigma_n - sigma_{n+1}) (d + d') / 2
        L        = lambda d(f_theta(x_{n+1}, sigma_{n+1}), f_{theta^-}(x^_n, sigma_n)),   lambda = 1

    ``f_{theta^-}`` is the target network, an EMA of the student (:func:`update_target` after each
    optimizer step, ``mu = target_decay``); ``d`` is :func:`pseudo_huber` (``metric="l2"``: squared L2).

    ``student_denoiser`` (e.g. a :class:`ModelDenoiser`, for a student initialised from a flow or
    DDPM teacher): the student keeps the teacher's parametrization, ``D_theta(x, sigma)`` =
    ``student_denoiser(model, x, sigma, cond)``, inside the boundary scalings of LCM::

        f(x, sigma) = c_skip x + c_out D_theta(x, sigma),   u = boundary_scaling (sigma - sigma_min)
        c_skip = sigma_data^2 / (u^2 + sigma_data^2),       c_out = u / sqrt(u^2 + sigma_data^2)

    so ``f(x, sigma_min) = x`` and ``f ~ D_theta`` once ``u >> sigma_data``: at initialisation the
    student is the teacher's one-step denoiser. Without it, the EDM parametrization above.
    """

    def __init__(self, teacher: Callable, num_scales: int = 18, solver: str = "heun", target_decay: float = 0.95,
                 sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0, sigma_data: float = 0.5,
                 huber_c: Optional[float] = None, metric: str = "pseudo_huber",
                 student_denoiser: Optional[Callable] = None, boundary_scaling: float = 10.0):
        super().__init__(total_steps=1, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho, sigma_data=sigma_data,
                         huber_c=huber_c)
        if solver not in ("euler", "heun") or metric not in ("pseudo_huber", "l2") or num_scales < 2:
            raise ValueError(f"consistency distillation: solver must be euler|heun, metric pseudo_huber|l2 and "
                             f"num_scales >= 2; got {solver!r}, {metric!r}, {num_scales}")
        self.teacher, self.n, self.solver, self.metric = teacher, num_scales, solver, metric
        self.target_decay = target_decay
        self.student_denoiser, self.boundary_scaling = student_denoiser, boundary_scaling

    def denoise(self, model: Callable, x: torch.Tensor, sigma: torch.Tensor, cond=None) -> torch.Tensor:
        if self.student_denoiser is None:
            return super().denoise(model, x, sigma, cond)
        u = _per_sample(self.boundary_scaling * (sigma.float() - self.sigma_min), x)
        sd2 = self.sigma_data ** 2
        d = self.student_denoiser(model, x, sigma.float(), cond).float()
        return sd2 / (u * u + sd2) * x.float() + u / (u * u + sd2).sqrt() * d

    def num_scales(self, step: Optional[int] = None) -> int:
        return self.n  # CD keeps N fixed

    def sample_indices(self, batch: int, n: Optional[int] = None, generator=None) -> torch.Tensor:
        """``(B,)`` uniform indices ``n`` (0-based) in ``0..N-2``; the pair is ``(n, n + 1)``."""
        return torch.randint(0, (n or self.n) - 1, (batch,), generator=generator, device=_generator_device(generator))

    @torch.no_grad()
    def ode_step(self, x: torch.Tensor, s_hi: torch.Tensor, s_lo: torch.Tensor, cond=None) -> torch.Tensor:
        """One teacher step of the probability-flow ODE from ``s_hi`` down to ``s_lo`` (``(B,)`` each)."""
        hi, lo = _per_sample(s_hi, x), _per_sample(s_lo, x)
        d = (x - self.teacher(x, s_hi, cond)) / hi
        x_lo = x + (lo - hi) * d
        if self.solver == "heun":
            d2 = (x_lo - self.teacher(x_lo.to(x.dtype), s_lo, cond)) / lo
            x_lo = x + (lo - hi) * (d + d2) / 2
        return x_lo

    @torch.no_grad()
    def teacher_sample(self, noise: torch.Tensor, cond=None) -> torch.Tensor:
        """The teacher's ODE solution: ``x = sigma_N z``, then :meth:`ode_step` down every pair of the
        grid to ``sigma_1`` (what one student step ``f(sigma_N z, sigma_N)`` learns to reach)."""
        sig = self.sigmas().to(noise.device, noise.dtype)
        x = noise * sig[-1]
        for i in range(len(sig) - 1, 0, -1):
            x = self.ode_step(x, sig[i].expand(x.shape[0]), sig[i - 1].expand(x.shape[0]), cond).to(noise.dtype)
        return x

    def loss(self, model: Callable, x0: torch.Tensor, cond=None, generator=None, target_model: Callable = None,
             indices: Optional[torch.Tensor] = None, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        if target_model is None:
            raise ValueError("consistency distillation needs target_model (the EMA copy of the student)")
        sig = self.sigmas().to(x0.device)
        i = self.sample_indices(x0.shape[0], len(sig), generator).to(x0.device) if indices is None else indices
        s_lo, s_hi = sig[i].to(x0.dtype), sig[i + 1].to(x0.dtype)
        z = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator) if noise is None else noise
        x_hi = x0 + _per_sample(s_hi, x0) * z
        x_lo = self.ode_step(x_hi, s_hi, s_lo, cond).to(x0.dtype)
        student = self.denoise(model, x_hi, s_hi.float(), cond)
        with torch.no_grad():
            target = self.denoise(target_model, x_lo, s_lo.float(), cond)
        if self.metric == "l2":
            return (student - target).pow(2).flatten(1).sum(1).mean()
        return pseudo_huber(student, target, self.huber_c).mean()
