"""Figures of the zoo's docs (docs/images/zoo_<name>.png), trained with the settings of the
CPU training tests (tests/test_zoo_<name>.py), so the pictures show the models the tests measure.

    .venv/bin/python scripts/zoo_figures.py [--only vae,gan,...] [--out docs/images]

Needs matplotlib. CPU, one thread, about 3 minutes for all models on a 2-core machine.
"""

from __future__ import annotations

import argparse
import os

import torch


def _grid(images, nrow):
    """(N, 3, S, S) in [-1, 1] -> (rows*S, nrow*S, 3) numpy image in [0, 1]."""
    x = ((images.clamp(-1, 1) + 1) / 2).detach()
    n, c, s, _ = x.shape
    rows = (n + nrow - 1) // nrow
    pad = torch.ones(rows * nrow - n, c, s, s)
    x = torch.cat([x, pad]).view(rows, nrow, c, s, s).permute(0, 3, 1, 4, 2).reshape(rows * s, nrow * s, c)
    return x.numpy()


def _shapes_data():
    from fastgen.zoo.data import shapes

    return shapes(2048, torch.Generator().manual_seed(1))


def fig_vae(plt, out):
    from fastgen.zoo import BetaVAE
    from fastgen.zoo.data import shapes
    from fastgen.zoo.vae import train_vae

    data, _ = _shapes_data()
    test, _ = shapes(8, torch.Generator().manual_seed(2))
    rows = [test]
    for beta in (0.5, 8.0):
        torch.manual_seed(0)
        m = BetaVAE(channels=(16, 32), latent_dim=8, beta=beta, kl_anneal_steps=50)
        train_vae(m, data, steps=300, batch_size=64, lr=2e-3, seed=0)
        m.eval()
        rows.append(m.reconstruct(test))
    fig, ax = plt.subplots(figsize=(6, 2.6))
    ax.imshow(_grid(torch.cat(rows), 8))
    ax.set_title("rows: data, reconstruction at beta 0.5, at beta 8")
    ax.axis("off")
    fig.savefig(os.path.join(out, "zoo_vae.png"), dpi=120, bbox_inches="tight")


def fig_gan(plt, out):
    from fastgen.zoo import GAN
    from fastgen.zoo.gan import train_gan

    data, _ = _shapes_data()
    torch.manual_seed(0)
    m = GAN(g_channels=(32, 16), d_channels=(16, 32))
    before = m.sample(16, torch.Generator().manual_seed(5))
    train_gan(m, data, steps=300, batch_size=64, lr=1e-3, seed=0)
    after = m.sample(16, torch.Generator().manual_seed(5))
    fig, ax = plt.subplots(figsize=(6, 2.0))
    ax.imshow(_grid(torch.cat([data[:16], before, after]), 16))
    ax.set_title("rows: data, untrained samples, samples after 300 steps")
    ax.axis("off")
    fig.savefig(os.path.join(out, "zoo_gan.png"), dpi=120, bbox_inches="tight")


