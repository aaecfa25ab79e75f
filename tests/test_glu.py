"""fastgen.ops.glu (GEGLU / SwiGLU / GLU) against independent references.

Triton runs on the GPU when there is one, else on CPU tensors in Triton's interpreter.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import DTYPES, TRITON_DEVICE, assert_close

from fastgen.backend import BackendUnavailableError
from fastgen.ops import glu, glu_ref

# exp overflows to inf on purpose at large |g| (sigmoid -> 0 exactly); numpy warns under the interpreter.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")

ACTS = ["sigmoid", "silu", "gelu", "gelu_tanh"]
SHAPES = [(1, 2), (3, 14), (5, 2, 130), (2, 2600), (17, 2048)]


def _act64(g, act):
    """Float64 activations written out by hand (no F.gelu / F.silu)."""
    if act == "sigmoid":
        return 1 / (1 + torch.exp(-g))
    if act == "silu":
        return g / (1 + torch.exp(-g))
    if act == "gelu":
        return 0.5 * g * (1 + torch.erf(g / math.sqrt(2)))
    return 0.5 * g * (1 + torch.tanh(math.sqrt(2 / math.pi) * (g + 0.044715 * g**3)))


def _glu64(x, act):
    a, g = x.double().chunk(2, -1)
    return a * _act64(g, act)


def _x(shape, dtype, device=TRITON_DEVICE, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(shape, generator=g)).to(device=device, dtype=dtype)


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_matches_float64(act, dtype):
    x = _x((7, 66), dtype, "cpu")
    assert_close(glu_ref(x, act), _glu64(x, act).to(dtype))


def test_reference_sigmoid_is_f_glu():
    x = _x((4, 10), torch.float32, "cpu")
    torch.testing.assert_close(glu_ref(x, "sigmoid"), F.glu(x, dim=-1), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_backward_match_reference(act, dtype, shape):
    """Forward against the fp32 reference; gradients against float64 autograd rounded to
    dtype (the eager fp32 GELU-tanh backward itself loses ~1e-5 to cancellation in 1 - tanh^2)."""
    x = _x(shape, dtype).requires_grad_()
    x64 = x.detach().cpu().double().requires_grad_()
    y = glu(x, act, backend="triton")
    assert y.shape == (*shape[:-1], shape[-1] // 2) and y.dtype == dtype
    assert_close(y, glu_ref(x.detach(), act))
    dy = _x(y.shape, dtype, seed=1, scale=1.0)
    y.backward(dy)
    _glu64(x64, act).backward(dy.cpu().double())
    assert_close(x.grad.cpu(), x64.grad.to(dtype))


@pytest.mark.parametrize("act", ACTS)
def test_gradient_against_float64_autograd(act):
    """Backward formulas (act' written in the kernel) against autograd of the float64 form."""
    x = _x((6, 40), torch.float32).requires_grad_()
    x64 = x.detach().double().requires_grad_()
    dy = _x((6, 20), torch.float32, seed=2, scale=1.0)
    glu(x, act, backend="triton").backward(dy)
    _glu64(x64, act).backward(dy.double())
    torch.testing.assert_close(x.grad, x64.grad.float(), atol=2e-5, rtol=2e-5)


def test_extreme_gates_stay_finite():
    """tanh / sigmoid at |g| = 1e4 and +-inf limits: no nan from exp overflow."""
    g = torch.tensor([[-1e4, -100.0, 0.0, 100.0, 1e4]])
    x = torch.cat([torch.ones_like(g), g], -1).to(TRITON_DEVICE).requires_grad_()
    for act in ACTS:
        y = glu(x, act, backend="triton")
        assert torch.isfinite(y).all(), act
        torch.testing.assert_close(y.cpu(), glu_ref(x.detach().cpu(), act), atol=1e-5, rtol=1e-5)
        (gx,) = torch.autograd.grad(y.sum(), x)
        assert torch.isfinite(gx).all(), act


def test_strided_and_sliced_input():
    base = _x((4, 9, 40), torch.float16)
    x = base[:, ::2, 4:36]            # rows strided, last dim contiguous
    xt = _x((24, 3), torch.float16).t()  # last dim strided: copied
    assert_close(glu(x, "gelu", backend="triton"), glu_ref(x, "gelu"))
    assert_close(glu(xt, "silu", backend="triton"), glu_ref(xt, "silu"))


def test_zero_size():
    x = torch.empty(0, 8, device=TRITON_DEVICE, requires_grad=True)
    y = glu(x, backend="triton")
    assert y.shape == (0, 4)
    y.sum().backward()
    assert x.grad.shape == (0, 8)


def test_matches_diffusers_geglu_and_swiglu():
    activations = pytest.importorskip("diffusers.models.activations")
    torch.manual_seed(0)
    for cls, act in ((activations.GEGLU, "gelu"), (activations.SwiGLU, "silu")):
        mod = cls(16, 24)
        h = torch.randn(2, 5, 16)
        expected = mod(h)
        got = glu(mod.proj(h).to(TRITON_DEVICE), act, backend="triton").cpu()
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_bad_input_errors():
    with pytest.raises(ValueError, match="must be even"):
        glu(torch.randn(2, 5))
    with pytest.raises(ValueError, match="activation must be one of"):
        glu(torch.randn(2, 4), "relu")
    with pytest.raises(TypeError, match="floating-point"):
        glu(torch.ones(2, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="0-d"):
        glu(torch.tensor(1.0))
    with pytest.raises(BackendUnavailableError, match="no CUDA C\\+\\+ kernel|needs CUDA tensors"):
        glu(torch.randn(2, 4), backend="cuda")
    with pytest.raises(BackendUnavailableError, match="float64"):
        glu(torch.randn(2, 4, dtype=torch.float64, device=TRITON_DEVICE), backend="triton")


def test_float64_on_torch_backend():
    x = _x((3, 8), torch.float64, "cpu")
    torch.testing.assert_close(glu(x, "gelu_tanh", backend="torch"), _glu64(x, "gelu_tanh"))


def test_torch_compile_fullgraph():
    x = _x((4, 32), torch.float32).requires_grad_()
    fn = torch.compile(lambda t: glu(t, "gelu", backend="triton") * 2, fullgraph=True, backend="aot_eager")
    y = fn(x)
    assert_close(y, 2 * glu_ref(x.detach(), "gelu"))
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


# ----------------------------------------------------------------------------- benchmark suite


def _bench():
    import importlib

    from fastgen.cli import _benchmarks_package

    return importlib.import_module(_benchmarks_package().__name__ + ".bench_glu")


def test_bench_bytes_by_hand():
    bench = _bench()
    # M=2, N=3, bf16: x 2*6*2 = 24 bytes, y 12; fwd 24 + 12; bwd dy 12 + x 24 + dx 24
    case = bench.Case({"M": 2, "N": 3}, torch.bfloat16)
    assert bench.bytes_moved(case, "fwd") == 36
    assert bench.bytes_moved(case, "bwd") == 60
    assert bench.bytes_moved(case, "fwd+bwd") == 96


@pytest.mark.parametrize("mode", ["fwd", "bwd", "fwd+bwd"])
def test_bench_setup_runs_on_cpu(mode):
    bench = _bench()
    for act in ("", "gelu_tanh", "silu"):
        case = bench.Case({"M": 4, "N": 8}, torch.float32, act)
        assert bench.activation(case) == (act or "gelu")
        bench.setup("torch", case, mode, "cpu")()
        with pytest.raises(bench.Unavailable, match="GPU"):
            bench.setup("fastgen-triton", case, mode, "cpu")
    # the eager provider is the function diffusers' GEGLU runs
    x = _x((4, 16), torch.float32, "cpu")
    assert_close(bench._eager(x, "gelu"), glu_ref(x, "gelu"))


# ----------------------------------------------------------------------------- GPU tier


@pytest.mark.gpu
@pytest.mark.parametrize("act", ACTS)
def test_gpu_sdxl_shape_bf16(act):
    x = _x((8192, 2 * 5120), torch.bfloat16, "cuda").requires_grad_()
    y = glu(x, act, backend="triton")
    assert_close(y, glu_ref(x.detach(), act))
    dy = _x(y.shape, torch.bfloat16, "cuda", seed=1, scale=1.0)
    (gx,) = torch.autograd.grad(y, x, dy)
    x64 = x.detach().double().requires_grad_()
    (g64,) = torch.autograd.grad(_glu64(x64, act), x64, dy.double())
    assert_close(gx, g64.to(torch.bfloat16))


def test_grid_puts_rows_on_the_unlimited_axis():
    """A video-sized token count: more row blocks than CUDA's 65535 limit of grid axes 1 and 2."""
    from fastgen.kernels.glu import glu_config

    cfg = glu_config(4_000_000, 5120)
    assert cfg["grid"][0] > 65535 and cfg["grid"][1] <= 65535
