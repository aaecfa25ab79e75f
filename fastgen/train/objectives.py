"""Training objectives for diffusion and flow models, usable on their own.

Shapes: ``x0`` and ``noise`` are ``(B, C, H, W)`` (any trailing dims work); per-sample
quantities (timesteps, sigmas, weights) are ``(B,)``. Every objective returns a scalar loss
``mean_b( w_b * mean_{c,h,w} (model_out - target)^2 )``.

Denoising (DDPM family), ``T`` discrete steps, ``abar_t = prod_{s<=t} (1 - beta_s)``::

    x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps           t ~ U{0..T-1}
    target: eps | v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0 | x0
    SNR(t) = abar_t / (1 - abar_t)

Betas as diffusers' ``DDPMScheduler`` makes them: ``linear`` (beta_start..beta_end),
``scaled_linear`` (linspace of the square roots, squared), ``squaredcos_cap_v2`` (the
cosine schedule, betas capped at 0.999). Loss weightings are defined on the x0-space error
and converted to the chosen prediction (``||eps_err||^2 = SNR ||x0_err||^2``,
``||v_err||^2 = (SNR + 1) ||x0_err||^2``):

- ``none``: w = 1 on the prediction's own error;
- ``snr``: x0-weight SNR(t) (the eps-loss of Ho et al. whatever the prediction);
- ``min_snr_gamma``: x0-weight min(SNR, gamma) (Hang et al. 2023; the weights diffusers'
  example scripts use for eps and v);
- ``debiased``: eps-weight 1/sqrt(min(SNR, 1000)) (the debiased estimation of Yu et al. 2024).

Flow matching / rectified flow (the SD3 / Flux convention, sigma = 1 is pure noise)::

    x_t = (1 - sigma) x0 + sigma eps       target v = eps - x0       model timestep = 1000 sigma

with ``u`` drawn by ``timestep_sampling``: ``uniform``; ``logit_normal`` (sigmoid of
N(m, s)); ``mode`` (1 - u - scale (cos^2(pi u / 2) - 1 + u)); ``sigmoid`` (sigmoid of
scale * N(0, 1)); ``shifted`` (uniform, used with a shift). Then ``sigma = shift(u)``:
``e^mu u / (1 + (e^mu - 1) u)`` with ``e^mu = shift`` or, with ``resolution_shift``, ``mu``
linear in the image's token count (Flux: 0.5 at 256 tokens, 1.15 at 4096). Weightings:
``none``, ``sigma_sqrt`` (sigma^-2) and ``cosmap`` (2 / (pi (1 - 2 sigma + 2 sigma^2))), as SD3.

Condition dropout for classifier-free guidance (:func:`drop_conditions`) replaces a class
label with the null label, or zeroes an embedding, with probability ``p`` per sample.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch

PREDICTIONS = ("epsilon", "v_prediction", "sample")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
DENOISING_WEIGHTINGS = ("none", "snr", "min_snr_gamma", "debiased")
FLOW_SAMPLINGS = ("uniform", "logit_normal", "mode", "sigmoid", "shifted")
FLOW_WEIGHTINGS = ("none", "sigma_sqrt", "cosmap")


def _check(name: str, value: str, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")


def _generator_device(generator: Optional[torch.Generator]) -> torch.device:
    """Where draws with ``generator`` are made (a CUDA generator draws on the GPU; none: the CPU)."""
    return generator.device if generator is not None else torch.device("cpu")


def _per_sample(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return w.reshape(w.shape[0], *([1] * (x.dim() - 1)))


def weighted_mse(pred: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``mean_b(w_b * mean(pred_b - target_b)^2)`` in fp32."""
    err = (pred.float() - target.float()).pow(2).flatten(1).mean(1)
    if weight is not None:
        err = err * weight.float()
    return err.mean()


def _model_output(out, channels: int) -> torch.Tensor:
    """The prediction in a model's return value: a tensor, a tuple's first item or ``.sample``;
    a learned-variance output with twice the input channels keeps its first half (DiT)."""
    if isinstance(out, (tuple, list)):
        out = out[0]
    out = getattr(out, "sample", out)
    if out.shape[1] == 2 * channels:
        out = out[:, :channels]
    return out


# --------------------------------------------------------------------------- betas

def make_betas(schedule: str, num_train_timesteps: int = 1000, beta_start: float = 1e-4,
               beta_end: float = 0.02) -> torch.Tensor:
    """The ``(T,)`` fp32 betas that diffusers' ``DDPMScheduler`` builds for ``schedule``."""
    _check("beta_schedule", schedule, BETA_SCHEDULES)
    T = num_train_timesteps
    if schedule == "linear":
        return torch.linspace(beta_start, beta_end, T, dtype=torch.float32)
    if schedule == "scaled_linear":
        return torch.linspace(beta_start ** 0.5, beta_end ** 0.5, T, dtype=torch.float32) ** 2

    def abar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return torch.tensor([min(1 - abar((i + 1) / T) / abar(i / T), 0.999) for i in range(T)], dtype=torch.float32)


