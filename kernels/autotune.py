"""Launch-config autotuning on the GPU: time each candidate once per key, keep the fastest.

A launcher calls :func:`pick` with a key (what the best config depends on: head dim, dtype,
causal, length buckets, device), its candidate configs — the first one is the fixed,
statically checked default — and a ``launch(cfg)`` that runs the kernel with that config on
the call's real buffers (the kernels tuned here are idempotent: they only write their
outputs). The first call for a key times every candidate and caches the fastest; later calls
reuse it. The default is used without timing when tuning is off:

- ``FASTGEN_AUTOTUNE=0`` (the test suite sets it: one fixed config per shape);
- under Triton's interpreter (timings mean nothing there);
- while a CUDA graph is being captured (nothing may be timed during capture: warm up first);
- when the caller asks for ``fixed=True`` (``deterministic=True`` in the ops: bit-identical
  results across processes need the same config in every process, and timing noise could pick
  another one).

Every candidate is compiled for sm_90 by the static tier (tests/sm90.py) and must not spill.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Callable, Hashable, Optional, Sequence, Union

import torch

from fastgen.kernels._common import interpreting

_CACHE: dict = {}
# Candidates that failed to compile or launch, per key: [(config, "ExceptionType: message")].
FAILED: dict = {}
log = logging.getLogger("fastgen.autotune")


def enabled() -> bool:
    """True when :func:`pick` times candidates (GPU kernels, ``FASTGEN_AUTOTUNE`` not ``0``)."""
    return not interpreting() and os.environ.get("FASTGEN_AUTOTUNE", "1") not in ("0", "")


def _do_bench(fn: Callable[[], None]) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=5, rep=20))


def pick(key: Hashable, candidates: Union[Sequence[dict], Callable[[], Sequence[dict]]],
         launch: Callable[[dict], None], fixed: bool = False,
         timer: Optional[Callable[[Callable[[], None]], float]] = None) -> dict:
    """The config to run for ``key``: ``candidates[0]`` when tuning is off (see the module
    docstring), else the fastest candidate by ``timer`` (``triton.testing.do_bench``), cached per
    key. A candidate that fails to compile or launch is skipped, logged on the ``fastgen.autotune``
    logger with the reason and recorded in ``FAILED[key]``; if all fail, the default is used
    and the error of running it surfaces in the caller's own launch. The caller launches the
    returned config afterwards, so its outputs are the winner's whatever the timing wrote.
    ``candidates`` may be a function making the list: a cache hit (every call after the first of
    a shape class) then builds nothing."""
    tuning = enabled() and not fixed
    if tuning and key in _CACHE:
        return dict(_CACHE[key])
    if callable(candidates):
        candidates = candidates()
    if not tuning or len(candidates) == 1:
        return dict(candidates[0])
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return dict(candidates[0])
    timer = timer or _do_bench
    times = []
    for cfg in candidates:
        try:
            times.append(timer(lambda cfg=cfg: launch(dict(cfg))))
        except Exception as exc:  # out of resources / shared memory for this config on this GPU
            reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
            FAILED.setdefault(key, []).append((dict(cfg), reason))
            log.warning("autotune %s: candidate %s failed to compile or launch and is skipped (%s)", key, cfg, reason)
            times.append(math.inf)
    best = candidates[min(range(len(candidates)), key=times.__getitem__)] if min(times) < math.inf else candidates[0]
    _CACHE[key] = dict(best)
    return dict(best)


def length_bucket(n: int) -> int:
    """Lengths in one bucket share a config: the next power of two, at least 64."""
    return max(64, 1 << max(0, int(n) - 1).bit_length())


def cache_clear() -> None:
    _CACHE.clear()
