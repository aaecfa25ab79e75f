"""Vector quantization: the fused nearest-code kernel, fastgen.vae.VectorQuantizer, fastgen.vae.VQModel.

References: a float64 brute-force distance matrix (the kernel and the torch path), vector-quantize-pytorch
(EMA codebook updates, residual VQ, LFQ; where installed) and diffusers' VQModel (where installed).
The Triton kernel runs under the interpreter on CPU (tiny shapes) or on a GPU.
"""

from __future__ import annotations

import pytest
import torch
from conftest import INTERPRET, TRITON_DEVICE, assert_close

import fastgen
from fastgen.vae import VectorQuantizer, VQModel, VQModelConfig, nearest_code
from fastgen.vae.quantizer import nearest_code_ref

needs_triton = pytest.mark.skipif(TRITON_DEVICE == "cpu" and not INTERPRET,
                                  reason="Triton kernels need a GPU or TRITON_INTERPRET=1")


def _check_nearest(x, e, idx, dist):
    """The chosen code is a nearest one (within fp32 rounding of a tie) and dist is its squared distance."""
    ref = torch.cdist(x.double().cpu(), e.double().cpu()).square()  # (M, K) float64 truth
    best = ref.min(1).values
    chosen = ref.gather(1, idx.cpu()[:, None])[:, 0]
    tol = 1e-5 * (1 + best)
    assert torch.all(chosen - best <= tol), (chosen - best).max()
    torch.testing.assert_close(dist.double().cpu(), best, atol=1e-4, rtol=1e-4)
    return (idx.cpu() == ref.argmin(1)).float().mean().item()


@pytest.mark.parametrize("M, K, D", [(37, 50, 3), (100, 17, 70), (5, 1, 4), (64, 300, 16)])
def test_nearest_code_torch(M, K, D):
    g = torch.Generator().manual_seed(M + K)
    x, e = torch.randn(M, D, generator=g), torch.randn(K, D, generator=g)
    idx, dist = nearest_code(x, e, backend="torch")
    assert idx.dtype == torch.int64 and dist.dtype == torch.float32
    assert _check_nearest(x, e, idx, dist) == 1.0  # well separated random points: the same argmin


@needs_triton
@pytest.mark.parametrize("M, K, D, dtype", [(37, 50, 3, torch.float32), (100, 17, 70, torch.float32),
                                            (33, 40, 8, torch.bfloat16), (5, 1, 4, torch.float16)])
def test_nearest_code_triton(M, K, D, dtype):
    """Fused distance + argmin (no (M, K) matrix): odd M, K, D, a one-code codebook, bf16 / fp16 inputs."""
    g = torch.Generator().manual_seed(M * K)
    x, e = torch.randn(M, D, generator=g).to(dtype), torch.randn(K, D, generator=g).to(dtype)
    with fastgen.backend.trace() as ran:
        idx, dist = nearest_code(x.to(TRITON_DEVICE), e.to(TRITON_DEVICE), backend="triton")
    assert ran == [("vq_nearest", "triton")]
    assert _check_nearest(x, e, idx, dist) == 1.0
    # ties: duplicated codes resolve to the lowest index, as torch.argmin
    e2 = torch.cat([e[:1], e[:1], e]).to(TRITON_DEVICE)
    i2, _ = nearest_code(e[:1].to(TRITON_DEVICE), e2, backend="triton")
    assert i2.item() == 0


@needs_triton
def test_nearest_code_triton_nan_is_not_a_code():
    """A NaN row must not silently get a valid-looking distance."""
    x = torch.randn(4, 8)
    x[2, 3] = float("nan")
    _, dist = nearest_code(x.to(TRITON_DEVICE), torch.randn(16, 8).to(TRITON_DEVICE), backend="triton")
    assert not torch.isfinite(dist.cpu()[2])


def test_nearest_code_errors():
    with pytest.raises(ValueError, match=r"x \(M, D\)"):
        nearest_code(torch.randn(3, 4), torch.randn(5, 3))
    with pytest.raises(ValueError, match="empty"):
        nearest_code(torch.randn(3, 4), torch.randn(0, 4))
    with pytest.raises(fastgen.backend.BackendUnavailableError, match="no CUDA C\\+\\+ implementation"):
        nearest_code(torch.randn(3, 4), torch.randn(5, 4), backend="cuda")
    with pytest.raises(ValueError, match="expected 8 channels"):
        VectorQuantizer(16, 8)(torch.randn(2, 4, 3, 3))


