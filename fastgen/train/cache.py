"""Latent and text-embedding caches: encode once, reuse across runs, recompute when anything changes.

A cached entry is one safetensors file per item::

    <cache_dir>/<kind>/<encoder key>/<content key>.safetensors      kind = "latents" | "text"

- **content key** = SHA-256 of what the encoder sees: an image file's bytes plus the preprocessing
  (bucket ``h x w``, channels) for :class:`~fastgen.train.data.ImageFolderDataset`, an in-memory
  image's dtype, shape and bytes, a caption's UTF-8 text.
- **encoder key** = ``<name>-<16 hex>`` where the hex digits are a SHA-256 over the encoder's
  config (a dataclass, dict or ``to_dict()``) and every tensor of its state dict (names, dtypes,
  shapes and bytes), plus how the output is taken (e.g. the posterior mode, the scaling). A plain
  function hashes its code and constants and the modules it closes over or is bound to.

So an edited image, a different crop size, or an encoder with other weights or config gets new
keys and is encoded again; everything else is read from disk. Entries are written to a temporary
file and renamed into place, so an interrupted run never leaves a half-written entry, and a file
that does not load is encoded again. Misses are encoded in batches of ``batch_size`` items of the
same shape, with ``torch.no_grad()``.

Latents of :class:`fastgen.vae.AutoencoderKL` (or diffusers' ``AutoencoderKL``) are the scaled
posterior mode, ``z = (mode - shift_factor) * scaling_factor``, what a latent diffusion model trains
on (:func:`vae_encoder`). Any other callable ``images (B, C, H, W) in [-1, 1] -> (B, c, h, w)``
works as well. A text encoder is a callable ``list[str] -> tensor (B, ...)`` or a dict (or tuple) of
such tensors (e.g. per-token embeddings and a pooled vector); each caption's slice is cached.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import types
from typing import Callable, Optional, Sequence

import torch

from fastgen.train.data import DatasetView


# --------------------------------------------------------------------------- keys

def _hash_module(h, module: torch.nn.Module) -> None:
    cfg = getattr(module, "config", None)
    if dataclasses.is_dataclass(cfg):
        cfg = dataclasses.asdict(cfg)
    elif hasattr(cfg, "to_dict"):
        cfg = cfg.to_dict()
    h.update(type(module).__qualname__.encode())
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    for name, t in module.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def _hash_callable(h, fn, depth: int = 0) -> None:
    if isinstance(fn, torch.nn.Module):
        _hash_module(h, fn)
        return
    if depth > 3:
        return
    if isinstance(fn, types.MethodType):
        h.update(fn.__func__.__qualname__.encode())
        _hash_callable(h, fn.__self__, depth + 1)
        _hash_callable(h, fn.__func__, depth + 1)
        return
    code = getattr(fn, "__code__", None)
    if code is not None:
        h.update(code.co_code)
        h.update(repr(code.co_consts).encode())
        for cell in fn.__closure__ or ():
            try:
                v = cell.cell_contents
            except ValueError:  # an empty cell
                continue
            _hash_value(h, v, depth)
        return
    # a callable object: its class and the modules / values it holds
    h.update(type(fn).__qualname__.encode())
    for k, v in sorted(vars(fn).items()) if hasattr(fn, "__dict__") else ():
        h.update(k.encode())
        _hash_value(h, v, depth)
    call = getattr(type(fn), "__call__", None)
    if call is not None and hasattr(call, "__code__"):
        h.update(call.__code__.co_code)


def _hash_value(h, v, depth: int) -> None:
    if isinstance(v, torch.Tensor):
        h.update(tensor_key(v).encode())
    elif isinstance(v, torch.nn.Module) or callable(v):
        _hash_callable(h, v, depth + 1)
    else:
        h.update(repr(v).encode())


def encoder_key(encoder, name: Optional[str] = None, extra: str = "") -> str:
    """``<name>-<16 hex>``: the encoder's name and a hash of its config, weights (or code) and ``extra``."""
    h = hashlib.sha256()
    _hash_callable(h, encoder)
    h.update(extra.encode())
    if name is None:
        name = getattr(encoder, "__name__", None) or type(encoder).__name__
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:60] or "encoder"
    return f"{safe}-{h.hexdigest()[:16]}"


