"""``fastgen.optim.FusedLion``: the Lion optimizer with a multi-tensor kernel.

    c = beta1 * m + (1 - beta1) * g
    p <- p * (1 - lr * weight_decay) - lr * sign(c)
    m <- beta2 * m + (1 - beta2) * g

(Chen et al., 2023). Same structure as ``FusedAdamW``: fp32 math, states in fp32 or
bf16, ``lr`` float or device tensor, one launch per dtype combination (Triton with
``backend="triton"``, CUDA C++ with ``"cuda"``), the same math tensor by tensor with
``backend="torch"``.
State: ``exp_avg`` per parameter.
"""

from __future__ import annotations

from typing import Optional

import torch

from fastgen.backend import launcher, resolve
from fastgen.optim._one_pass import OnePass, check_one_pass
from fastgen.optim._common import (bucket, check_capture_ready, check_grad, check_state_kind, check_torch_flags,
                                   load_states_without_cast, local)

class FusedLion(torch.optim.Optimizer):
    r"""Lion (Chen et al., 2023) over whole parameter lists in one kernel launch per dtype mix.

    Per parameter, with ``g`` its gradient (``-g`` if ``maximize``), in fp32::

        c <- beta1 * m + (1 - beta1) * g
        p <- p * (1 - lr * weight_decay) - lr * sign(c)
        m <- beta2 * m + (1 - beta2) * g

    Takes the arguments Lion implementations commonly take (lion-pytorch, timm, the
    ``torch.optim`` flags): ``lr``, ``betas``, ``weight_decay``, ``maximize``; ``foreach``,
    ``fused`` and ``use_triton`` are accepted and ignored (the ``backend`` decides);
    ``capturable`` is honoured (a step never syncs with the host; ``capturable=True`` refuses a
    capture before the states exist); ``differentiable=True`` and
    ``decoupled_weight_decay=True`` (lion-pytorch's weight decay divided by the initial lr)
    raise ``ValueError``. State: ``exp_avg`` per parameter (fp32, or ``state_dtype``).
    ``max_grad_norm`` / ``ema``: the one-pass step, as :class:`FusedAdamW`'s.
    """

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, maximize=False, *,
                 foreach: Optional[bool] = None, capturable: bool = False, differentiable: bool = False,
                 fused: Optional[bool] = None, use_triton: bool = False, decoupled_weight_decay: bool = False,
                 backend: str = "auto", state_dtype: Optional[torch.dtype] = None,
                 max_grad_norm: Optional[float] = None, ema=None):
        check_torch_flags("FusedLion", differentiable=differentiable, foreach=foreach, fused=fused)
        if decoupled_weight_decay:
            raise ValueError("FusedLion: decoupled_weight_decay=True is not supported; pass "
                             "weight_decay=wd / lr to get lion-pytorch's decoupled decay at a fixed lr")
        betas = tuple(float(b) for b in betas)
        if not isinstance(lr, torch.Tensor) and not 0.0 <= lr:
            raise ValueError(f"FusedLion: invalid learning rate {lr}")
        if not (0.0 <= betas[0] <= 1.0 and 0.0 <= betas[1] <= 1.0):
            raise ValueError(f"FusedLion: invalid betas {betas}; each must be in [0, 1]")
        if not 0.0 <= weight_decay:
            raise ValueError(f"FusedLion: invalid weight_decay {weight_decay}")
        if state_dtype not in (None, torch.float32, torch.bfloat16):
            raise ValueError(f"FusedLion: state_dtype must be None, torch.float32 or torch.bfloat16, got {state_dtype}")
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay, maximize=maximize,
                                      foreach=foreach, capturable=capturable, differentiable=False, fused=fused))
        self.backend = backend
        self.state_dtype = state_dtype or torch.float32
        self.max_grad_norm, self.ema = check_one_pass(self, "FusedLion", max_grad_norm, ema)
        self.grad_norm: Optional[torch.Tensor] = None

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a FusedLion state dict (another optimizer's states raise ``ValueError``)."""
        check_state_kind("FusedLion", state_dict, {"exp_avg"}, {"exp_avg"})
        load_states_without_cast(self, state_dict, lambda p, key: self.state_dtype)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        one_pass = OnePass(self)
        for group in self.param_groups:
            if group.get("capturable"):
                check_capture_ready(self, group, "FusedLion")
            items = []
            for p in group["params"]:
                if not check_grad(p, "FusedLion"):
                    continue
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p, dtype=self.state_dtype, memory_format=torch.preserve_format)
                items.append((local(p), local(p.grad), local(state["exp_avg"]), one_pass.shadow(p)))
            for with_shadow in (False, True):
                buckets, fallback = bucket([it for it in items if (it[-1] is not None) == with_shadow])
                for (device, _, _), lists in buckets.items():
                    self._update(group, device, *lists[:-1], **one_pass.kwargs(lists[-1] if with_shadow else None))
                for item in fallback:
                    self._update(group, item[0].device, *([t] for t in item[:-1]), force_torch=True,
                                 **one_pass.kwargs([item[-1]] if with_shadow else None))
        one_pass.finish()
        return loss

    def _update(self, group, device, params, grads, exp_avgs, force_torch=False, coef=None, shadows=None,
                ema_decay=0.0):
        beta1, beta2 = group["betas"]
        lr = group["lr"]
        if isinstance(lr, torch.Tensor):
            lr = lr.to(device=device, dtype=torch.float32)
        kwargs = dict(lr=lr, beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"], maximize=group["maximize"])
        impl = "torch" if force_torch else resolve("lion", self.backend, device)
        if impl in ("triton", "cuda"):  # one pass: clip coefficient, update and EMA fold together
            launcher("lion", impl).lion_step(params, grads, exp_avgs, coef=coef, shadows=shadows,
                                             ema_decay=ema_decay, **kwargs)
            return
        for p, g, m in zip(params, grads, exp_avgs):
            lion_reference(p, g if coef is None else g.float() * coef, m, **kwargs)
        if shadows is not None:  # EMA's torch path
            torch._foreach_lerp_(shadows, [p.to(shadows[0].dtype) for p in params], 1.0 - ema_decay)


def lion_reference(p, grad, exp_avg, *, lr, beta1, beta2, weight_decay, maximize):
    """One Lion update of one tensor in fp32 torch ops."""
    g = -grad.float() if maximize else grad.float()
    m = exp_avg.float()
    c = m * beta1 + g * (1 - beta1)
    pf = p.float() * (1 - lr * weight_decay) - lr * torch.sign(c)
    p.copy_(pf)
    exp_avg.copy_(m * beta2 + g * (1 - beta2))
