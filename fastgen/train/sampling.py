"""Validation sampling for the trainer: diffusers' schedulers when installed, a built-in Euler /
DDIM otherwise, classifier-free guidance, and a PNG grid.

Flow models (velocity ``v``, sigma from 1 to 0)::

    sigmas = shift(linspace(1, 1/T, n)) ++ [0]         (FlowMatchEulerDiscreteScheduler's grid)
    x <- x + (sigma_next - sigma) v(x, T sigma)

Denoising models (DDIM, eta = 0, "leading" spacing ``t_i = i * T / n``, final alpha 1, x0 clipped
to [-1, 1] like diffusers' DDIMScheduler default ``clip_sample``)::

    x0^, eps^ from the model's prediction, then x0^ <- clip(x0^, -1, 1)
    x   <- sqrt(a_prev) x0^ + sqrt(1 - a_prev) eps^

Consistency models: ``f(sigma_max z)``, then re-noise and denoise down the Karras grid
(``num_steps`` points, :meth:`ConsistencyTrainingObjective.sample`).

Guidance: ``out = out_uncond + g (out_cond - out_uncond)``, both halves in one batch.
``sampler`` is ``"auto"`` (diffusers when importable), ``"builtin"``, or a diffusers scheduler
class name (DDIMScheduler, EulerDiscreteScheduler, DPMSolverMultistepScheduler, LCMScheduler,
FlowMatchEulerDiscreteScheduler, ...). Noise comes from ``generator``: the global RNG is untouched.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from fastgen.train.consistency import ConsistencyTrainingObjective, karras_sigmas
from fastgen.train.objectives import FlowMatchingObjective, _model_output, shift_sigmas


def _guided(model, x, t, labels, guidance_scale: float, null_label: Optional[int]):
    c = x.shape[1]
    tt = torch.as_tensor(t, device=x.device, dtype=torch.float32).expand(x.shape[0])
    if guidance_scale == 1.0 or null_label is None:
        return _model_output(model(x, tt, class_labels=labels), c)
    both = _model_output(model(torch.cat([x, x]), torch.cat([tt, tt]),
                               class_labels=torch.cat([labels, torch.full_like(labels, null_label)])), c)
    cond, uncond = both.chunk(2)
    return uncond + guidance_scale * (cond - uncond)


def _diffusers_scheduler(name: str, objective):
    import diffusers

    if name == "auto":
        name = "FlowMatchEulerDiscreteScheduler" if isinstance(objective, FlowMatchingObjective) else "DDIMScheduler"
    cls = getattr(diffusers, name, None)
    if cls is None:
        raise ValueError(f"validation.sampler: diffusers has no scheduler {name!r}")
    T = objective.num_train_timesteps
    if isinstance(objective, FlowMatchingObjective):
        return cls(num_train_timesteps=T, shift=objective.shift)
    kw = dict(num_train_timesteps=T, trained_betas=objective.betas.numpy(),
              prediction_type=objective.prediction)
    if name == "DDIMScheduler":
        kw.update(clip_sample=True, set_alpha_to_one=True)
    return cls(**kw)


def _builtin_flow(model, objective, x, labels, n, g, null_label):
    T = objective.num_train_timesteps
    sig = torch.linspace(1.0, 1.0 / T, n, dtype=torch.float64)
    s = objective.shift_for(x.shape[-2], x.shape[-1])
    sig = torch.cat([shift_sigmas(sig, s) if s != 1.0 else sig, torch.zeros(1, dtype=torch.float64)]).float()
    for i in range(n):
        v = _guided(model, x, sig[i] * T, labels, g, null_label)
        x = x + (sig[i + 1] - sig[i]) * v.float()
    return x


def _builtin_ddim(model, objective, x, labels, n, g, null_label):
    T, abar = objective.num_train_timesteps, objective.alphas_cumprod.to(x.device)
    step = T // n
    for t in range(step * (n - 1), -1, -step):
        out = _guided(model, x, t, labels, g, null_label).float()
        a = abar[t]
        a_prev = abar[t - step] if t - step >= 0 else torch.tensor(1.0)
        if objective.prediction == "epsilon":
            x0, eps = (x - (1 - a).sqrt() * out) / a.sqrt(), out
        elif objective.prediction == "sample":
            x0, eps = out, (x - a.sqrt() * out) / (1 - a).sqrt()
        else:
            x0, eps = a.sqrt() * x - (1 - a).sqrt() * out, a.sqrt() * out + (1 - a).sqrt() * x
        x0 = x0.clamp(-1, 1)  # clip_sample, as diffusers' DDIMScheduler by default (eps is not recomputed)
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    return x


@torch.no_grad()
def sample(model, objective, labels: torch.Tensor, shape: tuple, num_steps: int = 20,
           generator: Optional[torch.Generator] = None, sampler: str = "auto", guidance_scale: float = 1.0,
           null_label: Optional[int] = None, device=None) -> torch.Tensor:
    """``(B, C, H, W)`` samples for ``labels (B,)``, ``shape = (C, H, W)``."""
    device = device or labels.device
    x = torch.randn((labels.shape[0], *shape), generator=generator).to(device)
    if isinstance(objective, ConsistencyTrainingObjective):  # sigma_max, then the Karras grid down
        sig = karras_sigmas(num_steps + 1, objective.sigma_min, objective.sigma_max, objective.rho)
        def guided(xx, t, class_labels=None):
            return _guided(model, xx, t, labels, guidance_scale, null_label)

        return objective.sample(guided, x, labels, sig[1:].flip(0).tolist(), generator)
    use_diffusers = sampler not in ("builtin",)
    if sampler == "auto":
        try:
            import diffusers  # noqa: F401
        except ImportError:
            use_diffusers = False
    if not use_diffusers:
        fn = _builtin_flow if isinstance(objective, FlowMatchingObjective) else _builtin_ddim
        return fn(model, objective, x, labels, num_steps, guidance_scale, null_label)
    sched = _diffusers_scheduler(sampler, objective)
    kw = {}
    if isinstance(objective, FlowMatchingObjective) and objective.resolution_shift:
        kw["mu"] = math.log(objective.shift_for(shape[-2], shape[-1]))
        sched.register_to_config(use_dynamic_shifting=True)
    sched.set_timesteps(num_steps, **kw)
    x = x * getattr(sched, "init_noise_sigma", 1.0)
    for t in sched.timesteps:
        inp = sched.scale_model_input(x, t) if hasattr(sched, "scale_model_input") else x
        out = _guided(model, inp, t, labels, guidance_scale, null_label)
        step_kw = {"generator": generator} if "generator" in sched.step.__code__.co_varnames else {}
        x = sched.step(out, t, x, **step_kw).prev_sample
    return x


def save_grid(images: torch.Tensor, path: str, nrow: int) -> None:
    """``images (N, C, H, W)`` in [-1, 1] as one PNG, ``nrow`` images per row (Pillow or matplotlib)."""
    n, c, h, w = images.shape
    rows = math.ceil(n / nrow)
    grid = torch.ones(c, rows * (h + 2) + 2, nrow * (w + 2) + 2)
    x = ((images.float().clamp(-1, 1) + 1) / 2).cpu()
    for i in range(n):
        r, k = divmod(i, nrow)
        grid[:, 2 + r * (h + 2):2 + r * (h + 2) + h, 2 + k * (w + 2):2 + k * (w + 2) + w] = x[i]
    arr = (grid.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    arr = arr[..., 0] if c == 1 else arr[..., :3]
    try:
        from PIL import Image

        Image.fromarray(arr).save(path)
    except ImportError:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        plt.imsave(path, arr, cmap="gray" if c == 1 else None)

