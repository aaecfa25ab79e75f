"""fastgen.models.PixArt against diffusers' PixArtTransformer2DModel (tiny random configs, CPU).

fp32 outputs and every gradient (backend="torch") within 1e-5 relative, with the text mask,
additional conditions, odd token counts, text length 1, non-square latents; bf16 through the
Triton kernels (varlen attention for the mask) within the FlashAttention rule; interchange,
from_pretrained, errors, checkpointing, torch.compile, saved bytes per block, PixArtAlphaPipeline.
"""

from __future__ import annotations

import pytest
import torch

from conftest import INTERPRET, TRITON_DEVICE, assert_fa_rule
from fastgen.models import PixArt, PixArtConfig
from fastgen.models._common import CheckpointMismatchError
from test_models_sd3 import rel_err, saved_bytes

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

TINY = dict(num_attention_heads=2, attention_head_dim=24, in_channels=4, out_channels=8, num_layers=2,
            sample_size=8, patch_size=2, cross_attention_dim=48, caption_channels=20)


def _diffusers(seed=0, dtype=torch.float32, **over):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(seed)
    return diffusers.PixArtTransformer2DModel(**{**TINY, **over}).to(dtype).eval()


def _inputs(B, H, W, L, additional, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 4, H, W, generator=g)
    t = torch.randint(0, 1000, (B,), generator=g).float()
    enc = torch.randn(B, L, 20, generator=g)
    kw = dict(encoder_hidden_states=enc, timestep=t)
    if additional:
        kw["added_cond_kwargs"] = {"resolution": torch.tensor([[8.0 * H, 8.0 * W]] * B),
                                   "aspect_ratio": torch.tensor([[H / W]] * B)}
    else:
        kw["added_cond_kwargs"] = {"resolution": None, "aspect_ratio": None}
    return x, kw


CASES = {
    # B, latent H x W, text length, mask rows (None: no mask), additional conditions
    "odd-tokens-mask-additional": (3, 6, 6, 7, [[1, 1, 1, 0, 0, 0, 0], [1] * 7, [0, 1, 0, 1, 0, 1, 1]], True),
    "non-square-text-1": (2, 4, 10, 1, None, False),
    "bias-mask-cfg-batch": (4, 4, 4, 5, "bias", False),
    "text-77-mask": (2, 4, 4, 77, [[1] * 10 + [0] * 67, [1] * 77], False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_diffusers_fp32(case):
    B, H, W, L, mask, additional = CASES[case]
    ref = _diffusers(use_additional_conditions=additional)
    m = PixArt.from_diffusers(ref, backend="torch")
    x, kw = _inputs(B, H, W, L, additional)
    if mask == "bias":  # diffusers' own bias form (B, 1, L): 0 keep, -10000 drop
        keep = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]])
        kw["encoder_attention_mask"] = ((1 - keep.float()) * -10000.0)[:, None]
    elif mask is not None:
        kw["encoder_attention_mask"] = torch.tensor(mask)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ea, eb = (kw["encoder_hidden_states"].clone().requires_grad_() for _ in range(2))
    out = m(xa, **{**kw, "encoder_hidden_states": ea}).sample
    exp = ref(xb, **{**kw, "encoder_hidden_states": eb}).sample
    assert out.shape == (B, 8, H, W)
    assert rel_err(out, exp) <= 1e-5
    g = torch.randn_like(exp)
    (out * g).sum().backward()
    (exp * g).sum().backward()
    assert rel_err(xa.grad, xb.grad) <= 1e-5 and rel_err(ea.grad, eb.grad) <= 1e-5
    want = PixArt.state_dict_from_diffusers({n: p.grad for n, p in ref.named_parameters() if p.grad is not None})
    got = {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
    assert set(got) == set(want) and len(got) > 30
    # relative to the tensor's own scale, floored at 1e-4 of the largest gradient: with one text
    # token the softmax is constant, so Q's exact gradient is 0 (ours) and diffusers' is ~1e-9 noise
    floor = 1e-4 * max(v.abs().max().item() for v in want.values())
    for n in got:
        err = (got[n] - want[n]).abs().max().item()
        assert err <= 1e-5 * max(want[n].abs().max().item(), floor), n


def test_fully_masked_sample_is_unmasked_attention():
    """A sample whose text keys are all dropped: diffusers adds the same -10000 to every score,
    which cancels in the softmax (up to fp32 rounding of s - 10000); the exact value is attention
    over all keys, i.e. the unmasked model."""
    ref = _diffusers(use_additional_conditions=False)
    m = PixArt.from_diffusers(ref, backend="torch")
    x, kw = _inputs(2, 4, 4, 6, False)
    mask = torch.tensor([[1, 1, 0, 0, 0, 0], [0] * 6])
    out = m(x, **kw, encoder_attention_mask=mask).sample
    exact = ref(x, **kw, encoder_attention_mask=torch.tensor([[1, 1, 0, 0, 0, 0], [1] * 6])).sample
    assert rel_err(out, exact) <= 1e-5
    assert rel_err(out, ref(x, **kw, encoder_attention_mask=mask).sample) <= 1e-3


def test_state_dict_round_trip_strict_and_presets():
    diffusers = pytest.importorskip("diffusers")
    m = PixArt(PixArtConfig(**TINY), backend="torch").eval()
    assert m.config.use_additional_conditions is False and m.config.interpolation_scale == 1
    ref = diffusers.PixArtTransformer2DModel(**m.diffusers_config())
    ref.load_state_dict(m.to_diffusers_state_dict(), strict=True)
    x, kw = _inputs(2, 4, 4, 3, False)
    assert rel_err(m(x, **kw).sample, ref.eval()(x, **kw).sample) <= 1e-5
    for name, additional, scale in (("PixArt-alpha-1024", True, 2), ("PixArt-Sigma-1024", False, 2),
                                    ("PixArt-alpha-512", False, 1)):
        cfg = PixArtConfig.preset(name)
        assert (cfg.use_additional_conditions, cfg.interpolation_scale, cfg.inner_dim) == (additional, scale, 1152)
    with torch.device("meta"):  # PixArt-XL-2-1024-MS at full size, no memory
        ours = PixArt(PixArtConfig.preset("PixArt-alpha-1024"))
        theirs = diffusers.PixArtTransformer2DModel(**ours.diffusers_config())
    n = sum(p.numel() for p in ours.parameters())
    assert n == sum(p.numel() for p in theirs.parameters()) and 0.6e9 < n < 0.62e9  # "0.6 B"


def test_from_pretrained_and_mismatch(tmp_path):
    ref = _diffusers(use_additional_conditions=True)
    ref.save_pretrained(tmp_path / "px", max_shard_size="40KB")
    m = PixArt.from_pretrained(str(tmp_path / "px"), backend="torch")
    x, kw = _inputs(2, 4, 6, 3, True)
    assert rel_err(m(x, **kw).sample, ref(x, **kw).sample) <= 1e-5
    diffusers = pytest.importorskip("diffusers")
    diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, num_layers=1,
                                    sample_size=8).save_pretrained(tmp_path / "dit")
    with pytest.raises(CheckpointMismatchError, match=r"missing key\(s\), first: \['scale_shift_table'"):
        PixArt.from_pretrained(str(tmp_path / "dit"), config=PixArtConfig(**TINY))


