"""fastgen.ops.layer_norm and fastgen.nn.LayerNorm against F.layer_norm and a float64 formula.

Triton runs on the GPU when there is one, else on CPU tensors in Triton's
interpreter (small shapes). The fused modulation forms are in test_modulate.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import DTYPES, TRITON_DEVICE, assert_close, requires_gpu

import fastgen
from fastgen.backend import BackendUnavailableError
from fastgen.ops import layer_norm, layer_norm_ref

EPS = 1e-5
TOL_ABS = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def _ref64(x, w=None, b=None, eps=EPS):
    """Float64 LayerNorm written out by hand: independent of F.layer_norm and of fastgen."""
    xd = x.double()
    mean = xd.mean(-1, keepdim=True)
    var = ((xd - mean) ** 2).mean(-1, keepdim=True)
    y = (xd - mean) / torch.sqrt(var + eps)
    if w is not None:
        y = y * w.double()
    if b is not None:
        y = y + b.double()
    return y


def _inputs(shape, dtype, device, affine=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) + 0.5).to(device=device, dtype=dtype)
    w = (1 + 0.5 * torch.randn(shape[-1], generator=g)).to(device=device, dtype=dtype) if affine else None
    b = (0.5 * torch.randn(shape[-1], generator=g)).to(device=device, dtype=dtype) if affine else None
    return x, w, b


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reference_matches_f_layer_norm_and_float64(dtype):
    x, w, b = _inputs((6, 257), dtype, "cpu")
    y = layer_norm_ref(x, w, b, EPS)
    assert torch.equal(y, F.layer_norm(x.float(), (257,), w.float(), b.float(), EPS).to(dtype))
    assert_close(y, _ref64(x, w, b).to(dtype))


@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (5, 123), (2, 3072), (2, 3, 33)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("affine", [True, False], ids=["wb", "no_wb"])
def test_triton_forward_backward(shape, dtype, affine):
    _check(shape, dtype, affine)


def _check(shape, dtype, affine):
    """Forward (fp32 reference and the float64 rule) and every gradient of the Triton path."""
    x, w, b = _inputs(shape, dtype, TRITON_DEVICE, affine)
    leaves = [t.requires_grad_() for t in (x, w, b) if t is not None]
    refs = [t.detach().clone().requires_grad_() for t in leaves]
    y = layer_norm(*leaves, eps=EPS, backend="triton") if affine else layer_norm(x, eps=EPS, backend="triton")
    yr = layer_norm_ref(*refs, eps=EPS) if affine else layer_norm_ref(refs[0], eps=EPS)
    assert y.shape == x.shape and y.dtype == dtype and y.is_contiguous()
    assert_close(y, yr)
    y64 = _ref64(*(t.detach() for t in leaves))
    assert (y.double() - y64).abs().max() <= 2 * (yr.double() - y64).abs().max() + TOL_ABS[dtype]
    dy = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(x.device, dtype)
    got = torch.autograd.grad((y * dy).sum(), leaves)
    want = torch.autograd.grad((yr * dy).sum(), refs)
    for g, r in zip(got, want):
        assert g.dtype == r.dtype
        assert_close(g, r, scale=2)


# Rows wider than MAX_FULL_ROW_FWD (8192) take the chunked forward (statistics pass, then apply
# pass, column chunks of FWD_CHUNK_N = 2048: 8193 ends on a 1-element chunk, 12000 and 20000 on partial ones).
WIDE = [(2, 8193), (3, 12000), (1, 2, 20000)]


@pytest.mark.parametrize("shape", WIDE, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("affine", [True, False], ids=["wb", "no_wb"])
def test_triton_wide_rows(shape, dtype, affine):
    from fastgen.kernels import layer_norm as k

    assert shape[-1] > k.MAX_FULL_ROW_FWD
    _check(shape, dtype, affine)


@pytest.mark.parametrize("kind", ["mean=1000", "mean=-3e4", "outliers"])
@pytest.mark.parametrize("N", [8193, 20000])
def test_triton_wide_rows_large_mean_keep_fp32_precision(kind, N):
    """x = 1000 + randn: a naive E[x^2] - E[x]^2 in fp32 loses the variance (or goes negative);
    "outliers": randn with massive activations (3000 in column 0, -1500 in column 5000), which
    must not throw the shift of the statistics off. The chunked forward must be no worse than
    PyTorch's fp32 LayerNorm (FlashAttention rule against float64), and so must the gradients."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, N, generator=g)
    if kind == "outliers":
        x[:, 0], x[:, 5000] = 3000.0, -1500.0
    else:
        x += float(kind.split("=")[1])
    x = x.to(TRITON_DEVICE).requires_grad_()
    w = (1 + 0.5 * torch.randn(N, generator=g)).to(TRITON_DEVICE).requires_grad_()
    b = (0.5 * torch.randn(N, generator=g)).to(TRITON_DEVICE).requires_grad_()
    refs = [t.detach().clone().requires_grad_() for t in (x, w, b)]
    r64 = [t.detach().double().requires_grad_() for t in (x, w, b)]
    y, yr, y64 = layer_norm(x, w, b, eps=EPS, backend="triton"), layer_norm_ref(*refs, eps=EPS), _ref64(*r64)
    assert torch.isfinite(y).all()
    assert (y.double() - y64).abs().max() <= 2 * (yr.double() - y64).abs().max() + 1e-6
    dy = torch.randn(3, N, generator=g).to(TRITON_DEVICE)
    got = torch.autograd.grad((y * dy).sum(), (x, w, b))
    want = torch.autograd.grad((yr * dy).sum(), refs)
    exact = torch.autograd.grad((y64 * dy.double()).sum(), r64)
    for gk, gr, ge in zip(got, want, exact):
        assert (gk.double() - ge).abs().max() <= 2 * (gr.double() - ge).abs().max() + 1e-4
    # the statistics themselves, against float64
    _, _, mean, rstd = torch.ops.fastgen.layer_norm_fwd(x.detach()[None], None, None, None, None, None, None,
                                                        EPS, 1, "triton")
    xd = x.detach().double()
    if kind != "outliers":  # (there the mean is near 0: its error is relative to the outliers)
        torch.testing.assert_close(mean.double(), xd.mean(-1), atol=0, rtol=2e-7)
    torch.testing.assert_close(rstd.double(), (xd.var(-1, unbiased=False) + EPS).rsqrt(), atol=0, rtol=1e-5)


