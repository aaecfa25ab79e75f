"""GPU tier: the CUDA C++ multi-tensor functors' vector path (16-byte accesses) and scalar path
(tails, unaligned views) against each other and against the torch reference.

Each list mixes tensors whose sizes are whole 16-byte groups, sizes with a tail (1, 13, 4096 * 2 + 3)
and, in the "unaligned" copy, views that start one element past a 16-byte boundary, which the
functors must walk element by element. The per-element math is the same on both paths, so the
aligned and unaligned runs agree to fp32 rounding, and both agree with the torch reference
(``adamw_reference``, ``torch.lerp``, ``torch.linalg.vector_norm``).
"""

from __future__ import annotations

import pytest
import torch

from fastgen import backend

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

SIZES = (8192 + 3, 13, 1, 4096, 8, 70_001)


def _cu():
    from fastgen.cuda import extension_info

    if not extension_info()["built"]:
        pytest.skip("fastgen._C is not built")
    from fastgen.cuda import optim

    return optim


def _unaligned(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` whose data starts one element past a 16-byte boundary."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    out = buf[1:].view_as(t)
    out.copy_(t)
    assert out.data_ptr() % 16 != 0
    return out


def _lists(dtypes, seed=0):
    """Parallel lists of random tensors of SIZES, one list per dtype of ``dtypes``."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return [[torch.randn(n, device="cuda", generator=gen).to(dt) for n in SIZES] for dt in dtypes]


def _odd(lst, every):
    """Copies of ``lst``; with ``every`` = k, every k-th one an unaligned view."""
    return [_unaligned(t) if every and i % every == 0 else t.clone() for i, t in enumerate(lst)]


def _close(a, b):
    """fp32 to a few ulps; bf16 / fp16 to their rounding (the default tolerances of assert_close)."""
    if a.dtype == torch.float32:
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    else:
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("p_dtype,s_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                             (torch.float16, torch.float32), (torch.bfloat16, torch.bfloat16)])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_adamw_vector_and_scalar_paths(p_dtype, s_dtype, amsgrad):
    from fastgen.optim.adamw import adamw_reference

    cu = _cu()
    kw = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, amsgrad=amsgrad, maximize=False)
    base = _lists((p_dtype, p_dtype, s_dtype, s_dtype, s_dtype))
    for unaligned_every in (0, 2):
        p, g, m, v, vmax = [_odd(lst, unaligned_every) for lst in base]
        v = [t.abs_() for t in v]
        vmax = [t.abs_() for t in vmax]
        steps = [torch.full((), 3.0, device="cuda") for _ in p]
        ref = [[t.clone() for t in lst] for lst in (p, g, m, v, vmax)]
        cu.adamw_step(p, g, m, v, vmax if amsgrad else None, steps, **kw)
        for i in range(len(p)):
            adamw_reference(ref[0][i], ref[1][i], ref[2][i], ref[3][i], ref[4][i] if amsgrad else None, steps[i], **kw)
        torch.cuda.synchronize()
        for ours, theirs in zip((p, m, v) + ((vmax,) if amsgrad else ()), (ref[0], ref[2], ref[3], ref[4])):
            for a, b in zip(ours, theirs):
                _close(a, b)


@pytest.mark.parametrize("p_dtype,s_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32)])
def test_lion_vector_and_scalar_paths(p_dtype, s_dtype):
    cu = _cu()
    p0, g0, m0 = _lists((p_dtype, p_dtype, s_dtype), seed=1)
    results = []
    for unaligned_every in (0, 3):
        p, g, m = [_odd(lst, unaligned_every) for lst in (p0, g0, m0)]
        cu.lion_step(p, g, m, lr=1e-3, beta1=0.9, beta2=0.99, weight_decay=0.1, maximize=False)
        results.append((p, m))
    for i in range(len(SIZES)):  # torch reference, fp32 math
        c = m0[i].float() * 0.9 + g0[i].float() * 0.1
        p_ref = (p0[i].float() * (1 - 1e-3 * 0.1) - 1e-3 * torch.sign(c)).to(p_dtype)
        m_ref = (m0[i].float() * 0.99 + g0[i].float() * 0.01).to(s_dtype)
        for p, m in results:
            _close(p[i], p_ref)
            _close(m[i], m_ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("norm_type", [2.0, 1.0, 3.0, float("inf")])
def test_norm_and_scale_vector_and_scalar_paths(dtype, norm_type):
    cu = _cu()
    (g0,) = _lists((dtype,), seed=2)
    want = torch.linalg.vector_norm(torch.cat([g.double().flatten() for g in g0]), norm_type)
    for unaligned_every in (0, 2):
        g = _odd(g0, unaligned_every)
        total, coef = cu.clip_coef([g], norm_type, 1.0)
        torch.testing.assert_close(total.double(), want, atol=0, rtol=2e-5)
        cu.scale_(g, coef)
        for a, b in zip(g, g0):
            torch.testing.assert_close(a, (b.float() * coef).to(dtype))


@pytest.mark.parametrize("s_dtype,p_dtype", [(torch.float32, torch.bfloat16), (torch.float32, torch.float32),
                                             (torch.bfloat16, torch.float16), (torch.float16, torch.float32)])
def test_ema_vector_and_scalar_paths(s_dtype, p_dtype):
    cu = _cu()
    s0, p0 = _lists((s_dtype, p_dtype), seed=3)
    for unaligned_every in (0, 2):
        s, p = _odd(s0, unaligned_every), _odd(p0, unaligned_every)
        cu.ema_update_(s, p, 0.99)
        for a, s_ref, p_ref in zip(s, s0, p0):
            _close(a, s_ref.float().lerp(p_ref.float(), 0.01).to(s_dtype))


def test_fused_adamw_cuda_backend_runs_the_cuda_functor_on_odd_views():
    """FusedAdamW(backend="cuda") over parameters that include an unaligned view: the CUDA C++
    step ran (trace) and matches torch.optim.AdamW."""
    _cu()
    from fastgen.optim import FusedAdamW

    torch.manual_seed(0)
    base = torch.randn(4097, device="cuda")
    params = [torch.nn.Parameter(base[1:].clone()), torch.nn.Parameter(torch.randn(333, device="cuda"))]
    params[0].data = _unaligned(params[0].data)
    eager = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = FusedAdamW(params, lr=1e-2, backend="cuda")
    ref = torch.optim.AdamW(eager, lr=1e-2, foreach=False)
    for _ in range(3):
        for p, q in zip(params, eager):
            g = torch.randn_like(p)
            p.grad, q.grad = g.clone(), g.clone()
        with backend.trace() as ran:
            opt.step()
        ref.step()
        assert ("adamw", "cuda") in ran
    for p, q in zip(params, eager):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)
