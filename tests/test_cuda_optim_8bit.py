"""GPU tier: FusedAdamW8bit(backend="cuda") (csrc/optim/adamw8bit.cu) against the torch reference of the
same quantization scheme and against backend="triton".

One step from given states: the parameters agree to fp32 rounding, the absmax to fp32 rounding, and the
stored codes are the reference's except where a value sits within rounding of a boundary (then one
code apart, in at most a few elements). Several steps with clipping and an EMA (the one-pass step):
close to the Triton path. Sizes cover whole and partial quantization blocks, a partial last chunk and
an unaligned parameter (the scalar path).
"""

from __future__ import annotations

import pytest
import torch
from conftest import replay_cuda_graph

from fastgen import backend

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

SIZES = (4096, 5000, 70_001, 300)


def _need_extension():
    from fastgen.cuda import extension_info

    if not extension_info()["built"]:
        pytest.skip("fastgen._C is not built")


def _unaligned(t):
    buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    out = buf[1:].view_as(t)
    out.copy_(t)
    return out


def _params(dtype, seed=0, unaligned=False):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    ps = [torch.nn.Parameter(torch.randn(n, device="cuda", generator=gen).to(dtype)) for n in SIZES]
    if unaligned:
        ps[1].data = _unaligned(ps[1].data)
        assert ps[1].data_ptr() % 16 != 0
    return ps


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("unaligned", [False, True])
def test_one_step_matches_the_reference_codes(dtype, unaligned):
    _need_extension()
    from fastgen.optim import FusedAdamW8bit

    ours, ref = _params(dtype, 0, unaligned), _params(dtype, 0, unaligned)
    opt_c = FusedAdamW8bit(ours, lr=1e-2, weight_decay=0.1, min_8bit_size=256, backend="cuda")
    opt_t = FusedAdamW8bit(ref, lr=1e-2, weight_decay=0.1, min_8bit_size=256, backend="torch")
    gen = torch.Generator(device="cuda").manual_seed(1)
    for step in range(2):  # the second step starts from non-zero quantized states
        for p, q in zip(ours, ref):
            g = torch.randn(p.shape, device="cuda", generator=gen).to(dtype)
            p.grad, q.grad = g.clone(), g.clone()
        with backend.trace() as ran:
            opt_c.step()
        opt_t.step()
        assert ("adamw8bit", "cuda") in ran
        for p, q in zip(ours, ref):
            if p.numel() < 256:
                continue
            if dtype == torch.float32:
                torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)
            else:
                torch.testing.assert_close(p, q)
            s, r = opt_c.state[p], opt_t.state[q]
            for key in ("exp_avg_absmax", "exp_avg_sq_absmax"):
                torch.testing.assert_close(s[key], r[key], atol=0, rtol=1e-5)
            for key in ("exp_avg_q", "exp_avg_sq_q"):
                diff = (s[key].int() - r[key].int()).abs()
                assert int(diff.max()) <= 1, (step, key, int(diff.max()))
                assert int((diff > 0).sum()) <= max(2, p.numel() // 10_000), (step, key, int((diff > 0).sum()))
            # the next step starts both from the same states (a code one apart would move p by ~lr * 1e-2)
            with torch.no_grad():
                q.copy_(p)
            for key in ("exp_avg_q", "exp_avg_sq_q", "exp_avg_absmax", "exp_avg_sq_absmax"):
                r[key].copy_(s[key])


def test_one_pass_step_with_clip_and_ema_close_to_triton():
    _need_extension()
    from fastgen.optim import EMA, FusedAdamW8bit

    results = {}
    for impl in ("cuda", "triton"):
        model = torch.nn.ParameterList(_params(torch.bfloat16, 3))
        ema = EMA(model, decay=0.9, dtype=torch.float32, backend=impl)
        opt = FusedAdamW8bit(model.parameters(), lr=1e-3, min_8bit_size=256, backend=impl, max_grad_norm=0.5,
                             ema=ema)
        gen = torch.Generator(device="cuda").manual_seed(4)
        for _ in range(3):
            for p in model.parameters():
                p.grad = torch.randn(p.shape, device="cuda", generator=gen).to(p.dtype)
            with backend.trace() as ran:
                opt.step()
            assert ("adamw8bit", impl) in ran
        results[impl] = ([p.detach().float() for p in model.parameters()], [s.clone() for s in ema.shadow.values()])
    for a, b in zip(results["cuda"][0], results["triton"][0]):
        torch.testing.assert_close(a, b, atol=1e-2, rtol=1e-2)  # bf16 parameters, each rounded on its own path
    for a, b in zip(results["cuda"][1], results["triton"][1]):
        torch.testing.assert_close(a, b, atol=1e-2, rtol=1e-2)


def test_one_pass_step_captures_in_a_cuda_graph():
    """FusedAdamW8bit(backend="cuda", max_grad_norm, ema, tensor lr): one step captured and replayed
    equals the same number of eager steps (the step counts, clip coefficient and EMA weight are read on
    the device or fixed per step)."""
    _need_extension()
    from fastgen.optim import EMA, FusedAdamW8bit

    replays = 4
    runs = []
    for captured in (True, False):
        params = _params(torch.float32, 5)
        gen = torch.Generator(device="cuda").manual_seed(6)
        for p in params:
            p.grad = torch.randn(p.shape, device="cuda", generator=gen) * 10  # clipped
        ema = EMA(params, decay=0.9, warmup=False, backend="cuda")
        opt = FusedAdamW8bit(params, lr=torch.tensor(1e-3, device="cuda"), min_8bit_size=256, backend="cuda",
                             max_grad_norm=1.0, ema=ema, capturable=True)
        opt.step()  # eager: allocates the states and the launch tables
        if captured:
            with backend.trace() as ran:
                replay_cuda_graph(opt.step, replays)
            assert ("adamw8bit", "cuda") in ran
        else:
            for _ in range(replays):
                opt.step()
        torch.cuda.synchronize()
        runs.append((params, ema, opt))
    (a, ema_a, opt_a), (b, ema_b, opt_b) = runs
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)
        assert float(opt_a.state[p]["step"]) == float(opt_b.state[q]["step"]) == 1 + replays
    for name in ema_a.shadow:
        torch.testing.assert_close(ema_a.shadow[name], ema_b.shadow[name], atol=1e-6, rtol=1e-5)
