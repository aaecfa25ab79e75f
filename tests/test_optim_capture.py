"""Schedule-free AdamW and the EMA warm-up decay with their schedules on the device, so that a
step can be captured in a CUDA graph and replayed.

CPU: a step makes no host sync (every ``.item()`` / ``float()`` / ``bool()`` of a tensor is
refused while it runs, the schedule's tensors watched by name), the device schedule gives the
package's numbers and the host decay's, checkpoints keep the package's layout and the
tensors a graph reads. GPU tier: one captured step replayed N times equals N eager steps,
with the implementation that ran named by ``fastgen.backend.trace()``.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from conftest import replay_cuda_graph
from torch.utils._python_dispatch import TorchDispatchMode

import fastgen
from fastgen.optim import EMA, FusedAdamW, FusedAdamWScheduleFree
from fastgen.optim import ema as ema_module
from fastgen.optim import schedulefree as sf_module

_SYNC_OPS = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default)


class _NoHostSync(TorchDispatchMode):
    """Raises on every op that copies a tensor's value to the host (``item``, ``float(t)``,
    ``int(t)``, ``bool(t)``, ``if t:`` all reach ``aten._local_scalar_dense``)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in _SYNC_OPS:
            raise AssertionError(f"host sync in an optimizer step: {func}")
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def _no_host_sync(watched, monkeypatch):
    """The dispatch check above, and the Python-level readers (``item``, ``__float__``, ``tolist``,
    ``numpy``, ...) patched to raise for the ``watched`` tensors (the schedule state)."""
    ids = {id(t) for t in watched}
    for name in ("item", "__float__", "__int__", "__bool__", "__index__", "tolist", "numpy"):
        original = getattr(torch.Tensor, name)

        def guard(self, *args, _original=original, _name=name, **kwargs):
            if id(self) in ids:
                raise AssertionError(f"{_name}() of a schedule tensor in an optimizer step")
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, guard)
    with _NoHostSync():
        yield
    monkeypatch.undo()


def _params(device="cpu", sizes=(300, 7, 2048 + 5), seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(n, generator=gen).to(device=device, dtype=dtype)) for n in sizes]