# --------------------------------------------------------------------------- condition dropout

def drop_conditions(cond: torch.Tensor, p: float, null_label: Optional[int] = None,
                    generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Classifier-free-guidance dropout: each sample's condition is dropped with probability ``p``.

    Integer ``cond`` ``(B,)`` (class labels) become ``null_label``; floating ``cond`` ``(B, ...)``
    (embeddings) become zeros. Returns a new tensor; ``p == 0`` returns ``cond`` unchanged.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"condition dropout p must be in [0, 1], got {p}")
    if p == 0.0:
        return cond
    drop = torch.rand(cond.shape[0], generator=generator, device=cond.device) < p
    if cond.is_floating_point():
        return torch.where(_per_sample(drop, cond), torch.zeros_like(cond), cond)
    if null_label is None:
        raise ValueError("drop_conditions: class labels need null_label (the unconditional class id)")
    return torch.where(drop, torch.full_like(cond, null_label), cond)


# --------------------------------------------------------------------------- denoising

class DenoisingObjective:
    """eps / v / x0 prediction on a DDPM noise schedule (see the module docstring)."""

    def __init__(self, prediction: str = "epsilon", beta_schedule: str = "linear",
                 num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02,
                 loss_weighting: str = "none", snr_gamma: float = 5.0):
        _check("prediction", prediction, PREDICTIONS)
        _check("loss_weighting", loss_weighting, DENOISING_WEIGHTINGS)
        if snr_gamma <= 0:
            raise ValueError(f"snr_gamma must be > 0, got {snr_gamma}")
        self.prediction, self.loss_weighting, self.snr_gamma = prediction, loss_weighting, snr_gamma
        self.num_train_timesteps = num_train_timesteps
        self.betas = make_betas(beta_schedule, num_train_timesteps, beta_start, beta_end)
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)

    def sample_timesteps(self, batch: int, device=None, generator=None) -> torch.Tensor:
        """``(B,)`` int64 timesteps, uniform on ``0..T-1``."""
        return torch.randint(0, self.num_train_timesteps, (batch,), device=device, generator=generator)

    def _abar(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return _per_sample(self.alphas_cumprod.to(x.device)[t], x)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = self._abar(t, x0)
        return (a.sqrt() * x0.float() + (1 - a).sqrt() * noise.float()).to(x0.dtype)

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.prediction == "epsilon":
            return noise
        if self.prediction == "sample":
            return x0
        a = self._abar(t, x0)
        return (a.sqrt() * noise.float() - (1 - a).sqrt() * x0.float()).to(x0.dtype)

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        a = self.alphas_cumprod.to(t.device)[t]
        return a / (1 - a)

    def weights(self, t: torch.Tensor) -> torch.Tensor:
        """``(B,)`` per-sample loss weights on the prediction's squared error."""
        snr = self.snr(t)
        if self.loss_weighting == "none":
            return torch.ones_like(snr)
        if self.loss_weighting == "snr":
            w_x0 = snr
        elif self.loss_weighting == "min_snr_gamma":
            w_x0 = torch.clamp(snr, max=self.snr_gamma)
        else:  # debiased: eps-space weight 1/sqrt(SNR) -> x0-space weight SNR / sqrt(SNR)
            w_x0 = snr / torch.clamp(snr, max=1000.0).sqrt()
        per_x0 = {"epsilon": snr, "v_prediction": snr + 1, "sample": torch.ones_like(snr)}[self.prediction]
        return w_x0 / per_x0

    def model_timestep(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def loss(self, model: Callable, x0: torch.Tensor, cond=None, generator=None) -> torch.Tensor:
        """One Monte-Carlo estimate of the loss: ``model(x_t, t, class_labels=cond)``."""
        t = self.sample_timesteps(x0.shape[0], x0.device, generator)
        noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        out = _model_output(model(self.add_noise(x0, noise, t), t, class_labels=cond), x0.shape[1])
        return weighted_mse(out, self.target(x0, noise, t), self.weights(t))


# --------------------------------------------------------------------------- flow matching

def sample_flow_u(sampling: str, batch: int, *, logit_mean: float = 0.0, logit_std: float = 1.0,
                  mode_scale: float = 1.29, sigmoid_scale: float = 1.0, device=None,
                  generator=None) -> torch.Tensor:
    """``(B,)`` fp32 ``u`` in (0, 1) before the shift (same draws as diffusers'
    ``compute_density_for_timestep_sampling`` for uniform / logit_normal / mode)."""
    _check("timestep_sampling", sampling, FLOW_SAMPLINGS)
    if sampling == "logit_normal":
        return torch.sigmoid(torch.normal(logit_mean, logit_std, (batch,), device=device, generator=generator))
    if sampling == "sigmoid":
        return torch.sigmoid(sigmoid_scale * torch.randn((batch,), device=device, generator=generator))
    u = torch.rand((batch,), device=device, generator=generator)
    if sampling == "mode":
        u = 1 - u - mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    return u


def resolution_mu(seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
                  base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """Flux's resolution-dependent ``mu``: linear in the image token count."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return base_shift + slope * (seq_len - base_seq_len)


def shift_sigmas(u: torch.Tensor, shift: float) -> torch.Tensor:
    """``shift u / (1 + (shift - 1) u)``: the time shift of SD3 (Flux with ``shift = e^mu``)."""
    return shift * u / (1 + (shift - 1) * u)


def sd3_loss_weighting(weighting: str, sigmas: torch.Tensor) -> torch.Tensor:
    """SD3's per-sample weights: ``none``, ``sigma_sqrt`` (sigma^-2), ``cosmap``."""
    _check("loss_weighting", weighting, FLOW_WEIGHTINGS)
    if weighting == "sigma_sqrt":
        return sigmas.float() ** -2.0
    if weighting == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas ** 2))
    return torch.ones_like(sigmas)


class FlowMatchingObjective:
    """Flow matching / rectified flow with a velocity target (see the module docstring)."""

    def __init__(self, timestep_sampling: str = "uniform", logit_mean: float = 0.0, logit_std: float = 1.0,
                 mode_scale: float = 1.29, sigmoid_scale: float = 1.0, shift: float = 1.0,
                 resolution_shift: bool = False, base_shift: float = 0.5, max_shift: float = 1.15,
                 base_seq_len: int = 256, max_seq_len: int = 4096, patch_size: int = 2,
                 loss_weighting: str = "none", num_train_timesteps: int = 1000):
        _check("timestep_sampling", timestep_sampling, FLOW_SAMPLINGS)
        _check("loss_weighting", loss_weighting, FLOW_WEIGHTINGS)
        if logit_std <= 0 or shift <= 0 or sigmoid_scale <= 0:
            raise ValueError("logit_std, shift and sigmoid_scale must be > 0")
        self.timestep_sampling, self.loss_weighting = timestep_sampling, loss_weighting
        self.logit_mean, self.logit_std = logit_mean, logit_std
        self.mode_scale, self.sigmoid_scale = mode_scale, sigmoid_scale
        self.shift, self.resolution_shift, self.patch_size = shift, resolution_shift, patch_size
        self.mu_args = dict(base_seq_len=base_seq_len, max_seq_len=max_seq_len, base_shift=base_shift,
                            max_shift=max_shift)
        self.num_train_timesteps = num_train_timesteps

    def shift_for(self, height: int, width: int) -> float:
        """The shift for an image (latent) of this size: ``e^mu`` with ``resolution_shift``, else ``shift``."""
        if not self.resolution_shift:
            return self.shift
        seq_len = (height // self.patch_size) * (width // self.patch_size)
        return math.exp(resolution_mu(seq_len, **self.mu_args))

    def sample_sigmas(self, batch: int, height: int = 0, width: int = 0, device=None, generator=None) -> torch.Tensor:
        """``(B,)`` fp32 sigmas in (0, 1)."""
        u = sample_flow_u(self.timestep_sampling, batch, logit_mean=self.logit_mean, logit_std=self.logit_std,
                          mode_scale=self.mode_scale, sigmoid_scale=self.sigmoid_scale, device=device,
                          generator=generator)
        s = self.shift_for(height, width)
        return u if s == 1.0 else shift_sigmas(u, s)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
        s = _per_sample(sigmas, x0)
        return ((1 - s) * x0.float() + s * noise.float()).to(x0.dtype)

    def target(self, x0: torch.Tensor, noise: torch.Tensor, sigmas=None) -> torch.Tensor:
        return noise - x0

    def weights(self, sigmas: torch.Tensor) -> torch.Tensor:
        return sd3_loss_weighting(self.loss_weighting, sigmas)

    def model_timestep(self, sigmas: torch.Tensor) -> torch.Tensor:
        return sigmas * self.num_train_timesteps

    def loss(self, model: Callable, x0: torch.Tensor, cond=None, generator=None) -> torch.Tensor:
        """One Monte-Carlo estimate of the loss: ``model(x_t, 1000 sigma, class_labels=cond)``."""
        sig = self.sample_sigmas(x0.shape[0], x0.shape[-2], x0.shape[-1], x0.device, generator)
        noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        out = _model_output(model(self.add_noise(x0, noise, sig), self.model_timestep(sig), class_labels=cond),
                            x0.shape[1])
        return weighted_mse(out, self.target(x0, noise, sig), self.weights(sig))
