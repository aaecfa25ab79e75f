"""Latent and text-embedding caches of fastgen.train: encoded once across runs, recomputed when the
content or the encoder changes, and equal to encoding directly."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn as nn

from fastgen.train import Trainer
from fastgen.train.cache import (CachedLatentDataset, TextEmbeddingCache, encoder_key, vae_encoder)
from fastgen.train.data import ImageFolderDataset, TensorImageDataset
from test_train_resume import TinyNet, _cfg, one_thread  # noqa: F401


def _tiny_vae(seed=0):
    from fastgen.vae import AutoencoderKL, AutoencoderKLConfig

    torch.manual_seed(seed)
    return AutoencoderKL(AutoencoderKLConfig(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=8,
                                             latent_channels=4, shift_factor=0.1, scaling_factor=0.5)).eval()


def _counting(vae):
    calls = []
    vae.encoder.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    return calls


class ConvEncoder(nn.Module):
    """A small image encoder (any callable works): (B, 3, H, W) -> (B, 2, H/2, W/2)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 2, stride=2)

    def forward(self, x):
        return self.conv(x)


def test_latents_encoded_once_across_two_runs_and_equal_to_the_vae(tmp_path):
    pytest.importorskip("safetensors")
    pytest.importorskip("PIL")
    from test_train_data import make_shapes_folder

    folder = make_shapes_folder(tmp_path / "data", per_class=2, size=8)
    cache = str(tmp_path / "cache")
    latents = []
    for run in range(2):  # two training runs, each with a freshly built VAE of the same weights
        vae = _tiny_vae()
        calls = _counting(vae)
        ds = CachedLatentDataset(ImageFolderDataset(str(folder), resolution=8), vae, cache, batch_size=64)
        assert calls == ([len(ds)] if run == 0 else []), calls  # one batched call in run 1, none in run 2
        assert ds.cache.misses == (len(ds) if run == 0 else 0) and ds.cache.hits == (0 if run == 0 else len(ds))
        cfg = _cfg(tmp_path / f"run{run}", steps=2)
        cfg.optim.ema_decay = 0.0
        tr = Trainer(cfg, model=TinyNet(channels=4, num_classes=ds.num_classes), dataset=ds, log=lambda s: None)
        losses = tr.fit()["losses"]
        assert all(torch.isfinite(torch.tensor(v)) for _, v in losses)
        assert ds.bucket_counts() == {(4, 4): len(ds)}
        latents.append(torch.stack([ds[i]["image"] for i in range(len(ds))]))
    torch.testing.assert_close(latents[0], latents[1], rtol=0, atol=0)
    # the cached latents are the scaled posterior mode of the images
    images = torch.stack([ImageFolderDataset(str(folder), resolution=8)[i]["image"] for i in range(len(latents[0]))])
    with torch.no_grad():
        want = (_tiny_vae().encode(images).mode() - 0.1) * 0.5
    torch.testing.assert_close(latents[0], want, rtol=1e-5, atol=1e-6)
    assert latents[0].shape == (len(images), 4, 4, 4) and latents[0].std() > 0


def test_vae_latents_match_diffusers(tmp_path):
    pytest.importorskip("safetensors")
    diffusers = pytest.importorskip("diffusers")
    vae = _tiny_vae()
    ref = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                                  down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2,
                                  layers_per_block=1, norm_num_groups=8, scaling_factor=0.5, shift_factor=0.1).eval()
    ref.load_state_dict(vae.state_dict())
    g = torch.Generator().manual_seed(1)
    ds = TensorImageDataset(torch.rand(5, 3, 8, 8, generator=g) * 2 - 1)
    got = torch.stack([e["image"] for e in CachedLatentDataset(ds, vae, str(tmp_path))])
    with torch.no_grad():
        want = (ref.encode(ds.images).latent_dist.mode() - 0.1) * 0.5
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # diffusers' VAE itself is an accepted encoder too, with its own key
    assert torch.stack([e["image"] for e in CachedLatentDataset(ds, ref, str(tmp_path))]).shape == got.shape


