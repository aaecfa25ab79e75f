"""FusedLion, clip_grad_norm_ and EMA against independent torch references.

CPU tier: every backend that runs here (Triton in the interpreter), the refusals of
backend="cuda" and the argument checks of the fastgen._C entry points. GPU tier
(``-m gpu``): the CUDA C++ clip and EMA against torch and float64 at real sizes.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import HAS_CUDA, TRITON_DEVICE, c_entry, capture_cuda_graph

from fastgen.backend import BackendUnavailableError
from fastgen.optim import EMA, FusedLion, clip_grad_norm_

DEV = TRITON_DEVICE
KERNELS = ["triton", "cuda"] if DEV == "cuda" else ["triton"]
BACKENDS = ["torch", *KERNELS]
LION_BACKENDS = BACKENDS


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


@pytest.mark.parametrize("backend", KERNELS)
def test_ema_bf16_model_swap_and_state_dict(backend):
    model = _model(torch.bfloat16)
    ema = EMA(model, decay=0.5, warmup=False, backend=backend)
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


# ----------------------------------------------------------------------------- backend choice and _C arguments


def _grad_param(grad):
    p = torch.nn.Parameter(torch.zeros_like(grad))
    p.grad = grad
    return p


def test_kernel_refusals_say_why():
    p = _grad_param(torch.ones(3, device=DEV))
    with pytest.raises(BackendUnavailableError, match="2-norm"):
        clip_grad_norm_([p], 1.0, norm_type=1.0, backend="triton")
    with pytest.raises(BackendUnavailableError, match="backend='cuda'"):
        clip_grad_norm_([_grad_param(torch.ones(3))], 1.0, backend="cuda")  # CPU tensors
    model = torch.nn.Linear(2, 2)
    with pytest.raises(BackendUnavailableError, match="ema: backend='cuda'"):
        EMA(model, backend="cuda").update(model)


@pytest.mark.parametrize("backend", BACKENDS)
def test_clip_mixed_dtypes_return_torch_dtype(backend):
    """torch stacks the per-tensor norms, which promotes: bf16 + fp32 + fp16 grads give an fp32 total."""
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(n, generator=g).to(dt) for n, dt in
             ((37, torch.bfloat16), (300, torch.float32), (5, torch.float16))]
    ours = [_grad_param(x.to(DEV, copy=True)) for x in grads]
    theirs = [_grad_param(x.to(DEV, copy=True)) for x in grads]
    total = clip_grad_norm_(ours, 1.0, backend=backend)
    expected = torch.nn.utils.clip_grad_norm_(theirs, 1.0)
    assert total.dtype == expected.dtype == torch.float32
    torch.testing.assert_close(total, expected, atol=0, rtol=5e-3)  # torch rounds the bf16/fp16 norms first
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-3, rtol=2e-2)


def _extension_or_skip():
    from fastgen.cuda import extension_info, load_extension

    info = extension_info()
    if not info["built"]:
        pytest.skip(f"fastgen._C is not built: {info['error']}")
    return load_extension()


def test_cuda_clip_ema_entry_points_check_arguments():
    """Bad arguments raise ValueError before anything touches a GPU; empty lists launch nothing. The
    values go to the parameter structs by name, in the field order of the comments."""
    C = _extension_or_skip()
    # multi_tensor_norm(g_list, numels, chunk_ids, chunk_offs, num_chunks, chunk, g_dtype, norm_type, partial, stream)
    with pytest.raises(ValueError, match="unsupported dtypes"):
        c_entry(C, "multi_tensor_norm", 0, 0, 0, 0, 0, 4096, 5, 2.0, 0, 0)
    for bad in (0.5, 0.0, -1.0, -math.inf, math.nan):
        with pytest.raises(ValueError, match="norm_type must be >= 1 or inf"):
            c_entry(C, "multi_tensor_norm", 0, 0, 0, 0, 0, 4096, 0, bad, 0, 0)
        with pytest.raises(ValueError, match="norm_type must be >= 1 or inf"):
            c_entry(C, "multi_tensor_norm_finalize", 0, 0, bad, 1.0, 8, 0, 0)
    with pytest.raises(ValueError, match="num_chunks >= 0 and chunk > 0"):
        c_entry(C, "multi_tensor_norm", 0, 0, 0, 0, -1, 4096, 0, 2.0, 0, 0)
    with pytest.raises(ValueError, match="num_chunks >= 0 and chunk > 0"):
        c_entry(C, "multi_tensor_norm", 0, 0, 0, 0, 0, 0, 0, 2.0, 0, 0)
    with pytest.raises(ValueError, match="partial_ptr is null"):
        c_entry(C, "multi_tensor_norm", 0, 0, 0, 0, 3, 4096, 0, 2.0, 0, 0)
    # multi_tensor_norm_finalize(partial, n, norm_type, max_norm, total, coef, stream)
    with pytest.raises(ValueError, match="n >= 0"):
        c_entry(C, "multi_tensor_norm_finalize", 0, -1, 2.0, 1.0, 8, 0, 0)
    with pytest.raises(ValueError, match="total_ptr is null"):
        c_entry(C, "multi_tensor_norm_finalize", 0, 0, 2.0, 1.0, 0, 0, 0)
    with pytest.raises(ValueError, match="partial_ptr is null"):
        c_entry(C, "multi_tensor_norm_finalize", 0, 5, 2.0, 1.0, 8, 0, 0)
    # multi_tensor_scale(g_list, numels, chunk_ids, chunk_offs, num_chunks, chunk, g_dtype, coef, stream)
    with pytest.raises(ValueError, match="unsupported dtypes"):
        c_entry(C, "multi_tensor_scale", 0, 0, 0, 0, 0, 4096, 3, 8, 0)
    with pytest.raises(ValueError, match="num_chunks >= 0 and chunk > 0"):
        c_entry(C, "multi_tensor_scale", 0, 0, 0, 0, 0, -4096, 0, 8, 0)
    with pytest.raises(ValueError, match="coef_ptr is null"):
        c_entry(C, "multi_tensor_scale", 0, 0, 0, 0, 0, 4096, 0, 0, 0)
    # multi_tensor_ema(s_list, p_list, numels, chunk_ids, chunk_offs, num_chunks, chunk, s_dtype, p_dtype, weight,
    # weight_ptr, stream)
    with pytest.raises(ValueError, match="unsupported dtypes"):
        c_entry(C, "multi_tensor_ema", 0, 0, 0, 0, 0, 0, 4096, 0, 7, 0.1, 0, 0)
    with pytest.raises(ValueError, match="unsupported dtypes"):
        c_entry(C, "multi_tensor_ema", 0, 0, 0, 0, 0, 0, 4096, -1, 0, 0.1, 0, 0)
    with pytest.raises(ValueError, match="num_chunks >= 0 and chunk > 0"):
        c_entry(C, "multi_tensor_ema", 0, 0, 0, 0, 0, -2, 4096, 0, 0, 0.1, 0, 0)
    with pytest.raises(ValueError, match="weight"):
        c_entry(C, "multi_tensor_ema", 0, 0, 0, 0, 0, 0, 4096, 0, 2, math.nan, 0, 0)
    # empty lists: nothing is launched, so this passes without a GPU
    for g_dtype in (0, 1, 2):
        for p in (1.0, 2.0, 3.5, math.inf):
            c_entry(C, "multi_tensor_norm", 0, 0, 0, 0, 0, 4096, g_dtype, p, 0, 0)
        c_entry(C, "multi_tensor_scale", 0, 0, 0, 0, 0, 4096, g_dtype, 8, 0)
        for p_dtype in (0, 1, 2):
            c_entry(C, "multi_tensor_ema", 0, 0, 0, 0, 0, 0, 4096, g_dtype, p_dtype, 0.5, 0, 0)
    from fastgen.cuda import optim as K

    K.ema_update_([], [], 0.9)
    K.scale_([], torch.ones(1))


@pytest.mark.skipif(HAS_CUDA, reason="checks the no-GPU error path")
def test_cuda_norm_finalize_without_gpu_raises_runtime_error():
    C = _extension_or_skip()
    if C.device_count() != 0:
        pytest.skip("a CUDA device is visible to fastgen._C")
    with pytest.raises(RuntimeError, match="CUDA error"):
        c_entry(C, "multi_tensor_norm_finalize", 0, 0, 2.0, 1.0, 8, 0, 0)  # always launches (writes the total)


# ----------------------------------------------------------------------------- GPU tier: CUDA C++ clip and EMA

CHUNK = 4096  # fastgen.cuda.optim.CHUNK
SIZES = [1, 7, 4095, CHUNK, CHUNK + 1, 3 * CHUNK + 5, 70_000, 1 << 20]  # the last ones span many chunks
NORMS = [2.0, 1.0, 3.0, math.inf]
GRAD_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _cuda_params(sizes, dtypes, seed):
    """Parameters with gradients (randn times 1..5, cycling through ``dtypes``) on the GPU. fp16
    gradients are 1000x smaller, so that torch's fp16 per-tensor norms (the 1-norm of a million
    elements) stay below fp16's 65504 and the comparison is with finite numbers."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    params = []
    for i, n in enumerate(sizes):
        dtype = dtypes[i % len(dtypes)]
        grad = torch.randn(n, device="cuda", generator=gen) * (1 + i % 5) * (1e-3 if dtype == torch.float16 else 1.0)
        params.append(_grad_param(grad.to(dtype)))
    return params


