"""fastgen.train.objectives against diffusers (schedules, SD3 sampling and weighting) and float64 math."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fastgen.train import objectives as obj


def _ks_uniform_cdf(samples: np.ndarray, cdf) -> float:
    """Kolmogorov-Smirnov statistic of ``samples`` against ``cdf`` (float64)."""
    x = np.sort(samples.astype(np.float64))
    n = len(x)
    f = cdf(x)
    return float(max(np.max(np.arange(1, n + 1) / n - f), np.max(f - np.arange(n) / n)))


@pytest.mark.parametrize("schedule", obj.BETA_SCHEDULES)
def test_betas_match_diffusers_ddpm(schedule):
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule=schedule, beta_start=0.00085,
                                  beta_end=0.012)
    o = obj.DenoisingObjective(beta_schedule=schedule, beta_start=0.00085, beta_end=0.012)
    torch.testing.assert_close(o.betas, ref.betas, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(o.alphas_cumprod, ref.alphas_cumprod, rtol=1e-5, atol=1e-9)
    x0, noise = torch.randn(4, 3, 5, 5), torch.randn(4, 3, 5, 5)
    t = torch.tensor([0, 17, 500, 999])
    torch.testing.assert_close(o.add_noise(x0, noise, t), ref.add_noise(x0, noise, t), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(obj.DenoisingObjective("v_prediction", schedule, beta_start=0.00085,
                                                      beta_end=0.012).target(x0, noise, t),
                               ref.get_velocity(x0, noise, t), rtol=1e-5, atol=1e-6)


def test_cosine_betas_float64():
    b = obj.make_betas("squaredcos_cap_v2", 50).double()
    f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    abar = torch.tensor([f((i + 1) / 50) / f(0) for i in range(50)], dtype=torch.float64)
    # away from the 0.999 cap the product of (1 - beta) telescopes to f(t)/f(0)
    torch.testing.assert_close(torch.cumprod(1 - b, 0)[:45], abar[:45], rtol=1e-5, atol=1e-7)
    assert b.max().item() == pytest.approx(0.999)


@pytest.mark.parametrize("prediction", obj.PREDICTIONS)
def test_min_snr_weights_match_diffusers_scripts(prediction):
    diffusers = pytest.importorskip("diffusers")
    from diffusers.training_utils import compute_snr

    sched = diffusers.DDPMScheduler(num_train_timesteps=1000)
    o = obj.DenoisingObjective(prediction, loss_weighting="min_snr_gamma", snr_gamma=5.0)
    t = torch.randint(0, 1000, (64,), generator=torch.Generator().manual_seed(0))
    snr = compute_snr(sched, t)
    mse = torch.stack([snr, 5.0 * torch.ones_like(t)], 1).min(1)[0]
    # the example scripts: eps -> min(snr, g) / snr; v -> min(snr, g) / (snr + 1); x0 -> min(snr, g)
    ref = {"epsilon": mse / snr, "v_prediction": mse / (snr + 1), "sample": mse}[prediction]
    torch.testing.assert_close(o.weights(t), ref, rtol=1e-5, atol=0)


def test_weightings_are_consistent_across_predictions():
    """The x0-space weight times the prediction's error factor is one function of t."""
    t = torch.arange(0, 1000, 37)
    for w in ("snr", "min_snr_gamma", "debiased"):
        eps = obj.DenoisingObjective("epsilon", loss_weighting=w)
        snr = eps.snr(t)
        x0 = obj.DenoisingObjective("sample", loss_weighting=w).weights(t)
        v = obj.DenoisingObjective("v_prediction", loss_weighting=w).weights(t)
        torch.testing.assert_close(eps.weights(t) * snr, x0, rtol=1e-5, atol=0)
        torch.testing.assert_close(v * (snr + 1), x0, rtol=1e-5, atol=0)
    d = obj.DenoisingObjective("epsilon", loss_weighting="debiased")
    torch.testing.assert_close(d.weights(t), 1 / d.snr(t).clamp(max=1000).sqrt())
    assert torch.equal(obj.DenoisingObjective("epsilon", loss_weighting="snr").weights(t), torch.ones(len(t)))


def test_denoising_targets_float64():
    o = obj.DenoisingObjective("v_prediction", beta_schedule="scaled_linear")
    x0, n = torch.randn(3, 2, 4, 4, dtype=torch.float64), torch.randn(3, 2, 4, 4, dtype=torch.float64)
    t = torch.tensor([1, 400, 998])
    a = o.alphas_cumprod.double()[t].view(-1, 1, 1, 1)
    xt = o.add_noise(x0, n, t)
    torch.testing.assert_close(xt, a.sqrt() * x0 + (1 - a).sqrt() * n, rtol=1e-6, atol=1e-6)
    v = o.target(x0, n, t)
    # x0 and eps are recovered from (x_t, v): x0 = sqrt(a) x_t - sqrt(1-a) v
    torch.testing.assert_close(a.sqrt() * xt - (1 - a).sqrt() * v, x0, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scheme,kw", [("uniform", {}), ("logit_normal", {"logit_mean": 0.3, "logit_std": 1.2}),
                                       ("mode", {"mode_scale": 1.29})])