def _grads(params, step):
    gen = torch.Generator().manual_seed(1000 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(device=p.device, dtype=p.dtype)


def _kernel_backends():
    from conftest import INTERPRET, TRITON_DEVICE

    return ["torch"] + (["triton"] if INTERPRET or TRITON_DEVICE == "cuda" else [])


def _device_for(backend):
    from conftest import TRITON_DEVICE

    return TRITON_DEVICE if backend == "triton" else "cpu"


# ---------------------------------------------------------------------------------------------
# Schedule-free AdamW on CPU


@pytest.mark.parametrize("backend", _kernel_backends())
def test_schedulefree_step_makes_no_host_sync(backend, monkeypatch):
    """After the first step (which moves the schedule to the device), a step reads no tensor back
    to the host, whatever the lr (a tensor here) and warm-up; the schedule tensors advance in place."""
    dev = _device_for(backend)
    params = _params(dev, sizes=(300, 5))
    lr = torch.tensor(2.0 ** -7, dtype=torch.float64, device=dev)
    opt = FusedAdamWScheduleFree(params, lr=lr, warmup_steps=3, weight_decay=0.1, r=0.5, backend=backend)
    opt.train()
    _grads(params, 0)
    opt.step()
    group = opt.param_groups[0]
    state = {key: group[key] for key in ("k", "lr_max", "weight_sum", "scheduled_lr")}
    assert all(isinstance(t, torch.Tensor) and t.dtype == torch.float64 and t.dim() == 0 for t in state.values())
    for step in range(1, 3):
        _grads(params, step)
        with _no_host_sync(list(state.values()) + [lr], monkeypatch):
            opt.step()
    assert all(group[key] is t for key, t in state.items())  # updated in place: what a graph reads
    assert group["k"].item() == 3
    # warm-up: lr_k = lr * (k + 1) / 3, so the third step reached lr itself
    assert group["scheduled_lr"].item() == group["lr_max"].item() == 2.0 ** -7


@pytest.mark.parametrize("backend", _kernel_backends())
def test_schedulefree_tensor_lr_equals_float_lr(backend):
    """lr as a device tensor gives the float lr's steps exactly (2^-7 is exact in both)."""
    dev = _device_for(backend)
    a, b = _params(dev, sizes=(300, 5)), _params(dev, sizes=(300, 5))
    oa = FusedAdamWScheduleFree(a, lr=2.0 ** -7, warmup_steps=2, backend=backend)
    ob = FusedAdamWScheduleFree(b, lr=torch.tensor(2.0 ** -7, device=dev), warmup_steps=2, backend=backend)
    for o in (oa, ob):
        o.train()
    for step in range(3):
        _grads(a, step)
        _grads(b, step)
        oa.step()
        ob.step()
    for p, q in zip(a, b):
        assert torch.equal(p, q)
    assert oa.param_groups[0]["weight_sum"].item() == ob.param_groups[0]["weight_sum"].item()


def test_schedulefree_device_schedule_is_the_package_arithmetic():
    """The float64 device schedule against the package's host formulas, step by step, for a
    warm-up, r and weight_lr_power that all matter (float64 truth computed here in Python)."""
    params = _params(sizes=(4,))
    lr, warmup, r, power, (beta1, beta2) = 3e-3, 5, 0.5, 1.5, (0.85, 0.99)
    opt = FusedAdamWScheduleFree(params, lr=lr, warmup_steps=warmup, r=r, weight_lr_power=power,
                                 betas=(beta1, beta2), backend="torch")
    lr_max, weight_sum = -1.0, 0.0
    for k in range(12):
        sched = (k + 1) / warmup if k < warmup else 1.0
        lr_k = lr * sched
        lr_max = max(lr_k, lr_max)
        weight = ((k + 1) ** r) * (lr_max ** power)
        weight_sum += weight
        ckp1 = weight / weight_sum
        got = sf_module.advance_schedule(opt.param_groups[0], torch.device("cpu"))
        want = torch.tensor([1 - beta2 ** (k + 1), ckp1, lr_k * (beta1 * (1 - ckp1) - 1), lr_k], dtype=torch.float64)
        torch.testing.assert_close(got, want, rtol=1e-14, atol=0)
        torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=0)  # the kernels' fp32 scalars
    assert opt.param_groups[0]["k"].item() == 12
    assert opt.param_groups[0]["weight_sum"].item() == pytest.approx(weight_sum, rel=1e-14)


def test_schedulefree_checkpoint_keeps_the_package_layout_and_the_tensors():
    """state_dict() writes the package's numbers (k an int) and the package continues from it
    as from its own; load_state_dict writes into the tensors a captured graph reads."""
    schedulefree = pytest.importorskip("schedulefree")
    ours, theirs = _params(sizes=(64, 3)), _params(sizes=(64, 3))
    opt = FusedAdamWScheduleFree(ours, lr=1e-2, warmup_steps=4, backend="torch")
    opt.train()
    for step in range(3):
        _grads(ours, step)
        opt.step()
    sd = opt.state_dict()
    group = sd["param_groups"][0]
    assert type(group["k"]) is int and group["k"] == 3
    assert all(type(group[key]) is float for key in ("lr_max", "weight_sum", "scheduled_lr"))
    with torch.no_grad():
        for p, q in zip(ours, theirs):
            q.copy_(p)
    ref = schedulefree.AdamWScheduleFree(theirs, lr=1e-2, warmup_steps=4)
    ref.load_state_dict(copy.deepcopy(sd))  # in train mode, as saved
    held = {key: opt.param_groups[0][key] for key in ("k", "weight_sum")}
    opt.load_state_dict(copy.deepcopy(sd))
    assert all(opt.param_groups[0][key] is t for key, t in held.items())
    for step in range(3, 8):
        for ps, o in ((ours, opt), (theirs, ref)):
            _grads(ps, step)
            o.step()
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)
    assert opt.param_groups[0]["weight_sum"].item() == pytest.approx(ref.param_groups[0]["weight_sum"], rel=1e-12)
    assert opt.param_groups[0]["k"].item() == ref.param_groups[0]["k"] == 8


