"""fastgen.ops.group_norm (+ fused SiLU) and fastgen.nn.GroupNorm against independent references.

References: ``F.group_norm`` (+ ``F.silu``) on the fp32-upcast input, and a float64
formula written out by hand (its gradients by float64 autograd through it). Triton runs
on the GPU when there is one, else on CPU tensors in Triton's interpreter (small
shapes, few programs). CUDA C++ runs in the ``gpu`` tier only.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import DTYPES, TRITON_DEVICE, assert_close, c_entry, requires_gpu, run_auto_as

import fastgen
from fastgen.backend import BackendUnavailableError
from fastgen.kernels import group_norm as K
from fastgen.ops import group_norm, group_norm_ref

EPS = 1e-5
CL = {4: torch.channels_last, 5: torch.channels_last_3d}
# |out - ref64| <= 2 * |torch_same_dtype - ref64| + atol (the FlashAttention rule)
TOL_ABS = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _ref64(x, G, w=None, b=None, eps=EPS, silu=False):
    """Float64 GroupNorm (+ SiLU) written out by hand: independent of F.group_norm and of fastgen."""
    N, C = x.shape[:2]
    xg = x.double().reshape(N, G, -1)
    mean = xg.mean(-1, keepdim=True)
    var = ((xg - mean) ** 2).mean(-1, keepdim=True)
    y = ((xg - mean) / torch.sqrt(var + eps)).reshape(x.shape)
    bcast = (1, C) + (1,) * (x.dim() - 2)
    if w is not None:
        y = y * w.double().view(bcast)
    if b is not None:
        y = y + b.double().view(bcast)
    if silu:
        y = y * torch.sigmoid(y)
    return y


def _ids(v):
    return "x".join(map(str, v)) if isinstance(v, tuple) else f"G{v}"


def _inputs(shape, dtype, device, weight=True, bias=True, channels_last=False, seed=0, offset=0.5):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) + offset).to(device=device, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=CL[len(shape)])
    C = shape[1]
    w = (1 + 0.5 * torch.randn(C, generator=g)).to(device=device, dtype=dtype) if weight else None
    b = (0.5 * torch.randn(C, generator=g)).to(device=device, dtype=dtype) if bias else None
    return x, w, b


def _check_fwd_bwd(shape, G, dtype, silu, channels_last=False, weight=True, bias=True, backend="triton",
                   device=TRITON_DEVICE, offset=0.5, grad_scale=2.0):
    act = "silu" if silu else None
    x, w, b = _inputs(shape, dtype, device, weight, bias, channels_last, offset=offset)
    leaves = [t.requires_grad_() for t in (x, w, b) if t is not None]
    ref_leaves = [t.detach().clone().requires_grad_() for t in leaves]
    it = iter(ref_leaves)
    rx, rw, rb = next(it), (next(it) if weight else None), (next(it) if bias else None)
    f64 = [t.detach().double().requires_grad_() for t in leaves]
    it = iter(f64)
    dx64, dw64, db64 = next(it), (next(it) if weight else None), (next(it) if bias else None)

    y = group_norm(x, G, w, b, EPS, act, backend=backend)
    yr = group_norm_ref(rx, G, rw, rb, EPS, act)
    y64 = _ref64(dx64, G, dw64, db64, EPS, silu)
    assert y.shape == x.shape and y.dtype == dtype
    if channels_last:
        assert y.is_contiguous(memory_format=CL[len(shape)])
    else:
        assert y.is_contiguous()
    assert_close(y, yr)
    # no worse than torch in the same dtype, against float64
    assert (y.double() - y64).abs().max() <= 2 * (yr.double() - y64).abs().max() + TOL_ABS[dtype]

    gen = torch.Generator().manual_seed(1)
    dy = torch.randn(shape, generator=gen).to(device, dtype)
    (y * dy).sum().backward()
    (yr * dy).sum().backward()
    (y64 * dy.double()).sum().backward()
    checks = [(x.grad, rx.grad, dx64.grad, "dx")]
    if weight:
        checks.append((w.grad, rw.grad, dw64.grad, "dw"))
    if bias:
        checks.append((b.grad, rb.grad, db64.grad, "db"))
    for got, ref, r64, what in checks:
        assert got.dtype == dtype, what
        if channels_last and what == "dx":
            assert got.is_contiguous(memory_format=CL[len(shape)])
        scale = grad_scale if what == "dx" else 2 * grad_scale  # dw / db sum over N and S
        assert_close(got, ref, scale=scale, msg=what)
        err, err_torch = (got.double() - r64).abs().max(), (ref.double() - r64).abs().max()
        assert err <= 2 * err_torch + scale * TOL_ABS[dtype] * max(1.0, r64.abs().max().item()), (what, err, err_torch)


# ----------------------------------------------------------------------------- reference


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("silu", [False, True], ids=["", "silu"])
def test_reference_matches_hand_written_float64(dtype, silu):
    x, w, b = _inputs((3, 12, 7, 5), dtype, "cpu")
    y = group_norm_ref(x, 4, w, b, EPS, "silu" if silu else None)
    assert y.dtype == dtype
    assert_close(y, _ref64(x, 4, w, b, EPS, silu).to(dtype))


def test_reference_is_f_group_norm_and_silu_with_fp32_upcast():
    x, w, b = _inputs((2, 64, 6, 6), torch.bfloat16, "cpu")
    expected = F.silu(F.group_norm(x.float(), 32, w.float(), b.float(), EPS)).to(torch.bfloat16)
    assert torch.equal(group_norm_ref(x, 32, w, b, EPS, "silu"), expected)
    assert torch.equal(group_norm(x, 32, w, b, EPS, "silu", backend="torch"), expected)
    assert torch.equal(group_norm(x, 32, w, b, EPS, backend="torch"),
                       F.group_norm(x.float(), 32, w.float(), b.float(), EPS).to(torch.bfloat16))


# ----------------------------------------------------------------------------- Triton

# (shape, groups): C = 96 / 32 groups (K = 3), C = 320 / 32 groups (K = 10), 17 x 13 spatial,
# a 5-D video tensor, a 3-D (N, C, L) tensor.
# (Each launch interprets N * G programs: N = 1 where G = 32 keeps the CPU tier fast.)
SHAPES = [
    ((1, 96, 3, 4), 32),
    ((1, 320, 2, 3), 32),
    ((2, 6, 17, 13), 3),
    ((1, 8, 3, 5, 6), 4),
    ((2, 12, 50), 4),
]


@pytest.mark.parametrize("shape, G", SHAPES, ids=_ids)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_forward_backward_silu(shape, G, dtype):
    _check_fwd_bwd(shape, G, dtype, True)


@pytest.mark.parametrize("shape, G", [((1, 512, 4, 4), 1), ((1, 1024, 2, 4), 2)], ids=_ids)
def test_triton_forward_backward_wide_groups(shape, G):
    """Groups of 512 channels: the tile config for groups of more than 256 channels (at least 8
    positions per tile, up to 16 warps, the ALIGN hint)."""
    _check_fwd_bwd(shape, G, torch.bfloat16, True)


def _force_split(monkeypatch, shape=None, G=None):
    """Make the launchers use the split reduction on small shapes: about 4 programs per group
    (few programs keep the interpreter fast)."""
    if shape is None:
        monkeypatch.setattr(K, "SPLIT_ELEMENTS", 16)
        return
    S = int(torch.tensor(shape[2:]).prod())
    padded = 1 << ((shape[1] // G - 1).bit_length() + (S - 1).bit_length())
    monkeypatch.setattr(K, "SPLIT_ELEMENTS", max(4, padded // 4))
    assert K.group_norm_config(shape[0], shape[1], S, G)["splits"] > 1


# The same channels per group (K = 3, 10, 2, 2, 3) with fewer groups: the split path runs
# several programs per group.
SPLIT_SHAPES = [((1, 12, 3, 4), 4), ((1, 40, 2, 3), 4), ((2, 6, 17, 13), 3), ((1, 8, 3, 5, 6), 4), ((2, 12, 50), 4)]


@pytest.mark.parametrize("shape, G", SPLIT_SHAPES, ids=_ids)
def test_triton_forward_backward_plain_split(monkeypatch, shape, G):
    # The shapes above run one program per group; here the split reduction runs them.
    _force_split(monkeypatch, shape, G)
    _check_fwd_bwd(shape, G, torch.bfloat16, False)


@pytest.mark.parametrize("shape, G", [((1, 96, 3, 4), 32), ((2, 6, 17, 13), 3), ((1, 8, 3, 5, 6), 4)],
                         ids=["96c", "17x13", "video"])
@pytest.mark.parametrize("path", ["per_group", "split"])
def test_triton_channels_last(monkeypatch, shape, G, path):
    if path == "split":
        if G == 32:
            shape, G = (1, 12, 3, 4), 4  # same K = 3, fewer programs
        _force_split(monkeypatch, shape, G)
    _check_fwd_bwd(shape, G, torch.bfloat16, True, channels_last=True)


@pytest.mark.parametrize("shape, G", [((2, 4, 1), 4), ((3, 5, 7), 5), ((2, 6, 1, 1), 2)], ids=["K1S1", "K1", "S1"])
@pytest.mark.parametrize("path", ["per_group", "split"])
def test_triton_degenerate_groups(monkeypatch, shape, G, path):
    # One channel and / or one position per group (K = 1 or S = 1; one element: var = 0, y = b).
    if path == "split":
        _force_split(monkeypatch)  # S = 1 cannot be split: then it checks the per-group path again
    _check_fwd_bwd(shape, G, torch.float32, True)


@pytest.mark.parametrize("weight, bias", [(False, False), (True, False), (False, True)], ids=["none", "w", "b"])
def test_triton_optional_affine(weight, bias):
    _check_fwd_bwd((2, 6, 5, 7), 3, torch.float32, True, weight=weight, bias=bias)


def test_triton_group_larger_than_64k_elements():
    # (1, 4, 130, 130): one group holds 4 * 130 * 130 = 67600 > 64K elements, two groups 33800 each.
    cfg = K.group_norm_config(1, 4, 130 * 130, 1)
    assert cfg["splits"] > 1  # the split reduction runs at the default threshold
    _check_fwd_bwd((1, 4, 130, 130), 1, torch.float32, True)
    _check_fwd_bwd((1, 4, 130, 130), 2, torch.bfloat16, True, channels_last=True)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_triton_split_reduction_forced(monkeypatch, channels_last):
    monkeypatch.setattr(K, "SPLIT_ELEMENTS", 64)
    cfg = K.group_norm_config(2, 12, 9 * 11, 4)
    assert cfg["splits"] >= 4 and cfg["chunk_s"] * (cfg["splits"] - 1) < 99
    _check_fwd_bwd((2, 12, 9, 11), 4, torch.float32, True, channels_last=channels_last)
    _check_fwd_bwd((1, 10, 3, 5, 7), 2, torch.float16, True, channels_last=channels_last)


def test_triton_statistics_survive_a_large_mean(monkeypatch):
    # mean / std = 1e4: a sum of squares in fp32 would lose the variance entirely.
    monkeypatch.setattr(K, "SPLIT_ELEMENTS", 256)
    g = torch.Generator().manual_seed(0)
    x = (1000.0 + 0.1 * torch.randn(2, 4, 40, 40, generator=g)).to(TRITON_DEVICE)
    assert K.group_norm_config(2, 4, 1600, 2)["splits"] > 1
    y = group_norm(x, 2, backend="triton")
    y64 = _ref64(x, 2)
    assert (y.double() - y64).abs().max() < 2e-3


def test_triton_fp32_params_with_half_input():
    x, _, _ = _inputs((2, 8, 5, 5), torch.bfloat16, TRITON_DEVICE)
    w = torch.rand(8, device=TRITON_DEVICE).requires_grad_()
    b = torch.randn(8, device=TRITON_DEVICE, dtype=torch.bfloat16).requires_grad_()  # mixed: both go fp32
    rw, rb = w.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    y = group_norm(x, 4, w, b, activation="silu", backend="triton")
    yr = group_norm_ref(x, 4, rw, rb, activation="silu")
    assert y.dtype == torch.bfloat16
    assert_close(y, yr)
    y.float().sum().backward()
    yr.float().sum().backward()
    assert w.grad.dtype == torch.float32 and b.grad.dtype == torch.bfloat16
    assert_close(w.grad, rw.grad, dtype=torch.bfloat16, scale=2)
    assert_close(b.grad, rb.grad, scale=2)


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda t: t.permute(0, 1, 3, 2), id="transposed-hw"),
        pytest.param(lambda t: t[:, :, 1:, ::2], id="sliced"),
        pytest.param(lambda t: t[:1].expand(3, -1, -1, -1), id="broadcast-batch"),
    ],
)
def test_triton_non_contiguous(make):
    base = torch.randn(3, 6, 7, 10, device=TRITON_DEVICE)
    x = make(base).detach().requires_grad_()
    assert not x.is_contiguous()
    w = torch.randn(6, device=TRITON_DEVICE).requires_grad_()
    wr = w.detach().clone().requires_grad_()
    y = group_norm(x, 3, w, activation="silu", backend="triton")
    xr = x.detach().clone().requires_grad_()
    yr = group_norm_ref(xr, 3, wr, activation="silu")
    assert_close(y, yr)
    dy = torch.randn_like(y).permute(0, 1, 3, 2).contiguous().permute(0, 1, 3, 2)  # strided dy as well
    (y * dy).sum().backward()
    (yr * dy).sum().backward()
    assert_close(x.grad, xr.grad, scale=2)
    assert_close(w.grad, wr.grad, scale=4)


def test_triton_strided_weight():
    x, _, _ = _inputs((2, 6, 4, 4), torch.float32, TRITON_DEVICE)
    store = torch.randn(12, device=TRITON_DEVICE, requires_grad=True)
    w = store[::2]
    wr = w.detach().clone().requires_grad_()
    y = group_norm(x, 2, w, backend="triton")
    yr = group_norm_ref(x, 2, wr)
    assert_close(y, yr)
    (y * y).sum().backward()
    (yr * yr).sum().backward()
    assert_close(store.grad[::2], wr.grad, scale=4)
    assert torch.all(store.grad[1::2] == 0)


@pytest.mark.parametrize("shape", [(0, 6, 4, 4), (2, 6, 0, 3), (0, 4, 5)])
def test_zero_size(shape):
    x = torch.randn(shape, device=TRITON_DEVICE, requires_grad=True)
    w = torch.ones(shape[1], device=TRITON_DEVICE, requires_grad=True)
    b = torch.zeros(shape[1], device=TRITON_DEVICE, requires_grad=True)
    y = group_norm(x, 2, w, b, activation="silu", backend="triton")
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape and torch.all(w.grad == 0) and torch.all(b.grad == 0)


def test_weight_gradient_is_deterministic(monkeypatch):
    monkeypatch.setattr(K, "SPLIT_ELEMENTS", 128)  # several programs per group and per channel
    x, w, b = _inputs((3, 8, 9, 9), torch.float32, TRITON_DEVICE, seed=3)
    dy = torch.randn(3, 8, 9, 9, device=TRITON_DEVICE)
    grads = []
    for _ in range(3):
        wi, bi = w.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
        (group_norm(x, 4, wi, bi, activation="silu", backend="triton") * dy).sum().backward()
        grads.append((wi.grad, bi.grad))
    assert all(torch.equal(grads[0][0], g[0]) and torch.equal(grads[0][1], g[1]) for g in grads[1:])


def test_custom_ops_pass_opcheck():
    x, w, b = _inputs((2, 6, 5, 3), torch.float32, TRITON_DEVICE)
    x3 = x.view(2, 6, 15)
    x3cl = x.contiguous(memory_format=torch.channels_last).flatten(2)
    fwd = torch.ops.fastgen.group_norm_fwd
    for args in [(x3, w, b, 3, EPS, True, "triton"), (x3cl, None, b, 2, EPS, False, "triton")]:
        torch.library.opcheck(fwd, args, test_utils=("test_schema", "test_faketensor"))
    y, mean, rstd = fwd(x3cl, w, b, 3, EPS, True, "triton")
    assert y.stride() == x3cl.stride()
    dy = torch.randn(2, 15, 6, device=TRITON_DEVICE).transpose(1, 2)
    assert dy.stride() == x3cl.stride()
    torch.library.opcheck(torch.ops.fastgen.group_norm_bwd, (dy, x3cl, w, b, mean, rstd, 3, True, "triton"),
                          test_utils=("test_schema", "test_faketensor"))


# ----------------------------------------------------------------------------- torch.compile


class _Block(torch.nn.Module):
    def __init__(self, c, backend):
        super().__init__()
        self.conv = torch.nn.Conv2d(c, c, 3, padding=1)
        self.norm = fastgen.nn.GroupNorm(4, c, activation="silu", backend=backend)

    def forward(self, x):
        return self.norm(self.conv(x)) * 2


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()
    block = _Block(8, backend).to(TRITON_DEVICE)
    x = torch.randn(2, 8, 6, 6, device=TRITON_DEVICE, requires_grad=True)
    compiled = torch.compile(block, fullgraph=True, backend="inductor" if backend == "torch" else "aot_eager")
    y = compiled(x)
    ye = block(x)
    assert_close(y, ye)
    y.sum().backward()
    g_compiled = x.grad.clone()
    x.grad = None
    ye.sum().backward()
    assert_close(g_compiled, x.grad)


# ----------------------------------------------------------------------------- backends and errors


def test_backend_selection():
    x = torch.randn(2, 4, 3, 3)
    assert fastgen.backend.resolve("group_norm", "auto", x.device) == "torch"
    with fastgen.backend("torch"):
        assert torch.equal(group_norm(x, 2), group_norm_ref(x, 2))


def test_cuda_backend_errors_on_cpu_tensors():
    with pytest.raises(BackendUnavailableError, match="CUDA C\\+\\+ backend needs CUDA tensors"):
        group_norm(torch.randn(2, 4, 3, 3), 2, backend="cuda")


def test_float64_goes_to_reference_under_auto_and_errors_when_forced():
    x = torch.randn(2, 6, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(group_norm(x, 3, activation="silu"), _ref64(x, 3, silu=True))
    with pytest.raises(BackendUnavailableError, match="dtype torch.float64 is not supported by the kernels"):
        group_norm(x, 3, backend="triton")


def test_too_many_channels_per_group_is_unsupported_by_the_kernels():
    x = torch.randn(1, 4096, 1, device=TRITON_DEVICE)
    with pytest.raises(BackendUnavailableError, match="4096 channels per group exceed the kernels' limit of 1024"):
        group_norm(x, 1, backend="triton")
    assert_close(group_norm(x, 1), group_norm_ref(x, 1))  # auto takes the reference


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda: group_norm(torch.randn(2, 10, 4, 4), 3), ValueError,
         "the number of channels C=10 \\(dim 1 of x\\) must be divisible by num_groups=3"),
        (lambda: group_norm(torch.randn(2, 8, 4, 4), 2, torch.ones(7)), ValueError,
         "weight must have shape \\(8,\\) \\(one value per channel"),
        (lambda: group_norm(torch.randn(2, 8, 4, 4), 2, None, torch.ones(8, 1)), ValueError,
         "bias must have shape \\(8,\\)"),
        (lambda: group_norm(torch.randn(2, 8), 2), ValueError,
         "x must have shape \\(N, C, \\*spatial\\) with 1 to 3 spatial dims .* got a 2-D tensor"),
        (lambda: group_norm(torch.randn(1, 2, 2, 2, 2, 2), 2), ValueError, "got a 6-D tensor"),
        (lambda: group_norm(torch.randn(2, 8, 4, 4), 2, activation="gelu"), ValueError,
         "unknown activation 'gelu'; expected None or 'silu'"),
        (lambda: group_norm(torch.randn(2, 8, 4, 4), 0), ValueError, "num_groups must be an int >= 1, got 0"),
        (lambda: group_norm(torch.randn(2, 8, 4, 4, dtype=torch.float16), 2, torch.ones(8, dtype=torch.bfloat16)),
         TypeError, "weight dtype torch.bfloat16 does not match x dtype torch.float16"),
        (lambda: group_norm(torch.randn(2, 8, 4), 2, torch.ones(8, device="meta")), ValueError,
         "weight is on meta but x is on cpu"),
        (lambda: group_norm(torch.ones(2, 8, 4, dtype=torch.int32), 2), TypeError, "floating-point tensor"),
        (lambda: group_norm(torch.randn(2, 8, 4), 2, eps=-1.0), ValueError, "eps must be a finite number >= 0"),
        (lambda: fastgen.nn.GroupNorm(2, 8, activation="relu"), ValueError, "unknown activation 'relu'"),
    ],
)
def test_bad_inputs(call, error, message):
    with pytest.raises(error, match=message):
        call()


# ----------------------------------------------------------------------------- nn.GroupNorm


@pytest.mark.parametrize("shape, G, affine", [((2, 8, 5, 5), 4, True), ((2, 6, 7), 3, False), ((2, 8), 2, True),
                                              ((1, 4, 2, 3, 3), 2, True)])
def test_nn_groupnorm_is_a_drop_in(shape, G, affine):
    ref = torch.nn.GroupNorm(G, shape[1], eps=1e-6, affine=affine)
    if affine:
        torch.nn.init.normal_(ref.weight)
        torch.nn.init.normal_(ref.bias)
    ours = fastgen.nn.GroupNorm(G, shape[1], eps=1e-6, affine=affine)
    assert isinstance(ours, torch.nn.GroupNorm)
    assert ours.state_dict().keys() == ref.state_dict().keys()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(shape)
    torch.testing.assert_close(ours(x), ref(x))
    back = torch.nn.GroupNorm(G, shape[1], eps=1e-6, affine=affine)
    back.load_state_dict(ours.state_dict())
    torch.testing.assert_close(back(x), ref(x))
    silu = fastgen.nn.GroupNorm(G, shape[1], eps=1e-6, affine=affine, activation="silu")
    silu.load_state_dict(ref.state_dict())
    torch.testing.assert_close(silu(x), F.silu(ref(x)))


def test_nn_groupnorm_triton_channels_last():
    m = fastgen.nn.GroupNorm(2, 6, activation="silu", backend="triton").to(TRITON_DEVICE)
    torch.nn.init.normal_(m.weight)
    x = torch.randn(2, 6, 5, 4, device=TRITON_DEVICE).contiguous(memory_format=torch.channels_last)
    y = m(x)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert_close(y, group_norm_ref(x, 2, m.weight.detach(), m.bias.detach(), m.eps, "silu"))
    assert "activation='silu'" in repr(m)
    with pytest.raises(ValueError, match="expected input of shape \\(N, 6, \\*spatial\\)"):
        m(torch.randn(2, 5, 3, device=TRITON_DEVICE))


# ----------------------------------------------------------------------------- benchmark suite


def _bench():
    import importlib

    from fastgen.cli import _benchmarks_package

    return importlib.import_module(_benchmarks_package().__name__ + ".bench_group_norm")


def test_bench_bytes_by_hand():
    bench = _bench()
    # N=2, C=4, S=3, G=2, fp32 (e = ew = 4): x is 2*4*3*4 = 96 bytes
    #   fwd: x 96 + y 96 + w, b 2*4*4 = 32                               = 224
    #   bwd: dy 96 + x 96 + dx 96 + w, b, dw, db 4*16 + mean, rstd 2*2*2*4 = 384
    assert bench.group_norm_bytes(2, 4, 3, 2, torch.float32, "fwd") == 224
    assert bench.group_norm_bytes(2, 4, 3, 2, torch.float32, "bwd") == 384
    assert bench.group_norm_bytes(2, 4, 3, 2, torch.float32, "fwd+bwd") == 608
    assert bench.group_norm_bytes(2, 4, 3, 2, torch.bfloat16, "fwd") == 112
    with pytest.raises(ValueError):
        bench.group_norm_bytes(2, 4, 3, 2, torch.float32, "sideways")
    case = bench.Case({"N": 2, "C": 4, "H": 1, "W": 3, "G": 2}, torch.float32)
    assert bench.bytes_moved(case, "fwd") == 224


@pytest.mark.parametrize("mode", ["fwd", "bwd", "fwd+bwd"])
def test_bench_setup_runs_on_cpu(mode):
    bench = _bench()
    assert "group_norm" in __import__(bench.__package__ + ".harness", fromlist=["x"]).available_ops()
    for variant in ("", "channels_last"):
        case = bench.Case({"N": 1, "C": 8, "H": 4, "W": 4, "G": 4}, torch.float32, variant)
        fn = bench.setup("torch", case, mode, "cpu")
        fn()
        for provider in ("fastgen-triton", "fastgen-cuda"):
            with pytest.raises(bench.Unavailable, match="GPU"):
                bench.setup(provider, case, mode, "cpu")


# ----------------------------------------------------------------------------- CUDA extension (no GPU needed)


def test_cuda_extension_argument_errors():
    from fastgen.cuda import extension_info, load_extension

    if not extension_info()["built"]:
        pytest.skip("fastgen._C is not built")
    C = load_extension()
    # x fp16 with bf16 params -> ValueError before anything touches the GPU
    with pytest.raises(ValueError, match="unsupported dtypes"):
        c_entry(C, "group_norm_fwd", 0, 0, 0, 0, 0, 0, 0, 2, 8, 16, 2, 0, 1, 16, 1, 2, 1e-5, 0, 0)
    with pytest.raises(ValueError, match="must be divisible by G=3"):
        c_entry(C, "group_norm_fwd", 0, 0, 0, 0, 0, 0, 0, 2, 8, 16, 3, 0, 1, 16, 0, 0, 1e-5, 0, 0)
    with pytest.raises(ValueError, match="no empty split"):
        c_entry(C, "group_norm_bwd", 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 8, 16, 2, 0, 4, 8, 0, 0, 0, 0)
    # empty problems return without launching
    c_entry(C, "group_norm_fwd", 0, 0, 0, 0, 0, 0, 0, 0, 8, 16, 2, 0, 1, 16, 0, 0, 1e-5, 1, 0)
    c_entry(C, "group_norm_bwd", 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 8, 16, 2, 1, 1, 16, 2, 0, 1, 0)


# ----------------------------------------------------------------------------- GPU tier

GPU_SHAPES = [
    ((4, 32, 1, 1), 32),
    ((3, 5, 7), 5),
    ((2, 1280, 8, 8), 32),
    ((2, 96, 17, 13), 32),
    ((2, 320, 32, 32), 32),
    ((1, 8, 4, 33, 35), 4),
    ((3, 12, 1000), 3),
    ((8, 512, 128, 128), 32),
    ((1, 128, 1024, 1024), 32),
]


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("shape, G", GPU_SHAPES, ids=_ids)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_gpu_forward_backward(backend, shape, G, dtype, channels_last):
    if channels_last and len(shape) == 3:
        pytest.skip("no channels-last format for 3-D tensors")
    big = shape[0] * shape[1] * shape[2] >= 8 * 512 * 128
    if big and dtype != torch.bfloat16:
        pytest.skip("the VAE-size shapes are checked in bf16")
    _check_fwd_bwd(shape, G, dtype, True, channels_last=channels_last, backend=backend, device="cuda",
                   grad_scale=4.0 if big else 2.0)


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_deterministic_compiled_and_large_mean(backend):
    x = torch.randn(2, 256, 64, 64, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(256, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(256, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn_like(x)
    grads = []
    for _ in range(3):
        wi, bi = w.clone().requires_grad_(), b.clone().requires_grad_()
        (group_norm(x, 32, wi, bi, activation="silu", backend=backend) * dy).sum().backward()
        grads.append((wi.grad, bi.grad))
    assert all(torch.equal(grads[0][0], g[0]) and torch.equal(grads[0][1], g[1]) for g in grads[1:])
    # 16M elements per group with mean / std = 1e3
    xl = 100.0 + 0.1 * torch.randn(1, 4, 2048, 2048, device="cuda")
    y = group_norm(xl, 1, backend=backend)
    assert (y.double() - _ref64(xl, 1)).abs().max() < 5e-3
    torch._dynamo.reset()
    block = _Block(16, backend).cuda()
    xs = torch.randn(2, 16, 8, 8, device="cuda")
    assert_close(torch.compile(block, fullgraph=True)(xs), block(xs))


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("split", [64, 1 << 30])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_gpu_cuda_split_thresholds(monkeypatch, split, channels_last):
    from fastgen.cuda import group_norm as CG

    monkeypatch.setattr(CG, "SPLIT_ELEMENTS", split)
    monkeypatch.setattr(K, "SPLIT_ELEMENTS", split)
    for backend in ("cuda", "triton"):
        _check_fwd_bwd((2, 40, 23, 19), 8, torch.float32, True, channels_last=channels_last, backend=backend,
                       device="cuda")


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("weight, bias", [(False, False), (True, False), (False, True)], ids=["none", "w", "b"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_gpu_optional_affine(backend, weight, bias, dtype):
    for cl in (False, True):
        _check_fwd_bwd((3, 64, 19, 21), 16, dtype, True, channels_last=cl, weight=weight, bias=bias,
                       backend=backend, device="cuda")


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_fp32_params_and_odd_layouts(backend):
    x = torch.randn(2, 96, 15, 17, device="cuda", dtype=torch.bfloat16)
    w = torch.rand(96, device="cuda", requires_grad=True)
    b = torch.randn(96, device="cuda", requires_grad=True)
    for xi in (x, x.contiguous(memory_format=torch.channels_last), x.permute(0, 1, 3, 2), x[:1].expand(3, -1, -1, -1)):
        xi = xi.detach().requires_grad_()
        xr, wr, br = (t.detach().clone().requires_grad_() for t in (xi, w, b))
        y = group_norm(xi, 32, w, b, activation="silu", backend=backend)
        yr = group_norm_ref(xr, 32, wr, br, activation="silu")
        assert_close(y, yr)
        dy = torch.randn_like(yr)
        (y * dy).sum().backward()
        (yr * dy).sum().backward()
        assert_close(xi.grad, xr.grad, scale=2)
        assert_close(w.grad, wr.grad, dtype=torch.bfloat16, scale=4)
        assert_close(b.grad, br.grad, dtype=torch.bfloat16, scale=4)
        w.grad = b.grad = None


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("impl", ["triton", "cuda"])
def test_gpu_auto_matches_reference(impl, monkeypatch):
    x = torch.randn(2, 64, 32, 32, device="cuda", dtype=torch.bfloat16)
    y = run_auto_as(monkeypatch, "group_norm", impl, lambda: group_norm(x, 32, activation="silu"))
    assert_close(y, group_norm_ref(x, 32, activation="silu"))

