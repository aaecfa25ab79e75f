"""The one-pass step: FusedAdamW / FusedAdamW8bit(..., max_grad_norm=c, ema=ema) equal the separate
calls clip_grad_norm_(c) + step() + ema.update() with the same backend: exactly for fp32, within
the rounding contract for bf16 (where the separate clip rounds the scaled gradients to bf16)."""

from __future__ import annotations

import pytest
import torch
from conftest import INTERPRET, TRITON_DEVICE, replay_cuda_graph

from fastgen.optim import EMA, FusedAdamW, FusedAdamW8bit, FusedLion, clip_grad_norm_

DEV = TRITON_DEVICE
BACKENDS = ["torch"] + (["triton"] if (INTERPRET or DEV == "cuda") else [])


def _model(dtype=torch.float32):
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(16, 24), torch.nn.Tanh(), torch.nn.Linear(24, 4))
    m[0].bias.requires_grad_(False)  # frozen: no gradient, no average
    return m.to(DEV, dtype)


def _grads(model, step, dtype):
    g = torch.Generator().manual_seed(step)
    x = torch.randn(8, 16, generator=g).to(DEV, dtype)
    model(x).float().square().mean().mul(100.0).backward()  # large gradients: the clip is active


def _run(cls, backend, dtype, one_pass, steps, **kw):
    model = _model(dtype)
    ema = EMA(model, decay=0.95, backend=backend)  # warm-up decays 0.18 .. 0.95: both lerp branches
    extra = dict(max_grad_norm=0.5, ema=ema) if one_pass else {}
    opt = cls([p for p in model.parameters() if p.requires_grad], lr=1e-2, backend=backend, **kw, **extra)
    norms = []
    for step in range(steps):
        opt.zero_grad()
        _grads(model, step, dtype)
        if one_pass:
            before = [p.grad.clone() for p in model.parameters() if p.grad is not None]
            opt.step()
            assert all(torch.equal(p.grad, b) for p, b in zip([p for p in model.parameters() if p.grad is not None],
                                                               before))  # gradients are read, not written
            norms.append(opt.grad_norm)
        else:
            norms.append(clip_grad_norm_(model.parameters(), 0.5, backend=backend))
            opt.step()
            ema.update(model)
    return model, opt, ema, torch.stack(norms)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls, kw", [(FusedAdamW, {}), (FusedAdamW8bit, dict(min_8bit_size=64)), (FusedLion, {})],
                         ids=["adamw", "adamw8bit", "lion"])
def test_one_pass_equals_separate_calls_in_fp32(backend, cls, kw):
    steps = 4 if backend == "torch" else 3
    a_model, a_opt, a_ema, a_norms = _run(cls, backend, torch.float32, True, steps, **kw)
    b_model, b_opt, b_ema, b_norms = _run(cls, backend, torch.float32, False, steps, **kw)
    assert torch.equal(a_norms, b_norms) and bool((a_norms > 0.5).all())  # clipped at every step
    for p, q in zip(a_model.parameters(), b_model.parameters()):
        assert torch.equal(p, q)
        if p.requires_grad:
            for key, value in a_opt.state[p].items():
                assert torch.equal(value, b_opt.state[q][key]), key
    assert a_ema.num_updates == b_ema.num_updates == steps
    for name in b_ema.shadow:
        assert torch.equal(a_ema.shadow[name], b_ema.shadow[name]), name
    if cls is FusedAdamW8bit:
        assert any("exp_avg_q" in s for s in a_opt.state.values())


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_pass_bf16_with_stochastic_rounding(backend):
    """bf16: the separate clip stores g * coef in bf16, the one pass keeps it in fp32; with the same
    stochastic-rounding seeds the parameters agree to a bf16 ulp or two."""
    a_model, _, a_ema, a_norms = _run(FusedAdamW, backend, torch.bfloat16, True, 2, stochastic_rounding=True)
    b_model, _, b_ema, b_norms = _run(FusedAdamW, backend, torch.bfloat16, False, 2, stochastic_rounding=True)
    torch.testing.assert_close(a_norms, b_norms, atol=0, rtol=1e-6)
    for p, q in zip(a_model.parameters(), b_model.parameters()):
        torch.testing.assert_close(p, q, atol=2e-2, rtol=2e-2)
    for name in b_ema.shadow:
        torch.testing.assert_close(a_ema.shadow[name], b_ema.shadow[name], atol=2e-2, rtol=2e-2)


