"""FusedProdigy against prodigyopt.Prodigy and FusedAdamWScheduleFree against
schedulefree.AdamWScheduleFree: 100 steps on a small model, the same parameters within fp32
rounding (the packages are test dependencies; each test skips alone when its package is missing)."""

from __future__ import annotations

import copy

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one thread avoids the thread pool's overhead on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(12, 24), torch.nn.Tanh(), torch.nn.Linear(24, 5))


def _loss(model, step):
    g = torch.Generator().manual_seed(step)
    x = torch.randn(16, 12, generator=g)
    y = torch.randn(16, 5, generator=g)
    return (model(x) - y).square().mean()


def _close(a, b, rtol):
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, atol=rtol, rtol=rtol)


PRODIGY_CONFIGS = {
    "default": dict(),
    "decoupled-wd": dict(weight_decay=0.1),
    "coupled-wd-bias-correction": dict(weight_decay=0.05, decouple=False, use_bias_correction=True),
    "safeguard-dcoef-growth": dict(safeguard_warmup=True, d_coef=2.0, growth_rate=1.05, betas=(0.9, 0.99)),
    "slice-beta3": dict(slice_p=3, beta3=0.95, lr=0.5),
    "beta1-zero": dict(betas=(0.0, 0.999)),
}


@pytest.mark.parametrize("cfg", PRODIGY_CONFIGS.values(), ids=PRODIGY_CONFIGS.keys())
def test_prodigy_matches_prodigyopt_for_100_steps(cfg, capsys):
    prodigyopt = pytest.importorskip("prodigyopt")
    from fastgen.optim import FusedProdigy

    ours, theirs = _model(), _model()
    opt = FusedProdigy(ours.parameters(), **cfg)
    ref = prodigyopt.Prodigy(theirs.parameters(), **cfg)
    for step in range(100):
        for m, o in ((ours, opt), (theirs, ref)):
            o.zero_grad()
            _loss(m, step).backward()
            o.step()
        if step % 25 == 24:
            _close(ours, theirs, 2e-5)
            torch.testing.assert_close(float(opt.param_groups[0]["d"]), ref.param_groups[0]["d"], rtol=1e-5, atol=0)
    _close(ours, theirs, 2e-5)
    assert float(opt.param_groups[0]["d"]) > 10 * 1e-6  # d grew from d0: the estimate is exercised
    for p, q in zip(ours.parameters(), theirs.parameters()):
        for key, value in ref.state[q].items():
            if isinstance(value, torch.Tensor):  # s sums terms of both signs: tolerance on its scale
                torch.testing.assert_close(opt.state[p][key], value, atol=1e-5 * float(value.abs().max()), rtol=2e-5)
            else:
                assert opt.state[p][key] == value


def test_prodigy_loads_a_prodigyopt_checkpoint_and_refuses_others():
    prodigyopt = pytest.importorskip("prodigyopt")
    from fastgen.optim import FusedAdamW, FusedProdigy

    ours, theirs = _model(), _model()
    ref = prodigyopt.Prodigy(theirs.parameters())
    for step in range(10):
        ref.zero_grad()
        _loss(theirs, step).backward()
        ref.step()
    ours.load_state_dict(theirs.state_dict())
    opt = FusedProdigy(ours.parameters())
    opt.load_state_dict(copy.deepcopy(ref.state_dict()))
    for step in range(10, 20):
        for m, o in ((ours, opt), (theirs, ref)):
            o.zero_grad()
            _loss(m, step).backward()
            o.step()
    _close(ours, theirs, 2e-5)
    adamw = FusedAdamW(ours.parameters(), backend="torch")
    _loss(ours, 0).backward()
    adamw.step()
    with pytest.raises(ValueError, match="another optimizer kind"):
        opt.load_state_dict(adamw.state_dict())
    with pytest.raises(ValueError, match="fsdp_in_use"):
        FusedProdigy(ours.parameters(), fsdp_in_use=True)


SF_CONFIGS = {
    "default": dict(lr=1e-2),
    "warmup-wd": dict(lr=1e-2, warmup_steps=20, weight_decay=0.05),
    "r-power-betas": dict(lr=5e-3, r=0.5, weight_lr_power=1.0, betas=(0.8, 0.99), eps=1e-6),
}


