"""fastgen.models.DiT against diffusers' DiTTransformer2DModel (tiny random configs, CPU).

Outputs and every gradient in fp32 (backend="torch") within 1e-5 relative; bf16 through the
Triton kernels (interpreter) within the FlashAttention rule; interchange (from_diffusers,
to_diffusers_state_dict strict, from_pretrained of save_pretrained dirs, sharded too); errors;
gradient checkpointing; torch.compile; bytes saved for backward per block vs diffusers; DiTPipeline.
"""

from __future__ import annotations

import pytest
import torch

from conftest import INTERPRET, TRITON_DEVICE, assert_fa_rule
from fastgen.models import DiT, DiTConfig
from fastgen.models._common import CheckpointMismatchError
from test_models_sd3 import rel_err, saved_bytes

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

TINY = dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
            sample_size=8, patch_size=2, num_embeds_ada_norm=10)


def _diffusers(seed=0, dtype=torch.float32, **over):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(seed)
    return diffusers.DiTTransformer2DModel(**{**TINY, **over}).to(dtype).eval()


def _inputs(B, H, W, seed=1, C=4):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, H, W, generator=g)
    t = torch.randint(0, 1000, (B,), generator=g).float()
    y = torch.randint(0, 11, (B,), generator=g)  # 10 = the null label
    return x, t, y


def _unpatchify_ref(x, h, w, p, c):
    return torch.einsum("nhwpqc->nchpwq", x.reshape(-1, h, w, p, p, c)).reshape(-1, c, h * p, w * p)


def _diffusers_forward(ref, x, t, y):
    """diffusers' DiT forward, with the token grid taken from the latent (its own forward
    assumes a square grid when unpatchifying)."""
    import torch.nn.functional as F

    p = ref.config.patch_size
    h, w = x.shape[-2] // p, x.shape[-1] // p
    hs = ref.pos_embed(x)
    for blk in ref.transformer_blocks:
        hs = blk(hs, timestep=t, class_labels=y)
    c = ref.transformer_blocks[0].norm1.emb(t, y, hidden_dtype=hs.dtype)
    shift, scale = ref.proj_out_1(F.silu(c)).chunk(2, dim=1)
    hs = ref.norm_out(hs) * (1 + scale[:, None]) + shift[:, None]
    return _unpatchify_ref(ref.proj_out_2(hs), h, w, p, ref.out_channels)


@pytest.mark.parametrize("B,H,W,train", [(3, 6, 6, False), (1, 8, 8, True), (2, 4, 10, False)],
                         ids=["odd-tokens-B3", "square-train-mode", "non-square"])
