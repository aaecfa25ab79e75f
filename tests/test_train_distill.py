"""Consistency distillation and LCM distillation against float64 hand computations and analytic teachers.

The teachers are exact: for data x0 ~ N(mu, diag(s^2)) the denoiser of x = x0 + sigma z is
D(x, sigma) = mu + s^2 / (s^2 + sigma^2) (x - mu), so the distilled student has a known target.
"""

from __future__ import annotations

import copy
import math

import torch

from fastgen.train.consistency import ConsistencyDistillationObjective, update_target

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
        torch.testing.assert_close(o.sigmas(), torch.tensor(sig, dtype=torch.float64), rtol=1e-12, atol=0)


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


# --------------------------------------------------------------------------- LCM

SEED, STEPS = 0, 2000  # seeds 0-2 measured: one-step error <= 0.16, two-step <= 0.26
MUS = torch.tensor([[1.0, -0.5], [-1.0, 0.5]])  # class means; class 2 is the null label
# abar_t of the LCM objective's default schedule (scaled_linear, 0.00085..0.012, T = 1000; fp32 linspace)
_VP_ABAR = torch.cumprod(1 - torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000).double() ** 2, 0)


def _class_x0hat(x, a, c):
    """E[x0 | x_t] for x0 ~ N(MUS[c], diag(STD^2)), x_t = sqrt(a) x0 + sqrt(1 - a) z (float64 math)."""
    mu, s2 = MUS.to(x.dtype)[c], STD.to(x.dtype) ** 2
    return mu + a.sqrt() * s2 / (a * s2 + 1 - a) * (x - a.sqrt() * mu)


def vp_teacher_eps(x, t, cond):
    """Exact eps of the VP schedule of :class:`LCMDistillationObjective` for the class Gaussians;
    the null label (2) gives the exact eps of their equal mixture."""
    a = _VP_ABAR.to(x.dtype)[t].reshape(-1, 1)
    s2 = STD.to(x.dtype) ** 2
    x0_per_class = torch.stack([_class_x0hat(x, a, torch.full((x.shape[0],), c)) for c in (0, 1)])  # (2, B, D)
    var = a * s2 + 1 - a
    logp = torch.stack([-(((x - a.sqrt() * MUS.to(x.dtype)[c]) ** 2) / var).sum(1) / 2 for c in (0, 1)])  # (2, B)
    p_mix = torch.softmax(logp, 0)
    idx = cond.clamp(max=1)
    onehot = torch.nn.functional.one_hot(idx, 2).T.to(x.dtype)  # (2, B)
    p = torch.where((cond == 2)[None], p_mix, onehot)
    x0hat = (p[..., None] * x0_per_class).sum(0)
    return (x - a.sqrt() * x0hat) / (1 - a).sqrt()


class LCMStudent(torch.nn.Module):
    def __init__(self, emb_dim=16, width=96):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(2 + 3 + 2 + emb_dim, width), torch.nn.SiLU(),
                                       torch.nn.Linear(width, width), torch.nn.SiLU(), torch.nn.Linear(width, 2))

    def forward(self, x, t, class_labels=None, timestep_cond=None):
        t = t.float().reshape(-1, 1) / 1000
        onehot = torch.nn.functional.one_hot(class_labels, 2).float()
        return self.net(torch.cat([x, t, torch.sin(3 * t), torch.cos(3 * t), onehot, timestep_cond], 1))


def test_guidance_embedding_matches_formula():
    from fastgen.train.lcm import guidance_embedding

    w = torch.tensor([0.0, 2.5, 7.25], dtype=torch.float64)
    got = guidance_embedding(w, 6)
    f = [10000 ** (-j / 2) for j in range(3)]
    ref = torch.tensor([[math.sin(1000 * v * fj) for fj in f] + [math.cos(1000 * v * fj) for fj in f]
                        for v in w.tolist()], dtype=torch.float64)
    torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=2e-4)  # fp32 frequencies, arguments up to 7250
    assert guidance_embedding(w, 7).shape == (3, 7)


