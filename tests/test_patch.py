"""fastgen.patch on tiny diffusers models and a plain torch block (CPU).

Patched vs unpatched outputs and input gradients within diffusers' bar for attention
backends (atol = rtol = 1e-2); the report names the expected replacements; unpatch
restores bit-identical outputs and the original classes; state_dict keys unchanged.
Most comparisons use backend="torch" (each fastgen op's reference path: fast on CPU);
one small model runs the Triton kernels (interpreter on CPU, real kernels on a GPU).
"""

from __future__ import annotations

import importlib.util
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import fastgen.patch as fp
from fastgen.backend import BackendUnavailableError
from conftest import HAS_CUDA, TRITON_DEVICE

HAS_DIFFUSERS = importlib.util.find_spec("diffusers") is not None  # without it the plain-torch tests still run
needs_diffusers = pytest.mark.skipif(not HAS_DIFFUSERS, reason="diffusers is not installed")
TOL = dict(atol=1e-2, rtol=1e-2)


def _out(res):
    if hasattr(res, "sample"):
        return res.sample
    return res[0] if isinstance(res, tuple) else res


def _check(model, make_inputs, expect: dict, backend="torch", grad_input="hidden_states", **patch_kw):
    """Patch ``model``; compare outputs / input grads with the unpatched run; unpatch; bit-identical."""
    torch.manual_seed(0)
    inputs = make_inputs()
    keys = list(model.state_dict().keys())
    classes = [type(m) for m in model.modules()]

    def run():
        torch.manual_seed(1234)  # the same dropout draws (e.g. DiT's class-label dropout) in every run
        x = {k: (v.clone().requires_grad_(True) if k == grad_input else v) for k, v in inputs.items()}
        out = _out(model(**x))
        out.float().square().mean().backward()
        return out.detach(), x[grad_input].grad

    model.zero_grad()
    ref, ref_grad = run()
    report = fp.patch(model, backend=backend, **patch_kw)
    text = str(report)
    for after, n in expect.items():
        assert report.count(after) >= n, f"expected >= {n} x {after} in\n{text}"
    assert list(model.state_dict().keys()) == keys
    out, grad = run()
    torch.testing.assert_close(out, ref, **TOL)
    torch.testing.assert_close(grad, ref_grad, **TOL)
    fp.unpatch(model)
    assert [type(m) for m in model.modules()] == classes
    again, again_grad = run()
    assert torch.equal(again, ref)
    if again_grad.is_cuda:  # torch's own CUDA attention backward may accumulate in a varying order
        torch.testing.assert_close(again_grad, ref_grad, atol=1e-3, rtol=1e-3)
    else:
        assert torch.equal(again_grad, ref_grad)
    return report


# ----------------------------------------------------------------------------- models


def _dit(dtype=torch.float32):
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    m = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
                              num_layers=1, sample_size=8, patch_size=2, num_embeds_ada_norm=10).to(dtype)

    def inputs():
        return dict(hidden_states=torch.randn(2, 4, 8, 8, dtype=dtype), timestep=torch.tensor([3, 7]),
                    class_labels=torch.tensor([1, 4]))

    return m, inputs


@needs_diffusers
def test_dit():
    m, inputs = _dit()
    r = _check(m, inputs, {"layer_norm_modulate": 1, "scaled_dot_product_attention": 1, "layer_norm": 2})
    assert any(p.endswith("norm1") and "layer_norm_modulate" in a for p, a in ((x.path, x.after) for x in r.replaced))
    # DiT's feed-forward is GELU(tanh): not gated, left alone with the reason
    assert [(s.path, s.what) for s in r.skipped if "GEMM epilogue" in s.reason] == [
        ("transformer_blocks.0.ff.net.0", "GELU")]


@needs_diffusers
def test_pixart():
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(0)
    m = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                 num_layers=1, sample_size=8, patch_size=2, cross_attention_dim=16,
                                 caption_channels=16)

    def inputs():
        return dict(hidden_states=torch.randn(2, 4, 8, 8), encoder_hidden_states=torch.randn(2, 5, 16),
                    timestep=torch.tensor([3, 7]), added_cond_kwargs={"resolution": None, "aspect_ratio": None})

    r = _check(m, inputs, {"fastgen.ops.layer_norm": 3, "scaled_dot_product_attention": 2})
    assert [(s.path, s.what) for s in r.skipped if "holds no norm" in s.reason] == [("adaln_single",
                                                                                     "AdaLayerNormSingle")]


