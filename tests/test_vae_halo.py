"""The lossless tiled VAE layout (fastgen.vae.halo): tiled decode / encode equal to the full pass.

CPU, fp32, tiny random-weight VAEs (biases enlarged so GroupNorm statistics differ between tiles).
The bar of the issue: PSNR >= 60 dB against the full decode / encode (they agree to summation
order, ~140 dB here), on the issue's case (latent 37x29, tile 16, overlap 0.25), on SD / SDXL /
Flux-shaped configs (4 blocks, f = 8), at odd sizes, with batch > 1. PSNR and the max error are
computed in float64 and fail on NaN.
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close, perturb_biases

import fastgen
from fastgen.vae import AutoencoderKL, AutoencoderKLConfig, flux_config, sd_config, sdxl_config, tiled_decode, tiled_encode
from fastgen.vae.halo import core_bounds, split_segments
from fastgen.vae.tiling import _parts, decoder_steps, encoder_steps

TINY = dict(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, sample_size=32)
SHAPED = dict(block_out_channels=(16, 32, 32, 32), norm_num_groups=8, sample_size=64)  # 4 blocks: f = 8


@pytest.fixture(autouse=True)
def _torch_groupnorm():
    with fastgen.backend("torch"):
        yield


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny convolutions: one intra-op thread (several spin-waiting threads on a shared 2-core machine
    made these tests ~50x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _vae(cfg, seed=0):
    torch.manual_seed(seed)
    return perturb_biases(AutoencoderKL(cfg), seed)


def _latents(n, c, h, w, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, h, w, generator=g) * torch.linspace(0.3, 2.0, w) + torch.linspace(-2, 2, h)[:, None]


def psnr(x, ref):
    """10 log10(range^2 / MSE) in float64; NaN (so every >= fails) when x has NaN / inf."""
    mse = (x.double() - ref.double()).square().mean()
    return float(10 * torch.log10((ref.double().max() - ref.double().min()) ** 2 / mse))


def test_issue_case_latent_37x29_tile_16():
    """The issue's case: diffusers' tiling ~26 dB against the full decode; the lossless layout >= 60 dB,
    on a diffusers AutoencoderKL passed directly and on its fastgen copy."""
    diffusers = pytest.importorskip("diffusers", reason="diffusers' AutoencoderKL is the reference here")
    torch.manual_seed(0)
    dv = perturb_biases(diffusers.AutoencoderKL(
        **TINY, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2))
    m = AutoencoderKL.from_diffusers(dv)
    z = _latents(1, 4, 37, 29)
    with torch.no_grad():
        full = dv.decode(z).sample
        dv.tile_latent_min_size, dv.tile_overlap_factor = 16, 0.25
        theirs = dv.tiled_decode(z).sample
    ours = tiled_decode(dv, z, tile_size=16, overlap=0.25, consistent_colors=True, progress=False)
    ours_m = tiled_decode(m, z, tile_size=16, overlap=0.25, consistent_colors=True, progress=False)
    print(f"\nlatent 37x29, tile 16, overlap 0.25, fp32: diffusers tiled_decode {psnr(theirs, full):.1f} dB, "
          f"fastgen lossless {psnr(ours, full):.1f} dB (diffusers VAE) / {psnr(ours_m, full):.1f} dB (fastgen VAE); "
          f"max |err| {(ours - full).abs().max().item():.2e}")
    assert psnr(theirs, full) < 40  # the case does show the seams
    assert psnr(ours, full) >= 60 and psnr(ours_m, full) >= 60
    assert_close(ours, full, scale=10)
    x = torch.randn(2, 3, 45, 38, generator=torch.Generator().manual_seed(3))  # encode: diffusers' modules too
    with torch.no_grad():
        ref = dv.encode(x).latent_dist.parameters
    assert_close(tiled_encode(dv, x, tile_size=16, consistent_colors=True, progress=False).parameters, ref, scale=10)


@pytest.mark.parametrize("name", ["sd", "sdxl", "flux"])
def test_shaped_configs_decode_and_encode(name):
    """SD / SDXL / Flux-shaped tiny configs (f = 8, 2 resnets per block, mid attention; Flux: 16 latent
    channels, no quant convs), batch 2, sizes that are not multiples of the tile (nor of f for encode)."""
    make = {"sd": sd_config, "sdxl": sdxl_config, "flux": flux_config}[name]
    m = _vae(make(**SHAPED))
    c = m.config.latent_channels
    z = _latents(2, c, 11, 7)
    with torch.no_grad():
        full = m.decode(z)
    out = tiled_decode(m, z, tile_size=6, consistent_colors=True, progress=False)  # cores of 4: 3 x 2 tiles
    assert out.shape == full.shape == (2, 3, 88, 56)
    assert psnr(out, full) >= 60, psnr(out, full)
    x = torch.randn(2, 3, 61, 43, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        mom = m.encode(x).parameters
    post = tiled_encode(m, x, tile_size=24, consistent_colors=True, progress=False)  # 3 latent positions a tile
    assert post.parameters.shape == mom.shape == (2, 2 * c, 7, 5)
    assert psnr(post.parameters, mom) >= 60, psnr(post.parameters, mom)


@pytest.mark.parametrize("h, w, tile", [(1, 9, 3), (4, 4, 3), (7, 10, 5), (13, 5, 6)])
def test_any_size_batch_and_smallest_tile(h, w, tile):
    """Any latent size (a single row, uneven cores), the smallest tile (3 = a core of 1 plus the halo),
    batch 2: equal to the full decode, and a sample equal to decoding it alone."""
    m = _vae(AutoencoderKLConfig(**TINY))
    z = _latents(2, 4, h, w)
    with torch.no_grad():
        full = m.decode(z)
    out = tiled_decode(m, z, tile_size=tile, consistent_colors=True, progress=False)
    assert psnr(out, full) >= 60
    assert_close(out, full, scale=10)
    one = tiled_decode(m, z[1:2], tile_size=tile, consistent_colors=True, progress=False)
    assert_close(one, out[1:2], scale=10)


def test_encode_any_size():
    m = _vae(AutoencoderKLConfig(**TINY))
    for hw in ((37, 30), (9, 23)):
        x = torch.randn(2, 3, *hw, generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            ref = m.encode(x).parameters
        out = tiled_encode(m, x, tile_size=16, consistent_colors=True, progress=False).parameters
        assert out.shape == ref.shape == (2, 8, (hw[0] - 2) // 2 + 1, (hw[1] - 2) // 2 + 1)  # pad 1, stride 2
        assert_close(out, ref, scale=10)


def test_local_attention_option_is_not_lossless():
    """global_attention=False in the halo layout: attention within each core; the rest stays exact,
    so it is close but measurably not equal (the mid-block attention is the only difference)."""
    m = _vae(AutoencoderKLConfig(**TINY))
    z = _latents(1, 4, 12, 9)
    with torch.no_grad():
        full = m.decode(z)
    local = tiled_decode(m, z, tile_size=5, consistent_colors=True, global_attention=False, progress=False)
    assert 15 < psnr(local, full) < 60


def test_segments_hold_one_spatial_step():
    """Every segment: at most one spatial step; GroupNorms, global attention and upsampling open one."""
    for cfg in (AutoencoderKLConfig(**TINY), sd_config(**SHAPED)):
        p = _parts(AutoencoderKL(cfg))
        for steps in (decoder_steps(p), encoder_steps(p)):
            segs = split_segments(steps, global_attention=True)
            assert sum(len(s) for s in segs) == len(steps)
            for s in segs:
                spatial = [op for op in s if (op[0] == "conv" and op[1].kernel_size[0] > 1) or op[0] in ("down", "attn")]
                assert len(spatial) <= 1, [op[0] for op in s]
                assert all(op[0] not in ("gn", "attn", "up") for op in s[1:])
    for total, tile in ((37, 16), (1, 3), (10, 3), (100, 7)):
        b = core_bounds(total, tile)
        assert b[0] == 0 and b[-1] == total and all(b1 - b0 >= 1 for b0, b1 in zip(b, b[1:]))
        assert max(b1 - b0 for b0, b1 in zip(b, b[1:])) <= tile - 2


def test_meta_peak_lossless_offload_bounds_memory():
    """bench_vae.meta_peak (allocated bytes on the meta device): with staged activations on the host the
    lossless decode's peak is far below the full decode's; a 512 px SDXL-config decode, in seconds."""
    import importlib

    from fastgen.cli import _benchmarks_package

    bench = importlib.import_module(_benchmarks_package().__name__ + ".bench_vae")
    full, off = bench.meta_peak(512, "full", tile=24), bench.meta_peak(512, "lossless-offload", tile=24)
    resident = bench.meta_peak(512, "lossless", tile=24)
    # full decode at 512 px: at least the 128-channel bf16 activations at full resolution
    assert full["peak_gib"] * 2**30 >= 2 * 128 * 512 * 512 * 2
    assert off["peak_gib"] < 0.5 * full["peak_gib"] and off["peak_gib"] < resident["peak_gib"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("offload", [True, 0.05, False])
def test_gpu_lossless_staging_sdxl_config(offload):
    """On a GPU the staged activations go through pinned host memory (offload=True), a small device
    budget (part host, part device) or stay on the device: each is the full decode (fp32, >= 60 dB),
    and host staging really bounds the device's peak."""
    torch.manual_seed(0)
    m = AutoencoderKL(sdxl_config()).to("cuda").eval()
    z = torch.randn(1, 4, 64, 48, device="cuda")

    def peak_of(fn):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = fn()
        torch.cuda.synchronize()
        return out, torch.cuda.max_memory_allocated() - base

    with torch.no_grad():
        full, peak_full = peak_of(lambda: m.decode(z))
    out, peak = peak_of(lambda: tiled_decode(m, z, tile_size=24, consistent_colors=True, offload=offload,
                                             progress=False))
    print(f"\noffload={offload}: peak {peak / 2**20:.0f} MiB (full decode {peak_full / 2**20:.0f} MiB), "
          f"PSNR {psnr(out, full):.1f} dB")
    assert out.device.type == "cuda" and psnr(out, full) >= 60, psnr(out, full)
    if offload is True:
        assert peak < 0.5 * peak_full, (peak, peak_full)
