"""fastgen.zoo.WGANGP: the gradient penalty and its weight gradients (double backward) against a
float64 plain-torch critic, the group_norm backends that lack a double backward are named, compile,
errors, and a short CPU training run on the shapes data."""

from __future__ import annotations

import statistics

import pytest
import torch
import torch.nn.functional as F

from conftest import INTERPRET, TRITON_DEVICE
from fastgen.zoo import WGANGP, WGANGPConfig
from fastgen.zoo.data import shapes
from fastgen.zoo.gan import image_statistics
from fastgen.zoo.wgangp import train_wgangp
from test_zoo_gan import one_thread  # noqa: F401

TINY = dict(g_channels=(16, 8), d_channels=(8, 16), latent_dim=8, groups=4)


def _reference_critic(critic, x, groups):
    """The critic in float64 with torch's own functions (F.conv2d, F.group_norm, F.silu)."""
    p = {k: v.detach().double().requires_grad_(True) for k, v in critic.named_parameters()}
    h = F.conv2d(x, p["conv_in.weight"], p["conv_in.bias"], padding=1)
    for i in range(len(critic.convs)):
        h = F.conv2d(h, p[f"convs.{i}.weight"], p[f"convs.{i}.bias"], stride=2, padding=1)
        h = F.silu(F.group_norm(h, groups, p[f"norms.{i}.weight"], p[f"norms.{i}.bias"], 1e-5))
    return F.linear(h.flatten(1), p["fc.weight"], p["fc.bias"]).squeeze(1), p


def _perturb(model):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # non-trivial GroupNorm affine parameters
        for name, p in model.critic.named_parameters():
            if "norms" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    return model


def test_gradient_penalty_and_its_double_backward_match_float64():
    torch.manual_seed(0)
    m = _perturb(WGANGP(**TINY))
    g = torch.Generator().manual_seed(1)
    real, fake = torch.rand(4, 3, 16, 16, generator=g) * 2 - 1, torch.rand(4, 3, 16, 16, generator=g) * 2 - 1
    eps = torch.rand(4, generator=g)
    gp = m.gradient_penalty(real, fake, eps)
    gp.backward()  # through the critic's input-gradient: the double backward

    e = eps.double().view(-1, 1, 1, 1)
    x_hat = (e * real.double() + (1 - e) * fake.double()).requires_grad_(True)
    out, params = _reference_critic(m.critic, x_hat, 4)
    (grad,) = torch.autograd.grad(out.sum(), x_hat, create_graph=True)
    gp_ref = (grad.flatten(1).norm(dim=1) - 1).pow(2).mean()
    gp_ref.backward()
    # fp32 model vs float64 reference: rounding of a few hundred fp32 products per output
    torch.testing.assert_close(gp.double(), gp_ref, rtol=1e-4, atol=1e-6)
    for name, p in m.critic.named_parameters():
        ref = params[name].grad
        if ref is None:  # the output bias does not move the input gradient
            assert name == "fc.bias" and (p.grad is None or not p.grad.any()), name
            continue
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad.double(), ref, rtol=2e-3, atol=1e-5 * ref.abs().max().item(),
                                   msg=lambda s: f"{name}: {s}")
    assert gp_ref.item() > 1e-3  # a penalty that is not trivially zero


@pytest.mark.skipif(not INTERPRET and TRITON_DEVICE != "cuda", reason="needs the Triton interpreter or a GPU")
def test_triton_group_norm_has_no_double_backward_and_the_model_says_so():
    from fastgen.ops import group_norm

    x = torch.randn(2, 8, 4, 4, device=TRITON_DEVICE, requires_grad=True)
    w = torch.ones(8, device=TRITON_DEVICE, requires_grad=True)
    y = group_norm(x, 4, w, None, activation="silu", backend="triton")
    (gx,) = torch.autograd.grad(y.pow(3).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="no autograd formula"):
        gx.sum().backward()
    m = WGANGP(**TINY, critic_backend="triton").to(TRITON_DEVICE)
    real = torch.zeros(2, 3, 16, 16, device=TRITON_DEVICE)
    with pytest.raises(NotImplementedError, match="fastgen.ops.group_norm.*critic_backend='torch'"):
        m.gradient_penalty(real, real, torch.rand(2, device=TRITON_DEVICE))


def test_losses_backward_and_compile():
    torch.manual_seed(0)
    m = WGANGP(**TINY)
    real = torch.rand(2, 3, 16, 16) * 2 - 1
    z, eps = m.noise(2, torch.Generator().manual_seed(0)), torch.tensor([0.3, 0.7])
    out = m.critic_loss(real, z, eps)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in m.critic.parameters())
    assert all(p.grad is None for p in m.generator.parameters())
    m.generator_loss(z).backward()
    assert all(p.grad is not None for p in m.generator.parameters())
    torch._dynamo.reset()
    # the generator loss compiles in one graph; the penalty's autograd.grad inside a compiled
    # function is a graph break in torch.compile, so it is compiled without fullgraph
    gl = torch.compile(m.generator_loss, backend="aot_eager", fullgraph=True)(z)
    torch.testing.assert_close(gl, m.generator_loss(z))
    cl = torch.compile(m.critic_loss, backend="aot_eager")(real, z, eps)
    torch.testing.assert_close(cl.loss, m.critic_loss(real, z, eps).loss)


def test_errors():
    m = WGANGP(**TINY)
    with pytest.raises(ValueError, match=r"\(B, 3, 16, 16\)"):
        m.critic_loss(torch.zeros(2, 4, 16, 16), m.noise(2), torch.rand(2))
    with pytest.raises(ValueError, match=r"z must have shape \(B, 8\)"):
        m(torch.zeros(2, 9))
    with pytest.raises(ValueError, match=r"eps must have shape \(2,\)"):
        m.gradient_penalty(torch.zeros(2, 3, 16, 16), torch.zeros(2, 3, 16, 16), torch.rand(3))
    with pytest.raises(ValueError, match="n_critic"):
        WGANGPConfig(n_critic=0)


@pytest.mark.slow
def test_training_on_shapes(one_thread):
    """100 generator steps x 3 critic steps (batch 32, lr 1e-3, betas (0.5, 0.9), seed 0).
    Measured: sample-statistics distance to the data 1.79 -> 0.40; the critic's Wasserstein
    estimate E D(real) - E D(fake) rises to 14.6 while the critic learns, then falls to 6.6 as
    the generator closes the gap; the penalty stays small (0.13 at the end: the constraint holds).
    Asserted: distance < 0.35x the start, the mean estimate over the last 10 steps < 0.7x its
    peak, last GP < 0.5."""
    data, _ = shapes(2048, torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    m = WGANGP(g_channels=(32, 16), d_channels=(16, 32), n_critic=3)
    target = image_statistics(data)
    before = (image_statistics(m.sample(256, torch.Generator().manual_seed(5))) - target).norm().item()
    log = train_wgangp(m, data, steps=100, batch_size=32, lr=1e-3, betas=(0.5, 0.9), seed=0)
    after = (image_statistics(m.sample(256, torch.Generator().manual_seed(5))) - target).norm().item()
    w = [a for a, _ in log]
    late = statistics.mean(w[-10:])
    print(f"distance {before:.3f} -> {after:.3f}; W peak {max(w):.2f}, last 10 {late:.2f}; GP {log[-1][1]:.3f}")
    assert after < 0.35 * before
    assert late < 0.7 * max(w)
    assert log[-1][1] < 0.5