def test_schedulefree_capture_before_an_eager_step_raises(monkeypatch):
    params = _params(sizes=(8,))
    opt = FusedAdamWScheduleFree(params, lr=1e-2, backend="torch")
    opt.train()
    _grads(params, 0)
    monkeypatch.setattr(sf_module, "_capturing", lambda: True)
    with pytest.raises(RuntimeError, match="run one eager step before capturing"):
        opt.step()


# ---------------------------------------------------------------------------------------------
# EMA warm-up decay on CPU


def test_ema_device_decay_is_the_host_decay():
    """The fp32 weight 1 - d that the kernels read, from the device count, equals the host's
    fp32(1 - min(decay, (1 + n) / (10 + n))) for every n (both float64 IEEE arithmetic)."""
    ema = EMA(_params(sizes=(3,)), decay=0.9999)
    for n in range(1, 3000):
        ema.num_updates = n - 1
        ema._count.add_(1.0)
        host = min(0.9999, (1 + n) / (10 + n))
        weight = (1.0 - ema._device_decay()).to(torch.float32)
        assert weight.item() == torch.tensor(1.0 - host, dtype=torch.float32).item(), n


@pytest.mark.parametrize("backend", _kernel_backends())
def test_ema_captured_warmup_equals_eager(backend, monkeypatch):
    """An EMA whose updates take the capture path (the device count and decay; the capture check
    mocked) gives the eager EMA's shadows; the counts read back from the device."""
    dev = _device_for(backend)
    params = _params(dev, sizes=(300, 7))
    eager = EMA(params, decay=0.99, backend=backend)
    graphed = EMA(params, decay=0.99, backend=backend)
    for step in range(4):
        with torch.no_grad():
            for p in params:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(step)).to(dev))
        eager.update()
        with monkeypatch.context() as m:
            m.setattr(ema_module, "_capturing", lambda: step >= 1)  # the first update eager, then "captured"
            if step >= 1:
                with _no_host_sync([graphed._count], monkeypatch):
                    graphed.update()
            else:
                graphed.update()
    assert graphed._host_updates is None  # the device count is the truth now
    assert graphed.num_updates == eager.num_updates == 4 and graphed.num_calls == 4
    for name in eager.shadow:
        torch.testing.assert_close(graphed.shadow[name], eager.shadow[name], rtol=1e-6, atol=1e-7)
    state = graphed.state_dict()
    assert state["num_updates"] == 4 and type(state["num_updates"]) is int


def test_ema_update_every_refuses_capture(monkeypatch):
    ema = EMA(_params(sizes=(3,)), decay=0.9, update_every=2)
    monkeypatch.setattr(ema_module, "_capturing", lambda: True)
    with pytest.raises(RuntimeError, match="update_every > 1 cannot be captured"):
        ema.update()


