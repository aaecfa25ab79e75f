"""``fastgen.optim.FusedAdamWScheduleFree``: schedule-free AdamW (Defazio et al., 2024), the update
of the ``schedulefree`` package's ``AdamWScheduleFree``, with its ``train()`` / ``eval()`` modes.

The parameters the model sees in training are ``y``, an interpolation of the iterate ``z``
and the average ``x``; ``eval()`` moves them to ``x``, ``train()`` back to ``y``. Per step,
with ``k`` the step index (host scalars only: no host sync)::

    sched = (k + 1) / warmup_steps if k < warmup_steps else 1;   lr_k = lr * sched
    lr_max = max(lr_max, lr_k);   w = (k + 1)^r * lr_max^weight_lr_power
    weight_sum += w;   c = w / weight_sum
    v  <- beta2 * v + (1 - beta2) * g^2
    u   = g / (sqrt(v / (1 - beta2^(k+1))) + eps) + weight_decay * y
    y  <- lerp(y, z, c) + lr_k * (beta1 * (1 - c) - 1) * u
    z  <- z - lr_k * u

    eval():  y <- lerp(y, z, 1 - 1 / beta1)   (= x)        train(): x <- lerp(x, z, 1 - beta1)  (= y)

The elementwise update is one multi-tensor Triton pass per dtype mix (``backend="triton"``,
``kernels/schedulefree.py``: y, g, z, v read, y, z, v written) or ``torch._foreach_*``
launches (``backend="torch"``, the default on CPU); unlike the package it leaves ``p.grad``
untouched (the package divides it in place).
State per parameter as the package: ``z``, ``exp_avg_sq``; the group holds ``k``,
``train_mode``, ``weight_sum``, ``lr_max``, ``scheduled_lr``. Like the package, the optimizer
starts in eval mode: call ``opt.train()`` before the first step (a step in eval mode raises).
"""

from __future__ import annotations

from typing import Optional

import torch

from fastgen.backend import launcher, resolve
from fastgen.optim._common import bucket, check_grad, check_state_kind, check_torch_flags


