"""``fastgen.patch(pipe, models=True)`` and ``fastgen.patch(pipe, adapters=PATH)`` on tiny diffusers pipelines.

Tiny random components built offline (the models tests' builders), CPU, fp32, same seed:

- models=True: the DiT, PixArt, Stable Diffusion, SD 3.5, Flux and CogVideoX pipelines give the same images with their
  transformer / unet and VAE replaced by fastgen's models; the report names each swap and each
  component left alone (with why); ``unpatch`` puts the very same modules back and the images
  are the original ones again; ``is_patched`` follows.
- adapters=PATH: a LoRA saved by fastgen in diffusers format, run unmerged by the patch, gives
  the images diffusers' own ``load_lora_weights`` gives on the same pipeline; ``unpatch``
  removes it (images, ``requires_grad`` and modules as before).
"""

from __future__ import annotations

import copy

import pytest
import torch

import fastgen
import fastgen.patch as fp
from conftest import INTERPRET

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"),
              pytest.mark.filterwarnings("ignore:Already found a `peft_config`:UserWarning")]


@pytest.fixture(autouse=True)
def _env():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny shapes on a shared machine
    with fastgen.backend("torch"):  # the fastgen VAE's ops: the reference (no interpreter launches)
        yield
    torch.set_num_threads(n)


def rel_err(a, b) -> float:
    """max |a - b| / max |b|; inf on NaN / inf in ``a``."""
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def _vae(diffusers, **over):
    torch.manual_seed(0)
    kw = dict(block_out_channels=(8,), norm_num_groups=4, latent_channels=4, down_block_types=("DownEncoderBlock2D",),
              up_block_types=("UpDecoderBlock2D",))
    vae = diffusers.AutoencoderKL(**{**kw, **over}).eval()
    with torch.no_grad():  # non-trivial norm affines and biases
        for p in vae.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return vae


