"""``fastgen.optim.FusedAdamWScheduleFree``: schedule-free AdamW (Defazio et al., 2024), the update
of the ``schedulefree`` package's ``AdamWScheduleFree``, with its ``train()`` / ``eval()`` modes.

The parameters the model sees in training are ``y``, an interpolation of the iterate ``z``
and the average ``x``; ``eval()`` moves them to ``x``, ``train()`` back to ``y``. Per step,
with ``k`` the step index::

    sched = (k + 1) / warmup_steps if k < warmup_steps else 1;   lr_k = lr * sched
    lr_max = max(lr_max, lr_k);   w = (k + 1)^r * lr_max^weight_lr_power
    weight_sum += w;   c = w / weight_sum   (0 if weight_sum = 0)
    v  <- beta2 * v + (1 - beta2) * g^2
    u   = g / (sqrt(v / (1 - beta2^(k+1))) + eps) + weight_decay * y
    y  <- lerp(y, z, c) + lr_k * (beta1 * (1 - c) - 1) * u
    z  <- z - lr_k * u

    eval():  y <- lerp(y, z, 1 - 1 / beta1)   (= x)        train(): x <- lerp(x, z, 1 - beta1)  (= y)

The schedule lives on the device: each group's ``k``, ``lr_max``, ``weight_sum`` and
``scheduled_lr`` are float64 0-d tensors on the parameters' device (``lr`` may be one too),
updated in place by a few 0-d tensor ops per step that compute the scalars above in float64
(the package's host arithmetic, the same numbers) and round ``(1 - beta2^(k+1), c,
lr_k (beta1 (1 - c) - 1), lr_k)`` once to an fp32 [4] tensor that the update reads. No host
sync: after one eager step (it allocates the states) a step can be captured in a CUDA graph,
and every replay advances the schedule. ``state_dict()`` writes the schedule as the package's
Python numbers (``k`` an int), and ``load_state_dict`` takes either layout, writing into the
existing tensors (a captured graph keeps reading them).

The elementwise update is one multi-tensor pass per dtype mix (``backend="triton"``,
``kernels/schedulefree.py``, or ``backend="cuda"``, ``csrc/optim/schedulefree.cu``: y, g, z, v
read, y, z, v written, 16-byte accesses) or ``torch._foreach_*``
launches (``backend="torch"``, the default on CPU; the package's sequence for fp32
parameters, fp32 math tensor by tensor for bf16 / fp16 ones); unlike the package it leaves
``p.grad`` untouched (the package divides it in place).
State per parameter as the package: ``z``, ``exp_avg_sq``. Like the package, the optimizer
starts in eval mode: call ``opt.train()`` before the first step (a step in eval mode raises).
"""

from __future__ import annotations

from typing import Optional

import torch

from fastgen.backend import launcher, resolve
from fastgen.optim._common import bucket, check_capture_ready, check_grad, check_state_kind, check_torch_flags
from fastgen.optim._common import capturing as _capturing  # called through this name (patchable per module)

_SCHEDULE = ("k", "lr_max", "weight_sum", "scheduled_lr")  # the group's device-side schedule (float64 0-d)


