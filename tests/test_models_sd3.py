"""fastgen.models.SD3 against diffusers' SD3Transformer2DModel (tiny random configs, CPU).

fp32 with backend="torch": output and every parameter gradient within 1e-5 relative (max error over
max magnitude), at text lengths 1 and 77, odd token counts, batch > 1, a CFG-doubled batch,
non-square latents, SD3.5's dual attention layers and qk-norm. bf16 through the Triton kernels
(interpreter) within the FlashAttention rule on one tiny shape. Interchange: to_diffusers_state_dict
(strict), from_pretrained of a save_pretrained folder and of an original-layout single file (checked
against diffusers' own converter), errors, gradient checkpointing, torch.compile(fullgraph=True),
and the bytes saved for backward per block against the diffusers block. The helpers here are reused
by tests/test_models_flux.py.
"""

from __future__ import annotations

import math

import pytest
import torch

from conftest import INTERPRET, TRITON_DEVICE, assert_fa_rule
from fastgen.models import SD3, SD3Config
from fastgen.models._common import CheckpointMismatchError

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

TINY = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8, num_attention_heads=2,
            joint_attention_dim=12, caption_projection_dim=16, pooled_projection_dim=10, out_channels=4,
            pos_embed_max_size=8)
SD35 = dict(TINY, dual_attention_layers=(0, 1), qk_norm="rms_norm")


# ----------------------------------------------------------------------------- helpers (the other model tests share them)


