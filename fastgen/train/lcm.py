"""Latent consistency model (LCM) distillation (Luo et al. 2023) from a guided latent diffusion teacher.

Shapes: latents ``x0`` ``(B, C, H, W)`` (any trailing dims); timesteps, guidance scales ``w`` ``(B,)``;
the guidance embedding ``(B, embedding_dim)``. Everything runs on the teacher's DDPM schedule
(``abar_t``, ``T`` training steps, diffusers' betas) in latent space; ``encode`` (pixels -> scaled
latents, e.g. ``lambda x: vae.encode(x).latent_dist.sample() * vae.config.scaling_factor``) is optional.

Skipping-step DDIM solver with ``k = T // num_ddim_timesteps``, solver steps ``t_n = (n + 1) k - 1``
(``n = 0..N-1``) and ``t_{n-k} = max(t_n - k, 0)``::

    w ~ U[w_min, w_max],  n ~ U{0..N-1},  z ~ N(0, I)
    x_t      = sqrt(abar_t) x0 + sqrt(1 - abar_t) z
    teacher: x0^c, eps^c from eps_phi(x_t, t, c);  x0^u, eps^u from eps_phi(x_t, t, null)
             x0^w = x0^c + w (x0^c - x0^u),  eps^w = eps^c + w (eps^c - eps^u)      ((1 + w) c - w u)
    x_prev   = sqrt(abar_{t-k}) x0^w + sqrt(1 - abar_{t-k}) eps^w                   (DDIM step t -> t - k)

Consistency function of the w-conditioned student ``eps_theta(x, t, c, emb(w))`` (or v-prediction)::

    f(x, t, w) = c_skip(t) x + c_out(t) x0_theta(x, t, w)
    c_skip(t)  = sigma_data^2 / ((s t)^2 + sigma_data^2),   c_out(t) = s t / sqrt((s t)^2 + sigma_data^2)

with ``sigma_data = 0.5`` and ``s = timestep_scaling = 10``, so ``f(x, 0, w) = x``. Loss against the
EMA target network ``theta^-`` (:func:`fastgen.train.consistency.update_target` after each step)::

    L = mean( sqrt((f_theta(x_t, t, w) - f_{theta^-}(x_prev, t - k, w))^2 + c^2) - c ),  c = 0.001   (elementwise)

``emb(w)`` is the sinusoidal embedding of ``1000 w`` (:func:`guidance_embedding`, as diffusers'
``timestep_cond`` of LCM UNets). Sampling: ``x0 = f(z, t_1)``, then for each further timestep ``t``
``x0 = f(sqrt(abar_t) x0 + sqrt(1 - abar_t) z', t)``.
"""

from __future__ import annotations

import inspect
import math
from typing import Callable, Optional, Sequence

import torch

from fastgen.train.objectives import _generator_device, _model_output, _per_sample, make_betas