def test_quantizer_math_and_straight_through():
    """diffusers' legacy loss, the swapped weighting, and the identity gradient to the input."""
    torch.manual_seed(0)
    vq = VectorQuantizer(24, 6, beta=0.25)
    z = torch.randn(2, 6, 5, 3, requires_grad=True)
    out = vq(z)
    zl = z.detach().movedim(1, -1).reshape(-1, 6)
    idx, _ = nearest_code_ref(zl, vq.codebook.detach())
    zq = vq.codebook.detach()[idx].view(2, 5, 3, 6).movedim(-1, 1)
    assert torch.equal(out.indices, idx.view(2, 5, 3))
    assert_close(out.quantized, zq)
    mse = (zq - z.detach()).square().mean()
    assert_close(out.loss, 1.25 * mse)
    out.quantized.sum().backward()
    assert torch.equal(z.grad, torch.ones_like(z))  # straight-through
    vq2 = VectorQuantizer(24, 6, beta=0.25, legacy=False)
    vq2.load_state_dict(vq.state_dict())
    loss = vq2(z).loss
    loss.backward()
    assert_close(loss, 1.25 * mse)
    # codebook gradient: legacy=False puts weight 1 on ||z_q - sg(z)||^2, so d/de_k = 2 sum (e_k - z) / numel
    g = torch.zeros_like(vq.codebook).index_add_(0, idx, 2 * (vq.codebook.detach()[idx] - zl) / z.numel())
    assert_close(vq2.codebook.grad, g)
    assert_close(vq.lookup(out.indices), zq)


@needs_triton
def test_quantizer_triton_backend():
    torch.manual_seed(0)
    vq = VectorQuantizer(20, 5, channel_dim=-1).to(TRITON_DEVICE)
    z = torch.randn(3, 7, 5).to(TRITON_DEVICE)
    ref = vq(z)
    vq.backend = "triton"
    with fastgen.backend.trace() as ran:
        out = vq(z)
    assert ("vq_nearest", "triton") in ran
    assert torch.equal(out.indices, ref.indices) and torch.equal(out.quantized, ref.quantized)


def test_ema_matches_vector_quantize_pytorch():
    """One training step: indices, quantized, commitment loss, input gradient, and the EMA-updated
    codebook / counts equal vector-quantize-pytorch's VectorQuantize (rotation trick off: plain STE)."""
    vqp = pytest.importorskip("vector_quantize_pytorch")
    torch.manual_seed(0)
    ref = vqp.VectorQuantize(dim=8, codebook_size=16, decay=0.9, commitment_weight=0.25, rotation_trick=False).train()
    ours = VectorQuantizer(16, 8, beta=0.25, channel_dim=-1, ema=True, decay=0.9).train()
    with torch.no_grad():
        ours.embedding.weight.copy_(ref._codebook.embed[0])
        ours.embed_avg.copy_(ref._codebook.embed_avg[0])
        ours.cluster_size.copy_(ref._codebook.cluster_size[0])
    for step in range(2):
        x = torch.randn(2, 10, 8, generator=torch.Generator().manual_seed(step))
        xr, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
        qr, ir, lr = ref(xr)
        qo, lo, io = ours(xo)
        assert torch.equal(ir, io)
        assert_close(qo, qr)
        assert_close(lo, lr.reshape(()))
        (qr.square().sum() + lr).backward()
        (qo.square().sum() + lo).backward()
        assert_close(xo.grad, xr.grad)
        assert_close(ours.codebook, ref._codebook.embed[0])
        assert_close(ours.cluster_size, ref._codebook.cluster_size[0])
    ours.eval()
    before = ours.codebook.clone()
    ours(torch.randn(4, 8))
    assert torch.equal(ours.codebook, before)  # no updates in eval mode


def test_residual_vq_matches_vector_quantize_pytorch():
    vqp = pytest.importorskip("vector_quantize_pytorch")
    torch.manual_seed(1)
    ref = vqp.ResidualVQ(dim=8, num_quantizers=3, codebook_size=16, rotation_trick=False).eval()
    ours = VectorQuantizer(16, 8, channel_dim=-1, num_quantizers=3, ema=True).eval()
    with torch.no_grad():
        for layer, mine in zip(ref.layers, ours.layers):
            mine.embedding.weight.copy_(layer._codebook.embed[0])
    x = torch.randn(2, 9, 8)
    q, idx, _ = ref(x)
    out = ours(x)
    assert out.indices.shape == (2, 9, 3) and torch.equal(out.indices, idx)
    assert_close(out.quantized, q)
    assert_close(ours.lookup(out.indices), out.quantized)
    # each layer quantizes the residual of the ones before: the error shrinks layer by layer
    errs = [(x - sum(ours.layers[j].lookup(out.indices[..., j]) for j in range(i + 1))).square().mean()
            for i in range(3)]
    assert errs[2] <= errs[1] <= errs[0]


