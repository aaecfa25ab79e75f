"""Helpers shared by fastgen's optimizers and EMA."""

from __future__ import annotations

from collections import defaultdict
from typing import Callable

import torch

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def local(t):
    """The local shard of a DTensor (FSDP2 parameters and their states), else ``t`` itself.

    ``to_local()`` of a sharded DTensor is a view of its storage, so in-place
    updates of it update the parameter.
    """
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None else t


def is_dense(t: torch.Tensor) -> bool:
    """True if t's elements fill one contiguous run of memory in some dim order (no gaps, no overlap)."""
    expected = 1
    for stride, size in sorted((s, n) for s, n in zip(t.stride(), t.shape) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def dense_alike(*tensors) -> bool:
    """True if the tensors (None skipped) are dense, non-overlapping and laid out alike,
    so that an elementwise kernel may treat each as one flat run of memory."""
    ts = [t for t in tensors if t is not None]
    first = ts[0]
    return all(
        is_dense(t) and t.stride() == first.stride() and t.shape == first.shape
        and t.device == first.device
        for t in ts
    )


def stochastic_round_bf16(x: torch.Tensor, generator=None) -> torch.Tensor:
    """fp32 -> bf16, rounding up with probability equal to the fraction dropped (unbiased)."""
    bits = x.float().contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    noise = torch.randint(0, 1 << 16, x.shape, device=x.device, generator=generator, dtype=torch.int64)
    rounded = ((bits + noise) & 0xFFFF0000).to(torch.int32)  # wraps into int32's range as the bits mean
    return rounded.view(torch.float32).to(torch.bfloat16)


def load_states_without_cast(opt: torch.optim.Optimizer, state_dict: dict,
                             dtype_of: Callable[[torch.Tensor, str], torch.dtype]) -> None:
    """``Optimizer.load_state_dict``, except each state tensor gets ``dtype_of(param, key)``
    from the *saved* tensor (torch would first cast it to the parameter's dtype, which loses
    fp32 moments of bf16 parameters) and lives on the parameter's device. The states are
    copies: the optimizer never shares tensors with the dict it was loaded from."""
    torch.optim.Optimizer.load_state_dict(opt, state_dict)
    saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
    params = [p for g in opt.param_groups for p in g["params"]]
    for pid, p in zip(saved_ids, params):
        for key, value in state_dict["state"].get(pid, {}).items():
            if isinstance(value, torch.Tensor):
                device = local(p).device if value.dim() == 0 else p.device  # steps live beside the local shard
                opt.state[p][key] = value.to(device=device, dtype=dtype_of(p, key), copy=True)


def bucket(items):
    """Split per-parameter tuples ``(param, grad, state...)`` (local tensors; None allowed for
    absent states) into kernel buckets keyed by (device, param dtype, grad dtype) — one launch
    each — and a list of the tuples the kernels cannot take (strided layouts, float64), which
    go to the reference path one by one. Buckets hold one list per tuple position."""
    buckets: dict = defaultdict(lambda: tuple([] for _ in items[0]) if items else ())
    fallback = []
    for item in items:
        # Per-element tensors (the ones shaped like the parameter) must be dense alike.
        if item[0].dtype in KERNEL_DTYPES and dense_alike(*(t for t in item if t is not None and t.shape == item[0].shape)):
            lists = buckets[(item[0].device, item[0].dtype, item[1].dtype)]
            for lst, t in zip(lists, item):
                lst.append(t)
        else:
            fallback.append(item)
    return buckets, fallback


def check_grad(p, name: str) -> bool:
    """True if p has a gradient to apply; refuse sparse gradients with a clear error."""
    if p.grad is None:
        return False
    if p.grad.is_sparse:
        raise RuntimeError(f"{name} does not support sparse gradients; use torch.optim.SparseAdam")
    return True


def check_torch_flags(name: str, *, differentiable: bool = False, foreach=None, fused=None) -> None:
    """The flags of ``torch.optim`` constructors that a fused optimizer takes for drop-in use.

    ``foreach`` and ``fused`` pick between torch's own implementations; a fused optimizer has
    one (its backend decides), so any value is accepted and does nothing. ``differentiable``
    (autograd through the step) is not served: True raises."""
    if differentiable:
        raise ValueError(f"{name}: differentiable=True (autograd through the optimizer step) is not supported; "
                         "use torch.optim with differentiable=True for that")
    for flag, value in (("foreach", foreach), ("fused", fused)):
        if value not in (None, True, False):
            raise TypeError(f"{name}: {flag} must be None or a bool, got {value!r}")


def check_state_kind(name: str, state_dict: dict, allowed: set, required: set, hint: str = "") -> None:
    """Refuse a state dict whose per-parameter states are another optimizer's (an AdamW dict
    into an 8-bit AdamW, a Lion dict into AdamW, ...): every state's keys must lie in
    ``allowed`` and include ``required``. ``hint`` says how to convert, where there is a way."""
    for pid, state in state_dict.get("state", {}).items():
        keys = set(state)
        if not keys:
            continue
        if not keys <= allowed or not required <= keys:
            raise ValueError(
                f"{name}.load_state_dict: the state of parameter {pid} has keys {sorted(keys)}, which are not "
                f"{name}'s (expected {sorted(required)}, at most {sorted(allowed)}); this state dict comes from "
                f"another optimizer kind{'. ' + hint if hint else ''}")


def capturing() -> bool:
    """True while the current CUDA stream is capturing a graph."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def check_capture_ready(opt: torch.optim.Optimizer, group: dict, name: str) -> None:
    """With ``capturable=True``: a step captured into a CUDA graph must find every state already
    allocated (allocation and the launch tables' host-to-device copies belong to an eager step)."""
    if not capturing():
        return
    for p in group["params"]:
        if p.grad is not None and not opt.state.get(p):
            raise RuntimeError(f"{name}: a CUDA graph capture found a parameter without optimizer state; "
                               "run one eager step before capturing (it allocates the states)")