def test_matches_diffusers_fp32(B, H, W, train):
    ref = _diffusers()
    m = DiT.from_diffusers(ref, backend="torch")
    ref.train(train), m.train(train)
    x, t, y = _inputs(B, H, W)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    torch.manual_seed(5)  # label dropout draws (train mode) in the same order in both
    out = m(xa, timestep=t, class_labels=y).sample
    torch.manual_seed(5)
    exp = ref(xb, timestep=t, class_labels=y).sample if H == W else _diffusers_forward(ref, xb, t, y)
    assert out.shape == (B, 8, H, W)
    assert rel_err(out, exp) <= 1e-5
    g = torch.randn_like(exp)
    (out * g).sum().backward()
    (exp * g).sum().backward()
    assert rel_err(xa.grad, xb.grad) <= 1e-5
    want = DiT.state_dict_from_diffusers({n: p.grad for n, p in ref.named_parameters() if p.grad is not None})
    got = {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
    assert set(got) == set(want) and len(got) > 20
    for n in got:
        assert rel_err(got[n], want[n]) <= 1e-5, n


def test_return_tuple_scalar_timestep_and_config():
    ref = _diffusers()
    m = DiT.from_diffusers(ref, backend="torch")
    x, _, y = _inputs(2, 4, 4)
    out = m(x, timestep=7, class_labels=y, return_dict=False)
    assert isinstance(out, tuple) and len(out) == 1
    exp = ref(x, timestep=torch.tensor([7.0, 7.0]), class_labels=y).sample
    assert rel_err(out[0], exp) <= 1e-5
    assert m.config.sample_size == 8 and m.config["out_channels"] == 8 and m.dtype == torch.float32
    assert m.device.type == "cpu"


def test_state_dict_round_trip_strict():
    diffusers = pytest.importorskip("diffusers")
    m = DiT(DiTConfig(**TINY), backend="torch").eval()
    ref = diffusers.DiTTransformer2DModel(**m.diffusers_config())
    ref.load_state_dict(m.to_diffusers_state_dict(), strict=True)
    x, t, y = _inputs(2, 4, 4)
    assert rel_err(m(x, t, y).sample, ref.eval()(x, timestep=t, class_labels=y).sample) <= 1e-5
    back = DiT.from_diffusers(ref)
    for k, v in m.state_dict().items():
        torch.testing.assert_close(back.state_dict()[k], v, rtol=0, atol=0)


@pytest.mark.parametrize("shard", [False, True])
def test_from_pretrained(tmp_path, shard):
    ref = _diffusers()
    ref.save_pretrained(tmp_path, **({"max_shard_size": "20KB"} if shard else {}))
    assert any(p.name.endswith(".index.json") for p in tmp_path.iterdir()) == shard
    m = DiT.from_pretrained(str(tmp_path), backend="torch")
    x, t, y = _inputs(2, 4, 4)
    assert rel_err(m(x, t, y).sample, ref(x, timestep=t, class_labels=y).sample) <= 1e-5
    mb = DiT.from_pretrained(str(tmp_path), torch_dtype=torch.bfloat16)
    assert mb.dtype == torch.bfloat16 and not any(p.is_meta for p in mb.parameters())
    if not shard:  # one .safetensors file with an explicit config; a pipeline folder's subfolder
        f = str(tmp_path / "diffusion_pytorch_model.safetensors")
        one = DiT.from_pretrained(f, config=DiTConfig(**TINY), backend="torch")
        assert rel_err(one(x, t, y).sample, m(x, t, y).sample) == 0
        with pytest.raises(ValueError, match="no config.json"):
            DiT.from_pretrained(f)
        sub = DiT.from_pretrained(str(tmp_path.parent), subfolder=tmp_path.name, backend="torch")
        assert rel_err(sub(x, t, y).sample, m(x, t, y).sample) == 0


def test_from_pretrained_wrong_size_names_keys(tmp_path):
    _diffusers().save_pretrained(tmp_path)
    with pytest.raises(CheckpointMismatchError, match=r"shape mismatch\(es\), first: pos_embed\.proj\.weight: "
                                                      r"checkpoint \(16, 4, 2, 2\) vs model \(24, 4, 2, 2\)"):
        DiT.from_pretrained(str(tmp_path), config=DiTConfig(**{**TINY, "num_attention_heads": 3}))
    with pytest.raises(CheckpointMismatchError, match=r"unexpected key\(s\), first: \['transformer_blocks\.1\."):
        DiT.from_pretrained(str(tmp_path), config=DiTConfig(**{**TINY, "num_layers": 1}))
    with pytest.raises(KeyError, match="DiT-XL/2-256"):
        DiTConfig.preset("DiT-XL/3")


def test_bad_inputs():
    m = DiT(DiTConfig(**TINY), backend="torch")
    m.fuse_qkv_projections()  # already fused: a no-op, as pipelines may call it
    with pytest.raises(NotImplementedError, match="attention processors are not supported"):
        m.set_attn_processor(None)
    x, t, y = _inputs(2, 4, 4)
    with pytest.raises(ValueError, match=r"multiples of the patch size 2"):
        m(torch.randn(2, 4, 5, 4), t, y)
    with pytest.raises(ValueError, match=r"3 channels but the model takes in_channels=4"):
        m(torch.randn(2, 3, 4, 4), t, y)
    with pytest.raises(ValueError, match=r"class_labels .* are required"):
        m(x, t)
    with pytest.raises(ValueError, match=r"timestep must be a scalar or of shape \(2,\)"):
        m(x, torch.zeros(3), y)
    with pytest.raises(TypeError, match=r"hidden_states is torch.bfloat16 but the model's weights are torch.float32"):
        m(x.bfloat16(), t, y)
    from fastgen.backend import BackendUnavailableError

    with pytest.raises(BackendUnavailableError, match=r"backend='triton' runs the attention kernels in bfloat16"):
        DiT(DiTConfig(**TINY), backend="triton")(x, t, y)
    m2 = DiT(DiTConfig(**TINY), backend="triton").eval().set_backend("torch")
    assert all(mod.backend == "torch" for mod in m2.modules() if hasattr(mod, "backend"))
    assert m2(x, t, y).sample.shape == (2, 8, 4, 4)


def test_presets_parameter_counts():
    """DiT-XL/2 has 675 M parameters (the paper's count, whose 28 blocks share one timestep /
    class embedder); the diffusers layout keeps a copy per block (+ 28 x 1.51 M)."""
    for name, side in (("DiT-XL/2-256", 32), ("DiT-XL/2-512", 64)):
        cfg = DiTConfig.preset(name)
        assert cfg.sample_size == side and cfg.inner_dim == 1152 and cfg.out_channels == 8
        with torch.device("meta"):
            m = DiT(cfg)
        n = sum(p.numel() for p in m.parameters())
        per_block_embed = sum(p.numel() for p in m.transformer_blocks[0].norm1.emb.parameters())
        assert round((n - 27 * per_block_embed) / 1e6) == 675


def test_requires_grad_on_a_subset():
    """Frozen base, a few trainable tensors (how adapters train): only those get gradients, and
    they equal diffusers' gradients for the same tensors."""
    ref = _diffusers()
    m = DiT.from_diffusers(ref, backend="torch")
    train = {"transformer_blocks.0.ff.fc1.weight", "transformer_blocks.1.attn1.to_qkv.bias", "proj_out_2.weight"}
    for n, p in m.named_parameters():
        p.requires_grad_(n in train)
    x, t, y = _inputs(2, 4, 4)
    m(x, t, y).sample.square().sum().backward()
    ref(x, timestep=t, class_labels=y).sample.square().sum().backward()
    want = DiT.state_dict_from_diffusers({n: p.grad for n, p in ref.named_parameters()})
    assert {n for n, p in m.named_parameters() if p.grad is not None} == train
    for n in train:
        assert rel_err(m.get_parameter(n).grad, want[n]) <= 1e-5, n


def test_gradient_checkpointing_same_gradients():
    ref = _diffusers()
    x, t, y = _inputs(2, 4, 4)
    grads = []
    for ckpt in (False, True):
        m = DiT.from_diffusers(ref, backend="torch")
        if ckpt:
            m.enable_gradient_checkpointing()
        m(x, t, y).sample.square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
        for p in ref.parameters():
            p.grad = None
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-6, atol=1e-7)


