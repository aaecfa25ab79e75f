"""GPU tier: the one-pass step in CUDA C++. FusedAdamW / FusedAdamW8bit / FusedLion(backend="cuda",
max_grad_norm=c, ema=ema) read g * coef, update, round and fold the stored parameter into the EMA in
the optimizer's own functor; the result matches the separate calls clip_grad_norm_ + step() +
ema.update() with the same backend (to fp32 rounding: the product g * coef may be contracted into a
later FMA), and the CUDA C++ step is what ran, with no EMA launch of its own."""

from __future__ import annotations

import pytest
import torch
from conftest import replay_cuda_graph

from fastgen import backend

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _need_extension():
    from fastgen.cuda import extension_info

    if not extension_info()["built"]:
        pytest.skip("fastgen._C is not built")


def _model(dtype):
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.Tanh(), torch.nn.Linear(96, 5))
    return m.to("cuda", dtype)


def _run(cls, dtype, one_pass, steps, shadow_dtype=torch.float32, **kw):
    from fastgen.optim import EMA, clip_grad_norm_

    model = _model(dtype)
    ema = EMA(model, decay=0.95, dtype=shadow_dtype, backend="cuda")
    extra = dict(max_grad_norm=0.5, ema=ema) if one_pass else {}
    opt = cls(model.parameters(), lr=1e-2, backend="cuda", **kw, **extra)
    for step in range(steps):
        opt.zero_grad()
        x = torch.randn(8, 64, generator=torch.Generator().manual_seed(step)).to("cuda", dtype)
        model(x).float().square().mean().mul(100.0).backward()  # large gradients: the clip is active
        with backend.trace() as ran:
            if one_pass:
                opt.step()
            else:
                clip_grad_norm_(model.parameters(), 0.5, backend="cuda")
                opt.step()
                ema.update(model)
        step_op = {"FusedAdamW": "adamw", "FusedAdamW8bit": "adamw8bit", "FusedLion": "lion"}[cls.__name__]
        assert (step_op, "cuda") in ran, ran
        if one_pass:
            assert not any(op == "ema" for op, _ in ran), ran  # folded into the step
    return model, ema


def _classes():
    from fastgen.optim import FusedAdamW, FusedAdamW8bit, FusedLion

    return {"adamw": (FusedAdamW, {}), "adamw-amsgrad": (FusedAdamW, dict(amsgrad=True)),
            "adamw8bit": (FusedAdamW8bit, dict(min_8bit_size=256)), "lion": (FusedLion, {})}


@pytest.mark.parametrize("name", ["adamw", "adamw-amsgrad", "adamw8bit", "lion"])
@pytest.mark.parametrize("shadow_dtype", [torch.float32, torch.bfloat16])
def test_one_pass_matches_separate_calls_in_fp32(name, shadow_dtype):
    _need_extension()
    cls, kw = _classes()[name]
    a_model, a_ema = _run(cls, torch.float32, True, 3, shadow_dtype, **kw)
    b_model, b_ema = _run(cls, torch.float32, False, 3, shadow_dtype, **kw)
    for p, q in zip(a_model.parameters(), b_model.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)
    for key in a_ema.shadow:
        torch.testing.assert_close(a_ema.shadow[key], b_ema.shadow[key], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", ["adamw", "adamw8bit"])
def test_one_pass_bf16_parameters(name):
    """bf16 parameters with fp32 shadows: the separate clip rounds g * coef to bf16 and the one pass
    does not, so the two agree to bf16 rounding. (Not Lion: a sign of c near 0 may flip with that
    rounding and move an element by 2 lr.)"""
    _need_extension()
    cls, kw = _classes()[name]
    a_model, a_ema = _run(cls, torch.bfloat16, True, 3, **kw)
    b_model, b_ema = _run(cls, torch.bfloat16, False, 3, **kw)
    for p, q in zip(a_model.parameters(), b_model.parameters()):
        torch.testing.assert_close(p.float(), q.float(), atol=2e-2, rtol=2e-2)
    for key in a_ema.shadow:
        torch.testing.assert_close(a_ema.shadow[key], b_ema.shadow[key], atol=2e-2, rtol=2e-2)


def test_one_pass_with_warmup_ema_captures_in_a_cuda_graph():
    """FusedAdamW(backend="cuda", max_grad_norm, ema=EMA(warmup=True, backend="cuda")) captured once and
    replayed equals the eager steps: the captured warm-up decay lives on the device, and the CUDA C++
    EMA reads it there (weight_ptr) instead of baking the decay of the capture into the graph."""
    _need_extension()
    from fastgen.optim import EMA, FusedAdamW

    replays = 4
    runs = []
    for captured in (True, False):
        gen = torch.Generator(device="cuda").manual_seed(2)
        params = [torch.nn.Parameter(torch.randn(n, device="cuda", generator=gen)) for n in (5000, 4096, 300, 7)]
        for p in params:
            p.grad = torch.randn(p.shape, device="cuda", generator=gen) * 10  # clipped
        ema = EMA(params, decay=0.999, warmup=True, backend="cuda")
        opt = FusedAdamW(params, lr=torch.tensor(1e-3, device="cuda"), max_grad_norm=1.0, ema=ema, backend="cuda",
                         capturable=True)
        opt.step()
        if captured:
            with backend.trace() as ran:
                replay_cuda_graph(opt.step, replays)
            assert ("adamw", "cuda") in ran and ("ema", "cuda") in ran, ran
        else:
            for _ in range(replays):
                opt.step()
        torch.cuda.synchronize()
        runs.append((params, ema))
    (a, ema_a), (b, ema_b) = runs
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)
    assert ema_a.num_updates == ema_b.num_updates == 1 + replays
    for name in ema_a.shadow:
        torch.testing.assert_close(ema_a.shadow[name], ema_b.shadow[name], rtol=1e-6, atol=1e-7)
