"""Error maps of tiled VAE decodes against the full decode (the figure of docs/vae.md).

A tiny random-weight AutoencoderKL (2 blocks, biases enlarged so tiles' GroupNorm statistics
differ), a latent of 37 x 29 with a spatial trend, tiles of 16 latent positions, overlap 0.25, fp32,
CPU. Three panels of ``max over channels |tiled - full|`` on a log colour scale:

1. diffusers' ``tiled_decode`` (diffusers' own method when diffusers is installed; otherwise
   ``fastgen.vae.tiled_decode(..., blend="linear")``, which is the same layout and tested equal);
2. fastgen ``consistent_colors=True, halo=False`` (whole-image statistics, blended tiles);
3. fastgen ``consistent_colors=True`` (the lossless halo layout, the default).

Run: ``python scripts/vae_error_maps.py [--out docs/images/vae_error_maps.png]``. Prints the PSNRs.
"""

from __future__ import annotations

import argparse

import torch

import fastgen
from fastgen.vae import AutoencoderKL, AutoencoderKLConfig, tiled_decode

TINY = dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, sample_size=32)


def _vae():
    torch.manual_seed(0)
    try:
        import diffusers

        vae = diffusers.AutoencoderKL(**TINY, down_block_types=("DownEncoderBlock2D",) * 2,
                                      up_block_types=("UpDecoderBlock2D",) * 2).eval()
    except ImportError:
        vae = AutoencoderKL(AutoencoderKLConfig(**TINY)).eval()
    with torch.no_grad():
        for p in vae.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return vae


def psnr(x: torch.Tensor, ref: torch.Tensor) -> float:
    mse = (x.double() - ref.double()).square().mean()
    return float(10 * torch.log10((ref.double().max() - ref.double().min()) ** 2 / mse))


def error_maps(tile: int = 16, overlap: float = 0.25) -> list[tuple[str, torch.Tensor, float]]:
    """[(title, error map (H, W), PSNR)] for the three layouts of the module docstring."""
    vae = _vae()
    g = torch.Generator().manual_seed(1)
    z = torch.randn(1, 4, 37, 29, generator=g) * torch.linspace(0.3, 2.0, 29) + torch.linspace(-2, 2, 37)[:, None]
    with torch.no_grad(), fastgen.backend("torch"):
        full = vae.decode(z) if isinstance(vae, AutoencoderKL) else vae.decode(z).sample
        if hasattr(vae, "tiled_decode") and not isinstance(vae, AutoencoderKL):
            vae.tile_latent_min_size, vae.tile_overlap_factor = tile, overlap
            theirs, name = vae.tiled_decode(z).sample, "diffusers tiled_decode"
        else:
            theirs, name = tiled_decode(vae, z, tile, overlap), "diffusers' layout (fastgen blend='linear')"
        blend = tiled_decode(vae, z, tile, overlap, consistent_colors=True, halo=False, progress=False)
        lossless = tiled_decode(vae, z, tile, overlap, consistent_colors=True, progress=False)
    out = []
    for title, img in ((name, theirs), ("fastgen consistent_colors, halo=False", blend),
                       ("fastgen consistent_colors (halo, default)", lossless)):
        out.append((title, (img - full).abs().amax(1)[0], psnr(img, full)))
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="docs/images/vae_error_maps.png")
    args = ap.parse_args(argv)
    maps = error_maps()
    for title, err, db in maps:
        print(f"{title}: PSNR {db:.1f} dB, max |err| {err.max().item():.2e}")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9.0, 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(maps))
    norm = LogNorm(vmin=1e-7, vmax=1.0)
    for ax, (title, err, db) in zip(axes, maps):
        im = ax.imshow(err.clamp_min(1e-7).numpy(), norm=norm, cmap="magma")
        ax.set_title(f"{title}\nPSNR {db:.1f} dB", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(im, ax=list(axes), shrink=0.8, label="|tiled - full| (max over RGB)")
    fig.suptitle("Tiled decode vs full decode: latent 37x29, tile 16, overlap 0.25, fp32 (CPU)", fontsize=9)
    fig.savefig(args.out, dpi=80)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
