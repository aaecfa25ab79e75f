"""Lossless spatial + temporal tiling of CogVideoX's video VAE (fastgen.vae.video_tiling).

CPU, fp32, a tiny random-weight AutoencoderKLCogVideoX (3 blocks: f = 4, temporal factor 4; biases
enlarged so GroupNorm statistics differ between tiles and frame chunks). The reference is the
one-pass decode / encode (all frames in one chunk: whole-video GroupNorm statistics). The bar:
PSNR >= 60 dB (they agree to summation order, ~150 dB here) for spatial tiles, frame chunks and
both, at sizes that are no multiple of the tile, batch 2; diffusers' own tiled decode is measured
on the same latent and must be worse. PSNR is computed in float64 and is NaN (failing every >=)
when the output has NaN / inf.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from conftest import perturb_biases

import fastgen
import fastgen.vae.video_tiling as vt
from fastgen.vae import AutoencoderKL, AutoencoderKLConfig, AutoencoderKLCogVideoX, CogVideoXVAEConfig, tiled_decode, \
    tiled_encode

TINY = dict(block_out_channels=(16, 32, 32), latent_channels=4, layers_per_block=1, norm_num_groups=8)


@pytest.fixture(autouse=True)
def _env():
    """Tiny convolutions: one intra-op thread (the machine is shared), the torch GroupNorm."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    with fastgen.backend("torch"):
        yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    return perturb_biases(AutoencoderKLCogVideoX(CogVideoXVAEConfig(**TINY)))


@pytest.fixture
def cores(monkeypatch):
    """The (time, height, width) core bounds of each tiled run: proof that it was tiled."""
    seen = []
    run = vt.run_halo

    def spy(steps, x, lat, c, *args, **kwargs):
        seen.append([len(b) - 1 for b in c])
        return run(steps, x, lat, c, *args, **kwargs)

    monkeypatch.setattr(vt, "run_halo", spy)
    return seen


def _randn(*shape, seed=1):
    g = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(-1, 1, shape[-2])[:, None]
    return torch.randn(*shape, generator=g) * torch.linspace(0.3, 2.0, shape[-1]) + ramp


def psnr(x, ref):
    """10 log10(range^2 / MSE) in float64; NaN (so every >= fails) when x has NaN / inf."""
    assert x.shape == ref.shape, (x.shape, ref.shape)
    mse = (x.double() - ref.double()).square().mean()
    return float(10 * torch.log10((ref.double().max() - ref.double().min()) ** 2 / mse))


@torch.no_grad()
def onepass_decode(vae, z):
    old, vae.num_latent_frames_batch_size = vae.num_latent_frames_batch_size, z.shape[2]
    try:
        return vae.decode(z).sample
    finally:
        vae.num_latent_frames_batch_size = old


@torch.no_grad()
def onepass_encode(vae, x):
    old, vae.num_sample_frames_batch_size = vae.num_sample_frames_batch_size, x.shape[2]
    try:
        return vae.encode(x).latent_dist.parameters
    finally:
        vae.num_sample_frames_batch_size = old


@pytest.mark.parametrize("mode, tile, chunk", [("spatial", 4, 100), ("temporal", 100, 2), ("both", (3, 4), 2)])
def test_decode_equals_onepass(vae, cores, mode, tile, chunk):
    """Latent 5 x 7 x 9 (video 17 x 28 x 36), batch 2: tiles of 4 / 3 x 4 latent positions, chunks of 2 latent
    frames."""
    z = _randn(2, 4, 5, 7, 9)
    ref = onepass_decode(vae, z)
    out = tiled_decode(vae, z, tile_size=tile, frame_chunk=chunk, progress=False)
    nt, ny, nx = cores[-1]
    assert (nt > 1, ny * nx > 1) == (mode != "spatial", mode != "temporal"), cores
    assert out.shape == ref.shape == (2, 3, 17, 28, 36)
    assert psnr(out, ref) >= 60, psnr(out, ref)


@pytest.mark.parametrize("mode, tile, chunk, frames", [("spatial", 12, 100, 9), ("temporal", 1000, 4, 8),
                                                       ("both", (12, 16), 4, 9)])
def test_encode_equals_onepass(vae, cores, mode, tile, chunk, frames):
    """Video 9 (odd: first frame kept) or 8 (even) frames of 26 x 22 px (no multiple of f = 4 or the tile), batch 2."""
    x = _randn(2, 3, frames, 26, 22)
    ref = onepass_encode(vae, x)
    post = tiled_encode(vae, x, tile_size=tile, frame_chunk=chunk, progress=False)
    nt, ny, nx = cores[-1]
    assert (nt > 1, ny * nx > 1) == (mode != "spatial", mode != "temporal"), cores
    assert post.parameters.shape == ref.shape
    assert psnr(post.parameters, ref) >= 60, psnr(post.parameters, ref)


