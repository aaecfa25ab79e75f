"""fastgen.zoo.ScoreSDE: the VP kernel against float64 integration, both samplers with the exact
score of a Gaussian, the DSM loss, compile, errors, and a VE model trained on the 8-mode ring
mixture whose samples (built-in and diffusers' ScoreSdeVeScheduler) match the data's moments."""

from __future__ import annotations

import pytest
import torch

from fastgen.zoo import ScoreSDE, ScoreSDEConfig
from fastgen.zoo.data import GMM_COV, GMM_MEAN, GMM_MODES, GMM_RADIUS, gaussian_mixture
from fastgen.zoo.score_sde import sample_diffusers_ve, train_score


@pytest.fixture(scope="module")
def one_thread_module():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # small MLPs on 2 shared cores: one thread is fastest
    yield
    torch.set_num_threads(n)


def _near_mode(s):
    ang = torch.arange(GMM_MODES) * 2 * torch.pi / GMM_MODES
    centres = GMM_RADIUS * torch.stack([ang.cos(), ang.sin()], 1)
    return ((s[:, None] - centres).norm(dim=-1).min(1).values < 0.3).float().mean().item()


def test_vp_marginal_matches_float64_integration():
    m = ScoreSDE(sde="vp")
    t = torch.tensor([0.0, 0.1, 0.5, 1.0], dtype=torch.float64)
    alpha, std = m.marginal(t)
    grid = torch.linspace(0, 1, 200001, dtype=torch.float64)
    integral = torch.cumulative_trapezoid(m.beta(grid), grid, dim=0)
    integral = torch.cat([torch.zeros(1, dtype=torch.float64), integral])
    ref = torch.exp(-0.5 * integral[(t * 200000).round().long()])
    torch.testing.assert_close(alpha, ref, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(std, (1 - ref ** 2).sqrt(), rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(ScoreSDE(sde="ve").marginal(torch.tensor([1.0]))[1], torch.tensor([5.0]))


@pytest.mark.parametrize("sde", ["ve", "vp"])
def test_samplers_with_the_exact_gaussian_score(sde):
    """For data N(mu, diag(v)) the score of p_t is -(x - alpha mu) / (alpha^2 v + std^2): with that
    score the predictor-corrector sampler must return N(mu, diag(v)). 4000 samples, 300 steps:
    statistical error of a mean ~0.016 sqrt(v), of a variance ~2% of v; asserted 0.06 / 10%."""
    mu, v = torch.tensor([1.0, -0.5]), torch.tensor([0.25, 1.0])
    m = ScoreSDE(sde=sde)

    def exact_score(x, t):
        alpha, std = m.marginal(t)
        return -(x - alpha[:, None] * mu) / (alpha[:, None] ** 2 * v + std[:, None] ** 2)

    m.forward = exact_score
    s = m.sample(4000, num_steps=300, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(s.mean(0), mu, atol=0.06, rtol=0)
    torch.testing.assert_close(s.var(0), v, rtol=0.1, atol=0)


def test_loss_forward_backward_compile_and_errors():
    torch.manual_seed(0)
    m = ScoreSDE(hidden=32, num_layers=2)
    x = torch.randn(8, 2)
    # untrained: zero output layer, so the loss is E ||eps||^2 / D = 1 up to sampling noise
    loss = m.loss(x, torch.Generator().manual_seed(0))
    assert 0.3 < loss.item() < 3
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
    t = torch.rand(8)
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(m, backend="aot_eager", fullgraph=True)(x, t), m(x, t))
    with pytest.raises(ValueError, match=r"x must have shape \(B, 2\)"):
        m(torch.zeros(3, 3), torch.zeros(3))
    with pytest.raises(ValueError, match=r"t must have shape \(3,\)"):
        m(torch.zeros(3, 2), torch.zeros(4))
    with pytest.raises(ValueError, match="sde must be"):
        ScoreSDEConfig(sde="subvp")
    with pytest.raises(ValueError, match="VE SDE only"):  # raised before diffusers is imported
        sample_diffusers_ve(ScoreSDE(sde="vp"), 2)


@pytest.fixture(scope="module")
def trained_ve(one_thread_module):
    data = gaussian_mixture(8192, torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    m = ScoreSDE(sde="ve", data_std=1.4)
    untrained = m.sample(2000, num_steps=200, generator=torch.Generator().manual_seed(3))
    train_score(m, data, steps=1000, batch_size=256, lr=3e-3, seed=0)
    return m, untrained


@pytest.mark.slow
def test_learns_ring_mixture_moments(trained_ve):
    """VE model, 1000 FusedAdamW steps (batch 256, lr 3e-3, seed 0) on 8192 points of the 8-mode
    ring (radius 2, mode std 0.1; exact mean 0, covariance 2.01 I). 2000 PC samples, 200 steps.
    Measured (seed 0): mean (0.09, 0.13), covariance (2.19, -0.42, 1.81), 56% of samples within
    0.3 of a mode centre. The error is dominated by how the run weights the 8 modes, which varies
    with the training seed: over data-order seeds 0-2 and a 1500-step run, mean coordinates
    reached 0.31 and covariance entries 0.39 from the truth, near-mode fractions 0.51-0.61.
    Asserted, above that spread: mean coordinates within 0.45, covariance entries within 0.6 of
    2.01 I (the untrained model's covariance is far larger: about 50 I), near-mode fraction > 0.4 (untrained < 0.05)."""
    m, untrained = trained_ve
    s = m.sample(2000, num_steps=200, generator=torch.Generator().manual_seed(3))
    mean, cov, near = s.mean(0), torch.cov(s.T), _near_mode(s)
    print(f"mean {mean.tolist()} cov {cov.flatten().tolist()} near-mode {near:.3f} "
          f"(untrained {_near_mode(untrained):.3f})")
    assert torch.isfinite(s).all()
    torch.testing.assert_close(mean, GMM_MEAN, atol=0.45, rtol=0)
    torch.testing.assert_close(cov, GMM_COV, atol=0.6, rtol=0)
    assert near > 0.4 and _near_mode(untrained) < 0.05


@pytest.mark.slow
def test_diffusers_score_sde_ve_scheduler_samples_match(trained_ve):
    pytest.importorskip("diffusers")
    m, _ = trained_ve
    s = sample_diffusers_ve(m, 2000, num_steps=200, generator=torch.Generator().manual_seed(3))
    print(f"diffusers: mean {s.mean(0).tolist()} cov {torch.cov(s.T).flatten().tolist()} near {_near_mode(s):.3f}")
    torch.testing.assert_close(s.mean(0), GMM_MEAN, atol=0.45, rtol=0)  # bounds: see the test above
    torch.testing.assert_close(torch.cov(s.T), GMM_COV, atol=0.6, rtol=0)
    assert _near_mode(s) > 0.4


@pytest.mark.slow
def test_vp_learns_ring_mixture_moments(one_thread_module):
    """The VP SDE, same data and training as the VE test (1000 steps, batch 256, lr 3e-3, seed 0).
    Measured: mean (0.07, -0.16), covariance (1.82, -0.15, 2.10), 42% of samples within 0.3 of a
    mode (data-order seed 1: 38%); untrained (score 0: the reverse drift only expands x) 0%.
    Asserted: the VE test's moment bounds, near-mode > 0.3 and > 4x untrained."""
    data = gaussian_mixture(8192, torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    m = ScoreSDE(sde="vp", data_std=1.4)
    untrained = _near_mode(m.sample(2000, num_steps=200, generator=torch.Generator().manual_seed(3)))
    train_score(m, data, steps=1000, batch_size=256, lr=3e-3, seed=0)
    s = m.sample(2000, num_steps=200, generator=torch.Generator().manual_seed(3))
    near = _near_mode(s)
    print(f"VP: mean {s.mean(0).tolist()} cov {torch.cov(s.T).flatten().tolist()} near {near:.3f} "
          f"(untrained {untrained:.3f})")
    torch.testing.assert_close(s.mean(0), GMM_MEAN, atol=0.45, rtol=0)
    torch.testing.assert_close(torch.cov(s.T), GMM_COV, atol=0.6, rtol=0)
    assert near > 0.3 and near > 4 * untrained
