"""fastgen.models.UNet2DCondition against diffusers' UNet2DConditionModel (tiny random configs).

fp32 with backend="torch": output and every parameter gradient within 1e-5 relative; bf16 through
the Triton kernels (interpreter on CPU): the FlashAttention rule against the fp32 reference;
interchange (strict state-dict round trip, from_pretrained of a save_pretrained directory), presets,
clear errors, torch.compile(fullgraph=True), gradient checkpointing, and the activation memory a
transformer block / resnet keeps for backward.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import HAS_CUDA, INTERPRET, TRITON_DEVICE, assert_fa_rule

from fastgen.models import UNet2DCondition, UNet2DConditionConfig
from test_models_sd3 import saved_bytes

KERNELS = pytest.mark.skipif(not (INTERPRET or HAS_CUDA), reason="Triton kernels need a GPU or TRITON_INTERPRET=1")


def _kwargs(kind: str) -> dict:
    kw = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
              down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
              up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=8, cross_attention_dim=24,
              attention_head_dim=2)
    if kind == "sdxl":  # SDXL layout: linear projections, text_time addition, per-block layers / heads
        kw.update(down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2),
                  attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
                  addition_time_embed_dim=8, projection_class_embeddings_input_dim=16 + 6 * 8)
    return kw


def _reference(kind: str, seed: int = 0):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(seed)
    ref = diffusers.UNet2DConditionModel(**_kwargs(kind))
    with torch.no_grad():  # non-trivial weights everywhere (diffusers zero-inits nothing we'd miss, but be sure)
        for p in ref.parameters():
            p.normal_(0.0, 0.2)
    return ref


def _inputs(kind: str, B=2, H=8, W=12, L=5, dtype=torch.float32, device="cpu", seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 4, H, W, generator=g).to(device, dtype)
    ctx = torch.randn(B, L, 24, generator=g).to(device, dtype)
    t = torch.tensor([3, 700, 999, 1][:B], device=device)
    kw = {}
    if kind == "sdxl":
        kw["added_cond_kwargs"] = dict(text_embeds=torch.randn(B, 16, generator=g).to(device, dtype),
                                       time_ids=(torch.rand(B, 6, generator=g) * 1024).to(device, dtype))
    return x, t, ctx, kw


def _close(actual, expected, rtol=1e-5, what="", floor=0.0):
    """Within rtol relative to the tensor's scale: elementwise rtol, atol = rtol * max(max|expected|, floor).
    ``floor`` (a fraction of the largest gradient of the model) covers gradients that are zero in exact
    arithmetic (e.g. q's weights when a single text token is attended to: softmax of one key is 1),
    where both sides hold only rounding noise."""
    scale = max(expected.abs().max().item(), floor)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * scale, msg=what or None)


def _close_grads(got: dict, want: dict, rtol=1e-5):
    assert set(got) == set(want)
    floor = 1e-2 * max(g.abs().max().item() for g in want.values())
    for k in want:
        _close(got[k], want[k], rtol, what=k, floor=floor)


@pytest.mark.parametrize("kind,H,W,L", [("sd15", 8, 12, 5), ("sd15", 9, 13, 1), ("sdxl", 8, 12, 77)])
def test_matches_diffusers_fp32(kind, H, W, L):
    """Output, input gradient and every parameter gradient equal diffusers' (batch 2, non-square and
    odd latents that take diffusers' forward_upsample_size path, text lengths 1 / 5 / 77)."""
    ref = _reference(kind)
    m = UNet2DCondition.from_diffusers(ref, backend="torch")
    x, t, ctx, kw = _inputs(kind, H=H, W=W, L=L)
    xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_r = ref(xr, t, ctx, **kw).sample
    out_f = m(xf, t, ctx, **kw).sample
    assert out_f.shape == (2, 4, H, W)
    _close(out_f, out_r, what="output")
    w = torch.randn_like(out_r)
    (out_r * w).sum().backward()
    (out_f * w).sum().backward()
    _close(xf.grad, xr.grad, what="d sample")
    want = UNet2DCondition.state_dict_from_diffusers({k: p.grad for k, p in ref.named_parameters()})
    _close_grads({k: p.grad for k, p in m.named_parameters()}, want)


def test_return_tuple_and_scalar_timestep():
    ref = _reference("sd15")
    m = UNet2DCondition.from_diffusers(ref, backend="torch").eval()
    x, _, ctx, _ = _inputs("sd15")
    with torch.no_grad():
        (a,) = m(x, 10, ctx, return_dict=False)
        b = ref(x, 10, ctx).sample
        c = m(x, torch.tensor(10.5), ctx).sample
        d = ref(x, torch.tensor(10.5), ctx).sample
    _close(a, b)
    _close(c, d)


def test_state_dict_round_trip_strict():
    diffusers = pytest.importorskip("diffusers")
    for kind in ("sd15", "sdxl"):
        ref = _reference(kind)
        sd = UNet2DCondition.from_diffusers(ref).to_diffusers_state_dict()
        fresh = diffusers.UNet2DConditionModel(**_kwargs(kind))
        fresh.load_state_dict(sd, strict=True)
        for k, v in ref.state_dict().items():
            assert torch.equal(fresh.state_dict()[k], v), k  # cat / chunk / reshape copy values exactly


def test_from_pretrained(tmp_path):
    ref = _reference("sdxl")
    ref.save_pretrained(tmp_path)
    m = UNet2DCondition.from_pretrained(str(tmp_path), backend="torch")
    assert m.config.addition_embed_type == "text_time" and m.config.transformer_layers_per_block == (1, 2)
    x, t, ctx, kw = _inputs("sdxl")
    with torch.no_grad():
        _close(m(x, t, ctx, **kw).sample, ref(x, t, ctx, **kw).sample)
    half = UNet2DCondition.from_pretrained(str(tmp_path), torch_dtype=torch.bfloat16, device="cpu")
    assert half.dtype == torch.bfloat16 and half.device.type == "cpu"
    assert half.add_embedding.linear_1.in_features == 64  # what the SDXL pipeline reads


def test_errors(tmp_path):
    from fastgen.models._common import CheckpointMismatchError

    ref = _reference("sdxl")
    m = UNet2DCondition.from_diffusers(ref, backend="torch")
    x, t, ctx, kw = _inputs("sdxl")
    with pytest.raises(ValueError, match="3 channels.*in_channels=4"):
        m(x[:, :3], t, ctx, **kw)
    with pytest.raises(ValueError, match="added_cond_kwargs.*text_embeds"):
        m(x, t, ctx)
    with pytest.raises(ValueError, match="added_cond_kwargs.*time_ids"):
        m(x, t, ctx, added_cond_kwargs={"text_embeds": kw["added_cond_kwargs"]["text_embeds"]})
    with pytest.raises(ValueError, match="cross_attention_dim"):
        m(x, t, ctx[..., :20], **kw)
    with pytest.raises(ValueError, match="projection_class_embeddings_input_dim"):
        m(x, t, ctx, added_cond_kwargs={"text_embeds": kw["added_cond_kwargs"]["text_embeds"][:, :8],
                                        "time_ids": kw["added_cond_kwargs"]["time_ids"]})
    with pytest.raises(NotImplementedError, match="attention_mask"):
        m(x, t, ctx, attention_mask=torch.ones(2, 5), **kw)
    with pytest.raises(NotImplementedError, match="class_embed_type"):
        UNet2DCondition.config_from_diffusers({**_kwargs("sd15"), "class_embed_type": "timestep"})
    with pytest.raises(NotImplementedError, match="block types"):
        UNet2DCondition(UNet2DConditionConfig(down_block_types=("SimpleCrossAttnDownBlock2D",) * 4))
    # a checkpoint of another size: the first mismatched keys and shapes are named
    ref.save_pretrained(tmp_path)
    other = UNet2DConditionConfig(**{**_kwargs("sdxl"), "block_out_channels": (32, 48)})
    with pytest.raises(CheckpointMismatchError, match=r"shape mismatch.*down_blocks\.1"):
        UNet2DCondition.from_pretrained(str(tmp_path), config=other)
    # a checkpoint with another naming (e.g. the original LDM keys): missing / unexpected keys named
    from safetensors.torch import save_file

    renamed = {k.replace("down_blocks", "input_blocks"): v.contiguous() for k, v in ref.state_dict().items()}
    bad = tmp_path / "renamed"
    bad.mkdir()
    save_file(renamed, str(bad / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(CheckpointMismatchError, match=r"missing key.*down_blocks.*unexpected key.*input_blocks"):
        UNet2DCondition.from_pretrained(str(bad), config=UNet2DConditionConfig(**_kwargs("sdxl")))


@pytest.mark.parametrize("name,params", [("sd15", 859_520_964), ("sdxl", 2_567_463_684)])
def test_presets_match_diffusers(name, params):
    """The presets build (on the meta device) exactly diffusers' parameter set for SD 1.5 / SDXL base."""
    diffusers = pytest.importorskip("diffusers")
    from fastgen.models.unet import _PRESETS

    with torch.device("meta"):
        m = UNet2DCondition(UNet2DConditionConfig.preset(name))
        ref = diffusers.UNet2DConditionModel(**_PRESETS[name])
    assert {k: v.shape for k, v in m.to_diffusers_state_dict().items()} == {k: v.shape for k, v in
                                                                          ref.state_dict().items()}
    assert sum(p.numel() for p in m.parameters()) == params


def _one_level(kind: str = "sdxl") -> UNet2DConditionConfig:
    """A one-level U-Net without a mid block (few modules: quick to trace and to run twice)."""
    return UNet2DConditionConfig(**{**_kwargs(kind), "block_out_channels": (32,), "down_block_types":
                                    ("CrossAttnDownBlock2D",), "up_block_types": ("CrossAttnUpBlock2D",),
                                    "attention_head_dim": 2, "transformer_layers_per_block": 1,
                                    "mid_block_type": None})


def test_compile_fullgraph():
    """torch.compile(fullgraph=True) traces the SDXL-layout forward (the recompute nodes' backward
    included, as dynamo speculates autograd functions) without graph breaks; same output and gradients."""
    torch.manual_seed(0)
    m = UNet2DCondition(_one_level(), backend="torch")
    x, t, ctx, kw = _inputs("sdxl")
    torch._dynamo.reset()
    cm = torch.compile(m, fullgraph=True, backend="eager")
    out = cm(x, t, ctx, **kw).sample
    out.square().mean().backward()
    grads = {k: p.grad.clone() for k, p in m.named_parameters()}
    m.zero_grad()
    eager = m(x, t, ctx, **kw).sample
    eager.square().mean().backward()
    _close(out, eager)
    _close_grads(grads, {k: p.grad for k, p in m.named_parameters()})


def test_gradient_checkpointing_same_gradients():
    torch.manual_seed(0)
    m = UNet2DCondition(_one_level("sd15"), backend="torch")
    x, t, ctx, kw = _inputs("sd15")
    m(x, t, ctx).sample.square().mean().backward()
    want = {k: p.grad.clone() for k, p in m.named_parameters()}
    m.zero_grad()
    m.enable_gradient_checkpointing()
    assert m.gradient_checkpointing
    m(x, t, ctx).sample.square().mean().backward()
    _close_grads({k: p.grad for k, p in m.named_parameters()}, want)


# ----------------------------------------------------------------------------- Triton kernels


def _bf16_blocks(ref):
    """(diffusers transformer + resnet of the mid block, in fp32 and bf16)."""
    return ref.mid_block.attentions[0], ref.mid_block.resnets[0]


@KERNELS
def test_triton_bf16_flash_attention_rule():
    """One transformer (GroupNorm, proj, LN, fused-QKV attention, cross-attention, GEGLU) and one resnet
    (fused GroupNorm+SiLU) in bf16 on the Triton kernels: output and every gradient no further from
    the fp32 reference than diffusers in bf16 (x2, + atol). Block level, to keep kernel launches few."""
    import copy

    ref = _reference("sd15")
    m = UNet2DCondition.from_diffusers(copy.deepcopy(ref), backend="triton").to(TRITON_DEVICE, torch.bfloat16)
    ref32 = ref.to(TRITON_DEVICE)
    ref16 = copy.deepcopy(ref).to(torch.bfloat16)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 64, 4, 6, generator=g).to(TRITON_DEVICE)
    ctx = torch.randn(2, 5, 24, generator=g).to(TRITON_DEVICE)
    temb = torch.randn(2, 128, generator=g).to(TRITON_DEVICE)
    w = torch.randn(2, 64, 4, 6, generator=g).to(TRITON_DEVICE)

    def run(model, dtype, ours):
        tf, rn = model.mid_block.attentions[0], model.mid_block.resnets[0]
        xi = x.to(dtype).detach().clone().requires_grad_()
        if ours:
            h = rn(tf(xi, ctx.to(dtype), lambda f, *a: f(*a)), F.silu(temb.to(dtype)))
        else:
            h = rn(tf(xi, encoder_hidden_states=ctx.to(dtype)).sample, temb.to(dtype))
        (h.float() * w).sum().backward()
        params = dict(model.mid_block.named_parameters())
        if ours:
            params = {k: v for k, v in params.items() if k.startswith(("attentions.0.", "resnets.0."))}
            grads = {k: p.grad.float() for k, p in params.items()}
        else:
            grads = UNet2DCondition.state_dict_from_diffusers(
                {k: p.grad.float() for k, p in params.items() if k.startswith(("attentions.0.", "resnets.0."))})
        return h.float(), xi.grad.float(), grads

    o32, dx32, g32 = run(ref32, torch.float32, False)
    o16, dx16, g16 = run(ref16, torch.bfloat16, False)
    of, dxf, gf = run(m, torch.bfloat16, True)
    assert_fa_rule("output", of, o16, o32, 1e-2 * o32.abs().max().item())
    assert_fa_rule("d x", dxf, dx16, dx32, 1e-2 * dx32.abs().max().item())
    assert set(gf) == set(g32)
    for k in g32:
        assert_fa_rule(k, gf[k], g16[k], g32[k], 1e-2 * g32[k].abs().max().item())


@KERNELS
def test_activation_memory_vs_diffusers():
    """Bytes saved for backward in bf16 on the Triton kernels vs the same diffusers module:
    BasicTransformerBlock ~0.62x (the three LayerNorm outputs and the GEGLU output are recomputed in
    the backward of the GEMM that reads them; the attention tensors are kept like diffusers keeps
    them), ResnetBlock2D ~0.34x (each GroupNorm+SiLU -> conv pair keeps only the GroupNorm input and
    its statistics; the activated tensor is recomputed in the conv's backward)."""
    import copy

    ref = _reference("sd15").to(TRITON_DEVICE, torch.bfloat16)
    m = UNet2DCondition.from_diffusers(copy.deepcopy(ref), backend="triton")
    g = torch.Generator().manual_seed(0)
    tok = torch.randn(2, 64, 64, generator=g).to(TRITON_DEVICE, torch.bfloat16).requires_grad_()
    ctx = torch.randn(2, 5, 24, generator=g).to(TRITON_DEVICE, torch.bfloat16)
    rb, fb = ref.mid_block.attentions[0].transformer_blocks[0], m.mid_block.attentions[0].transformer_blocks[0]
    block = (saved_bytes(lambda: fb(tok, ctx), fb.parameters())
             / saved_bytes(lambda: rb(tok, encoder_hidden_states=ctx), rb.parameters()))
    img = torch.randn(2, 64, 8, 8, generator=g).to(TRITON_DEVICE, torch.bfloat16).requires_grad_()
    temb = torch.randn(2, 128, generator=g).to(TRITON_DEVICE, torch.bfloat16)
    rr, fr = ref.mid_block.resnets[0], m.mid_block.resnets[0]
    resnet = (saved_bytes(lambda: fr(img, F.silu(temb)), fr.parameters())
              / saved_bytes(lambda: rr(img, temb), rr.parameters()))
    print(f"saved-for-backward ratio fastgen / diffusers: transformer block {block:.3f}, resnet {resnet:.3f}")
    assert block <= 0.65, block
    assert resnet <= 0.40, resnet
    assert math.isfinite(block) and math.isfinite(resnet)


# ----------------------------------------------------------------------------- inside diffusers pipelines


def _tiny_clip(tmp_path, projection: bool):
    """A CLIP tokenizer built offline from a 54-entry character vocabulary, and a 1-layer text encoder."""
    import json

    transformers = pytest.importorskip("transformers")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    tok = transformers.CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"), model_max_length=77)
    cfg = transformers.CLIPTextConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, max_position_embeddings=77, bos_token_id=0,
                                      eos_token_id=1, pad_token_id=1, projection_dim=8)
    enc = (transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel)(cfg)
    return tok, enc.eval()


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_pipeline_swap_same_images(kind, tmp_path):
    """StableDiffusion(XL)Pipeline with tiny random components (CFG-doubled batches, 2 DDIM steps):
    the same images with ``pipe.unet = UNet2DCondition.from_diffusers(pipe.unet)``."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    tok, enc = _tiny_clip(tmp_path, projection=False)
    vae = diffusers.AutoencoderKL(block_out_channels=(32,), norm_num_groups=8, sample_size=8,
                                  down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",))
    sched = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                    clip_sample=False, steps_offset=1)
    if kind == "sd15":
        unet = diffusers.UNet2DConditionModel(**{**_kwargs("sd15"), "cross_attention_dim": 16})
        pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=enc, tokenizer=tok, unet=unet, scheduler=sched,
                                                 safety_checker=None, feature_extractor=None,
                                                 requires_safety_checker=False)
    else:  # text tokens = [encoder 1 ; encoder 2] features (16 + 16), pooled projection (8) + 6 time ids
        _, enc2 = _tiny_clip(tmp_path, projection=True)
        unet = diffusers.UNet2DConditionModel(**{**_kwargs("sdxl"), "cross_attention_dim": 32,
                                                 "projection_class_embeddings_input_dim": 8 + 6 * 8})
        pipe = diffusers.StableDiffusionXLPipeline(vae=vae, text_encoder=enc, text_encoder_2=enc2, tokenizer=tok,
                                                   tokenizer_2=tok, unet=unet, scheduler=sched)
    pipe.set_progress_bar_config(disable=True)

    def images():
        return pipe("a cat", num_inference_steps=2, height=16, width=16, output_type="pt",
                    generator=torch.Generator().manual_seed(0)).images

    want = images()
    pipe.unet = UNet2DCondition.from_diffusers(pipe.unet, backend="torch")
    assert isinstance(pipe.unet, UNet2DCondition)
    got = images()
    assert got.shape == want.shape == (1, 3, 16, 16)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- the recompute nodes


@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm_linear_and_glu_linear_gradients_float64(affine):
    """The autograd nodes that recompute LN(x) / glu(u) in the backward against plain autograd in
    float64: every input gradient, with and without the gated residual and the AdaLN modulation,
    with x_new also used downstream, and LayerNorm without affine parameters."""
    from fastgen.models.unet import glu_linear, layer_norm_linear

    torch.manual_seed(0)
    B, S, N, O = 2, 5, 12, 7
    norm = torch.nn.LayerNorm(N, eps=1e-5, elementwise_affine=affine).double()
    if affine:
        with torch.no_grad():
            norm.weight.normal_()
            norm.bias.normal_()
    lin = torch.nn.Linear(N, O).double()
    x, r = torch.randn(B, S, N, dtype=torch.float64), torch.randn(B, S, N, dtype=torch.float64)
    gate, shift, scale = (torch.randn(B, N, dtype=torch.float64) for _ in range(3))
    leaves = [x, r, gate, shift, scale, lin.weight, lin.bias] + list(norm.parameters())
    w_out, w_new = torch.randn(B, S, O, dtype=torch.float64), torch.randn(B, S, N, dtype=torch.float64)

    def grads(loss):
        for t in leaves:
            t.grad = None
            t.requires_grad_(True)
        loss().backward()
        return [None if t.grad is None else t.grad.clone() for t in leaves]

    def ours():
        out, x_new = layer_norm_linear(x, norm, lin, "torch", shift, scale, residual=r, gate=gate)
        return (out * w_out).sum() + (x_new * w_new).sum()

    def plain():
        x_new = x + gate[:, None] * r
        n = F.layer_norm(x_new, (N,), norm.weight, norm.bias, 1e-5) * (1 + scale[:, None]) + shift[:, None]
        return (lin(n) * w_out).sum() + (x_new * w_new).sum()

    for a, b in zip(grads(ours), grads(plain)):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    # plain LayerNorm + linear on (..., N) rows (the U-Net form)
    a = grads(lambda: (layer_norm_linear(x, norm, lin, "torch") * w_out).sum())
    b = grads(lambda: (lin(F.layer_norm(x, (N,), norm.weight, norm.bias, 1e-5)) * w_out).sum())
    for u, v in zip(a, b):
        assert (u is None) == (v is None)
        if u is not None:
            torch.testing.assert_close(u, v, rtol=1e-10, atol=1e-10)
    # GEGLU + linear
    u = torch.randn(B, S, 2 * N, dtype=torch.float64, requires_grad=True)
    lin2 = torch.nn.Linear(N, O).double()
    (glu_linear(u, lin2, "gelu", "torch") * w_out).sum().backward()
    got = [u.grad.clone(), lin2.weight.grad.clone(), lin2.bias.grad.clone()]
    u.grad = lin2.weight.grad = lin2.bias.grad = None
    a_, g_ = u.chunk(2, -1)
    (lin2(a_ * F.gelu(g_)) * w_out).sum().backward()
    for p, q in zip(got, [u.grad, lin2.weight.grad, lin2.bias.grad]):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-10)


@KERNELS
def test_explicit_backend_refuses_float64():
    """A dtype the kernels do not serve, with an explicit backend: a clear error, not a silent fallback."""
    from fastgen.backend import BackendUnavailableError

    m = UNet2DCondition(UNet2DConditionConfig(**_kwargs("sd15")), backend="triton").to(TRITON_DEVICE, torch.float64)
    x, t, ctx, _ = _inputs("sd15", dtype=torch.float64, device=TRITON_DEVICE)
    with pytest.raises(BackendUnavailableError, match="dtype torch.float64 is not supported by the kernels"):
        m(x, t, ctx)


def test_group_norm_silu_conv_gradients_float64():
    """conv(silu(GroupNorm(x))) with the activation recomputed in the backward, against plain autograd
    in float64: x, GroupNorm weight / bias, conv weight / bias gradients (3x3 padded and 1x1 convs)."""
    from fastgen.models.unet import group_norm_silu_conv

    torch.manual_seed(0)
    x = torch.randn(2, 8, 5, 7, dtype=torch.float64)
    norm = torch.nn.GroupNorm(4, 8).double()
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    for conv in (torch.nn.Conv2d(8, 6, 3, padding=1).double(), torch.nn.Conv2d(8, 3, 1).double()):
        leaves = [x, norm.weight, norm.bias, conv.weight, conv.bias]
        w = torch.randn(2, conv.out_channels, 5, 7, dtype=torch.float64)
        got = []
        for fn in (lambda: group_norm_silu_conv(x, norm, conv, "torch"), lambda: conv(F.silu(norm(x)))):
            for t in leaves:
                t.grad = None
                t.requires_grad_(True)
            (fn() * w).sum().backward()
            got.append([t.grad.clone() for t in leaves])
        for a, b in zip(*got):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