def test_ema_parameters_without_gradients_and_update_every():
    model = _model()
    ema = EMA(model, decay=0.5, warmup=False, update_every=2, backend="torch")
    opt = FusedAdamW(model.parameters(), lr=1e-2, ema=ema, backend="torch")
    start = {n: s.clone() for n, s in ema.shadow.items()}
    _grads(model, 0, torch.float32)
    model[2].weight.grad = None  # no gradient this step: still averaged, by the EMA's own path
    opt.step()  # call 1 of 2: no averaging
    assert ema.num_calls == 1 and ema.num_updates == 0
    assert all(torch.equal(ema.shadow[n], start[n]) for n in start)
    with torch.no_grad():
        model[2].weight.add_(1.0)
    opt.step()
    assert ema.num_updates == 1
    torch.testing.assert_close(ema.shadow["2.weight"], 0.5 * (start["2.weight"] + model[2].weight.detach()))


def test_bad_inputs():
    model = _model()
    params = [p for p in model.parameters() if p.requires_grad]
    for bad in (0, 0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="max_grad_norm must be > 0"):
            FusedAdamW(params, max_grad_norm=bad)
    other = torch.nn.Linear(3, 3)
    with pytest.raises(ValueError, match="averages parameter 'weight', which this optimizer does not own"):
        FusedAdamW(params, ema=EMA(other))
    with pytest.raises(ValueError, match="does not own"):
        FusedAdamW8bit(params[:1], ema=EMA(model))
    with pytest.raises(ValueError, match="max_grad_norm must be > 0"):
        FusedLion(params, max_grad_norm=-2.0)
    with pytest.raises(TypeError, match="ema must be a fastgen.optim.EMA"):
        FusedAdamW(params, ema=object())


def _capture_and_replay(make, replays=4):
    """Warm up one eager step, capture one step, replay it; the same optimizer stepped eagerly
    gives the same parameters (the kernels are deterministic)."""
    torch.manual_seed(0)
    init = [torch.randn(n, device="cuda") for n in (5000, 4096, 300, 7)]
    grads = [torch.randn_like(x) * 10 for x in init]
    runs = []
    for captured in (True, False):
        params = [torch.nn.Parameter(x.clone()) for x in init]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt, ema = make(params)
        opt.step()
        if captured:
            replay_cuda_graph(opt.step, replays)
        else:
            for _ in range(replays):
                opt.step()
        torch.cuda.synchronize()
        runs.append((params, ema))
    (a, ema_a), (b, ema_b) = runs
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, atol=0, rtol=0)
    if ema_a is not None:
        for n in ema_a.shadow:
            torch.testing.assert_close(ema_a.shadow[n], ema_b.shadow[n], atol=0, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kind", ["adamw", "adamw8bit", "lion"])
def test_gpu_one_pass_step_captures_in_a_cuda_graph(kind):
    """Tensor lr, device step counters and clip coefficient, constant EMA decay (warmup=False:
    the warm-up decay is a host value): the whole one-pass step replays from a graph."""
    cls = {"adamw": FusedAdamW, "adamw8bit": FusedAdamW8bit, "lion": FusedLion}[kind]

    def make(params):
        ema = EMA(params, decay=0.9, warmup=False, backend="triton")
        kw = dict(min_8bit_size=256) if kind == "adamw8bit" else {}
        return cls(params, lr=torch.tensor(1e-3, device="cuda"), backend="triton", max_grad_norm=1.0, ema=ema,
                   capturable=True, **kw), ema

    _capture_and_replay(make)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("bias_correction", [False, True])
def test_gpu_prodigy_captures_in_a_cuda_graph(bias_correction):
    """d, d_max, the numerator and the step count k are device tensors updated in place: a captured
    step feeds its replay, and the bias correction (a function of k) changes at every replay."""
    from fastgen.optim import FusedProdigy

    _capture_and_replay(lambda params: (FusedProdigy(params, weight_decay=0.01,
                                                     use_bias_correction=bias_correction), None))
