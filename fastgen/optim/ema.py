"""``fastgen.optim.EMA``: an exponential moving average of a model's weights.

Every ``update_every``-th call of :meth:`EMA.update` (the n-th averaging update)::

    d      = min(decay, (1 + n) / (10 + n))     if warmup, else decay
    shadow <- shadow + (1 - d) * (param - shadow)

for every floating-point parameter, in one multi-tensor launch per dtype pair
(``backend="triton"`` or the CUDA C++ launcher with ``"cuda"``; fp32 math, one rounding
at the store) or with ``torch._foreach_lerp_`` (``backend="torch"``); buffers
are copied as they are. The shadow is kept in fp32 by default (``dtype=``), so a bf16
model's average does not stall on bf16 rounding. ``with ema.average_parameters(model):``
swaps the averaged weights in for evaluation and puts the trained ones back.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from typing import Iterator, Optional

import torch

from fastgen.backend import resolve
from fastgen.optim._common import KERNEL_DTYPES, dense_alike, local

_LAYOUT = "strided or float64 tensors"


class EMA:
    def __init__(self, model: torch.nn.Module, decay: float = 0.9999, warmup: bool = True, update_every: int = 1,
                 *, dtype: Optional[torch.dtype] = torch.float32, backend: str = "auto"):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA: decay must be in [0, 1], got {decay}")
        if update_every < 1:
            raise ValueError(f"EMA: update_every must be >= 1, got {update_every}")
        self.decay, self.warmup, self.update_every, self.backend = decay, warmup, update_every, backend
        self.num_updates = 0  # averaging updates made
        self.num_calls = 0  # calls of update()
        self.shadow: dict[str, torch.Tensor] = {}
        for name, p in model.named_parameters():
            if p.is_floating_point():
                self.shadow[name] = local(p).detach().to(dtype or p.dtype, copy=True)
        self.buffers: dict[str, torch.Tensor] = {n: b.detach().clone() for n, b in model.named_buffers()}

    def current_decay(self) -> float:
        """The decay the next averaging update will use."""
        n = self.num_updates + 1
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        """Fold the model's current weights into the average (every ``update_every``-th call)."""
        self.num_calls += 1
        if self.num_calls % self.update_every:
            return
        decay = self.current_decay()
        self.num_updates += 1
        params = dict(model.named_parameters())
        groups = defaultdict(lambda: ([], []))
        for name, s in self.shadow.items():
            p = local(params[name]).detach()
            key = (s.device, s.dtype, p.dtype)
            groups[key][0].append(s)
            groups[key][1].append(p)
        for (device, _, p_dtype), (shadows, ps) in groups.items():
            kernel_ok = p_dtype in KERNEL_DTYPES and shadows[0].dtype in KERNEL_DTYPES and all(
                dense_alike(s, p) for s, p in zip(shadows, ps))
            unsupported = None if kernel_ok else {"triton": _LAYOUT, "cuda": _LAYOUT}
            impl = resolve("ema", self.backend, device, unsupported)
            if impl in ("triton", "cuda"):
                if impl == "triton":
                    from fastgen.kernels.ema import ema_update_
                else:
                    from fastgen.cuda.optim import ema_update_
                ema_update_(shadows, ps, decay)
            else:
                torch._foreach_lerp_(shadows, [p.to(shadows[0].dtype) for p in ps], 1.0 - decay)
        for name, b in model.named_buffers():
            if name in self.buffers:
                self.buffers[name].copy_(b)

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module) -> None:
        """Write the averaged weights (and buffers) into ``model``."""
        params = dict(model.named_parameters())
        for name, s in self.shadow.items():
            local(params[name]).detach().copy_(s)
        for name, b in model.named_buffers():
            if name in self.buffers:
                b.copy_(self.buffers[name])

    @contextlib.contextmanager
    def average_parameters(self, model: torch.nn.Module) -> Iterator[torch.nn.Module]:
        """Evaluate ``model`` with the averaged weights inside the block; its own come back after."""
        params = dict(model.named_parameters())
        saved = {n: local(params[n]).detach().clone() for n in self.shadow}
        saved_buffers = {n: b.detach().clone() for n, b in model.named_buffers() if n in self.buffers}
        self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                for n, t in saved.items():
                    local(params[n]).detach().copy_(t)
                for n, b in model.named_buffers():
                    if n in saved_buffers:
                        b.copy_(saved_buffers[n])

    def state_dict(self) -> dict:
        return {"decay": self.decay, "warmup": self.warmup, "update_every": self.update_every,
                "num_updates": self.num_updates, "num_calls": self.num_calls,
                "shadow": dict(self.shadow), "buffers": dict(self.buffers)}

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.shadow) - set(state["shadow"])
        if missing:
            raise KeyError(f"EMA.load_state_dict: no average for parameters {sorted(missing)}")
        for key in ("decay", "warmup", "update_every", "num_updates", "num_calls"):
            setattr(self, key, state[key])
        for name, s in self.shadow.items():
            s.copy_(state["shadow"][name])
        for name, b in self.buffers.items():
            if name in state.get("buffers", {}):
                b.copy_(state["buffers"][name])