def _dit_pipe(diffusers, vae=None):
    torch.manual_seed(1)
    tr = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                         num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=1000).eval()
    pipe = diffusers.DiTPipeline(transformer=tr, vae=vae if vae is not None else _vae(diffusers),
                                 scheduler=diffusers.DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _dit_images(pipe):
    return pipe(class_labels=[1, 3], num_inference_steps=2, guidance_scale=2.0,
                generator=torch.Generator().manual_seed(0), output_type="pt").images


def test_dit_pipeline_models_swap_and_unpatch():
    diffusers = pytest.importorskip("diffusers")
    from fastgen.models import DiT
    from fastgen.vae import AutoencoderKL

    pipe = _dit_pipe(diffusers)
    tr, vae = pipe.transformer, pipe.vae
    want = _dit_images(pipe)
    assert not fp.is_patched(pipe)
    report = fastgen.patch(pipe, backend="torch")  # without models=True: the swap is offered in a note
    assert any("models=True) would replace transformer (DiTTransformer2DModel -> fastgen.models.DiT), vae" in n
               for n in report.notes)
    assert pipe.transformer is tr

    report = fastgen.patch(pipe, models=True, backend="torch")
    assert isinstance(pipe.transformer, DiT) and isinstance(pipe.vae, AutoencoderKL)
    assert pipe.components["transformer"] is pipe.transformer  # the pipeline's registry follows
    rows = {r.path: (r.before, r.after) for r in report.replaced}
    assert rows == {"transformer": ("diffusers.DiTTransformer2DModel", "fastgen.models.DiT"),
                    "vae": ("diffusers.AutoencoderKL", "fastgen.vae.AutoencoderKL")}
    assert "fastgen.models.DiT" in str(report)
    assert fp.is_patched(pipe)
    got = _dit_images(pipe)
    assert got.shape == want.shape == (2, 3, 8, 8)
    assert ((want > 0) & (want < 1)).float().mean() > 0.5  # not a saturated (clamped) image
    assert rel_err(got, want) <= 1e-5

    # patching again re-patches from the originals (no fastgen model of a fastgen model)
    fastgen.patch(pipe, models=True, backend="torch")
    assert isinstance(pipe.transformer, DiT)
    fp.unpatch(pipe)
    assert pipe.transformer is tr and pipe.vae is vae and pipe.components["vae"] is vae
    assert not fp.is_patched(pipe)
    assert torch.equal(torch.as_tensor(_dit_images(pipe)), torch.as_tensor(want))  # the very same modules again


def test_component_left_alone_is_reported_and_strict_raises():
    """A VAE fastgen's AutoencoderKL refuses (act_fn gelu) stays the diffusers one, patched module by
    module, and the report says why; strict=True raises and leaves the pipeline as it was."""
    diffusers = pytest.importorskip("diffusers")
    from fastgen.models import DiT

    pipe = _dit_pipe(diffusers, vae=_vae(diffusers, act_fn="gelu"))
    want = _dit_images(pipe)
    vae = pipe.vae
    report = fastgen.patch(pipe, models=True, backend="torch")
    assert isinstance(pipe.transformer, DiT) and pipe.vae is vae
    why = {s.path: s.reason for s in report.skipped}
    assert "act_fn" in why["vae"] and "AutoencoderKL.from_diffusers refused" in why["vae"]
    assert any(p.startswith("vae.") for p in report.paths())  # its norms / attention patched as usual
    assert rel_err(_dit_images(pipe), want) <= 1e-5
    fp.unpatch(pipe)
    assert not fp.is_patched(pipe)

    tr = pipe.transformer
    with pytest.raises(fp.PatchError, match="act_fn"):
        fastgen.patch(pipe, models=True, backend="torch", strict=True)
    assert pipe.transformer is tr and not fp.is_patched(pipe)


def test_models_errors():
    diffusers = pytest.importorskip("diffusers")
    pipe = _dit_pipe(diffusers)
    with pytest.raises(TypeError, match="from_diffusers"):
        fastgen.patch(pipe.transformer, models=True)
    with pytest.raises(ValueError, match="merged"):
        fastgen.patch(pipe, models=True, adapters="x.safetensors")
    assert not fp.is_patched(pipe)


def _tiny_sd(tmp_path, diffusers):
    """StableDiffusionPipeline: the UNet / CLIP builders of test_models_unet (CFG-doubled batch)."""
    from test_models_unet import _kwargs, _tiny_clip

    torch.manual_seed(0)
    tok, enc = _tiny_clip(tmp_path, projection=False)
    unet = diffusers.UNet2DConditionModel(**{**_kwargs("sd15"), "cross_attention_dim": 16}).eval()
    sched = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                    clip_sample=False, steps_offset=1)
    pipe = diffusers.StableDiffusionPipeline(vae=_vae(diffusers, block_out_channels=(32,), norm_num_groups=8),
                                             text_encoder=enc, tokenizer=tok, unet=unet, scheduler=sched,
                                             safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _sd_images(pipe):
    return pipe("a cat", num_inference_steps=2, height=16, width=16, output_type="pt",
                generator=torch.Generator().manual_seed(0)).images


def test_stable_diffusion_pipeline_models_swap(tmp_path):
    """unet -> UNet2DCondition, vae -> AutoencoderKL; the CLIP text encoder has no fastgen model:
    reported as such and patched module by module."""
    diffusers = pytest.importorskip("diffusers")
    from fastgen.models import UNet2DCondition

    pipe = _tiny_sd(tmp_path, diffusers)
    unet = pipe.unet
    want = _sd_images(pipe)
    report = fastgen.patch(pipe, models=True, backend="torch")
    assert isinstance(pipe.unet, UNet2DCondition)
    assert {r.path for r in report.replaced if not r.path.startswith("text_encoder")} == {"unet", "vae"}
    assert any(p.startswith("text_encoder.") for p in report.paths())
    got = _sd_images(pipe)
    assert got.shape == want.shape == (1, 3, 16, 16)
    assert rel_err(got, want) <= 1e-5
    fp.unpatch(pipe)
    assert pipe.unet is unet and not fp.is_patched(pipe)
    assert torch.equal(torch.as_tensor(_sd_images(pipe)), torch.as_tensor(want))


def test_flux_pipeline_models_swap(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    from test_models_flux import DEV, randomize
    from test_models_sd3 import tiny_text_encoders, tiny_tokenizers, tiny_vae

    from fastgen.models import Flux
    from fastgen.vae import AutoencoderKL

    clip_tok, t5_tok = tiny_tokenizers(tmp_path)
    (clip,), t5 = tiny_text_encoders(clip_hidden=(10,), t5_dim=12)
    ref = randomize(diffusers.FluxTransformer2DModel(**dict(DEV, in_channels=16, num_layers=1, num_single_layers=1)),
                    std=0.1).eval()
    pipe = diffusers.FluxPipeline(transformer=ref, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(),
                                  vae=tiny_vae(4), text_encoder=clip, tokenizer=clip_tok, text_encoder_2=t5,
                                  tokenizer_2=t5_tok)
    pipe.set_progress_bar_config(disable=True)

    def images():
        return pipe("a photo of a red cat", height=16, width=24, num_inference_steps=1, guidance_scale=3.5,
                    max_sequence_length=8, generator=torch.Generator().manual_seed(0), output_type="pt").images

    want = images()
    report = fastgen.patch(pipe, models=True, backend="torch")
    assert isinstance(pipe.transformer, Flux) and isinstance(pipe.vae, AutoencoderKL)
    assert report.count("fastgen.models.Flux") == 1 and report.count("fastgen.vae.AutoencoderKL") == 1
    got = images()
    assert got.shape == (1, 3, 16, 24)
    assert rel_err(got, want) <= 1e-5
    fp.unpatch(pipe)
    assert pipe.transformer is ref and not fp.is_patched(pipe)


def test_sd35_pipeline_models_swap(tmp_path):
    """SD 3.5 layout (dual attention layers, RMS qk-norm), three text encoders, CFG: transformer and
    VAE swapped, the CLIP / T5 encoders patched module by module; the same images."""
    diffusers = pytest.importorskip("diffusers")
    from test_models_sd3 import SD35, randomize, tiny_text_encoders, tiny_tokenizers, tiny_vae

    from fastgen.models import SD3

    clip_tok, t5_tok = tiny_tokenizers(tmp_path)
    (clip1, clip2), t5 = tiny_text_encoders(clip_hidden=(8, 8), projection=True, t5_dim=16)
    ref = randomize(diffusers.SD3Transformer2DModel(**dict(SD35, pooled_projection_dim=16, joint_attention_dim=16)),
                    std=0.1).eval()
    pipe = diffusers.StableDiffusion3Pipeline(
        transformer=ref, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=tiny_vae(4),
        text_encoder=clip1, tokenizer=clip_tok, text_encoder_2=clip2, tokenizer_2=clip_tok,
        text_encoder_3=t5, tokenizer_3=t5_tok)
    pipe.set_progress_bar_config(disable=True)

    def images():
        return pipe("a photo of a red cat", negative_prompt="a dog", height=16, width=24, num_inference_steps=1,
                    guidance_scale=4.0, max_sequence_length=8, generator=torch.Generator().manual_seed(0),
                    output_type="pt").images

    want = images()
    report = fastgen.patch(pipe, models=True, backend="torch")
    assert isinstance(pipe.transformer, SD3)
    assert report.count("fastgen.models.SD3") == 1 and report.count("fastgen.vae.AutoencoderKL") == 1
    assert any(p.startswith("text_encoder.") for p in report.paths())  # CLIP LayerNorms (T5 has its own norm class)
    got = images()
    assert got.shape == (1, 3, 16, 24)
    assert rel_err(got, want) <= 1e-5
    fp.unpatch(pipe)
    assert pipe.transformer is ref and not fp.is_patched(pipe)


def test_pixart_pipeline_models_swap(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    from test_models_pixart import _diffusers, _tiny_t5_tokenizer

    from fastgen.models import PixArt

    torch.manual_seed(0)
    t5 = transformers.T5EncoderModel(transformers.T5Config(vocab_size=11, d_model=20, d_kv=8, d_ff=32, num_layers=1,
                                                           num_heads=2, pad_token_id=0, eos_token_id=1)).eval()
    ref = _diffusers(use_additional_conditions=False)
    pipe = diffusers.PixArtAlphaPipeline(tokenizer=_tiny_t5_tokenizer(tmp_path), text_encoder=t5,
                                         vae=_vae(diffusers), transformer=ref, scheduler=diffusers.DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    kw = dict(prompt=["a red cat", "the blue dog on the moon"], num_inference_steps=2, guidance_scale=3.0,
              height=8, width=8, output_type="pt", use_resolution_binning=False, clean_caption=False,
              max_sequence_length=8)
    want = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    report = fastgen.patch(pipe, models=True, backend="torch")
    assert isinstance(pipe.transformer, PixArt) and report.count("fastgen.models.PixArt") == 1
    got = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    assert got.shape == want.shape == (2, 3, 8, 8)
    assert rel_err(got, want) <= 1e-5
    fp.unpatch(pipe)
    assert pipe.transformer is ref and not fp.is_patched(pipe)


def test_cogvideox_pipeline_models_swap():
    """transformer -> fastgen.models.CogVideoX, vae -> fastgen.vae.AutoencoderKLCogVideoX (prompt
    embeddings given, CFG, 2 steps): the same frames."""
    diffusers = pytest.importorskip("diffusers")
    from fastgen.models import CogVideoX
    from fastgen.vae import AutoencoderKLCogVideoX

    torch.manual_seed(0)
    vae = diffusers.AutoencoderKLCogVideoX(block_out_channels=(16, 32), latent_channels=4, layers_per_block=1,
                                           norm_num_groups=8, temporal_compression_ratio=2,
                                           down_block_types=("CogVideoXDownBlock3D",) * 2,
                                           up_block_types=("CogVideoXUpBlock3D",) * 2).eval()
    tr = diffusers.CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=8, text_embed_dim=16,
        num_layers=1, sample_width=8, sample_height=8, sample_frames=9, patch_size=2, temporal_compression_ratio=2,
        max_text_seq_length=7).eval()
    with torch.no_grad():
        for p in list(tr.parameters()) + [p for p in vae.parameters() if p.dim() == 1]:
            p.add_(0.1 * torch.randn_like(p))
    pipe = diffusers.CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=tr,
                                       scheduler=diffusers.CogVideoXDDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    pe = torch.randn(1, 7, 16, generator=torch.Generator().manual_seed(1))

    def frames():
        return pipe(prompt_embeds=pe, negative_prompt_embeds=torch.zeros_like(pe), height=16, width=16, num_frames=5,
                    num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt",
                    max_sequence_length=7).frames

    want = frames()
    report = fastgen.patch(pipe, models=True, backend="torch")
    assert isinstance(pipe.transformer, CogVideoX) and isinstance(pipe.vae, AutoencoderKLCogVideoX)
    assert sorted(report.paths()) == ["transformer", "vae"]
    got = frames()
    assert got.shape == want.shape == (1, 5, 3, 16, 16)
    assert ((want > 0) & (want < 1)).float().mean() > 0.5
    assert rel_err(got, want) <= 1e-5
    fp.unpatch(pipe)
    assert pipe.transformer is tr and pipe.vae is vae and not fp.is_patched(pipe)


# ----------------------------------------------------------------------------- adapters=PATH


def test_adapter_file_unmerged_equals_diffusers_load_lora_weights(tmp_path):
    """A LoRA (attention + feed-forward + LoCoN convs) saved by fastgen in diffusers format:
    ``fastgen.patch(pipe, adapters=path)`` gives diffusers' own ``load_lora_weights`` images."""
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("peft")  # diffusers' LoRA loader runs on peft
    import fastgen.adapters as A

    pipe = _tiny_sd(tmp_path, diffusers)
    base = _sd_images(pipe)
    unet = pipe.unet
    trainer = copy.deepcopy(unet)
    A.add_adapter(trainer, "style", rank=2, alpha=3.0, targets="attention+ff")
    A.add_adapter(trainer, "convs", rank=2, targets=["resnets.0.conv1"])
    torch.manual_seed(3)
    with torch.no_grad():
        for p in A.adapter_parameters(trainer):
            p.normal_(0.0, 0.3)
    path = tmp_path / "style.safetensors"
    A.save(trainer, path, format="diffusers", name="style")
    conv_path = tmp_path / "convs.safetensors"
    A.save(trainer, conv_path, format="diffusers", name="convs")

    theirs = _tiny_sd(tmp_path, diffusers)
    theirs.load_lora_weights(str(path), adapter_name="style")
    want = _sd_images(theirs)
    assert rel_err(want, base) > 1e-3, "the adapter must change the images"

    flags = {n: p.requires_grad for n, p in unet.named_parameters()}
    report = fastgen.patch(pipe, adapters=path, attention=False, norms=False, activations=False)
    rows = [r for r in report.replaced if "fastgen.adapters" in r.after]
    assert [r.path for r in rows] == ["unet"] and "'style'" in rows[0].after and "unmerged" in rows[0].after
    assert fp.is_patched(pipe) and A.adapter_names(pipe.unet) == ["style"]
    assert pipe.unet is unet  # unmerged, on the diffusers model itself
    got = _sd_images(pipe)
    assert rel_err(got, want) <= 1e-5

    # with the ops patched too, and two files (a LoCoN conv adapter besides), each with its own name
    report = fastgen.patch(pipe, adapters=[path, conv_path], adapter_scale=0.5, backend="torch")
    assert A.adapter_names(pipe.unet) == ["style", "convs"]
    assert report.count("fastgen.adapters") == 2 and report.count("fastgen.ops") > 0
    theirs.load_lora_weights(str(conv_path), adapter_name="convs")
    theirs.set_adapters(["style", "convs"], adapter_weights=[0.5, 0.5])
    assert rel_err(_sd_images(pipe), _sd_images(theirs)) <= 1e-5

    fp.unpatch(pipe)
    assert not fp.is_patched(pipe) and A.adapter_names(pipe.unet) == []
    assert not any(hasattr(m, "fastgen_adapters") for m in pipe.unet.modules())
    assert {n: p.requires_grad for n, p in unet.named_parameters()} == flags
    assert torch.equal(torch.as_tensor(_sd_images(pipe)), torch.as_tensor(base))


@pytest.mark.skipif(not INTERPRET, reason="runs the Triton LoRA kernel on CPU tensors: needs TRITON_INTERPRET=1")
def test_adapter_file_runs_the_fused_lora_kernel(tmp_path, monkeypatch):
    """backend="triton": the file's LoRA branches run in fastgen's fused kernel inside the pipeline
    (counted), and the images equal those of the plain torch composition (backend="torch")."""
    diffusers = pytest.importorskip("diffusers")
    import fastgen.adapters as A
    from fastgen.adapters import fused

    pipe = _dit_pipe(diffusers)
    trainer = copy.deepcopy(pipe.transformer)
    A.add_adapter(trainer, "k", rank=3, targets=["transformer_blocks.0.attn1.to_q", "transformer_blocks.0.attn1.to_v"])
    torch.manual_seed(4)
    with torch.no_grad():
        for p in A.adapter_parameters(trainer):
            p.normal_(0.0, 0.3)
    path = tmp_path / "k.safetensors"
    A.save(trainer, path, format="diffusers", name="k")

    def images():
        return pipe(class_labels=[1], num_inference_steps=1, guidance_scale=2.0,
                    generator=torch.Generator().manual_seed(0), output_type="pt").images

    base = images()
    fastgen.patch(pipe, adapters=path, backend="torch", attention=False, norms=False, activations=False)
    want = images()
    calls = []
    orig = fused._LoRAAdd.apply
    monkeypatch.setattr(fused._LoRAAdd, "apply", staticmethod(lambda *a: calls.append(1) or orig(*a)))
    fastgen.patch(pipe, adapters=path, backend="triton", attention=False, norms=False, activations=False)
    got = images()
    assert len(calls) == 2  # to_q and to_v, one CFG-doubled call
    assert rel_err(want, base) > 1e-3
    assert rel_err(got, want) <= 1e-5
    fp.unpatch(pipe)
    assert not fp.is_patched(pipe)


def test_adapter_file_for_another_model_is_an_error_and_leaves_nothing(tmp_path):
    """The second file is for a 3-block DiT (the pipeline's has 2): an error, and the first file's
    adapter, already on, is taken off again (all or nothing)."""
    diffusers = pytest.importorskip("diffusers")
    import fastgen.adapters as A

    pipe = _dit_pipe(diffusers)
    good, bad = tmp_path / "good.safetensors", tmp_path / "bad.safetensors"
    same = copy.deepcopy(pipe.transformer)
    A.add_adapter(same, "x", rank=2, targets="attention")
    A.save(same, good, format="diffusers", name="x")
    other = diffusers.DiTTransformer2DModel(**{**pipe.transformer.config, "num_layers": 3})
    A.add_adapter(other, "z", rank=2, targets="attention")
    A.save(other, bad, format="diffusers", name="z")
    with pytest.raises((KeyError, ValueError), match="transformer_blocks.2"):
        fastgen.patch(pipe, adapters=[good, bad])
    assert not fp.is_patched(pipe) and A.adapter_names(pipe.transformer) == []
    assert all(p.requires_grad for p in pipe.transformer.parameters())