@needs_diffusers
def test_sd3():
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    m = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                              num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                              pooled_projection_dim=16, out_channels=4, pos_embed_max_size=8, qk_norm="rms_norm")

    def inputs():
        return dict(hidden_states=torch.randn(2, 4, 8, 8), encoder_hidden_states=torch.randn(2, 5, 16),
                    pooled_projections=torch.randn(2, 16), timestep=torch.tensor([3, 7]))

    r = _check(m, inputs, {"layer_norm_modulate": 3, "scaled_dot_product_attention": 2, "rms_norm": 4})
    assert any(x.before == "JointAttnProcessor2_0" for x in r.replaced)


@needs_diffusers
def test_sd35_dual_attention():
    """SD 3.5-medium's MMDiT-X block: SD35AdaLayerNormZeroX (one norm, two modulations) and the
    dual attention branch (attn2)."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    m = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                              num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                              pooled_projection_dim=16, out_channels=4, pos_embed_max_size=8, qk_norm="rms_norm",
                              dual_attention_layers=(0,))

    def inputs():
        return dict(hidden_states=torch.randn(2, 4, 8, 8), encoder_hidden_states=torch.randn(2, 5, 16),
                    pooled_projections=torch.randn(2, 16), timestep=torch.tensor([3, 7]))

    r = _check(m, inputs, {"layer_norm_modulate (x2)": 1, "scaled_dot_product_attention": 3})
    assert [x.path for x in r.replaced if "(x2)" in x.after] == ["transformer_blocks.0.norm1"]
    assert any(f.path == "transformer_blocks.0.norm1.norm" and f.by == "transformer_blocks.0.norm1"
               and f.kernel == "fastgen.ops.layer_norm_modulate" for f in r.fused)


def _flux(dtype=torch.float32):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    m = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                               attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
                               pooled_projection_dim=16, axes_dims_rope=(4, 6, 6)).to(dtype)
    S, T = 16, 4

    def inputs():
        img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0),
                                             indexing="ij"), -1).reshape(S, 3)
        return dict(hidden_states=torch.randn(2, S, 4, dtype=dtype),
                    encoder_hidden_states=torch.randn(2, T, 16, dtype=dtype),
                    pooled_projections=torch.randn(2, 16, dtype=dtype), timestep=torch.tensor([0.3, 0.7]),
                    img_ids=img_ids, txt_ids=torch.zeros(T, 3))

    return m, inputs


@needs_diffusers
def test_flux():
    m, inputs = _flux()
    r = _check(m, inputs, {"apply_rope": 2, "layer_norm_modulate": 4})
    assert sum(x.before == "FluxAttnProcessor" for x in r.replaced) == 2
    # the q / k norms run inside qk_norm_rope: reported as fused into it, not as rms_norm
    assert r.count("rms_norm") == 0
    qk = sorted(f.path for f in r.fused if f.kernel == "fastgen.ops.qk_norm_rope")
    assert qk == sorted([f"transformer_blocks.0.attn.{n}" for n in ("norm_q", "norm_k", "norm_added_q", "norm_added_k")]
                        + ["single_transformer_blocks.0.attn.norm_q", "single_transformer_blocks.0.attn.norm_k"])
    assert all(f.by == f.path.rsplit(".", 1)[0] for f in r.fused if f.kernel == "fastgen.ops.qk_norm_rope")
    assert re.search(r"transformer_blocks\.0\.attn\.norm_q +RMSNorm -> fastgen\.ops\.qk_norm_rope "
                     r"\(in transformer_blocks\.0\.attn\)", str(r))


@needs_diffusers
def test_flux_fused_qkv_projections():
    m, inputs = _flux()
    m.fuse_qkv_projections()  # to_qkv / to_added_qkv: the processor takes the fused-projection branch
    assert m.transformer_blocks[0].attn.fused_projections
    _check(m, inputs, {"qk_norm_rope": 2})


@needs_diffusers
def test_flux_rope_off_and_attention_off():
    m, inputs = _flux()
    r = _check(m, inputs, {"scaled_dot_product_attention": 2}, rope=False)
    assert r.count("apply_rope") == 0
    r = _check(m, inputs, {"rms_norm": 6}, attention=False)
    assert r.count("scaled_dot_product_attention") == 0


@needs_diffusers
def test_unet2d_condition():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    m = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
                             layers_per_block=1, norm_num_groups=4, cross_attention_dim=16, attention_head_dim=4,
                             down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                             up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))

    def inputs():
        return dict(sample=torch.randn(2, 4, 8, 8), timestep=torch.tensor([3, 7]),
                    encoder_hidden_states=torch.randn(2, 5, 16))

    r = _check(m, inputs, {"activation='silu'": 7, "scaled_dot_product_attention": 6, "group_norm": 2,
                           "glu(activation='gelu')": 4}, grad_input="sample")
    assert all(x.before == "AttnProcessor2_0" for x in r.replaced if "attention" in x.after)
    gegl = sorted(n for n, mod in m.named_modules() if type(mod).__name__ == "GEGLU")  # every feed-forward
    assert len(gegl) == 4 and sorted(x.path for x in r.replaced if "glu" in x.after) == gegl


def _vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    m = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(16, 32), norm_num_groups=4,
                      latent_channels=4, layers_per_block=1,
                      down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)

    def inputs():
        return dict(sample=torch.randn(1, 3, 16, 16))

    return m, inputs


@needs_diffusers
def test_autoencoder_kl():
    m, inputs = _vae()
    r = _check(m, inputs, {"activation='silu'": 10, "scaled_dot_product_attention": 2, "fastgen.ops.group_norm": 4},
               grad_input="sample")
    assert sum("group_norm(activation='silu')" in f.kernel for f in r.fused) == 20  # norm1 + norm2 of each resnet


@needs_diffusers
def test_cogvideox():
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(0)
    m = CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                                    num_layers=1, sample_width=8, sample_height=8, sample_frames=5, patch_size=2,
                                    text_embed_dim=16, time_embed_dim=8, use_rotary_positional_embeddings=True)

    def inputs():
        from diffusers.models.embeddings import get_3d_rotary_pos_embed

        cos, sin = get_3d_rotary_pos_embed(16, ((0, 0), (4, 4)), (4, 4), 2)
        return dict(hidden_states=torch.randn(1, 2, 4, 8, 8), encoder_hidden_states=torch.randn(1, 3, 16),
                    timestep=torch.tensor([5]), image_rotary_emb=(cos.float(), sin.float()))

    r = _check(m, inputs, {"apply_rope": 1, "fastgen.ops.layer_norm": 2})
    assert any(x.before == "CogVideoXAttnProcessor2_0" for x in r.replaced)


class _Block(nn.Module):
    """A plain pre-norm transformer block on F.scaled_dot_product_attention."""

    def __init__(self, dim=32, heads=2):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.RMSNorm(dim)
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, hidden_states):
        B, S, C = hidden_states.shape
        q, k, v = self.qkv(self.norm1(hidden_states)).view(B, S, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, S, C)
        h = hidden_states + self.out(a)
        return h + self.mlp(self.norm2(h))


def test_plain_torch_block_and_sdpa_context():
    torch.manual_seed(0)
    m = _Block()
    r = _check(m, lambda: dict(hidden_states=torch.randn(2, 5, 32)), {"layer_norm": 1, "rms_norm": 1})
    assert {x.path for x in r.replaced} == {"norm1", "norm2"}
    x = torch.randn(2, 5, 32)
    ref = m(x)
    original = F.scaled_dot_product_attention
    with fp.sdpa(backend="torch"):
        assert F.scaled_dot_product_attention is not original
        out = m(x)
    assert F.scaled_dot_product_attention is original
    torch.testing.assert_close(out, ref, **TOL)


@needs_diffusers
@pytest.mark.parametrize("activation_fn,after", [("geglu", "glu(activation='gelu')"),
                                                 ("swiglu", "glu(activation='silu')")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_feed_forward_glu_triton(activation_fn, after, dtype):
    """diffusers FeedForward's gated units on the Triton GLU kernel; the un-gated ones left alone."""
    from diffusers.models.attention import FeedForward

    torch.manual_seed(0)
    m = FeedForward(16, activation_fn=activation_fn).to(TRITON_DEVICE, dtype)
    seen = _OpsSeen()
    with seen:
        r = _check(m, lambda: dict(hidden_states=torch.randn(2, 3, 16, device=TRITON_DEVICE, dtype=dtype)),
                   {after: 1}, backend="triton")
    seen.assert_ran("glu_fwd", "glu_bwd")
    assert r.paths() == ["net.0"]
    for fn in ("gelu", "gelu-approximate", "geglu-approximate", "linear-silu"):
        r = fp.patch(FeedForward(16, activation_fn=fn))
        assert len(r) == 0 and [s.path for s in r.skipped] == ["net.0"] and "GEMM epilogue" in r.skipped[0].reason