def test_torch_compile_fullgraph():
    ref = _diffusers(num_layers=1)
    m = DiT.from_diffusers(ref, backend="torch")
    x, t, y = _inputs(2, 4, 4)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    assert rel_err(compiled(x, t, y, return_dict=False)[0], m(x, t, y).sample) <= 1e-6


@pytest.mark.skipif(not INTERPRET and TRITON_DEVICE == "cpu", reason="Triton kernels on CPU need TRITON_INTERPRET=1")
def test_bf16_triton_fa_rule():
    """bf16 through the Triton kernels (attention, modulate family) vs the fp32 diffusers model:
    no worse than diffusers itself in bf16 (output, input gradient, a few weight gradients)."""
    from fastgen import backend

    ref32 = _diffusers(attention_head_dim=16, num_layers=1).to(TRITON_DEVICE)
    ref16 = _diffusers(attention_head_dim=16, num_layers=1, dtype=torch.bfloat16).to(TRITON_DEVICE)
    m = DiT.from_diffusers(ref16, backend="triton")
    x, t, y = (v.to(TRITON_DEVICE) for v in _inputs(2, 6, 6))
    runs = []
    for model, dt, kw in ((ref32, torch.float32, None), (ref16, torch.bfloat16, None), (m, torch.bfloat16, 1)):
        xi = x.detach().to(dt).clone().requires_grad_()
        with backend.trace() as ran:
            out = model(xi, timestep=t, class_labels=y).sample
            out.float().square().sum().backward()
        if kw:
            assert ("attention", "triton") in ran and ("gated_residual_layer_norm_modulate", "triton") in ran
        blk = model.transformer_blocks[0]
        wq = blk.attn1.to_qkv.weight.grad[:32] if kw else blk.attn1.to_q.weight.grad
        fc2 = blk.ff.fc2.weight.grad if kw else blk.ff.net[2].weight.grad
        runs.append((out.float(), xi.grad.float(), wq.float(), fc2.float(), blk.norm1.linear.weight.grad.float()))
    for i, name in enumerate(("out", "dx", "dWq", "dW_fc2", "dW_adaLN")):
        scale = runs[0][i].abs().max().item()
        assert_fa_rule(name, runs[2][i], runs[1][i], runs[0][i], atol=1e-2 * scale)