def test_bad_inputs():
    m = PixArt(PixArtConfig(**TINY, use_additional_conditions=True), backend="torch")
    x, kw = _inputs(2, 4, 4, 3, True)
    with pytest.raises(ValueError, match="multiples of the patch size"):
        m(torch.randn(2, 4, 4, 3), **kw)
    with pytest.raises(ValueError, match="5 channels but the model takes in_channels=4"):
        m(torch.randn(2, 5, 4, 4), **kw)
    with pytest.raises(ValueError, match="uses additional conditions"):
        m(x, **{**kw, "added_cond_kwargs": None})
    with pytest.raises(ValueError, match=r"encoder_hidden_states \(B=2, L, 20\)"):
        m(x, **{**kw, "encoder_hidden_states": torch.randn(2, 3, 48)})
    with pytest.raises(ValueError, match="encoder_attention_mask covers"):
        m(x, **kw, encoder_attention_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="other additive biases are not supported"):
        m(x, **kw, encoder_attention_mask=torch.full((2, 1, 3), -0.5))
    from fastgen.backend import BackendUnavailableError

    with pytest.raises(BackendUnavailableError, match=r"backend='triton' runs the attention kernels in bfloat16"):
        PixArt(PixArtConfig(**TINY, use_additional_conditions=True), backend="triton")(x, **kw)