@pytest.mark.parametrize("cfg", SF_CONFIGS.values(), ids=SF_CONFIGS.keys())
def test_schedulefree_matches_the_package_for_100_steps_with_train_eval(cfg):
    schedulefree = pytest.importorskip("schedulefree")
    from fastgen.optim import FusedAdamWScheduleFree

    ours, theirs = _model(), _model()
    opt = FusedAdamWScheduleFree(ours.parameters(), **cfg)
    ref = schedulefree.AdamWScheduleFree(theirs.parameters(), foreach=True, **cfg)
    for o in (opt, ref):
        o.train()
    for step in range(100):
        for m, o in ((ours, opt), (theirs, ref)):
            o.zero_grad()
            _loss(m, step).backward()
            o.step()
        if step % 25 == 24:  # evaluate at x, then back to y
            opt.eval()
            ref.eval()
            _close(ours, theirs, 1e-5)
            with torch.no_grad():
                torch.testing.assert_close(_loss(ours, -1), _loss(theirs, -1), atol=1e-6, rtol=1e-5)
            opt.train()
            ref.train()
    _close(ours, theirs, 1e-5)
    for p, q in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(opt.state[p]["z"], ref.state[q]["z"], atol=1e-5, rtol=1e-5)
    assert opt.param_groups[0]["weight_sum"] == pytest.approx(ref.param_groups[0]["weight_sum"], rel=1e-12)


def test_schedulefree_eval_mode_step_and_checkpoint():
    schedulefree = pytest.importorskip("schedulefree")
    from fastgen.optim import FusedAdamWScheduleFree, FusedLion

    ours, theirs = _model(), _model()
    opt = FusedAdamWScheduleFree(ours.parameters(), lr=1e-2)
    _loss(ours, 0).backward()
    with pytest.raises(RuntimeError, match=r"call optimizer.train\(\)"):
        opt.step()
    ref = schedulefree.AdamWScheduleFree(theirs.parameters(), lr=1e-2)
    ref.train()
    for step in range(5):
        ref.zero_grad()
        _loss(theirs, step).backward()
        ref.step()
    ours.load_state_dict(theirs.state_dict())
    opt.load_state_dict(copy.deepcopy(ref.state_dict()))  # a package checkpoint, in train mode
    for step in range(5, 10):
        for m, o in ((ours, opt), (theirs, ref)):
            o.zero_grad()
            _loss(m, step).backward()
            o.step()
    _close(ours, theirs, 1e-5)
    lion = FusedLion(ours.parameters(), backend="torch")
    lion.step()
    with pytest.raises(ValueError, match="another optimizer kind"):
        opt.load_state_dict(lion.state_dict())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_schedulefree_triton_kernel_matches_the_torch_path(dtype):
    from conftest import INTERPRET, TRITON_DEVICE

    if not (INTERPRET or TRITON_DEVICE == "cuda"):
        pytest.skip("runs the Triton kernel")
    from fastgen.optim import FusedAdamWScheduleFree

    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(n, generator=gen).to(dtype) for n in (2048, 2100, 5)]  # a full chunk, a tail, a tiny one
    a = [torch.nn.Parameter(x.clone().to(TRITON_DEVICE)) for x in init]
    b = [torch.nn.Parameter(x.clone().to(TRITON_DEVICE)) for x in init]
    oa = FusedAdamWScheduleFree(a, lr=1e-2, weight_decay=0.1, warmup_steps=2, backend="torch")
    ob = FusedAdamWScheduleFree(b, lr=1e-2, weight_decay=0.1, warmup_steps=2, backend="triton")
    oa.train()
    ob.train()
    for _ in range(3):
        for p, q in zip(a, b):
            g = torch.randn(p.shape, generator=gen).to(dtype)
            p.grad, q.grad = g.to(TRITON_DEVICE), g.to(TRITON_DEVICE).clone()
        oa.step()
        ob.step()
    tol = 1e-6 if dtype == torch.float32 else 2e-2
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, atol=tol, rtol=tol)
        torch.testing.assert_close(oa.state[p]["z"], ob.state[q]["z"], atol=tol, rtol=tol)
        torch.testing.assert_close(oa.state[p]["exp_avg_sq"], ob.state[q]["exp_avg_sq"], atol=tol, rtol=tol)


