"""``fastgen.optim.FusedProdigy``: Prodigy (Mishchenko & Defazio, 2023), the update of the
``prodigyopt`` package's ``Prodigy``, with no host sync and deterministic reductions.

Prodigy is Adam whose step size ``d`` estimates the distance to the solution. Per step,
with ``k`` the step index, ``lr`` the (usually 1.0) scale and ``bc`` the optional bias
correction ``sqrt(1 - beta2^(k+1)) / (1 - beta1^(k+1))``::

    dlr = d * lr * bc
    g  <- g + weight_decay * p                                (decouple=False only)
    m  <- beta1 * m + d (1 - beta1) g                         v <- beta2 * v + d^2 (1 - beta2) g^2
    s  <- beta3 * s + (d / d0) * (d if safeguard_warmup else dlr) * g[::slice_p]
    num <- beta3 * num + (d / d0) * dlr * <g[::slice_p], p0 - p[::slice_p]>     (sum over parameters)
    den  = sum |s|
    d_hat = d_coef * num / den;  d <- max(d, d_hat) at d = d0;  d_max <- max(d_max, d_hat);
    d <- min(d_max, d * growth_rate)
    p  <- p - weight_decay * dlr * p                          (decouple=True)
    p  <- p - dlr * m / (sqrt(v) + d * eps)                   (beta1 = 0: dlr * d * g instead of m)

(``beta3 = sqrt(beta2)`` by default; ``p0`` is the parameter at the first step; a step with
``den = 0`` leaves ``p``, ``d`` and ``num`` as they were; unlike ``prodigyopt``, the step
counts still advance, since the test is made on the device.) ``d``, ``d_max`` and ``num`` are fp64
0-d tensors on the parameters' device, so a step never waits for the GPU (``prodigyopt``
calls ``.item()`` twice per parameter). The dot products and ``|s|`` sums are per-tensor fp32
reductions added in fp64 in a fixed order: deterministic. ``backend="triton"`` makes the step
two multi-tensor Triton passes per dtype mix (``kernels/prodigy.py``: moments and the two
sums, then the parameter update; ``backend="cuda"``: the same two passes in CUDA C++,
``csrc/optim/prodigy.cu``; ``slice_p = 1`` and contiguous tensors, the rest take the
foreach path); otherwise (the default on CPU) ``torch._foreach_*`` multi-tensor launches, one
per operation over the whole list.

State per parameter, as ``prodigyopt``: ``step``, ``s``, ``p0``, ``exp_avg`` (if beta1 > 0),
``exp_avg_sq``; the group holds ``d``, ``d_max``, ``d_numerator``, ``k``.
"""

from __future__ import annotations

import math

import torch

from fastgen.backend import launcher, resolve
from fastgen.optim._common import KERNEL_DTYPES, check_grad, check_state_kind

_SCALARS = ("d", "d_max", "d_numerator")


def _f32(x: torch.Tensor) -> torch.Tensor:
    """A coefficient in fp32, as torch casts an fp64 alpha."""
    return x.to(torch.float32)