def test_triton_gradients_match_float64_autograd():
    x, w, b = _inputs((4, 50), torch.float32, TRITON_DEVICE)
    leaves = [t.requires_grad_() for t in (x, w, b)]
    refs = [t.detach().double().requires_grad_() for t in leaves]
    dy = torch.randn(4, 50, device=TRITON_DEVICE)
    got = torch.autograd.grad((layer_norm(*leaves, backend="triton") * dy).sum(), leaves)
    want = torch.autograd.grad((_ref64(*refs) * dy.double()).sum(), refs)
    for g, r in zip(got, want):
        torch.testing.assert_close(g.double(), r, atol=1e-5, rtol=1e-5)


def test_fp32_params_with_bf16_input():
    x, _, _ = _inputs((3, 200), torch.bfloat16, TRITON_DEVICE)
    w = torch.rand(200, device=TRITON_DEVICE, requires_grad=True)
    b = torch.rand(200, device=TRITON_DEVICE, requires_grad=True)
    y = layer_norm(x, w, b, backend="triton")
    assert y.dtype == torch.bfloat16
    assert_close(y, layer_norm_ref(x, w, b))
    y.float().sum().backward()
    assert w.grad.dtype == torch.float32 and b.grad.dtype == torch.float32


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda t: t[:, :100], id="row-strided"),
        pytest.param(lambda t: t.t()[:, :60], id="transposed"),
        pytest.param(lambda t: t[:1, :100].expand(5, 100), id="broadcast-rows"),
    ],
)
def test_triton_non_contiguous(make):
    base = torch.randn(120, 200, device=TRITON_DEVICE)
    x = make(base).detach().requires_grad_()
    assert not x.is_contiguous()
    w_store = torch.randn(2 * x.shape[-1], device=TRITON_DEVICE, requires_grad=True)
    w = w_store[::2]  # a strided weight
    y = layer_norm(x, w, None, backend="triton")
    xr, wr = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    yr = layer_norm_ref(xr, wr)
    assert_close(y, yr)
    dy = torch.randn_like(y)
    (y * dy).sum().backward()
    (yr * dy).sum().backward()
    assert_close(x.grad, xr.grad)
    assert_close(w_store.grad[::2], wr.grad)


