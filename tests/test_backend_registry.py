"""The registry in fastgen.backend: which implementations each op has, and what resolve reads from it."""

from __future__ import annotations

import inspect

import pytest
import torch

from fastgen import backend
from fastgen.backend import BackendUnavailableError

# The implementations of the ops that existed before the registry (a new op registers itself
# and needs no line here).
OPS = {
    "rms_norm": ("triton", "cuda", "torch"),
    "group_norm": ("triton", "cuda", "torch"),
    "apply_rope": ("triton", "cuda", "torch"),
    "qk_norm_rope": ("triton", "cuda", "torch"),
    "layer_norm": ("triton", "torch"),
    "layer_norm_modulate": ("triton", "torch"),
    "rms_norm_modulate": ("triton", "torch"),
    "gated_residual": ("triton", "torch"),
    "gated_residual_layer_norm_modulate": ("triton", "torch"),
    "glu": ("triton", "torch"),
    "attention": ("triton", "torch"),
}
# The optimizers' multi-tensor steps (fastgen.optim), the adapters' kernels and the VQ search: registered like the
# ops, but not public fastgen.ops functions; they pass their own reasons (layouts, dtypes) to resolve, not a call.
STEPS = {
    "adamw": ("triton", "cuda", "torch"),
    "lion": ("triton", "cuda", "torch"),
    "ema": ("triton", "cuda", "torch"),
    "clip_grad_norm_": ("triton", "cuda", "torch"),
    "adamw8bit": ("triton", "cuda", "torch"),
    "prodigy": ("triton", "cuda", "torch"),
    "schedulefree": ("triton", "cuda", "torch"),
    # the adapters' kernels (fastgen.adapters)
    "lora": ("triton", "torch"),
    "dora_row_norm": ("triton", "torch"),
    "quant_linear": ("triton", "torch"),
    "vq_nearest": ("triton", "torch"),  # fastgen.vae.quantizer
}


def test_every_op_registers_its_implementations():
    for op, impls in {**OPS, **STEPS}.items():
        assert set(backend.implementations(op)) == set(impls), op
    for op in backend.REGISTRY:  # what auto runs on CUDA tensors is registered (torch when unlisted)
        assert backend.AUTO_ON_CUDA.get(op, "torch") in backend.implementations(op)


def test_every_registered_op_is_a_public_op_with_a_reference():
    import fastgen.ops

    for op, regs in backend.REGISTRY.items():
        if op in STEPS:
            continue
        assert callable(getattr(fastgen.ops, op)) and callable(getattr(fastgen.ops, op + "_ref")), op
        for impl in regs.values():
            assert impl.op == op and impl.modules and impl.serves is not None, impl


def test_cuda_launchers_have_the_triton_signatures():
    """An op's launchers take the same arguments whichever implementation runs (the optimizers' steps
    too: the Triton and CUDA C++ ones both take the one-pass arguments)."""
    pytest.importorskip("triton")
    for op, regs in backend.REGISTRY.items():
        if "cuda" not in regs:
            continue
        tri, cu = backend.launcher(op, "triton"), backend.launcher(op, "cuda")
        module = cu._modules[0]
        for name in getattr(module, "__all__", [n for n in dir(module) if not n.startswith("_")]):
            if hasattr(tri, name) and callable(getattr(cu, name)):
                assert inspect.signature(getattr(cu, name)) == inspect.signature(getattr(tri, name)), (op, name)


def test_an_op_without_cuda_gets_the_registry_message():
    cpu = torch.device("cpu")
    for op in ("layer_norm", "glu", "attention"):
        with pytest.raises(BackendUnavailableError, match=f"^{op}: backend='cuda' cannot run: this op has no CUDA "
                                                          "C\\+\\+ implementation; use backend='triton' or "
                                                          "backend='torch'"):
            backend.resolve(op, "cuda", cpu, call=(torch.ones(1),))
    with pytest.raises(BackendUnavailableError, match="this op has no CUDA C\\+\\+ implementation"):
        backend.launcher("glu", "cuda")


def test_resolve_runs_the_implementations_own_check():
    x = torch.ones(2, 4, dtype=torch.float64)
    with pytest.raises(BackendUnavailableError, match="dtype torch.float64 is not supported"):
        backend.resolve("rms_norm", "triton", x.device, call=(x,))
    x = torch.ones(1, 2048, 1, dtype=torch.float32)  # 2048 channels in one group: over the kernels' limit
    with pytest.raises(BackendUnavailableError, match="2048 channels per group exceed"):
        backend.resolve("group_norm", "triton", x.device, call=(x, 1))


def test_auto_on_cuda_falls_back_when_the_check_fails(monkeypatch):
    """auto takes the torch reference when the listed implementation cannot serve the call."""
    monkeypatch.setitem(backend.AUTO_ON_CUDA, "rms_norm", "triton")
    monkeypatch.setattr(backend, "unavailable_reason", lambda name, device: None)
    x = torch.ones(2, 4, dtype=torch.float64)
    assert backend.resolve("rms_norm", "auto", torch.device("cuda"), call=(x,)) == "torch"
    assert backend.resolve("rms_norm", "auto", torch.device("cuda"), call=(x.float(),)) == "triton"


def test_unregistered_ops_keep_their_own_reasons():
    """Callers outside the registry pass their reasons per implementation."""
    with pytest.raises(BackendUnavailableError, match="not written yet"):
        backend.resolve("not_an_op", "cuda", torch.device("cpu"), {"cuda": "not written yet"})
    assert backend.resolve("not_an_op", "torch", torch.device("cpu"), {"cuda": "x"}) == "torch"


def test_registered_steps_keep_their_own_reasons():
    """The optimizers' steps are registered and still pass their layout reasons per implementation."""
    cpu = torch.device("cpu")
    with pytest.raises(BackendUnavailableError, match="strided or float64"):
        backend.resolve("ema", "triton", cpu, {"triton": "strided or float64 tensors"})
    with pytest.raises(BackendUnavailableError, match="this op has no CUDA C\\+\\+ implementation"):
        backend.resolve("lora", "cuda", cpu)
    assert backend.resolve("adamw", "torch", cpu) == "torch"
    assert backend.launcher("adamw8bit", "triton").adamw8bit_step is not None
