"""GPU tier: FusedProdigy(backend="cuda") (csrc/optim/prodigy.cu, two multi-tensor passes) against the
foreach path (backend="torch") and the Triton passes, over a few steps on parameters with whole and
partial chunks and an unaligned view (the scalar path); the CUDA C++ passes must be what ran."""

from __future__ import annotations

import pytest
import torch

from fastgen import backend

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

SIZES = (4096, 5000, 70_001, 13)


def _need_extension():
    from fastgen.cuda import extension_info

    if not extension_info()["built"]:
        pytest.skip("fastgen._C is not built")


def _params(dtype):
    gen = torch.Generator(device="cuda").manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(n, device="cuda", generator=gen).to(dtype)) for n in SIZES]
    buf = torch.empty(SIZES[1] + 1, dtype=dtype, device="cuda")
    view = buf[1:]
    view.copy_(ps[1].data)
    ps[1].data = view  # starts mid-vector: the functors walk it element by element
    return ps


def _run(impl, dtype, steps, **kw):
    from fastgen.optim import FusedProdigy

    ps = _params(dtype)
    opt = FusedProdigy(ps, backend=impl, **kw)
    gen = torch.Generator(device="cuda").manual_seed(1)
    for _ in range(steps):
        for p in ps:
            p.grad = (torch.randn(p.shape, device="cuda", generator=gen) * 0.1 + p.detach().float() * 0.05).to(dtype)
        with backend.trace() as ran:
            opt.step()
        assert ("prodigy", impl) in ran
    return ps, opt


@pytest.mark.parametrize("kw", [dict(), dict(weight_decay=0.1, decouple=True, use_bias_correction=True),
                                dict(betas=(0.0, 0.99), weight_decay=0.01, decouple=False, safeguard_warmup=True)],
                         ids=["default", "decoupled-bc", "beta1=0-coupled-warmup"])
def test_cuda_matches_the_foreach_path(kw):
    """fp32: the same per-element math; d comes from the same dot products summed in another order
    (per 4096-element chunk against per tensor), hence 1e-4 rather than a few ulps."""
    _need_extension()
    ours, opt_c = _run("cuda", torch.float32, 10, **kw)
    ref, opt_t = _run("torch", torch.float32, 10, **kw)
    torch.testing.assert_close(opt_c.param_groups[0]["d"], opt_t.param_groups[0]["d"], rtol=1e-4, atol=0)
    for p, q in zip(ours, ref):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)
        for key in ("exp_avg", "exp_avg_sq", "s"):
            if key in opt_t.state[q]:
                torch.testing.assert_close(opt_c.state[p][key], opt_t.state[q][key], rtol=1e-4, atol=1e-7)


def test_cuda_close_to_triton_in_bf16():
    _need_extension()
    ours, opt_c = _run("cuda", torch.bfloat16, 5)
    ref, opt_t = _run("triton", torch.bfloat16, 5)
    torch.testing.assert_close(opt_c.param_groups[0]["d"], opt_t.param_groups[0]["d"], rtol=1e-2, atol=0)
    for p, q in zip(ours, ref):
        torch.testing.assert_close(p.float(), q.float(), rtol=2e-2, atol=1e-2)
