"""``fastgen.optim.FusedAdamW8bit``: AdamW with both moments stored in 8 bits.

The update is ``FusedAdamW``'s (``torch.optim.AdamW``'s), in fp32; only the storage of the
moments differs. Each moment of a parameter with at least ``min_8bit_size`` elements is kept
block-wise quantized (``fastgen.optim.quant8``: blocks of 256, an fp32 absmax per block, the
signed dynamic map for ``m``, the unsigned one for ``v``)::

    m, v = dequantize(states)          -> the AdamW update of p, m, v in fp32 ->
    states = quantize(m), quantize(v)     (absmax recomputed from the new values)

which is one pass per parameter list in Triton (``backend="triton"``, kernels/adamw8bit.py) or
CUDA C++ (``backend="cuda"``, csrc/optim/adamw8bit.cu), and the same fp32 arithmetic tensor
by tensor with ``backend="torch"``. State bytes per parameter: 2 (codes) + 8 / 256 (absmax)
= 2.03 against AdamW's 8. Smaller parameters (biases, norms) keep fp32 moments and take
``FusedAdamW``'s kernels, as bitsandbytes does.

State dict: per parameter ``step`` plus either ``exp_avg_q`` / ``exp_avg_sq_q`` (uint8, the
parameter's shape) and ``exp_avg_absmax`` / ``exp_avg_sq_absmax`` (fp32 ``[ceil(n / 256)]``),
or fp32 ``exp_avg`` / ``exp_avg_sq``. :meth:`FusedAdamW8bit.adamw_state_dict` converts to a
``torch.optim.AdamW`` / ``FusedAdamW`` state dict, :meth:`FusedAdamW8bit.load_adamw_state_dict`
from one; ``load_state_dict`` refuses another optimizer's dict instead of guessing.
"""

from __future__ import annotations

import copy
from typing import Optional

import torch

from fastgen.backend import launcher, resolve
from fastgen.optim import quant8
from fastgen.optim._common import KERNEL_DTYPES, check_capture_ready, check_grad, load_states_without_cast, local
from fastgen.optim._one_pass import OnePass
from fastgen.optim.adamw import FusedAdamW, adamw_reference

Q_KEYS = ("exp_avg_q", "exp_avg_absmax", "exp_avg_sq_q", "exp_avg_sq_absmax")
FULL_KEYS = ("exp_avg", "exp_avg_sq")


