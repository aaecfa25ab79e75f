"""Training data: an image folder with captions, an in-memory tensor dataset, aspect-ratio
buckets, and a deterministic, resumable, rank-sharded batch order.

Folder layout (``data.path``)::

    path/<class name>/<image>.{png,jpg,jpeg,webp,bmp}   (+ optional <image>.txt caption)
    path/<image>.png ...                                 (no subfolders: one class, id 0)

Class ids are the sorted subfolder names. An item is ``{"image": (C, H, W) float32 in [-1, 1],
"label": int64, "caption": str}``; H, W are its bucket's size.

Buckets (``data.bucketing``): every ``(h, w)`` with sides multiples of ``step``, ``h * w <=
resolution^2``, aspect ``<= max_aspect``, the widest ``w`` for each ``h``. An image goes to the
bucket nearest in log aspect ratio, is scaled to cover it and center-cropped. Without bucketing
there is one bucket, ``(resolution, resolution)``.

Batch order (:class:`BucketBatchSampler`): epoch ``e`` shuffles each bucket with a generator
seeded by ``(seed, e)``, cuts it into global batches of ``batch_size * world_size`` (a bucket's
remainder is dropped for that epoch), and shuffles the global batches; rank ``r`` takes the
``r``-th slice of each. So every batch on every rank comes from one bucket, the order depends
only on the seed, and a position (the number of batches consumed) resumes it exactly.

Bad data is never dropped silently: an unreadable image, a missing caption when captions are
required, or an image with fewer pixels than its bucket is listed by file name, then refused
(``on_bad = "error"``) or skipped with a report (``"skip"``).
"""

from __future__ import annotations

import math
import os
from collections import Counter
from dataclasses import dataclass
from typing import Iterator, Optional

import torch

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class DataError(ValueError):
    """Bad training data (the message lists the files and why)."""


