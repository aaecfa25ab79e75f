"""fastgen.ops.rms_norm and fastgen.nn.RMSNorm against independent references.

Triton runs on the GPU when there is one, else on CPU tensors in Triton's
interpreter (small shapes). CUDA C++ runs in the ``gpu`` tier only.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import DTYPES, TRITON_DEVICE, assert_close, requires_gpu, run_auto_as

import fastgen
from fastgen.backend import BackendUnavailableError
from fastgen.ops import rms_norm, rms_norm_ref

SHAPES = [(1, 1), (3, 7), (5, 123), (2, 4096), (4, 70000), (2, 3, 33)]
# The kernel backends these tests run: Triton everywhere (interpreter on CPU), CUDA C++ on a GPU.
BACKENDS = ["triton", "cuda"] if TRITON_DEVICE == "cuda" else ["triton"]
backends = pytest.mark.parametrize("backend", BACKENDS)
EPS = 1e-6


def _ref64(x, w=None, r=None, eps=EPS):
    """Float64 RMSNorm written out by hand: independent of F.rms_norm and of fastgen."""
    h = x if r is None else x + r
    hd = h.double()
    y = hd * torch.rsqrt(hd.pow(2).mean(-1, keepdim=True) + eps)
    if w is not None:
        y = y * w.double()
    return y, h


def _inputs(shape, dtype, device, weight=True, residual=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float32).to(device=device, dtype=dtype)
    w = (1 + 0.5 * torch.randn(shape[-1], generator=g)).to(device=device, dtype=dtype) if weight else None
    r = torch.randn(shape, generator=g).to(device=device, dtype=dtype) if residual else None
    return x, w, r


# ----------------------------------------------------------------------------- reference


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("residual", [False, True])
def test_reference_matches_hand_written_float64(dtype, residual):
    x, w, r = _inputs((6, 257), dtype, "cpu", residual=residual)
    out = rms_norm_ref(x, w, EPS, r)
    y = out[0] if residual else out
    y64, h = _ref64(x, w, r)
    assert y.dtype == dtype
    assert_close(y, y64.to(dtype))
    if residual:
        assert torch.equal(out[1], x + r)


def test_reference_is_f_rms_norm_with_fp32_upcast():
    x, w, _ = _inputs((4, 96), torch.bfloat16, "cpu")
    expected = F.rms_norm(x.float(), (96,), w.float(), EPS).to(torch.bfloat16)
    assert torch.equal(rms_norm_ref(x, w, EPS), expected)
    assert torch.equal(rms_norm(x, w, EPS, backend="torch"), expected)


# ----------------------------------------------------------------------------- kernels (Triton; CUDA C++ on a GPU)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("weight", [True, False], ids=["w", "no_w"])
@pytest.mark.parametrize("residual", [False, True], ids=["", "res"])
@backends
def test_kernel_forward_backward(shape, dtype, weight, residual, backend):
    x, w, r = _inputs(shape, dtype, TRITON_DEVICE, weight, residual)
    leaves = [t.requires_grad_() for t in (x, w, r) if t is not None]
    ref_leaves = [t.detach().clone().requires_grad_() for t in leaves]
    rx, rw, rr = (ref_leaves.pop(0), ref_leaves.pop(0) if weight else None, ref_leaves.pop(0) if residual else None)

    out = rms_norm(x, w, EPS, r, backend=backend)
    ref = rms_norm_ref(rx, rw, EPS, rr)
    y, yr = (out[0], ref[0]) if residual else (out, ref)
    assert y.shape == x.shape and y.dtype == dtype and y.is_contiguous()
    assert_close(y, yr)
    # The kernel agrees with float64 math as well as the torch reference does.
    y64 = _ref64(x.detach(), None if w is None else w.detach(), None if r is None else r.detach())[0]
    assert (y.double() - y64).abs().max() <= 2 * (yr.double() - y64).abs().max() + TOL_ABS[dtype]
    if residual:
        assert torch.equal(out[1], ref[1])  # the residual sum is rounded exactly like torch's add

    g = torch.Generator().manual_seed(1)
    dy = torch.randn(shape, generator=g).to(x.device, dtype)
    loss_terms = [(y * dy).sum()]
    ref_terms = [(yr * dy).sum()]
    if residual:  # the residual stream is used downstream too
        dh = torch.randn(shape, generator=g).to(x.device, dtype)
        loss_terms.append((out[1] * dh).sum())
        ref_terms.append((ref[1] * dh).sum())
    sum(loss_terms).backward()
    sum(ref_terms).backward()
    assert_close(x.grad, rx.grad, scale=2)
    if weight:
        assert w.grad.dtype == dtype
        # dw sums M rows; both sides accumulate in fp32 and round once.
        assert_close(w.grad, rw.grad, scale=2)
    if residual:
        assert_close(r.grad, rr.grad, scale=2)


TOL_ABS = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@backends
def test_kernel_fp32_weight_with_half_input(dtype, backend):
    x, _, _ = _inputs((3, 200), dtype, TRITON_DEVICE)
    w = torch.rand(200, device=TRITON_DEVICE).requires_grad_()
    rw = w.detach().clone().requires_grad_()
    y = rms_norm(x, w, backend=backend)
    yr = rms_norm_ref(x, rw)
    assert y.dtype == dtype
    assert_close(y, yr)
    y.float().sum().backward()
    yr.float().sum().backward()
    assert w.grad.dtype == torch.float32
    assert_close(w.grad, rw.grad, dtype=dtype)


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda t: t[:, :100], id="row-strided"),
        pytest.param(lambda t: t.t(), id="transposed"),
        pytest.param(lambda t: t[::2, 1:101], id="every-other-row"),
        pytest.param(lambda t: t.reshape(12, 10, 200).permute(1, 0, 2), id="permuted-3d"),
        pytest.param(lambda t: t[:1, :100].expand(5, 100), id="broadcast-rows"),
    ],
)
@backends
def test_kernel_non_contiguous(make, backend):
    base = torch.randn(120, 200, device=TRITON_DEVICE)
    x = make(base).detach().requires_grad_()
    assert not x.is_contiguous()
    w = torch.randn(x.shape[-1], device=TRITON_DEVICE)
    y = rms_norm(x, w, backend=backend)
    xr = x.detach().clone().requires_grad_()
    yr = rms_norm_ref(xr, w)
    assert_close(y, yr)
    dy = torch.randn_like(y)
    (y * dy).sum().backward()
    (yr * dy).sum().backward()
    assert_close(x.grad, xr.grad)


@backends
def test_kernel_strided_weight(backend):
    x, _, _ = _inputs((3, 50), torch.float32, TRITON_DEVICE)
    w_store = torch.randn(100, device=TRITON_DEVICE, requires_grad=True)
    w = w_store[::2]
    wr = w.detach().clone().requires_grad_()
    y = rms_norm(x, w, backend=backend)
    yr = rms_norm_ref(x, wr)
    assert_close(y, yr)
    y.sum().backward()
    yr.sum().backward()
    assert_close(w_store.grad[::2], wr.grad)
    assert torch.all(w_store.grad[1::2] == 0)


@pytest.mark.parametrize("shape", [(0, 16), (4, 0), (2, 0, 8)])
@backends
def test_zero_size(shape, backend):
    x = torch.randn(shape, device=TRITON_DEVICE, requires_grad=True)
    w = torch.ones(shape[-1], device=TRITON_DEVICE, requires_grad=True)
    y = rms_norm(x, w, backend=backend)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape and w.grad.shape == w.shape
    assert torch.all(w.grad == 0)


@backends
def test_weight_gradient_is_deterministic(backend):
    # 37 rows over several row programs: the partials must be summed in a fixed order.
    x, w, _ = _inputs((37, 300), torch.float32, TRITON_DEVICE, seed=3)
    dy = torch.randn(37, 300, device=TRITON_DEVICE)
    grads = []
    for _ in range(3):
        wi = w.detach().clone().requires_grad_()
        (rms_norm(x, wi, backend=backend) * dy).sum().backward()
        grads.append(wi.grad)
    assert all(torch.equal(grads[0], g) for g in grads[1:])


@backends
def test_grad_of_residual_stream_only(backend):
    x, w, r = _inputs((3, 40), torch.float32, TRITON_DEVICE, residual=True)
    x.requires_grad_()
    r.requires_grad_()
    _, h = rms_norm(x, w, residual=r, backend=backend)
    h.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x)) and torch.equal(r.grad, torch.ones_like(r))


def test_custom_ops_pass_opcheck():
    x, w, r = _inputs((5, 33), torch.float32, TRITON_DEVICE, residual=True)
    fwd = torch.ops.fastgen.rms_norm_fwd
    for args in [(x, w, None, EPS, "triton"), (x, None, r, EPS, "triton"), (x[:, :20], w[:20], None, EPS, "triton")]:
        torch.library.opcheck(fwd, args, test_utils=("test_schema", "test_faketensor"))
    y, h, rstd = fwd(x, w, r, EPS, "triton")
    dy = torch.randn_like(y)
    torch.library.opcheck(
        torch.ops.fastgen.rms_norm_bwd, (dy, h, w, rstd, dy, "triton"), test_utils=("test_schema", "test_faketensor")
    )


# ----------------------------------------------------------------------------- torch.compile


class _Block(torch.nn.Module):
    def __init__(self, n, backend):
        super().__init__()
        self.lin = torch.nn.Linear(n, n)
        self.norm = fastgen.nn.RMSNorm(n, eps=1e-6, backend=backend)

    def forward(self, x, res):
        y, res = self.norm(self.lin(x), res)
        return y * 2, res


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()
    block = _Block(48, backend).to(TRITON_DEVICE)
    x = torch.randn(4, 48, device=TRITON_DEVICE, requires_grad=True)
    res = torch.randn(4, 48, device=TRITON_DEVICE)
    compiled = torch.compile(block, fullgraph=True, backend="inductor" if backend == "torch" else "aot_eager")
    y, h = compiled(x, res)
    ye, he = block(x, res)
    assert_close(y, ye)
    assert_close(h, he)
    (y.sum() + h.sum()).backward()
    g_compiled = x.grad.clone()
    x.grad = None
    (ye.sum() + he.sum()).backward()
    assert_close(g_compiled, x.grad)


# ----------------------------------------------------------------------------- backends and errors


def test_backend_selection(monkeypatch):
    x = torch.randn(2, 8)
    resolve = fastgen.backend.resolve
    assert resolve("rms_norm", "auto", x.device) == "torch"
    monkeypatch.setenv("FASTGEN_BACKEND", "torch")
    assert fastgen.backend.default() == "torch"
    with fastgen.backend("triton"):
        assert fastgen.backend.default() == "triton"
        with fastgen.backend("auto"):
            assert fastgen.backend.default() == "auto"
        assert fastgen.backend.default() == "triton"
    assert fastgen.backend.default() == "torch"
    monkeypatch.setenv("FASTGEN_BACKEND", "fast")
    with pytest.raises(ValueError, match="unknown backend 'fast' from FASTGEN_BACKEND"):
        rms_norm(x)
    monkeypatch.delenv("FASTGEN_BACKEND")
    with pytest.raises(ValueError, match="unknown backend 'tritonn'"):
        rms_norm(x, backend="tritonn")


def test_context_manager_reaches_the_op(monkeypatch):
    # With the interpreter off, Triton cannot take CPU tensors: the error proves the block's choice arrived.
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x = torch.randn(2, 8)
    with fastgen.backend("triton"):
        with pytest.raises(BackendUnavailableError, match="needs CUDA tensors.*TRITON_INTERPRET=1"):
            rms_norm(x)
    assert torch.equal(rms_norm(x), rms_norm_ref(x))


def test_cuda_backend_errors_on_cpu_tensors():
    with pytest.raises(BackendUnavailableError, match="CUDA C\\+\\+ backend needs CUDA tensors"):
        rms_norm(torch.randn(2, 8), backend="cuda")


def test_float64_goes_to_reference_under_auto_and_errors_when_forced():
    x = torch.randn(3, 10, dtype=torch.float64)
    torch.testing.assert_close(rms_norm(x), _ref64(x)[0])
    with pytest.raises(BackendUnavailableError, match="dtype torch.float64 is not supported by the kernels"):
        rms_norm(x, backend="triton")


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda: rms_norm(torch.randn(2, 8), torch.ones(7)), ValueError, r"weight must have shape \(8,\)"),
        (lambda: rms_norm(torch.randn(2, 8), torch.ones(8, device="meta")), ValueError, "weight is on meta but x is on cpu"),
        (
            lambda: rms_norm(torch.randn(2, 8, dtype=torch.float16), torch.ones(8, dtype=torch.bfloat16)),
            TypeError,
            "weight dtype torch.bfloat16 does not match x dtype torch.float16",
        ),
        (lambda: rms_norm(torch.randn(2, 8), residual=torch.randn(2, 7)), ValueError, "residual must have the shape"),
        (
            lambda: rms_norm(torch.randn(2, 8), residual=torch.randn(2, 8, dtype=torch.float16)),
            TypeError,
            "residual dtype torch.float16 does not match x dtype torch.float32",
        ),
        (lambda: rms_norm(torch.ones(2, 8, dtype=torch.int32)), TypeError, "floating-point tensor"),
        (lambda: rms_norm(torch.tensor(1.0)), ValueError, "at least one dimension"),
        (lambda: rms_norm(torch.randn(2, 8), eps=-1.0), ValueError, "eps must be a finite number >= 0"),
    ],
)
def test_bad_inputs(call, error, message):
    with pytest.raises(error, match=message):
        call()


# ----------------------------------------------------------------------------- nn.RMSNorm


@pytest.mark.parametrize("shape, eps, affine", [((64,), None, True), ((64,), 1e-5, False), ((4, 16), 1e-6, True)])
def test_nn_rmsnorm_is_a_drop_in(shape, eps, affine):
    ref = torch.nn.RMSNorm(shape, eps=eps, elementwise_affine=affine)
    if affine:
        torch.nn.init.normal_(ref.weight)
    ours = fastgen.nn.RMSNorm(shape, eps=eps, elementwise_affine=affine)
    assert ours.state_dict().keys() == ref.state_dict().keys()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(3, 5, *shape)
    torch.testing.assert_close(ours(x), ref(x))
    back = torch.nn.RMSNorm(shape, eps=eps, elementwise_affine=affine)
    back.load_state_dict(ours.state_dict())
    torch.testing.assert_close(back(x), ref(x))
    assert isinstance(ours, torch.nn.RMSNorm)


def test_nn_rmsnorm_triton_with_residual():
    m = fastgen.nn.RMSNorm(40, eps=1e-6, backend="triton").to(TRITON_DEVICE)
    torch.nn.init.normal_(m.weight)
    x, _, r = _inputs((2, 3, 40), torch.float32, TRITON_DEVICE, residual=True)
    y, h = m(x, r)
    yr, hr = rms_norm_ref(x, m.weight.detach(), 1e-6, r)
    assert_close(y, yr)
    assert torch.equal(h, hr)
    with pytest.raises(ValueError, match="trailing shape"):
        m(torch.randn(2, 41, device=TRITON_DEVICE))


# ----------------------------------------------------------------------------- GPU tier


GPU_SHAPES = [(1, 1), (7, 123), (1024, 1024), (257, 4096), (64, 16384), (33, 65536), (4, 131072)]


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("residual", [False, True], ids=["", "res"])
def test_gpu_forward_backward(backend, shape, dtype, residual):
    x, w, r = _inputs(shape, dtype, "cuda", True, residual)
    x.requires_grad_()
    w.requires_grad_()
    xr, wr = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    out = rms_norm(x, w, EPS, r, backend=backend)
    ref = rms_norm_ref(xr, wr, EPS, r)
    y, yr = (out[0], ref[0]) if residual else (out, ref)
    assert_close(y, yr)
    if residual:
        assert torch.equal(out[1], ref[1])
    dy = torch.randn_like(y)
    (y * dy).sum().backward()
    (yr * dy).sum().backward()
    assert_close(x.grad, xr.grad, scale=2)
    assert_close(w.grad, wr.grad, scale=4)


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_deterministic_and_compiled(backend):
    x = torch.randn(4096, 2048, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(2048, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn_like(x)
    grads = []
    for _ in range(3):
        wi = w.clone().requires_grad_()
        (rms_norm(x, wi, backend=backend) * dy).sum().backward()
        grads.append(wi.grad)
    assert all(torch.equal(grads[0], g) for g in grads[1:])
    torch._dynamo.reset()
    block = _Block(256, backend).cuda()
    xs, res = torch.randn(8, 256, device="cuda"), torch.randn(8, 256, device="cuda")
    y, h = torch.compile(block, fullgraph=True)(xs, res)
    ye, he = block(xs, res)
    assert_close(y, ye)
    assert_close(h, he)


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("impl", ["triton", "cuda"])
def test_gpu_auto_matches_reference(impl, monkeypatch):
    x = torch.randn(300, 1000, device="cuda", dtype=torch.bfloat16)
    assert_close(run_auto_as(monkeypatch, "rms_norm", impl, lambda: rms_norm(x)), rms_norm_ref(x))