class FusedAdamW8bit(FusedAdamW):
    r"""AdamW with block-wise 8-bit moments (``torch.optim.AdamW``'s update, 2.03 state bytes/param).

    Per parameter, in fp32 (``g`` its gradient, ``t`` its step count)::

        m, v = SMAP[cm] * am, UMAP[cv] * av                  (dequantize each 256-block)
        p <- p * (1 - lr * weight_decay)
        m <- lerp(m, g, 1 - beta1)        v <- beta2 * v + (1 - beta2) * g^2
        p <- p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
        am, cm = max|m|, nearest(SMAP, m / am)    av, cv = max v, nearest(UMAP, v / av)

    Args: as :class:`FusedAdamW` (``foreach`` / ``fused`` ignored, ``capturable`` honoured, the
    one-pass ``max_grad_norm`` / ``ema`` folded into the 8-bit pass too,
    ``differentiable`` and ``amsgrad`` refused: the 8-bit states hold no running max), plus
    ``min_8bit_size``: parameters with fewer elements keep fp32 moments (default 4096, as
    bitsandbytes). Parameters must be fp32, fp16 or bf16 and contiguous to get 8-bit states;
    a float64 parameter of that size raises ``ValueError``; DTensor (FSDP2) parameters keep
    fp32 moments.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False,
                 maximize=False, *, foreach: Optional[bool] = None, capturable: bool = False,
                 differentiable: bool = False, fused: Optional[bool] = None, min_8bit_size: int = 4096,
                 backend: str = "auto", stochastic_rounding: bool = False, max_grad_norm: Optional[float] = None,
                 ema=None):
        if amsgrad:
            raise ValueError("FusedAdamW8bit: amsgrad=True is not served (8-bit states keep no running maximum "
                             "of v); use FusedAdamW(amsgrad=True)")
        if min_8bit_size < 0:
            raise ValueError(f"FusedAdamW8bit: min_8bit_size must be >= 0, got {min_8bit_size}")
        super().__init__(params, lr, betas, eps, weight_decay, False, maximize, foreach=foreach, capturable=capturable,
                         differentiable=differentiable, fused=fused, backend=backend, state_dtype=torch.float32,
                         stochastic_rounding=stochastic_rounding, max_grad_norm=max_grad_norm, ema=ema)
        self.min_8bit_size = int(min_8bit_size)

    # --------------------------------------------------------------------------- states

    def is_quantized(self, p: torch.Tensor) -> bool:
        """True if ``p`` gets (or has) 8-bit states."""
        state = self.state.get(p)
        if state:
            return "exp_avg_q" in state
        if getattr(p, "to_local", None) is not None or p.numel() < self.min_8bit_size:
            return False
        if p.dtype not in KERNEL_DTYPES:
            raise ValueError(f"FusedAdamW8bit: a {p.dtype} parameter of {p.numel()} elements: 8-bit states serve "
                             "float32, float16 and bfloat16 parameters; cast it, or raise min_8bit_size above its size "
                             "to keep fp32 states for it")
        return p.is_contiguous()

    def _init_state(self, p: torch.Tensor, amsgrad: bool = False) -> dict:
        state = self.state[p]
        if state:
            return state
        if not self.is_quantized(p):
            return super()._init_state(p, False)
        state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
        for key in ("exp_avg", "exp_avg_sq"):
            state[key + "_q"], state[key + "_absmax"] = quant8.quantize(torch.zeros_like(p, dtype=torch.float32),
                                                                        signed=key == "exp_avg")
        return state

    # --------------------------------------------------------------------------- step

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        one_pass = OnePass(self)
        for group in self.param_groups:
            if group.get("capturable"):
                check_capture_ready(self, group, "FusedAdamW8bit")
            full, q8 = [], {}
            for p in group["params"]:
                if not check_grad(p, "FusedAdamW8bit"):
                    continue
                state = self._init_state(p)
                if "exp_avg_q" not in state:
                    full.append((local(p), local(p.grad), local(state["exp_avg"]), local(state["exp_avg_sq"]), None,
                                 state["step"], one_pass.shadow(p)))
                    continue
                g = p.grad if p.grad.is_contiguous() else p.grad.contiguous()
                shadow = one_pass.shadow(p)
                if shadow is not None and not shadow.is_contiguous():
                    shadow = None
                    one_pass.give_back(p)
                key = (p.device, p.dtype, g.dtype, shadow is not None)
                q8.setdefault(key, []).append((p, g, *(state[k] for k in Q_KEYS), state["step"], shadow))
            self._update_items(group, full, one_pass)
            for (device, _, _, with_shadow), items in q8.items():
                *lists, shadows = map(list, zip(*items))
                self._update8(group, device, *lists, **one_pass.kwargs(shadows if with_shadow else None))
        one_pass.finish()
        return loss

    def _update8(self, group, device, params, grads, qms, ams, qvs, avs, steps, coef=None, shadows=None,
                 ema_decay=0.0):
        torch._foreach_add_(steps, 1.0)
        beta1, beta2 = group["betas"]
        lr = group["lr"]
        if isinstance(lr, torch.Tensor):
            lr = lr.to(device=device, dtype=torch.float32)
        kwargs = dict(lr=lr, beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
                      maximize=group["maximize"])
        seed = int(torch.randint(0, 2**31 - 1, (), generator=self._seed)) if self.stochastic_rounding else 0
        impl = resolve("adamw8bit", self.backend, device)
        if impl in ("triton", "cuda"):  # the same launcher signature (kernels/adamw8bit.py, fastgen/cuda/optim.py)
            adamw8bit_step = launcher("adamw8bit", impl).adamw8bit_step
            smap, sbound = quant8.tables(True, device)
            umap, ubound = quant8.tables(False, device)
            adamw8bit_step(params, grads, qms, ams, qvs, avs, steps, tables=(smap, sbound, umap, ubound),
                           stochastic_rounding=self.stochastic_rounding, seed=seed, coef=coef, shadows=shadows,
                           ema_decay=ema_decay, **kwargs)
            return
        gen = torch.Generator(device=device).manual_seed(seed) if self.stochastic_rounding else None
        for i, p in enumerate(params):
            adamw8bit_reference(p, grads[i] if coef is None else grads[i].float() * coef, qms[i], ams[i], qvs[i],
                                avs[i], steps[i], stochastic_rounding=self.stochastic_rounding, generator=gen,
                                **kwargs)
        if shadows is not None:  # EMA's torch path
            torch._foreach_lerp_(shadows, [p.to(shadows[0].dtype) for p in params], 1.0 - ema_decay)

    # --------------------------------------------------------------------------- state dicts

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a FusedAdamW8bit state dict. A full-precision AdamW dict (torch.optim.AdamW,
        FusedAdamW) raises: convert it with :meth:`load_adamw_state_dict`."""
        self._check_kind(state_dict)
        load_states_without_cast(self, state_dict, lambda p, key: torch.uint8 if key.endswith("_q") else torch.float32)

    def _check_kind(self, state_dict: dict) -> None:
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for pid, p in zip(saved_ids, params):
            keys = set(state_dict["state"].get(pid, {}))
            if not keys:
                continue
            want = {"step", *Q_KEYS} if self.is_quantized(p) else {"step", *FULL_KEYS}
            if keys != want:
                raise ValueError(
                    f"FusedAdamW8bit.load_state_dict: parameter {pid} ({p.numel()} elements) has states "
                    f"{sorted(keys)}, expected {sorted(want)}: this state dict comes from another optimizer kind "
                    "(or another min_8bit_size). A torch.optim.AdamW / FusedAdamW state dict converts with "
                    "load_adamw_state_dict().")

    def adamw_state_dict(self) -> dict:
        """This optimizer's state as a ``torch.optim.AdamW`` state dict (moments dequantized to fp32)."""
        sd = self.state_dict()
        out = {"state": {}, "param_groups": copy.deepcopy(sd["param_groups"])}
        for pid, state in sd["state"].items():
            if "exp_avg_q" in state:
                state = {"step": state["step"].clone(),
                         "exp_avg": quant8.dequantize(state["exp_avg_q"], state["exp_avg_absmax"], True),
                         "exp_avg_sq": quant8.dequantize(state["exp_avg_sq_q"], state["exp_avg_sq_absmax"], False)}
            else:
                state = {k: v.clone() for k, v in state.items()}
            out["state"][pid] = state
        return out

    def load_adamw_state_dict(self, state_dict: dict) -> None:
        """Load a ``torch.optim.AdamW`` / ``FusedAdamW`` state dict, quantizing the moments of the
        parameters that get 8-bit states (amsgrad states are refused)."""
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        converted = {"state": {}, "param_groups": copy.deepcopy(state_dict["param_groups"])}
        for g in converted["param_groups"]:
            if g.get("amsgrad"):
                raise ValueError("FusedAdamW8bit.load_adamw_state_dict: an amsgrad AdamW state is not served")
        for pid, p in zip(saved_ids, params):
            state = state_dict["state"].get(pid)
            if not state:
                continue
            if set(state) != {"step", *FULL_KEYS}:
                raise ValueError(f"load_adamw_state_dict: parameter {pid} has states {sorted(state)}, not AdamW's")
            if self.is_quantized(p):
                new = {"step": torch.as_tensor(state["step"], dtype=torch.float32).clone()}
                for key in FULL_KEYS:
                    new[key + "_q"], new[key + "_absmax"] = quant8.quantize(
                        state[key].to(p.device, torch.float32).contiguous(), signed=key == "exp_avg")
                state = new
            converted["state"][pid] = state
        self.load_state_dict(converted)


def adamw8bit_reference(p, grad, qm, am, qv, av, step, *, lr, beta1, beta2, eps, weight_decay, maximize,
                        stochastic_rounding=False, generator=None):
    """One 8-bit AdamW update of one contiguous tensor in fp32 torch ops (``step`` already incremented)."""
    m = quant8.dequantize(qm, am, signed=True)
    v = quant8.dequantize(qv, av, signed=False)
    adamw_reference(p, grad, m, v, None, step, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
                    amsgrad=False, maximize=maximize, stochastic_rounding=stochastic_rounding, generator=generator)
    for codes, absmax, x, signed in ((qm, am, m, True), (qv, av, v, False)):
        c, a = quant8.quantize(x, signed)
        codes.copy_(c)
        absmax.copy_(a)