def _copies(params):
    return [_grad_param(p.grad.clone()) for p in params]


def _norm64(grads, norm_type):
    return torch.linalg.vector_norm(torch.cat([g.double().flatten() for g in grads]), norm_type)


def _no_worse_than_torch(ours, theirs, truth, atol):
    """The tolerance rule: |ours - truth| <= 2 |torch - truth| + atol, elementwise (atol a number or a tensor)."""
    err = (ours.double() - truth).abs()
    bound = 2 * (theirs.double() - truth).abs() + atol
    assert bool((err <= bound).all()), f"worse than torch: max excess {float((err - bound).max()):.3g}"


def _check_clip(params, norm_type, max_norm, *, total_rtol):
    """clip_grad_norm_(backend="cuda") against float64 and against torch.nn.utils.clip_grad_norm_
    (which rounds each per-tensor norm to the grads' dtype, and whose fp32 sums are no better than ours)."""
    before = [p.grad.clone() for p in params]
    theirs = _copies(params)
    truth = _norm64(before, norm_type)
    total = clip_grad_norm_(params, max_norm, norm_type, backend="cuda")
    expected = torch.nn.utils.clip_grad_norm_(theirs, max_norm, norm_type)
    assert total.shape == () and total.dtype == expected.dtype and total.device == expected.device
    if math.isinf(norm_type):  # a max of exact values: exact
        assert float(total) == float(truth) == float(expected)
    else:  # fp32 accumulation, rounded once to the result dtype
        rtol = max(total_rtol, torch.finfo(total.dtype).eps)
        torch.testing.assert_close(total.double(), truth, atol=0, rtol=rtol)
        _no_worse_than_torch(total, expected, truth, rtol * float(truth))
    coef = min(1.0, max_norm / (float(truth) + 1e-6))
    for p, q, g0 in zip(params, theirs, before):
        if coef == 1.0:  # scaled by exactly 1: untouched, bit for bit (torch's too)
            assert torch.equal(p.grad, g0) and torch.equal(q.grad, g0)
            continue
        # g * coef in fp32, one rounding: within an ulp of the exact product (plus the fp32 coef's error)
        want = g0.double() * coef
        rtol = torch.finfo(g0.dtype).eps + 2 * total_rtol
        torch.testing.assert_close(p.grad.double(), want, atol=1e-7, rtol=rtol)
        _no_worse_than_torch(p.grad, q.grad, want, 1e-7 + rtol * want.abs())
    return total


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("clipping", [True, False], ids=["clip", "noclip"])
@pytest.mark.parametrize("dtype", GRAD_DTYPES, ids=str)
@pytest.mark.parametrize("norm_type", NORMS, ids=lambda p: f"p{p}")
def test_gpu_cuda_clip_matches_torch(norm_type, dtype, clipping):
    """Sizes from 1 element to 256 chunks; max_norm below the total (scaled) and above (untouched)."""
    params = _cuda_params(SIZES, [dtype], seed=int(norm_type if math.isfinite(norm_type) else 9))
    truth = float(_norm64([p.grad for p in params], norm_type))
    _check_clip(params, norm_type, truth * (0.3 if clipping else 4.0), total_rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("norm_type", NORMS, ids=lambda p: f"p{p}")
def test_gpu_cuda_clip_mixed_dtypes_and_many_tensors(norm_type):
    """fp32 / bf16 / fp16 grads together (one launch per dtype into one partial buffer, an fp32
    total as torch's promotion gives), 1500 tensors of odd sizes and a few that span many chunks."""
    g = torch.Generator().manual_seed(3)
    sizes = torch.randint(1, 3000, (1500,), generator=g).tolist() + [1 << 20, 5 * CHUNK + 3, 1]
    params = _cuda_params(sizes, GRAD_DTYPES, seed=4)
    truth = float(_norm64([p.grad for p in params], norm_type))
    total = _check_clip(params, norm_type, truth / 7, total_rtol=1e-5)
    assert total.dtype == torch.float32


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("norm_type", NORMS, ids=lambda p: f"p{p}")
def test_gpu_cuda_clip_is_deterministic(norm_type):
    """Fixed-order sums, no atomics: the same inputs give the same bits, run after run."""
    params = _cuda_params([1 << 20, 333, 70_000] * 20, [torch.float32, torch.bfloat16], seed=5)
    copies = [_copies(params) for _ in range(3)]
    results = [clip_grad_norm_(ps, 0.5, norm_type, backend="cuda") for ps in copies]
    for ps, total in zip(copies[1:], results[1:]):
        assert torch.equal(total, results[0])
        for p, q in zip(ps, copies[0]):
            assert torch.equal(p.grad, q.grad)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("norm_type", NORMS, ids=lambda p: f"p{p}")
def test_gpu_cuda_clip_nonfinite(norm_type, bad):
    params = _cuda_params([5000, 300, CHUNK + 1], [torch.float32, torch.bfloat16], seed=6)
    params[1].grad[17] = bad
    before = [p.grad.clone() for p in params]
    with pytest.raises(RuntimeError, match="non-finite"):
        clip_grad_norm_(params, 1.0, norm_type, error_if_nonfinite=True, backend="cuda")
    for p, g0 in zip(params, before):  # raised before scaling anything
        torch.testing.assert_close(p.grad, g0, atol=0, rtol=0, equal_nan=True)
    theirs = _copies(params)
    total = clip_grad_norm_(params, 1.0, norm_type, backend="cuda")
    expected = torch.nn.utils.clip_grad_norm_(theirs, 1.0, norm_type)
    assert not torch.isfinite(total)
    assert math.isnan(bad) == bool(torch.isnan(total))  # NaN propagates, also through the inf-norm's max
    torch.testing.assert_close(total, expected, equal_nan=True)
    for p, q in zip(params, theirs):  # scaled by NaN or by 0 (inf * 0 = NaN), as torch does
        torch.testing.assert_close(p.grad, q.grad, atol=0, rtol=0, equal_nan=True)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_gpu_cuda_clip_refuses_norms_below_one_and_captures_in_a_graph():
    params = _cuda_params([1000, CHUNK + 1, 70_000], [torch.float32], seed=7)
    with pytest.raises(BackendUnavailableError, match="norm_type >= 1"):
        clip_grad_norm_(params, 1.0, norm_type=0.5, backend="cuda")
    theirs = _copies(params)
    clip_grad_norm_(params, 1e9, backend="cuda")  # warm-up: builds the launch tables, scales by 1
    # no host sync in a step: capturable
    graph, total = capture_cuda_graph(lambda: clip_grad_norm_(params, 0.5, backend="cuda"))
    graph.replay()
    expected = torch.nn.utils.clip_grad_norm_(theirs, 0.5)
    torch.cuda.synchronize()
    torch.testing.assert_close(total, expected, atol=0, rtol=1e-5)
    for p, q in zip(params, theirs):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-7, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", GRAD_DTYPES, ids=str)
def test_gpu_cuda_clip_launchers_match_triton(dtype):
    """fastgen.cuda.optim.sum_squares / scale_ have the Triton launchers' signatures and results."""
    from fastgen.cuda import optim as C
    from fastgen.kernels import clip_grad as T

    grads = [p.grad for p in _cuda_params(SIZES, [dtype], seed=8)]
    ours = C.sum_squares(grads)
    assert ours.shape == () and ours.dtype == torch.float32
    truth = sum(float(g.double().square().sum()) for g in grads)
    assert abs(float(ours) - truth) <= 1e-5 * truth
    torch.testing.assert_close(ours, T.sum_squares(grads), atol=0, rtol=1e-5)
    coef = torch.tensor([0.37], device="cuda")
    a, b = [g.clone() for g in grads], [g.clone() for g in grads]
    C.scale_(a, coef)
    T.scale_(b, coef)
    for x, y, g in zip(a, b, grads):
        assert torch.equal(x, y)  # fp32 product, one round-to-nearest-even: the same bits
        assert torch.equal(x, (g.float() * 0.37).to(dtype))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("s_dtype", GRAD_DTYPES, ids=lambda d: "s_" + str(d).removeprefix("torch."))
@pytest.mark.parametrize("p_dtype", GRAD_DTYPES, ids=lambda d: "p_" + str(d).removeprefix("torch."))
def test_gpu_cuda_ema_launcher(s_dtype, p_dtype):
    """ema_update_ (the Triton launcher's signature) for every (shadow, param) dtype pair: fp32 math,
    one rounding at the store, so within an ulp of the float64 update and equal to Triton's."""
    from fastgen.cuda import optim as C
    from fastgen.kernels import ema as T

    gen = torch.Generator(device="cuda").manual_seed(9)
    shadows = [torch.randn(n, device="cuda", generator=gen).to(s_dtype) for n in SIZES]
    params = [torch.randn(n, device="cuda", generator=gen).to(p_dtype) for n in SIZES]
    ours, triton_ = [s.clone() for s in shadows], [s.clone() for s in shadows]
    C.ema_update_(ours, params, 0.9)
    T.ema_update_(triton_, params, 0.9)
    eps = torch.finfo(s_dtype).eps
    for s0, p, x, y in zip(shadows, params, ours, triton_):
        want = s0.double() + (1 - 0.9) * (p.double() - s0.double())
        torch.testing.assert_close(x.double(), want, atol=1e-6, rtol=eps)
        torch.testing.assert_close(x, y, atol=1e-6, rtol=eps)


class _MixedModel(torch.nn.Module):
    """fp32 and bf16 parameters, sizes from one element to several chunks."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Parameter(torch.randn(CHUNK * 3 + 5, device="cuda"))
        self.b = torch.nn.Parameter(torch.randn(70_000, device="cuda", dtype=torch.bfloat16))
        self.c = torch.nn.Parameter(torch.randn(7, 13, device="cuda", dtype=torch.bfloat16))
        self.d = torch.nn.Parameter(torch.randn(1, device="cuda"))
        self.register_buffer("steps", torch.zeros((), device="cuda"))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("shadow_dtype", [torch.float32, None, torch.bfloat16], ids=["fp32", "same", "bf16"])
@pytest.mark.parametrize("warmup, every", [(True, 1), (False, 2)])
def test_gpu_cuda_ema_matches_torch(shadow_dtype, warmup, every):
    """EMA(backend="cuda") over several updates against EMA(backend="torch") and a float64 loop:
    an fp32 shadow of bf16 parameters, a shadow in the parameters' dtype, a bf16 shadow."""
    torch.manual_seed(10)
    model = _MixedModel()
    ours = EMA(model, decay=0.99, warmup=warmup, update_every=every, dtype=shadow_dtype, backend="cuda")
    theirs = EMA(model, decay=0.99, warmup=warmup, update_every=every, dtype=shadow_dtype, backend="torch")
    ref = {n: s.double().clone() for n, s in ours.shadow.items()}
    n_updates = 0
    for call in range(1, 9):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.1)
            model.steps += 1
        ours.update(model)
        theirs.update(model)
        if call % every == 0:
            n_updates += 1
            d = min(0.99, (1 + n_updates) / (10 + n_updates)) if warmup else 0.99
            for n, p in model.named_parameters():
                ref[n] += (1 - d) * (p.detach().double() - ref[n])
    assert ours.num_updates == theirs.num_updates == n_updates
    for n, s in ours.shadow.items():
        assert s.dtype == theirs.shadow[n].dtype == (shadow_dtype or getattr(model, n).dtype)
        if s.dtype == torch.float32:
            torch.testing.assert_close(s.double(), ref[n], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(s, theirs.shadow[n], atol=1e-6, rtol=1e-6)
        else:  # rounded to bf16 at every update, like torch's lerp: a few ulps apart at most
            torch.testing.assert_close(s.float(), theirs.shadow[n].float(), atol=2e-2, rtol=2e-2)
    assert torch.equal(ours.buffers["steps"], model.steps)