def test_bf16_no_worse_than_bf16_onepass(vae):
    """bf16 weights and latents: the tiled decode is no further from the fp32 one-pass decode than bf16's own one-pass
    decode (+ 3 dB), and stays bf16."""
    import copy

    z = _randn(1, 4, 5, 7, 9)
    vb = copy.deepcopy(vae).to(torch.bfloat16)
    full, full_bf16 = onepass_decode(vae, z), onepass_decode(vb, z.bfloat16())
    out = tiled_decode(vb, z.bfloat16(), tile_size=4, frame_chunk=2, progress=False)
    assert out.dtype == torch.bfloat16
    assert psnr(out, full) > psnr(full_bf16, full) - 3, (psnr(out, full), psnr(full_bf16, full))


def test_frame_cache_is_the_time_halo(vae):
    """A frame chunk reads the k_t - 1 frames before it: exactly the causal conv's frame cache (and at
    frame 0 the first frame repeated, as the module pads without a cache)."""
    m = vae.decoder.mid_block.resnets[0].conv1
    x = _randn(2, 32, 7, 5, 6)
    step = vt.CausalConv(m)
    with torch.no_grad():
        full, _ = m(x)
        _, cache = m(x[:, :, :3])
        chunk, _ = m(x[:, :, 3:], cache)
        halo, reg = step.run(x[:, :, 1:], [(1, 7), (0, 5), (0, 6)], [7, 5, 6], None)
        first, reg0 = step.run(x[:, :, :3], [(0, 3), (0, 5), (0, 6)], [7, 5, 6], None)
    assert torch.equal(cache, x[:, :, 1:3])  # the cache holds the last k_t - 1 input frames
    assert reg == [(3, 7), (0, 5), (0, 6)] and reg0 == [(0, 3), (0, 5), (0, 6)]
    torch.testing.assert_close(halo, chunk)
    torch.testing.assert_close(halo, full[:, :, 3:])
    torch.testing.assert_close(first, full[:, :, :3])


def test_better_than_diffusers_tiled_decode(vae, cores):
    """diffusers' enable_tiling() (blended tiles, per-tile and per-chunk statistics) against fastgen's lossless
    tiling on the same latent, both measured against diffusers' own one-pass decode; fastgen also takes the
    diffusers module directly."""
    diffusers = pytest.importorskip("diffusers", reason="diffusers' AutoencoderKLCogVideoX is the reference here")
    dv = diffusers.AutoencoderKLCogVideoX(**TINY, down_block_types=("CogVideoXDownBlock3D",) * 3,
                                          up_block_types=("CogVideoXUpBlock3D",) * 3).eval()
    dv.load_state_dict(vae.state_dict())
    z = _randn(1, 4, 5, 11, 13)
    with torch.no_grad():
        dv.num_latent_frames_batch_size = 5
        ref = dv.decode(z).sample  # one pass
        dv.num_latent_frames_batch_size = 2
        dv.enable_tiling(tile_sample_min_height=24, tile_sample_min_width=20)  # 6 x 5 latent tiles
        theirs = dv.decode(z).sample
    ours = tiled_decode(dv, z, tile_size=(6, 5), frame_chunk=2, progress=False)
    ours_m = tiled_decode(vae, z, tile_size=(6, 5), frame_chunk=2, progress=False)
    assert all(nt > 1 and ny * nx > 1 for nt, ny, nx in cores), cores
    p_theirs, p_ours, p_m = psnr(theirs, ref), psnr(ours, ref), psnr(ours_m, ref)
    print(f"\nPSNR vs one-pass decode: diffusers tiled {p_theirs:.1f} dB, fastgen {p_ours:.1f} dB ({p_m:.1f} dB)")
    assert p_ours >= 60 and p_m >= 60, (p_ours, p_m)
    assert p_theirs < p_ours - 30, (p_theirs, p_ours)


def test_enable_tiling_switches_decode_and_encode(vae, cores):
    """enable_tiling() (diffusers' switch): inputs above one tile go through the lossless tiling."""
    z, x = _randn(1, 4, 3, 6, 5), _randn(1, 3, 9, 22, 18)
    ref_z, ref_x = onepass_decode(vae, z), onepass_encode(vae, x)
    vae.enable_tiling(tile_sample_min_height=16, tile_sample_min_width=16)
    try:
        assert (vae.tile_latent_min_height, vae.tile_latent_min_width) == (4, 4)
        with torch.no_grad():
            out = vae.decode(z).sample
            post = vae.encode(x).latent_dist
    finally:
        vae.disable_tiling()
    assert len(cores) == 2 and all(ny * nx > 1 for _, ny, nx in cores), cores
    assert psnr(out, ref_z) >= 60 and psnr(post.parameters, ref_x) >= 60


