"""fastgen.train.data: image folder + captions, buckets, deterministic resumable sharded order, bad files."""

from __future__ import annotations

import os
from collections import Counter

import pytest
import torch

from fastgen.train import data as D
from fastgen.train.toy import COLOURS, make_shapes_folder  # noqa: F401 (the other train tests import it here)


def test_buckets():
    b = D.make_buckets(64, 8, 2.0)
    assert (64, 64) in b and all(h % 8 == 0 and w % 8 == 0 and h * w <= 64 * 64 for h, w in b)
    assert all(max(h, w) / min(h, w) <= 2.0 for h, w in b)
    assert b[D.nearest_bucket(300, 600, b)] == (48, 80)  # wide image -> the widest bucket
    assert b[D.nearest_bucket(512, 512, b)] == (64, 64)


def test_image_folder_reads_classes_captions_and_pixels(tmp_path):
    pytest.importorskip("PIL")
    make_shapes_folder(tmp_path, per_class=2)
    ds = D.ImageFolderDataset(str(tmp_path), resolution=16)
    assert ds.class_names == sorted(COLOURS) and len(ds) == 8
    item = ds[0]
    assert item["image"].shape == (3, 16, 16) and item["label"].item() == 0
    assert item["caption"] == "a blue triangle"
    import numpy as np
    from PIL import Image

    ref = torch.from_numpy(np.array(Image.open(ds.items[0].path).convert("RGB"), dtype=np.float32))
    ref = ref.permute(2, 0, 1) / 127.5 - 1
    torch.testing.assert_close(item["image"], ref)
    assert ds.bucket_counts() == {(16, 16): 8}


def test_bucketing_groups_batches_by_bucket(tmp_path):
    pytest.importorskip("PIL")
    make_shapes_folder(tmp_path, per_class=6, sizes=[(32, 32), (48, 24), (24, 48)])
    ds = D.ImageFolderDataset(str(tmp_path), resolution=32, bucketing=True, bucket_step=8)
    counts = ds.bucket_counts()
    assert sum(counts.values()) == 24 and len(counts) == 3, counts
    s = D.BucketBatchSampler(ds.bucket_ids, batch_size=4, seed=1)
    it = iter(s)
    for _ in range(12):
        idx = next(it)
        shapes = {tuple(ds[i]["image"].shape) for i in idx}
        assert len(idx) == 4 and len(shapes) == 1  # one bucket per batch
    wide = next(b for b in counts if b[1] > b[0])
    assert wide == (24, 40)


def test_order_is_deterministic_resumable_and_sharded():
    buckets = [i % 3 for i in range(50)]
    s = D.BucketBatchSampler(buckets, batch_size=4, seed=7)
    it = iter(s)
    first = [next(it) for _ in range(25)]  # crosses an epoch boundary (12 batches per epoch)
    assert s.batches_per_epoch == sum(n // 4 for n in Counter(buckets).values())
    again = iter(D.BucketBatchSampler(buckets, batch_size=4, seed=7))
    assert [next(again) for _ in range(25)] == first
    resumed = D.BucketBatchSampler(buckets, batch_size=4, seed=7)
    resumed.set_position(13)
    it2 = iter(resumed)
    assert [next(it2) for _ in range(12)] == first[13:]
    # an epoch is a permutation within buckets: no index twice
    epoch = [i for b in first[:12] for i in b]
    assert len(set(epoch)) == len(epoch)
    assert first[:12] != first[12:24]  # epochs reshuffle
    # two ranks: disjoint halves of the same global batches, each from one bucket
    r0, r1 = (iter(D.BucketBatchSampler(buckets, 2, seed=7, rank=r, world_size=2)) for r in (0, 1))
    for _ in range(12):
        a, b = next(r0), next(r1)
        assert not set(a) & set(b) and len({buckets[i] for i in a + b}) == 1


def test_bad_files_are_named_then_refused_or_skipped(tmp_path, capsys):
    pytest.importorskip("PIL")
    make_shapes_folder(tmp_path, per_class=2)
    broken = tmp_path / "red_circle" / "broken.png"
    broken.write_bytes(b"not a png")
    os.remove(tmp_path / "green_square" / "001.txt")
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "yellow_cross" / "tiny.png")
    Image.new("RGB", (16, 16)).save(tmp_path / "stray.png")
    (tmp_path / "yellow_cross" / "tiny.txt").write_text("tiny")
    with pytest.raises(D.DataError) as e:
        D.ImageFolderDataset(str(tmp_path), resolution=16, captions="required")
    msg = str(e.value)
    assert "4 bad file(s)" in msg and "broken.png: unreadable image" in msg
    assert "stray.png: outside the class folders" in msg
    assert "001.png: missing caption 001.txt" in msg and "tiny.png: 8x8 has fewer pixels" in msg
    ds = D.ImageFolderDataset(str(tmp_path), resolution=16, captions="required", on_bad="skip")
    assert len(ds) == 7 and "skipping 4 bad file(s)" in capsys.readouterr().out
    # optional captions: the caption-less image is fine
    assert len(D.ImageFolderDataset(str(tmp_path), resolution=16, on_bad="skip")) == 8


def test_too_little_data_for_a_batch():
    with pytest.raises(D.DataError, match="no bucket holds a full global batch of 8"):
        D.BucketBatchSampler([0, 0, 0, 1, 1], batch_size=4, world_size=2)