@pytest.mark.parametrize("shape", [(0, 16), (4, 0)])
def test_zero_size(shape):
    x = torch.randn(shape, device=TRITON_DEVICE, requires_grad=True)
    w = torch.ones(shape[-1], device=TRITON_DEVICE, requires_grad=True)
    y = layer_norm(x, w, backend="triton")
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape and torch.all(w.grad == 0)


def test_parameter_gradients_are_deterministic():
    x, w, b = _inputs((37, 300), torch.float32, TRITON_DEVICE, seed=3)
    dy = torch.randn(37, 300, device=TRITON_DEVICE)
    grads = []
    for _ in range(2):
        wi, bi = w.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
        grads.append(torch.autograd.grad((layer_norm(x, wi, bi, backend="triton") * dy).sum(), (wi, bi)))
    assert all(torch.equal(a, c) for a, c in zip(*grads))


def test_custom_ops_pass_opcheck():
    x, w, b = _inputs((1, 5, 33), torch.float32, TRITON_DEVICE)
    fwd = torch.ops.fastgen.layer_norm_fwd
    args = (x, None, None, None, None, w, b, EPS, 1, "triton")
    torch.library.opcheck(fwd, args, test_utils=("test_schema", "test_faketensor"))
    out, _, mean, rstd = fwd(*args)
    dout = torch.randn_like(out)
    torch.library.opcheck(torch.ops.fastgen.layer_norm_bwd,
                          (dout, None, x, None, None, None, w, b, mean, rstd, False, 1, "triton"),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()
    block = torch.nn.Sequential(torch.nn.Linear(48, 48), fastgen.nn.LayerNorm(48, backend=backend)).to(TRITON_DEVICE)
    x = torch.randn(4, 48, device=TRITON_DEVICE, requires_grad=True)
    compiled = torch.compile(block, fullgraph=True, backend="inductor" if backend == "torch" else "aot_eager")
    y, ye = compiled(x), block(x)
    assert_close(y, ye)
    (gx,) = torch.autograd.grad(y.sum(), x)
    (ge,) = torch.autograd.grad(ye.sum(), x)
    assert_close(gx, ge)


# ----------------------------------------------------------------------------- backends and errors


def test_backends():
    x = torch.randn(3, 10, dtype=torch.float64)
    torch.testing.assert_close(layer_norm(x), _ref64(x))  # float64: the reference, in float64
    with pytest.raises(BackendUnavailableError, match="dtype torch.float64 is not supported by the kernels"):
        layer_norm(x, backend="triton")
    with pytest.raises(BackendUnavailableError, match="no CUDA C\\+\\+ implementation"):
        layer_norm(x.float(), backend="cuda")
    wide = torch.randn(1, 8193, device=TRITON_DEVICE)  # no width limit: the chunked forward serves it
    assert_close(layer_norm(wide, backend="triton"), layer_norm_ref(wide))


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda: layer_norm(torch.randn(2, 8), torch.ones(7)), ValueError, r"weight must have shape \(8,\)"),
        (lambda: layer_norm(torch.randn(2, 8), None, torch.ones(8, device="meta")), ValueError,
         "bias is on meta but x is on cpu"),
        (lambda: layer_norm(torch.randn(2, 8, dtype=torch.float16), torch.ones(8, dtype=torch.bfloat16)), TypeError,
         "weight dtype torch.bfloat16 does not match x dtype torch.float16"),
        (lambda: layer_norm(torch.ones(2, 8, dtype=torch.int32)), TypeError, "floating-point tensor"),
        (lambda: layer_norm(torch.tensor(1.0)), ValueError, "at least one dimension"),
        (lambda: layer_norm(torch.randn(2, 8), eps=float("nan")), ValueError, "eps must be a finite number >= 0"),
    ],
)
def test_bad_inputs(call, error, message):
    with pytest.raises(error, match=message):
        call()