def tensor_key(t: torch.Tensor, *extra) -> str:
    """SHA-256 of a tensor's dtype, shape and bytes (and ``extra``)."""
    t = t.detach().cpu().contiguous()
    h = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|{extra}".encode())
    h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def file_key(path: str, *extra) -> str:
    """SHA-256 of a file's bytes (and ``extra``: the preprocessing)."""
    h = hashlib.sha256(repr(extra).encode())
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def text_key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------- the cache

class EmbeddingCache:
    """One encoder's entries under ``root/kind/encoder_key``; :meth:`get_many` encodes only the misses.

    ``encode(inputs) -> tensor (B, ...)`` or a dict / tuple of them, for a list of inputs that
    :meth:`get_many` hands over (a stacked image batch or a list of captions, see ``collate``).
    ``hits`` / ``misses`` count entries read and encoded; ``calls`` counts encoder calls.
    """

    def __init__(self, root: str, kind: str, encode: Callable, key: str,
                 collate: Callable = torch.stack, batch_size: int = 16):
        self.folder = os.path.join(root, kind, key)
        self.encode, self.collate, self.batch_size = encode, collate, max(1, batch_size)
        self.hits = self.misses = self.calls = 0

    def path(self, content_key: str) -> str:
        return os.path.join(self.folder, content_key + ".safetensors")

    def _read(self, content_key: str) -> Optional[dict]:
        from safetensors.torch import load_file

        p = self.path(content_key)
        if not os.path.isfile(p):
            return None
        try:
            return load_file(p)
        except Exception:  # noqa: BLE001 - a damaged entry is encoded again
            return None

    def _check(self, content_key: str) -> Optional[bool]:
        """``True`` when the entry exists and its header and size are intact (without reading the data)."""
        from safetensors import safe_open

        p = self.path(content_key)
        if not os.path.isfile(p):
            return None
        try:
            with safe_open(p, framework="pt") as fh:
                return True if list(fh.keys()) else None
        except Exception:  # noqa: BLE001 - a damaged entry is encoded again
            return None

    def _write(self, content_key: str, tensors: dict) -> None:
        from safetensors.torch import save_file

        os.makedirs(self.folder, exist_ok=True)
        p = self.path(content_key)
        tmp = f"{p}.{os.getpid()}.tmp"
        save_file({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, tmp,
                  metadata={"content_key": content_key, "encoder_key": os.path.basename(self.folder)})
        os.replace(tmp, p)

    def get_many(self, keys: Sequence[str], load: Callable[[int], object],
                 group: Optional[Callable[[int], object]] = None, keep: bool = True) -> list:
        """The entries of ``keys`` (dicts of tensors; ``None`` each when ``keep=False``): read from
        disk, or ``load(i)`` + encode in batches (items of one ``group(i)`` value per batch)."""
        out: list = [None] * len(keys)
        todo: dict = {}
        for i, k in enumerate(keys):
            entry = self._read(k) if keep else self._check(k)
            if entry is None:
                todo.setdefault(group(i) if group else None, []).append(i)
            else:
                self.hits += 1
                out[i] = entry if keep else None
        for idx in todo.values():
            for s in range(0, len(idx), self.batch_size):
                chunk = idx[s:s + self.batch_size]
                with torch.no_grad():
                    enc = self.encode(self.collate([load(i) for i in chunk]))
                self.calls += 1
                parts = _as_dict(enc)
                for j, i in enumerate(chunk):
                    entry = {name: t[j] for name, t in parts.items()}
                    self._write(keys[i], entry)
                    self.misses += 1
                    out[i] = {k: v.detach().cpu().clone() for k, v in entry.items()} if keep else None
        return out

    def load(self, content_key: str) -> dict:
        entry = self._read(content_key)
        if entry is None:
            raise FileNotFoundError(f"cache entry {self.path(content_key)} is missing or unreadable")
        return entry


def _as_dict(enc) -> dict:
    if isinstance(enc, torch.Tensor):
        return {"embeds": enc}
    if isinstance(enc, dict):
        return {str(k): v for k, v in enc.items() if isinstance(v, torch.Tensor)}
    if isinstance(enc, (tuple, list)):
        return {f"embeds_{i}" if i else "embeds": v for i, v in enumerate(enc) if isinstance(v, torch.Tensor)}
    raise TypeError(f"an encoder must return a tensor, a dict or a tuple of tensors, got {type(enc).__name__}")


# --------------------------------------------------------------------------- encoders

def vae_encoder(vae, sample: bool = False) -> Callable:
    """``images (B, C, H, W) in [-1, 1] -> (mode - shift_factor) * scaling_factor`` of an AutoencoderKL
    (fastgen's or diffusers'), on the VAE's device and dtype; the key covers the VAE's weights."""
    if sample:
        raise ValueError("vae_encoder: cached latents are the posterior mode (a sample would be frozen "
                         "into the cache); use sample=False")
    cfg = vae.config
    scale = float(getattr(cfg, "scaling_factor", None) or cfg["scaling_factor"])
    shift = float((getattr(cfg, "shift_factor", None) if not isinstance(cfg, dict) else cfg.get("shift_factor"))
                  or 0.0)
    p = next(vae.parameters())

    def encode_latents(x: torch.Tensor) -> torch.Tensor:
        post = vae.encode(x.to(p.device, p.dtype))
        post = getattr(post, "latent_dist", post)
        return ((post.mode() - shift) * scale).float()

    return encode_latents


# --------------------------------------------------------------------------- datasets

class CachedLatentDataset(DatasetView):
    """``dataset`` with every image replaced by its cached latent (encoded once, see the module docstring).

    Items: ``{"image": latent (c, h, w), "label", "caption"}``; ``buckets`` are latent sizes.
    ``encoder``: an AutoencoderKL (wrapped by :func:`vae_encoder`) or any callable images -> latents.
    """

    def __init__(self, dataset, encoder, cache_dir: str, name: Optional[str] = None, batch_size: int = 16,
                 in_memory: bool = False):
        self.dataset = dataset
        if isinstance(encoder, torch.nn.Module) and hasattr(encoder, "encode"):
            name = name or type(encoder).__name__
            encoder = vae_encoder(encoder)
        self.key = encoder_key(encoder, name, extra="latents")
        self.cache = EmbeddingCache(cache_dir, "latents", encoder, self.key, batch_size=batch_size)
        self.keys = [content_key(dataset, i) for i in range(len(dataset))]
        bids = list(dataset.bucket_ids)
        entries = self.cache.get_many(self.keys, lambda i: dataset[i]["image"], group=lambda i: bids[i],
                                      keep=in_memory)
        self.memory = [e["embeds"] for e in entries] if in_memory else None
        first = {}
        for i, b in enumerate(bids):
            first.setdefault(b, i)
        shapes = {b: tuple(self._latent(i).shape[-2:]) for b, i in first.items()}
        self.buckets = [shapes.get(b, (0, 0)) for b in range(len(dataset.buckets))]
        self.class_names, self.bad = dataset.class_names, getattr(dataset, "bad", [])
        if hasattr(dataset, "null"):  # text-conditional data: its null embedding
            self.null = dataset.null

    def _latent(self, i: int) -> torch.Tensor:
        return self.memory[i] if self.memory is not None else self.cache.load(self.keys[i])["embeds"]

    def bucket_counts(self) -> dict:
        from collections import Counter

        c = Counter(self.bucket_ids)
        return {self.buckets[b]: n for b, n in sorted(c.items())}

    def __getitem__(self, i: int) -> dict:
        item = self.dataset.meta(i) if hasattr(self.dataset, "meta") else dict(self.dataset[i])
        item["image"] = self._latent(i)
        return item


def content_key(dataset, i: int) -> str:
    """What the encoder sees of item ``i``: ``dataset.content_key(i)`` when it has one, else the image's bytes."""
    if hasattr(dataset, "content_key"):
        return dataset.content_key(i)
    return tensor_key(dataset[i]["image"])


class TextEmbeddingCache:
    """Caption -> cached text-encoder outputs (``{"embeds": (L, D), ...}`` per caption).

    ``encoder``: a callable ``list[str] -> tensor (B, L, D)`` or a dict / tuple of tensors
    (a transformers text model wrapped in a small function that tokenizes and runs it; the key
    covers the modules that function closes over).
    """

    def __init__(self, encoder, cache_dir: str, name: Optional[str] = None, batch_size: int = 64):
        self.key = encoder_key(encoder, name, extra="text")
        self.cache = EmbeddingCache(cache_dir, "text", encoder, self.key, collate=list, batch_size=batch_size)

    def embed(self, captions: Sequence[str]) -> list[dict]:
        """One dict of tensors per caption (encoding only the captions not cached yet)."""
        captions = list(captions)
        return self.cache.get_many([text_key(c) for c in captions], lambda i: captions[i])
