"""fastgen.nn.AdaLayerNormZero / AdaLayerNormContinuous against diffusers' modules of the same names:
a real diffusers module's state dict is loaded into ours, and outputs and gradients are compared."""

from __future__ import annotations

import pytest
import torch
from conftest import TRITON_DEVICE, assert_close

import fastgen



def _diffusers():
    """diffusers' AdaLN modules, the reference of the comparisons; skips the single test without it."""
    return pytest.importorskip("diffusers.models.normalization",
                               reason="diffusers is needed to compare with its AdaLN modules")


def _compare(theirs, ours, inputs, dtype, backend):
    theirs = theirs.to(TRITON_DEVICE, dtype)
    ours.load_state_dict(theirs.state_dict())
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    ours = ours.to(TRITON_DEVICE, dtype)
    for m in ours.modules():
        if hasattr(m, "backend"):
            m.backend = backend
    a = [t.to(TRITON_DEVICE, dtype).requires_grad_() for t in inputs]
    b = [t.detach().clone().requires_grad_() for t in a]
    out, ref = ours(*a), theirs(*b)
    out, ref = (out if isinstance(out, tuple) else (out,)), (ref if isinstance(ref, tuple) else (ref,))
    scale = 1 if dtype == torch.float32 else 2  # diffusers rounds the norm before modulating in half dtypes
    for o, r in zip(out, ref):
        assert o.shape == r.shape and o.dtype == r.dtype
        assert_close(o, r, scale=scale)
    g = [torch.randn_like(o) for o in out]
    params = list(ours.parameters())
    got = torch.autograd.grad(sum((o * d).sum() for o, d in zip(out, g)), a + params)
    exp = torch.autograd.grad(sum((o * d).sum() for o, d in zip(ref, g)), b + list(theirs.parameters()))
    for i, (x, y) in enumerate(zip(got, exp)):
        assert_close(x, y, scale=4 * scale, msg=f"gradient {i}")


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("norm_type", ["layer_norm", "fp32_layer_norm"])
def test_ada_layer_norm_zero(backend, dtype, norm_type):
    torch.manual_seed(0)
    N = 32
    theirs = _diffusers().AdaLayerNormZero(N, norm_type=norm_type)
    ours = fastgen.nn.AdaLayerNormZero(N, norm_type=norm_type)
    x, emb = torch.randn(2, 5, N), torch.randn(2, N)

    class Wrap(torch.nn.Module):  # forward(x, emb=...) positional for the comparison
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x, emb):
            return self.m(x, emb=emb)

    _compare(Wrap(theirs), Wrap(ours), [x, emb], dtype, backend)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("norm_type, affine, bias", [("layer_norm", False, True), ("layer_norm", True, True),
                                                     ("layer_norm", True, False), ("rms_norm", False, True),
                                                     ("rms_norm", True, True)])
def test_ada_layer_norm_continuous(backend, dtype, norm_type, affine, bias):
    torch.manual_seed(1)
    N, C = 24, 20
    theirs = _diffusers().AdaLayerNormContinuous(N, C, elementwise_affine=affine, eps=1e-6, bias=bias,
                                                  norm_type=norm_type)
    for p in theirs.norm.parameters():
        torch.nn.init.normal_(p)
    ours = fastgen.nn.AdaLayerNormContinuous(N, C, elementwise_affine=affine, eps=1e-6, bias=bias,
                                             norm_type=norm_type)
    _compare(theirs, ours, [torch.randn(3, 7, N), torch.randn(3, C)], dtype, backend)


def test_constructor_errors_match_diffusers():
    with pytest.raises(ValueError, match="Unsupported `norm_type`"):
        fastgen.nn.AdaLayerNormZero(8, norm_type="group_norm")
    with pytest.raises(ValueError, match="unknown norm_type"):
        fastgen.nn.AdaLayerNormContinuous(8, 8, norm_type="batch_norm")


def test_ada_layer_norm_zero_with_class_embeddings():
    torch.manual_seed(2)
    theirs = _diffusers().AdaLayerNormZero(16, num_embeddings=10)
    ours = fastgen.nn.AdaLayerNormZero(16, num_embeddings=10)
    ours.load_state_dict(theirs.state_dict())
    x, t, c = torch.randn(2, 3, 16), torch.tensor([1, 500]), torch.tensor([3, 7])
    for o, r in zip(ours(x, t, c, hidden_dtype=torch.float32), theirs(x, t, c, hidden_dtype=torch.float32)):
        torch.testing.assert_close(o, r)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_kernels_match_the_torch_backend_without_diffusers(dtype):
    """The Triton path of both AdaLN modules against their own torch path (no diffusers needed)."""
    torch.manual_seed(3)
    for make, inputs in ((lambda: fastgen.nn.AdaLayerNormContinuous(24, 20, eps=1e-6), (torch.randn(3, 7, 24),
                                                                                        torch.randn(3, 20))),
                         (lambda: fastgen.nn.AdaLayerNormZero(32), (torch.randn(2, 5, 32), None))):
        ref = make().to(TRITON_DEVICE, dtype)
        ker = make().to(TRITON_DEVICE, dtype)
        ker.load_state_dict(ref.state_dict())
        for m in ker.modules():
            if hasattr(m, "backend"):
                m.backend = "triton"
        x = inputs[0].to(TRITON_DEVICE, dtype)
        if inputs[1] is None:  # AdaLayerNormZero(x, emb=...) returns a tuple
            emb = torch.randn(2, 32).to(TRITON_DEVICE, dtype)
            call = lambda m: m(x, emb=emb)  # noqa: E731
        else:
            c = inputs[1].to(TRITON_DEVICE, dtype)
            call = lambda m: (m(x, c),)  # noqa: E731
        refs = call(ref)
        with fastgen.backend.trace() as ran:
            outs = call(ker)
        assert ran and all(impl == "triton" for _, impl in ran), ran
        for o, r in zip(outs, refs):
            assert_close(o, r, scale=2)