class FusedProdigy(torch.optim.Optimizer):
    r"""Prodigy with the ``prodigyopt.Prodigy`` arguments and update (see the module docstring)::

        m <- beta1 m + d (1 - beta1) g        v <- beta2 v + d^2 (1 - beta2) g^2
        d <- min(d_max, growth_rate * max(d, d_coef * num / sum|s|))
        p <- p - d lr m / (sqrt(v) + d eps)

    Args: ``lr`` (1.0), ``betas``, ``beta3``, ``eps``, ``weight_decay``, ``decouple``,
    ``use_bias_correction``, ``safeguard_warmup``, ``d0``, ``d_coef``, ``growth_rate``,
    ``slice_p`` as ``prodigyopt``; ``fsdp_in_use=True`` is refused (use ``prodigyopt``);
    ``backend`` ``"auto" | "triton" | "cuda" | "torch"``.
    """

    def __init__(self, params, lr=1.0, betas=(0.9, 0.999), beta3=None, eps=1e-8, weight_decay=0.0, decouple=True,
                 use_bias_correction=False, safeguard_warmup=False, d0=1e-6, d_coef=1.0, growth_rate=float("inf"),
                 fsdp_in_use=False, slice_p=1, *, backend: str = "auto"):
        if not 0.0 < d0:
            raise ValueError(f"FusedProdigy: invalid d0 {d0}")
        if not 0.0 < lr:
            raise ValueError(f"FusedProdigy: invalid learning rate {lr}")
        if not 0.0 < eps:
            raise ValueError(f"FusedProdigy: invalid epsilon {eps}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"FusedProdigy: invalid betas {betas}; each must be in [0, 1)")
        if not (isinstance(slice_p, int) and slice_p >= 1):
            raise ValueError(f"FusedProdigy: slice_p must be an int >= 1, got {slice_p!r}")
        if fsdp_in_use:
            raise ValueError("FusedProdigy: fsdp_in_use=True (an all-reduce of d's sums) is not supported")
        defaults = dict(lr=lr, betas=betas, beta3=beta3, eps=eps, weight_decay=weight_decay, d=d0, d0=d0, d_max=d0,
                        d_numerator=0.0, d_coef=d_coef, k=0, growth_rate=growth_rate,
                        use_bias_correction=use_bias_correction, decouple=decouple,
                        safeguard_warmup=safeguard_warmup, fsdp_in_use=False, slice_p=slice_p)
        super().__init__(params, defaults)
        self.backend = backend

    def _kernel_split(self, params, grads, impl, slice_p):
        """({(p dtype, g dtype): [indices]} the kernel passes take, [indices] for the foreach path)."""
        if impl not in ("triton", "cuda") or slice_p != 1:
            return {}, list(range(len(params)))
        buckets, rest = {}, []
        for i, (p, g) in enumerate(zip(params, grads)):
            st = self.state[p]
            tensors = [p, g, st["p0"], st["exp_avg_sq"], st["s"]] + ([st["exp_avg"]] if "exp_avg" in st else [])
            if (p.dtype in KERNEL_DTYPES and g.dtype in KERNEL_DTYPES and st["p0"].numel() == p.numel()
                    and all(t.is_contiguous() and t.device == p.device for t in tensors)):
                buckets.setdefault((p.dtype, g.dtype), []).append(i)
            else:
                rest.append(i)
        return buckets, rest

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a FusedProdigy or ``prodigyopt.Prodigy`` state dict (another kind raises)."""
        check_state_kind("FusedProdigy", state_dict, {"step", "s", "p0", "exp_avg", "exp_avg_sq"},
                         {"step", "s", "p0", "exp_avg_sq"})
        super().load_state_dict(state_dict)

    def _scalars(self, device) -> dict:
        """d, d_max, d_numerator of the first group as fp64 device tensors (floats from a
        prodigyopt checkpoint are converted once)."""
        g0 = self.param_groups[0]
        for key in _SCALARS:
            if not isinstance(g0[key], torch.Tensor) or g0[key].device != device:
                g0[key] = torch.as_tensor(g0[key], dtype=torch.float64).to(device)
        return {key: g0[key] for key in _SCALARS}

    def state_dict(self) -> dict:
        """``prodigyopt``'s layout: each group's ``k`` as an int (reading the device counter syncs)."""
        sd = super().state_dict()
        for group in sd["param_groups"]:
            if isinstance(group.get("k"), torch.Tensor):
                group["k"] = int(group["k"].item())
        return sd

    def _step_counts(self, device) -> list:
        """Each group's ``k`` as an fp64 0-d device tensor, advanced in place by a step (a captured
        step's bias correction then changes at every replay); an int from a checkpoint moves once."""
        for group in self.param_groups:
            if not isinstance(group["k"], torch.Tensor) or group["k"].device != device:
                group["k"] = torch.as_tensor(float(group["k"]), dtype=torch.float64).to(device)
        return [group["k"] for group in self.param_groups]

    def _init_state(self, params, beta1: float, slice_p: int) -> None:
        for p in params:
            state = self.state[p]
            if "step" not in state:
                state["step"] = 0
                state["s"] = torch.zeros_like(p.flatten()[::slice_p]).detach()
                state["p0"] = (p.flatten()[::slice_p].detach().clone() if p.any()
                               else torch.tensor(0, device=p.device, dtype=p.dtype))
                if beta1 > 0:
                    state["exp_avg"] = torch.zeros_like(p).detach()
                state["exp_avg_sq"] = torch.zeros_like(p).detach()

    def _moments(self, group, params, grads, buckets, rest, c: dict, impl, dots: list, abs_sums: list) -> None:
        """First pass of one group: m, v, s updated; each tensor's <g, p0 - p> and sum |s| appended
        to ``dots`` / ``abs_sums`` (kernel buckets first, then the foreach rest, in a fixed order)."""
        beta1, beta2, beta3, d, d0, dlr = c["beta1"], c["beta2"], c["beta3"], c["d"], c["d0"], c["dlr"]
        s_coef = (d / d0) * (d if group["safeguard_warmup"] else dlr)
        if buckets:
            prodigy_moments = launcher("prodigy", impl).prodigy_moments
            coefs = torch.stack([d * (1 - beta1), d * d * (1 - beta2), s_coef]).float()
            for idx in buckets.values():
                st = [self.state[params[i]] for i in idx]
                dot, ab = prodigy_moments([params[i] for i in idx], [grads[i] for i in idx], [x["p0"] for x in st],
                                          [x["exp_avg"] for x in st] if beta1 > 0 else None,
                                          [x["exp_avg_sq"] for x in st], [x["s"] for x in st], coefs,
                                          beta1=beta1, beta2=beta2, beta3=beta3, weight_decay=0.0, coupled_wd=False)
                dots.append(dot)
                abs_sums.append(ab)
        params, grads = [params[i] for i in rest], [grads[i] for i in rest]
        if not params:
            return
        slice_p = group["slice_p"]
        sg = [g.flatten()[::slice_p] for g in grads]
        for p, g in zip(params, sg):
            dots.append(torch.dot(g, self.state[p]["p0"] - p.flatten()[::slice_p]))
        if beta1 > 0:
            ms = [self.state[p]["exp_avg"] for p in params]
            torch._foreach_mul_(ms, beta1)
            torch._foreach_add_(ms, torch._foreach_mul(grads, _f32(d * (1 - beta1))))
        vs = [self.state[p]["exp_avg_sq"] for p in params]
        torch._foreach_mul_(vs, beta2)
        torch._foreach_addcmul_(vs, torch._foreach_mul(grads, _f32(d * d * (1 - beta2))), grads)
        ss = [self.state[p]["s"] for p in params]
        torch._foreach_mul_(ss, beta3)
        torch._foreach_add_(ss, torch._foreach_mul(sg, _f32(s_coef)))
        abs_sums += [x.abs().sum() for x in ss]

    def _estimate_d(self, sc: dict, c: dict, dots: list, abs_sums: list, device):
        """d's update from the fixed-order fp64 sums of the per-tensor fp32 reductions (deterministic,
        no host sync), written in place into ``sc``; returns (new d, the step's dlr: 0 if sum |s| = 0)."""
        g0, d, d_max, d0, dlr = self.param_groups[0], c["d"], sc["d_max"], c["d0"], c["dlr"]
        zero = torch.zeros((), dtype=torch.float64, device=device)
        delta = (d / d0) * dlr * (torch.cat([x.reshape(-1) for x in dots]).double().sum() if dots else zero)
        d_denom = torch.cat([x.reshape(-1) for x in abs_sums]).double().sum() if abs_sums else zero
        ok = d_denom > 0  # prodigyopt returns before touching p, d and the numerator when the sum is 0
        global_num = sc["d_numerator"] * c["beta3"] + delta
        d_hat = torch.where(ok, g0["d_coef"] * global_num / torch.where(ok, d_denom, 1.0), d)
        new_d = torch.where(d == d0, torch.maximum(d, d_hat), d)
        new_d_max = torch.maximum(d_max, d_hat)
        new_d = torch.minimum(new_d_max, new_d * g0["growth_rate"])  # d > 0: inf growth gives d_max
        # in place: the same device tensors every step (a captured step feeds its own next replay)
        sc["d"].copy_(torch.where(ok, new_d, d))
        sc["d_max"].copy_(torch.where(ok, new_d_max, d_max))
        sc["d_numerator"].copy_(torch.where(ok, global_num, sc["d_numerator"]))
        for group in self.param_groups:
            group.update(d=sc["d"], d_max=sc["d_max"], d_numerator=sc["d_numerator"], d_denom=d_denom, d_hat=d_hat)
        return sc["d"], torch.where(ok, dlr, 0.0)

    def _update(self, group, params, grads, buckets, rest, new_d, step_dlr, beta1: float, impl) -> None:
        """Second pass of one group: decoupled weight decay and ``p -= dlr m / (sqrt(v) + d eps)``."""
        decay = group["weight_decay"]
        for p in params:
            self.state[p]["step"] += 1
        scale = -step_dlr if beta1 > 0 else -step_dlr * new_d
        if buckets:
            prodigy_update = launcher("prodigy", impl).prodigy_update
            coefs = torch.stack([-decay * step_dlr, scale, new_d * group["eps"]]).float()
            for idx in buckets.values():
                ps = [params[i] for i in idx]
                prodigy_update(ps, [self.state[p]["exp_avg"] for p in ps] if beta1 > 0 else [grads[i] for i in idx],
                               [self.state[p]["exp_avg_sq"] for p in ps], coefs,
                               decoupled_wd=decay != 0 and group["decouple"])
        params, grads = [params[i] for i in rest], [grads[i] for i in rest]
        if not params:
            return
        denom = torch._foreach_sqrt([self.state[p]["exp_avg_sq"] for p in params])
        torch._foreach_add_(denom, _f32(new_d * group["eps"]))
        if decay != 0 and group["decouple"]:
            torch._foreach_add_(params, torch._foreach_mul(params, _f32(-decay * step_dlr)))
        num = [self.state[p]["exp_avg"] for p in params] if beta1 > 0 else grads
        torch._foreach_add_(params, torch._foreach_mul(torch._foreach_div(num, denom), _f32(scale)))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        first = next((p for g in self.param_groups for p in g["params"] if p.grad is not None), None)
        if first is None:
            return loss
        device = first.device
        g0 = self.param_groups[0]
        sc = self._scalars(device)
        ks = self._step_counts(device)
        beta1, beta2 = g0["betas"]
        c = dict(beta1=beta1, beta2=beta2, beta3=g0["beta3"] if g0["beta3"] is not None else math.sqrt(beta2),
                 d=sc["d"], d0=g0["d0"])
        lr = max(group["lr"] for group in self.param_groups)
        if g0["use_bias_correction"]:  # sqrt(1 - beta2^(k+1)) / (1 - beta1^(k+1)) from the device k
            k1 = ks[0] + 1
            c["dlr"] = c["d"] * (lr * torch.sqrt(1 - torch.pow(beta2, k1)) / (1 - torch.pow(beta1, k1)))
        else:
            c["dlr"] = c["d"] * lr
        impl = resolve("prodigy", self.backend, device)
        dots, abs_sums, active = [], [], []
        for group in self.param_groups:
            if group["lr"] not in (lr, 0.0):
                raise RuntimeError("FusedProdigy: different lr values in different parameter groups are only "
                                   "supported for values of 0 (as prodigyopt)")
            params = [p for p in group["params"] if check_grad(p, "FusedProdigy")]
            if not params:
                continue
            grads = [p.grad for p in params]
            if group["weight_decay"] != 0 and not group["decouple"]:
                torch._foreach_add_(grads, params, alpha=group["weight_decay"])
            self._init_state(params, beta1, group["slice_p"])
            buckets, rest = self._kernel_split(params, grads, impl, group["slice_p"])
            active.append((group, params, grads, buckets, rest))
            if group["lr"] != 0.0:
                self._moments(group, params, grads, buckets, rest, c, impl, dots, abs_sums)
        new_d, step_dlr = self._estimate_d(sc, c, dots, abs_sums, device)
        for group, params, grads, buckets, rest in active:
            self._update(group, params, grads, buckets, rest, new_d, step_dlr, beta1, impl)
        for k in ks:
            k.add_(1)
        return loss
