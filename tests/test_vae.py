"""fastgen.vae: AutoencoderKL against diffusers' AutoencoderKL, and the tiled encode / decode.

CPU, tiny configs (2 blocks, factor f = 2), random weights. The torch GroupNorm backend runs
everywhere except one test that runs the Triton kernels (interpreter on CPU). The ``gpu``
tests run an SDXL-sized decode on a GPU machine.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import TRITON_DEVICE, assert_close, requires_gpu

import fastgen
from fastgen.vae import AutoencoderKL, AutoencoderKLConfig, flux_config, sd_config, sdxl_config, tiled_decode, tiled_encode
from fastgen.vae.tiling import _merge, _group_stats, _parts, _run_consistent, decoder_steps, encoder_steps

TINY = dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, sample_size=16)
TILE = 8  # latent positions (diffusers: tile_latent_min_size = sample_size // f = 8)


def _diffusers():
    return pytest.importorskip("diffusers", reason="diffusers is the reference for fastgen.vae (pip install diffusers)")


def _perturb_biases(vae):
    with torch.no_grad():  # larger biases than the init, so GroupNorm statistics differ between tiles
        for p in vae.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return vae


def _diffusers_vae(seed=0, **overrides):
    diffusers = _diffusers()
    cfg = dict(TINY, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    cfg.update(overrides)
    torch.manual_seed(seed)
    return _perturb_biases(diffusers.AutoencoderKL(**cfg).eval())


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


@pytest.fixture(scope="module")
def pair():
    """(diffusers VAE, fastgen copy): the tests that compare against diffusers (skipped without it)."""
    dv = _diffusers_vae()
    return dv, AutoencoderKL.from_diffusers(dv)


@pytest.fixture(scope="module")
def ours():
    """A fastgen VAE alone (random weights, larger biases): the tests that need no diffusers."""
    torch.manual_seed(0)
    return _perturb_biases(AutoencoderKL(AutoencoderKLConfig(**TINY)).eval())


def _latents(n, h, w, c=4, seed=1, dtype=torch.float32):
    """Latents with a spatial trend (like a real image: the sky above, the ground below)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, c, h, w, generator=g) * torch.linspace(0.3, 2.0, w)
    return (z + torch.linspace(-2, 2, h)[:, None]).to(dtype)


def psnr(x, ref):
    mse = (x.double() - ref.double()).square().mean()
    return float(10 * torch.log10((ref.max() - ref.min()).double() ** 2 / mse))


# ----------------------------------------------------------------------------- the model


def test_state_dict_is_diffusers(pair):
    dv, m = pair
    assert set(m.state_dict()) == set(dv.state_dict())
    m2 = AutoencoderKL(AutoencoderKLConfig(**TINY))
    m2.load_state_dict(dv.state_dict())  # strict, as it is
    assert isinstance(m.decoder.up_blocks[0].resnets[0].norm1, fastgen.nn.GroupNorm)
    assert m.decoder.up_blocks[0].resnets[0].norm1.activation == "silu"
    assert m.decoder.mid_block.attentions[0].group_norm.activation is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_matches_diffusers(pair, dtype):
    dv, m = pair
    dv, m = (dv.to(dtype), m.to(dtype)) if dtype != torch.float32 else (dv, m)
    try:
        z = _latents(2, 7, 5, dtype=dtype)
        with torch.no_grad():
            out, ref = m.decode(z), dv.decode(z).sample
        assert out.shape == (2, 3, 14, 10) and out.dtype == dtype
        if dtype == torch.float32:
            assert_close(out, ref)
        else:  # fastgen rounds GroupNorm+SiLU once, diffusers twice: compare against fp32
            ref32 = pair[0].float().decode(z.float()).sample
            assert (out.float() - ref32).abs().max() <= 2 * (ref.float() - ref32).abs().max() + 0.05
    finally:
        dv.float(), m.float()


