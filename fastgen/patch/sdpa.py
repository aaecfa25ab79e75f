"""``with fastgen.patch.sdpa():`` — plain ``F.scaled_dot_product_attention`` call sites on fastgen.

Opt-in and scoped: inside the block, ``torch.nn.functional.scaled_dot_product_attention``
is :func:`fastgen.ops.scaled_dot_product_attention` (same signature; masks, dropout and
what the kernels cannot serve still go to PyTorch's SDPA); on exit the original is back.
For eager code in user modules; not thread-safe (it swaps a module attribute of torch).
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch.nn.functional as F

from fastgen.backend import BACKENDS


@contextlib.contextmanager
def sdpa(backend: Optional[str] = "auto") -> Iterator[None]:
    """Route ``F.scaled_dot_product_attention`` to fastgen for the duration of the block."""
    if backend not in BACKENDS:
        raise ValueError(f"fastgen.patch.sdpa: backend must be one of {BACKENDS}, got {backend!r}")
    from fastgen.ops import scaled_dot_product_attention as fastgen_sdpa

    original = F.scaled_dot_product_attention
    if getattr(original, "_fastgen_sdpa", False):  # nested: keep the outer one
        yield
        return

    def routed(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        # fastgen's SDPA falls back to F.scaled_dot_product_attention: point it at the original meanwhile
        F.scaled_dot_product_attention = original
        try:
            return fastgen_sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale,
                                enable_gqa, backend=backend)
        finally:
            F.scaled_dot_product_attention = routed

    routed._fastgen_sdpa = True
    F.scaled_dot_product_attention = routed
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original
