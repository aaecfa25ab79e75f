"""Text-conditional training in fastgen.train: caption embeddings (cached), dropout to the null
embedding for classifier-free guidance, guided validation, exact resume, a fastgen PixArt step."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastgen.train import Trainer
from fastgen.train.data import TensorImageDataset
from fastgen.train.text import PromptTable, drop_text
from test_train_resume import _assert_identical, _cfg, _state, _straight_and_resumed, one_thread  # noqa: F401

CALLS: list = []  # captions per call of the text encoder that make_text_encoder builds


class TinyTextNet(nn.Module):
    """``forward(x, timestep, encoder_hidden_states (B, L, D))``; records what it was called with."""

    def __init__(self, channels: int = 3, text_dim: int = 8, width: int = 16):
        super().__init__()
        self.inp = nn.Conv2d(channels, width, 3, padding=1)
        self.t = nn.Linear(1, width)
        self.txt = nn.Linear(text_dim, width)
        self.out = nn.Conv2d(width, channels, 3, padding=1)
        self.seen: list = []

    def forward(self, x, timestep, encoder_hidden_states):
        self.seen.append(encoder_hidden_states.detach().clone())
        c = self.t(timestep.float()[:, None] / 1000) + self.txt(encoder_hidden_states).mean(1)
        return self.out(F.silu(self.inp(x) + c[:, :, None, None]))


def make_text_encoder(dim: int = 8, seed: int = 0):
    """A toy text encoder: UTF-8 bytes -> embeddings (B, 6, dim), closed over an nn.Embedding."""
    g = torch.Generator().manual_seed(seed)
    table = nn.Embedding(256, dim)
    with torch.no_grad():
        table.weight.copy_(torch.randn(256, dim, generator=g))

    def encode(captions):
        CALLS.append(list(captions))
        ids = torch.tensor([list(c.encode()[:6].ljust(6, b" ")) for c in captions])
        return table(ids)

    return encode


def _text_data(n=24):
    g = torch.Generator().manual_seed(0)
    captions = [f"caption {i % 3}" for i in range(n)]
    emb = torch.randn(3, 5, 8, generator=g)
    return TensorImageDataset(torch.rand(n, 3, 8, 8, generator=g) * 2 - 1, torch.zeros(n, dtype=torch.long),
                              text=emb[torch.arange(n) % 3], captions=captions), emb


def test_drop_text_replaces_whole_samples_by_the_null_embedding():
    g = torch.Generator().manual_seed(0)
    text = {"embeds": torch.randn(400, 5, 8, generator=g), "pooled": torch.randn(400, 8, generator=g)}
    null = {"embeds": torch.full((5, 8), 7.0), "pooled": torch.full((8,), -3.0)}
    assert drop_text(text, null, 0.0) is text
    out = drop_text(text, null, 0.25, generator=torch.Generator().manual_seed(1))
    dropped = (out["embeds"] == 7.0).flatten(1).all(1)
    assert torch.equal(dropped, (out["pooled"] == -3.0).all(1))  # both outputs of a sample go together
    assert 0.17 < dropped.float().mean() < 0.33
    torch.testing.assert_close(out["embeds"][~dropped], text["embeds"][~dropped], rtol=0, atol=0)
    torch.testing.assert_close(out["pooled"][~dropped], text["pooled"][~dropped], rtol=0, atol=0)
    assert drop_text(text, null, 1.0)["embeds"].eq(7.0).all()
    with pytest.raises(ValueError, match="null embedding 'embeds' has shape"):
        drop_text(text, {"embeds": torch.zeros(4, 8), "pooled": null["pooled"]}, 0.5)


def test_text_conditional_training_and_guided_validation(tmp_path, requires_safetensors, requires_image_writer):
    data, emb = _text_data()
    cfg = _cfg(tmp_path, steps=4)
    cfg.objective.cond_dropout = 0.5
    cfg.validation.every, cfg.validation.per_class, cfg.validation.num_steps = 4, 2, 3
    cfg.validation.sampler, cfg.validation.guidance_scale = "builtin", 3.0
    net = TinyTextNet()
    tr = Trainer(cfg, model=net, dataset=data, log=lambda s: None)
    train_calls = 4
    losses = tr.fit()["losses"]
    assert all(torch.isfinite(torch.tensor(v)) for _, v in losses)
    rows = torch.cat(net.seen[:train_calls])  # what the model saw in training: a caption's or the null (zeros)
    is_null = rows.flatten(1).eq(0).all(1)
    is_caption = (rows[:, None] == emb[None]).flatten(2).all(2).any(1)
    assert torch.all(is_null ^ is_caption) and 0 < is_null.sum() < len(rows)
    # validation: CFG batches of 3 prompts x 2 samples + the same number of null rows
    val = net.seen[train_calls]
    assert val.shape == (12, 5, 8) and val[6:].eq(0).all() and torch.equal(val[:6:2], emb)
    Image = pytest.importorskip("PIL.Image")
    grid = Image.open(tmp_path / "samples" / "step-00000004.png")
    assert grid.size == (2 * 10 + 2, 3 * 10 + 2)  # one row per prompt


def test_text_encoder_from_config_is_cached_and_resume_is_exact(tmp_path):
    pytest.importorskip("safetensors")
    pytest.importorskip("PIL")
    from test_train_data import make_shapes_folder

    folder = make_shapes_folder(tmp_path / "data", per_class=3, size=8)

    def make(out):
        cfg = _cfg(out, steps=4, path=str(folder), resolution=8, text_encoder="test_train_text:make_text_encoder",
                   cache_dir=str(tmp_path / "cache"))
        cfg.model.factory = "test_train_text:TinyTextNet"
        cfg.objective.cond_dropout = 0.3
        return cfg

    CALLS.clear()
    straight, resumed, _ = _straight_and_resumed(tmp_path, make, lambda: None)
    captions = sorted({straight.dataset.captions[i] for i in range(len(straight.dataset))} | {""})
    assert len(captions) >= 3 and CALLS == [captions]  # one call, in the first of three runs; cache hits after
    _assert_identical(_state(straight), _state(resumed))
    assert resumed.dataset.text_cache.cache.hits == len(captions)
    # the null embedding is the encoder's output for ""
    with torch.no_grad():
        torch.testing.assert_close(straight.text_null["embeds"], make_text_encoder()([""])[0])


def test_fastgen_pixart_trains_on_text(tmp_path, requires_safetensors):
    from fastgen.models import PixArt

    cfg = _cfg(tmp_path, steps=2)
    cfg.model.factory = "fastgen.models:PixArt"
    cfg.model.kwargs = dict(num_attention_heads=2, attention_head_dim=8, in_channels=3, out_channels=6, num_layers=1,
                            cross_attention_dim=16, sample_size=8, patch_size=2, caption_channels=8,
                            use_additional_conditions=False)
    cfg.objective.cond_dropout = 0.2
    data, _ = _text_data(8)
    tr = Trainer(cfg, dataset=data, log=lambda s: None)
    assert isinstance(tr.model, PixArt)
    before = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    losses = tr.fit()["losses"]
    assert all(torch.isfinite(torch.tensor(v)) for _, v in losses)
    caption_proj = [n for n in before if "caption" in n]
    assert caption_proj and all(not torch.equal(before[n], dict(tr.model.named_parameters())[n]) for n in caption_proj)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_prompt_table_picks_each_prompt_in_the_sampling_dtype(dtype):
    """Validation prompts as labels: label i gets prompt i's embeddings, the last label the null
    embedding, cast like the training step's (floating tensors follow x: bf16 under bf16-pure)."""
    seen = []

    def model(x, timestep, encoder_hidden_states, attention_mask):
        seen.append((encoder_hidden_states, attention_mask))
        return x

    prompts = [{"h": torch.full((2, 3), float(i)), "m": torch.ones(2, dtype=torch.long)} for i in range(3)]
    null = {"h": torch.full((2, 3), -1.0), "m": torch.zeros(2, dtype=torch.long)}
    table = PromptTable(model, prompts, null, {"h": "encoder_hidden_states", "m": "attention_mask"})
    assert table.null_label == 3
    x = torch.zeros(4, 1, dtype=dtype)
    table(x, torch.zeros(4), class_labels=torch.tensor([2, 0, 3, 1]))
    h, m = seen[0]
    assert h.dtype == dtype and m.dtype == torch.long
    assert h[:, 0, 0].tolist() == [2.0, 0.0, -1.0, 1.0] and m[:, 0].tolist() == [1, 1, 0, 1]
