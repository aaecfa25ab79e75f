"""fastgen.vae.AutoencoderKL inside unchanged diffusers pipelines, and the diffusers-facing API.

Tiny random models on CPU, fp32: a DiTPipeline (reads ``vae.decode(z).sample``) and a
StableDiffusionPipeline driven by prompt embeddings (reads ``vae.decode(z, return_dict=False)[0]``,
``vae.config``, ``vae.dtype``, ``vae.device``) give the same images with diffusers' VAE and with
``AutoencoderKL.from_diffusers`` of it; ``enable_tiling()`` switches to the lossless tiling.
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close

import fastgen
from fastgen.vae import AutoencoderKL, AutoencoderKLConfig
from fastgen.vae.autoencoder_kl import DecodedImage, DecoderOutput

TINY = dict(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, sample_size=16)


@pytest.fixture(autouse=True)
def _env():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny shapes on a shared machine
    with fastgen.backend("torch"):
        yield
    torch.set_num_threads(n)


def _diffusers_vae(diffusers):
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(**TINY, down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2).eval()
    with torch.no_grad():
        for p in vae.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return vae


def _dit(diffusers, vae, sample_size=8):
    torch.manual_seed(1)
    tr = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                         num_layers=1, sample_size=sample_size, patch_size=2,
                                         num_embeds_ada_norm=1000, norm_num_groups=8).eval()
    pipe = diffusers.DiTPipeline(transformer=tr, vae=vae, scheduler=diffusers.DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _dit_images(pipe):
    return pipe(class_labels=[1, 3], num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                output_type="pt").images


def test_dit_pipeline_same_images():
    """``DiTPipeline(vae=<fastgen VAE>)`` used to fail (``_execution_device``: no ``vae.device``)."""
    diffusers = pytest.importorskip("diffusers")
    dv = _diffusers_vae(diffusers)
    ref = _dit_images(_dit(diffusers, dv))
    pipe = _dit(diffusers, dv)
    pipe.vae = AutoencoderKL.from_diffusers(dv)  # the swap as a user writes it
    assert isinstance(pipe.vae, AutoencoderKL)
    out = _dit_images(pipe)
    assert out.shape == ref.shape == (2, 3, 16, 16)
    assert ((ref > 0) & (ref < 1)).float().mean() > 0.5  # not a saturated (clamped) image
    assert_close(out, ref)


def test_dit_pipeline_enable_tiling_is_lossless():
    """``vae.enable_tiling()`` in the pipeline: fastgen's lossless tiling, so the same images as the
    untiled diffusers VAE (diffusers' own tiling would differ); slicing changes nothing either."""
    diffusers = pytest.importorskip("diffusers")
    dv = _diffusers_vae(diffusers)
    ref = _dit_images(_dit(diffusers, dv, sample_size=12))
    vae = AutoencoderKL.from_diffusers(dv)
    vae.tile_latent_min_size = 5  # 12x12 latents: 3 x 3 tiles
    vae.enable_tiling()
    vae.enable_slicing()
    calls = []
    real = fastgen.vae.tiling.tiled_decode
    try:
        fastgen.vae.tiling.tiled_decode = lambda *a, **k: calls.append(k) or real(*a, **k)
        out = _dit_images(_dit(diffusers, vae, sample_size=12))
    finally:
        fastgen.vae.tiling.tiled_decode = real
    assert len(calls) == 2 and all(k["consistent_colors"] and k["tile_size"] == 5 for k in calls)  # sliced: 2
    assert_close(out, ref, scale=10)


def test_stable_diffusion_pipeline_same_images():
    """StableDiffusionPipeline (``decode(..., return_dict=False)[0]``, ``vae.config.block_out_channels``,
    ``scaling_factor``), prompt embeddings given so no text encoder is needed."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(2)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        norm_num_groups=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16, attention_head_dim=4).eval()
    dv = _diffusers_vae(diffusers)
    pe = torch.randn(1, 5, 16, generator=torch.Generator().manual_seed(1))

    def run(vae):
        pipe = diffusers.StableDiffusionPipeline(
            vae=vae, text_encoder=None, tokenizer=None, unet=unet,
            scheduler=diffusers.DDIMScheduler(clip_sample=False, steps_offset=1), safety_checker=None, feature_extractor=None,
            requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        return pipe(prompt_embeds=pe, negative_prompt_embeds=torch.zeros_like(pe), height=16, width=16,
                    num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt").images

    ref, out = run(dv), run(AutoencoderKL.from_diffusers(dv))
    assert out.shape == ref.shape == (1, 3, 16, 16)
    assert ((ref > 0) & (ref < 1)).float().mean() > 0.5
    assert_close(out, ref)


def test_diffusers_facing_api_without_diffusers():
    """What pipelines read, checked against fastgen's own math (no diffusers needed)."""
    torch.manual_seed(0)
    m = AutoencoderKL(AutoencoderKLConfig(**TINY)).eval()
    assert m.dtype == torch.float32 and m.device == torch.device("cpu")
    assert m.config.block_out_channels == (16, 32) and m.config.force_upcast and m.config.latents_mean is None
    z = torch.randn(3, 4, 9, 7)
    x = torch.randn(2, 3, 18, 14)
    with torch.no_grad():
        ref = m.decoder(m.post_quant_conv(z))
        out = m.decode(z)
        assert isinstance(out, DecodedImage) and torch.equal(out.sample, out)
        assert type(out.sample) is torch.Tensor and type(out + 1) is torch.Tensor  # ops give plain tensors
        assert_close(out.sample, ref)
        d = m.decode(z, return_dict=True)
        assert isinstance(d, DecoderOutput) and torch.equal(d.sample, d[0])
        (t,) = m.decode(z, return_dict=False)
        assert type(t) is torch.Tensor
        post = m.encode(x)
        assert post.latent_dist is post and m.encode(x, return_dict=False)[0].mean.shape == (2, 4, 9, 7)
        m.enable_tiling()
        m.tile_latent_min_size, m.tile_sample_min_size = 4, 8
        m.enable_slicing()
        assert_close(m.decode(z), ref, scale=10)  # lossless tiles, one sample at a time
        assert_close(m.encode(x).mean, post.mean, scale=10)
        m.disable_tiling()
        m.disable_slicing()
        assert not m.use_tiling and not m.use_slicing
        assert type(m(x, return_dict=False)[0]) is torch.Tensor
