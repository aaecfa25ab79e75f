"""fastgen.patch(backend="triton" | "cuda"): the kernel family wherever it can serve (CPU).

Sites the family cannot serve (VAE mid-block attention with head dim 512, a UNet's 4-wide
heads, float32 attention, everything Triton-only under backend="cuda") stay on the
reference and the report says why; the model still runs and matches its unpatched self.
A call that cannot be served runs the reference with one warning per module; strict=True
raises at patch time naming every site. Also: is_patched on any module of the tree,
torch.save / deepcopy of a patched model, and the report of fused modules.
"""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from torch import nn

import fastgen.patch as fp
from fastgen.backend import BackendUnavailableError
from conftest import INTERPRET, TRITON_DEVICE

TOL = dict(atol=1e-2, rtol=1e-2)
KERNELS_RUN = not (TRITON_DEVICE == "cpu" and not INTERPRET)  # else only the patch-time checks run
needs_triton_here = pytest.mark.skipif(not KERNELS_RUN, reason="Triton kernels need a GPU or TRITON_INTERPRET=1")


def _out(res):
    return res.sample if hasattr(res, "sample") else (res[0] if isinstance(res, tuple) else res)


def _no_fallback_warnings():
    return warnings.catch_warnings(record=True)


# ----------------------------------------------------------------------------- models


def _vae(kind: str, dtype):
    """A tiny AutoencoderKL shaped like SD's / SDXL's / Flux's where it matters here: the mid-block
    attention has one head over 512 channels (head dim 512), GroupNorm with 32 groups."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    extra = dict(latent_channels=16, use_quant_conv=False, use_post_quant_conv=False) if kind == "flux" else \
        dict(latent_channels=4, force_upcast=kind == "sdxl")
    m = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(512,), norm_num_groups=32,
                      layers_per_block=1, down_block_types=("DownEncoderBlock2D",),
                      up_block_types=("UpDecoderBlock2D",), **extra)
    return m.to(TRITON_DEVICE, dtype).eval()


def _unet(dtype):
    """A tiny UNet2DConditionModel whose attention heads are 4 wide (diffusers' ``attention_head_dim``
    of a UNet is the number of heads: 8 / 2 and 16 / 4 channels)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    m = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
                             layers_per_block=1, norm_num_groups=4, cross_attention_dim=16, attention_head_dim=(2, 4),
                             down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                             up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    return m.to(TRITON_DEVICE, dtype).eval()


def _dit(dtype=torch.float32, device=TRITON_DEVICE):
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    m = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
                              num_layers=1, sample_size=8, patch_size=2, num_embeds_ada_norm=10)
    inputs = dict(hidden_states=torch.randn(2, 4, 8, 8), timestep=torch.tensor([3, 7]),
                  class_labels=torch.tensor([1, 4]))
    inputs = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in inputs.items()}
    return m.to(device, dtype).eval(), inputs


def _attention_paths(m) -> list:
    return sorted(n for n, mod in m.named_modules() if hasattr(mod, "set_processor"))


# ----------------------------------------------------------------------------- kernels wherever they serve


@pytest.mark.parametrize("kind", ["sd", "sdxl", "flux"])
def test_vae_head_dim_512_stays_on_reference_and_decodes(kind):
    """The real VAEs' mid-block attention (head dim 512) is beyond the flash kernels: that site keeps
    diffusers' processor, the GroupNorm + SiLU sites run the Triton kernels, decode works."""
    pytest.importorskip("diffusers")
    m = _vae(kind, torch.float16)
    z = torch.randn(1, m.config.latent_channels, 4, 4, device=TRITON_DEVICE, dtype=torch.float16)
    # the interpreter costs ~10 s per decode: one kind on CPU
    decode = KERNELS_RUN and (kind == "flux" or TRITON_DEVICE == "cuda")
    if decode:
        with torch.no_grad():
            ref = m.decode(z).sample
    r = fp.patch(m, backend="triton")
    why = r.on_reference()
    for path in ("encoder.mid_block.attentions.0", "decoder.mid_block.attentions.0"):
        assert "head dim 512 is not supported" in why[path], str(r)
        assert type(m.get_submodule(path).processor).__name__ == "AttnProcessor2_0"  # diffusers' own
    assert r.count("scaled_dot_product_attention") == 0 and r.count("activation='silu'") == 7
    if not decode:
        fp.unpatch(m)
        return
    with _no_fallback_warnings() as seen, torch.no_grad():
        warnings.simplefilter("always")
        out = m.decode(z).sample
    assert not [w for w in seen if issubclass(w.category, fp.PatchFallbackWarning)]
    torch.testing.assert_close(out, ref, **TOL)
    fp.unpatch(m)