def make_buckets(resolution: int, step: int = 8, max_aspect: float = 2.0) -> list[tuple[int, int]]:
    """``(h, w)`` buckets of at most ``resolution^2`` pixels, sides multiples of ``step``."""
    area = resolution * resolution
    out = set()
    h = step
    while h <= area // step:
        w = (area // h) // step * step
        if w >= step and max(h, w) / min(h, w) <= max_aspect + 1e-9:
            out.add((h, w))
        h += step
    return sorted(out)


def nearest_bucket(height: int, width: int, buckets: list[tuple[int, int]]) -> int:
    ar = math.log(width / height)
    return min(range(len(buckets)), key=lambda i: (abs(math.log(buckets[i][1] / buckets[i][0]) - ar), i))


@dataclass
class Item:
    path: str
    label: int
    caption: str
    bucket: int


class ImageFolderDataset(torch.utils.data.Dataset):
    """Images (+ captions) from a folder, one class per subfolder (see the module docstring)."""

    def __init__(self, path: str, resolution: int = 16, channels: int = 3, bucketing: bool = False,
                 bucket_step: int = 8, max_aspect: float = 2.0, captions: str = "optional", on_bad: str = "error"):
        try:
            from PIL import Image  # noqa: F401
        except ImportError as exc:  # pragma: no cover - PIL ships with the test environment
            raise ImportError("ImageFolderDataset needs Pillow (pip install pillow)") from exc
        if not os.path.isdir(path):
            raise DataError(f"data.path {path!r} is not a folder")
        self.root, self.channels = path, channels
        self.buckets = make_buckets(resolution, bucket_step, max_aspect) if bucketing else [(resolution, resolution)]
        subdirs = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)))
        self.class_names = subdirs or [os.path.basename(os.path.normpath(path))]
        folders = [os.path.join(path, d) for d in subdirs] or [path]
        self.items: list[Item] = []
        self.bad: list[tuple[str, str]] = []
        if subdirs:  # with class folders, an image beside them belongs to no class
            for name in sorted(os.listdir(path)):
                if name.lower().endswith(IMAGE_EXTS):
                    self.bad.append((os.path.join(path, name), "outside the class folders (no class)"))
        for label, folder in enumerate(folders):
            for name in sorted(os.listdir(folder)):
                if name.lower().endswith(IMAGE_EXTS):
                    self._scan(os.path.join(folder, name), label, captions)
        if self.bad:
            report = "\n".join(f"  {p}: {why}" for p, why in self.bad)
            if on_bad == "error":
                raise DataError(f"{len(self.bad)} bad file(s) in {path} (set data.on_bad = 'skip' to skip them):\n"
                                f"{report}")
            print(f"fastgen.train: skipping {len(self.bad)} bad file(s) in {path}:\n{report}", flush=True)
        if not self.items:
            raise DataError(f"no usable images in {path} (extensions {', '.join(IMAGE_EXTS)})")

    def _scan(self, file: str, label: int, captions: str) -> None:
        from PIL import Image

        try:
            with Image.open(file) as im:
                width, height = im.size
                im.verify()
        except Exception as exc:  # noqa: BLE001 - any decoder error means an unreadable file
            self.bad.append((file, f"unreadable image ({type(exc).__name__}: {exc})"))
            return
        caption = ""
        txt = os.path.splitext(file)[0] + ".txt"
        if captions != "ignore":
            if os.path.isfile(txt):
                with open(txt, encoding="utf-8") as fh:
                    caption = fh.read().strip()
            elif captions == "required":
                self.bad.append((file, f"missing caption {os.path.basename(txt)}"))
                return
        b = nearest_bucket(height, width, self.buckets)
        bh, bw = self.buckets[b]
        if width * height < bw * bh:
            self.bad.append((file, f"{width}x{height} has fewer pixels than its bucket {bw}x{bh}"))
            return
        self.items.append(Item(file, label, caption, b))

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def bucket_ids(self) -> list[int]:
        return [it.bucket for it in self.items]

    def bucket_counts(self) -> dict[tuple[int, int], int]:
        """``{(h, w): number of images}`` for the buckets in use."""
        c = Counter(self.bucket_ids)
        return {self.buckets[b]: n for b, n in sorted(c.items())}

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        from PIL import Image

        it = self.items[i]
        bh, bw = self.buckets[it.bucket]
        with Image.open(it.path) as im:
            im = im.convert("RGB" if self.channels == 3 else "L")
            w, h = im.size
            scale = max(bw / w, bh / h)
            nw, nh = max(bw, round(w * scale)), max(bh, round(h * scale))
            if (nw, nh) != (w, h):
                im = im.resize((nw, nh), Image.BICUBIC)
            left, top = (nw - bw) // 2, (nh - bh) // 2
            im = im.crop((left, top, left + bw, top + bh))
            data = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
        x = data.view(bh, bw, self.channels).permute(2, 0, 1).float() / 127.5 - 1.0
        return {"image": x, **self.meta(i)}

    def meta(self, i: int) -> dict:
        """Item ``i`` without its image: ``{"label", "caption"}``."""
        it = self.items[i]
        return {"label": torch.tensor(it.label), "caption": it.caption}

    def content_key(self, i: int) -> str:
        """SHA-256 of the image file and its preprocessing (bucket size, channels): the cache key."""
        from fastgen.train.cache import file_key

        it = self.items[i]
        return file_key(it.path, "resize-crop-v1", self.buckets[it.bucket], self.channels)


class DatasetView(torch.utils.data.Dataset):
    """Base of the datasets that wrap another, ``self.dataset`` (the latent and text-embedding
    caches): its length, classes and bucket ids pass through."""

    dataset: torch.utils.data.Dataset

    @property
    def num_classes(self) -> int:
        return self.dataset.num_classes

    @property
    def bucket_ids(self) -> list[int]:
        return self.dataset.bucket_ids

    def __len__(self) -> int:
        return len(self.dataset)