class _OpsSeen(TorchDispatchMode):
    """Records the names of the ops that reach dispatch (fastgen's custom ops among them)."""

    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(str(func))
        return func(*args, **(kwargs or {}))

    def assert_ran(self, *ops):
        ran = sorted(n for n in self.names if n.startswith("fastgen."))
        for op in ops:
            assert any(op in n for n in ran), (op, ran)


@needs_diffusers
@pytest.mark.parametrize("make", [_dit, _flux], ids=["dit", "flux"])
def test_triton_backend_small_model(make):
    """The Triton kernels inside a patched model (fp16: the attention kernels take 16-bit inputs)."""
    if TRITON_DEVICE == "cuda":
        pytest.skip("covered by test_triton_backend_gpu")
    m, inputs = make(torch.float16)
    seen = _OpsSeen()
    with seen:
        _check(m, inputs, {"layer_norm_modulate": 1, "scaled_dot_product_attention": 1}, backend="triton")
    seen.assert_ran("layer_norm_fwd", "layer_norm_bwd", "attention_fwd", "attention_bwd")
    if make is _flux:
        seen.assert_ran("qk_norm_rope_fwd", "qk_norm_rope_bwd")


@needs_diffusers
def test_flux_unfusable_qk_norms_use_apply_rope(monkeypatch):
    """q / k norms the fused kernel cannot reproduce (different eps here): norms, then apply_rope."""
    import fastgen.patch.attention as pa

    calls = {"apply_rope": 0, "qk_norm_rope": 0}
    for name in calls:
        def spy(*a, _f=getattr(pa, name), _n=name, **k):
            calls[_n] += 1
            return _f(*a, **k)
        monkeypatch.setattr(pa, name, spy)
    m, inputs = _flux()
    for blk in (*m.transformer_blocks, *m.single_transformer_blocks):
        blk.attn.norm_k.eps = 1e-5
    _check(m, inputs, {"apply_rope": 2})
    assert calls == {"apply_rope": 2, "qk_norm_rope": 0}  # one call per block


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@needs_diffusers
def test_triton_backend_gpu():
    """Patched vs unpatched on the GPU, float16, with the real kernels ("auto" and "triton")."""
    acts = {"hidden_states", "encoder_hidden_states", "pooled_projections", "sample"}
    expect = {_dit: {"layer_norm_modulate": 1}, _flux: {"qk_norm_rope": 2}, _vae: {"activation='silu'": 10}}
    for make in (_dit, _flux, _vae):
        m, inputs = make()
        m = m.to("cuda", torch.float16)

        def cuda_inputs():
            return {k: (v.to("cuda", torch.float16) if k in acts else v.to("cuda")) for k, v in inputs().items()}

        grad_input = "sample" if make is _vae else "hidden_states"
        for backend in ("auto", "triton"):
            _check(m, cuda_inputs, {"scaled_dot_product_attention": 1, **expect[make]}, backend=backend,
                   grad_input=grad_input)


