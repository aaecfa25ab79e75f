"""ConsistencyModel: a small UNet trained by improved consistency training (iCT), with one-step
and multistep sampling.

The consistency function (EDM parametrisation; the objective lives in fastgen.train.consistency
and is reused here unchanged)::

    f(x, sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, 250 ln sigma)
    f(x, sigma_min) = x                                     (boundary condition, by construction)

    loss = E lambda(sigma_i) d(f(x0 + sigma_{i+1} z, sigma_{i+1}), stopgrad f(x0 + sigma_i z, sigma_i))

with the iCT curriculum (the number of discretisation points doubles from s0 + 1 to s1 + 1
over ``total_steps``), lognormal noise-level sampling and the pseudo-Huber distance d.

Sampling: one step ``x = f(sigma_max z, sigma_max)``; multistep adds noise back at each further
sigma and denoises again: ``x = f(x + sqrt(s^2 - sigma_min^2) z', s)``.

Network F (defaults: 16x16 RGB, channels (32, 64))::

    x (B, C, S, S), t (B,)  ->  temb = MLP(sinusoid(t)) (+ class embedding)       (B, T)
    conv_in -> [ResBlock(c_l, temb), down x2] per level but the last -> ResBlock,
    Attention (fastgen.ops.attention over the (S/2^(L-1))^2 positions), ResBlock ->
    [concat skip, ResBlock, up x2] back up -> GroupNorm+SiLU -> conv_out (zero-init) -> (B, C, S, S)
    ResBlock: h = conv(GN_silu(x)) + W temb;  h = conv(GN_silu(h));  out = skip(x) + h

Every GroupNorm+SiLU is one ``fastgen.ops.group_norm(..., activation="silu")`` call.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastgen.nn import GroupNorm
from fastgen.ops import attention
from fastgen.train.consistency import ConsistencyTrainingObjective
from fastgen.zoo._common import check_groups, check_images, norm_act, optimizer_step


@dataclass
class ConsistencyModelConfig:
    in_channels: int = 3
    image_size: int = 16
    channels: tuple = (32, 64)      # per resolution level; the last level has the attention block
    groups: int = 8                 # GroupNorm groups (every channel count divisible by it)
    heads: int = 2                  # attention heads at the lowest resolution
    num_classes: int = 0            # 0: unconditional; else labels in [0, num_classes)
    # iCT objective (fastgen.train.consistency.ConsistencyTrainingObjective)
    total_steps: int = 10_000       # K: the curriculum's length
    s0: int = 10                    # initial number of discretisation intervals
    s1: int = 1280                  # final number
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    sigma_data: float = 0.5
    backend: str = "auto"

    def __post_init__(self):
        self.channels = tuple(self.channels)
        if self.in_channels < 1 or not self.channels:
            raise ValueError("in_channels must be >= 1 and channels non-empty")
        if self.image_size % 2 ** (len(self.channels) - 1):
            raise ValueError(f"image_size {self.image_size} must be divisible by 2^(len(channels) - 1)")
        check_groups(self.channels, self.groups)
        if self.channels[-1] % self.heads:
            raise ValueError(f"channels[-1]={self.channels[-1]} must be divisible by heads={self.heads}")
        if self.num_classes < 0:
            raise ValueError("num_classes must be >= 0")


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10_000.0) -> Tensor:
    """(B,) -> (B, dim): [cos(t w_k), sin(t w_k)], w_k = max_period^(-k / (dim/2))."""
    half = dim // 2
    w = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    arg = t.float()[:, None] * w[None]
    return torch.cat([torch.cos(arg), torch.sin(arg)], 1)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, tdim: int, groups: int, backend: str) -> None:
        super().__init__()
        self.norm1, self.conv1 = norm_act(cin, groups, backend), nn.Conv2d(cin, cout, 3, padding=1)
        self.temb = nn.Linear(tdim, cout)
        self.norm2, self.conv2 = norm_act(cout, groups, backend), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        h = self.conv1(self.norm1(x)) + self.temb(temb)[:, :, None, None]
        return self.skip(x) + self.conv2(self.norm2(h))


class AttentionBlock(nn.Module):
    """Self-attention over the H*W positions: x + proj(attention(q, k, v)), GroupNorm in front."""

    def __init__(self, channels: int, heads: int, groups: int, backend: str) -> None:
        super().__init__()
        self.heads, self.backend = heads, backend
        self.norm = GroupNorm(groups, channels, backend=backend)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        qkv = self.qkv(self.norm(x)).reshape(B, 3, self.heads, C // self.heads, H * W)
        q, k, v = (qkv[:, i].permute(0, 3, 1, 2) for i in range(3))          # (B, HW, heads, d) "bshd"
        o = attention(q.contiguous(), k.contiguous(), v.contiguous(), backend=self.backend)
        return x + self.proj(o.permute(0, 2, 3, 1).reshape(B, C, H, W))


class ConsistencyUNet(nn.Module):
    """The network F(x, t, class_labels) (module docstring): (B, C, S, S), (B,) -> (B, C, S, S).

    ``class_labels`` (B,) int64 in [0, num_classes], num_classes meaning "no label" (also what
    ``None`` gives); ignored when num_classes = 0. With ``config_class`` set, ``fastgen train``
    builds it from ``model.kwargs`` (``model.factory: fastgen.zoo.consistency:ConsistencyUNet``,
    ``objective.kind: consistency``)."""

    config_class = ConsistencyModelConfig

    def __init__(self, cfg: ConsistencyModelConfig) -> None:
        super().__init__()
        self.config = cfg
        ch, g, be = cfg.channels, cfg.groups, cfg.backend
        self.tdim = tdim = 4 * ch[0]
        self.time_mlp = nn.Sequential(nn.Linear(ch[0], tdim), nn.SiLU(), nn.Linear(tdim, tdim), nn.SiLU())
        # num_classes + 1 rows: the last is the null label (classifier-free dropout in fastgen train)
        self.num_classes = cfg.num_classes
        self.class_embed = nn.Embedding(cfg.num_classes + 1, tdim) if cfg.num_classes else None
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down = nn.ModuleList(ResBlock(ch[i], ch[i], tdim, g, be) for i in range(len(ch) - 1))
        self.downsample = nn.ModuleList(nn.Conv2d(ch[i], ch[i + 1], 3, stride=2, padding=1)
                                        for i in range(len(ch) - 1))
        self.mid1 = ResBlock(ch[-1], ch[-1], tdim, g, be)
        self.mid_attn = AttentionBlock(ch[-1], cfg.heads, g, be)
        self.mid2 = ResBlock(ch[-1], ch[-1], tdim, g, be)
        self.upsample = nn.ModuleList(nn.Conv2d(ch[i + 1], ch[i], 3, padding=1) for i in range(len(ch) - 1))
        self.up = nn.ModuleList(ResBlock(2 * ch[i], ch[i], tdim, g, be) for i in range(len(ch) - 1))
        self.norm_out = norm_act(ch[0], g, be)
        self.conv_out = nn.Conv2d(ch[0], cfg.in_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: Tensor, t: Tensor, class_labels: Optional[Tensor] = None) -> Tensor:
        temb = self.time_mlp(timestep_embedding(t, self.conv_in.out_channels).to(x.dtype))
        if self.class_embed is not None:
            if class_labels is None:
                class_labels = torch.full((x.shape[0],), self.num_classes, dtype=torch.long, device=x.device)
            temb = temb + self.class_embed(class_labels)
        h = self.conv_in(x)
        skips = []
        for block, down in zip(self.down, self.downsample):
            h = block(h, temb)
            skips.append(h)
            h = down(h)
        h = self.mid2(self.mid_attn(self.mid1(h, temb)), temb)
        for i in reversed(range(len(self.up))):
            h = self.upsample[i](F.interpolate(h, scale_factor=2.0, mode="nearest"))
            h = self.up[i](torch.cat([h, skips[i]], 1), temb)
        return self.conv_out(self.norm_out(h))


class ConsistencyModel(nn.Module):
    """``f(x, sigma, labels)`` (the consistency function), ``loss(x0)`` (iCT), ``sample(n)``."""

    def __init__(self, config: Optional[ConsistencyModelConfig] = None, **overrides) -> None:
        super().__init__()
        config = (dataclasses.replace(config, **overrides) if config is not None
                  else ConsistencyModelConfig(**overrides))
        self.config = config
        self.net = ConsistencyUNet(config)
        self.objective = ConsistencyTrainingObjective(
            total_steps=config.total_steps, s0=config.s0, s1=config.s1, sigma_min=config.sigma_min,
            sigma_max=config.sigma_max, sigma_data=config.sigma_data)

    def _check(self, x: Tensor, labels: Optional[Tensor]) -> None:
        c = self.config
        check_images(x, c.in_channels, c.image_size)
        if c.num_classes == 0:
            if labels is not None:
                raise ValueError("this ConsistencyModel is unconditional (num_classes=0): pass labels=None")
            return
        if labels is None:
            return                                  # the null label: unconditional samples
        if not isinstance(labels, Tensor) or labels.shape != (x.shape[0],) or labels.dtype != torch.long:
            got = (tuple(labels.shape), labels.dtype) if isinstance(labels, Tensor) else type(labels).__name__
            raise ValueError(f"labels must be an int64 tensor of shape ({x.shape[0]},), got {got}")
        if x.shape[0] and (int(labels.min()) < 0 or int(labels.max()) >= c.num_classes):
            raise ValueError(f"labels must lie in [0, {c.num_classes}), got [{int(labels.min())}, {int(labels.max())}]")

    def forward(self, x: Tensor, sigma: Tensor, labels: Optional[Tensor] = None) -> Tensor:
        """f(x, sigma): x (B, C, S, S), sigma (B,) in [sigma_min, sigma_max] -> (B, C, S, S) float32."""
        self._check(x, labels)
        if not isinstance(sigma, Tensor) or sigma.shape != (x.shape[0],):
            raise ValueError(f"sigma must be a tensor of shape ({x.shape[0]},), got "
                             f"{tuple(sigma.shape) if isinstance(sigma, Tensor) else type(sigma).__name__}")
        return self.objective.denoise(self.net, x, sigma, labels)

    def loss(self, x0: Tensor, labels: Optional[Tensor] = None, step: Optional[int] = None,
             generator: Optional[torch.Generator] = None) -> Tensor:
        """The iCT loss on clean images x0 (B, C, S, S) in [-1, 1] at curriculum step ``step``."""
        self._check(x0, labels)
        if step is not None:
            self.objective.set_step(step)
        return self.objective.loss(self.net, x0, labels, generator)

    @torch.no_grad()
    def sample(self, n: int, sigmas: Sequence[float] = (), labels: Optional[Tensor] = None,
               generator: Optional[torch.Generator] = None) -> Tensor:
        """(n, C, S, S): one step from sigma_max by default; ``sigmas`` (descending, below
        sigma_max) adds those denoising steps (multistep sampling)."""
        c = self.config
        sig = (c.sigma_max, *sigmas)
        if any(not c.sigma_min < s <= c.sigma_max for s in sig) or any(a <= b for a, b in zip(sig, sig[1:])):
            raise ValueError(f"sigmas must descend within ({c.sigma_min}, {c.sigma_max}), got {tuple(sigmas)}")
        p = next(self.parameters())
        z = torch.randn(n, c.in_channels, c.image_size, c.image_size, generator=generator,
                        device=generator.device if generator is not None else "cpu").to(p)
        self._check(z, labels)
        return self.objective.sample(self.net, z, labels, sig, generator)

    # ------------------------------------------------------------------ the fastgen train protocol
    def optimizer_params(self) -> dict:
        """One optimizer: {"model": every parameter}."""
        return {"model": list(self.parameters())}

    def train_step(self, batch: dict, optimizers: dict, step: int,
                   generator: Optional[torch.Generator] = None) -> dict:
        """One iCT step at curriculum step ``step`` on ``batch["x"]`` (B, C, S, S) (with
        ``batch["y"]`` as labels when the model is class-conditional); returns {"loss"}. The
        caller updates the EMA (the sampling weights) after it."""
        labels = batch.get("y") if self.config.num_classes else None
        loss = self.loss(batch["x"], labels, step=step, generator=generator)
        optimizer_step(optimizers["model"], loss)
        return {"loss": loss.item()}

    @torch.no_grad()
    def measure(self, test: dict, generator: Optional[torch.Generator] = None, samples: int = 256,
                sampling_steps: int = 0) -> dict:
        """What the training test asserts: the distance between :func:`colour_stats` of
        ``samples`` one-step samples and of the held-out images (``one_step_distance``), and the
        same for two steps, sigmas (sigma_max, 0.8) (``two_step_distance``); both draw the same
        noise (``generator``'s state at the call). ``sampling_steps`` is unused."""
        ref = colour_stats(test["x"])
        state = generator.get_state() if generator is not None else None
        one = (colour_stats(self.sample(samples, generator=generator)) - ref).norm().item()
        if state is not None:
            generator.set_state(state)
        two = (colour_stats(self.sample(samples, sigmas=(0.8,), generator=generator)) - ref).norm().item()
        return {"one_step_distance": one, "two_step_distance": two}


def train_consistency(model: ConsistencyModel, data: Tensor, steps: int, labels: Optional[Tensor] = None,
                      batch_size: int = 32, lr: float = 1e-3, ema_decay: float = 0.99,
                      seed: int = 0):
    """iCT with ``fastgen.optim.FusedAdamW``; curriculum step k = training step k of ``steps``
    (``model.objective.total_steps`` is set to ``steps``). Returns (losses, ema): sample with
    ``with ema.average_parameters(model): model.sample(...)``."""
    from fastgen.optim import EMA, FusedAdamW

    check_images(data, model.config.in_channels, model.config.image_size, "data")
    g = torch.Generator(device=data.device).manual_seed(seed)
    model.objective.total_steps = steps
    opt = FusedAdamW(model.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    ema = EMA(model, decay=ema_decay)
    opts = {"model": opt}
    losses = []
    for k in range(steps):
        idx = torch.randint(0, data.shape[0], (batch_size,), generator=g, device=data.device)
        batch = {"x": data[idx]} if labels is None else {"x": data[idx], "y": labels[idx]}
        losses.append(model.train_step(batch, opts, k, g)["loss"])
        ema.update()
    return losses, ema


def colour_stats(images: Tensor) -> Tensor:
    """(6,): the mean and the standard deviation of each colour channel over images and pixels
    (the sample-quality measure of the trainer's end-to-end test, without classes)."""
    return torch.cat([images.float().mean((0, 2, 3)), images.float().std((0, 2, 3))])
