"""fastgen.zoo.CycleGAN: generators against a plain-torch float64 rebuild, the losses against
their formulas, gradient routing, compile, errors, and CPU training on two unpaired shape
domains (red shapes <-> green shapes) that learns the colour swap with falling cycle error."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastgen.backend
from conftest import INTERPRET, TRITON_DEVICE
from fastgen.nn import GroupNorm
from fastgen.zoo.cyclegan import CycleGAN, CycleGANConfig, train_cyclegan
from fastgen.zoo.data import colour_swap, shapes

TINY = dict(channels=8, d_channels=(8, 16), groups=4, n_res=1)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions on 2 shared cores: one thread is fastest
    yield
    torch.set_num_threads(n)


def _domain(n: int, colour: int, seed: int) -> torch.Tensor:
    """n shapes images of one colour (0 red, 1 green), random shapes."""
    g = torch.Generator().manual_seed(seed)
    return shapes(n, g, labels=3 * torch.randint(0, 3, (n,), generator=g) + colour)[0]


def _plain(seq: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """Run a Sequential with every fastgen GroupNorm replaced by F.group_norm (+ F.silu)."""
    for layer in seq:
        if isinstance(layer, GroupNorm):
            x = F.group_norm(x, layer.num_groups, layer.weight, layer.bias, layer.eps)
            x = F.silu(x) if layer.activation == "silu" else x
        elif isinstance(layer, nn.Sequential):
            x = _plain(layer, x)
        elif hasattr(layer, "body"):                       # ResBlock
            x = x + _plain(layer.body, x)
        else:
            x = layer(x)
    return x


def test_networks_equal_plain_torch_float64():
    torch.manual_seed(0)
    m = CycleGAN(**TINY).double()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 1:
                p.normal_(std=0.5)          # non-trivial GroupNorm affines and biases
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    torch.testing.assert_close(m.g_ab(x), _plain(m.g_ab.net, x))
    d = m.d_a(x)
    assert d.shape == (2, 1, 4, 4)                          # one score per patch
    torch.testing.assert_close(d, _plain(m.d_a.net, x))


def test_losses_equal_their_formulas():
    torch.manual_seed(0)
    m = CycleGAN(**TINY, lambda_cycle=3.0, lambda_identity=2.0).double()
    a, b = torch.rand(2, 3, 16, 16, dtype=torch.float64) * 2 - 1, torch.rand(2, 3, 16, 16, dtype=torch.float64) * 2 - 1
    out = m.generator_loss(a, b)
    fb, fa = m.g_ab(a), m.g_ba(b)
    adv = ((m.d_b(fb) - 1) ** 2).mean() + ((m.d_a(fa) - 1) ** 2).mean()
    cyc = (m.g_ba(fb) - a).abs().mean() + (m.g_ab(fa) - b).abs().mean()
    idt = (m.g_ab(b) - b).abs().mean() + (m.g_ba(a) - a).abs().mean()
    torch.testing.assert_close(out.loss, adv + 3.0 * cyc + 2.0 * idt)
    torch.testing.assert_close(out.cycle, cyc.detach())
    ref_d = 0.5 * (((m.d_a(a) - 1) ** 2).mean() + (m.d_a(fa) ** 2).mean()
                   + ((m.d_b(b) - 1) ** 2).mean() + (m.d_b(fb) ** 2).mean())
    torch.testing.assert_close(m.discriminator_loss(a, b, fa, fb), ref_d)
    m.config.lambda_identity = 0.0                      # no identity term: not even computed
    out = m.generator_loss(a, b)
    assert out.identity.item() == 0.0
    torch.testing.assert_close(out.loss, adv + 3.0 * cyc)


def test_forward_backward_gradient_routing():
    torch.manual_seed(0)
    m = CycleGAN(**TINY)
    a, b = _domain(2, 0, 0), _domain(2, 1, 1)
    out = m.generator_loss(a, b)
    out.loss.backward()
    for g in (m.g_ab, m.g_ba):
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in g.parameters())
    m.zero_grad(set_to_none=True)
    m.discriminator_loss(a, b, out.fake_a, out.fake_b).backward()
    assert all(p.grad is None for p in [*m.g_ab.parameters(), *m.g_ba.parameters()])
    assert all(p.grad is not None for p in [*m.d_a.parameters(), *m.d_b.parameters()])
    assert m(a, b)[0].shape == (2, 3, 16, 16)


def test_compile_fullgraph_matches_eager():
    torch.manual_seed(0)
    m = CycleGAN(**TINY)
    a, b = torch.rand(2, 3, 16, 16) * 2 - 1, torch.rand(2, 3, 16, 16) * 2 - 1
    ref = m.generator_loss(a, b).loss
    torch._dynamo.reset()
    # the whole generator loss (four networks, six generator calls) in one graph
    f = torch.compile(lambda a, b: m.generator_loss(a, b).loss, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(f(a, b), ref)


def test_errors():
    m = CycleGAN(**TINY)
    with pytest.raises(ValueError, match=r"domain-A images must have shape \(B, 3, 16, 16\)"):
        m.a_to_b(torch.zeros(2, 1, 16, 16))
    with pytest.raises(ValueError, match=r"domain-B images must have shape \(B, 3, 16, 16\)"):
        m.generator_loss(torch.zeros(2, 3, 16, 16), torch.zeros(2, 3, 8, 8))
    with pytest.raises(TypeError, match="floating-point"):
        m.b_to_a(torch.zeros(2, 3, 16, 16, dtype=torch.long))
    with pytest.raises(ValueError, match="divisible by groups"):
        CycleGANConfig(channels=12, groups=8)
    with pytest.raises(ValueError, match="image_size=12 must be divisible"):
        CycleGANConfig(image_size=12, d_channels=(8, 16, 32))


def test_learns_the_colour_swap(one_thread):
    """120 steps (batch 16, lr 1e-3, betas (0.5, 0.999), seed 0), unpaired: 1024 red shapes (A)
    and 1024 other green shapes (B). On 128 held-out images per domain: the translation error
    mean |G_AB(a) - swap(a)| (swap = exchange red and green: the ideal translation) and the
    cycle-reconstruction error mean |G_BA(G_AB(a)) - a| (and B's). Asserted: both translation
    and both cycle errors fall below 0.1 from above 0.5 untrained; G_AB(a) is farther from a
    than from swap(a) (a colour change, not an identity map)."""
    A, B = _domain(1024, 0, 1), _domain(1024, 1, 2)
    ta, tb = _domain(128, 0, 3), _domain(128, 1, 4)
    torch.manual_seed(0)
    m = CycleGAN(channels=16)

    def measure():
        with torch.no_grad():
            ab, ba = m.a_to_b(ta), m.b_to_a(tb)
            return ((ab - colour_swap(ta)).abs().mean().item(), (ba - colour_swap(tb)).abs().mean().item(),
                    *m.cycle_error(ta, tb), (ab - ta).abs().mean().item())

    before = measure()
    log = train_cyclegan(m, A, B, steps=120, batch_size=16, lr=1e-3, seed=0)
    after = measure()
    print(f"translation error A->B, B->A {before[0]:.3f}, {before[1]:.3f} -> {after[0]:.3f}, {after[1]:.3f}; "
          f"cycle error {before[2]:.3f}, {before[3]:.3f} -> {after[2]:.3f}, {after[3]:.3f}; "
          f"|G_AB(a) - a| {after[4]:.3f}; train cycle loss {log[0]['cycle']:.3f} -> {log[-1]['cycle']:.3f}")
    assert min(before[:4]) > 0.5
    assert max(after[:4]) < 0.1
    assert after[4] > 5 * after[0]


@pytest.mark.skipif(not INTERPRET and TRITON_DEVICE != "cuda", reason="needs the Triton interpreter or a GPU")
def test_triton_backend_matches_torch():
    """A generator with its GroupNorm+SiLU on the Triton kernels (the interpreter on CPU): the
    output and the input gradient equal the torch backend's."""
    torch.manual_seed(0)
    cfg = CycleGANConfig(channels=8, groups=4, n_res=1, image_size=8, d_channels=(8,), backend="torch")
    g = CycleGAN(cfg).g_ab.to(TRITON_DEVICE)
    x = (torch.rand(1, 3, 8, 8, device=TRITON_DEVICE) * 2 - 1).requires_grad_()
    ref = g(x)
    (gx_ref,) = torch.autograd.grad(ref.square().sum(), x)
    norms = [mod for mod in g.modules() if isinstance(mod, GroupNorm)]
    assert len(norms) == 5 and all(mod.activation == "silu" for mod in norms)
    for mod in norms:
        mod.backend = "triton"
    with fastgen.backend.trace() as ran:
        out = g(x)
    assert ran == [("group_norm", "triton")] * 5          # every norm ran the Triton kernel
    (gx,) = torch.autograd.grad(out.square().sum(), x)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gx, gx_ref, atol=1e-4, rtol=1e-4)
