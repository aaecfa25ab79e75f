"""CycleGAN: unpaired image-to-image translation with two generators and two PatchGAN
discriminators (Zhu et al. 2017).

Shapes (defaults: 16x16 RGB images in [-1, 1])::

    a (B, C, S, S) from domain A, b (B, C, S, S) from domain B (unpaired)
    G_AB, G_BA   conv3x3 -> GN+SiLU -> [conv3x3 stride 2 -> GN+SiLU] x n_down
                 -> n_res x ResBlock (h + conv(GN+SiLU(conv(GN+SiLU(h)))))
                 -> [upsample x2 -> conv3x3 -> GN+SiLU] x n_down -> conv3x3 -> tanh -> (B, C, S, S)
    D_A, D_B     PatchGAN: conv4x4 s2 -> LReLU -> [conv4x4 s2 -> GN -> LReLU] per further width
                 -> conv3x3 -> (B, 1, S / 2^L, S / 2^L), one real/fake score per receptive patch

Losses (least-squares GAN, as in the paper), with mean over patches and batch::

    L_G = (D_B(G_AB(a)) - 1)^2 + (D_A(G_BA(b)) - 1)^2                            adversarial
          + lambda_cyc (|G_BA(G_AB(a)) - a|_1 + |G_AB(G_BA(b)) - b|_1)             cycle consistency
          + lambda_id  (|G_AB(b) - b|_1 + |G_BA(a) - a|_1)                         identity
    L_D = 1/2 [(D_B(b) - 1)^2 + D_B(G_AB(a))^2] + 1/2 [(D_A(a) - 1)^2 + D_A(G_BA(b))^2]

Every GroupNorm+SiLU of the generators is one ``fastgen.ops.group_norm(..., activation="silu")``
call (``groups = channels`` makes it InstanceNorm, the paper's choice); the discriminators'
GroupNorm is ``fastgen.ops.group_norm`` followed by LeakyReLU(0.2). Train with
``fastgen.optim.FusedAdamW``: :func:`train_cyclegan`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
from torch import Tensor, nn

from fastgen.nn import GroupNorm
from fastgen.zoo._common import check_groups, check_images, norm_act, optimizer_step, train_steps


@dataclass
class CycleGANConfig:
    in_channels: int = 3            # image channels C (both domains)
    image_size: int = 16            # side S
    channels: int = 16              # generator base width (doubles per downsampling)
    n_down: int = 1                 # generator down / up sampling stages
    n_res: int = 2                  # generator residual blocks at the lowest resolution
    d_channels: tuple = (16, 32)    # PatchGAN widths, one stride-2 conv each
    groups: int = 8                 # GroupNorm groups (every width divisible by it)
    lambda_cycle: float = 10.0
    lambda_identity: float = 5.0    # the paper's 0.5 * lambda_cycle
    backend: str = "auto"

    def __post_init__(self):
        self.d_channels = tuple(self.d_channels)
        if self.in_channels < 1 or self.channels < 1 or self.n_down < 0 or self.n_res < 0 or not self.d_channels:
            raise ValueError("in_channels, channels >= 1, n_down, n_res >= 0 and non-empty d_channels required")
        for name, levels in (("n_down", self.n_down), ("len(d_channels)", len(self.d_channels))):
            if self.image_size % 2 ** levels:
                raise ValueError(f"image_size={self.image_size} must be divisible by 2 ** {name} = {2 ** levels}")
        check_groups([self.channels * 2 ** i for i in range(self.n_down + 1)] + list(self.d_channels[1:]),
                     self.groups)


class ResBlock(nn.Module):
    def __init__(self, c: int, groups: int, backend: str) -> None:
        super().__init__()
        self.body = nn.Sequential(norm_act(c, groups, backend), nn.Conv2d(c, c, 3, padding=1),
                                  norm_act(c, groups, backend), nn.Conv2d(c, c, 3, padding=1))

    def forward(self, h: Tensor) -> Tensor:
        return h + self.body(h)


class ResnetGenerator(nn.Module):
    """(B, C, S, S) -> (B, C, S, S) in (-1, 1): the paper's ResNet generator, scaled down."""

    def __init__(self, cfg: CycleGANConfig) -> None:
        super().__init__()
        c, g, be = cfg.channels, cfg.groups, cfg.backend
        layers = [nn.Conv2d(cfg.in_channels, c, 3, padding=1), norm_act(c, g, be)]
        for i in range(cfg.n_down):
            cin, cout = c * 2 ** i, c * 2 ** (i + 1)
            layers += [nn.Conv2d(cin, cout, 3, stride=2, padding=1), norm_act(cout, g, be)]
        layers += [ResBlock(c * 2 ** cfg.n_down, g, be) for _ in range(cfg.n_res)]
        for i in reversed(range(cfg.n_down)):
            layers += [nn.Upsample(scale_factor=2.0, mode="nearest"),
                       nn.Conv2d(c * 2 ** (i + 1), c * 2 ** i, 3, padding=1), norm_act(c * 2 ** i, g, be)]
        layers += [nn.Conv2d(c, cfg.in_channels, 3, padding=1), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class PatchDiscriminator(nn.Module):
    """(B, C, S, S) -> (B, 1, S / 2^L, S / 2^L) patch scores (logits for the least-squares loss)."""

    def __init__(self, cfg: CycleGANConfig) -> None:
        super().__init__()
        ch = cfg.d_channels
        layers = [nn.Conv2d(cfg.in_channels, ch[0], 4, 2, 1), nn.LeakyReLU(0.2)]
        for i in range(1, len(ch)):
            layers += [nn.Conv2d(ch[i - 1], ch[i], 4, 2, 1), GroupNorm(cfg.groups, ch[i], backend=cfg.backend),
                       nn.LeakyReLU(0.2)]
        layers += [nn.Conv2d(ch[-1], 1, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class CycleGANLosses(NamedTuple):
    loss: Tensor          # () the generators' total loss
    adversarial: Tensor   # () its three parts, detached
    cycle: Tensor
    identity: Tensor
    fake_a: Tensor        # (B, C, S, S) G_BA(b), for the discriminator step
    fake_b: Tensor        # (B, C, S, S) G_AB(a)


class CycleGAN(nn.Module):
    """``g_ab``, ``g_ba``, ``d_a``, ``d_b``; ``a_to_b``, ``b_to_a``, ``generator_loss``,
    ``discriminator_loss``, ``cycle_error``."""

    def __init__(self, config: Optional[CycleGANConfig] = None, **overrides) -> None:
        super().__init__()
        config = dataclasses.replace(config, **overrides) if config is not None else CycleGANConfig(**overrides)
        self.config = config
        self.g_ab, self.g_ba = ResnetGenerator(config), ResnetGenerator(config)
        self.d_a, self.d_b = PatchDiscriminator(config), PatchDiscriminator(config)

    def _check(self, x: Tensor, what: str) -> None:
        check_images(x, self.config.in_channels, self.config.image_size, what)

    def a_to_b(self, a: Tensor) -> Tensor:
        self._check(a, "domain-A images")
        return self.g_ab(a)

    def b_to_a(self, b: Tensor) -> Tensor:
        self._check(b, "domain-B images")
        return self.g_ba(b)

    def forward(self, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        """(G_AB(a), G_BA(b))."""
        return self.a_to_b(a), self.b_to_a(b)

    def generator_loss(self, a: Tensor, b: Tensor) -> CycleGANLosses:
        c = self.config
        fake_b, fake_a = self(a, b)
        adv = (self.d_b(fake_b) - 1).pow(2).mean() + (self.d_a(fake_a) - 1).pow(2).mean()
        cyc = (self.g_ba(fake_b) - a).abs().mean() + (self.g_ab(fake_a) - b).abs().mean()
        idt = adv.new_zeros(())
        if c.lambda_identity:
            idt = (self.g_ab(b) - b).abs().mean() + (self.g_ba(a) - a).abs().mean()
        loss = adv + c.lambda_cycle * cyc + c.lambda_identity * idt
        return CycleGANLosses(loss, adv.detach(), cyc.detach(), idt.detach(), fake_a, fake_b)

    def discriminator_loss(self, a: Tensor, b: Tensor, fake_a: Tensor, fake_b: Tensor) -> Tensor:
        for x, what in ((a, "domain-A images"), (b, "domain-B images"), (fake_a, "fake_a"), (fake_b, "fake_b")):
            self._check(x, what)
        fake_a, fake_b = fake_a.detach(), fake_b.detach()
        ld_b = (self.d_b(b) - 1).pow(2).mean() + self.d_b(fake_b).pow(2).mean()
        ld_a = (self.d_a(a) - 1).pow(2).mean() + self.d_a(fake_a).pow(2).mean()
        return 0.5 * (ld_a + ld_b)

    @torch.no_grad()
    def cycle_error(self, a: Tensor, b: Tensor) -> tuple[float, float]:
        """Mean |G_BA(G_AB(a)) - a| and mean |G_AB(G_BA(b)) - b| (per pixel, [-1, 1] images)."""
        return ((self.g_ba(self.a_to_b(a)) - a).abs().mean().item(),
                (self.g_ab(self.b_to_a(b)) - b).abs().mean().item())

    # ------------------------------------------------------------------ the fastgen train protocol
    def optimizer_params(self) -> dict:
        """{"g": both generators' parameters, "d": both discriminators'}."""
        return {"g": [*self.g_ab.parameters(), *self.g_ba.parameters()],
                "d": [*self.d_a.parameters(), *self.d_b.parameters()]}

    def train_step(self, batch: dict, optimizers: dict, step: int,
                   generator: Optional[torch.Generator] = None) -> dict:
        """One generator step, then one discriminator step, on unpaired ``batch["a"]`` and
        ``batch["b"]`` (B, C, S, S) each; returns {"g", "d", "adv", "cycle", "identity"}."""
        out = self.generator_loss(batch["a"], batch["b"])
        optimizer_step(optimizers["g"], out.loss)
        d = self.discriminator_loss(batch["a"], batch["b"], out.fake_a, out.fake_b)
        optimizer_step(optimizers["d"], d)
        return {"g": out.loss.item(), "d": d.item(), "adv": out.adversarial.item(),
                "cycle": out.cycle.item(), "identity": out.identity.item()}

    @torch.no_grad()
    def measure(self, test: dict, generator: Optional[torch.Generator] = None, samples: int = 256,
                sampling_steps: int = 0) -> dict:
        """What the training test asserts, on at most ``samples`` held-out images per domain:
        ``translation_ab`` = mean |G_AB(a) - swap(a)| (swap = exchange red and green, the ideal
        translation between the colour_swap domains) and ``translation_ba``, the cycle errors
        ``cycle_a``, ``cycle_b`` (:meth:`cycle_error`) and ``identity_ab`` = mean |G_AB(a) - a|
        (large when G_AB changes colour rather than copying)."""
        from fastgen.zoo.data import colour_swap

        a, b = test["a"][:samples], test["b"][:samples]
        ab, ba = self.a_to_b(a), self.b_to_a(b)
        cyc_a, cyc_b = self.cycle_error(a, b)
        return {"translation_ab": (ab - colour_swap(a)).abs().mean().item(),
                "translation_ba": (ba - colour_swap(b)).abs().mean().item(),
                "cycle_a": cyc_a, "cycle_b": cyc_b, "identity_ab": (ab - a).abs().mean().item()}


def train_cyclegan(model: CycleGAN, data_a: Tensor, data_b: Tensor, steps: int, batch_size: int = 16,
                   lr: float = 1e-3, betas=(0.5, 0.999), seed: int = 0) -> list[dict]:
    """Alternating FusedAdamW steps (:meth:`CycleGAN.train_step`: generators, then discriminators)
    on unpaired batches drawn independently from ``data_a`` and ``data_b``; returns per step
    {"g", "d", "adv", "cycle", "identity"}."""
    model._check(data_a, "data_a")
    model._check(data_b, "data_b")
    g = torch.Generator(device=data_a.device).manual_seed(seed)
    return train_steps(model, {"a": data_a, "b": data_b}, steps, batch_size, g, [["a"], ["b"]], lr=lr, betas=betas)
