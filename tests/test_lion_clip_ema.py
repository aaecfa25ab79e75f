"""FusedLion, clip_grad_norm_ and EMA against independent torch references."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import TRITON_DEVICE

from fastgen.optim import EMA, FusedLion, clip_grad_norm_

DEV = TRITON_DEVICE
BACKENDS = ["torch", "triton"]  # clip_grad_norm_ and EMA: no CUDA C++ version
LION_BACKENDS = BACKENDS + (["cuda"] if DEV == "cuda" else [])


def _model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(10, 20), torch.nn.Tanh(), torch.nn.Linear(20, 3)).to(DEV, dtype)


# ----------------------------------------------------------------------------- Lion


def _lion64(params, grads, ms, lr, beta1, beta2, wd, maximize):
    """Lion written out in float64, from the paper's pseudo-code."""
    for p, g, m in zip(params, grads, ms):
        g = -g if maximize else g
        c = beta1 * m + (1 - beta1) * g
        p.mul_(1 - lr * wd).sub_(lr * torch.sign(c))
        m.mul_(beta2).add_((1 - beta2) * g)


@pytest.mark.parametrize("backend", LION_BACKENDS)
@pytest.mark.parametrize("maximize, wd", [(False, 0.0), (True, 0.1)])
def test_lion_matches_float64_reference(backend, maximize, wd):
    model = _model()
    ref = [p.detach().double().clone() for p in model.parameters()]
    ms = [torch.zeros_like(p) for p in ref]
    opt = FusedLion(model.parameters(), lr=1e-3, betas=(0.9, 0.99), weight_decay=wd, maximize=maximize,
                    backend=backend)
    g = torch.Generator().manual_seed(0)
    for _ in range(30):
        grads = [torch.randn(p.shape, generator=g).to(DEV) for p in model.parameters()]
        for p, gr in zip(model.parameters(), grads):
            p.grad = gr.clone()
        opt.step()
        _lion64(ref, [gr.double() for gr in grads], ms, 1e-3, 0.9, 0.99, wd, maximize)
        for p, r in zip(model.parameters(), ref):
            torch.testing.assert_close(p.double(), r, atol=1e-6, rtol=1e-6)


def test_lion_bf16_kernel_matches_reference_path():
    a, b = _model(torch.bfloat16), _model(torch.bfloat16)
    oa = FusedLion(a.parameters(), lr=1e-3, weight_decay=0.01, backend="torch")
    ob = FusedLion(b.parameters(), lr=torch.tensor(1e-3), weight_decay=0.01, backend="triton")
    for _ in range(10):
        x = torch.randn(4, 10, device=DEV, dtype=torch.bfloat16)
        for m, o in ((a, oa), (b, ob)):
            o.zero_grad()
            m(x).float().square().mean().backward()
            o.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, atol=1e-2, rtol=1e-2)
    sd = copy.deepcopy(ob.state_dict())
    oc = FusedLion(b.parameters(), lr=1e-3, backend="torch")
    oc.load_state_dict(sd)
    assert all(oc.state[p]["exp_avg"].dtype == torch.float32 for p in b.parameters())


# ----------------------------------------------------------------------------- clip_grad_norm_


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("max_norm", [0.05, 100.0])
def test_clip_matches_torch(backend, dtype, max_norm):
    a, b = _model(dtype), _model(dtype)
    x = torch.randn(5, 10, device=DEV, dtype=dtype)
    for m in (a, b):
        m(x).float().square().sum().backward()
    total = clip_grad_norm_(a.parameters(), max_norm, backend=backend)
    expected = torch.nn.utils.clip_grad_norm_(b.parameters(), max_norm)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(total, expected, atol=tol, rtol=tol)
    assert total.dtype == expected.dtype
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=tol, rtol=tol)
    clipped = torch.linalg.vector_norm(torch.stack([p.grad.float().norm() for p in a.parameters()]))
    assert clipped <= max_norm * (1 + tol) or max_norm > total


def test_clip_other_norms_and_nonfinite():
    a, b = _model(), _model()
    for m in (a, b):
        m(torch.ones(2, 10, device=DEV)).sum().backward()
    torch.testing.assert_close(clip_grad_norm_(a.parameters(), 0.1, norm_type=float("inf")),
                               torch.nn.utils.clip_grad_norm_(b.parameters(), 0.1, norm_type=float("inf")))
    p = torch.nn.Parameter(torch.ones(3, device=DEV))
    p.grad = torch.tensor([1.0, float("nan"), 0.0], device=DEV)
    with pytest.raises(RuntimeError, match="non-finite"):
        clip_grad_norm_([p], 1.0, error_if_nonfinite=True, backend="triton")
    assert float(clip_grad_norm_([], 1.0)) == 0.0


# ----------------------------------------------------------------------------- EMA


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("warmup, every", [(True, 1), (False, 3)])
def test_ema_matches_plain_loop(backend, warmup, every):
    model = _model()
    ema = EMA(model, decay=0.9, warmup=warmup, update_every=every, backend=backend)
    ref = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    n_updates = 0
    for call in range(1, 13):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        ema.update(model)
        if call % every == 0:
            n_updates += 1
            d = min(0.9, (1 + n_updates) / (10 + n_updates)) if warmup else 0.9
            for n, p in model.named_parameters():
                ref[n] += (1 - d) * (p.detach().double() - ref[n])
    for n, s in ema.shadow.items():
        torch.testing.assert_close(s.double(), ref[n], atol=1e-6, rtol=1e-6)


def test_ema_bf16_model_swap_and_state_dict():
    model = _model(torch.bfloat16)
    ema = EMA(model, decay=0.5, warmup=False, backend="triton")
    assert all(s.dtype == torch.float32 for s in ema.shadow.values())
    trained = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3)
    ema.update(model)  # shadow = 0.5 * (w + 3w) = 2w
    with ema.average_parameters(model):
        for p, w in zip(model.parameters(), trained):
            torch.testing.assert_close(p, (2 * w.float()).to(torch.bfloat16))
    for p, w in zip(model.parameters(), trained):
        assert torch.equal(p, 3 * w)  # the trained weights came back
    other = EMA(_model(torch.bfloat16), decay=0.9)
    other.load_state_dict(copy.deepcopy(ema.state_dict()))
    assert other.decay == 0.5 and other.num_updates == 1
    for n in ema.shadow:
        assert torch.equal(other.shadow[n], ema.shadow[n])
