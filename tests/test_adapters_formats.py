"""Adapter file formats: round trips through every format for every kind, format detection,
errors that name keys, and the independent reference — diffusers' own loaders (the path
``load_lora_weights`` takes: ``lora_state_dict`` then ``load_lora_into_unet``) and diffusers'
own saver, on a tiny UNet2DConditionModel in fp32 on CPU."""

from __future__ import annotations

import copy

import pytest
import torch
from test_adapters import Block, _inputs, _one_thread, _randomize  # noqa: F401 (_one_thread: autouse)

import fastgen.adapters as A


def load_file(path):
    return pytest.importorskip("safetensors.torch").load_file(path)


def save_file(sd, path):
    return pytest.importorskip("safetensors.torch").save_file(sd, path)


KINDS = [("lora", {}), ("lora", {"rslora": True}), ("dora", {}), ("loha", {}), ("lokr", {}), ("lokr", {"full_matrix": True})]


ROUND_TRIPS = [(f, k, kw) for f in ("peft", "kohya", "comfyui") for k, kw in KINDS if f == "peft" or "full_matrix" not in kw]


@pytest.mark.parametrize("fmt,kind,kw", ROUND_TRIPS, ids=[f"{f}-{k}{''.join(kw)}" for f, k, kw in ROUND_TRIPS])
def test_round_trip_every_format(tmp_path, fmt, kind, kw):
    pytest.importorskip("safetensors")  # adapter files are safetensors
    torch.manual_seed(0)
    base = Block().eval()
    model = copy.deepcopy(base)
    A.add_adapter(model, "a", kind=kind, rank=2, alpha=3.0, targets="all", **kw)
    _randomize(model, "a")
    x, img = _inputs()
    want = model(x, img)
    path = tmp_path / f"a_{fmt}.safetensors"
    A.save(model, path, format=fmt, name="a")
    w = A.load(path)
    assert w.format == fmt and w.kinds == {kind}
    assert w.base == A.fingerprint(base) and w.base_class == "Block"
    fresh = copy.deepcopy(base)
    A.apply(fresh, w, name="b", scale=1.0)
    got = fresh(x, img)
    for g, t in zip(got, want):
        torch.testing.assert_close(g, t, atol=2e-6, rtol=1e-5)
    assert (got[0] - base(x, img)[0]).abs().max() > 1e-2
    # and once more from the re-saved file: a fixed point
    A.save(fresh, tmp_path / "again.safetensors", format=fmt, name="b")
    one, two = load_file(path), load_file(tmp_path / "again.safetensors")
    assert one.keys() == two.keys()
    for k in one:
        torch.testing.assert_close(two[k], one[k], atol=1e-6, rtol=1e-6)


def test_key_names_per_format(tmp_path):
    pytest.importorskip("safetensors")  # adapter files are safetensors
    model = Block()
    A.add_adapter(model, "a", rank=2, alpha=4.0, targets=["to_q"])
    A.add_adapter(model, "d", kind="dora", rank=2, targets=["ff.0"])
    names = {}
    for fmt in ("peft", "kohya", "comfyui"):
        A.save(model, tmp_path / f"{fmt}.safetensors", format=fmt, name="a")
        A.save(model, tmp_path / f"{fmt}_d.safetensors", format=fmt, name="d")
        names[fmt] = sorted(load_file(tmp_path / f"{fmt}.safetensors")) + sorted(load_file(tmp_path / f"{fmt}_d.safetensors"))
    assert names["peft"] == ["to_q.lora_A.weight", "to_q.lora_B.weight",
                             "ff.0.lora_A.weight", "ff.0.lora_B.weight", "ff.0.lora_magnitude_vector"]
    assert names["kohya"] == ["lora_unet_to_q.alpha", "lora_unet_to_q.lora_down.weight", "lora_unet_to_q.lora_up.weight",
                              "lora_unet_ff_0.alpha", "lora_unet_ff_0.dora_scale", "lora_unet_ff_0.lora_down.weight",
                              "lora_unet_ff_0.lora_up.weight"]
    assert names["comfyui"][:3] == ["diffusion_model.to_q.alpha", "diffusion_model.to_q.lora_A.weight",
                                    "diffusion_model.to_q.lora_B.weight"]
    assert load_file(tmp_path / "kohya.safetensors")["lora_unet_to_q.alpha"].item() == 4.0