def fig_realnvp(plt, out):
    from fastgen.zoo import RealNVP
    from fastgen.zoo.data import two_moons
    from fastgen.zoo.realnvp import train_flow

    data = two_moons(4096, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    m = RealNVP(data_shape=(2,), num_couplings=8, hidden=32)
    train_flow(m, data, steps=400, batch_size=256, lr=3e-3, seed=0)
    g = torch.linspace(-2.5, 2.5, 200)
    grid = torch.stack(torch.meshgrid(g, g, indexing="xy"), -1).view(-1, 2)
    with torch.no_grad():
        dens = m.log_prob(grid).exp().view(200, 200)
    s = m.sample(2000, torch.Generator().manual_seed(3))
    fig, axes = plt.subplots(1, 3, figsize=(9, 3))
    axes[0].scatter(*data[:2000].T, s=1)
    axes[0].set_title("data")
    axes[1].imshow(dens, origin="lower", extent=(-2.5, 2.5, -2.5, 2.5))
    axes[1].set_title("learned density")
    axes[2].scatter(*s.T, s=1)
    axes[2].set_title("samples")
    for a in axes:
        a.set_xlim(-2.5, 2.5)
        a.set_ylim(-2.5, 2.5)
    fig.savefig(os.path.join(out, "zoo_realnvp.png"), dpi=120, bbox_inches="tight")


def fig_wgangp(plt, out):
    from fastgen.zoo import WGANGP
    from fastgen.zoo.wgangp import train_wgangp

    data, _ = _shapes_data()
    torch.manual_seed(0)
    m = WGANGP(g_channels=(32, 16), d_channels=(16, 32), n_critic=3)
    log = train_wgangp(m, data, steps=100, batch_size=32, lr=1e-3, betas=(0.5, 0.9), seed=0)
    fig, axes = plt.subplots(1, 2, figsize=(9, 2.6), gridspec_kw={"width_ratios": [1, 2]})
    axes[0].plot([w for w, _ in log])
    axes[0].set_xlabel("generator step")
    axes[0].set_title("critic estimate E D(real) - E D(fake)")
    axes[1].imshow(_grid(m.sample(16, torch.Generator().manual_seed(5)), 8))
    axes[1].set_title("samples after 100 generator steps")
    axes[1].axis("off")
    fig.savefig(os.path.join(out, "zoo_wgangp.png"), dpi=120, bbox_inches="tight")


def fig_cgan(plt, out):
    from fastgen.zoo import ConditionalGAN
    from fastgen.zoo.cgan import train_cgan
    from fastgen.zoo.data import shapes

    data, labels = shapes(2048, torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    m = ConditionalGAN(g_channels=(32, 16), d_channels=(16, 32))
    train_cgan(m, data, labels, steps=300, batch_size=64, lr=1e-3, seed=0)
    y = torch.arange(9).repeat_interleave(6)
    fig, ax = plt.subplots(figsize=(3, 4.5))
    ax.imshow(_grid(m.sample(y, torch.Generator().manual_seed(5)), 6))
    ax.set_title("one row per class (3 shapes x 3 colours)")
    ax.axis("off")
    fig.savefig(os.path.join(out, "zoo_cgan.png"), dpi=120, bbox_inches="tight")


def fig_score_sde(plt, out):
    from fastgen.zoo import ScoreSDE
    from fastgen.zoo.data import gaussian_mixture
    from fastgen.zoo.score_sde import train_score

    data = gaussian_mixture(8192, torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    m = ScoreSDE(sde="ve", data_std=1.4)
    train_score(m, data, steps=1000, batch_size=256, lr=3e-3, seed=0)
    s = m.sample(2000, num_steps=200, generator=torch.Generator().manual_seed(3))
    fig, axes = plt.subplots(1, 2, figsize=(6, 3))
    axes[0].scatter(*data[:2000].T, s=1)
    axes[0].set_title("data")
    axes[1].scatter(*s.T, s=1)
    axes[1].set_title("VE predictor-corrector samples")
    for a in axes:
        a.set_xlim(-3, 3)
        a.set_ylim(-3, 3)
    fig.savefig(os.path.join(out, "zoo_score_sde.png"), dpi=120, bbox_inches="tight")


def fig_vqvae(plt, out):
    from fastgen.zoo import VQVAE
    from fastgen.zoo.data import shapes
    from fastgen.zoo.vqvae import train_vqvae

    data, _ = _shapes_data()
    test, _ = shapes(8, torch.Generator().manual_seed(2))
    torch.manual_seed(0)
    m = VQVAE(channels=(16, 32), latent_dim=8, num_codes=32)
    train_vqvae(m, data, steps=300, batch_size=64, lr=2e-3, seed=0)
    m.eval()
    with torch.no_grad():
        rec = m(test).x_hat
    fig, ax = plt.subplots(figsize=(6, 1.8))
    ax.imshow(_grid(torch.cat([test, rec]), 8))
    ax.set_title("rows: data, reconstruction from 4x4 codes (K = 32)")
    ax.axis("off")
    fig.savefig(os.path.join(out, "zoo_vqvae.png"), dpi=120, bbox_inches="tight")


FIGURES = {"vae": fig_vae, "gan": fig_gan, "realnvp": fig_realnvp, "wgangp": fig_wgangp, "cgan": fig_cgan,
           "score_sde": fig_score_sde, "vqvae": fig_vqvae}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=",".join(FIGURES), help="comma-separated subset of " + ", ".join(FIGURES))
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "docs", "images"))
    args = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    torch.set_num_threads(1)
    os.makedirs(args.out, exist_ok=True)
    for name in args.only.split(","):
        FIGURES[name](plt, args.out)
        plt.close("all")
        print("wrote", os.path.join(args.out, f"zoo_{name}.png"))


if __name__ == "__main__":
    main()
