"""Fused optimizers, gradient clipping and EMA, with multi-tensor kernels.

- ``FusedAdamW``: drop-in for ``torch.optim.AdamW`` (same state dict).
- ``FusedAdamW8bit``: AdamW with block-wise 8-bit moments (2.03 state bytes per parameter).
- ``FusedLion``: the Lion optimizer.
- ``FusedProdigy``: ``prodigyopt.Prodigy``'s update (learning-rate-free Adam), no host sync.
- ``FusedAdamWScheduleFree``: ``schedulefree.AdamWScheduleFree``'s update, with train() / eval().
- ``clip_grad_norm_``: same result and return value as ``torch.nn.utils.clip_grad_norm_``.
- ``EMA``: moving average of a model's weights, with a swap-in context manager.
"""

from fastgen.optim.adamw import FusedAdamW
from fastgen.optim.adamw8bit import FusedAdamW8bit
from fastgen.optim.clip import clip_grad_norm_
from fastgen.optim.ema import EMA
from fastgen.optim.lion import FusedLion
from fastgen.optim.prodigy import FusedProdigy
from fastgen.optim.schedulefree import FusedAdamWScheduleFree

__all__ = ["EMA", "FusedAdamW", "FusedAdamW8bit", "FusedAdamWScheduleFree", "FusedLion", "FusedProdigy",
           "clip_grad_norm_"]