@pytest.mark.skipif(not INTERPRET and TRITON_DEVICE == "cpu", reason="Triton kernels on CPU need TRITON_INTERPRET=1")
def test_saved_activation_bytes_per_block():
    """Bytes saved for backward by a stack of blocks (bf16; per block = stack / depth) vs diffusers'
    blocks of the same config. A storage saved by two blocks (one block's output, the next one's
    input) counts once, as in memory."""
    ref = _diffusers(attention_head_dim=16, num_layers=3, dtype=torch.bfloat16).to(TRITON_DEVICE)
    m = DiT.from_diffusers(ref, backend="triton")
    B, S, N = 2, 16, 32
    x = torch.randn(B, S, N, dtype=torch.bfloat16, device=TRITON_DEVICE, requires_grad=True)
    t, y = torch.tensor([3.0, 500.0], device=TRITON_DEVICE), torch.tensor([1, 2], device=TRITON_DEVICE)

    def run(blocks, call):
        h = x
        for b in blocks:
            h = call(b, h)
        return h

    theirs = saved_bytes(lambda: run(ref.transformer_blocks, lambda b, h: b(h, timestep=t, class_labels=y)),
                         ref.parameters())
    outs = []
    ours = saved_bytes(lambda: outs.append(run(m.transformer_blocks, lambda b, h: b(h, t, y))), m.parameters())
    ratio = ours / theirs
    print(f"DiT saved bytes per block: fastgen {ours / 3 / (B * S * N * 2):.2f} x (B, S, N) bf16, diffusers "
          f"{theirs / 3 / (B * S * N * 2):.2f} x; ratio {ratio:.3f}")
    assert torch.isfinite(outs[0]).all()
    assert ratio <= 0.65  # issue target 0.7; measured 0.632 here (12 vs 20 (B, S, N) tensors at large S)


def test_dit_pipeline_swap():
    diffusers = pytest.importorskip("diffusers")
    ref = _diffusers(num_embeds_ada_norm=1000)  # the pipeline's null class is 1000
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=4,
                                  down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",))
    pipe = diffusers.DiTPipeline(transformer=ref, vae=vae.eval(), scheduler=diffusers.DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    kw = dict(class_labels=[1, 3], num_inference_steps=2, guidance_scale=2.0, output_type="pt")
    exp = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    pipe.transformer = DiT.from_diffusers(ref, backend="torch")
    assert isinstance(pipe.transformer, DiT)
    out = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    assert out.shape == exp.shape == (2, 3, 8, 8)
    assert rel_err(torch.as_tensor(out), torch.as_tensor(exp)) <= 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_dit_xl_width_triton():
    """GPU tier: DiT-XL/2's width (16 x 72) at 512 px (1024 tokens), 2 blocks, B = 2, bf16 on the
    Triton kernels vs the fp32 reference path (equal to diffusers, tested above on CPU): FA rule
    on the output, the latent's gradient and the QKV weight gradient."""
    from fastgen import backend

    cfg = DiTConfig.preset("DiT-XL/2-512").replace(num_layers=2)
    torch.manual_seed(0)
    ref = DiT(cfg, backend="torch").cuda().eval()
    x = torch.randn(2, 4, 64, 64, device="cuda")
    t, y = torch.tensor([20.0, 800.0], device="cuda"), torch.tensor([207, 1000], device="cuda")
    runs = []
    # baseline: the reference path in bf16 (bf16 GEMMs and residual stream, attention in fp32 inside)
    for dt, bk in ((torch.float32, "torch"), (torch.bfloat16, "torch"), (torch.bfloat16, "triton")):
        m = DiT(cfg, backend=bk).cuda().eval().to(dt)
        m.load_state_dict(ref.state_dict())
        xi = x.to(dt).requires_grad_()
        with backend.trace() as ran:
            out = m(xi, t, y).sample
            out.float().square().mean().backward()
        if bk == "triton":
            for op in ("attention", "layer_norm_modulate", "gated_residual_layer_norm_modulate", "gated_residual"):
                assert (op, "triton") in ran, (op, ran)
        runs.append((out.float(), xi.grad.float(), m.transformer_blocks[1].attn1.to_qkv.weight.grad.float()))
    for i, name in enumerate(("out", "dx", "dW_qkv")):
        assert_fa_rule(name, runs[2][i], runs[1][i], runs[0][i], atol=1e-2 * runs[0][i].abs().max().item())
