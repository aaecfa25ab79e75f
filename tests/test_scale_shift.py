"""fastgen.ops.scale_shift (``x * (1 + scale) + shift``) against float64 math written out here.

Triton runs on the GPU when there is one, else on CPU tensors in Triton's interpreter.
"""

from __future__ import annotations

import pytest
import torch
from conftest import DTYPES, TRITON_DEVICE, assert_close

from fastgen import backend
from fastgen.backend import BackendUnavailableError
from fastgen.ops import scale_shift, scale_shift_ref

# (B, S, N) with odd and prime sizes; S = 1 makes per token and per sample the same rows.
SHAPES = [(2, 5, 33), (1, 1, 7), (3, 4, 130)]
MODS = ["sample", "token"]


def _mod(kind, B, S, N, dtype, gen):
    shape = (B, N) if kind == "sample" else (B, S, N)
    return torch.randn(shape, dtype=torch.float32, generator=gen).to(dtype).to(TRITON_DEVICE)


def _expected64(x, scale, shift, dy):
    """(y, dx, dscale, dshift) in float64: the forward and its gradients written by hand."""
    x64, sc, sh, g = (t.double() for t in (x, scale, shift, dy))
    sc3 = sc.unsqueeze(1) if sc.dim() == 2 else sc
    sh3 = sh.unsqueeze(1) if sh.dim() == 2 else sh
    y = x64 * (1 + sc3) + sh3
    dsc = g * x64 if sc.dim() == 3 else (g * x64).sum(1)
    dsh = g if sh.dim() == 3 else g.sum(1)
    return y, g * (1 + sc3), dsc, dsh


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("scale_kind", MODS)
@pytest.mark.parametrize("shift_kind", MODS)
def test_forward_and_gradients_match_float64(dtype, shape, scale_kind, shift_kind):
    B, S, N = shape
    gen = torch.Generator().manual_seed(B * 100 + S * 10 + N)
    x = torch.randn(shape, generator=gen).to(dtype).to(TRITON_DEVICE).requires_grad_()
    scale = _mod(scale_kind, B, S, N, dtype, gen).requires_grad_()
    shift = _mod(shift_kind, B, S, N, dtype, gen).requires_grad_()
    dy = torch.randn(shape, generator=gen).to(dtype).to(TRITON_DEVICE)
    with backend.trace() as ran:
        y = scale_shift(x, scale, shift, backend="triton")
    assert ran == [("scale_shift", "triton")]
    got = (y, *torch.autograd.grad(y, (x, scale, shift), dy))
    for name, g, e in zip(("y", "dx", "dscale", "dshift"), got, _expected64(x, scale, shift, dy)):
        assert g.dtype == dtype and g.shape == e.shape, name
        # one rounding from fp32; the per-sample sums over S tokens may grow the magnitude
        assert_close(g.double(), e.to(dtype).double(), dtype, scale=2.0, msg=name)


def test_strided_chunks_of_an_adaln_projection_are_read_in_place():
    """scale / shift as chunks of a (B, 6N) projection (row stride 6N) and a transposed x."""
    gen = torch.Generator().manual_seed(0)
    B, S, N = 2, 3, 20
    proj = torch.randn(B, 6 * N, generator=gen).to(TRITON_DEVICE).requires_grad_()
    shift, scale = proj[:, :N], proj[:, N:2 * N]
    xt = torch.randn(B, N, S, generator=gen).to(TRITON_DEVICE).requires_grad_()
    x = xt.transpose(1, 2)  # no unit last stride: the op makes one
    y = scale_shift(x, scale, shift, backend="triton")
    dy = torch.randn(B, S, N, generator=gen).to(TRITON_DEVICE)
    dproj, dxt = torch.autograd.grad(y, (proj, xt), dy)
    e_y, e_dx, e_dsc, e_dsh = _expected64(x, scale, shift, dy)
    assert_close(y.double(), e_y.float().double(), torch.float32)
    assert_close(dxt.transpose(1, 2).double(), e_dx.float().double(), torch.float32)
    assert_close(dproj[:, N:2 * N].double(), e_dsc.float().double(), torch.float32)
    assert_close(dproj[:, :N].double(), e_dsh.float().double(), torch.float32)
    assert dproj[:, 2 * N:].abs().max() == 0


def test_nan_is_carried_not_hidden():
    x = torch.ones(1, 2, 3, device=TRITON_DEVICE)
    scale = torch.zeros(1, 3, device=TRITON_DEVICE)
    shift = torch.tensor([[0.0, float("nan"), 1.0]], device=TRITON_DEVICE)
    y = scale_shift(x, scale, shift, backend="triton")
    assert torch.isnan(y[..., 1]).all() and torch.isfinite(y[..., [0, 2]]).all()


def test_backends_and_errors():
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    s = torch.randn(2, 4, dtype=torch.float64)
    torch.testing.assert_close(scale_shift(x, s, s), _expected64(x, s, s, x)[0])  # auto on CPU: the reference
    with pytest.raises(BackendUnavailableError, match="dtype torch.float64 is not supported by the kernels"):
        scale_shift(x, s, s, backend="triton")
    with pytest.raises(BackendUnavailableError, match="this op has no CUDA C\\+\\+ implementation"):
        scale_shift(x.float(), s.float(), s.float(), backend="cuda")
    with pytest.raises(ValueError, match="scale must have shape \\(B, N\\)"):
        scale_shift(x, s[:, :3], s)
    with pytest.raises(ValueError, match="x must have shape \\(B, S, N\\)"):
        scale_shift(x[0], s, s)
    with pytest.raises(TypeError, match="shift dtype torch.float32 does not match"):
        scale_shift(x, s, s.float())
    empty = torch.randn(2, 0, 4, device=TRITON_DEVICE)
    assert scale_shift(empty, s.float().to(TRITON_DEVICE), s.float().to(TRITON_DEVICE), backend="triton").shape == (2, 0, 4)
    assert torch.equal(scale_shift_ref(x, s, s), scale_shift(x, s, s, backend="torch"))


def test_per_sample_gradients_repeat_exactly():
    """Per-sample sums are fixed-order sums of partials (no atomics): two runs agree bit for bit."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 9, 16, generator=gen).to(TRITON_DEVICE)
    s = torch.randn(2, 16, generator=gen).to(TRITON_DEVICE).requires_grad_()
    dy = torch.randn(2, 9, 16, generator=gen).to(TRITON_DEVICE)
    runs = [torch.autograd.grad(scale_shift(x, s, s, backend="triton"), s, dy)[0] for _ in range(2)]
    assert torch.equal(runs[0], runs[1])


def test_torch_compile_fullgraph():
    """The custom ops trace without graph breaks; forward and gradients match the eager op."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 8, generator=gen).to(TRITON_DEVICE).requires_grad_()
    s = torch.randn(2, 8, generator=gen).to(TRITON_DEVICE).requires_grad_()
    fn = torch.compile(lambda a, b: scale_shift(a, b, b, backend="triton") * 2, fullgraph=True, backend="aot_eager")
    y = fn(x, s)
    e_y, e_dx, e_ds, e_dsh = _expected64(x, s, s, torch.full_like(y, 2.0))
    assert_close(y.double(), 2 * e_y.float().double(), torch.float32)
    dx, ds = torch.autograd.grad(y.sum(), (x, s))
    assert_close(dx.double(), e_dx.float().double(), torch.float32)
    assert_close(ds.double(), (e_ds + e_dsh).float().double(), torch.float32)
