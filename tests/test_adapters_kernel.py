"""The fused LoRA kernel (kernels/lora.py via fastgen.adapters.fused.lora_add) against the plain
torch composition ``y + s * (x @ down^T) @ up^T`` computed in float64, forward and every gradient.

Tolerance: the FlashAttention rule — the kernel's error against float64 at most twice torch's
own error in the same dtype, plus a small atol."""

from __future__ import annotations

import pytest
import torch
from conftest import INTERPRET, TRITON_DEVICE

from fastgen.adapters.fused import lora_add, lora_add_ref

needs_triton = pytest.mark.skipif(TRITON_DEVICE == "cpu" and not INTERPRET, reason="needs a GPU or TRITON_INTERPRET=1")
ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def _fa_close(out, torch_out, ref, dtype, what):
    err = (out.double() - ref).abs().max().item()
    bar = 2 * (torch_out.double() - ref).abs().max().item() + ATOL[dtype] * max(1.0, ref.abs().max().item())
    assert torch.isfinite(out).all(), f"{what}: non-finite values"
    assert err <= bar, f"{what}: error {err:.3g} above the bar {bar:.3g} ({dtype})"


def _case(M, K, N, R, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g).to(TRITON_DEVICE)  # noqa: E731
    x, y, down, up, dy = mk(M, K), mk(M, N), mk(R, K) / K**0.5, mk(N, R) / R**0.5, mk(M, N)
    return [t.to(dtype) for t in (x, y, down, up)], dy.to(dtype)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M,K,N,R", [(19, 37, 23, 1), (33, 70, 67, 3), (5, 9, 130, 17)])
def test_lora_kernel_matches_torch(M, K, N, R, dtype):
    (x, y, down, up), dy = _case(M, K, N, R, dtype)
    s = 0.7
    leaves = [t.clone().requires_grad_() for t in (x, down, up)]
    ref_leaves = [t.double().requires_grad_() for t in (x, down, up)]
    tch_leaves = [t.clone().requires_grad_() for t in (x, down, up)]

    y_k = y.clone()
    out = lora_add(y_k, leaves[0], leaves[1], leaves[2], s, backend="triton")
    assert out.data_ptr() == y_k.data_ptr(), "the kernel must add into the base output in place"
    ref = lora_add_ref(y.double(), *ref_leaves, s)
    tch = lora_add(y.clone(), *tch_leaves, s, backend="torch")
    _fa_close(out, tch, ref, dtype, "y")

    out.backward(dy)
    ref.backward(dy.double())
    tch.backward(dy)
    for name, a, b, c in zip(("dx", "d_down", "d_up"), leaves, ref_leaves, tch_leaves):
        assert a.grad.dtype == dtype
        _fa_close(a.grad, c.grad, b.grad, dtype, name)


@needs_triton
def test_lora_kernel_in_place_and_batched_shapes():
    """3-D inputs (batch, tokens, features), the base output grad passes through unchanged."""
    (x, y, down, up), dy = _case(2 * 7, 12, 10, 4, torch.float32, seed=1)
    x, y, dy = x.view(2, 7, 12), y.view(2, 7, 10), dy.view(2, 7, 10)
    yb = y.clone().requires_grad_()
    base = yb * 1.0  # a non-leaf stand-in for the base layer's output
    out = lora_add(base, x, down, up, 2.0, backend="triton")
    torch.testing.assert_close(out, lora_add_ref(y, x, down, up, 2.0), atol=1e-5, rtol=1e-5)
    out.backward(dy)
    torch.testing.assert_close(yb.grad, dy)


def test_lora_add_rejects_bad_shapes():
    with pytest.raises(ValueError, match="do not fit"):
        lora_add(torch.zeros(3, 5), torch.zeros(3, 4), torch.zeros(2, 4), torch.zeros(6, 2), 1.0)
