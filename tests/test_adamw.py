"""fastgen.optim.FusedAdamW against torch.optim.AdamW, and its kernel against its reference path."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import TRITON_DEVICE, capture_cuda_graph

from fastgen.backend import BackendUnavailableError
from fastgen.optim import FusedAdamW
from fastgen.optim._common import stochastic_round_bf16

DEV = TRITON_DEVICE
KERNEL = "triton"
# Kernel backends under test: Triton everywhere (the interpreter on CPU), CUDA C++ on a GPU.
KERNELS = ["triton", "cuda"] if DEV == "cuda" else ["triton"]


def _model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(12, 24), torch.nn.Tanh(), torch.nn.Linear(24, 5))
    return m.to(device=DEV, dtype=dtype)


def _train_step(model, opt, x, maximize=False):
    opt.zero_grad()
    loss = model(x).float().square().mean()
    (-loss if maximize else loss).backward()
    opt.step()


CONFIGS = [
    dict(),
    dict(weight_decay=0.0),
    dict(amsgrad=True, maximize=True, weight_decay=0.1, betas=(0.8, 0.99), eps=1e-6),
]


@pytest.mark.parametrize("backend", ["torch", *KERNELS])
@pytest.mark.parametrize("cfg", CONFIGS, ids=["default", "wd0", "amsgrad-maximize"])
def test_matches_torch_adamw_for_200_steps(backend, cfg):
    # The kernel runs in Triton's interpreter on CPU: 200 steps for the default config, 50 for the others.
    steps = 200 if backend == "torch" or not cfg or TRITON_DEVICE == "cuda" else 50
    ours, theirs = _model(), _model()
    opt = FusedAdamW(ours.parameters(), lr=1e-2, backend=backend, **cfg)
    ref = torch.optim.AdamW(theirs.parameters(), lr=1e-2, foreach=False, **cfg)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(6, 12, generator=g).to(DEV)
        _train_step(ours, opt, x, cfg.get("maximize", False))
        _train_step(theirs, ref, x, cfg.get("maximize", False))
        for p, q in zip(ours.parameters(), theirs.parameters()):
            torch.testing.assert_close(p, q, atol=2e-6, rtol=1e-5)
    for p, q in zip(ours.parameters(), theirs.parameters()):
        s, r = opt.state[p], ref.state[q]
        assert set(s) == set(r)
        torch.testing.assert_close(s["exp_avg"], r["exp_avg"], atol=1e-6, rtol=1e-5)
        assert float(s["step"]) == float(r["step"]) == steps


@pytest.mark.parametrize(
    "dtypes, state_dtype",
    [
        ((torch.bfloat16,), None),
        ((torch.float16,), None),
        ((torch.float32, torch.bfloat16), None),
        ((torch.float32,), torch.bfloat16),
    ],
    ids=["bf16", "fp16", "fp32+bf16-one-group", "bf16-states"],
)
@pytest.mark.parametrize("kernel", KERNELS)
def test_kernel_matches_reference_for_every_dtype_mix(dtypes, state_dtype, kernel):
    models = [[_model(dt, seed=i) for i, dt in enumerate(dtypes)] for _ in range(2)]
    opts = [
        FusedAdamW([p for m in ms for p in m.parameters()], lr=3e-3, state_dtype=state_dtype, backend=b)
        for ms, b in zip(models, ["torch", kernel])
    ]
    g = torch.Generator().manual_seed(2)
    for _ in range(30):
        xs = [torch.randn(4, 12, generator=g).to(DEV) for _ in dtypes]
        for ms, opt in zip(models, opts):
            opt.zero_grad()
            sum(m(x.to(next(m.parameters()).dtype)).float().square().mean() for m, x in zip(ms, xs)).backward()
            opt.step()
        for ma, mb in zip(*models):
            for p, q in zip(ma.parameters(), mb.parameters()):
                tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[p.dtype]
                torch.testing.assert_close(p, q, atol=tol, rtol=tol)
    for p in opts[1].param_groups[0]["params"]:
        assert opts[1].state[p]["exp_avg"].dtype == (state_dtype or torch.float32)


@pytest.mark.parametrize("backend", ["torch", *KERNELS])
def test_lr_as_tensor(backend):
    a, b = _model(), _model()
    oa = FusedAdamW(a.parameters(), lr=torch.tensor(5e-3), backend=backend)
    ob = FusedAdamW(b.parameters(), lr=5e-3, backend=backend)
    x = torch.randn(3, 12, device=DEV)
    for _ in range(5):
        _train_step(a, oa, x)
        _train_step(b, ob, x)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("backend", ["torch", *KERNELS])
def test_state_dict_round_trips_with_torch_adamw(backend):
    x = torch.randn(4, 12, device=DEV)
    # torch -> fastgen after 10 steps, then 10 more on both
    ref_model, ours_model = _model(), _model()
    ref = torch.optim.AdamW(ref_model.parameters(), lr=1e-2, amsgrad=True, foreach=False)
    for _ in range(10):
        _train_step(ref_model, ref, x)
    ours_model.load_state_dict(ref_model.state_dict())
    ours = FusedAdamW(ours_model.parameters(), lr=1e-2, amsgrad=True, backend=backend)
    ours.load_state_dict(ref.state_dict())
    for _ in range(10):
        _train_step(ref_model, ref, x)
        _train_step(ours_model, ours, x)
    for p, q in zip(ours_model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, atol=2e-6, rtol=1e-5)
    # fastgen -> torch
    back_model = _model()
    back_model.load_state_dict(ours_model.state_dict())
    back = torch.optim.AdamW(back_model.parameters(), lr=1e-2, amsgrad=True, foreach=False)
    back.load_state_dict(copy.deepcopy(ours.state_dict()))  # as a checkpoint would: no shared tensors
    for _ in range(5):
        _train_step(back_model, back, x)
        _train_step(ours_model, ours, x)
    for p, q in zip(ours_model.parameters(), back_model.parameters()):
        torch.testing.assert_close(p, q, atol=2e-6, rtol=1e-5)


def test_bf16_params_keep_fp32_states_when_loading():
    m = _model(torch.bfloat16)
    opt = FusedAdamW(m.parameters(), lr=1e-3)
    _train_step(m, opt, torch.randn(2, 12, device=DEV, dtype=torch.bfloat16))
    sd = opt.state_dict()
    exact = {k: v["exp_avg"].clone() for k, v in sd["state"].items()}
    fresh = FusedAdamW(m.parameters(), lr=1e-3)
    fresh.load_state_dict(sd)
    for i, p in enumerate(m.parameters()):
        assert fresh.state[p]["exp_avg"].dtype == torch.float32
        assert torch.equal(fresh.state[p]["exp_avg"], exact[i])


@pytest.mark.parametrize("backend", ["torch", *KERNELS])
def test_stochastic_rounding_is_unbiased(backend):
    # An update of a quarter of a bf16 ulp: round-to-nearest never moves p; stochastic rounding
    # moves it by one ulp about a quarter of the time, so the mean lands near the exact value.
    n = 4096
    p = torch.full((n,), 1.0, dtype=torch.bfloat16, device=DEV, requires_grad=True)
    opt = FusedAdamW([p], lr=2.0**-10, betas=(0.0, 0.0), eps=0.0, weight_decay=0.0, backend=backend,
                     stochastic_rounding=True)
    p.grad = torch.full_like(p, -1.0)  # Adam's first step moves every element by +lr
    opt.step()
    moved = (p.detach().float() - 1.0) / 2.0**-7  # in ulps of bf16 at 1.0
    assert set(moved.unique().tolist()) <= {0.0, 1.0}
    assert abs(moved.mean().item() - 0.125) < 0.03
    plain = torch.full((n,), 1.0, dtype=torch.bfloat16, device=DEV, requires_grad=True)
    opt2 = FusedAdamW([plain], lr=2.0**-10, betas=(0.0, 0.0), eps=0.0, weight_decay=0.0, backend=backend)
    plain.grad = torch.full_like(plain, -1.0)
    opt2.step()
    assert torch.all(plain == 1.0)


def test_stochastic_round_helper_brackets_the_value():
    x = torch.randn(10000, dtype=torch.float64)
    r = stochastic_round_bf16(x.float(), torch.Generator().manual_seed(0)).double()
    down = x.float().view(torch.int32).bitwise_and(-65536).view(torch.float32).double()  # truncated
    up = (x.float().view(torch.int32) + 65536).bitwise_and(-65536).view(torch.float32).double()
    assert torch.all((r == down) | (r == up))
    assert abs((r - x).mean().item()) < 1e-3


def test_params_without_grad_are_skipped_and_sparse_refused():
    a = torch.nn.Parameter(torch.ones(3, device=DEV))
    b = torch.nn.Parameter(torch.ones(3, device=DEV))
    opt = FusedAdamW([a, b], lr=0.1, backend="torch")
    a.grad = torch.ones(3, device=DEV)
    opt.step()
    assert torch.all(b == 1) and b not in opt.state and torch.all(a < 1)
    emb = torch.nn.Embedding(5, 2, sparse=True)
    emb(torch.tensor([1])).sum().backward()
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        FusedAdamW(emb.parameters()).step()


def test_strided_params_take_the_reference_path():
    base = torch.randn(8, 6, device=DEV)
    p = torch.nn.Parameter(base.t())  # dense but transposed: fine for the kernel
    q = torch.nn.Parameter(torch.randn(8, 6, device=DEV)[:, :3])  # not dense: reference path
    ref_p, ref_q = (torch.nn.Parameter(t.detach().clone()) for t in (p, q))
    opt = FusedAdamW([p, q], lr=0.1, backend=KERNEL)
    ref = torch.optim.AdamW([ref_p, ref_q], lr=0.1, foreach=False)
    for t in (p, q, ref_p, ref_q):
        t.grad = torch.ones_like(t)
    opt.step()
    ref.step()
    torch.testing.assert_close(p, ref_p)
    torch.testing.assert_close(q, ref_q)


def test_bad_arguments():
    with pytest.raises(ValueError, match="invalid betas"):
        FusedAdamW([torch.nn.Parameter(torch.ones(1))], betas=(1.0, 0.9))
    with pytest.raises(ValueError, match="state_dtype must be"):
        FusedAdamW([torch.nn.Parameter(torch.ones(1))], state_dtype=torch.float16)
    with pytest.raises(BackendUnavailableError, match="adamw"):
        p = torch.nn.Parameter(torch.ones(2))
        p.grad = torch.ones(2)
        FusedAdamW([p], backend="cuda").step()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_step_captures_in_a_cuda_graph(backend):
    # lr as a device tensor and steps on the device: a step needs no host sync and replays from a graph.
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(n, device="cuda")) for n in (1000, 4096, 7, 65536)]
    eager = [torch.nn.Parameter(p.detach().clone()) for p in params]
    lr = torch.tensor(1e-2, device="cuda")
    opt = FusedAdamW(params, lr=lr, backend=backend)
    ref = torch.optim.AdamW(eager, lr=1e-2, fused=True)
    grads = [torch.randn_like(p) for p in params]
    for p, q, g in zip(params, eager, grads):
        p.grad, q.grad = g.clone(), g.clone()
    opt.step()  # warm-up: allocates states and the launch tables
    ref.step()
    graph, _ = capture_cuda_graph(opt.step)
    for _ in range(5):
        graph.replay()
        ref.step()
    torch.cuda.synchronize()
    for p, q in zip(params, eager):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)
    assert float(opt.state[params[0]]["step"]) == 6


# beta = 0: log(exp(-inf)) = -inf in the branch that tl.where discards; numpy warns in the interpreter.
@pytest.mark.filterwarnings("ignore:divide by zero encountered in log:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value encountered in divide:RuntimeWarning")
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("betas", [(0.9, 0.999), (0.9, 0.99999), (0.0, 0.0)])
def test_bias_corrections_to_float32_precision(kernel, betas):
    """From p = 0 with lr = 1 the parameter after a few steps is the update itself, so a bias
    correction 1 - beta**t computed as 1 - exp(...) in fp32 (which loses the digits of a small
    1 - beta2**t: ~3e-5 relative at t = 1, beta2 = 0.999) would show; float64 truth."""
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(300, generator=g) * 10.0 ** torch.randint(-3, 3, (300,), generator=g) for _ in range(3)]
    b1, b2 = betas
    p = torch.zeros(300, device=DEV, requires_grad=True)
    opt = FusedAdamW([p], lr=1.0, betas=betas, eps=1e-12, weight_decay=0.0, backend=kernel)
    m = v = torch.zeros(300, dtype=torch.float64)
    p64 = torch.zeros(300, dtype=torch.float64)
    for t, gr in enumerate(grads, start=1):
        p.grad = gr.to(DEV)
        opt.step()
        gd = gr.double()
        m, v = b1 * m + (1 - b1) * gd, b2 * v + (1 - b2) * gd * gd
        p64 = p64 - m / (1 - b1**t) / ((v / (1 - b2**t)).sqrt() + 1e-12)
        torch.testing.assert_close(p.detach().cpu().double(), p64, atol=1e-6 * t, rtol=2e-6)