class FusedAdamWScheduleFree(torch.optim.Optimizer):
    r"""Schedule-free AdamW with ``schedulefree.AdamWScheduleFree``'s arguments and update::

        u = g / (sqrt(v / (1 - beta2^(k+1))) + eps) + weight_decay * y
        y <- lerp(y, z, c_k) + lr_k (beta1 (1 - c_k) - 1) u        z <- z - lr_k u

    Args: ``lr`` (0.0025), ``betas``, ``eps``, ``weight_decay``, ``warmup_steps``, ``r``,
    ``weight_lr_power`` as the package; ``foreach`` accepted and ignored; ``backend``
    ``"auto" | "triton" | "torch"`` (CUDA C++: none). Call ``train()``
    before training steps and ``eval()`` before evaluating or saving the model.
    """

    def __init__(self, params, lr=0.0025, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, warmup_steps=0, r=0.0,
                 weight_lr_power=2.0, foreach: Optional[bool] = True, *, backend: str = "auto"):
        check_torch_flags("FusedAdamWScheduleFree", foreach=foreach)
        if not 0.0 <= lr:
            raise ValueError(f"FusedAdamWScheduleFree: invalid learning rate {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"FusedAdamWScheduleFree: invalid betas {betas}; each must be in [0, 1)")
        defaults = dict(lr=lr, betas=betas, eps=eps, r=r, k=0, warmup_steps=warmup_steps, train_mode=False,
                        weight_sum=0.0, lr_max=-1.0, scheduled_lr=0.0, weight_lr_power=weight_lr_power,
                        weight_decay=weight_decay, foreach=foreach)
        super().__init__(params, defaults)
        self.backend = backend

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a FusedAdamWScheduleFree or ``schedulefree.AdamWScheduleFree`` state dict."""
        check_state_kind("FusedAdamWScheduleFree", state_dict, {"z", "exp_avg_sq"}, {"z", "exp_avg_sq"})
        super().load_state_dict(state_dict)

    @torch.no_grad()
    def _switch(self, to_train: bool) -> None:
        for group in self.param_groups:
            if group["train_mode"] == to_train:
                continue
            beta1 = group["betas"][0]
            pairs = [(p, self.state[p]["z"]) for p in group["params"] if "z" in self.state[p]]
            if pairs:
                ps, zs = map(list, zip(*pairs))
                torch._foreach_lerp_(ps, [z.to(p.device) for p, z in pairs], (1 - beta1) if to_train else 1 - 1 / beta1)
            group["train_mode"] = to_train

    def train(self) -> None:
        """Parameters to the training point y (call before training steps)."""
        self._switch(True)

    def eval(self) -> None:
        """Parameters to the average x (call before evaluating, or saving the model)."""
        self._switch(False)

    @torch.no_grad()
    def step(self, closure=None):
        if not self.param_groups[0]["train_mode"]:
            raise RuntimeError("FusedAdamWScheduleFree: step() in eval mode; call optimizer.train() before training "
                               "steps (and optimizer.eval() before evaluation), as with schedulefree")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            eps, decay, k = group["eps"], group["weight_decay"], group["k"]
            beta1, beta2 = group["betas"]
            warmup = group["warmup_steps"]
            sched = (k + 1) / warmup if k < warmup else 1.0
            bias_correction2 = 1 - beta2 ** (k + 1)
            lr = group["lr"] * sched
            group["scheduled_lr"] = lr
            lr_max = group["lr_max"] = max(lr, group["lr_max"])
            weight = ((k + 1) ** group["r"]) * (lr_max ** group["weight_lr_power"])
            weight_sum = group["weight_sum"] = group["weight_sum"] + weight
            ckp1 = weight / weight_sum if weight_sum != 0 else 0.0
            ys = [p for p in group["params"] if check_grad(p, "FusedAdamWScheduleFree")]
            for p in ys:
                if "z" not in self.state[p]:
                    self.state[p]["z"] = torch.clone(p, memory_format=torch.preserve_format)
                    self.state[p]["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            scalars = dict(beta1=beta1, beta2=beta2, bias_correction2=bias_correction2, eps=eps, weight_decay=decay,
                           ckp1=ckp1, lr=lr)
            buckets, fallback = bucket([(p, p.grad, self.state[p]["z"], self.state[p]["exp_avg_sq"]) for p in ys])
            for (device, _, _), lists in buckets.items():
                same = all(t.dtype == lists[0][0].dtype for lst in (lists[2], lists[3]) for t in lst)
                impl = resolve("schedulefree", self.backend, device,
                               {"triton": None if same else "z and exp_avg_sq must have the parameter's dtype"})
                if impl == "triton":
                    launcher("schedulefree", "triton").schedulefree_step(*lists, **scalars)
                else:
                    _foreach_step(*lists, **scalars)
            for item in fallback:
                _foreach_step(*([t] for t in item), **scalars)
            group["k"] = k + 1
        return loss


def _foreach_step(ys, grads, zs, vs, *, beta1, beta2, bias_correction2, eps, weight_decay, ckp1, lr):
    """The package's foreach update (torch multi-tensor ops), leaving the gradients untouched."""
    torch._foreach_mul_(vs, beta2)
    torch._foreach_addcmul_(vs, grads, grads, value=1 - beta2)
    denom = torch._foreach_div(vs, bias_correction2)
    torch._foreach_sqrt_(denom)
    torch._foreach_add_(denom, eps)
    u = torch._foreach_div(grads, denom)
    if weight_decay != 0:
        torch._foreach_add_(u, ys, alpha=weight_decay)
    torch._foreach_lerp_(ys, zs, weight=ckp1)
    torch._foreach_add_(ys, u, alpha=lr * (beta1 * (1 - ckp1) - 1))
    torch._foreach_sub_(zs, u, alpha=lr)
