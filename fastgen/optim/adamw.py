"""``fastgen.optim.FusedAdamW``: a drop-in for ``torch.optim.AdamW`` with multi-tensor kernels.

The update (decoupled weight decay, bias-corrected moments, optional AMSGrad) is
the one ``torch.optim.AdamW`` makes, computed in fp32 whatever the storage dtypes:

    p <- p * (1 - lr * wd)
    m <- lerp(m, g, 1 - beta1)           v <- beta2 * v + (1 - beta2) * g^2
    p <- p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

What it adds: parameters of mixed dtypes in one group with states kept in fp32
(``state_dtype=None``) or bf16 (``state_dtype=torch.bfloat16``), stochastic
rounding of bf16 parameters, ``lr`` as a device tensor (no host sync), and one
Triton launch per dtype combination for the whole parameter list
(``backend="triton"``) or of the CUDA C++ ``multi_tensor_apply`` launcher
(``backend="cuda"``). ``backend="torch"`` runs the same math tensor by tensor.

The state dict has ``torch.optim.AdamW``'s layout (``step``, ``exp_avg``,
``exp_avg_sq``, ``max_exp_avg_sq``), so checkpoints move between the two both ways.
Parameters that are DTensors (FSDP2 ``fully_shard``) are updated on their local shards.
"""

from __future__ import annotations

from typing import Optional

import torch

from fastgen.backend import launcher, resolve
from fastgen.optim._one_pass import OnePass, check_one_pass
from fastgen.optim._common import (bucket, check_capture_ready, check_grad, check_state_kind, check_torch_flags,
                                   load_states_without_cast, local, stochastic_round_bf16)


