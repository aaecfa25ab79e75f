"""fastgen.models.Flux against diffusers' FluxTransformer2DModel (tiny random configs, CPU).

fp32 with backend="torch": output and every parameter gradient within 1e-5 relative, at text lengths
1 and 77, odd image token counts, batch > 1, a CFG-doubled batch, Flux-dev guidance and schnell,
several axes_dims_rope. bf16 through the Triton kernels (interpreter) within the FlashAttention rule
on one tiny shape. Interchange: to_diffusers_state_dict (strict), from_pretrained of a save_pretrained
folder and of a BFL-layout single file, errors, gradient checkpointing, torch.compile(fullgraph=True),
bytes saved for backward per block against the diffusers blocks.
"""

from __future__ import annotations

import pytest
import torch

from conftest import INTERPRET, TRITON_DEVICE, assert_fa_rule
from fastgen.models import Flux, FluxConfig
from fastgen.models._common import CheckpointMismatchError
from test_models_sd3 import (assert_same_as_diffusers, param_grads_diffusers_layout, randomize, rel_err, saved_bytes,
                             skip_unless_kernels)

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

DEV = dict(patch_size=1, in_channels=8, num_layers=2, num_single_layers=2, attention_head_dim=16,
           num_attention_heads=2, joint_attention_dim=12, pooled_projection_dim=10, guidance_embeds=True,
           axes_dims_rope=(4, 6, 6))
SCHNELL = dict(DEV, guidance_embeds=False, axes_dims_rope=(2, 6, 8), num_layers=1, num_single_layers=1)


def _pair(cfg=DEV, seed=0, backend="torch"):
    diffusers = pytest.importorskip("diffusers")
    ref = randomize(diffusers.FluxTransformer2DModel(**cfg), seed)
    return Flux.from_diffusers(ref, backend=backend), ref


def _ids(St, h, w):
    img = torch.zeros(h * w, 3)
    img[:, 1] = torch.arange(h * w) // w
    img[:, 2] = torch.arange(h * w) % w
    return torch.zeros(St, 3), img