def test_lcm_loss_matches_float64_hand_computation():
    from fastgen.train.lcm import LCMDistillationObjective

    torch.manual_seed(0)
    lin, tgt = torch.nn.Linear(2 + 1 + 4, 2).double(), torch.nn.Linear(2 + 1 + 4, 2).double()

    def wrap(net):
        return lambda x, t, class_labels=None, timestep_cond=None: net(  # noqa: E731
            torch.cat([x.double(), t.double().reshape(-1, 1) / 1000, timestep_cond.double()], 1))

    B = 6
    x0 = MUS[torch.tensor([0, 1, 0, 1, 1, 0])].double() + torch.randn(B, 2, dtype=torch.float64)
    cond = torch.tensor([0, 1, 0, 1, 1, 0])
    z = torch.randn(B, 2, dtype=torch.float64)
    idx = torch.tensor([0, 1, 10, 25, 48, 49])
    w = torch.tensor([2.0, 3.5, 7.0, 14.0, 5.5, 2.25], dtype=torch.float64)
    o = LCMDistillationObjective(vp_teacher_eps, num_ddim_timesteps=50, embedding_dim=4)
    got = o.loss(wrap(lin), x0, cond=cond, uncond=torch.full((B,), 2), target_model=wrap(tgt),
                 indices=idx, noise=z, w=w)

    # float64 by hand: diffusers' scaled_linear betas, DDIM timesteps 19, 39, ..., 999, k = 20
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    abar = torch.cumprod(1 - betas, 0)

    def emb(v):
        f = [1.0, 1e-4]
        return [math.sin(1000 * v * fj) for fj in f] + [math.cos(1000 * v * fj) for fj in f]

    def f_cons(net, x, t, v):
        a = abar[t].item()
        with torch.no_grad():
            eps = net(torch.cat([x, torch.tensor([[t / 1000] + emb(v)], dtype=torch.float64)], 1))
        x0h = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
        st = 10.0 * t
        return 0.25 / (st * st + 0.25) * x + st / math.sqrt(st * st + 0.25) * x0h

    total = 0.0
    for b in range(B):
        t = 20 * (idx[b].item() + 1) - 1
        tp = max(t - 20, 0)
        a, ap, v = abar[t].item(), abar[tp].item(), w[b].item()
        xt = math.sqrt(a) * x0[b:b + 1] + math.sqrt(1 - a) * z[b:b + 1]
        tt = torch.tensor([t])
        ec = vp_teacher_eps(xt, tt, cond[b:b + 1])
        eu = vp_teacher_eps(xt, tt, torch.tensor([2]))
        x0c, x0u = (xt - math.sqrt(1 - a) * ec) / math.sqrt(a), (xt - math.sqrt(1 - a) * eu) / math.sqrt(a)
        xp = math.sqrt(ap) * (x0c + v * (x0c - x0u)) + math.sqrt(1 - ap) * (ec + v * (ec - eu))
        diff = f_cons(lin, xt, t, v) - f_cons(tgt, xp, tp, v)
        total += (torch.sqrt(diff ** 2 + 1e-6) - 1e-3).sum().item()
    ref = torch.tensor(total / (2 * B), dtype=torch.float64)
    torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-6)

    # encode: the objective works on latents; an encoder is applied (without gradients) first
    o2 = LCMDistillationObjective(vp_teacher_eps, num_ddim_timesteps=50, embedding_dim=4, encode=lambda x: 2 * x)
    got2 = o2.loss(wrap(lin), x0 / 2, cond=cond, uncond=torch.full((B,), 2), target_model=wrap(tgt),
                   indices=idx, noise=z, w=w)
    torch.testing.assert_close(got2, got)


def test_lcm_tiny_run_improves_one_and_two_step_samples():
    from fastgen.train.lcm import LCMDistillationObjective

    torch.manual_seed(SEED)
    o = LCMDistillationObjective(vp_teacher_eps, num_ddim_timesteps=25, w_min=1.0, w_max=3.0, embedding_dim=16)
    student = LCMStudent()
    n = 2000
    cond = torch.arange(n) % 2
    noise = torch.randn(n, 2, generator=torch.Generator().manual_seed(1))
    null = torch.full((n,), 2)
    refs = {w: o.teacher_sample(noise.double(), w, cond, null).float() for w in (1.5, 2.5)}

    def err(steps):
        e = 0.0
        for w, ref in refs.items():
            x = o.sample(student, noise, w, cond, timesteps=steps, generator=torch.Generator().manual_seed(3))
            for c in (0, 1):
                m, s = _moments(x[cond == c])
                mr, sr = _moments(ref[cond == c])
                e += (m - mr).norm().item() + (s - sr).norm().item()
        return e / 4

    before = err((999,)), err((999, 499))
    target = copy.deepcopy(student).requires_grad_(False)
    opt = torch.optim.Adam(student.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, STEPS)
    for _ in range(STEPS):
        c = torch.randint(0, 2, (256,), generator=g)
        x0 = MUS[c] + STD * torch.randn(256, 2, generator=g)
        loss = o.loss(student, x0, cond=c, uncond=torch.full((256,), 2), target_model=target, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        update_target(target, student, o.target_decay)
    after = err((999,)), err((999, 499))
    print(f"LCM moment error vs the guided teacher's DDIM samples: one-step {before[0]:.3f} -> {after[0]:.3f}, "
          f"two-step {before[1]:.3f} -> {after[1]:.3f}")
    scale = sum(ref.abs().mean().item() for ref in refs.values()) / 2
    print(f"(guided teacher samples: mean |x| {scale:.2f})")
    assert after[0] < 0.25 and after[1] < 0.35  # per class and w: |mean err| + |std err|, in data units
    assert after[0] < 0.05 * before[0] and after[1] < 0.05 * before[1]