class TensorImageDataset(torch.utils.data.Dataset):
    """In-memory ``images (N, C, H, W)`` in [-1, 1] and ``labels (N,)``: one bucket, no files."""

    def __init__(self, images: torch.Tensor, labels: Optional[torch.Tensor] = None, num_classes: Optional[int] = None,
                 text=None, captions: Optional[list] = None):
        """``text``: per-image text-encoder outputs, a tensor ``(N, L, D)`` (named ``"embeds"``) or a
        dict of ``(N, ...)`` tensors, for text-conditional training (the null embedding is zeros);
        ``captions``: N strings (for :class:`fastgen.train.text.TextEmbeddingDataset`)."""
        if images.dim() != 4:
            raise DataError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
        self.images = images.float()
        self.labels = torch.zeros(len(images), dtype=torch.long) if labels is None else labels.long()
        if len(self.labels) != len(images):
            raise DataError(f"{len(images)} images but {len(self.labels)} labels")
        n = num_classes or int(self.labels.max()) + 1
        self.class_names = [str(i) for i in range(n)]
        self.buckets = [tuple(images.shape[-2:])]
        self.bad: list = []
        self.captions = list(captions) if captions is not None else [""] * len(images)
        self.text = None
        if text is not None:
            self.text = {"embeds": text} if isinstance(text, torch.Tensor) else dict(text)
            for k, v in self.text.items():
                if len(v) != len(images):
                    raise DataError(f"{len(images)} images but {len(v)} rows of text {k!r}")
            self.null = {k: torch.zeros_like(v[0]) for k, v in self.text.items()}
        if len(self.captions) != len(images):
            raise DataError(f"{len(images)} images but {len(self.captions)} captions")

    num_classes = ImageFolderDataset.num_classes
    bucket_counts = ImageFolderDataset.bucket_counts

    @property
    def bucket_ids(self) -> list[int]:
        return [0] * len(self.images)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], **self.meta(i)}

    def meta(self, i: int) -> dict:
        m = {"label": self.labels[i], "caption": self.captions[i]}
        if self.text is not None:
            m["text"] = {k: v[i] for k, v in self.text.items()}
        return m

    def content_key(self, i: int) -> str:
        from fastgen.train.cache import tensor_key

        return tensor_key(self.images[i])


class BucketBatchSampler(torch.utils.data.Sampler):
    """Endless batches of indices, one bucket per batch, from position ``start`` (see the module docstring)."""

    def __init__(self, bucket_ids: list[int], batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.members: dict[int, list[int]] = {}
        for i, b in enumerate(bucket_ids):
            self.members.setdefault(b, []).append(i)
        glob = batch_size * world_size
        self.batches_per_epoch = sum(len(m) // glob for m in self.members.values())
        if self.batches_per_epoch == 0:
            sizes = {b: len(m) for b, m in self.members.items()}
            raise DataError(f"no bucket holds a full global batch of {glob} (batch_size {batch_size} x "
                            f"{world_size} processes); images per bucket: {sizes}")
        self.start = 0

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """The global batches of ``epoch`` (each ``batch_size * world_size`` indices), in order."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        glob = self.batch_size * self.world_size
        chunks = []
        for b in sorted(self.members):
            m = self.members[b]
            perm = torch.randperm(len(m), generator=g).tolist()
            chunks += [[m[j] for j in perm[k:k + glob]] for k in range(0, len(m) - glob + 1, glob)]
        order = torch.randperm(len(chunks), generator=g).tolist()
        return [chunks[i] for i in order]

    def set_position(self, batches_consumed: int) -> None:
        self.start = batches_consumed

    def __iter__(self) -> Iterator[list[int]]:
        pos = self.start
        epoch, k = divmod(pos, self.batches_per_epoch)
        while True:
            batches = self.epoch_batches(epoch)
            for chunk in batches[k:]:
                yield chunk[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
            epoch, k = epoch + 1, 0


def build_dataset(cfg) -> torch.utils.data.Dataset:
    """The dataset a :class:`fastgen.train.config.DataConfig` describes."""
    if not cfg.path:
        raise DataError("data.path is empty: set it to an image folder (or pass dataset= to Trainer)")
    return ImageFolderDataset(cfg.path, cfg.resolution, cfg.channels, cfg.bucketing, cfg.bucket_step,
                              cfg.max_aspect, cfg.captions, cfg.on_bad)
