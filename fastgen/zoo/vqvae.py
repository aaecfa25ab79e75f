"""VQVAE: a convolutional VQ-VAE on fastgen.vae.VectorQuantizer with an EMA codebook.

Shapes (defaults: 16x16 RGB images, channels (32, 64), 4x4 latent grid of width 16, 64 codes)::

    x       (B, C, S, S)
    encoder conv3x3 -> [GN+SiLU -> conv3x3 stride 2] per level -> GN+SiLU -> conv1x1 -> z_e (B, D, h, w)
    quant   fastgen.vae.VectorQuantizer(K, D, ema=True): k = argmin_k ||z_e - e_k||^2 per position,
            z_q = z_e + sg(e_k - z_e) (straight-through), indices (B, h, w)
            codebook: EMA of assigned counts and sums (VQ-VAE-2), no gradient
    decoder conv3x3 -> [GN+SiLU -> upsample x2 -> conv3x3] per level -> GN+SiLU -> conv3x3 -> x_hat

Loss (van den Oord et al. 2017, with the EMA codebook update replacing the codebook term)::

    L = ||x - x_hat||^2 + beta ||z_e - sg(z_q)||^2       (means; beta = commitment, 0.25)

Codebook usage on a batch: the number of codes used and the perplexity exp(H(p)), p the
empirical code frequencies (K = every code equally used, 1 = collapse). ``init_codebook(x)``
seeds the codebook with encoder outputs of a batch (a common remedy for dead codes: the
quantizer's default init, uniform in +-1/K, sits far from the encoder's outputs).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastgen.vae import VectorQuantizer
from fastgen.zoo._common import check_groups, check_images, norm_act, optimizer_step, train_steps


@dataclass
class VQVAEConfig:
    image_size: int = 16
    in_channels: int = 3
    channels: tuple = (32, 64)      # widths per level; each level halves the side
    latent_dim: int = 16            # D, the code width
    num_codes: int = 64             # K
    beta: float = 0.25              # commitment weight
    decay: float = 0.9              # EMA decay of the codebook
    groups: int = 8
    backend: str = "auto"           # fastgen ops backend (norms and the nearest-code search)

    def __post_init__(self):
        self.channels = tuple(self.channels)
        if not self.channels or self.image_size % (2 ** len(self.channels)):
            raise ValueError(f"image_size={self.image_size} must be divisible by 2 ** len(channels) = "
                             f"{2 ** len(self.channels)}")
        check_groups(self.channels, self.groups)
        if self.num_codes < 1 or self.latent_dim < 1:
            raise ValueError("num_codes and latent_dim must be >= 1")


class VQVAEOutput(NamedTuple):
    loss: Tensor          # ()  mse + commitment
    mse: Tensor           # ()  per-pixel reconstruction error
    commitment: Tensor    # ()  beta ||z_e - sg(z_q)||^2
    x_hat: Tensor         # (B, C, S, S)
    indices: Tensor       # (B, h, w) int64


class VQVAE(nn.Module):
    def __init__(self, config: Optional[VQVAEConfig] = None, **overrides) -> None:
        super().__init__()
        config = dataclasses.replace(config, **overrides) if config is not None else VQVAEConfig(**overrides)
        self.config = c = config
        ch, g = c.channels, c.groups
        widths = (ch[0],) + ch
        self.encoder = nn.Sequential(
            nn.Conv2d(c.in_channels, ch[0], 3, padding=1),
            *[nn.Sequential(norm_act(widths[i], g, c.backend), nn.Conv2d(widths[i], widths[i + 1], 3, 2, 1))
              for i in range(len(ch))],
            norm_act(ch[-1], g, c.backend), nn.Conv2d(ch[-1], c.latent_dim, 1))
        rev = ch[::-1]
        widths = rev + (rev[-1],)
        self.decoder = nn.Sequential(
            nn.Conv2d(c.latent_dim, rev[0], 3, padding=1),
            *[nn.Sequential(norm_act(widths[i], g, c.backend), nn.Upsample(scale_factor=2, mode="nearest"),
                            nn.Conv2d(widths[i], widths[i + 1], 3, padding=1)) for i in range(len(rev))],
            norm_act(rev[-1], g, c.backend), nn.Conv2d(rev[-1], c.in_channels, 3, padding=1))
        self.quantizer = VectorQuantizer(c.num_codes, c.latent_dim, beta=c.beta, ema=True, decay=c.decay,
                                         backend=c.backend)

    def encode(self, x: Tensor) -> Tensor:
        """z_e (B, D, h, w)."""
        check_images(x, self.config.in_channels, self.config.image_size)
        return self.encoder(x)

    def decode_indices(self, indices: Tensor) -> Tensor:
        """Images (B, C, S, S) from code indices (B, h, w)."""
        return self.decoder(self.quantizer.lookup(indices))

    def forward(self, x: Tensor) -> VQVAEOutput:
        q = self.quantizer(self.encode(x))
        x_hat = self.decoder(q.quantized)
        mse = F.mse_loss(x_hat, x)
        return VQVAEOutput(mse + q.loss, mse, q.loss, x_hat, q.indices)

    @torch.no_grad()
    def init_codebook(self, x: Tensor, generator: Optional[torch.Generator] = None) -> None:
        """Set the codebook (and its EMA state) to K encoder outputs of ``x`` picked at random."""
        z = self.encode(x).movedim(1, -1).reshape(-1, self.config.latent_dim)
        if z.shape[0] < self.config.num_codes:
            raise ValueError(f"init_codebook needs at least {self.config.num_codes} latent vectors, got {z.shape[0]}")
        pick = torch.randperm(z.shape[0], generator=generator, device=z.device)[: self.config.num_codes]
        qz = self.quantizer
        qz.embedding.weight.copy_(z[pick])
        qz.cluster_size.fill_(1.0)
        qz.embed_avg.copy_(z[pick])

    # ------------------------------------------------------------------ the fastgen train protocol
    def optimizer_params(self) -> dict:
        """One optimizer over encoder and decoder: {"model": the parameters with requires_grad} (the
        EMA codebook has none)."""
        return {"model": [p for p in self.parameters() if p.requires_grad]}

    def train_step(self, batch: dict, optimizers: dict, step: int,
                   generator: Optional[torch.Generator] = None) -> dict:
        """One step on ``batch["x"]`` (B, C, S, S) (the codebook's EMA update happens in the forward
        pass, in training mode); returns {"loss", "mse", "commitment"}."""
        out = self(batch["x"])
        optimizer_step(optimizers["model"], out.loss)
        return {"loss": out.loss.item(), "mse": out.mse.item(), "commitment": out.commitment.item()}

    @torch.no_grad()
    def measure(self, test: dict, generator: Optional[torch.Generator] = None, samples: int = 256,
                sampling_steps: int = 0) -> dict:
        """What the training test asserts, on the held-out images in eval mode (no codebook update;
        ``samples``, ``sampling_steps`` unused): reconstruction ``mse`` next to ``data_var`` (the
        per-pixel variance), ``codes_used`` and ``perplexity`` (:func:`codebook_usage`)."""
        was = self.training
        self.eval()
        try:
            out = self(test["x"])
        finally:
            self.train(was)
        used, ppl = codebook_usage(out.indices, self.config.num_codes)
        return {"mse": out.mse.item(), "codes_used": float(used), "perplexity": ppl,
                "data_var": test["x"].var(0).mean().item()}


def codebook_usage(indices: Tensor, num_codes: int) -> tuple[int, float]:
    """(codes used, perplexity exp(H)) of the code frequencies in ``indices``."""
    counts = torch.bincount(indices.flatten(), minlength=num_codes).float()
    p = counts / counts.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return int((counts > 0).sum()), entropy.exp().item()


def train_vqvae(model: VQVAE, data: Tensor, steps: int, batch_size: int = 64, lr: float = 2e-3,
                seed: int = 0, init: bool = False) -> list[float]:
    """FusedAdamW on encoder + decoder (the codebook follows its EMA; :meth:`VQVAE.train_step`);
    returns the loss per step."""
    g = torch.Generator(device=data.device).manual_seed(seed)
    if init:
        model.init_codebook(data[torch.randperm(data.shape[0], generator=g, device=data.device)[:batch_size]], g)
    model.train()
    return [out["loss"] for out in train_steps(model, {"x": data}, steps, batch_size, g, lr=lr)]