def test_requires_grad_on_a_subset():
    """Frozen base, a few trainable tensors: only those get gradients, equal to diffusers'."""
    ref = _diffusers(use_additional_conditions=False)
    m = PixArt.from_diffusers(ref, backend="torch")
    train = {"transformer_blocks.0.attn2.to_kv.weight", "transformer_blocks.1.scale_shift_table",
             "transformer_blocks.1.ff.fc1.bias"}
    for n, p in m.named_parameters():
        p.requires_grad_(n in train)
    x, kw = _inputs(2, 4, 4, 3, False)
    kw["encoder_attention_mask"] = torch.tensor([[1, 1, 0], [1, 1, 1]])
    m(x, **kw).sample.square().sum().backward()
    ref(x, **kw).sample.square().sum().backward()
    want = PixArt.state_dict_from_diffusers({n: p.grad for n, p in ref.named_parameters()})
    assert {n for n, p in m.named_parameters() if p.grad is not None} == train
    for n in train:
        assert rel_err(m.get_parameter(n).grad, want[n]) <= 1e-5, n


def test_gradient_checkpointing_same_gradients():
    ref = _diffusers(use_additional_conditions=False)
    x, kw = _inputs(2, 4, 4, 3, False)
    kw["encoder_attention_mask"] = torch.tensor([[1, 1, 0], [1, 0, 0]])
    grads = []
    for ckpt in (False, True):
        m = PixArt.from_diffusers(ref, backend="torch")
        if ckpt:
            m.enable_gradient_checkpointing()
        m(x, **kw).sample.square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
        for p in ref.parameters():
            p.grad = None
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-6, atol=1e-7)


def test_torch_compile_fullgraph():
    ref = _diffusers(use_additional_conditions=True, num_layers=1)
    m = PixArt.from_diffusers(ref, backend="torch")
    x, kw = _inputs(2, 4, 4, 3, True)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    assert rel_err(compiled(x, **kw, return_dict=False)[0], m(x, **kw).sample) <= 1e-6