def randomize(model: torch.nn.Module, seed: int = 0, std: float = 0.2) -> torch.nn.Module:
    """Every parameter ~ N(0, std) (diffusers initialises some to constants, which hides layout bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def rel_err(a, b) -> float:
    """max |a - b| / max |b| in float64; inf on NaN / inf where b is finite."""
    a, b = a.detach().double(), b.detach().double()
    if not bool(torch.isfinite(a).all()):
        return math.inf
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def param_grads_diffusers_layout(model) -> dict:
    """The fastgen model's parameter gradients, keyed and split as the diffusers model's parameters."""
    from fastgen.models._original_layout import split_blocks

    grads = {k: p.grad for k, p in model.named_parameters()}
    return split_blocks(grads, model.FUSED, model.rename, model.fused_rows(model.config))


def assert_same_as_diffusers(model, ref, out, ref_out, tol=1e-5):
    """Output and every parameter gradient (after out.square().sum().backward() on both) within tol."""
    assert rel_err(out, ref_out) <= tol, f"output: rel err {rel_err(out, ref_out):.3g}"
    grads = param_grads_diffusers_layout(model)
    for name, p in ref.named_parameters():
        assert p.grad is not None, name
        err = rel_err(grads[name], p.grad)
        assert err <= tol, f"grad of {name}: rel err {err:.3g}"


def saved_bytes(fn, params) -> int:
    """Bytes of the distinct storages autograd saves for backward while ``fn`` runs, parameters excluded."""
    skip = {p.untyped_storage().data_ptr() for p in params}
    seen: dict = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in skip:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


# ----------------------------------------------------------------------------- SD3 fixtures


def _pair(cfg=TINY, seed=0, backend="torch"):
    diffusers = pytest.importorskip("diffusers")
    ref = randomize(diffusers.SD3Transformer2DModel(**cfg), seed)
    return SD3.from_diffusers(ref, backend=backend), ref


def _inputs(B, H, W, St, cfg=TINY, seed=1, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, cfg["in_channels"], H, W, generator=g)
    ctx = torch.randn(B, St, cfg["joint_attention_dim"], generator=g)
    pooled = torch.randn(B, cfg["pooled_projection_dim"], generator=g)
    t = torch.rand(B, generator=g) * 1000
    return dict(hidden_states=x.to(device, dtype), encoder_hidden_states=ctx.to(device, dtype),
                pooled_projections=pooled.to(device, dtype), timestep=t.to(device))


# ----------------------------------------------------------------------------- fp32 equality


@pytest.mark.parametrize("cfg,B,H,W,St", [
    (TINY, 1, 4, 4, 1),      # one text token, square
    (TINY, 2, 6, 10, 77),    # 77 text tokens, non-square 3x5 patches (odd token count 15), batch 2
    (SD35, 3, 10, 6, 13),    # dual attention layers + qk-norm, odd text length, batch 3
])
def test_matches_diffusers_fp32(cfg, B, H, W, St):
    model, ref = _pair(cfg)
    kw = _inputs(B, H, W, St, cfg)
    out = model(**kw).sample
    ref_out = ref(**kw).sample
    assert out.shape == (B, cfg["out_channels"], H, W)
    out.square().sum().backward()
    ref_out.square().sum().backward()
    assert_same_as_diffusers(model, ref, out, ref_out)


def test_cfg_doubled_batch_and_tuple_return():
    model, ref = _pair(SD35)
    kw = _inputs(1, 6, 4, 5, SD35)
    uncond = _inputs(1, 6, 4, 5, SD35, seed=7)
    doubled = dict(hidden_states=torch.cat([kw["hidden_states"]] * 2),
                   encoder_hidden_states=torch.cat([uncond["encoder_hidden_states"], kw["encoder_hidden_states"]]),
                   pooled_projections=torch.cat([uncond["pooled_projections"], kw["pooled_projections"]]),
                   timestep=torch.cat([kw["timestep"]] * 2))
    (out,) = model(**doubled, return_dict=False)
    (ref_out,) = ref(**doubled, return_dict=False)
    assert rel_err(out, ref_out) <= 1e-5
    assert rel_err(out[1:], model(**kw).sample) <= 1e-5  # the conditional half alone
    assert rel_err(out[:1], out[1:]) > 1e-3  # the two halves really differ


def test_controlnet_residuals_and_skip_layers():
    model, ref = _pair(TINY)
    kw = _inputs(2, 4, 6, 3)
    g = torch.Generator().manual_seed(3)
    extra = dict(block_controlnet_hidden_states=[torch.randn(2, 6, 16, generator=g) for _ in range(2)],
                 skip_layers=[1])
    with torch.no_grad():
        assert rel_err(model(**kw, **extra).sample, ref(**kw, **extra).sample) <= 1e-5


def test_state_dict_loads_strict_and_round_trips():
    diffusers = pytest.importorskip("diffusers")
    model, ref = _pair(SD35)
    sd = model.to_diffusers_state_dict()
    fresh = diffusers.SD3Transformer2DModel(**SD35)
    fresh.load_state_dict(sd, strict=True)
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(sd[k], v, rtol=0, atol=0, msg=k)
    # a fresh fastgen model has diffusers' sin-cos position table
    torch.testing.assert_close(SD3(SD3Config(**SD35)).pos_embed.pos_embed, fresh.pos_embed.pos_embed,
                               rtol=1e-6, atol=1e-6)


def test_from_pretrained_diffusers_folder(tmp_path):
    model, ref = _pair(SD35)
    ref.save_pretrained(tmp_path / "transformer", max_shard_size="20KB")  # a pipeline folder, sharded
    assert len(list((tmp_path / "transformer").glob("*.safetensors"))) > 1
    loaded = SD3.from_pretrained(tmp_path, backend="torch")
    assert loaded.config == model.config
    kw = _inputs(2, 4, 6, 3, SD35)
    with torch.no_grad():
        assert rel_err(loaded(**kw).sample, model(**kw).sample) <= 1e-6  # BLAS may round differently


def test_original_layout_round_trip(tmp_path):
    pytest.importorskip("diffusers")
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers
    from safetensors.torch import save_file

    model, ref = _pair(SD35)
    orig = model.to_original_state_dict()
    assert any(k.startswith("joint_blocks.1.x_block.attn2.qkv") for k in orig)
    # diffusers' own converter reads what fastgen writes
    theirs = convert_sd3_transformer_checkpoint_to_diffusers({k: v.clone() for k, v in orig.items()})
    ours = ref.state_dict()
    assert sorted(theirs) == sorted(ours)
    for k, v in theirs.items():
        torch.testing.assert_close(v, ours[k], rtol=0, atol=0, msg=k)
    path = tmp_path / "sd3_original.safetensors"
    others = {"first_stage_model.decoder.conv_in.weight": torch.zeros(2),  # a full single file also holds
              "text_encoders.clip_l.transformer.x": torch.zeros(2)}      # the VAE and the text encoders
    save_file({**others, **{"model.diffusion_model." + k: v.contiguous() for k, v in orig.items()}}, str(path))
    loaded = SD3.from_pretrained(path, backend="torch")  # config inferred from the shapes
    assert loaded.config.dual_attention_layers == (0, 1) and loaded.config.qk_norm == "rms_norm"
    loaded16 = SD3.from_pretrained(path, torch_dtype=torch.bfloat16, backend="torch")
    assert loaded16.dtype == torch.bfloat16
    kw = _inputs(1, 4, 4, 2, SD35)
    with torch.no_grad():
        assert rel_err(loaded(**kw).sample, model(**kw).sample) <= 1e-6  # BLAS may round differently


# ----------------------------------------------------------------------------- errors


def test_clear_errors():
    model = SD3(SD3Config(**TINY), backend="torch")
    kw = _inputs(1, 4, 4, 2)
    with pytest.raises(ValueError, match="multiples of the patch size"):
        model(**{**kw, "hidden_states": torch.randn(1, 4, 5, 4)})
    with pytest.raises(ValueError, match="channels"):
        model(**{**kw, "hidden_states": torch.randn(1, 3, 4, 4)})
    with pytest.raises(ValueError, match="pooled_projections is required"):
        model(**{**kw, "pooled_projections": None})
    with pytest.raises(ValueError, match="encoder_hidden_states must have 12 features"):
        model(**{**kw, "encoder_hidden_states": torch.randn(1, 2, 11)})
    with pytest.raises(ValueError, match="pos_embed_max_size"):
        model(**{**kw, "hidden_states": torch.randn(1, 4, 18, 4)})
    with pytest.raises(NotImplementedError, match="joint_attention_kwargs"):
        model(**kw, joint_attention_kwargs={"ip_adapter_image_embeds": 1})
    with pytest.raises(NotImplementedError, match="SD3.load_lora_adapter: fastgen models have no"):
        model.load_lora_adapter({})
    model.fuse_qkv_projections()  # already fused: a no-op
    with pytest.raises(ValueError, match="unknown preset"):
        SD3Config.preset("sd4")
    # a dtype the kernels do not serve, with an explicit kernel backend
    from fastgen.backend import BackendUnavailableError

    f64 = SD3(SD3Config(**TINY), backend="triton").double()
    with pytest.raises(BackendUnavailableError, match="float64"):
        f64(**{k: v.double() for k, v in kw.items()})


def test_checkpoint_errors_name_the_keys(tmp_path):
    pytest.importorskip("safetensors")
    from safetensors.torch import save_file

    model = SD3(SD3Config(**TINY), backend="torch")
    # a Flux checkpoint is not an SD3 one: the error names the keys it saw
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(3, 1)}, str(tmp_path / "flux.safetensors"))
    with pytest.raises(CheckpointMismatchError, match="double_blocks.0.img_attn.qkv.weight"):
        SD3.from_pretrained(tmp_path / "flux.safetensors")
    # an SD3 checkpoint of another size: names the first mismatched key and both shapes
    save_file({k: v.contiguous() for k, v in model.to_original_state_dict().items()}, str(tmp_path / "s.safetensors"))
    with pytest.raises(CheckpointMismatchError, match=r"shape mismatch.*x_embedder\.proj\.weight"):
        SD3.from_pretrained(tmp_path / "s.safetensors", config=SD3Config(**dict(TINY, num_attention_heads=4,
                                                                                 caption_projection_dim=32)))


# ----------------------------------------------------------------------------- training features


def test_gradient_checkpointing_and_frozen_subsets():
    model, _ = _pair(dict(SD35, num_layers=2, dual_attention_layers=(0,)))
    kw = _inputs(1, 4, 6, 3, SD35)
    model(**kw).sample.square().sum().backward()
    want = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    model.enable_gradient_checkpointing()
    model(**kw).sample.square().sum().backward()
    for k, p in model.named_parameters():
        assert rel_err(p.grad, want[k]) <= 1e-5, k
    model.disable_gradient_checkpointing()
    model.zero_grad(set_to_none=True)
    for k, p in model.named_parameters():
        p.requires_grad_(".ff." in k)  # only the feed-forwards train (what an adapter does)
    model(**kw).sample.square().sum().backward()
    for k, p in model.named_parameters():
        assert (p.grad is not None) == (".ff." in k), k
        if p.grad is not None:
            assert rel_err(p.grad, want[k]) <= 1e-5, k


def test_torch_compile_fullgraph():
    cfg = dict(SD35, num_layers=1, dual_attention_layers=(0,))  # one block: dual and text pre-only
    model = randomize(SD3(SD3Config(**cfg), backend="torch"))
    kw = _inputs(1, 4, 4, 3, SD35)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="eager")  # no graph break
    out = compiled(**kw, return_dict=False)[0]
    out.square().sum().backward()
    with torch.no_grad():
        torch.testing.assert_close(out, model(**kw, return_dict=False)[0], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- bf16 through the kernels


def skip_unless_kernels():
    if TRITON_DEVICE == "cpu" and not INTERPRET:
        pytest.skip("Triton kernels need a GPU or TRITON_INTERPRET=1")


def test_bf16_triton_fa_rule():
    skip_unless_kernels()
    cfg = dict(SD35, attention_head_dim=16, caption_projection_dim=32, num_layers=1, dual_attention_layers=(0,))
    _, ref32 = _pair(cfg, backend="torch")  # one block: dual attention, qk-norm, text pre-only
    ref16 = randomize(type(ref32)(**cfg), 0).to(torch.bfloat16)
    model = SD3.from_diffusers(ref16, backend="triton").to(TRITON_DEVICE)
    kw32 = _inputs(1, 4, 6, 5, cfg)
    kw16 = _inputs(1, 4, 6, 5, cfg, dtype=torch.bfloat16)
    kwk = _inputs(1, 4, 6, 5, cfg, dtype=torch.bfloat16, device=TRITON_DEVICE)
    import fastgen

    with fastgen.backend.trace() as ran:
        out = model(**kwk).sample
    assert ("attention", "triton") in ran and ("qk_norm_rope", "triton") in ran
    truth = ref32(**kw32).sample
    lowp = ref16(**kw16).sample
    assert_fa_rule("SD3 bf16 output", out.cpu(), lowp, truth, atol=1e-2)
    for t in (out, truth, lowp):
        t.float().square().mean().backward()
    for name in ("transformer_blocks.0.attn.to_q.weight", "transformer_blocks.0.attn2.to_out.0.weight",
                 "transformer_blocks.0.ff.net.0.proj.weight", "transformer_blocks.0.norm1.linear.weight"):
        got = param_grads_diffusers_layout(model)[name].cpu()
        assert_fa_rule(f"grad {name}", got, dict(ref16.named_parameters())[name].grad,
                       dict(ref32.named_parameters())[name].grad, atol=1e-2)


def test_saved_activations_per_block_vs_diffusers():
    """Bytes saved for backward by one block (bf16, the kernels), against the diffusers block."""
    skip_unless_kernels()
    diffusers = pytest.importorskip("diffusers")
    cfg = dict(SD35, attention_head_dim=16, caption_projection_dim=32, num_layers=3, dual_attention_layers=(0,))
    ref = diffusers.SD3Transformer2DModel(**cfg).to(TRITON_DEVICE, torch.bfloat16)
    model = SD3.from_diffusers(ref, backend="triton")
    g = torch.Generator().manual_seed(0)
    x, c, temb = (torch.randn(*s, generator=g).to(TRITON_DEVICE, torch.bfloat16).requires_grad_() for s in
                  ((1, 64, 32), (1, 16, 32), (1, 32)))
    params = list(ref.parameters()) + list(model.parameters())
    ratios = {}
    for i, kind in ((0, "dual"), (1, "plain")):
        theirs = saved_bytes(lambda: ref.transformer_blocks[i](x, c, temb), params)
        ours = saved_bytes(lambda: model.transformer_blocks[i](x, c, torch.nn.functional.silu(temb)), params)
        ratios[kind] = ours / theirs
    # measured 0.54 (dual) and 0.52 (plain) at this shape (the target: 0.7)
    assert ratios["dual"] <= 0.6 and ratios["plain"] <= 0.6, ratios


# ----------------------------------------------------------------------------- drop-in inside the diffusers pipeline


def tiny_tokenizers(tmp_path):
    """A character-level CLIPTokenizer and a word-level T5TokenizerFast written to ``tmp_path``
    (built offline: no download)."""
    import json

    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in "abcdefghijklmnopqrstuvwxyz":
        vocab[ch], vocab[ch + "</w>"] = len(vocab), len(vocab) + 1
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    clip = transformers.CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"), model_max_length=77)
    words = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate("a photo of cat dog red".split())}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    t5 = transformers.T5TokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"), pad_token="<pad>",
                                      eos_token="</s>", unk_token="<unk>", extra_ids=0)
    return clip, t5


def tiny_text_encoders(clip_hidden=(8,), projection=False, t5_dim=16, seed=0):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    clip_cls = transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel
    clips = [clip_cls(transformers.CLIPTextConfig(vocab_size=54, hidden_size=h, intermediate_size=2 * h,
                                                  num_hidden_layers=2, num_attention_heads=2, projection_dim=h,
                                                  max_position_embeddings=77, eos_token_id=1)).eval()
             for h in clip_hidden]
    t5 = transformers.T5EncoderModel(transformers.T5Config(vocab_size=16, d_model=t5_dim, d_kv=4, d_ff=16,
                                                           num_layers=1, num_heads=2)).eval()
    return clips, t5


def tiny_vae(latent_channels=4):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    return diffusers.AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                                   up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=latent_channels,
                                   norm_num_groups=8, layers_per_block=1, shift_factor=0.0).eval()


def test_sd3_pipeline_same_images_with_fastgen_transformer(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    clip_tok, t5_tok = tiny_tokenizers(tmp_path)
    (clip1, clip2), t5 = tiny_text_encoders(clip_hidden=(8, 8), projection=True, t5_dim=16)
    cfg = dict(SD35, pooled_projection_dim=16, joint_attention_dim=16)  # pooled = 8 + 8 projections
    ref = randomize(diffusers.SD3Transformer2DModel(**cfg), std=0.1).eval()
    pipe = diffusers.StableDiffusion3Pipeline(
        transformer=ref, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=tiny_vae(4),
        text_encoder=clip1, tokenizer=clip_tok, text_encoder_2=clip2, tokenizer_2=clip_tok,
        text_encoder_3=t5, tokenizer_3=t5_tok)

    def images():
        return pipe("a photo of a red cat", negative_prompt="a dog", height=16, width=24, num_inference_steps=1,
                     guidance_scale=4.0, max_sequence_length=8, generator=torch.Generator().manual_seed(0),
                     output_type="pt").images

    want = images()
    pipe.transformer = SD3.from_diffusers(ref, backend="torch")
    got = images()
    assert got.shape == (1, 3, 16, 24)
    assert rel_err(got, want) <= 1e-5