@needs_diffusers
def test_float32_attention_stays_on_the_reference_op_level_stays_strict():
    """backend="triton" on a float32 DiT: the attention sites stay on the reference (the kernels take
    16-bit inputs), reported with the reason; strict=True raises; the op itself still raises."""
    m, inputs = _dit()
    if TRITON_DEVICE == "cuda":
        m = m.cuda()
    r = fp.patch(m, backend="triton", norms=False)
    assert r.count("scaled_dot_product_attention") == 0
    assert "float32 is not supported by the flash-attention kernels" in r.on_reference()["transformer_blocks.0.attn1"]
    fp.unpatch(m)
    with pytest.raises(fp.PatchError, match="transformer_blocks.0.attn1: stays on the reference"):
        fp.patch(m, backend="triton", norms=False, strict=True)
    assert not fp.is_patched(m)
    q = torch.randn(1, 2, 8, 16, device=TRITON_DEVICE)
    from fastgen.ops import scaled_dot_product_attention

    with pytest.raises(BackendUnavailableError, match="float16"):  # the op-level backend= stays strict
        scaled_dot_product_attention(q, q, q, backend="triton")


@needs_diffusers
def test_compile_flux_fullgraph():
    """torch.compile(fullgraph=True) of a patched Flux: no graph breaks at all (torch paths of the ops)."""
    m, inputs = _flux()
    fp.patch(m, backend="torch")
    x = inputs()
    ref = m(**x).sample
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(m)(**x)
    assert explanation.graph_break_count == 0, [str(r.reason) for r in explanation.break_reasons]
    torch._dynamo.reset()
    out = torch.compile(m, backend="aot_eager", fullgraph=True)(**x).sample
    torch.testing.assert_close(out, ref, **TOL)
    fp.unpatch(m)


