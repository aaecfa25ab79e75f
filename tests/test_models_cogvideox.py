"""fastgen.models.CogVideoX against diffusers' CogVideoXTransformer3DModel (tiny random configs).

fp32 with backend="torch": output and every parameter gradient within 1e-5 relative (2b layout with
the 3-D sin-cos table, 5b layout with 3-D RoPE, the 1.5 layout with a temporal patch and ofs);
frame counts 1..4, batch 2, non-square latents; bf16 on the Triton kernels (interpreter on CPU):
the FlashAttention rule; round trip, from_pretrained, presets, errors, compile, checkpointing, and
the activation memory of one block.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import HAS_CUDA, INTERPRET, TRITON_DEVICE, assert_fa_rule

from fastgen.models import CogVideoX, CogVideoXConfig
from test_models_sd3 import saved_bytes

KERNELS = pytest.mark.skipif(not (INTERPRET or HAS_CUDA), reason="Triton kernels need a GPU or TRITON_INTERPRET=1")

LAYOUTS = {
    "2b": dict(use_rotary_positional_embeddings=False),
    "5b": dict(use_rotary_positional_embeddings=True),
    "1.5": dict(use_rotary_positional_embeddings=True, patch_size_t=2, ofs_embed_dim=24),
}


def _kwargs(layout: str, layers: int = 2) -> dict:
    return dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=24,
                text_embed_dim=20, num_layers=layers, sample_width=6, sample_height=4, sample_frames=9,
                patch_size=2, max_text_seq_length=3, **LAYOUTS[layout])


def _reference(layout: str, layers: int = 2, seed: int = 0):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(seed)
    ref = diffusers.CogVideoXTransformer3DModel(**_kwargs(layout, layers))
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0.0, 0.2)
    return ref


def _inputs(layout: str, frames: int, H=4, W=6, B=2, dtype=torch.float32, device="cpu", seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, frames, 4, H, W, generator=g).to(device, dtype)
    text = torch.randn(B, 3, 20, generator=g).to(device, dtype)
    kw = dict(timestep=torch.tensor([3, 700][:B], device=device))
    if layout == "1.5":
        kw["ofs"] = torch.full((B,), 2.0, device=device)
    if layout != "2b":
        from diffusers.models.embeddings import get_3d_rotary_pos_embed

        pt = 2 if layout == "1.5" else 1
        cos, sin = get_3d_rotary_pos_embed(16, ((0, 0), (H // 2, W // 2)), (H // 2, W // 2), frames // pt)
        kw["image_rotary_emb"] = (cos.to(device), sin.to(device))
    return x, text, kw


def _close(actual, expected, rtol=1e-5, what="", floor=0.0):
    """rtol relative to the tensor's scale (atol = rtol * max(max|expected|, floor)); ``floor`` covers
    gradients that vanish in exact arithmetic (without RoPE, the key LayerNorm's bias shifts every key
    by the same vector, which softmax ignores), where both sides hold only rounding noise."""
    scale = max(expected.abs().max().item(), floor)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * scale, msg=what or None)


def _close_grads(got: dict, want: dict, rtol=1e-5):
    assert set(got) == set(want)
    floor = 1e-2 * max(g.abs().max().item() for g in want.values())
    for k in want:
        _close(got[k], want[k], rtol, what=k, floor=floor)


@pytest.mark.parametrize("layout,frames,H,W", [("2b", 3, 4, 6), ("5b", 1, 6, 4), ("5b", 3, 4, 6), ("1.5", 4, 4, 6)])
def test_matches_diffusers_fp32(layout, frames, H, W):
    ref = _reference(layout)
    m = CogVideoX.from_diffusers(ref, backend="torch")
    x, text, kw = _inputs(layout, frames, H, W)
    xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_r = ref(xr, text, **kw).sample
    out_f = m(xf, text, **kw).sample
    assert out_f.shape == x.shape
    _close(out_f, out_r, what="output")
    w = torch.randn_like(out_r)
    (out_r * w).sum().backward()
    (out_f * w).sum().backward()
    _close(xf.grad, xr.grad, what="d hidden_states")
    want = CogVideoX.state_dict_from_diffusers({k: p.grad for k, p in ref.named_parameters()})
    _close_grads({k: p.grad for k, p in m.named_parameters()}, want)


def test_state_dict_round_trip_strict():
    diffusers = pytest.importorskip("diffusers")
    for layout in LAYOUTS:
        ref = _reference(layout)
        fresh = diffusers.CogVideoXTransformer3DModel(**_kwargs(layout))
        fresh.load_state_dict(CogVideoX.from_diffusers(ref).to_diffusers_state_dict(), strict=True)
        for k, v in ref.state_dict().items():
            assert torch.equal(fresh.state_dict()[k], v), k


def test_from_pretrained(tmp_path):
    ref = _reference("5b")
    ref.save_pretrained(tmp_path)
    m = CogVideoX.from_pretrained(str(tmp_path), backend="torch")
    x, text, kw = _inputs("5b", 2)
    with torch.no_grad():
        (a,) = m(x, text, return_dict=False, **kw)
        _close(a, ref(x, text, **kw).sample)
    half = CogVideoX.from_pretrained(str(tmp_path), torch_dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16 and half.config.use_rotary_positional_embeddings


def test_errors(tmp_path):
    from fastgen.models._common import CheckpointMismatchError

    m = CogVideoX.from_diffusers(_reference("2b"), backend="torch")
    x, text, kw = _inputs("2b", 2)
    with pytest.raises(ValueError, match="3 channels.*in_channels=4"):
        m(x[:, :, :3], text, **kw)
    with pytest.raises(ValueError, match=r"4 x 5\) must be multiples of the patch size 2"):
        m(x[..., :5], text, **kw)
    with pytest.raises(ValueError, match="5-D latent video"):
        m(x[:, 0], text, **kw)
    with pytest.raises(ValueError, match="max_text_seq_length=3"):
        m(x, text[:, :2], **kw)
    with pytest.raises(ValueError, match="text_embed_dim=20"):
        m(x, text[..., :8], **kw)
    r = CogVideoX.from_diffusers(_reference("1.5"), backend="torch")
    x15, text15, kw15 = _inputs("1.5", 4)
    with pytest.raises(ValueError, match="not a multiple of patch_size_t=2"):
        r(x15[:, :3], text15, **kw15)
    with pytest.raises(ValueError, match="needs ofs="):
        r(x15, text15, **{k: v for k, v in kw15.items() if k != "ofs"})
    with pytest.raises(ValueError, match="image_rotary_emb must be"):
        r(x15, text15, **{**kw15, "image_rotary_emb": tuple(t[:-1] for t in kw15["image_rotary_emb"])})
    # a checkpoint of another model: named missing / unexpected keys
    ref = _reference("5b")
    ref.save_pretrained(tmp_path)
    with pytest.raises(CheckpointMismatchError, match=r"missing key.*ofs_embedding"):
        CogVideoX.from_pretrained(str(tmp_path), config=CogVideoXConfig(**_kwargs("1.5")))
    with pytest.raises(CheckpointMismatchError, match=r"shape mismatch.*patch_embed\.proj\.weight: "
                       r"checkpoint \(32, 4, 2, 2\) vs model \(48, 4, 2, 2\)"):
        CogVideoX.from_pretrained(str(tmp_path), config=CogVideoXConfig(**{**_kwargs("5b"), "num_attention_heads": 3}))


@pytest.mark.parametrize("name", ["cogvideox-2b", "cogvideox-5b"])
def test_presets_match_diffusers(name):
    diffusers = pytest.importorskip("diffusers")
    from fastgen.models.cogvideox import _PRESETS

    with torch.device("meta"):
        m = CogVideoX(CogVideoXConfig.preset(name))
        ref = diffusers.CogVideoXTransformer3DModel(**_PRESETS[name])
    assert {k: v.shape for k, v in m.to_diffusers_state_dict().items()} == {k: v.shape for k, v in
                                                                          ref.state_dict().items()}
    assert sum(p.numel() for p in m.parameters()) == {"cogvideox-2b": 1_693_783_872,
                                                      "cogvideox-5b": 5_570_283_072}[name]


def test_compile_fullgraph_and_checkpointing():
    """torch.compile(fullgraph=True) without graph breaks (RoPE layout), and per-block gradient
    checkpointing gives the same gradients."""
    ref = _reference("5b", layers=1)
    m = CogVideoX.from_diffusers(ref, backend="torch")
    x, text, kw = _inputs("5b", 2)
    m(x, text, **kw).sample.square().mean().backward()
    want = {k: p.grad.clone() for k, p in m.named_parameters()}
    m.zero_grad()
    torch._dynamo.reset()
    out = torch.compile(m, fullgraph=True, backend="aot_eager")(x, text, **kw).sample
    out.square().mean().backward()
    _close_grads({k: p.grad for k, p in m.named_parameters()}, want)
    m.zero_grad()
    m.enable_gradient_checkpointing()
    m(x, text, **kw).sample.square().mean().backward()
    _close_grads({k: p.grad for k, p in m.named_parameters()}, want)


# ----------------------------------------------------------------------------- Triton kernels


@KERNELS
def test_triton_bf16_flash_attention_rule():
    """One-layer 5b-layout model in bf16 on the Triton kernels (AdaLN, gated residual + AdaLN, q/k
    LayerNorm read in place, RoPE, attention): output and every gradient within the FA rule."""
    ref32 = _reference("5b", layers=1).to(TRITON_DEVICE)
    ref16 = copy.deepcopy(ref32).to(torch.bfloat16)
    m = CogVideoX.from_diffusers(copy.deepcopy(ref16), backend="triton")
    x, text, kw = _inputs("5b", 2, device=TRITON_DEVICE)
    w = torch.randn(x.shape, generator=torch.Generator().manual_seed(5)).to(TRITON_DEVICE)

    def run(model, dtype):
        xi = x.to(dtype).detach().clone().requires_grad_()
        out = model(xi, text.to(dtype), **kw).sample.float()
        (out * w).sum().backward()
        grads = {k: p.grad.float() for k, p in model.named_parameters()}
        if not isinstance(model, CogVideoX):
            grads = CogVideoX.state_dict_from_diffusers(grads)
        return out, xi.grad.float(), grads

    o32, dx32, g32 = run(ref32, torch.float32)
    o16, dx16, g16 = run(ref16, torch.bfloat16)
    of, dxf, gf = run(m, torch.bfloat16)
    assert_fa_rule("output", of, o16, o32, 1e-2 * o32.abs().max().item())
    assert_fa_rule("d hidden_states", dxf, dx16, dx32, 1e-2 * dx32.abs().max().item())
    assert set(gf) == set(g32)
    floor = 1e-2 * max(g.abs().max().item() for g in g32.values())
    for k in g32:
        assert_fa_rule(k, gf[k], g16[k], g32[k], 1e-2 * max(g32[k].abs().max().item(), floor))


@KERNELS
def test_activation_memory_vs_diffusers():
    """Bytes one block keeps for backward, bf16 on the Triton kernels vs diffusers' CogVideoXBlock
    (head dim 64, 5b layout): ~0.64x. Not saved: the AdaLN outputs (recomputed in the backward of the
    QKV / feed-forward projections that read them), the GELU output (recomputed), a copy of q / k
    (normalized in place of the fused projection), the post-FF residual's x_new."""
    diffusers = pytest.importorskip("diffusers")
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    kw = {**_kwargs("5b", layers=1), "attention_head_dim": 64}
    ref = diffusers.CogVideoXTransformer3DModel(**kw).to(TRITON_DEVICE, torch.bfloat16)
    m = CogVideoX.from_diffusers(copy.deepcopy(ref), backend="triton")
    g = torch.Generator().manual_seed(0)
    S, T = 24, 3
    h = torch.randn(2, S, 128, generator=g).to(TRITON_DEVICE, torch.bfloat16).requires_grad_()
    e = torch.randn(2, T, 128, generator=g).to(TRITON_DEVICE, torch.bfloat16).requires_grad_()
    temb = torch.randn(2, 24, generator=g).to(TRITON_DEVICE, torch.bfloat16)
    cos, sin = (t.to(TRITON_DEVICE) for t in get_3d_rotary_pos_embed(64, ((0, 0), (2, 3)), (2, 3), 4))
    rb, fb = ref.transformer_blocks[0], m.transformer_blocks[0]
    theirs = saved_bytes(lambda: rb(h, e, temb, (cos, sin)), rb.parameters())
    ours = saved_bytes(lambda: fb(h, e, F.silu(temb), m._rope_tables((cos, sin), T, S, h.dtype)), fb.parameters())
    ratio = ours / theirs
    print(f"saved-for-backward ratio fastgen / diffusers: CogVideoX block {ratio:.3f}")
    assert math.isfinite(ratio) and ratio <= 0.68, ratio