def test_lfq_matches_vector_quantize_pytorch():
    vqp = pytest.importorskip("vector_quantize_pytorch")
    ref = vqp.LFQ(dim=5, codebook_size=32, entropy_loss_weight=0.0, commitment_loss_weight=0.0)
    ours = VectorQuantizer(0, 5, channel_dim=-1, lfq=True)
    assert ours.num_codes == 32 and not list(ours.parameters())
    y = torch.randn(3, 7, 5, requires_grad=True)
    r, o = ref(y), ours(y)
    assert torch.equal(o.indices, r.indices)
    assert_close(o.quantized, r.quantized)
    assert_close(ours.lookup(o.indices), o.quantized)
    o.quantized.sum().backward()
    assert torch.equal(y.grad, torch.ones_like(y))


TINY_VQ = dict(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, latent_channels=3,
               num_vq_embeddings=32, vq_embed_dim=4)


def test_vqmodel_matches_diffusers():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    dv = diffusers.VQModel(**TINY_VQ, down_block_types=("DownEncoderBlock2D",) * 2,
                           up_block_types=("UpDecoderBlock2D",) * 2).eval()
    m = VQModel.from_diffusers(dv)
    assert set(m.state_dict()) == set(dv.state_dict())
    x = torch.randn(2, 3, 10, 14, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, out = dv(x), m(x)
        h = dv.encode(x).latents
        assert_close(m.encode(x).latents, h)
        assert torch.equal(m.quantize(h).indices.view(-1), dv.quantize(h)[2][2].view(-1))
        assert_close(out.sample, ref.sample)
        assert_close(out.commit_loss, ref.commit_loss)
        assert_close(m.decode(h, force_not_quantize=True).sample, dv.decode(h, force_not_quantize=True).sample)
        s, loss = m(x, return_dict=False)
        assert_close(s, ref.sample)
    with pytest.raises(ValueError, match="norm_type"):
        VQModel.config_from_diffusers(dict(dv.config, norm_type="spatial"))


def test_vqmodel_without_diffusers():
    """Shapes, the quantizer round trip and the input checks on fastgen's own model."""
    torch.manual_seed(0)
    m = VQModel(VQModelConfig(**TINY_VQ)).eval()
    x = torch.randn(1, 3, 8, 6)
    with torch.no_grad():
        h = m.encode(x).latents
        assert h.shape == (1, 4, 4, 3)
        q = m.quantize(h)
        assert_close(m.decode(q.quantized, force_not_quantize=True).sample, m.decode(h).sample)
    with pytest.raises(ValueError, match=r"\(N, 4, h, w\)"):
        m.decode(torch.randn(1, 3, 4, 4))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_nearest_code_real_sizes(dtype):
    """The compiled kernel (interpreter off) at a VQGAN-like size: 64k vectors of 256 against 8192 codes."""
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(65536, 256, device="cuda", generator=g).to(dtype)
    e = torch.randn(8192, 256, device="cuda", generator=g).to(dtype)
    with fastgen.backend.trace() as ran:
        idx, dist = nearest_code(x, e, backend="triton")
    assert ran == [("vq_nearest", "triton")]
    ref_idx, ref_dist = nearest_code_ref(x, e)
    chosen = (x.float() - e.float()[idx]).square().sum(1)
    assert torch.all(chosen <= ref_dist * (1 + 1e-4) + 1e-3)  # a nearest code, up to fp32 near-ties
    torch.testing.assert_close(dist, ref_dist, atol=1e-2, rtol=1e-4)
    assert (idx == ref_idx).float().mean() > 0.999


def test_nearest_code_kernel_compiles_for_sm90_without_spills():
    """Static tier: the GPU launch config (``kernels/vq.py`` GPU_CONFIG) compiles for sm_90
    with no register spills (ptxas -v), no GPU needed. In a subprocess without TRITON_INTERPRET
    (the interpreter replaces the jit function), as tests/test_static_sm90.py does."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("triton.backends.nvidia.compiler")
    code = """
import json
from sm90 import resource_usage
from fastgen.kernels.vq import GPU_CONFIG, _vq_nearest_kernel
cfg = dict(GPU_CONFIG)
warps = cfg.pop("num_warps")
out = {}
for dtype in ("fp32", "fp16", "bf16"):
    p = "*" + dtype
    sig = {"x_ptr": p, "e_ptr": p, "e2_ptr": "*fp32", "idx_ptr": "*i64", "dist_ptr": "*fp32", "M": "i32",
           "K": "i32", "D": "i32", "stride_xm": "i32", "stride_ek": "i32"}
    out[dtype] = resource_usage(_vq_nearest_kernel, sig, cfg, warps)
print(json.dumps(out))
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent, env=env, capture_output=True,
                         text=True, timeout=300)
    if res.returncode != 0 and "ptxas" in res.stderr and "No such file" in res.stderr:
        pytest.skip("no ptxas in this Triton install")
    assert res.returncode == 0, res.stderr[-2000:]
    usage = json.loads(res.stdout.strip().splitlines()[-1])
    assert set(usage) == {"fp32", "fp16", "bf16"}
    for dtype, use in usage.items():
        assert use["spill_stores"] == 0 and use["spill_loads"] == 0, (dtype, use)