@needs_diffusers
def test_compile_triton_fullgraph_fwd_bwd():
    """The fastgen custom ops (Triton kernels) inside torch.compile(fullgraph=True), forward and backward."""
    if TRITON_DEVICE == "cuda":
        pytest.skip("the GPU tier compiles on CUDA in test_triton_backend_gpu's models")
    m, inputs = _dit(torch.float16)
    x = inputs()
    x["hidden_states"].requires_grad_(True)
    torch.manual_seed(1234)
    ref = m(**x).sample
    ref.float().sum().backward()
    ref_grad, x["hidden_states"].grad = x["hidden_states"].grad, None
    fp.patch(m, backend="triton")
    torch._dynamo.reset()
    torch.manual_seed(1234)
    out = torch.compile(m, backend="aot_eager", fullgraph=True)(**x).sample
    out.float().sum().backward()
    torch.testing.assert_close(out, ref, **TOL)
    torch.testing.assert_close(x["hidden_states"].grad, ref_grad, **TOL)
    fp.unpatch(m)


def test_compile_fullgraph_block():
    m = _Block()
    x = torch.randn(2, 5, 32)
    ref = m(x)
    fp.patch(m)
    torch._dynamo.reset()
    out = torch.compile(m, backend="aot_eager", fullgraph=True)(x)
    torch.testing.assert_close(out, ref, **TOL)
    fp.unpatch(m)


@needs_diffusers
def test_report_pipeline_unknown_processor_and_strict():
    from diffusers.models.attention_processor import AttnProcessor

    m, inputs = _dit()
    for mod in m.modules():
        if hasattr(mod, "set_processor"):
            mod.set_processor(AttnProcessor())
    r = fp.patch(m, backend="torch")
    assert any(s.what == "AttnProcessor" and "not known" in s.reason for s in r.skipped)
    text = str(r)
    assert "left alone" in text and "AttnProcessor" in text and "->" in text
    with pytest.raises(fp.PatchError, match="AttnProcessor is not known"):
        fp.patch(m, strict=True)
    assert not any(fp.is_patched(mod) for mod in m.modules())  # all or nothing

    m, _ = _dit()
    fp.patch(m)
    attn = m.transformer_blocks[0].attn1
    mine = AttnProcessor()
    attn.set_processor(mine)  # the user's choice after patching survives unpatch
    fp.unpatch(m)
    assert attn.processor is mine

    m, _ = _dit()
    with pytest.raises(TypeError, match="nn.Module or a diffusers pipeline"):
        fp.patch(object())
    with pytest.raises(ValueError, match="backend"):
        fp.patch(m, backend="fast")


@needs_diffusers
def test_pipeline():
    """A real diffusers pipeline: every nn.Module component patched, paths prefixed; same images."""
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline

    m, _ = _dit()
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 16), norm_num_groups=4,
                        latent_channels=4, layers_per_block=1,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    pipe = DiTPipeline(transformer=m, vae=vae, scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)

    def run():
        return pipe(class_labels=[1, 3], guidance_scale=1.0, num_inference_steps=2,
                    generator=torch.manual_seed(0), output_type="pt").images

    ref = run()
    r = fp.patch(pipe, backend="torch")
    assert {p.split(".")[0] for p in r.paths()} == {"transformer", "vae"}
    assert "transformer.transformer_blocks.0.attn1" in r.paths() and "vae.decoder.mid_block.resnets.1" in r.paths()
    assert fp.is_patched(m.transformer_blocks[0].norm1)
    torch.testing.assert_close(run(), ref, **TOL)
    fp.unpatch(pipe)
    assert not fp.is_patched(m.transformer_blocks[0].norm1)
    assert torch.equal(run(), ref)