@pytest.mark.skipif(not INTERPRET and TRITON_DEVICE == "cpu", reason="Triton kernels on CPU need TRITON_INTERPRET=1")
def test_bf16_triton_fa_rule():
    """bf16 through the Triton kernels (self-attention, masked cross-attention as varlen, the
    modulate family) vs the fp32 diffusers model: no worse than diffusers in bf16."""
    from fastgen import backend

    ref32 = _diffusers(num_layers=1, use_additional_conditions=True).to(TRITON_DEVICE)
    ref16 = _diffusers(num_layers=1, use_additional_conditions=True, dtype=torch.bfloat16).to(TRITON_DEVICE)
    m = PixArt.from_diffusers(ref16, backend="triton")
    x, kw = _inputs(2, 6, 6, 5, True)
    kw["encoder_attention_mask"] = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    runs = []
    for model, dt, ours in ((ref32, torch.float32, False), (ref16, torch.bfloat16, False),
                            (m, torch.bfloat16, True)):
        xi = x.detach().to(TRITON_DEVICE, dt).clone().requires_grad_()
        ki = {k: (v.to(TRITON_DEVICE, dt) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
        with backend.trace() as ran:
            out = model(xi, **ki).sample
            out.float().square().sum().backward()
        if ours:
            assert ("attention", "triton") in ran and ("layer_norm_modulate", "triton") in ran
        blk = model.transformer_blocks[0]
        kv = blk.attn2.to_kv.weight.grad[:48] if ours else blk.attn2.to_k.weight.grad
        fc2 = blk.ff.fc2.weight.grad if ours else blk.ff.net[2].weight.grad
        runs.append((out.float(), xi.grad.float(), kv.float(), fc2.float(), blk.scale_shift_table.grad.float()))
    for i, name in enumerate(("out", "dx", "dWk_cross", "dW_fc2", "d_scale_shift_table")):
        scale = runs[0][i].abs().max().item()
        assert_fa_rule(name, runs[2][i], runs[1][i], runs[0][i], atol=1e-2 * scale)


@pytest.mark.skipif(not INTERPRET and TRITON_DEVICE == "cpu", reason="Triton kernels on CPU need TRITON_INTERPRET=1")
def test_saved_activation_bytes_per_block():
    """Bytes saved for backward by 3 blocks (bf16, unmasked text) vs diffusers' blocks of the same
    config; a storage saved by two neighbouring blocks counts once, as in memory."""
    ref = _diffusers(num_layers=3, dtype=torch.bfloat16).to(TRITON_DEVICE)
    m = PixArt.from_diffusers(ref, backend="triton")
    B, S, L, N = 2, 16, 4, 48
    dev, bf = TRITON_DEVICE, torch.bfloat16
    x = torch.randn(B, S, N, dtype=bf, device=dev, requires_grad=True)
    mod = torch.randn(B, 6 * N, dtype=bf, device=dev, requires_grad=True)
    ctx = torch.randn(B, L, N, dtype=bf, device=dev, requires_grad=True)

    def run(blocks, call):
        h = x
        for b in blocks:
            h = call(b, h)
        return h

    theirs = saved_bytes(lambda: run(ref.transformer_blocks, lambda b, h: b(h, encoder_hidden_states=ctx,
                                                                          timestep=mod)), ref.parameters())
    outs = []
    ours = saved_bytes(lambda: outs.append(run(m.transformer_blocks, lambda b, h: b(h, mod, ctx, None))),
                       m.parameters())
    ratio = ours / theirs
    unit = 3 * B * S * N * 2
    print(f"PixArt saved bytes per block: fastgen {ours / unit:.2f} x (B, S, N) bf16, diffusers "
          f"{theirs / unit:.2f} x; ratio {ratio:.3f}")
    assert torch.isfinite(outs[0]).all()
    assert ratio <= 0.70  # the target; measured 0.676 here, 0.668 at 256 tokens


def _tiny_t5_tokenizer(tmp_path):
    """A word-level tokenizer built offline (no T5 sentencepiece model needed for a swap test)."""
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    words = ["<pad>", "</s>", "<unk>", "a", "red", "cat", "on", "the", "moon", "blue", "dog"]
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                                unk_token="<unk>")


def test_pixart_pipeline_swap(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    tokenizer = _tiny_t5_tokenizer(tmp_path)
    torch.manual_seed(0)
    t5 = transformers.T5EncoderModel(transformers.T5Config(vocab_size=11, d_model=20, d_kv=8, d_ff=32, num_layers=1,
                                                           num_heads=2, pad_token_id=0, eos_token_id=1)).eval()
    vae = diffusers.AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=4,
                                  down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",))
    ref = _diffusers(use_additional_conditions=False)
    pipe = diffusers.PixArtAlphaPipeline(tokenizer=tokenizer, text_encoder=t5, vae=vae.eval(), transformer=ref,
                                         scheduler=diffusers.DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    kw = dict(prompt=["a red cat", "the blue dog on the moon"], num_inference_steps=2, guidance_scale=3.0,
              height=8, width=8, output_type="pt", use_resolution_binning=False, clean_caption=False,
              max_sequence_length=8)
    exp = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    pipe.transformer = PixArt.from_diffusers(ref, backend="torch")
    assert isinstance(pipe.transformer, PixArt)
    out = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    assert out.shape == exp.shape == (2, 3, 8, 8)
    assert rel_err(out, exp) <= 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_pixart_alpha_width_triton():
    """GPU tier: PixArt-α's width at 1024 px (4096 tokens), 2 blocks, B = 2, 120 text tokens with
    padding (varlen cross-attention), bf16 on the Triton kernels vs the fp32 reference path
    (equal to diffusers, tested above on CPU): FA rule on the output and two gradients."""
    from fastgen import backend

    cfg = PixArtConfig.preset("PixArt-alpha-1024").replace(num_layers=2)
    torch.manual_seed(0)
    ref = PixArt(cfg, backend="torch").cuda().eval()
    x = torch.randn(2, 4, 128, 128, device="cuda")
    text = torch.randn(2, 120, 4096, device="cuda")
    mask = (torch.arange(120, device="cuda")[None] < torch.tensor([[17], [120]], device="cuda")).long()
    cond = {"resolution": torch.tensor([[1024.0, 1024.0]] * 2, device="cuda"),
            "aspect_ratio": torch.ones(2, 1, device="cuda")}
    t = torch.tensor([20.0, 800.0], device="cuda")
    runs = []
    # baseline: the reference path in bf16 (bf16 GEMMs and residual stream, attention in fp32 inside)
    for dt, bk in ((torch.float32, "torch"), (torch.bfloat16, "torch"), (torch.bfloat16, "triton")):
        m = PixArt(cfg, backend=bk).cuda().eval().to(dt)
        m.load_state_dict(ref.state_dict())
        xi = x.to(dt).requires_grad_()
        kw = dict(encoder_hidden_states=text.to(dt), timestep=t, encoder_attention_mask=mask,
                  added_cond_kwargs={k: v.to(dt) for k, v in cond.items()})
        with backend.trace() as ran:
            out = m(xi, **kw).sample
            out.float().square().mean().backward()
        if bk == "triton":
            for op in ("attention", "layer_norm_modulate", "gated_residual"):
                assert (op, "triton") in ran, (op, ran)
        blk = m.transformer_blocks[1]
        runs.append((out.float(), xi.grad.float(), blk.attn2.to_kv.weight.grad.float()))
    for i, name in enumerate(("out", "dx", "dW_kv_cross")):
        assert_fa_rule(name, runs[2][i], runs[1][i], runs[0][i], atol=1e-2 * runs[0][i].abs().max().item())