class FusedAdamW(torch.optim.Optimizer):
    r"""AdamW (decoupled weight decay) over whole parameter lists in one kernel launch per dtype mix.

    A drop-in for ``torch.optim.AdamW``: the same arguments, defaults, update and state dict.
    Per parameter, with ``t`` its step count and ``g`` its gradient (``-g`` if ``maximize``),
    in fp32 whatever the storage dtypes::

        p <- p * (1 - lr * weight_decay)
        m <- lerp(m, g, 1 - beta1)                      = beta1 * m + (1 - beta1) * g
        v <- beta2 * v + (1 - beta2) * g^2
        v_hat = max(v_max, v)  (amsgrad; stored as v_max), else v
        p <- p - lr / (1 - beta1^t) * m / (sqrt(v_hat) / sqrt(1 - beta2^t) + eps)

    Args:
        params: parameters or parameter groups, as for any ``torch.optim`` optimizer.
        lr: float or a 0-d fp32 tensor (read on the device: a tensor lr never syncs).
        betas, eps, weight_decay, amsgrad, maximize: as ``torch.optim.AdamW``.
        foreach, fused: accepted for drop-in use and ignored (no-ops): the ``backend``
            decides the implementation.
        capturable: honoured — a step never syncs with the host (step counters live on the
            parameters' device), so it can be captured in a CUDA graph; with ``capturable=True``
            a capture before the states exist raises (run one eager step first).
        differentiable: not supported; True raises ``ValueError``.
        backend: ``"auto" | "triton" | "cuda" | "torch"``.
        state_dtype: ``None`` / ``torch.float32`` (default) or ``torch.bfloat16`` moments.
        stochastic_rounding: round bf16 parameters stochastically at the store.
        max_grad_norm, ema: the one-pass step. ``max_grad_norm=c`` first computes the global
            gradient 2-norm (one deterministic read of the gradients, no host sync; kept as
            ``opt.grad_norm``), then each parameter's update reads ``g * min(1, c / (norm + 1e-6))``
            (the gradients themselves are not written); ``ema=EMA(...)`` (over parameters this
            optimizer owns) folds each updated parameter into its average in the same pass.
            The result equals ``clip_grad_norm_(params, c)``, ``step()``, ``ema.update()`` with the
            same backend, exactly for fp32 gradients.
    """

    def __init__(
        self,
        params,
        lr=1e-3,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=1e-2,
        amsgrad=False,
        maximize=False,
        *,
        foreach: Optional[bool] = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: Optional[bool] = None,
        backend: str = "auto",
        state_dtype: Optional[torch.dtype] = None,
        stochastic_rounding: bool = False,
        max_grad_norm: Optional[float] = None,
        ema=None,
    ):
        check_torch_flags("FusedAdamW", differentiable=differentiable, foreach=foreach, fused=fused)
        betas = tuple(float(b) for b in betas)  # tensor betas (torch allows them) become floats once, here
        if isinstance(lr, torch.Tensor):
            if lr.numel() != 1:
                raise ValueError("FusedAdamW: a tensor lr must have one element")
        elif not 0.0 <= lr:
            raise ValueError(f"FusedAdamW: invalid learning rate {lr}")
        if not 0.0 <= eps:
            raise ValueError(f"FusedAdamW: invalid epsilon {eps}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"FusedAdamW: invalid betas {betas}; each must be in [0, 1)")
        if not 0.0 <= weight_decay:
            raise ValueError(f"FusedAdamW: invalid weight_decay {weight_decay}")
        if state_dtype not in (None, torch.float32, torch.bfloat16):
            raise ValueError(f"FusedAdamW: state_dtype must be None, torch.float32 or torch.bfloat16, got {state_dtype}")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize,
                        foreach=foreach, capturable=capturable, differentiable=False, fused=fused)
        super().__init__(params, defaults)
        self.backend = backend
        self.state_dtype = state_dtype or torch.float32
        self.stochastic_rounding = stochastic_rounding
        self._seed = torch.Generator().manual_seed(0x5EED)
        self.max_grad_norm, self.ema = check_one_pass(self, type(self).__name__, max_grad_norm, ema)
        self.grad_norm: Optional[torch.Tensor] = None  # the total gradient norm of the last step (max_grad_norm)

    def _init_state(self, p: torch.Tensor, amsgrad: bool) -> dict:
        state = self.state[p]
        if not state:
            lp = local(p)
            state["step"] = torch.zeros((), dtype=torch.float32, device=lp.device)
            state["exp_avg"] = torch.zeros_like(p, dtype=self.state_dtype, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=self.state_dtype, memory_format=torch.preserve_format)
        if amsgrad and "max_exp_avg_sq" not in state:
            state["max_exp_avg_sq"] = torch.zeros_like(p, dtype=self.state_dtype, memory_format=torch.preserve_format)
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a FusedAdamW or torch.optim.AdamW state dict; states keep (or get) this optimizer's dtypes.
        Another optimizer's states (Lion, 8-bit AdamW, ...) raise ``ValueError``."""
        check_state_kind("FusedAdamW", state_dict, {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"},
                         {"step", "exp_avg", "exp_avg_sq"},
                         "An 8-bit AdamW state converts with FusedAdamW8bit.adamw_state_dict().")
        load_states_without_cast(self, state_dict, lambda p, key: torch.float32 if key == "step" else self.state_dtype)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        one_pass = OnePass(self)
        for group in self.param_groups:
            amsgrad = group["amsgrad"]
            if group.get("capturable"):
                check_capture_ready(self, group, "FusedAdamW")
            items = []
            for p in group["params"]:
                if not check_grad(p, "FusedAdamW"):
                    continue
                state = self._init_state(p, amsgrad)
                items.append((local(p), local(p.grad), local(state["exp_avg"]), local(state["exp_avg_sq"]),
                              local(state["max_exp_avg_sq"]) if amsgrad else None, state["step"],
                              one_pass.shadow(p)))
            self._update_items(group, items, one_pass)
        one_pass.finish()
        return loss

    def _update_items(self, group, items, one_pass) -> None:
        """Bucket ``(param, grad, states..., shadow)`` tuples and update each bucket in one launch."""
        for with_shadow in (False, True):
            buckets, fallback = bucket([it for it in items if (it[-1] is not None) == with_shadow])
            for (device, _, _), lists in buckets.items():
                self._update(group, device, *lists[:-1], **one_pass.kwargs(lists[-1] if with_shadow else None))
            for item in fallback:  # strided or float64: the reference path, tensor by tensor
                self._update(group, item[0].device, *([t] for t in item[:-1]), force_torch=True,
                             **one_pass.kwargs([item[-1]] if with_shadow else None))

    def _update(self, group, device, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, force_torch=False,
                coef=None, shadows=None, ema_decay=0.0):
        torch._foreach_add_(steps, 1.0)
        beta1, beta2 = group["betas"]
        impl = "torch" if force_torch else resolve("adamw", self.backend, device)
        lr = group["lr"]
        if isinstance(lr, torch.Tensor):
            lr = lr.to(device=device, dtype=torch.float32)
        kwargs = dict(lr=lr, beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
                      amsgrad=group["amsgrad"], maximize=group["maximize"])
        seed = int(torch.randint(0, 2**31 - 1, (), generator=self._seed)) if self.stochastic_rounding else 0
        if impl in ("triton", "cuda"):  # one pass: clip coefficient, update, rounding and EMA fold together
            launcher("adamw", impl).adamw_step(
                params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, stochastic_rounding=self.stochastic_rounding,
                seed=seed, coef=coef, shadows=shadows, ema_decay=ema_decay, **kwargs)
            return
        gen = torch.Generator(device=device).manual_seed(seed) if self.stochastic_rounding else None
        for i, p in enumerate(params):
            adamw_reference(p, grads[i] if coef is None else grads[i].float() * coef, exp_avgs[i], exp_avg_sqs[i],
                            max_exp_avg_sqs[i] if group["amsgrad"] else None, steps[i],
                            stochastic_rounding=self.stochastic_rounding, generator=gen, **kwargs)
        if shadows is not None:  # EMA's torch path
            torch._foreach_lerp_(shadows, [p.to(shadows[0].dtype) for p in params], 1.0 - ema_decay)


def adamw_reference(p, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, step, *, lr, beta1, beta2, eps, weight_decay,
                    amsgrad, maximize, stochastic_rounding=False, generator=None):
    """One AdamW update of one tensor in fp32 torch ops (``step`` already incremented); no host sync."""
    g = grad.float()
    if maximize:
        g = -g
    pf = p.float()
    m = exp_avg.float()
    v = exp_avg_sq.float()
    pf.mul_(1 - lr * weight_decay)
    m.lerp_(g, 1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    exp_avg.copy_(m)
    exp_avg_sq.copy_(v)
    if amsgrad:
        v = torch.maximum(max_exp_avg_sq.float(), v)
        max_exp_avg_sq.copy_(v)
    # Bias corrections in fp64 (as torch computes them on the host), kept on the device.
    t = step.double()
    bias1 = 1 - torch.pow(beta1, t)
    bias2_sqrt = (1 - torch.pow(beta2, t)).sqrt()
    denom = v.sqrt().div_(bias2_sqrt).add_(eps)
    pf.sub_((lr / bias1) * (m / denom))
    if stochastic_rounding and p.dtype == torch.bfloat16:
        p.copy_(stochastic_round_bf16(pf, generator))
    else:
        p.copy_(pf)