def test_flow_sampling_matches_diffusers_density(scheme, kw):
    pytest.importorskip("diffusers")
    from diffusers.training_utils import compute_density_for_timestep_sampling as ref

    n = 4000
    ours = obj.sample_flow_u(scheme, n, generator=torch.Generator().manual_seed(1), **kw)
    same_seed = ref(scheme, n, logit_mean=kw.get("logit_mean"), logit_std=kw.get("logit_std"),
                    mode_scale=kw.get("mode_scale"), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(ours, same_seed)
    other_seed = ref(scheme, n, logit_mean=kw.get("logit_mean"), logit_std=kw.get("logit_std"),
                     mode_scale=kw.get("mode_scale"), generator=torch.Generator().manual_seed(2))
    # two-sample KS at different seeds: the same distribution (critical value at alpha = 0.001)
    try:
        from scipy.stats import ks_2samp
        assert ks_2samp(ours.numpy(), other_seed.numpy()).pvalue > 1e-3
    except ImportError:
        q = torch.linspace(0.01, 0.99, 99)
        torch.testing.assert_close(torch.quantile(ours, q), torch.quantile(other_seed, q), atol=0.03, rtol=0)


def test_flow_sampling_against_analytic_cdfs():
    n = 20000
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    crit = 1.95 / math.sqrt(n)  # KS critical value at alpha = 0.001
    u = obj.sample_flow_u("logit_normal", n, logit_mean=-0.5, logit_std=0.8, generator=g()).numpy()
    from math import erf
    phi = np.vectorize(lambda z: 0.5 * (1 + erf(z / math.sqrt(2))))
    assert _ks_uniform_cdf(u, lambda x: phi((np.log(x / (1 - x)) + 0.5) / 0.8)) < crit
    s = obj.sample_flow_u("sigmoid", n, sigmoid_scale=2.0, generator=g()).numpy()
    assert _ks_uniform_cdf(s, lambda x: phi(np.log(x / (1 - x)) / 2.0)) < crit
    # shifted uniform: sigma = s u / (1 + (s-1) u)  =>  P(sigma <= x) = x / (s - (s-1) x)
    f = obj.FlowMatchingObjective("shifted", shift=3.0)
    sig = f.sample_sigmas(n, generator=g()).numpy()
    assert _ks_uniform_cdf(sig, lambda x: x / (3.0 - 2.0 * x)) < crit
    # the KS statistic notices a wrong distribution
    assert _ks_uniform_cdf(sig, lambda x: x) > crit


def test_resolution_shift_is_flux():
    pytest.importorskip("diffusers")
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    f = obj.FlowMatchingObjective("uniform", resolution_shift=True, patch_size=2)
    for h, w in ((32, 32), (128, 128), (64, 160)):
        seq = (h // 2) * (w // 2)
        assert math.log(f.shift_for(h, w)) == pytest.approx(calculate_shift(seq), rel=1e-9)
    # e^mu u / (1 + (e^mu - 1) u) is Flux's time_shift exp(mu) / (exp(mu) + (1/u - 1))
    u = torch.rand(100, dtype=torch.float64) * 0.98 + 0.01
    mu = 0.8
    torch.testing.assert_close(obj.shift_sigmas(u, math.exp(mu)), math.exp(mu) / (math.exp(mu) + (1 / u - 1)))


@pytest.mark.parametrize("scheme", obj.FLOW_WEIGHTINGS)
def test_sd3_weighting_matches_diffusers(scheme):
    pytest.importorskip("diffusers")
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    sig = torch.rand(257, generator=torch.Generator().manual_seed(0)) * 0.98 + 0.01
    torch.testing.assert_close(obj.sd3_loss_weighting(scheme, sig), compute_loss_weighting_for_sd3(scheme, sig))


def test_flow_loss_is_zero_for_the_exact_velocity():
    f = obj.FlowMatchingObjective("logit_normal", loss_weighting="cosmap")
    x0 = torch.randn(8, 3, 4, 4)
    g = torch.Generator().manual_seed(5)
    sig = f.sample_sigmas(8, 4, 4, generator=g)
    noise = torch.randn(x0.shape, generator=g)
    xt = f.add_noise(x0, noise, sig)

    def oracle(x, t, class_labels=None):  # knows x0: v = (x_t - x0) / sigma
        return (x - x0) / (t / 1000).view(-1, 1, 1, 1)

    assert f.loss(oracle, x0, generator=torch.Generator().manual_seed(5)).item() < 1e-9
    torch.testing.assert_close(f.target(x0, noise), (xt - x0) / sig.view(-1, 1, 1, 1), rtol=1e-4, atol=1e-4)


def test_condition_dropout():
    labels = torch.arange(10).repeat(200)
    out = obj.drop_conditions(labels, 0.25, null_label=10, generator=torch.Generator().manual_seed(0))
    dropped = out == 10
    assert abs(dropped.float().mean().item() - 0.25) < 0.04
    assert torch.equal(out[~dropped], labels[~dropped])
    emb = torch.randn(2000, 4, 3)
    e = obj.drop_conditions(emb, 0.5, generator=torch.Generator().manual_seed(0))
    zero = (e == 0).flatten(1).all(1)
    assert abs(zero.float().mean().item() - 0.5) < 0.05
    assert torch.equal(e[~zero], emb[~zero])
    assert obj.drop_conditions(labels, 0.0) is labels
    with pytest.raises(ValueError, match="null_label"):
        obj.drop_conditions(labels, 0.1)


def test_bad_names_are_rejected():
    with pytest.raises(ValueError, match="prediction must be one of"):
        obj.DenoisingObjective("eps")
    with pytest.raises(ValueError, match="timestep_sampling"):
        obj.FlowMatchingObjective("lognorm")
