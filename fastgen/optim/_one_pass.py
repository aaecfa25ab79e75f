"""The one-pass optimizer step: gradient clipping and EMA folded into the optimizer's own pass.

``opt = FusedAdamW(params, max_grad_norm=c, ema=ema)``; each ``opt.step()``:

1. if ``c`` is set: the global 2-norm of all gradients, one read of them (the same function
   ``clip_grad_norm_`` uses for the same backend: deterministic, no host sync), and the device
   scalar ``coef = min(1, c / (norm + 1e-6))``;
2. one pass per parameter bucket that reads ``g * coef``, updates the parameter and its
   states, stores the parameter (stochastically rounded if asked) and folds the stored value
   into the EMA shadow: ``s <- s + (1 - d) (p - s)``.

Bytes per parameter element (``P`` parameter = gradient bytes, AdamW states and EMA shadow fp32)::

    one pass:        P (norm) + 3P + 16 (update: p, g, m, v read; p, m, v written) + 8 (shadow)  = 4P + 24
    separate calls:  P (norm) + 2P (scale) + 3P + 16 (update) + P + 8 (EMA reads p)           = 7P + 24

so 32 against 38 bytes for bf16 parameters (``benchmarks/bench_adamw.py``, mode
``clip+step+ema``, uses this count).
"""

from __future__ import annotations

from typing import Optional

import torch

from fastgen.optim._common import local


def check_one_pass(opt, name: str, max_grad_norm, ema):
    """Validate the one-pass arguments: ``max_grad_norm`` > 0, an EMA only over parameters the
    optimizer owns."""
    if max_grad_norm is not None:
        if isinstance(max_grad_norm, bool) or not float(max_grad_norm) > 0:
            raise ValueError(f"{name}: max_grad_norm must be > 0 (or None for no clipping), got {max_grad_norm!r}")
        max_grad_norm = float(max_grad_norm)
    if ema is not None:
        if not hasattr(ema, "begin_update") or not hasattr(ema, "params"):
            raise TypeError(f"{name}: ema must be a fastgen.optim.EMA, got {type(ema).__name__}")
        owned = {id(p) for g in opt.param_groups for p in g["params"]}
        for pname, p in ema.params.items():
            if id(p) not in owned:
                raise ValueError(f"{name}: the EMA averages parameter {pname!r}, which this optimizer does not own; "
                                 "build the EMA over the optimizer's parameters (or a subset of them)")
    return max_grad_norm, ema


class OnePass:
    """What one step of an optimizer with ``max_grad_norm`` / ``ema`` folds into its pass."""

    def __init__(self, opt):
        self.opt = opt
        self.coef: Optional[torch.Tensor] = None
        self.decay: Optional[float] = None
        self._shadow_of: dict = {}
        self._pending: dict = {}  # EMA parameters not (yet) folded by the optimizer's pass
        if opt.max_grad_norm is not None:
            grads = [local(p.grad) for g in opt.param_groups for p in g["params"] if p.grad is not None]
            if grads:
                from fastgen.optim.clip import grad_norm_and_coef

                opt.grad_norm, self.coef = grad_norm_and_coef(grads, opt.max_grad_norm, backend=opt.backend)
        ema = opt.ema
        if ema is not None:
            self.decay = ema.begin_update()
            if self.decay is not None:
                self._pending = dict(ema.params)
                if not isinstance(self.decay, torch.Tensor):  # a device decay (captured warm-up): EMA.fold's pass
                    self._shadow_of = {id(p): (n, ema.shadow[n]) for n, p in ema.params.items()}

    def shadow(self, p) -> Optional[torch.Tensor]:
        """The EMA shadow the pass must fold ``p`` into (None if not averaged this step); the
        parameter is then the pass's job."""
        hit = self._shadow_of.get(id(p))
        if hit is None:
            return None
        self._pending.pop(hit[0], None)
        return hit[1]

    def give_back(self, p) -> None:
        """``p`` is averaged by :meth:`finish` after all (its shadow's layout did not fit the pass)."""
        name = self._shadow_of[id(p)][0]
        self._pending[name] = self.opt.ema.params[name]

    def kwargs(self, shadows) -> dict:
        out = dict(coef=self.coef)
        if shadows is not None:
            out.update(shadows=shadows, ema_decay=self.decay)
        return out

    def finish(self) -> None:
        """Average what the pass did not touch (parameters without gradients), copy the buffers."""
        if self.decay is None:
            return
        if self._pending:
            self.opt.ema.fold(self._pending, self.decay)
        self.opt.ema.copy_buffers_from_model()