def test_changed_image_or_encoder_is_encoded_again(tmp_path):
    pytest.importorskip("safetensors")
    g = torch.Generator().manual_seed(0)
    images = torch.rand(6, 3, 8, 8, generator=g) * 2 - 1
    torch.manual_seed(0)
    enc = ConvEncoder()

    def build(imgs, encoder):
        return CachedLatentDataset(TensorImageDataset(imgs), encoder, str(tmp_path), batch_size=4)

    first = build(images, enc)
    assert (first.cache.misses, first.cache.hits, first.cache.calls) == (6, 0, 2)  # batches of 4 + 2
    again = build(images.clone(), enc)
    assert (again.cache.misses, again.cache.hits, again.cache.calls) == (0, 6, 0)
    changed = images.clone()
    changed[3, 0, 0, 0] += 0.5  # one pixel of one image
    one = build(changed, enc)
    assert (one.cache.misses, one.cache.hits) == (1, 5)
    with torch.no_grad():
        torch.testing.assert_close(one[3]["image"], enc(changed[3:4])[0], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(one[2]["image"], enc(images[2:3])[0], rtol=1e-6, atol=1e-6)
    # other weights: a new encoder key, everything encoded again
    with torch.no_grad():
        enc.conv.bias.add_(0.25)
    new = build(images, enc)
    assert new.key != first.key and (new.cache.misses, new.cache.hits) == (6, 0)
    with torch.no_grad():
        torch.testing.assert_close(new[0]["image"], enc(images[:1])[0], rtol=1e-6, atol=1e-6)
    # a damaged entry is encoded again, not loaded
    p = new.cache.path(new.keys[0])
    with open(p, "r+b") as fh:
        fh.truncate(10)
    fixed = build(images, enc)
    assert (fixed.cache.misses, fixed.cache.hits) == (1, 5)
    # no temporary files left behind
    assert not [f for f in os.listdir(os.path.dirname(p)) if f.endswith(".tmp")]


def test_changed_image_file_is_encoded_again(tmp_path):
    pytest.importorskip("safetensors")
    Image = pytest.importorskip("PIL.Image")
    from test_train_data import make_shapes_folder

    folder = make_shapes_folder(tmp_path / "data", per_class=2, size=8)
    enc = ConvEncoder()
    def make(**kw):
        return CachedLatentDataset(ImageFolderDataset(str(folder), **kw), enc, str(tmp_path / "c"))

    n = len(make(resolution=8))
    assert (make(resolution=8).cache.hits) == n
    first = sorted(p for p in folder.rglob("*.png"))[0]
    Image.new("RGB", (8, 8), (10, 200, 30)).save(first)
    ds = make(resolution=8)
    assert (ds.cache.misses, ds.cache.hits) == (1, n - 1)
    # another crop size is another preprocessing: encoded again
    assert make(resolution=4, bucket_step=4).cache.misses == n


def test_text_embedding_cache(tmp_path):
    pytest.importorskip("safetensors")
    torch.manual_seed(0)
    table = nn.Embedding(256, 8)
    calls = []

    def encode_text(captions):  # a toy text encoder: bytes -> embeddings (B, 6, 8) and a pooled (B, 8)
        calls.append(list(captions))
        ids = torch.tensor([list(c.encode()[:6].ljust(6, b" ")) for c in captions])
        e = table(ids)
        return {"prompt_embeds": e, "pooled": e.mean(1)}

    caps = ["a red circle", "a blue square", "a red circle", "green"]
    out = TextEmbeddingCache(encode_text, str(tmp_path)).embed(caps)
    assert calls == [caps] and out[0]["prompt_embeds"].shape == (6, 8) and out[0]["pooled"].shape == (8,)
    with torch.no_grad():
        direct = encode_text(caps)
    for i in range(4):
        torch.testing.assert_close(out[i]["prompt_embeds"], direct["prompt_embeds"][i])
        torch.testing.assert_close(out[i]["pooled"], direct["pooled"][i])
    calls.clear()
    again = TextEmbeddingCache(encode_text, str(tmp_path))  # a second run
    again.embed(caps + ["new caption"])
    assert calls == [["new caption"]] and again.cache.hits == 4
    with torch.no_grad():  # other weights of the module the function closes over: a new key
        table.weight[0].add_(1.0)
    calls.clear()
    other = TextEmbeddingCache(encode_text, str(tmp_path))
    assert other.key != again.key
    other.embed(caps[:2])
    assert len(calls) == 1 and other.cache.misses == 2


def test_encoder_key_covers_code_config_and_weights():
    torch.manual_seed(0)
    a, b = ConvEncoder(), ConvEncoder()
    assert encoder_key(a) != encoder_key(b)  # other (random) weights
    b.load_state_dict(a.state_dict())
    assert encoder_key(a) == encoder_key(b) and encoder_key(a, "vae").startswith("vae-")
    assert encoder_key(lambda x: x * 2) != encoder_key(lambda x: x * 3)
    assert encoder_key(vae_encoder(_tiny_vae(0))) != encoder_key(vae_encoder(_tiny_vae(1)))
    v = _tiny_vae(0)
    k0 = encoder_key(vae_encoder(v))
    v.config.scaling_factor = 0.25  # same weights, other scaling
    assert encoder_key(vae_encoder(v)) != k0


def test_config_driven_latent_training_reuses_the_cache_and_decodes_grids(tmp_path):
    pytest.importorskip("safetensors")
    Image = pytest.importorskip("PIL.Image")
    from fastgen.train import Config
    from test_train_data import make_shapes_folder

    folder = make_shapes_folder(tmp_path / "data", per_class=2, size=8)
    lines = []
    for run in range(2):
        cfg = Config.from_dict({
            "output_dir": str(tmp_path / f"run{run}"),
            "model": {"factory": "test_train_resume:TinyNet", "kwargs": {"channels": 4}},
            "data": {"path": str(folder), "resolution": 8, "vae": "test_train_cache:_tiny_vae",
                     "cache_dir": str(tmp_path / "cache")},
            "optim": {"ema_decay": 0.0},
            "train": {"steps": 2, "batch_size": 4, "progress": False, "device": "cpu"},
            "validation": {"every": 2, "per_class": 1, "num_steps": 2, "sampler": "builtin"},
        })
        tr = Trainer(cfg, log=lines.append)
        loss = tr.fit()["losses"][-1][1]
        assert torch.isfinite(torch.tensor(loss)) and tr.dataset[0]["image"].shape == (4, 4, 4)
        grid = Image.open(tmp_path / f"run{run}" / "samples" / "step-00000002.png")
        assert grid.size == (1 * 10 + 2, 4 * 10 + 2)  # decoded back to 8x8 images, one row per class
    cache_lines = [s for s in lines if "latents of" in s]
    assert cache_lines[0].endswith("0 cached, 8 encoded") and cache_lines[1].endswith("8 cached, 0 encoded")