class FusedAdamWScheduleFree(torch.optim.Optimizer):
    r"""Schedule-free AdamW with ``schedulefree.AdamWScheduleFree``'s arguments and update::

        u = g / (sqrt(v / (1 - beta2^(k+1))) + eps) + weight_decay * y
        y <- lerp(y, z, c_k) + lr_k (beta1 (1 - c_k) - 1) u        z <- z - lr_k u

    Args: ``lr`` (0.0025; a float or a 0-d tensor, read on the device), ``betas``, ``eps``,
    ``weight_decay``, ``warmup_steps``, ``r``, ``weight_lr_power`` as the package; ``foreach``
    accepted and ignored; ``backend`` ``"auto" | "triton" | "cuda" | "torch"`` (``"cuda"``: the
    multi-tensor functor of ``csrc/optim/schedulefree.cu``). Call ``train()`` before training steps and ``eval()`` before
    evaluating or saving the model. The schedule (``k``, ``lr_max``, ``weight_sum``,
    ``scheduled_lr`` of each group) is kept in float64 device tensors: a step never syncs with
    the host and can be captured in a CUDA graph after one eager step.
    """

    def __init__(self, params, lr=0.0025, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, warmup_steps=0, r=0.0,
                 weight_lr_power=2.0, foreach: Optional[bool] = True, *, backend: str = "auto"):
        check_torch_flags("FusedAdamWScheduleFree", foreach=foreach)
        if isinstance(lr, torch.Tensor):
            if lr.numel() != 1:
                raise ValueError("FusedAdamWScheduleFree: a tensor lr must have one element")
        elif not 0.0 <= lr:
            raise ValueError(f"FusedAdamWScheduleFree: invalid learning rate {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"FusedAdamWScheduleFree: invalid betas {betas}; each must be in [0, 1)")
        defaults = dict(lr=lr, betas=betas, eps=eps, r=r, k=0, warmup_steps=warmup_steps, train_mode=False,
                        weight_sum=0.0, lr_max=-1.0, scheduled_lr=0.0, weight_lr_power=weight_lr_power,
                        weight_decay=weight_decay, foreach=foreach)
        super().__init__(params, defaults)
        self.backend = backend

    def state_dict(self) -> dict:
        """The package's layout: the schedule as Python numbers (``k`` an int; reading them syncs)."""
        sd = super().state_dict()
        for group in sd["param_groups"]:
            for key in _SCHEDULE:
                if isinstance(group.get(key), torch.Tensor):
                    value = group[key].item()
                    group[key] = int(value) if key == "k" else value
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a FusedAdamWScheduleFree or ``schedulefree.AdamWScheduleFree`` state dict. The
        schedule goes into this optimizer's existing device tensors, if it has them."""
        check_state_kind("FusedAdamWScheduleFree", state_dict, {"z", "exp_avg_sq"}, {"z", "exp_avg_sq"})
        kept = [{key: g[key] for key in _SCHEDULE if isinstance(g[key], torch.Tensor)} for g in self.param_groups]
        super().load_state_dict(state_dict)
        for group, tensors in zip(self.param_groups, kept):
            for key, t in tensors.items():
                value = group[key]
                if isinstance(value, torch.Tensor):
                    t.copy_(value)
                else:
                    t.fill_(float(value))
                group[key] = t

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
            check_capture_ready(self, group, "FusedAdamWScheduleFree")
            ys = [p for p in group["params"] if check_grad(p, "FusedAdamWScheduleFree")]
            for p in ys:
                if "z" not in self.state[p]:
                    self.state[p]["z"] = torch.clone(p, memory_format=torch.preserve_format)
                    self.state[p]["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            home = group["params"][0].device if group["params"] else torch.device("cpu")  # the same every step
            s64 = advance_schedule(group, home)  # this step's (1 - beta2^(k+1), c, y coefficient, lr_k), float64
            consts = dict(beta2=group["betas"][1], eps=group["eps"], weight_decay=group["weight_decay"])
            buckets, fallback = bucket([(p, p.grad, self.state[p]["z"], self.state[p]["exp_avg_sq"]) for p in ys])
            for (device, _, _), lists in buckets.items():
                same = all(t.dtype == lists[0][0].dtype for lst in (lists[2], lists[3]) for t in lst)
                states = None if same else "z and exp_avg_sq must have the parameter's dtype"
                grads = None if lists[1][0].dtype == lists[0][0].dtype else "gradients of the parameters' dtype"
                impl = resolve("schedulefree", self.backend, device, {"triton": states, "cuda": states or grads})
                if impl in ("triton", "cuda"):
                    scalars = s64.to(device=device, dtype=torch.float32)  # rounded once: the kernels' fp32 scalars
                    launcher("schedulefree", impl).schedulefree_step(*lists, scalars=scalars, **consts)
                else:
                    foreach_step(*lists, scalars=s64.to(device), **consts)
            for item in fallback:
                foreach_step(*([t] for t in item), scalars=s64.to(item[0].device), **consts)
        return loss


def advance_schedule(group: dict, device: torch.device) -> torch.Tensor:
    """One step of the group's schedule, on ``device``, in float64 0-d tensor ops (no host sync):
    updates ``k``, ``lr_max``, ``weight_sum``, ``scheduled_lr`` in place and returns this step's
    ``[1 - beta2^(k+1), c, lr_k (beta1 (1 - c) - 1), lr_k]`` (float64 [4]).

    The first call turns the group's numbers (the constructor's, or a package checkpoint's) into
    tensors; that must happen in an eager step, not while a CUDA graph is captured."""
    for key in _SCHEDULE:
        value = group[key]
        if isinstance(value, torch.Tensor) and value.dtype == torch.float64 and value.device == device:
            continue
        if _capturing():
            raise RuntimeError("FusedAdamWScheduleFree: a CUDA graph capture found the schedule on the host; run one "
                               "eager step before capturing (it moves the schedule to the device)")
        group[key] = torch.as_tensor(value, dtype=torch.float64).to(device).reshape(())
    beta1, beta2 = group["betas"]
    warmup, r, power = group["warmup_steps"], group["r"], group["weight_lr_power"]
    k = group["k"]
    kp1 = k + 1.0
    lr = group["lr"]
    if isinstance(lr, torch.Tensor):
        lr = lr.to(device=device, dtype=torch.float64).reshape(())
    else:
        lr = torch.full_like(k, lr)
    if warmup > 0:
        lr = lr * torch.where(k < warmup, kp1 / warmup, 1.0)
    group["lr_max"].copy_(torch.maximum(group["lr_max"], lr))
    weight = group["lr_max"] ** power
    if r != 0:
        weight = kp1 ** r * weight
    weight_sum = group["weight_sum"].add_(weight)
    ckp1 = torch.where(weight_sum != 0, weight / weight_sum, 0.0)
    bias_correction2 = 1.0 - torch.pow(beta2, kp1)
    y_coef = lr * (beta1 * (1.0 - ckp1) - 1.0)
    group["scheduled_lr"].copy_(lr)
    k.add_(1.0)
    return torch.stack([bias_correction2, ckp1, y_coef, lr])


def foreach_step(ys, grads, zs, vs, *, scalars, beta2, eps, weight_decay):
    """The package's foreach update with this step's scalars read from ``scalars`` (``[1 -
    beta2^(k+1), c, y coefficient, lr_k]``, a device tensor), leaving the gradients untouched.
    fp32 parameters: the package's ``torch._foreach_*`` sequence with 0-d fp32 tensor scalars;
    other dtypes: tensor by tensor in fp32 (float64 for float64), one rounding per stored tensor."""
    dtype = ys[0].dtype
    if dtype != torch.float32:
        scalars = scalars.to(torch.promote_types(dtype, torch.float32))
        for t in zip(ys, grads, zs, vs):
            _step_one(*t, scalars=scalars, beta2=beta2, eps=eps, weight_decay=weight_decay)
        return
    bias_correction2, ckp1, y_coef, lr = scalars.to(torch.float32).unbind()
    torch._foreach_mul_(vs, beta2)
    torch._foreach_addcmul_(vs, grads, grads, value=1 - beta2)
    denom = torch._foreach_div(vs, bias_correction2)
    torch._foreach_sqrt_(denom)
    torch._foreach_add_(denom, eps)
    u = torch._foreach_div(grads, denom)
    if weight_decay != 0:
        torch._foreach_add_(u, ys, alpha=weight_decay)
    torch._foreach_lerp_(ys, zs, [ckp1] * len(ys))
    torch._foreach_add_(ys, torch._foreach_mul(u, y_coef))
    torch._foreach_mul_(u, lr)
    torch._foreach_sub_(zs, u)


def _step_one(y, g, z, v, *, scalars, beta2, eps, weight_decay):
    """One tensor's update in the dtype of ``scalars`` (fp32, or float64 for float64 tensors): v is
    stored before it is used, as the package and the Triton kernel do."""
    ct = scalars.dtype
    bias_correction2, ckp1, y_coef, lr = scalars.unbind()
    gf = g.to(ct)
    v.copy_(v.to(ct).mul_(beta2).addcmul_(gf, gf, value=1 - beta2))
    u = gf / v.to(ct).div(bias_correction2).sqrt_().add_(eps)
    yf, zf = y.to(ct), z.to(ct)
    if weight_decay != 0:
        u.add_(yf, alpha=weight_decay)
    y.copy_(torch.lerp(yf, zf, ckp1).add_(u * y_coef))
    z.copy_(zf.sub_(u * lr))