@pytest.mark.parametrize("cfg", [PRODIGY_CONFIGS[k] for k in ("decoupled-wd", "coupled-wd-bias-correction",
                                                              "beta1-zero", "slice-beta3")],
                         ids=["decoupled-wd", "coupled-wd", "beta1-zero", "slice-p-3-foreach"])
def test_prodigy_triton_passes_match_prodigyopt(cfg, monkeypatch):
    from conftest import INTERPRET, TRITON_DEVICE

    import fastgen.kernels.prodigy as kernels

    calls = []
    for name in ("prodigy_moments", "prodigy_update"):
        fn = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, _fn=fn, _n=name, **k: (calls.append(_n), _fn(*a, **k))[1])

    if not (INTERPRET or TRITON_DEVICE == "cuda"):
        pytest.skip("runs the Triton kernels")
    prodigyopt = pytest.importorskip("prodigyopt")
    from fastgen.optim import FusedProdigy

    ours, theirs = _model().to(TRITON_DEVICE), _model().to(TRITON_DEVICE)
    opt = FusedProdigy(ours.parameters(), backend="triton", **cfg)
    ref = prodigyopt.Prodigy(theirs.parameters(), **cfg)
    for step in range(6):
        for m, o in ((ours, opt), (theirs, ref)):
            o.zero_grad()
            g = torch.Generator().manual_seed(step)
            x, y = torch.randn(16, 12, generator=g).to(TRITON_DEVICE), torch.randn(16, 5, generator=g).to(TRITON_DEVICE)
            (m(x) - y).square().mean().backward()
            o.step()
    _close(ours, theirs, 2e-5)
    torch.testing.assert_close(float(opt.param_groups[0]["d"]), ref.param_groups[0]["d"], rtol=1e-5, atol=0)
    # the Triton passes ran (slice_p > 1 takes the foreach path by design)
    assert (len(calls) == 12) == (cfg.get("slice_p", 1) == 1), calls


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_gpu_schedulefree_cuda_kernel_matches_the_torch_path(dtype):
    """The CUDA C++ functor (backend='cuda') against the torch path and the Triton kernel, 4 steps with
    warm-up and weight decay: full 16-byte chunks, tails, a tiny tensor and an unaligned view (the
    functor's scalar path)."""
    import fastgen
    from fastgen.cuda import extension_info
    from fastgen.optim import FusedAdamWScheduleFree

    if not extension_info()["built"]:
        pytest.skip(f"fastgen._C is not built: {extension_info()['error']}")
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(4099, generator=gen)
    init = [torch.randn(n, generator=gen) for n in (4096 * 3, 4100, 5)] + [base[1:4098]]
    runs = {}
    for backend in ("torch", "triton", "cuda"):
        params = [torch.nn.Parameter(x.to(device="cuda", dtype=dtype)) for x in init[:3]]
        storage = base.to(device="cuda", dtype=dtype)
        params.append(torch.nn.Parameter(storage[1:4098]))  # data_ptr not 16-byte aligned
        assert params[-1].data_ptr() % 16 != 0
        opt = FusedAdamWScheduleFree(params, lr=1e-2, weight_decay=0.1, warmup_steps=2, r=0.5, backend=backend)
        opt.train()
        with fastgen.backend.trace() as ran:
            for step in range(4):
                g = torch.Generator().manual_seed(100 + step)
                for p in params:
                    p.grad = torch.randn(p.shape, generator=g).to(device="cuda", dtype=dtype)
                opt.step()
        assert ("schedulefree", backend) in ran and all(impl == backend for op, impl in ran if op == "schedulefree")
        runs[backend] = (params, opt)
    ref, ref_opt = runs["torch"]
    tol = 1e-6 if dtype == torch.float32 else 2e-2
    for backend in ("cuda", "triton"):
        params, opt = runs[backend]
        for p, q in zip(params, ref):
            torch.testing.assert_close(p, q, atol=tol, rtol=tol)
            torch.testing.assert_close(opt.state[p]["z"], ref_opt.state[q]["z"], atol=tol, rtol=tol)
            torch.testing.assert_close(opt.state[p]["exp_avg_sq"], ref_opt.state[q]["exp_avg_sq"], atol=tol, rtol=tol)
    if dtype == torch.float32:  # the same fp32 formula, IEEE division and square root: the two kernels agree closely
        for p, q in zip(runs["cuda"][0], runs["triton"][0]):
            torch.testing.assert_close(p, q, atol=1e-7, rtol=1e-6)