def guidance_embedding(w: torch.Tensor, dim: int = 256, scale: float = 1000.0) -> torch.Tensor:
    """``(B, dim)`` fp32: ``[sin(scale w f_j), cos(scale w f_j)]``, ``f_j = 10000^(-j / (dim/2 - 1))``."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) / max(half - 1, 1) * torch.arange(half, dtype=torch.float32, device=w.device))
    arg = (w.float() * scale)[:, None] * freqs[None]
    emb = torch.cat([arg.sin(), arg.cos()], 1)
    return torch.nn.functional.pad(emb, (0, 1)) if dim % 2 else emb


def accepts_keyword(model: Callable, name: str) -> bool:
    """Whether ``model(x, t, **{name: emb})`` binds ``name``: a parameter of that name (not positional-only)
    or ``**kwargs`` in its ``forward`` (a module) or its signature; True when there is none to read."""
    try:
        params = inspect.signature(model.forward if isinstance(model, torch.nn.Module) else model).parameters
    except (TypeError, ValueError):
        return True
    return any(p.kind is p.VAR_KEYWORD or (p.name == name and p.kind is not p.POSITIONAL_ONLY)
               for p in params.values())


def _float_dtype(x: torch.Tensor) -> torch.dtype:
    return x.dtype if x.is_floating_point() and x.dtype != torch.float64 else torch.float32


class LCMDistillationObjective:
    """LCM distillation (see the module docstring).

    ``teacher(x, t, cond) -> eps`` (or v) is frozen; ``cond=uncond`` gives its unconditional output.
    The student is called ``model(x, t, **{cond_kwarg: cond, guidance_kwarg: emb(w)})``; with
    ``guidance_kwarg=""`` (or ``None``) it gets no ``emb(w)`` (a student without a w input, as
    LCM-LoRA: train it at one ``w``, ``w_min = w_max``).
    """

    def __init__(self, teacher: Callable, num_train_timesteps: int = 1000, beta_schedule: str = "scaled_linear",
                 beta_start: float = 0.00085, beta_end: float = 0.012, num_ddim_timesteps: int = 50,
                 w_min: float = 2.0, w_max: float = 14.0, embedding_dim: int = 256, prediction: str = "epsilon",
                 sigma_data: float = 0.5, timestep_scaling: float = 10.0, huber_c: float = 0.001,
                 loss_type: str = "huber", target_decay: float = 0.95, encode: Optional[Callable] = None,
                 cond_kwarg: str = "class_labels", guidance_kwarg: str = "timestep_cond"):
        if prediction not in ("epsilon", "v_prediction") or loss_type not in ("huber", "l2"):
            raise ValueError(f"lcm: prediction must be epsilon|v_prediction and loss_type huber|l2; "
                             f"got {prediction!r}, {loss_type!r}")
        if not 1 <= num_ddim_timesteps <= num_train_timesteps or w_max < w_min:
            raise ValueError(f"lcm: need 1 <= num_ddim_timesteps <= T and w_min <= w_max; got "
                             f"{num_ddim_timesteps}, {w_min}, {w_max}")
        self.teacher, self.prediction, self.encode = teacher, prediction, encode
        betas = make_betas(beta_schedule, num_train_timesteps, beta_start, beta_end).double()
        self.alphas_cumprod = torch.cumprod(1 - betas, 0)  # (T,) float64
        self.k = num_train_timesteps // num_ddim_timesteps
        self.ddim_timesteps = torch.arange(1, num_ddim_timesteps + 1) * self.k - 1  # (N,), on the CPU
        self._abar_on: dict = {}  # device -> alphas_cumprod there (copied once, not per call)
        self.w_min, self.w_max, self.embedding_dim = w_min, w_max, embedding_dim
        self.sigma_data, self.timestep_scaling = sigma_data, timestep_scaling
        self.huber_c, self.loss_type, self.target_decay = huber_c, loss_type, target_decay
        self.cond_kwarg, self.guidance_kwarg = cond_kwarg, guidance_kwarg

    # ------------------------------------------------------------------ pieces
    def boundary(self, t: torch.Tensor):
        """``(c_skip, c_out)`` at integer timesteps ``t`` ``(B,)``, fp32."""
        st = t.float() * self.timestep_scaling
        sd2 = self.sigma_data ** 2
        return sd2 / (st ** 2 + sd2), st / (st ** 2 + sd2).sqrt()

    def _abar(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        table = self._abar_on.get(x.device)
        if table is None:
            table = self._abar_on[x.device] = self.alphas_cumprod.to(x.device)
        return _per_sample(table[t].float(), x)

    def to_x0_eps(self, out: torch.Tensor, x: torch.Tensor, t: torch.Tensor):
        """The model output at ``(x, t)`` as ``(x0, eps)`` estimates, fp32."""
        a = self._abar(t, x)
        x, out = x.float(), out.float()
        if self.prediction == "epsilon":
            return (x - (1 - a).sqrt() * out) / a.sqrt(), out
        return a.sqrt() * x - (1 - a).sqrt() * out, a.sqrt() * out + (1 - a).sqrt() * x

    def consistency_fn(self, model: Callable, x: torch.Tensor, t: torch.Tensor, w: torch.Tensor, cond=None):
        """``f(x, t, w)``: ``(B, ...)`` fp32; ``f(x, 0, w) = x`` whatever the model."""
        kw = {}
        if self.guidance_kwarg:  # a w-conditioned student; '' / None: no w input (LCM-LoRA style, fixed w)
            kw[self.guidance_kwarg] = guidance_embedding(w, self.embedding_dim).to(x.device, _float_dtype(x))
        if cond is not None:
            kw[self.cond_kwarg] = cond
        out = _model_output(model(x, t, **kw), x.shape[1])
        x0, _ = self.to_x0_eps(out, x, t)
        c_skip, c_out = (_per_sample(c, x) for c in self.boundary(t))
        return c_skip * x.float() + c_out * x0

    @torch.no_grad()
    def solver_step(self, x: torch.Tensor, t: torch.Tensor, t_prev: torch.Tensor, w: torch.Tensor, cond=None,
                    uncond=None) -> torch.Tensor:
        """The guided teacher's DDIM step ``x_t -> x_{t_prev}``, fp32."""
        x0_c, eps_c = self.to_x0_eps(_model_output(self.teacher(x, t, cond), x.shape[1]), x, t)
        x0_u, eps_u = self.to_x0_eps(_model_output(self.teacher(x, t, uncond), x.shape[1]), x, t)
        wb = _per_sample(w.float(), x)
        x0 = x0_c + wb * (x0_c - x0_u)
        eps = eps_c + wb * (eps_c - eps_u)
        a_prev = self._abar(t_prev, x)
        return a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps

    # ------------------------------------------------------------------ loss
    def loss(self, model: Callable, x0: torch.Tensor, cond=None, uncond=None, generator=None,
             target_model: Callable = None, indices: Optional[torch.Tensor] = None,
             noise: Optional[torch.Tensor] = None, w: Optional[torch.Tensor] = None) -> torch.Tensor:
        if target_model is None:
            raise ValueError("lcm distillation needs target_model (the EMA copy of the student)")
        if self.encode is not None:
            with torch.no_grad():
                x0 = self.encode(x0)
        B, dev, gdev = x0.shape[0], x0.device, _generator_device(generator)
        if indices is None:
            indices = torch.randint(0, len(self.ddim_timesteps), (B,), generator=generator, device=gdev)
        if w is None:
            w = self.w_min + (self.w_max - self.w_min) * torch.rand(B, generator=generator, device=gdev)
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=gdev)
        t = (indices.to(dev) + 1) * self.k - 1  # ddim_timesteps[indices], without a host round trip
        t_prev = (t - self.k).clamp(min=0)
        w, noise = w.to(dev), noise.to(dev)
        a = self._abar(t, x0)
        x_t = (a.sqrt() * x0.float() + (1 - a).sqrt() * noise.float()).to(x0.dtype)
        student = self.consistency_fn(model, x_t, t, w, cond)
        x_prev = self.solver_step(x_t, t, t_prev, w, cond, uncond).to(x0.dtype)
        with torch.no_grad():
            target = self.consistency_fn(target_model, x_prev, t_prev, w, cond)
        if self.loss_type == "l2":
            return (student - target).pow(2).mean()
        c = self.huber_c
        return (torch.sqrt((student - target).pow(2) + c * c) - c).mean()

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(self, model: Callable, noise: torch.Tensor, w: float, cond=None,
               timesteps: Sequence[int] = (999,), generator=None) -> torch.Tensor:
        """Multistep LCM sampling from ``noise`` (latents); ``timesteps`` descending; one is one step."""
        B = noise.shape[0]
        wv = torch.full((B,), float(w), device=noise.device)
        x, x0 = noise, None
        for j, tt in enumerate(timesteps):
            t = torch.full((B,), int(tt), dtype=torch.long, device=noise.device)
            if j:
                z = torch.randn(noise.shape, generator=generator).to(noise.device, noise.dtype)
                a = self._abar(t, noise)
                x = (a.sqrt() * x0 + (1 - a).sqrt() * z).to(noise.dtype)
            x0 = self.consistency_fn(model, x, t, wv, cond)
        return x0

    @torch.no_grad()
    def teacher_sample(self, noise: torch.Tensor, w: float, cond=None, uncond=None) -> torch.Tensor:
        """The guided teacher's DDIM chain over every solver step, ``t_{N-1} -> ... -> 0``, then its x0 estimate."""
        B = noise.shape[0]
        wv = torch.full((B,), float(w), device=noise.device)
        x = noise.float()
        for tt in self.ddim_timesteps.flip(0).tolist():
            t = torch.full((B,), tt, dtype=torch.long, device=noise.device)
            x = self.solver_step(x, t, (t - self.k).clamp(min=0), wv, cond, uncond)
        return x