def test_errors(vae):
    z = _randn(1, 4, 3, 6, 5)

    def raises(match, fn):
        with pytest.raises(ValueError, match=match):
            fn()

    raises(r"smaller than the halo.*at least 3 latent positions", lambda: tiled_decode(vae, z, tile_size=2))
    raises(r"smaller than the halo.*at least 3 latent positions", lambda: tiled_decode(vae, z, tile_size=(5, 2)))
    raises(r"smaller than the halo.*at least 12 px", lambda: tiled_encode(vae, _randn(1, 3, 5, 16, 16), tile_size=8))
    for bad in (0.5, -0.1):
        raises(r"overlap.*\[0, 0\.5\)", lambda: tiled_decode(vae, z, tile_size=4, overlap=bad))
    raises(r"16 channels.*latent_channels=4", lambda: tiled_decode(vae, _randn(1, 16, 3, 6, 5)))
    raises(r"5-D", lambda: tiled_decode(vae, _randn(1, 4, 6, 5)))
    raises(r"frame_chunk must be a positive int", lambda: tiled_decode(vae, z, tile_size=4, frame_chunk=0))
    raises(r"lossless layout only", lambda: tiled_decode(vae, z, tile_size=4, halo=False))
    raises(r"offload", lambda: tiled_decode(vae, z, tile_size=4, offload=True))
    image_vae = AutoencoderKL(AutoencoderKLConfig(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8))
    raises(r"frame_chunk is for video VAEs", lambda: tiled_decode(image_vae, _randn(1, 4, 6, 5), frame_chunk=2))


def test_meta_peak_bounded_by_the_tile():
    """Allocated bytes on the meta device (bench_vae.video_meta_peak): with staged activations in host memory the
    tiled decode's device peak above its output stays the same when the video grows 2 x 2 x 2 (it is one tile's
    working set), and is far below the one-pass decode's."""
    from fastgen.cli import _benchmarks_package

    bench = importlib.import_module(_benchmarks_package().__name__ + ".bench_vae")
    cfg, f32 = CogVideoXVAEConfig(**TINY), torch.float32
    small, big = (3, 12, 12), (5, 24, 24)  # video 9 x 48 x 48 and 17 x 96 x 96
    full = bench.video_meta_peak(big, "onepass", config=cfg, dtype=f32)
    tiled = {lat: bench.video_meta_peak(lat, "lossless-offload", tile=8, frame_chunk=2, config=cfg, dtype=f32)
             for lat in (small, big)}
    work = {lat: r["peak_gib"] - r["output_gib"] for lat, r in tiled.items()}
    assert full["peak_gib"] >= 2 * 32 * 17 * 96 * 96 * 4 / 2**30  # two 32-channel fp32 activations of the video
    assert 0 < work[big] <= 1.25 * work[small], work
    assert tiled[big]["peak_gib"] < 0.25 * full["peak_gib"], (tiled[big], full)


def test_triton_groupnorm_apply_on_video_tiles(vae, monkeypatch):
    """On the Triton backend each GroupNorm (+ SiLU) with whole-video statistics is the fused apply kernel
    (interpreter on CPU tensors, compiled on a GPU), on 5-D strided tile regions: the torch backend's result."""
    from conftest import TRITON_DEVICE, assert_close

    import fastgen.kernels.group_norm as kgn

    z = _randn(1, 4, 2, 3, 3)  # two frame chunks of one tile (each apply launch costs time in the interpreter)
    ref = tiled_decode(vae, z, tile_size=5, frame_chunk=1, progress=False)
    real, calls = kgn.group_norm_apply, []
    monkeypatch.setattr(kgn, "group_norm_apply", lambda *a, **kw: calls.append(a[0].shape) or real(*a, **kw))
    try:
        with fastgen.backend("triton"):
            out = tiled_decode(vae.to(TRITON_DEVICE), z.to(TRITON_DEVICE), tile_size=5, frame_chunk=1, progress=False)
    finally:
        vae.cpu()
    assert len(calls) > 0 and all(len(s) == 3 for s in calls)  # (N, C, T * H * W) regions of 5-D tiles
    assert_close(out.cpu(), ref, scale=10)
    assert psnr(out.cpu(), onepass_decode(vae, z)) >= 60


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("offload", [True, False])
def test_gpu_video_tiling_staging(offload):
    """On a GPU: staged activations in pinned host memory (offload=True) or on the device; each is the one-pass
    decode (fp32, >= 60 dB), and host staging really bounds the device's peak."""
    torch.manual_seed(0)
    m = perturb_biases(AutoencoderKLCogVideoX(CogVideoXVAEConfig(**TINY))).cuda()
    z = _randn(1, 4, 5, 24, 32).cuda()

    def peak_of(fn):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = fn()
        torch.cuda.synchronize()
        return out, torch.cuda.max_memory_allocated() - base

    full, peak_full = peak_of(lambda: onepass_decode(m, z))
    out, peak = peak_of(lambda: tiled_decode(m, z, tile_size=8, frame_chunk=2, offload=offload, progress=False))
    print(f"\noffload={offload}: peak {peak / 2**20:.0f} MiB (one pass {peak_full / 2**20:.0f} MiB), "
          f"PSNR {psnr(out, full):.1f} dB")
    assert out.device.type == "cuda" and psnr(out, full) >= 60, psnr(out, full)
    if offload:
        assert peak < 0.5 * peak_full, (peak, peak_full)