def test_one_pass_step_with_a_device_decay_equals_the_fused_one(monkeypatch):
    """The one-pass FusedAdamW hands a device decay (a captured warm-up EMA) to EMA.fold instead of
    its own pass; the parameters and shadows equal the eager one-pass step's."""
    runs = []
    for captured in (False, True):
        params = _params(sizes=(300, 7))
        ema = EMA(params, decay=0.999, backend="torch")
        opt = FusedAdamW(params, lr=1e-2, max_grad_norm=1.0, ema=ema, backend="torch")
        for step in range(3):
            _grads(params, step)
            with monkeypatch.context() as m:
                m.setattr(ema_module, "_capturing", lambda: captured)
                opt.step()
        runs.append((params, ema))
    (a, ema_a), (b, ema_b) = runs
    for p, q in zip(a, b):
        assert torch.equal(p, q)
    assert ema_b._host_updates is None and ema_b.num_updates == 3
    for name in ema_a.shadow:
        torch.testing.assert_close(ema_b.shadow[name], ema_a.shadow[name], rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# Prodigy: the step count (its bias correction) lives on the device too


@pytest.mark.parametrize("backend", [b for b in _kernel_backends() if b != "torch"])
def test_prodigy_step_makes_no_host_sync(backend, monkeypatch):
    """With the bias correction (a function of the step count k), a step after the first reads no
    tensor back to the host; k, d, d_max and the numerator advance in place. (The torch path is
    not checked here: on CPU tensors ``_foreach_add_`` with a 0-d tensor reads it on the host,
    which CUDA's foreach kernels do not; the GPU tier captures that path.)"""
    from fastgen.optim import FusedProdigy

    dev = _device_for(backend)
    params = _params(dev, sizes=(300, 5))
    opt = FusedProdigy(params, weight_decay=0.01, use_bias_correction=True, backend=backend)
    _grads(params, 0)
    opt.step()
    group = opt.param_groups[0]
    state = {key: group[key] for key in ("k", "d", "d_max", "d_numerator")}
    assert all(isinstance(t, torch.Tensor) and t.dtype == torch.float64 and t.dim() == 0 for t in state.values())
    for step in range(1, 3):
        _grads(params, step)
        with _no_host_sync(list(state.values()), monkeypatch):
            opt.step()
    assert all(group[key] is t for key, t in state.items())
    assert group["k"].item() == 3


def test_prodigy_checkpoint_keeps_the_package_layout_and_resumes():
    """state_dict writes k as an int (prodigyopt's layout); a resumed optimizer continues with the
    same bias correction as one that never stopped."""
    from fastgen.optim import FusedProdigy

    def run(steps, opt=None, params=None):
        params = params or _params(sizes=(300, 5))
        opt = opt or FusedProdigy(params, use_bias_correction=True)
        for step in steps:
            _grads(params, step)
            opt.step()
        return params, opt

    straight, _ = run(range(6))
    half, opt = run(range(3))
    sd = opt.state_dict()
    assert sd["param_groups"][0]["k"] == 3 and isinstance(sd["param_groups"][0]["k"], int)
    resumed = [torch.nn.Parameter(p.detach().clone()) for p in half]
    fresh = FusedProdigy(resumed, use_bias_correction=True)
    fresh.load_state_dict(sd)
    run(range(3, 6), fresh, resumed)
    for p, q in zip(straight, resumed):
        torch.testing.assert_close(p, q, atol=0, rtol=0)


def test_prodigyopt_reads_a_prodigy_checkpoint_with_device_k():
    prodigyopt = pytest.importorskip("prodigyopt")
    from fastgen.optim import FusedProdigy

    params = _params(sizes=(300, 5))
    opt = FusedProdigy(params, use_bias_correction=True)
    for step in range(3):
        _grads(params, step)
        opt.step()
    theirs = prodigyopt.Prodigy([torch.nn.Parameter(p.detach().clone()) for p in params], use_bias_correction=True)
    theirs.load_state_dict(opt.state_dict())
    assert theirs.param_groups[0]["k"] == 3


# ---------------------------------------------------------------------------------------------
# GPU tier: capture one step, replay N times, against N eager steps


def _skip_unless_built(backend):
    from fastgen.cuda import extension_info

    if backend == "cuda" and not extension_info()["built"]:
        pytest.skip(f"fastgen._C is not built: {extension_info()['error']}")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["triton", "cuda", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_schedulefree_step_captures_in_a_cuda_graph(backend, dtype):
    """Warm-up across the replays (the schedule changes at every one), a tensor lr, weight decay
    and r: N replays of one captured step equal N eager steps, and the schedule advanced N times."""
    _skip_unless_built(backend)
    replays = 6
    runs = []
    for captured in (True, False):
        params = _params("cuda", sizes=(5000, 4096, 300, 7), dtype=dtype)
        _grads(params, 0)  # the same gradients at every step (a replay reads the same buffers)
        opt = FusedAdamWScheduleFree(params, lr=torch.tensor(1e-2, device="cuda"), warmup_steps=4,
                                     weight_decay=0.05, r=0.5, backend=backend)
        opt.train()
        with fastgen.backend.trace() as ran:
            opt.step()
        assert ("schedulefree", backend) in ran
        if captured:
            replay_cuda_graph(opt.step, replays)
        else:
            for _ in range(replays):
                opt.step()
            torch.cuda.synchronize()
        runs.append((params, opt))
    (a, oa), (b, ob) = runs
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, atol=0, rtol=0)
        for key in ("z", "exp_avg_sq"):
            torch.testing.assert_close(oa.state[p][key], ob.state[q][key], atol=0, rtol=0)
    for key in ("k", "lr_max", "weight_sum", "scheduled_lr"):
        assert oa.param_groups[0][key].item() == ob.param_groups[0][key].item(), key
    assert oa.state_dict()["param_groups"][0]["k"] == 1 + replays
    oa.eval()  # train/eval switching after replays
    ob.eval()
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, atol=0, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_gpu_one_pass_adamw_with_ema_warmup_captures_in_a_cuda_graph(backend):
    """FusedAdamW(max_grad_norm, ema=EMA(warmup=True)): the warm-up decay of each replay is computed
    on the device (a decay fixed at capture would differ by ~0.1 in the first steps)."""
    replays = 5
    runs = []
    for captured in (True, False):
        params = _params("cuda", sizes=(5000, 4096, 300, 7))
        _grads(params, 0)
        for p in params:
            p.grad.mul_(10)  # clipped
        ema = EMA(params, decay=0.999, warmup=True, backend=backend)
        opt = FusedAdamW(params, lr=torch.tensor(1e-3, device="cuda"), max_grad_norm=1.0, ema=ema,
                         backend=backend, capturable=True)
        opt.step()
        if captured:
            with fastgen.backend.trace() as ran:
                replay_cuda_graph(opt.step, replays)
            assert ("adamw", backend) in ran and ("ema", backend) in ran
        else:
            for _ in range(replays):
                opt.step()
            torch.cuda.synchronize()
        runs.append((params, ema))
    (a, ema_a), (b, ema_b) = runs
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, atol=0, rtol=0)
    assert ema_a.num_updates == ema_b.num_updates == 1 + replays
    for name in ema_a.shadow:
        torch.testing.assert_close(ema_a.shadow[name], ema_b.shadow[name], rtol=1e-6, atol=1e-7)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_gpu_ema_warmup_update_captures_in_a_cuda_graph(backend):
    """EMA.update() alone, warm-up on: replays follow the eager decays 2/11, 3/12, ..."""
    replays = 5
    shadows = []
    for captured in (True, False):
        params = _params("cuda", sizes=(5000, 7))
        ema = EMA(params, decay=0.999, warmup=True, backend=backend)
        with torch.no_grad():
            for p in params:
                p.add_(1.0)  # the parameters move away from the shadow once
        ema.update()
        if captured:
            with fastgen.backend.trace() as ran:
                replay_cuda_graph(ema.update, replays)
            assert ("ema", backend) in ran
        else:
            for _ in range(replays):
                ema.update()
            torch.cuda.synchronize()
        assert ema.num_updates == 1 + replays
        shadows.append(ema.shadow)
    for name in shadows[0]:
        torch.testing.assert_close(shadows[0][name], shadows[1][name], rtol=1e-6, atol=1e-7)


def test_schedulefree_launchers_take_the_same_arguments():
    """The optimizer calls the Triton and the CUDA C++ launcher alike (scalars as a device tensor)."""
    import inspect

    pytest.importorskip("triton")
    from fastgen.backend import launcher

    tri = launcher("schedulefree", "triton").schedulefree_step
    cu = launcher("schedulefree", "cuda").schedulefree_step
    assert inspect.signature(tri) == inspect.signature(cu)
    assert "scalars" in inspect.signature(cu).parameters
