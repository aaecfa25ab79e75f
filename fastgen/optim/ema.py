"""``fastgen.optim.EMA``: an exponential moving average of a model's weights.

Every ``update_every``-th call of :meth:`EMA.update` (the n-th averaging update)::

    d      = min(decay, (1 + n) / (10 + n))     if warmup, else decay
    shadow <- shadow + (1 - d) * (param - shadow)

for every tracked parameter (those with ``requires_grad``, by default), in one multi-tensor launch per dtype pair
(``backend="triton"`` or the CUDA C++ launcher with ``"cuda"``; fp32 math, one rounding
at the store) or with ``torch._foreach_lerp_`` (``backend="torch"``); buffers
are copied as they are. The shadow is kept in fp32 by default (``dtype=``), so a bf16
model's average does not stall on bf16 rounding. ``with ema.average_parameters(model):``
swaps the averaged weights in for evaluation and puts the trained ones back.

CUDA graphs: the count ``n`` also lives on the shadows' device (a float64 0-d tensor, exact
to 2^53, incremented in place by every averaging update), so the warm-up decay can be
computed there: ``d = min(decay, (1 + n) / (10 + n))`` in float64 and ``1 - d`` rounded once
to fp32, the very numbers the host computes. An eager update uses the host's count (and so
keeps the one-pass optimizer step fused); an update captured in a graph uses the device's,
and from then on the device count is the truth (each replay advances it; ``num_updates``
reads it back). ``update_every > 1`` decides on the host which calls average, so it cannot be
captured (a clear error).
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from typing import Iterator, Optional

import torch

from fastgen.backend import launcher, resolve
from fastgen.optim._common import KERNEL_DTYPES, dense_alike, local
from fastgen.optim._common import capturing as _capturing  # called through this name (patchable per module)

_LAYOUT = "strided or float64 tensors"


class EMA:
    r"""An exponential moving average of a model's trainable weights.

    Every ``update_every``-th call of :meth:`update` (the n-th averaging update), for every
    tracked parameter::

        d      = min(decay, (1 + n) / (10 + n))     if warmup, else decay
        shadow <- shadow + (1 - d) * (param - shadow)

    Args:
        model_or_params: an ``nn.Module`` (its named parameters are tracked, its buffers
            copied) or an iterable of parameters (named ``"0"``, ``"1"``, ... by position).
        decay, warmup, update_every: the schedule above.
        dtype: dtype of the shadow (fp32 by default, so a bf16 model's average does not stall
            on bf16 rounding); ``None`` keeps each parameter's dtype.
        backend: ``"auto" | "triton" | "cuda" | "torch"``.
        trainable_only: track only parameters with ``requires_grad`` (the default: a LoRA's
            frozen base gets no shadow); ``False`` tracks every floating-point parameter.

    ``update()``, ``copy_to()`` and ``average_parameters()`` default to the module or
    parameters given here; passing another model checks it parameter by parameter and names
    the first one that differs (missing, or another shape).
    """

    def __init__(self, model_or_params, decay: float = 0.9999, warmup: bool = True, update_every: int = 1,
                 *, dtype: Optional[torch.dtype] = torch.float32, backend: str = "auto",
                 trainable_only: bool = True):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA: decay must be in [0, 1], got {decay}")
        if update_every < 1:
            raise ValueError(f"EMA: update_every must be >= 1, got {update_every}")
        self.decay, self.warmup, self.update_every, self.backend = decay, warmup, update_every, backend
        self.trainable_only = trainable_only
        self._calls = 0  # calls of update() (host)
        self._host_updates: Optional[int] = 0  # averaging updates made; None once counted on the device only
        self._module = model_or_params if isinstance(model_or_params, torch.nn.Module) else None
        named = self._named(model_or_params)
        self.params: dict[str, torch.Tensor] = {
            n: p for n, p in named.items() if p.is_floating_point() and (p.requires_grad or not trainable_only)}
        if not self.params:
            raise ValueError("EMA: no parameters to average" + (
                " (none has requires_grad; pass trainable_only=False to average frozen ones)"
                if trainable_only and named else ""))
        self.shadow: dict[str, torch.Tensor] = {
            n: local(p).detach().to(dtype or p.dtype, copy=True) for n, p in self.params.items()}
        self.buffers: dict[str, torch.Tensor] = (
            {n: b.detach().clone() for n, b in self._module.named_buffers()} if self._module is not None else {})
        # The count of averaging updates on the device (float64, exact to 2^53): what a captured update reads.
        self._count = torch.zeros((), dtype=torch.float64, device=next(iter(self.shadow.values())).device)

    @property
    def num_updates(self) -> int:
        """Averaging updates made. After a CUDA graph capture, read from the device (a host sync)."""
        return self._host_updates if self._host_updates is not None else int(self._count.item())

    @num_updates.setter
    def num_updates(self, n: int) -> None:
        n = int(n)
        self._count.fill_(float(n))  # in place: a captured graph keeps reading this tensor
        if self._host_updates is not None:
            self._host_updates = n

    @property
    def num_calls(self) -> int:
        """Calls of :meth:`update` (with ``update_every = 1``, the only capturable setting, the
        number of averaging updates once a graph was captured)."""
        return self._calls if self._host_updates is not None else self.num_updates

    @num_calls.setter
    def num_calls(self, n: int) -> None:
        self._calls = int(n)

    @staticmethod
    def _named(model_or_params) -> dict:
        if isinstance(model_or_params, torch.nn.Module):
            return dict(model_or_params.named_parameters())
        if isinstance(model_or_params, torch.Tensor):
            model_or_params = [model_or_params]
        return {str(i): p for i, p in enumerate(model_or_params)}

    def _resolve(self, model) -> tuple[dict, Optional[torch.nn.Module]]:
        """The tracked parameters of ``model`` (default: what this EMA was built on) by name,
        after checking that each exists with the shadow's shape; and the module, if any."""
        if model is None:
            return self.params, self._module
        named = self._named(model)
        for name, s in self.shadow.items():
            p = named.get(name)
            if p is None:
                raise ValueError(f"EMA: parameter {name!r} is averaged but the model given has no such parameter "
                                 "(another architecture?)")
            if p.shape != self.params[name].shape:
                raise ValueError(f"EMA: parameter {name!r} has shape {tuple(p.shape)} in the model given but "
                                 f"{tuple(self.params[name].shape)} in the average (another architecture?)")
        for name, p in named.items():
            if name not in self.shadow and p.is_floating_point() and (p.requires_grad or not self.trainable_only):
                raise ValueError(f"EMA: parameter {name!r} of the model given has no average (another architecture, "
                                 "or a parameter unfrozen after the EMA was built?)")
        return {n: named[n] for n in self.shadow}, model if isinstance(model, torch.nn.Module) else None

    def current_decay(self) -> float:
        """The decay the next averaging update will use."""
        n = self.num_updates + 1
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    def _device_decay(self) -> torch.Tensor:
        """``min(decay, (1 + n) / (10 + n))`` from the device count ``n`` (float64 0-d tensor; the
        host's formula and rounding, no host sync)."""
        n = self._count
        return torch.clamp((n + 1.0) / (n + 10.0), max=self.decay)

    @torch.no_grad()
    def update(self, model=None) -> None:
        """Fold the model's current weights into the average (every ``update_every``-th call)."""
        params, module = self._resolve(model)
        decay = self.begin_update()
        if decay is None:
            return
        self.fold({n: params[n] for n in self.shadow}, decay)
        self._copy_buffers(module, into_model=False)

    def begin_update(self) -> Optional[float | torch.Tensor]:
        """Count one call of ``update``; the decay of this averaging update, or None on the calls
        that ``update_every`` skips. (The one-pass optimizer step calls this, then folds the
        parameters it updates inside its own kernel and hands the others to :meth:`fold`.)

        The decay is a host float, except for a warm-up EMA once a CUDA graph is being (or has
        been) captured: then a float64 0-d device tensor computed from the device count."""
        capture = _capturing()
        if capture and self.update_every != 1:
            raise RuntimeError("EMA: update_every > 1 cannot be captured in a CUDA graph (which calls average is "
                               "decided on the host); capture with update_every=1, or keep the EMA update eager")
        self._calls += 1
        if self._calls % self.update_every:
            return None
        self._count.add_(1.0)  # the device count: a captured graph advances it at every replay
        if capture:
            self._host_updates = None  # from now on the device count is the truth
        if self._host_updates is None:
            return self._device_decay() if self.warmup else self.decay
        self._host_updates += 1
        n = self._host_updates
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def fold(self, params: dict, decay: float | torch.Tensor) -> None:
        """``shadow <- lerp(shadow, param, 1 - decay)`` for the named parameters given. ``decay``: a
        float, or a 0-d device tensor (read on the device: ``1 - decay`` rounded once to fp32)."""
        weight = (1.0 - decay).to(torch.float32) if isinstance(decay, torch.Tensor) else None
        groups = defaultdict(lambda: ([], []))
        for name, param in params.items():
            s = self.shadow[name]
            p = local(param).detach()
            key = (s.device, s.dtype, p.dtype)
            groups[key][0].append(s)
            groups[key][1].append(p)
        for (device, _, p_dtype), (shadows, ps) in groups.items():
            kernel_ok = p_dtype in KERNEL_DTYPES and shadows[0].dtype in KERNEL_DTYPES and all(
                dense_alike(s, p) for s, p in zip(shadows, ps))
            unsupported = {} if kernel_ok else {"triton": _LAYOUT, "cuda": _LAYOUT}
            impl = resolve("ema", self.backend, device, unsupported or None)
            w = None if weight is None else weight.to(device)
            if impl in ("triton", "cuda"):
                if w is None:
                    launcher("ema", impl).ema_update_(shadows, ps, decay)
                else:
                    launcher("ema", impl).ema_update_(shadows, ps, weight=w)
            elif w is None:
                torch._foreach_lerp_(shadows, [p.to(shadows[0].dtype) for p in ps], 1.0 - decay)
            else:
                _lerp_device_weight_(shadows, ps, w)

    def copy_buffers_from_model(self) -> None:
        """Copy the averaged module's buffers (what ``update`` does besides averaging)."""
        self._copy_buffers(self._module, into_model=False)

    def _copy_buffers(self, module, into_model: bool) -> None:
        if module is None:
            return
        for name, b in module.named_buffers():
            if name in self.buffers:
                (b if into_model else self.buffers[name]).copy_(self.buffers[name] if into_model else b)

    @torch.no_grad()
    def copy_to(self, model=None) -> None:
        """Write the averaged weights (and buffers) into ``model`` (default: the one averaged)."""
        params, module = self._resolve(model)
        for name, s in self.shadow.items():
            local(params[name]).detach().copy_(s)
        self._copy_buffers(module, into_model=True)

    @contextlib.contextmanager
    def average_parameters(self, model=None) -> Iterator:
        """Evaluate ``model`` (default: the one averaged) with the averaged weights inside the
        block; its own come back after."""
        params, module = self._resolve(model)
        saved = {n: local(params[n]).detach().clone() for n in self.shadow}
        saved_buffers = ({n: b.detach().clone() for n, b in module.named_buffers() if n in self.buffers}
                         if module is not None else {})
        self.copy_to(model)
        try:
            yield model if model is not None else (module if module is not None else list(params.values()))
        finally:
            with torch.no_grad():
                for n, t in saved.items():
                    local(params[n]).detach().copy_(t)
                if module is not None:
                    for n, b in module.named_buffers():
                        if n in saved_buffers:
                            b.copy_(saved_buffers[n])

    def state_dict(self) -> dict:
        """Schedule, counts (host ints) and the shadow and buffer tensors."""
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


def _lerp_device_weight_(shadows: list, params: list, weight: torch.Tensor) -> None:
    """``torch._foreach_lerp_(shadows, params, w)`` with the weight an fp32 0-d device tensor: the
    same fp32 lerp (for fp32 shadows a tensor weight of their dtype; other shadow dtypes in fp32,
    rounded once at the store, as the scalar foreach computes them)."""
    if shadows[0].dtype == torch.float32:
        torch._foreach_lerp_(shadows, [p.to(torch.float32) for p in params], [weight] * len(shadows))
        return
    for s, p in zip(shadows, params):
        s.copy_(torch.lerp(s.float(), p.float(), weight))