@needs_diffusers
def test_unknown_norms_reported():
    from diffusers.models.normalization import AdaGroupNorm, AdaLayerNormSingle

    class MyLayerNorm(nn.LayerNorm):
        pass

    m = nn.ModuleDict(dict(mine=MyLayerNorm(8), ada_group=AdaGroupNorm(8, 8, 2), plain=nn.LayerNorm(8)))
    r = fp.patch(m)
    reasons = {s.path: s.reason for s in r.skipped}
    assert "exact classes only" in reasons["mine"] and "not known" in reasons["ada_group"]
    assert r.paths() == ["plain"]
    with pytest.raises(fp.PatchError, match="mine: a subclass of torch.nn.LayerNorm"):
        fp.patch(m, strict=True)
    assert not fp.is_patched(m["plain"])
    with pytest.raises(fp.PatchError, match="ada_group: this diffusers norm is not known"):
        fp.patch(nn.ModuleDict(dict(ada_group=AdaGroupNorm(8, 8, 2))), strict=True)
    # known and left alone on purpose: listed with the reason, not an error under strict
    r = fp.patch(nn.ModuleDict(dict(single=AdaLayerNormSingle(8))), strict=True)
    assert [(s.path, s.what) for s in r.skipped if "holds no norm" in s.reason] == [("single", "AdaLayerNormSingle")]


def test_callable_package():
    import fastgen

    m = nn.Sequential(nn.LayerNorm(8))
    r = fastgen.patch(m)
    assert isinstance(r, fastgen.patch.PatchReport) and r.count("layer_norm") == 1
    fastgen.patch.unpatch(m)


@needs_diffusers
def test_resnet_scale_shift_and_fallbacks():
    """scale_shift blocks fuse norm1 only (norm2 is modulated before SiLU); 2-D GroupNorm input falls back."""
    from diffusers.models.resnet import ResnetBlock2D

    torch.manual_seed(0)
    blk = ResnetBlock2D(in_channels=8, out_channels=16, temb_channels=4, groups=4, time_embedding_norm="scale_shift")
    r = _check(blk, lambda: dict(input_tensor=torch.randn(2, 8, 4, 4), temb=torch.randn(2, 4)),
               {"for norm1 + SiLU": 1, "fastgen.ops.group_norm": 1}, grad_input="input_tensor")
    assert [f.path for f in r.fused] == ["norm1"] and not r.skipped
    gn = nn.GroupNorm(2, 4)
    fp.patch(gn)
    x = torch.randn(3, 4)  # (N, C): not a shape the fused op takes -> the original forward
    torch.testing.assert_close(gn(x), F.group_norm(x, 2, gn.weight, gn.bias, gn.eps))
    fp.unpatch(gn)


@needs_diffusers
def test_resnet_non_silu_left_alone():
    from diffusers.models.resnet import ResnetBlock2D

    blk = ResnetBlock2D(in_channels=8, out_channels=8, temb_channels=None, groups=4, non_linearity="mish")
    r = fp.patch(blk, backend="torch")
    assert any("not SiLU" in s.reason for s in r.skipped)
    assert r.count("group_norm") == 2  # its GroupNorms themselves are still patched
    fp.unpatch(blk)


def test_float64_reference_layer_norm_and_rms_norm():
    """The patched norms against hand-written float64 formulas."""
    m = nn.Sequential(nn.LayerNorm(16, eps=1e-5), nn.RMSNorm(16, eps=1e-6))
    with torch.no_grad():
        m[0].weight.normal_(), m[0].bias.normal_(), m[1].weight.normal_()
    x = torch.randn(3, 7, 16)
    fp.patch(m, backend="torch")
    y = m(x)
    fp.unpatch(m)
    d = x.double()
    w0, b0, w1 = (p.detach().double() for p in (m[0].weight, m[0].bias, m[1].weight))
    h = (d - d.mean(-1, keepdim=True)) / torch.sqrt(d.var(-1, unbiased=False, keepdim=True) + 1e-5) * w0 + b0
    h = h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * w1
    torch.testing.assert_close(y.double(), h, atol=1e-5, rtol=1e-5)