# ----------------------------------------------------------------------------- inside a diffusers pipeline


@pytest.mark.parametrize("rotary", [False, True])
def test_pipeline_swap_same_video(rotary):
    """CogVideoXPipeline with tiny random components (word-level tokenizer built offline, 1-layer T5,
    tiny 3-D VAE, CFG, 2 DDIM steps): the same latents and frames with the transformer swapped for
    ``CogVideoX.from_diffusers(pipe.transformer)`` (2b layout: sin-cos; 5b layout: the pipeline's RoPE)."""
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{c: 3 + i for i, c in enumerate("abcdefghijklmnopqrstuvwxyz")}}
    wl = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    wl.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=wl, pad_token="<pad>", eos_token="</s>",
                                               unk_token="<unk>")
    torch.manual_seed(0)
    enc = transformers.T5EncoderModel(transformers.T5Config(vocab_size=len(vocab), d_model=32, d_kv=8, d_ff=32,
                                                            num_layers=1, num_heads=2)).eval()
    vae = diffusers.AutoencoderKLCogVideoX(down_block_types=("CogVideoXDownBlock3D",) * 4,
                                           up_block_types=("CogVideoXUpBlock3D",) * 4, block_out_channels=(8,) * 4,
                                           latent_channels=4, layers_per_block=1, norm_num_groups=2)
    tr = diffusers.CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=8,
        text_embed_dim=32, num_layers=1, sample_width=2, sample_height=2, sample_frames=9, max_text_seq_length=8,
        use_rotary_positional_embeddings=rotary)
    with torch.no_grad():
        for p in tr.parameters():
            p.normal_(0.0, 0.2)
    pipe = diffusers.CogVideoXPipeline(tokenizer=tok, text_encoder=enc, vae=vae, transformer=tr,
                                       scheduler=diffusers.CogVideoXDDIMScheduler())
    pipe.set_progress_bar_config(disable=True)

    def run(output_type):
        return pipe("a cat", height=16, width=16, num_frames=9, max_sequence_length=8, num_inference_steps=2,
                    guidance_scale=6.0, output_type=output_type, generator=torch.Generator().manual_seed(0)).frames

    want_latents, want_frames = run("latent"), run("pt")
    pipe.transformer = CogVideoX.from_diffusers(tr, backend="torch")
    got_latents, got_frames = run("latent"), run("pt")
    assert got_latents.shape == want_latents.shape == (1, 3, 4, 2, 2)
    _close(got_latents, want_latents)
    torch.testing.assert_close(got_frames, want_frames, rtol=1e-5, atol=1e-5)
