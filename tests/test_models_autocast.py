"""The models' hand-written backward passes (``gelu_linear``, ``modulated_norm_linear``,
``gated_modulated_norm_linear``) under bf16 autocast with fp32 weights, the trainer's
``precision = "bf16"``: the gradients equal autograd of the plain composition under the same
autocast (the same bf16 GEMMs), and come back in each input's dtype."""

import pytest
import torch
import torch.nn.functional as F

from conftest import max_err
from fastgen.models._common import gated_modulated_norm_linear, gelu_linear, modulated_norm_linear
from fastgen.ops.modulate import gated_residual_layer_norm_modulate, layer_norm_modulate


def _grads(fn, inputs):
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fn(*leaves)
    out = out if isinstance(out, tuple) else (out,)
    torch.manual_seed(1)
    sum(((o.float() * torch.randn_like(o.float())).sum() for o in out)).backward()
    return [o.detach() for o in out], [t.grad for t in leaves]


def _check(fast, plain, inputs):
    outs, grads = _grads(fast, inputs)
    ref_outs, ref_grads = _grads(plain, inputs)
    for a, b in zip(outs + grads, ref_outs + ref_grads):
        assert a.dtype == b.dtype, (a.dtype, b.dtype)
        scale = b.float().abs().max().item() + 1e-6
        assert max_err(a, b) <= 2e-2 * scale, max_err(a, b) / scale


def test_gelu_linear_under_autocast():
    torch.manual_seed(0)
    u = torch.randn(2, 5, 16).bfloat16()          # fc1's output under autocast
    w, b = torch.randn(8, 16), torch.randn(8)     # fp32 master weights
    _check(lambda u, w, b: gelu_linear(u, w, b),
           lambda u, w, b: F.linear(F.gelu(u, approximate="tanh"), w, b), [u, w, b])


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_modulated_norm_linear_under_autocast(x_dtype):
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16, dtype=x_dtype)
    shift, scale = torch.randn(2, 16, dtype=x_dtype), torch.randn(2, 16, dtype=x_dtype)
    w, b = torch.randn(8, 16), torch.randn(8)
    _check(lambda *a: modulated_norm_linear(*a, backend="torch"),
           lambda x, sh, sc, w, b: F.linear(layer_norm_modulate(x, sh, sc, eps=1e-6, backend="torch"), w, b),
           [x, shift, scale, w, b])


def test_gated_modulated_norm_linear_under_autocast():
    torch.manual_seed(0)
    x, y = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    gate, shift, scale = torch.randn(2, 16), torch.randn(2, 16), torch.randn(2, 16)
    w, b = torch.randn(8, 16), torch.randn(8)

    def plain(x, y, g, sh, sc, w, b):
        h, x1 = gated_residual_layer_norm_modulate(x, y, g, sh, sc, eps=1e-6, backend="torch")
        return F.linear(h, w, b), x1

    _check(lambda *a: gated_modulated_norm_linear(*a, backend="torch"), plain, [x, y, gate, shift, scale, w, b])


def test_dit_trains_under_bf16_autocast(monkeypatch):
    """The whole tiny DiT under autocast: the gradients with the hand-written backward passes equal
    those of autograd through the plain compositions (the same bf16 GEMMs), in fp32."""
    import fastgen.models._common as common
    from fastgen.models.dit import DiT, DiTConfig

    torch.manual_seed(0)
    m = DiT(DiTConfig(sample_size=8, patch_size=2, in_channels=4, num_layers=2, num_attention_heads=2,
                      attention_head_dim=8, num_embeds_ada_norm=10)).eval()  # no label dropout
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 500]), torch.tensor([1, 2])

    def grads():
        m.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(x, t, y)
        out = out.sample if hasattr(out, "sample") else out
        out.float().square().mean().backward()
        return torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None])

    fast = grads()
    monkeypatch.setattr(common, "_wants_grad", lambda *ts: False)
    monkeypatch.setattr(common._GeluLinear, "apply", lambda u, w, b, a: F.linear(F.gelu(u, approximate=a), w, b))
    plain = grads()
    assert fast.dtype == torch.float32 and fast.shape == plain.shape
    assert max_err(fast, plain) <= 2e-2 * plain.abs().max().item()