def test_encode_matches_diffusers(pair):
    dv, m = pair
    x = torch.randn(2, 3, 12, 10, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        post, ref = m.encode(x), dv.encode(x).latent_dist
        assert post.mean.shape == (2, 4, 6, 5)
        assert_close(post.mean, ref.mean)
        assert_close(post.logvar, ref.logvar)
        assert_close(post.std, ref.std)
        s = post.sample(torch.Generator().manual_seed(5))
        assert_close(s, ref.sample(torch.Generator().manual_seed(5)))
        assert torch.equal(post.mode(), post.mean)
        assert post.kl().shape == (2,)
        # round trip: encode -> decode -> the image shape, as diffusers' forward
        assert_close(m(x), dv(x).sample)


def test_configs_and_from_diffusers_flux_like():
    sd, xl, fl = sd_config(), sdxl_config(), flux_config()
    assert sd.latent_channels == 4 and sd.block_out_channels == (128, 256, 512, 512) and sd.downsample_factor == 8
    assert xl.scaling_factor == 0.13025 and xl.sample_size == 1024
    assert fl.latent_channels == 16 and fl.shift_factor == 0.1159 and not fl.use_quant_conv
    dv = _diffusers_vae(latent_channels=16, use_quant_conv=False, use_post_quant_conv=False,
                        scaling_factor=0.3611, shift_factor=0.1159)
    m = AutoencoderKL.from_diffusers(dv)
    assert m.quant_conv is None and m.post_quant_conv is None
    assert m.scaling_factor == 0.3611 and m.shift_factor == 0.1159
    z = _latents(1, 4, 6, c=16)
    assert_close(m.unscale_latents(m.scale_latents(z)), z)
    assert_close(m.scale_latents(z), (z - 0.1159) * 0.3611)
    with torch.no_grad():
        assert_close(m.decode(z), dv.decode(z).sample)
    fm = AutoencoderKL(flux_config(**TINY))
    assert fm.config.latent_channels == 16 and fm.decoder.conv_in.in_channels == 16


def test_from_diffusers_rejects_other_blocks():
    with pytest.raises(ValueError, match="act_fn"):
        AutoencoderKL.config_from_diffusers(dict(TINY, act_fn="gelu"))
    with pytest.raises(ValueError, match="UpDecoderBlock2D"):
        AutoencoderKL.config_from_diffusers(dict(TINY, up_block_types=("AttnUpDecoderBlock2D",)))


def test_decode_triton_groupnorm(ours):
    """The fused Triton GroupNorm+SiLU kernels inside the decoder (interpreter on CPU): same image."""
    m = ours
    z = _latents(1, 3, 2).to(TRITON_DEVICE)
    m = m.to(TRITON_DEVICE)
    try:
        with torch.no_grad():
            ref = m.decode(z)
            with fastgen.backend("triton"):
                out = m.decode(z)
        assert_close(out, ref, scale=10)
    finally:
        m.cpu()


def test_decode_torch_compile_fullgraph(ours):
    """The decoder traces into one graph (fastgen's GroupNorm is a registered custom op)."""
    m = ours
    z = _latents(1, 4, 3)
    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(m.decode, backend="aot_eager", fullgraph=True)(z)
        assert_close(out, m.decode(z))


# ----------------------------------------------------------------------------- tiling


@pytest.mark.parametrize("consistent", [False, True])
def test_single_tile_is_full_decode(pair, consistent):
    dv, m = pair
    z = _latents(2, TILE, TILE - 3)
    with torch.no_grad():
        fulls = (m.decode(z), dv.decode(z).sample)
    for vae, full in zip((m, dv), fulls):
        assert torch.equal(tiled_decode(vae, z, tile_size=TILE, consistent_colors=consistent), full)
    x = torch.randn(1, 3, 16, 12)
    with torch.no_grad():
        assert torch.equal(tiled_encode(m, x, tile_size=16, consistent_colors=consistent).mean, m.encode(x).mean)


@pytest.mark.parametrize("shape", [(2, 20, 13), (1, 16, 9)])
def test_linear_tiling_is_diffusers_tiled_decode(pair, shape):
    dv, m = pair
    z = _latents(*shape)
    assert dv.tile_latent_min_size == TILE and dv.tile_overlap_factor == 0.25
    with torch.no_grad():
        ref = dv.tiled_decode(z).sample
    for vae in (m, dv):  # fastgen's VAE and diffusers' object, directly
        out = tiled_decode(vae, z, tile_size=TILE, overlap=0.25, blend="linear", progress=False)
        assert out.shape == ref.shape == (shape[0], 3, 2 * shape[1], 2 * shape[2])
        assert_close(out, ref)


def test_linear_tiling_is_diffusers_tiled_encode(pair):
    dv, m = pair
    x = torch.randn(2, 3, 44, 30, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = dv._tiled_encode(x)
    post = tiled_encode(m, x, tile_size=16, progress=False)
    assert_close(post.parameters, ref)
    assert_close(tiled_encode(dv, x, tile_size=16, progress=False).mean, post.mean)


def test_consistent_colors_beat_diffusers_tiling(pair):
    """Against the full decode, on a non-multiple size: whole-image GroupNorm statistics win."""
    dv, m = pair
    z = _latents(1, 29, 19)
    with torch.no_grad():
        full = m.decode(z)
        theirs = dv.tiled_decode(z).sample
    kw = dict(tile_size=TILE, consistent_colors=True, halo=False, progress=False)  # the blended layout
    ours = tiled_decode(m, z, **kw)
    ours_cos = tiled_decode(dv, z, blend="cosine", **kw)
    ours_ga = tiled_decode(m, z, global_attention=True, **kw)
    lossless = tiled_decode(dv, z, tile_size=TILE, consistent_colors=True, progress=False)  # the default: halo
    assert ours.shape == theirs.shape == full.shape == lossless.shape
    p_theirs, p_ours, p_cos, p_ga = psnr(theirs, full), psnr(ours, full), psnr(ours_cos, full), psnr(ours_ga, full)
    print(f"\nPSNR vs full decode, latent 29x19, tile {TILE}, overlap 0.25: diffusers tiled_decode "
          f"{p_theirs:.2f} dB; fastgen consistent_colors, halo=False: linear {p_ours:.2f} dB, cosine {p_cos:.2f} dB, "
          f"linear + global_attention {p_ga:.2f} dB; halo=True (default) {psnr(lossless, full):.2f} dB")
    assert p_ours > p_theirs + 1.0
    assert p_cos > p_theirs + 1.0
    assert p_ga > p_ours
    assert psnr(lossless, full) >= 60


def test_consistent_colors_encode(pair):
    dv, m = pair
    x = torch.randn(1, 3, 40, 28, generator=torch.Generator().manual_seed(6))
    x = x + 3 * torch.linspace(-1, 1, 28) + 3 * torch.linspace(-1, 1, 40)[:, None]  # strong trends
    with torch.no_grad():
        full = m.encode(x).mean
        theirs = DiagonalGaussian(dv._tiled_encode(x)).mean
    ours = tiled_encode(m, x, tile_size=16, consistent_colors=True, halo=False, progress=False).mean
    lossless = tiled_encode(m, x, tile_size=16, consistent_colors=True, progress=False).mean
    print(f"\nencode PSNR vs full: diffusers tiled {psnr(theirs, full):.2f} dB, consistent (blend) "
          f"{psnr(ours, full):.2f} dB, lossless {psnr(lossless, full):.2f} dB")
    assert psnr(ours, full) > psnr(theirs, full)
    assert psnr(lossless, full) >= 60
    with pytest.raises(ValueError, match="multiples"):
        tiled_encode(m, x[:, :, :39], tile_size=16, consistent_colors=True, halo=False)


def DiagonalGaussian(moments):
    from fastgen.vae import DiagonalGaussianDistribution

    return DiagonalGaussianDistribution(moments)


@pytest.mark.parametrize("global_attention", [False, True])
def test_layer_by_layer_engine_is_exact_on_one_tile(pair, global_attention):
    """The flat step list with whole-image statistics is the network itself (decoder and encoder)."""
    dv, m = pair
    z = _latents(2, 6, 5)
    x = torch.randn(2, 3, 12, 10)
    args = (64, 0.25, "linear", math.inf, False, "t", global_attention)
    for vae in (m, dv):
        p = _parts(vae)
        with torch.no_grad():
            full = m.decode(z)
            out = _run_consistent(decoder_steps(p), z, (6, 5), 1, 2, *args)
            assert_close(out, full, scale=5)
            mom = _run_consistent(encoder_steps(p), x, (6, 5), 2, 1, *args)
            assert_close(mom, m.encode(x).parameters, scale=5)


def test_global_attention_is_the_full_attention(ours):
    """With whole-image keys / values, every tile's attention output is the full image's, exactly."""
    from fastgen.vae.tiling import _attn_core, _tokens

    m = ours
    a = m.decoder.mid_block.attentions[0]
    h = torch.randn(2, 64, 7, 6)
    with torch.no_grad():
        full = a.core(h)
        kv = (_tokens(a.to_k, h, 1), _tokens(a.to_v, h, 1))
        tile = _attn_core(a, h[:, :, 2:6, 1:4].contiguous(), kv)
        assert_close(tile, full[:, :, 2:6, 1:4])
        import fastgen.vae.tiling as tiling

        old, tiling.ATTN_CHUNK_ELEMENTS = tiling.ATTN_CHUNK_ELEMENTS, 100  # queries in chunks of 1
        try:
            assert_close(_attn_core(a, h, kv), full)
        finally:
            tiling.ATTN_CHUNK_ELEMENTS = old


def test_no_mid_attention():
    dv = _diffusers_vae(mid_block_add_attention=False)
    m = AutoencoderKL.from_diffusers(dv)
    assert m.decoder.mid_block.attentions is None
    z = _latents(1, 6, 5)
    with torch.no_grad():
        full = dv.decode(z).sample
        assert_close(m.decode(z), full)
    for vae in (m, dv):
        out = _run_consistent(decoder_steps(_parts(vae)), z, (6, 5), 1, 2, 64, 0.25, "linear", math.inf, False, "t")
        assert_close(out, full, scale=5)


def test_stats_merge_is_whole_image_float64():
    x = torch.randn(2, 16, 13, 11, dtype=torch.float64) * 3 + 5
    acc = None
    for rows in (slice(0, 4), slice(4, 9), slice(9, 13)):
        for cols in (slice(0, 6), slice(6, 11)):
            acc = _merge(acc, _group_stats(x[:, :, rows, cols], 4))
    n, mean, m2 = acc
    xg = x.reshape(2, 4, -1)
    assert n == xg.shape[-1]
    torch.testing.assert_close(mean, xg.mean(-1), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(m2 / n, xg.var(-1, unbiased=False), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("consistent", [False, True])
def test_batch_is_per_sample(ours, consistent):
    m = ours
    z = _latents(2, 14, 11)
    out = tiled_decode(m, z, tile_size=TILE, consistent_colors=consistent, progress=False)
    for i in range(2):
        one = tiled_decode(m, z[i:i + 1], tile_size=TILE, consistent_colors=consistent, progress=False)
        assert_close(out[i:i + 1], one)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_group_norm_apply_kernel_with_given_stats(dtype, channels_last):
    """The Triton apply pass of the consistent tiling: statistics from elsewhere, one fused pass."""
    from fastgen.kernels.group_norm import group_norm_apply

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 16, 5, 7, generator=g) * 3 + 1).to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    w, b = torch.randn(16, generator=g), torch.randn(16, generator=g)
    xg = x.float().reshape(2, 4, -1)
    mean, var = xg.mean(-1), xg.var(-1, unbiased=False)
    for silu in (False, True):
        ref = F.group_norm(x.float(), 4, w, b, 1e-6)
        ref = (F.silu(ref) if silu else ref).to(dtype)
        x3 = x.to(TRITON_DEVICE).reshape(2, 16, -1)
        y = torch.empty_like(x3)
        group_norm_apply(x3, w.to(TRITON_DEVICE), b.to(TRITON_DEVICE), mean.reshape(-1).to(TRITON_DEVICE),
                         torch.rsqrt(var + 1e-6).reshape(-1).to(TRITON_DEVICE), 4, silu, y=y)
        assert_close(y.reshape(x.shape).cpu(), ref)
        assert y.stride() == x.reshape(2, 16, -1).stride()


@pytest.mark.parametrize("kind", ["fastgen", "diffusers"])
def test_consistent_tiling_triton_apply(ours, kind, monkeypatch):
    """Colour-consistent decode with the Triton GroupNorm kernels (the apply pass given whole-image
    statistics included): the same image as on the torch backend. Both layouts (halo and blend);
    fastgen's VAE, and a diffusers VAE (plain nn.GroupNorm modules: the fastgen.backend default)."""
    import fastgen.kernels.group_norm as kgn

    m = ours
    vae = m
    if kind == "diffusers":
        vae = _diffusers_vae()
        vae.load_state_dict(m.state_dict())
    z = _latents(1, 10, 9).to(TRITON_DEVICE)
    real = kgn.group_norm_apply
    for halo in (True, False):
        ref = tiled_decode(m, z.cpu(), tile_size=TILE, consistent_colors=True, halo=halo, progress=False)
        calls = []
        monkeypatch.setattr(kgn, "group_norm_apply", lambda *a, **kw: calls.append(a[0].shape) or real(*a, **kw))
        try:
            with fastgen.backend("triton"):
                out = tiled_decode(vae.to(TRITON_DEVICE), z, tile_size=TILE, consistent_colors=True, halo=halo,
                                   progress=False)
        finally:
            vae.cpu()
        assert len(calls) > 0  # the GroupNorms with whole-image statistics ran the fused apply
        assert_close(out.cpu(), ref, scale=10)


def test_bf16_tiling(ours):
    import copy

    m = ours
    z = _latents(1, 14, 11)
    ref = tiled_decode(m, z, tile_size=TILE, consistent_colors=True, blend="cosine", halo=False, progress=False)
    mb = copy.deepcopy(m).to(torch.bfloat16)
    out = tiled_decode(mb, z.bfloat16(), tile_size=TILE, consistent_colors=True, blend="cosine", halo=False,
                       progress=False)
    with torch.no_grad():
        full, full_bf16 = m.decode(z), mb.decode(z.bfloat16())
    lossless = tiled_decode(mb, z.bfloat16(), tile_size=TILE, consistent_colors=True, progress=False)
    assert lossless.dtype == torch.bfloat16
    # bf16 lossless tiling: no further from the fp32 full decode than bf16's own full decode (+ margin)
    assert psnr(lossless, full) > psnr(full_bf16, full) - 3
    assert out.dtype == torch.bfloat16
    lin = tiled_decode(mb, z.bfloat16(), tile_size=TILE, progress=False)
    assert lin.dtype == torch.bfloat16 and lin.shape == ref.shape
    assert psnr(out, ref) > 25


def test_tiling_errors(ours):
    m = ours
    bad = torch.randn(1, 16, 20, 20)
    with pytest.raises(ValueError, match="latent_channels=4"):
        tiled_decode(m, bad, tile_size=TILE)
    with pytest.raises(ValueError, match="latent_channels=4"):
        tiled_decode(m, bad, tile_size=TILE, consistent_colors=True)
    with pytest.raises(ValueError, match="in_channels=3"):
        tiled_encode(m, torch.randn(1, 4, 40, 40))
    with pytest.raises(ValueError, match="blend"):
        tiled_decode(m, _latents(1, 20, 20), tile_size=TILE, blend="gaussian")
    for overlap in (0.6, 0.5, -0.1):
        for consistent in (False, True):
            with pytest.raises(ValueError, match=r"overlap .*\[0, 0.5\)"):
                tiled_decode(m, _latents(1, 20, 20), tile_size=TILE, overlap=overlap, consistent_colors=consistent)
    with pytest.raises(ValueError, match="line up"):
        tiled_decode(m, _latents(1, 20, 20), tile_size=5)
    with pytest.raises(ValueError, match="weights are torch.float32"):
        tiled_decode(m, _latents(1, 20, 20).bfloat16(), tile_size=TILE)
    with pytest.raises(ValueError, match="offload"):
        tiled_decode(m, _latents(1, 20, 20), tile_size=TILE, consistent_colors=True, offload="host")
    for offload in (True, 2.0, 0):  # a host-staging budget means nothing for CPU tensors
        with pytest.raises(ValueError, match="only means something for CUDA tensors"):
            tiled_decode(m, _latents(1, 20, 20), tile_size=TILE, consistent_colors=True, offload=offload)
        with pytest.raises(ValueError, match="only means something for CUDA tensors"):
            tiled_encode(m, torch.randn(1, 3, 40, 40), tile_size=16, consistent_colors=True, offload=offload)
    # the halo layout: a tile must hold a core of 1 plus the halo on each side (3 latent positions; 3 f px)
    with pytest.raises(ValueError, match="smaller than the halo it needs.*at least 3 latent positions"):
        tiled_decode(m, _latents(1, 20, 20), tile_size=2, consistent_colors=True)
    with pytest.raises(ValueError, match="smaller than the halo it needs.*at least 6 px"):
        tiled_encode(m, torch.randn(1, 3, 40, 40), tile_size=5, consistent_colors=True)
    assert tiled_decode(m, _latents(1, 5, 4), tile_size=3, consistent_colors=True).shape == (1, 3, 10, 8)
    with pytest.raises(ValueError, match="line up"):
        tiled_encode(m, torch.randn(1, 3, 40, 40), tile_size=18)
    # issue 13: a 37x30 image in the blended layouts is the size rule, not a raw conv error
    with pytest.raises(ValueError, match="multiples of the VAE's factor 2.*37x30"):
        tiled_encode(m, torch.randn(1, 3, 37, 30), tile_size=16)
    with pytest.raises(TypeError, match="AutoencoderKL"):
        tiled_decode(torch.nn.Linear(2, 2), _latents(1, 20, 20))
    with pytest.raises(ValueError, match=r"\(N, 4, H, W\)"):
        m.decode(bad)


def test_tiling_errors_diffusers_vae(pair):
    dv, m = pair
    with pytest.raises(ValueError, match="latent_channels=4"):
        tiled_decode(dv, torch.randn(1, 16, 20, 20), tile_size=TILE)


def test_progress_bar(ours, capsys):
    pytest.importorskip("tqdm", reason="the progress bar is tqdm's")
    m = ours
    z = _latents(1, 16, 16)  # 6 x 6 = 36 tiles > 16: a bar by default
    tiled_decode(m, z, tile_size=4, overlap=0.25)
    assert "tiled_decode" in capsys.readouterr().err
    tiled_decode(m, z, tile_size=4, overlap=0.25, progress=False)
    assert "tiled_decode" not in capsys.readouterr().err


def test_bench_suite_runs_on_cpu():
    """benchmarks/bench_vae.py: every provider's measured function on the CPU case gives the same image."""
    import importlib

    from fastgen.cli import _benchmarks_package

    pytest.importorskip("diffusers", reason="the suite's diffusers providers are compared here")
    bench = importlib.import_module(_benchmarks_package().__name__ + ".bench_vae")
    (case,) = bench.cases("cpu", quick=True)
    outs = {p: bench.setup(p, case, "fwd", "cpu")() for p in bench.PROVIDERS if p not in bench.GPU_ONLY}
    for p in bench.GPU_ONLY:
        with pytest.raises(bench.Unavailable, match="GPU"):
            bench.setup(p, case, "fwd", "cpu")
    assert outs["torch"].shape == (1, 3, 2 * case.shape["h"], 2 * case.shape["w"])
    assert_close(outs["diffusers"], outs["torch"])
    assert_close(outs["fastgen-tiled"], outs["diffusers-tiled"])
    assert_close(outs["fastgen-consistent"], outs["torch"], scale=10)  # lossless
    assert outs["fastgen-blend"].shape == outs["torch"].shape
    assert bench.bytes_moved(case, "fwd") > 0


def test_bench_sweep_writes_table_json_and_plot(tmp_path, capsys):
    """The one-shot size sweep (time, peak memory, PSNR vs the full decode) on CPU sizes."""
    import importlib
    import importlib.util
    import json

    from fastgen.cli import _benchmarks_package

    bench = importlib.import_module(_benchmarks_package().__name__ + ".bench_vae")
    out, png = tmp_path / "s.json", tmp_path / "s.png"
    bench.main(["--sizes", "8", "12", "--tile", "8", "--providers", "torch", "fastgen-consistent",
                "fastgen-blend", "fastgen-triton", "--out", str(out), "--plot", str(png)])
    rows = json.loads(out.read_text())
    assert [(r["provider"], r["image"]) for r in rows] == [
        ("torch", 16), ("fastgen-consistent", 16), ("fastgen-blend", 16), ("fastgen-triton", 16),
        ("torch", 24), ("fastgen-consistent", 24), ("fastgen-blend", 24), ("fastgen-triton", 24)]
    tiled = {r["provider"]: r["psnr_db"] for r in rows if r["image"] == 24 and "psnr_db" in r}
    assert tiled["fastgen-consistent"] >= 60 and tiled["fastgen-blend"] < tiled["fastgen-consistent"]
    assert all(r["ms"] > 0 for r in rows if r["provider"] != "fastgen-triton")
    assert all("needs a CUDA GPU" in r["status"] for r in rows if r["provider"] == "fastgen-triton")
    assert "| fastgen-consistent | 12 | 24 |" in capsys.readouterr().out
    if importlib.util.find_spec("matplotlib") is not None:
        assert png.stat().st_size > 1000


# ----------------------------------------------------------------------------- GPU tier


def _peak(fn):
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    return out, torch.cuda.max_memory_allocated() - base


@pytest.mark.gpu
@requires_gpu
def test_gpu_sdxl_consistent_decode_offload_bounds_memory():
    """SDXL-config VAE (random weights), bf16, 1536 px: offloaded colour-consistent tiling uses far
    less GPU memory than the full decode and gives the same pixels as without offload."""
    torch.manual_seed(0)
    m = AutoencoderKL(sdxl_config()).to("cuda", torch.bfloat16).eval()
    z = torch.randn(1, 4, 192, 192, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        full, peak_full = _peak(lambda: m.decode(z))
    kw = dict(tile_size=48, consistent_colors=True, progress=False)
    resident, _ = _peak(lambda: tiled_decode(m, z, offload=False, **kw))
    out, peak_off = _peak(lambda: tiled_decode(m, z, offload=True, **kw))
    print(f"\npeak GPU memory: full decode {peak_full / 2**30:.2f} GiB, offloaded tiles {peak_off / 2**30:.2f} GiB")
    assert out.shape == full.shape and torch.isfinite(out.float()).all()
    assert peak_off < 0.5 * peak_full
    torch.testing.assert_close(out, resident, atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@requires_gpu
def test_gpu_triton_groupnorm_decode():
    torch.manual_seed(0)
    m = AutoencoderKL(AutoencoderKLConfig(block_out_channels=(64, 128, 128), norm_num_groups=32))
    m = m.to("cuda", torch.bfloat16).eval()
    z = torch.randn(2, 4, 32, 24, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        ref = m.decode(z)
        with fastgen.backend("triton"):
            out = m.decode(z)
    assert psnr(out.float(), ref.float()) > 35


@pytest.mark.gpu
@requires_gpu
def test_gpu_matches_diffusers_bf16():
    dv = _diffusers_vae().to("cuda", torch.bfloat16)
    m = AutoencoderKL.from_diffusers(dv)
    z = _latents(2, 27, 21).to("cuda", torch.bfloat16)
    with torch.no_grad():
        ref = dv.tiled_decode(z).sample
    out = tiled_decode(m, z, tile_size=TILE, progress=False)
    assert psnr(out.float(), ref.float()) > 30


def test_bench_video_sweep_on_cpu(tmp_path):
    """bench_vae --video: CogVideoX's video VAE decode, fastgen and diffusers (tiny config on CPU)."""
    import importlib
    import json

    from fastgen.cli import _benchmarks_package

    bench = importlib.import_module(_benchmarks_package().__name__ + ".bench_vae")
    out = tmp_path / "v.json"
    bench.main(["--video", "--out", str(out)])
    rows = {r["provider"]: r for r in json.loads(out.read_text())}
    assert rows["fastgen-video"]["ms"] > 0
    if "ms" in rows["diffusers-video"]:  # diffusers installed: the same frames
        assert rows["diffusers-video"]["psnr_db_vs_fastgen"] > 100
    else:
        assert "not installed" in rows["diffusers-video"]["status"]