def test_unmappable_keys_are_named(tmp_path):
    pytest.importorskip("safetensors")  # adapter files are safetensors
    save_file({"lora_unet_to_q.lora_down.weight": torch.zeros(2, 12), "lora_unet_to_q.lora_up.weight": torch.zeros(12, 2),
               "lora_unet_to_q.lora_mid.weight": torch.zeros(2, 2)}, tmp_path / "odd.safetensors")
    with pytest.raises(A.UnmappableKeyError, match="lora_unet_to_q.lora_mid.weight"):
        A.load(tmp_path / "odd.safetensors")
    save_file({"some.weight": torch.zeros(2)}, tmp_path / "none.safetensors")
    with pytest.raises(A.UnmappableKeyError, match="not an adapter file"):
        A.load(tmp_path / "none.safetensors")
    # a kohya file for another model: every unmatched key is listed
    save_file({"lora_unet_mid_block_attn_to_q.lora_down.weight": torch.zeros(2, 12),
               "lora_unet_mid_block_attn_to_q.lora_up.weight": torch.zeros(12, 2),
               "lora_unet_to_q.lora_down.weight": torch.zeros(2, 12), "lora_unet_to_q.lora_up.weight": torch.zeros(12, 2),
               "lora_te_text_model_fc1.lora_down.weight": torch.zeros(2, 4),
               "lora_te_text_model_fc1.lora_up.weight": torch.zeros(4, 2)}, tmp_path / "other.safetensors")
    w = A.load(tmp_path / "other.safetensors")
    assert w.format == "kohya" and set(w.extra) == {"text_encoder"}
    with pytest.raises(A.UnmappableKeyError, match="text_encoder.*lora_te_text_model_fc1"):
        A.apply(Block(), w)
    w.extra.clear()
    with pytest.raises(A.UnmappableKeyError, match="1 of the file's 2 layers.*lora_unet_mid_block_attn_to_q"):
        A.apply(Block(), w)


def test_mixing_adapters_of_different_base_models(tmp_path):
    pytest.importorskip("safetensors")  # adapter files are safetensors
    small, wide = Block(), Block(d=16)
    A.add_adapter(small, "a", rank=2, targets=["to_q"])
    A.save(small, tmp_path / "small.safetensors", name="a")
    with pytest.raises(ValueError, match="different base model"):
        A.apply(wide, tmp_path / "small.safetensors")


def test_rslora_written_as_equivalent_alpha(tmp_path):
    pytest.importorskip("safetensors")  # adapter files are safetensors
    model = Block()
    A.add_adapter(model, "a", rank=4, alpha=2.0, rslora=True, targets=["to_q"])
    A.save(model, tmp_path / "k.safetensors", format="kohya", name="a")
    assert load_file(tmp_path / "k.safetensors")["lora_unet_to_q.alpha"].item() == pytest.approx(4.0)  # 2 * sqrt(4)


# --- diffusers as the independent reference ---------------------------------------------------


@pytest.fixture(scope="module")
def tiny_unet():
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8, attention_head_dim=2, norm_num_groups=4,
    ).eval()
    g = torch.Generator().manual_seed(1)
    inputs = (torch.randn(1, 4, 8, 8, generator=g), torch.tensor([3]), torch.randn(1, 3, 8, generator=g))
    with torch.no_grad():
        plain = unet(*inputs).sample
    return unet, inputs, plain


def _sd_pipeline_class():
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline


