"""fastgen.zoo.VAE / BetaVAE: shapes, gradients, compile, errors, the KL formula, and the
rate-distortion trade of beta measured by training on the generated shapes data (CPU)."""

from __future__ import annotations

import pytest
import torch

import fastgen.backend

from conftest import INTERPRET, TRITON_DEVICE
from fastgen.zoo import VAE, BetaVAE, VAEConfig
from fastgen.zoo.data import shapes
from fastgen.zoo.vae import train_vae
from test_zoo_gan import one_thread  # noqa: F401

TINY = dict(channels=(8, 16), latent_dim=4, groups=4)


def test_forward_backward_shapes():
    torch.manual_seed(0)
    m = VAE(**TINY)
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    out = m(x, generator=torch.Generator().manual_seed(0))
    assert out.x_hat.shape == x.shape and out.mu.shape == (3, 4) and out.logvar.shape == (3, 4)
    assert out.loss.dim() == 0 and torch.isfinite(out.loss)
    out.loss.backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert m.sample(5, torch.Generator().manual_seed(1)).shape == (5, 3, 16, 16)
    assert BetaVAE(**TINY).config.beta == 4.0 and VAE(**TINY).config.beta == 1.0


def test_loss_terms_match_torch_distributions():
    """KL against torch.distributions (closed form, float64); recon against the Gaussian log-density."""
    torch.manual_seed(0)
    m = VAE(**TINY, beta=2.5, recon_std=0.3).double()
    x = (torch.rand(4, 3, 16, 16, dtype=torch.float64) * 2 - 1)
    out = m(x, sample_posterior=False)
    D = torch.distributions
    q = D.Independent(D.Normal(out.mu, torch.exp(0.5 * out.logvar)), 1)
    p = D.Independent(D.Normal(torch.zeros_like(out.mu), torch.ones_like(out.mu)), 1)
    kl_ref = D.kl_divergence(q, p).mean()
    lik = D.Independent(D.Normal(out.x_hat, torch.full_like(out.x_hat, 0.3)), 3)
    const = 0.5 * x[0].numel() * torch.log(torch.tensor(2 * torch.pi * 0.09, dtype=torch.float64))
    recon_ref = (-lik.log_prob(x) - const).mean()
    torch.testing.assert_close(out.kl.double(), kl_ref, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(out.recon.double(), recon_ref, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(out.loss.double(), recon_ref + 2.5 * kl_ref, rtol=1e-6, atol=1e-9)


def test_kl_annealing():
    m = BetaVAE(**TINY, beta=4.0, kl_anneal_steps=4)
    assert [m.beta_at(s) for s in range(6)] == [1.0, 2.0, 3.0, 4.0, 4.0, 4.0]
    assert m.beta_at(None) == 4.0 and VAE(**TINY).beta_at(0) == 1.0


def test_compile_fullgraph_matches_eager():
    torch.manual_seed(0)
    m = VAE(**TINY)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    ref = m(x, sample_posterior=False)
    torch._dynamo.reset()
    out = torch.compile(m, backend="aot_eager", fullgraph=True)(x, sample_posterior=False)
    torch.testing.assert_close(out.loss, ref.loss)
    torch.testing.assert_close(out.x_hat, ref.x_hat)


def test_errors_name_the_expected_shape():
    m = VAE(**TINY)
    with pytest.raises(ValueError, match=r"\(B, 3, 16, 16\)"):
        m(torch.zeros(2, 1, 16, 16))
    with pytest.raises(ValueError, match=r"\(B, 3, 16, 16\)"):
        m(torch.zeros(2, 3, 8, 8))
    with pytest.raises(TypeError, match="floating-point"):
        m(torch.zeros(2, 3, 16, 16, dtype=torch.long))
    with pytest.raises(ValueError, match=r"z must have shape \(B, 4\)"):
        m.decode(torch.zeros(2, 5))
    with pytest.raises(ValueError, match="divisible by 2 \\*\\* len"):
        VAEConfig(image_size=18)
    with pytest.raises(ValueError, match="groups"):
        VAEConfig(channels=(12, 16), groups=8)


@pytest.mark.skipif(not INTERPRET and TRITON_DEVICE != "cuda", reason="needs the Triton interpreter or a GPU")
def test_triton_backend_matches_torch():
    torch.manual_seed(0)
    m = VAE(**TINY, backend="torch").to(TRITON_DEVICE)
    x = torch.rand(1, 3, 16, 16, device=TRITON_DEVICE) * 2 - 1
    ref = m(x, sample_posterior=False).x_hat
    for mod in m.modules():
        if hasattr(mod, "backend"):
            mod.backend = "triton"
    with fastgen.backend.trace() as ran:
        out = m(x, sample_posterior=False).x_hat
    assert len(ran) == 6 and all(r == ("group_norm", "triton") for r in ran), ran  # the kernels ran
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_beta_trades_rate_for_distortion(one_thread):
    """Train two models on the shapes data, identical but for beta (0.5 and 8), and measure on
    held-out images. Theory (rate-distortion view of the beta-ELBO): a larger beta gives a
    smaller KL (rate) and a larger reconstruction error (distortion).

    Measured (CPU, 300 steps, batch 64, seed 0): beta 0.5: KL 30.8 nats, MSE 0.041;
    beta 8: KL 14.2 nats, MSE 0.047; the per-pixel variance of the data is 0.256.
    Asserts: both reconstruct (MSE < 0.25 x the data variance, i.e. far better than the mean
    image), KL(0.5) > 1.5 KL(8), MSE(8) > 1.05 MSE(0.5)."""
    data, _ = shapes(2048, torch.Generator().manual_seed(1))
    test, _ = shapes(512, torch.Generator().manual_seed(2))
    var = test.var(0).mean().item()
    res = {}
    for beta in (0.5, 8.0):
        torch.manual_seed(0)
        m = BetaVAE(channels=(16, 32), latent_dim=8, beta=beta, kl_anneal_steps=50)
        losses = train_vae(m, data, steps=300, batch_size=64, lr=2e-3, seed=0)
        assert losses[-1] < 0.2 * losses[0]
        m.eval()
        with torch.no_grad():
            out = m(test, generator=torch.Generator().manual_seed(3))
        res[beta] = (out.kl.item(), out.mse.item())
    print("beta -> (KL nats, MSE):", res, "data var", var)
    (kl_lo, mse_lo), (kl_hi, mse_hi) = res[0.5], res[8.0]
    assert mse_lo < 0.25 * var and mse_hi < 0.25 * var
    assert kl_lo > 1.5 * kl_hi
    assert mse_hi > 1.05 * mse_lo