def _inputs(B, h, w, St, cfg=DEV, seed=1, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    txt_ids, img_ids = _ids(St, h, w)
    kw = dict(hidden_states=torch.randn(B, h * w, cfg["in_channels"], generator=g),
              encoder_hidden_states=torch.randn(B, St, cfg["joint_attention_dim"], generator=g),
              pooled_projections=torch.randn(B, cfg["pooled_projection_dim"], generator=g),
              timestep=torch.rand(B, generator=g), img_ids=img_ids, txt_ids=txt_ids)
    if cfg["guidance_embeds"]:
        kw["guidance"] = torch.full((B,), 3.5)
    return {k: (v.to(device, dtype) if v.is_floating_point() and k not in ("timestep", "guidance") else v.to(device))
            for k, v in kw.items()}


# ----------------------------------------------------------------------------- fp32 equality


@pytest.mark.parametrize("cfg,B,h,w,St", [
    (DEV, 1, 3, 5, 1),        # guidance (Flux-dev), one text token, 15 image tokens
    (DEV, 2, 4, 4, 77),       # 77 text tokens, batch 2
    (SCHNELL, 3, 5, 3, 13),   # no guidance, other rotary axes, odd text length, batch 3
])
def test_matches_diffusers_fp32(cfg, B, h, w, St):
    model, ref = _pair(cfg)
    kw = _inputs(B, h, w, St, cfg)
    out = model(**kw).sample
    ref_out = ref(**kw).sample
    assert out.shape == (B, h * w, cfg["in_channels"])
    out.square().sum().backward()
    ref_out.square().sum().backward()
    assert_same_as_diffusers(model, ref, out, ref_out)


def test_cfg_doubled_batch_and_tuple_return():
    model, ref = _pair(SCHNELL)
    kw = _inputs(1, 3, 3, 4, SCHNELL)
    neg = _inputs(1, 3, 3, 4, SCHNELL, seed=5)
    doubled = dict(kw, **{k: torch.cat([neg[k], kw[k]]) for k in ("encoder_hidden_states", "pooled_projections")},
                   hidden_states=torch.cat([kw["hidden_states"]] * 2), timestep=torch.cat([kw["timestep"]] * 2))
    (out,) = model(**doubled, return_dict=False)
    (ref_out,) = ref(**doubled, return_dict=False)
    assert rel_err(out, ref_out) <= 1e-5
    assert rel_err(out[1:], model(**kw).sample) <= 1e-5
    assert rel_err(out[:1], out[1:]) > 1e-3


def test_controlnet_residuals():
    model, ref = _pair(DEV)
    kw = _inputs(2, 2, 3, 3)
    g = torch.Generator().manual_seed(3)
    for repeat in (False, True):
        extra = dict(controlnet_block_samples=[torch.randn(2, 6, 32, generator=g)],
                     controlnet_single_block_samples=[torch.randn(2, 6, 32, generator=g) for _ in range(2)],
                     controlnet_blocks_repeat=repeat)
        with torch.no_grad():
            assert rel_err(model(**kw, **extra).sample, ref(**kw, **extra).sample) <= 1e-5


def test_state_dict_strict_and_layouts(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    from safetensors.torch import save_file

    cfg = dict(DEV, num_attention_heads=1, attention_head_dim=32, axes_dims_rope=(4, 14, 14))  # Flux's split of d
    model, ref = _pair(cfg)
    sd = model.to_diffusers_state_dict()
    diffusers.FluxTransformer2DModel(**cfg).load_state_dict(sd, strict=True)
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(sd[k], v, rtol=0, atol=0, msg=k)
    kw = _inputs(1, 2, 3, 2, cfg)
    # diffusers layout, pipeline folder
    ref.save_pretrained(tmp_path / "pipe" / "transformer")
    loaded = Flux.from_pretrained(tmp_path / "pipe", backend="torch")
    # BFL's layout: fused qkv and single-block linear1, (shift, scale) final modulation
    orig = model.to_original_state_dict()
    assert orig["single_blocks.1.linear1.weight"].shape == (3 * 32 + 4 * 32, 32)
    torch.testing.assert_close(orig["final_layer.adaLN_modulation.1.weight"][:32],
                               ref.state_dict()["norm_out.linear.weight"][32:], rtol=0, atol=0)
    save_file({"model.diffusion_model." + k: v.contiguous() for k, v in orig.items()},
              str(tmp_path / "flux1-tiny.safetensors"))
    from_bfl = Flux.from_pretrained(tmp_path / "flux1-tiny.safetensors", backend="torch")
    assert from_bfl.config == model.config  # inferred from the shapes
    with torch.no_grad():
        want = model(**kw).sample
        assert rel_err(loaded(**kw).sample, want) <= 1e-6  # BLAS may round differently
        assert rel_err(from_bfl(**kw).sample, want) <= 1e-6  # BLAS may round differently


def test_clear_errors():
    dev = Flux(FluxConfig(**DEV), backend="torch")
    kw = _inputs(1, 2, 2, 3)
    with pytest.raises(ValueError, match="guidance is required"):
        dev(**{**kw, "guidance": None})
    with pytest.raises(ValueError, match="guidance_embeds=False"):
        Flux(FluxConfig(**SCHNELL), backend="torch")(**kw)
    with pytest.raises(ValueError, match="in_channels=8"):
        dev(**{**kw, "hidden_states": torch.randn(1, 4, 7)})
    with pytest.raises(ValueError, match=r"img_ids must have shape \(4, 3\)"):
        dev(**{**kw, "img_ids": torch.zeros(5, 3)})
    with pytest.raises(ValueError, match="axes_dims_rope"):
        FluxConfig(**dict(DEV, axes_dims_rope=(4, 4, 4)))
    from fastgen.backend import BackendUnavailableError

    with pytest.raises(BackendUnavailableError, match="float64"):
        Flux(FluxConfig(**DEV), backend="triton").double()(**{k: v.double() if v.is_floating_point() else v
                                                               for k, v in kw.items()})


def test_checkpoint_errors_name_the_keys(tmp_path):
    pytest.importorskip("safetensors")
    from safetensors.torch import save_file

    dev = Flux(FluxConfig(**DEV), backend="torch")
    save_file({"joint_blocks.0.x_block.attn.qkv.weight": torch.zeros(3, 1)}, str(tmp_path / "sd3.safetensors"))
    with pytest.raises(CheckpointMismatchError, match="joint_blocks.0.x_block.attn.qkv.weight"):
        Flux.from_pretrained(tmp_path / "sd3.safetensors")
    save_file({k: v.contiguous() for k, v in dev.to_original_state_dict().items()}, str(tmp_path / "f.safetensors"))
    with pytest.raises(CheckpointMismatchError, match=r"img_in\.weight"):
        Flux.from_pretrained(tmp_path / "f.safetensors", config=FluxConfig(**dict(DEV, num_attention_heads=3)))
    with pytest.raises(ValueError, match="cannot infer axes_dims_rope"):
        Flux.from_pretrained(tmp_path / "f.safetensors")  # head dim 16: Flux's split (2, 7, 7) is odd


# ----------------------------------------------------------------------------- training features


def test_gradient_checkpointing():
    model, _ = _pair(SCHNELL)
    kw = _inputs(2, 2, 3, 3, SCHNELL)
    model(**kw).sample.square().sum().backward()
    want = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    model.enable_gradient_checkpointing()
    model(**kw).sample.square().sum().backward()
    for k, p in model.named_parameters():
        assert rel_err(p.grad, want[k]) <= 1e-5, k


def test_torch_compile_fullgraph():
    model = randomize(Flux(FluxConfig(**SCHNELL), backend="torch"))
    kw = _inputs(1, 2, 3, 3, SCHNELL)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="eager")  # no graph break
    out = compiled(**kw, return_dict=False)[0]
    out.square().sum().backward()
    with torch.no_grad():
        torch.testing.assert_close(out, model(**kw, return_dict=False)[0], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- bf16 through the kernels


def test_bf16_triton_fa_rule():
    skip_unless_kernels()
    diffusers = pytest.importorskip("diffusers")
    cfg = dict(DEV, num_layers=1, num_single_layers=1)
    _, ref32 = _pair(cfg)
    ref16 = randomize(diffusers.FluxTransformer2DModel(**cfg), 0).to(torch.bfloat16)
    model = Flux.from_diffusers(ref16, backend="triton").to(TRITON_DEVICE)
    import fastgen

    with fastgen.backend.trace() as ran:
        out = model(**_inputs(1, 3, 5, 5, cfg, dtype=torch.bfloat16, device=TRITON_DEVICE)).sample
    assert ("attention", "triton") in ran and ("qk_norm_rope", "triton") in ran
    truth = ref32(**_inputs(1, 3, 5, 5, cfg)).sample
    lowp = ref16(**_inputs(1, 3, 5, 5, cfg, dtype=torch.bfloat16)).sample
    assert_fa_rule("Flux bf16 output", out.cpu(), lowp, truth, atol=1e-2)
    for t in (out, truth, lowp):
        t.float().square().mean().backward()
    grads = param_grads_diffusers_layout(model)
    for name in ("transformer_blocks.0.attn.to_k.weight", "transformer_blocks.0.attn.norm_added_q.weight",
                 "single_transformer_blocks.0.proj_mlp.weight", "single_transformer_blocks.0.proj_out.weight"):
        assert_fa_rule(f"grad {name}", grads[name].cpu(), dict(ref16.named_parameters())[name].grad,
                       dict(ref32.named_parameters())[name].grad, atol=1e-2)


def test_saved_activations_per_block_vs_diffusers():
    """Bytes saved for backward by one double and one single block (bf16, the kernels) vs diffusers'."""
    skip_unless_kernels()
    diffusers = pytest.importorskip("diffusers")
    cfg = dict(DEV, num_layers=1, num_single_layers=1, guidance_embeds=False)
    ref = diffusers.FluxTransformer2DModel(**cfg).to(TRITON_DEVICE, torch.bfloat16)
    model = Flux.from_diffusers(ref, backend="triton")
    g = torch.Generator().manual_seed(0)
    St, h, w = 16, 8, 8
    x, c, temb = (torch.randn(*s, generator=g).to(TRITON_DEVICE, torch.bfloat16).requires_grad_() for s in
                  ((1, h * w, 32), (1, St, 32), (1, 32)))
    txt_ids, img_ids = (t.to(TRITON_DEVICE) for t in _ids(St, h, w))
    cos, sin = model.rope_tables(txt_ids, img_ids)
    rot = ref.pos_embed(torch.cat([txt_ids, img_ids]))
    e = torch.nn.functional.silu(temb)
    params = list(ref.parameters()) + list(model.parameters())
    z = torch.cat([c, x], 1)
    double = (saved_bytes(lambda: model.transformer_blocks[0](x, c, e, cos, sin), params)
              / saved_bytes(lambda: ref.transformer_blocks[0](x, c, temb, image_rotary_emb=rot), params))
    single = (saved_bytes(lambda: model.single_transformer_blocks[0](z, e, cos, sin), params)
              / saved_bytes(lambda: ref.single_transformer_blocks[0](x, c, temb, image_rotary_emb=rot), params))
    # measured 0.56 (double) and 0.55 (single) at this shape (the target: 0.7)
    assert double <= 0.6 and single <= 0.6, (double, single)


# ----------------------------------------------------------------------------- drop-in inside the diffusers pipeline


def test_flux_pipeline_same_images_with_fastgen_transformer(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    from test_models_sd3 import tiny_text_encoders, tiny_tokenizers, tiny_vae

    clip_tok, t5_tok = tiny_tokenizers(tmp_path)
    (clip,), t5 = tiny_text_encoders(clip_hidden=(10,), t5_dim=12)
    cfg = dict(DEV, in_channels=16, num_layers=1, num_single_layers=1)  # 2x2-packed 4-channel latent
    ref = randomize(diffusers.FluxTransformer2DModel(**cfg), std=0.1).eval()
    pipe = diffusers.FluxPipeline(transformer=ref, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(),
                                  vae=tiny_vae(4), text_encoder=clip, tokenizer=clip_tok, text_encoder_2=t5,
                                  tokenizer_2=t5_tok)

    def images():
        return pipe("a photo of a red cat", height=16, width=24, num_inference_steps=1, guidance_scale=3.5,
                    max_sequence_length=8, generator=torch.Generator().manual_seed(0), output_type="pt").images

    want = images()
    pipe.transformer = Flux.from_diffusers(ref, backend="torch")
    got = images()
    assert got.shape == (1, 3, 16, 24)
    assert rel_err(got, want) <= 1e-5