@pytest.mark.parametrize("fmt,kind", [("diffusers", "lora"), ("kohya", "lora"), ("diffusers", "dora"), ("diffusers", "lokr")])
def test_fastgen_file_loads_in_diffusers(tmp_path, tiny_unet, fmt, kind):
    """fastgen saves; diffusers' own loader (load_lora_weights' path) reads it into a clean UNet.
    (diffusers drops kohya's dora_scale and has no LoHa loader; fastgen reads both itself.)"""
    pytest.importorskip("safetensors")  # adapter files are safetensors
    unet, inputs, plain = tiny_unet
    ours = copy.deepcopy(unet)
    A.add_adapter(ours, "a", kind=kind, rank=2, alpha=6.0, targets="all" if kind == "lora" else "attention")  # "all": LoCoN on every conv too
    A.add_adapter(ours, "tweak", rank=1, alpha=1.0, targets=["attn1.to_q"])  # not saved: stays out of the file
    A.remove(ours, "tweak")
    _randomize(ours, "a")
    with torch.no_grad():
        want = ours(*inputs).sample
    path = tmp_path / f"fastgen_{fmt}_{kind}.safetensors"
    A.save(ours, path, format=fmt, name="a")
    pipe_cls = _sd_pipeline_class()
    theirs = copy.deepcopy(unet)
    sd, alphas, meta = pipe_cls.lora_state_dict(str(path), return_lora_metadata=True)
    pipe_cls.load_lora_into_unet(sd, alphas, unet=theirs, adapter_name="a", metadata=meta)
    with torch.no_grad():
        got = theirs(*inputs).sample
    assert (want - plain).abs().max() > 1e-3, "the adapter must move the output"
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_diffusers_file_loads_in_fastgen(tmp_path, tiny_unet):
    """diffusers (peft) trains and saves with save_lora_weights; fastgen loads it into a clean UNet."""
    pytest.importorskip("safetensors")  # adapter files are safetensors
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet, inputs, plain = tiny_unet
    theirs = copy.deepcopy(unet)
    cfg = LoraConfig(r=2, lora_alpha=5, init_lora_weights=False,
                     target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1"])
    theirs.add_adapter(cfg, adapter_name="x")
    _sd_pipeline_class().save_lora_weights(tmp_path, unet_lora_layers=get_peft_model_state_dict(theirs, adapter_name="x"),
                                           unet_lora_adapter_metadata=cfg.to_dict())
    with torch.no_grad():
        want = theirs(*inputs).sample
    w = A.load(tmp_path / "pytorch_lora_weights.safetensors")
    assert w.format == "peft" and {m.alpha for m in w.modules.values()} == {5.0}
    assert any(".conv1" in n for n in w.modules), "LoCoN layers (conv1) are in the file"
    ours = copy.deepcopy(unet)
    A.apply(ours, w, name="x")
    with torch.no_grad():
        got = ours(*inputs).sample
    assert (want - plain).abs().max() > 1e-3
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_kohya_flux_original_layout_with_fused_qkv(tmp_path):
    """A kohya Flux LoRA in BFL's layout (one LoRA on the fused img/txt qkv) applied to a diffusers
    FluxTransformer2DModel: each of to_q / to_k / to_v gets its third of ``up`` (independent math
    check), and the output equals diffusers' own FluxPipeline loader on the same file."""
    pytest.importorskip("safetensors")  # adapter files are safetensors
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    torch.manual_seed(0)
    flux = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=8, pooled_projection_dim=8, axes_dims_rope=(2, 2, 4),
    ).eval()
    D, r = 16, 2
    g = torch.Generator().manual_seed(3)
    sd = {}
    for blk, out_mult, alpha in (("img_attn_qkv", 3, 1.0), ("txt_attn_qkv", 3, 2.0), ("img_attn_proj", 1, 2.0)):
        base = f"lora_unet_double_blocks_0_{blk}"
        sd[f"{base}.lora_down.weight"] = torch.randn(r, D, generator=g)
        sd[f"{base}.lora_up.weight"] = torch.randn(out_mult * D, r, generator=g) * 0.3
        sd[f"{base}.alpha"] = torch.tensor(alpha)
    path = tmp_path / "flux_kohya.safetensors"
    save_file(sd, path)

    ours = copy.deepcopy(flux)
    w = A.apply(ours, path)
    assert w.format == "kohya"
    attn = ours.transformer_blocks[0].attn
    up, down = sd["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"], sd["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"]
    for i, proj in enumerate((attn.to_q, attn.to_k, attn.to_v)):
        br = proj.fastgen_adapters["default"]
        torch.testing.assert_close(br.scale * br.delta_weight(), (1.0 / r) * up[i * D:(i + 1) * D] @ down, atol=1e-5, rtol=1e-5)

    theirs = copy.deepcopy(flux)
    conv = diffusers.FluxPipeline.lora_state_dict(str(path))
    diffusers.FluxPipeline.load_lora_into_transformer(conv, None, transformer=theirs, adapter_name="k")
    S, T = 4, 3
    inputs = dict(hidden_states=torch.randn(1, S, 4, generator=g), encoder_hidden_states=torch.randn(1, T, 8, generator=g),
                  pooled_projections=torch.randn(1, 8, generator=g), timestep=torch.tensor([0.5]),
                  img_ids=torch.zeros(S, 3), txt_ids=torch.zeros(T, 3))
    with torch.no_grad():
        want, got, plain = theirs(**inputs).sample, ours(**inputs).sample, flux(**inputs).sample
    assert (want - plain).abs().max() > 1e-4
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_fastgen_flux_takes_diffusers_lora_merged_onto_fused_qkv(tmp_path):
    """A diffusers-layout LoRA (to_q / to_k / to_v, add_*_proj, single blocks' proj_mlp ...) folded
    into fastgen.models.Flux, whose to_qkv / to_added_qkv / linear1 are fused, gives the output of
    the diffusers model running the same LoRA unmerged. Hooks on a fastgen model are refused."""
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("safetensors")
    from fastgen.models import Flux

    cfg = dict(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8,
               num_attention_heads=2, joint_attention_dim=8, pooled_projection_dim=8, axes_dims_rope=(2, 2, 4))
    torch.manual_seed(0)
    ref = diffusers.FluxTransformer2DModel(**cfg).eval()
    fast = Flux.from_diffusers(copy.deepcopy(ref), backend="torch").eval()
    A.add_adapter(ref, "a", rank=2, alpha=3.0, targets="attention+ff")
    assert any("linear1" not in n and n.endswith("proj_mlp") for n in A.get_weights(ref, "a").modules)
    _randomize(ref, "a")
    path = tmp_path / "flux_lora.safetensors"
    A.save(ref, path, format="diffusers", name="a")
    with pytest.raises(TypeError, match="fused kernels"):
        A.apply(fast, path)
    with pytest.raises(TypeError, match="fused kernels"):
        A.add_adapter(fast, "b", rank=2)
    A.apply(fast, path, merge=True)
    g = torch.Generator().manual_seed(2)
    S, T = 4, 3
    inputs = dict(hidden_states=torch.randn(1, S, 4, generator=g), encoder_hidden_states=torch.randn(1, T, 8, generator=g),
                  pooled_projections=torch.randn(1, 8, generator=g), timestep=torch.tensor([0.5]),
                  img_ids=torch.zeros(S, 3), txt_ids=torch.zeros(T, 3))
    with torch.no_grad():
        want = ref(**inputs).sample
        with A.disabled(ref):
            plain = ref(**inputs).sample
        got = fast(**inputs).sample
    assert (want - plain).abs().max() > 1e-3
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("fmt", ["peft", "kohya"])
def test_pipeline_components_and_remove(fmt):
    """A file with denoiser and text-encoder layers goes onto a pipeline's unet and text_encoder;
    remove() restores both."""
    import types

    from torch import nn

    torch.manual_seed(0)
    unet, te = Block(), nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 6))
    src_unet, src_te = copy.deepcopy(unet), copy.deepcopy(te)
    A.add_adapter(src_unet, "a", rank=2, targets=["to_q"])
    A.add_adapter(src_te, "a", rank=2, targets="all")
    _randomize(src_unet, "a")
    _randomize(src_te, "a", 2)
    sd_u, meta = A.formats.to_state_dict(A.get_weights(src_unet, "a"), fmt, prefix="unet" if fmt == "peft" else "lora_unet")
    sd_t, _ = A.formats.to_state_dict(A.get_weights(src_te, "a"), fmt, prefix="text_encoder" if fmt == "peft" else "lora_te")
    w = A.formats.from_state_dict({**sd_u, **sd_t}, meta)
    assert set(w.extra) == {"text_encoder"}
    pipe = types.SimpleNamespace(unet=unet, text_encoder=te)
    A.apply(pipe, w, name="a")
    x, img = _inputs()
    t = torch.randn(3, 6)
    torch.testing.assert_close(pipe.unet(x, img)[0], src_unet(x, img)[0])
    torch.testing.assert_close(pipe.text_encoder(t), src_te(t))
    A.remove(pipe)
    with A.disabled(src_te):
        torch.testing.assert_close(pipe.text_encoder(t), src_te(t))
    assert A.adapter_names(pipe.unet) == [] and A.adapter_names(pipe.text_encoder) == []


def test_convert_between_formats(tmp_path):
    pytest.importorskip("safetensors")
    torch.manual_seed(0)
    base = Block().eval()
    model = copy.deepcopy(base)
    A.add_adapter(model, "a", kind="dora", rank=2, alpha=3.0, targets=["to_q", "ff.0", "conv"])
    _randomize(model, "a")
    x, img = _inputs()
    want = model(x, img)
    A.save(model, tmp_path / "a.safetensors", format="peft", name="a")
    assert A.convert(tmp_path / "a.safetensors", tmp_path / "b.safetensors", "kohya").format == "peft"
    with pytest.raises(ValueError, match="need the model"):
        A.convert(tmp_path / "b.safetensors", tmp_path / "c.safetensors", "comfyui")
    assert A.convert(tmp_path / "b.safetensors", tmp_path / "c.safetensors", "comfyui", model=base).format == "kohya"
    A.convert(tmp_path / "c.safetensors", tmp_path / "d.safetensors", "peft")
    fresh = copy.deepcopy(base)
    A.apply(fresh, tmp_path / "d.safetensors")
    for g, w in zip(fresh(x, img), want):
        torch.testing.assert_close(g, w, atol=2e-6, rtol=1e-5)
