"""fastgen.zoo.VQVAE: on fastgen.vae.VectorQuantizer (EMA codebook): straight-through gradients,
the EMA update only in training, the loss terms, codebook seeding, compile, errors, and CPU
training on the shapes data with reconstruction and codebook usage measured."""

from __future__ import annotations

import pytest
import torch

from conftest import INTERPRET, TRITON_DEVICE
import torch.nn.functional as F

from fastgen.zoo import VQVAE, VQVAEConfig
from fastgen.zoo.data import shapes
from fastgen.zoo.vqvae import codebook_usage, train_vqvae
from test_zoo_gan import assert_triton_matches_torch, one_thread  # noqa: F401

TINY = dict(channels=(8, 16), latent_dim=4, num_codes=8, groups=4)


def test_forward_backward_and_loss_terms():
    torch.manual_seed(0)
    m = VQVAE(**TINY).eval()  # eval: no EMA update, so the codebook below is the one used
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    out = m(x)
    assert out.x_hat.shape == x.shape and out.indices.shape == (2, 4, 4)
    z_e = m.encode(x)
    flat = z_e.movedim(1, -1).reshape(-1, 4)
    ref_idx = torch.cdist(flat, m.quantizer.codebook).argmin(1).view(2, 4, 4)
    assert torch.equal(out.indices, ref_idx)
    z_q = m.quantizer.codebook[ref_idx].movedim(-1, 1)
    torch.testing.assert_close(out.commitment, 0.25 * F.mse_loss(z_e, z_q))
    torch.testing.assert_close(out.x_hat, m.decoder(z_q))
    torch.testing.assert_close(out.mse, F.mse_loss(out.x_hat, x))
    out.loss.backward()
    assert m.quantizer.codebook.grad is None  # EMA codebook: no gradient
    for name, p in m.named_parameters():
        if p.requires_grad:  # the encoder gets gradients through the straight-through estimator
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
    torch.testing.assert_close(m.decode_indices(out.indices), out.x_hat)


def test_ema_updates_only_in_training_and_init_codebook():
    torch.manual_seed(0)
    m = VQVAE(**TINY)
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    before = m.quantizer.codebook.clone()
    m.eval()(x)
    assert torch.equal(m.quantizer.codebook, before)
    m.train()(x)
    assert not torch.equal(m.quantizer.codebook, before)
    m.init_codebook(x, torch.Generator().manual_seed(0))
    z = m.encode(x).movedim(1, -1).reshape(-1, 4)
    # every code is one of the encoder outputs
    assert (m.quantizer.codebook[:, None, :] == z[None]).all(-1).any(1).all()
    assert torch.equal(m.quantizer.embed_avg, m.quantizer.codebook)
    with pytest.raises(ValueError, match="at least 64 latent vectors"):
        VQVAE(**{**TINY, "num_codes": 64}).init_codebook(x[:1])


def test_codebook_usage():
    used, ppl = codebook_usage(torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]), 8)
    assert used == 4 and abs(ppl - 4.0) < 1e-5
    assert codebook_usage(torch.zeros(10, dtype=torch.long), 8) == (1, 1.0)


def test_compile_matches_eager():
    torch.manual_seed(0)
    m = VQVAE(**TINY).eval()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    ref = m(x)
    torch._dynamo.reset()
    out = torch.compile(m, backend="aot_eager", fullgraph=True)(x)
    torch.testing.assert_close(out.x_hat, ref.x_hat)
    assert torch.equal(out.indices, ref.indices)


def test_errors():
    m = VQVAE(**TINY)
    with pytest.raises(ValueError, match=r"\(B, 3, 16, 16\)"):
        m(torch.zeros(2, 1, 16, 16))
    with pytest.raises(ValueError, match=r"\(B, 3, 16, 16\)"):
        m(torch.zeros(2, 3, 12, 12))
    with pytest.raises(ValueError, match="divisible"):
        VQVAEConfig(image_size=20, channels=(8, 16, 16))


@pytest.mark.slow
def test_training_reconstruction_and_codebook_usage(one_thread):
    """300 FusedAdamW steps (batch 64, lr 2e-3, seed 0), K = 32 codes of width 8 on a 4x4 grid,
    EMA decay 0.9, 2048 shapes images; 512 held-out images. Measured: loss 0.88 -> 0.047, MSE per
    pixel 0.043 (data variance 0.256), all 32 codes used, perplexity 28.3 of 32. (Seeding the
    codebook from encoder outputs, init=True, gave MSE 0.043 and perplexity 23.9: no gain here.)
    Asserted: MSE < 0.25 x the data variance, >= 24 codes used, perplexity > 16 (no collapse)."""
    data, _ = shapes(2048, torch.Generator().manual_seed(1))
    test, _ = shapes(512, torch.Generator().manual_seed(2))
    torch.manual_seed(0)
    m = VQVAE(channels=(16, 32), latent_dim=8, num_codes=32)
    log = train_vqvae(m, data, steps=300, batch_size=64, lr=2e-3, seed=0)
    m.eval()
    with torch.no_grad():
        out = m(test)
    used, ppl = codebook_usage(out.indices, 32)
    var = test.var(0).mean().item()
    print(f"loss {log[0]:.3f} -> {log[-1]:.3f}; mse {out.mse.item():.4f} (var {var:.3f}); used {used}, perplexity {ppl:.1f}")
    assert out.mse.item() < 0.25 * var
    assert used >= 24 and ppl > 16


@pytest.mark.skipif(not INTERPRET and TRITON_DEVICE != "cuda", reason="needs the Triton interpreter or a GPU")
def test_triton_path_matches_torch():
    """The same model with every fastgen op switched to backend='triton': the kernels run
    (fastgen.backend.trace) and give the torch backend's output."""
    torch.manual_seed(0)
    m = VQVAE(**TINY).to(TRITON_DEVICE).eval()
    x = torch.rand(1, 3, 16, 16, device=TRITON_DEVICE) * 2 - 1
    assert_triton_matches_torch(m, lambda m: m(x).x_hat, {"group_norm", "vq_nearest"})
