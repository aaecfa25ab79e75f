"""fastgen.vae.AutoencoderKLCogVideoX against diffusers' AutoencoderKLCogVideoX (tiny config, CPU, fp32).

Frame counts that exercise the frame batching and the causal conv caches (encode: 17 frames = two
chunks; decode: 5 latent frames = chunks of 3 and 2), odd frame counts (first frame kept by the
temporal down / upsampling), batch 2; the fused GroupNorm+SiLU on 5-D activations with the Triton
kernels (interpreter on CPU); the causal conv cache on its own.
"""

from __future__ import annotations

import pytest
import torch
from conftest import INTERPRET, TRITON_DEVICE, assert_close, perturb_biases

import fastgen
from fastgen.vae import AutoencoderKLCogVideoX, CogVideoXVAEConfig
from fastgen.vae.cogvideox import CausalConv3d

TINY = dict(block_out_channels=(16, 32, 32), latent_channels=4, layers_per_block=1, norm_num_groups=8)


@pytest.fixture(autouse=True)
def _env():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    with fastgen.backend("torch"):
        yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def pair():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    dv = perturb_biases(diffusers.AutoencoderKLCogVideoX(
        **TINY, down_block_types=("CogVideoXDownBlock3D",) * 3, up_block_types=("CogVideoXUpBlock3D",) * 3))
    return dv, AutoencoderKLCogVideoX.from_diffusers(dv)


def test_state_dict_and_encode_match_diffusers(pair):
    dv, m = pair
    assert set(m.state_dict()) == set(dv.state_dict())
    x = torch.randn(2, 3, 17, 12, 10, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = dv.encode(x).latent_dist
        post = m.encode(x)
    assert post.mean.shape == ref.mean.shape == (2, 4, 5, 3, 2)
    assert_close(post.parameters, ref.parameters)
    assert post.latent_dist is post


@pytest.mark.parametrize("frames", [5, 1, 4])
def test_decode_matches_diffusers(pair, frames):
    dv, m = pair
    z = torch.randn(2, 4, frames, 3, 4, generator=torch.Generator().manual_seed(frames))
    with torch.no_grad():
        ref = dv.decode(z).sample
        out = m.decode(z)
        (t,) = m.decode(z, return_dict=False)
    assert out.sample.shape == ref.shape and torch.equal(t, out.sample)
    assert_close(out.sample, ref)


def test_causal_conv_cache_equals_one_pass():
    """Chunks with the frame cache give exactly the frames of one long pass (causal in time)."""
    torch.manual_seed(0)
    conv = CausalConv3d(4, 6, 3)
    x = torch.randn(1, 4, 7, 5, 5)
    with torch.no_grad():
        whole, _ = conv(x)
        a, cache = conv(x[:, :, :3])
        b, _ = conv(x[:, :, 3:], cache)
        assert_close(torch.cat([a, b], dim=2), whole)
        # causal: changing a later frame leaves earlier outputs unchanged
        y = x.clone()
        y[:, :, 5] += 1
        assert torch.equal(conv(y)[0][:, :, :5], whole[:, :, :5])


@pytest.mark.skipif(TRITON_DEVICE == "cpu" and not INTERPRET, reason="Triton kernels need a GPU or TRITON_INTERPRET=1")
def test_fused_groupnorm_silu_5d_triton():
    """The encoder's fused GroupNorm+SiLU on 5-D activations, Triton kernels: the same latents."""
    torch.manual_seed(0)
    m = perturb_biases(AutoencoderKLCogVideoX(CogVideoXVAEConfig(**TINY))).to(TRITON_DEVICE)
    x = torch.randn(1, 3, 1, 8, 6).to(TRITON_DEVICE)
    with torch.no_grad():
        ref = m.encode(x).parameters
        with fastgen.backend("triton"):
            out = m.encode(x).parameters
    assert_close(out, ref, scale=10)


def test_errors():
    m = AutoencoderKLCogVideoX(CogVideoXVAEConfig(**TINY))
    with pytest.raises(ValueError, match=r"\(N, 4, t, h, w\)"):
        m.decode(torch.randn(1, 16, 2, 3, 3))
    with pytest.raises(ValueError, match=r"\(N, 3, T, H, W\)"):
        m.encode(torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match="quant convs"):
        AutoencoderKLCogVideoX.config_from_diffusers(dict(TINY, use_quant_conv=True))


def test_cogvideox_pipeline_same_frames():
    """``CogVideoXPipeline(vae=<fastgen video VAE>)`` (reads ``vae.config`` and ``vae.decode(z).sample``),
    prompt embeddings given: the same frames as with diffusers' VAE."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    cfg = dict(block_out_channels=(16, 32), latent_channels=4, layers_per_block=1, norm_num_groups=8,
               temporal_compression_ratio=2)
    dv = perturb_biases(diffusers.AutoencoderKLCogVideoX(**cfg, down_block_types=("CogVideoXDownBlock3D",) * 2,
                                                   up_block_types=("CogVideoXUpBlock3D",) * 2))
    tr = diffusers.CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=8, text_embed_dim=16,
        num_layers=1, sample_width=8, sample_height=8, sample_frames=9, patch_size=2, temporal_compression_ratio=2,
        max_text_seq_length=7).eval()
    pe = torch.randn(1, 7, 16, generator=torch.Generator().manual_seed(1))

    def run(vae):
        pipe = diffusers.CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=tr,
                                           scheduler=diffusers.CogVideoXDDIMScheduler())
        pipe.set_progress_bar_config(disable=True)
        return pipe(prompt_embeds=pe, negative_prompt_embeds=torch.zeros_like(pe), height=16, width=16, num_frames=5,
                    num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt",
                    max_sequence_length=7).frames

    ref, out = run(dv), run(AutoencoderKLCogVideoX.from_diffusers(dv))
    assert out.shape == ref.shape == (1, 5, 3, 16, 16)
    assert ((ref > 0) & (ref < 1)).float().mean() > 0.5
    assert_close(out, ref)