def test_unet_4_wide_heads_and_strict_names_every_site():
    pytest.importorskip("diffusers")
    m = _unet(torch.float16)
    inputs = dict(sample=torch.randn(2, 4, 8, 8), timestep=torch.tensor([3, 7]),
                  encoder_hidden_states=torch.randn(2, 5, 16))
    inputs = {k: (v.to(TRITON_DEVICE, torch.float16) if v.is_floating_point() else v.to(TRITON_DEVICE))
              for k, v in inputs.items()}
    attn = _attention_paths(m)
    gegl = sorted(n for n, mod in m.named_modules() if type(mod).__name__ == "GEGLU")
    assert len(attn) == 8 and len(gegl) == 4
    with pytest.raises(fp.PatchError) as err:
        fp.patch(m, backend="triton", strict=True)
    for path in attn:  # every unsupported site is named, not just the first
        assert f"{path}: stays on the reference (backend='triton'): attention: head dim 4" in str(err.value)
    assert not fp.is_patched(m)
    with torch.no_grad():
        ref = m(**inputs).sample
    r = fp.patch(m, backend="triton")
    assert sorted(p for p, why in r.on_reference().items() if "head dim 4" in why) == attn
    from diffusers.models.resnet import ResnetBlock2D

    resnets = sum(isinstance(mod, ResnetBlock2D) for mod in m.modules())
    assert sorted(x.path for x in r.replaced if "glu" in x.after) == gegl
    assert r.count("activation='silu'") == resnets
    if KERNELS_RUN:
        with torch.no_grad():
            torch.testing.assert_close(m(**inputs).sample, ref, **TOL)
    fp.unpatch(m)


def test_float32_dit_norms_on_triton_attention_on_reference():
    pytest.importorskip("diffusers")
    m, inputs = _dit(torch.float32)
    with torch.no_grad():
        ref = _out(m(**inputs))
    r = fp.patch(m, backend="triton")
    assert r.count("layer_norm_modulate") == 1 and r.count("scaled_dot_product_attention") == 0
    assert "float32 is not supported by the flash-attention kernels" in r.on_reference()["transformer_blocks.0.attn1"]
    assert "left alone" in str(r) and "stays on the reference" in str(r)
    if KERNELS_RUN:
        with torch.no_grad():
            torch.testing.assert_close(_out(m(**inputs)), ref, **TOL)
    fp.unpatch(m)


def test_cuda_backend_on_dit_reports_every_site_and_runs():
    """backend="cuda" on a DiT: its norms, modulations and attention have no CUDA C++ kernels, so every
    site stays on the reference with that reason (and, with no GPU, the report says so); same output."""
    pytest.importorskip("diffusers")
    m, inputs = _dit(torch.float32, device="cpu")
    with torch.no_grad():
        ref = _out(m(**inputs))
    r = fp.patch(m, backend="cuda")
    why = r.on_reference()
    assert len(r) == 0 and not fp.is_patched(m)
    expect = {"transformer_blocks.0.norm1": "layer_norm_modulate: no CUDA C++ implementation",
              "transformer_blocks.0.norm3": "layer_norm: no CUDA C++ implementation",
              "transformer_blocks.0.attn1": "attention: no CUDA C++ implementation",
              "norm_out": "layer_norm: no CUDA C++ implementation"}
    for path, text in expect.items():
        assert text in why[path], str(r)
    assert any("the model is on cpu" in n for n in r.notes)
    with torch.no_grad():
        assert torch.equal(_out(m(**inputs)), ref)
    with pytest.raises(fp.PatchError, match="transformer_blocks.0.attn1: stays on the reference"):
        fp.patch(m, backend="cuda", strict=True)


def test_cuda_backend_on_flux_serves_part_of_a_site():
    """Flux's processor under backend="cuda": qk_norm_rope has CUDA C++ kernels, attention does not,
    so the processor is patched with attention on the reference (said on its report line). With no
    GPU the CUDA calls fall back at call time, once per module; the output is the model's own."""
    pytest.importorskip("diffusers")
    from diffusers import FluxTransformer2DModel

    from fastgen.cuda import extension_info

    torch.manual_seed(0)
    m = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                               attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
                               pooled_projection_dim=16, axes_dims_rope=(4, 6, 6)).eval()
    img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij"), -1)
    inputs = dict(hidden_states=torch.randn(1, 16, 4), encoder_hidden_states=torch.randn(1, 4, 16),
                  pooled_projections=torch.randn(1, 16), timestep=torch.tensor([0.5]),
                  img_ids=img_ids.reshape(16, 3), txt_ids=torch.zeros(4, 3))
    with torch.no_grad():
        ref = m(**inputs).sample
    r = fp.patch(m, backend="cuda")
    procs = [x for x in r.replaced if x.before == "FluxAttnProcessor"]
    if not extension_info()["built"]:  # then nothing CUDA can serve: every site says why
        assert not procs and "fastgen._C" in r.on_reference()["transformer_blocks.0.attn"]
        return
    assert len(procs) == 2 and all(dict(x.reference) == {"attention": "no CUDA C++ implementation (Triton only)"}
                                   for x in procs)
    assert r.on_reference()["single_transformer_blocks.0.attn"] == "attention: no CUDA C++ implementation (Triton only)"
    assert "attention runs the reference here: no CUDA C++ implementation" in str(r)
    assert r.count("qk_norm_rope") == 2 and r.count("scaled_dot_product_attention") == 0
    with warnings.catch_warnings(record=True) as seen, torch.no_grad():
        warnings.simplefilter("always")
        out = m(**inputs).sample
    msgs = sorted(str(w.message).split(":")[1].strip() for w in seen
                  if issubclass(w.category, fp.PatchFallbackWarning))
    assert "transformer_blocks.0.attn" in msgs and "single_transformer_blocks.0.attn" in msgs
    assert len(msgs) == len(set(msgs))  # once per module
    torch.testing.assert_close(out, ref, **TOL)
    fp.unpatch(m)