@pytest.mark.parametrize("shape, affine, bias", [((64,), True, True), ((64,), True, False), ((4, 16), False, False)])
def test_nn_layernorm_is_a_drop_in(shape, affine, bias):
    ref = torch.nn.LayerNorm(shape, eps=1e-6, elementwise_affine=affine, bias=bias)
    for p in ref.parameters():
        torch.nn.init.normal_(p)
    ours = fastgen.nn.LayerNorm(shape, eps=1e-6, elementwise_affine=affine, bias=bias)
    assert isinstance(ours, torch.nn.LayerNorm)
    assert ours.state_dict().keys() == ref.state_dict().keys()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(3, 5, *shape)
    torch.testing.assert_close(ours(x), ref(x))
    back = torch.nn.LayerNorm(shape, eps=1e-6, elementwise_affine=affine, bias=bias)
    back.load_state_dict(ours.state_dict())
    torch.testing.assert_close(back(x), ref(x))
    with pytest.raises(ValueError, match="trailing shape"):
        ours(torch.randn(2, 63))


def test_nn_layernorm_triton():
    m = fastgen.nn.LayerNorm((4, 10), backend="triton").to(TRITON_DEVICE)
    torch.nn.init.normal_(m.weight)
    x = torch.randn(2, 3, 4, 10, device=TRITON_DEVICE)
    ref = F.layer_norm(x, (4, 10), m.weight.detach(), m.bias.detach(), m.eps)
    assert_close(m(x), ref)


# ----------------------------------------------------------------------------- GPU tier


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("shape", [(1, 1), (7, 123), (1024, 1024), (257, 3072), (64, 5120), (33, 8192), (33, 12345),
                                   (16, 65536)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_forward_backward(shape, dtype):
    x, w, b = _inputs(shape, dtype, "cuda")
    leaves = [t.requires_grad_() for t in (x, w, b)]
    refs = [t.detach().clone().requires_grad_() for t in leaves]
    y, yr = layer_norm(*leaves, backend="triton"), layer_norm_ref(*refs)
    assert_close(y, yr)
    dy = torch.randn_like(y)
    for g, r in zip(torch.autograd.grad((y * dy).sum(), leaves), torch.autograd.grad((yr * dy).sum(), refs)):
        assert_close(g, r, scale=4)


@pytest.mark.gpu
@requires_gpu
def test_gpu_deterministic_and_compiled():
    x, w, b = _inputs((4096, 2048), torch.bfloat16, "cuda")
    dy = torch.randn_like(x)
    grads = []
    for _ in range(3):
        wi, bi = w.clone().requires_grad_(), b.clone().requires_grad_()
        grads.append(torch.autograd.grad((layer_norm(x, wi, bi, backend="triton") * dy).sum(), (wi, bi)))
    assert all(torch.equal(a, c) for g in grads[1:] for a, c in zip(grads[0], g))
    torch._dynamo.reset()
    m = fastgen.nn.LayerNorm(256, backend="triton").cuda()
    xs = torch.randn(8, 256, device="cuda")
    assert_close(torch.compile(m, fullgraph=True)(xs), m(xs))