def test_call_that_cannot_be_served_runs_reference_and_warns_once_per_module(monkeypatch):
    """CPU tensors without the interpreter: the Triton kernels cannot serve any call. Non-strict: the
    reference runs, one PatchFallbackWarning per module; strict: the op raises as op-level backend= does."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    torch.manual_seed(0)
    m = nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 8), nn.RMSNorm(8), nn.LayerNorm(8))
    x = torch.randn(3, 8)
    with torch.no_grad():
        ref = m(x)
    r = fp.patch(m, backend="triton")
    assert len(r) == 3 and any("the model is on cpu" in n for n in r.notes)
    with warnings.catch_warnings(record=True) as seen, torch.no_grad():
        warnings.simplefilter("always")
        out, again = m(x), m(x)
    msgs = [str(w.message) for w in seen if issubclass(w.category, fp.PatchFallbackWarning)]
    assert len(msgs) == 3 and {m_.split(":")[1].strip() for m_ in msgs} == {"0", "2", "3"}
    assert all("needs CUDA tensors" in s and "runs the reference" in s for s in msgs)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(again, ref, atol=1e-6, rtol=1e-6)
    fp.patch(m, backend="triton", strict=True)
    with pytest.raises(BackendUnavailableError, match="needs CUDA tensors"):
        m(x)
    fp.unpatch(m)


@needs_triton_here
def test_dtype_changed_after_patching_falls_back_once_per_module():
    """Patched in float16 (attention served), then cast to float32: the flash kernels cannot take it,
    so each attention module runs the reference and warns once."""
    pytest.importorskip("diffusers")
    m, inputs = _dit(torch.float16)
    r = fp.patch(m, backend="triton", norms=False, activations=False)
    assert r.count("scaled_dot_product_attention") == 1 and not r.on_reference()
    m.float()
    inputs = {k: (v.float() if v.is_floating_point() else v) for k, v in inputs.items()}
    with warnings.catch_warnings(record=True) as seen, torch.no_grad():
        warnings.simplefilter("always")
        out = _out(m(**inputs))
        _out(m(**inputs))
    msgs = [str(w.message) for w in seen if issubclass(w.category, fp.PatchFallbackWarning)]
    assert len(msgs) == 1 and "transformer_blocks.0.attn1" in msgs[0] and "float32" in msgs[0]
    fp.unpatch(m)
    with torch.no_grad():
        torch.testing.assert_close(out, _out(m(**inputs)), **TOL)


def test_group_size_checked_at_patch_time():
    """A GroupNorm with more channels per group than the kernels take stays on the reference."""
    m = nn.Sequential(nn.GroupNorm(1, 2048), nn.GroupNorm(4, 8))
    r = fp.patch(m, backend="triton")
    assert r.paths() == ["1"] and "2048 channels per group exceed" in r.on_reference()["0"]
    fp.unpatch(m)
    d = nn.Sequential(nn.LayerNorm(8)).double()
    r = fp.patch(d, backend="triton")
    assert len(r) == 0 and "dtype torch.float64 is not supported" in r.on_reference()["0"]


# ----------------------------------------------------------------------------- the report and the tree


def test_is_patched_anywhere_in_the_tree():
    inner = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    m = nn.Sequential(nn.Linear(4, 4), inner)
    assert not fp.is_patched(m)
    fp.patch(m, backend="torch")
    assert fp.is_patched(m) and fp.is_patched(inner) and fp.is_patched(inner[1])
    assert not fp.is_patched(m[0])  # nothing inside that Linear runs fastgen code
    fp.unpatch(m)
    assert not fp.is_patched(m) and not fp.is_patched(inner)


def test_torch_save_and_deepcopy_of_a_patched_model(monkeypatch):
    pytest.importorskip("diffusers")
    import fastgen.patch.core as core

    m, inputs = _dit(torch.float32, device="cpu")
    fp.patch(m, backend="torch")
    with torch.no_grad():
        ref = _out(m(**inputs))
    buf = io.BytesIO()
    torch.save(m, buf)
    monkeypatch.setattr(core, "_SUBCLASSES", {})  # as in a fresh process: the subclasses are rebuilt on load
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    for other in (loaded, copy.deepcopy(m)):
        assert fp.is_patched(other) and type(other.transformer_blocks[0].norm1).__name__.startswith("Fastgen")
        with torch.no_grad():
            torch.testing.assert_close(_out(other(**inputs)), ref, atol=0, rtol=0)
        fp.unpatch(other)
        assert not fp.is_patched(other)
        assert type(other.transformer_blocks[0].norm1).__name__ == "AdaLayerNormZero"
