"""Text-conditional training: cached caption embeddings, dropout to a null embedding, CFG sampling.

A text-conditional batch carries, per sample, the text encoder's outputs for its caption
(``{"embeds": (L, D)}``, or several tensors such as ``{"prompt_embeds": (L, D), "pooled": (P,)}``),
read from the :class:`fastgen.train.cache.TextEmbeddingCache` (:class:`TextEmbeddingDataset`) or
given in memory (``TensorImageDataset(..., text=...)``). The model is called with keywords::

    model(x_t, timestep=t, **{model.text_inputs[name]: tensor for name, tensor in text.items()})

e.g. ``text_inputs = {embeds = "encoder_hidden_states"}`` (PixArt, the U-Nets) or
``{prompt_embeds = "encoder_hidden_states", pooled = "pooled_projections"}`` (SD3, Flux).

Classifier-free guidance dropout (:func:`drop_text`): each sample's text outputs are replaced, all
together, by the **null embedding** with probability ``p`` (``objective.cond_dropout``)::

    keep_b ~ Bernoulli(1 - p);   text_b <- keep_b text_b + (1 - keep_b) null        (per output)

The null embedding is the encoder's output for the empty caption ``""`` (what Stable Diffusion's
training and sampling use) when there is an encoder, else zeros. Sampling with guidance then
contrasts the prompt with that same null embedding (:class:`PromptTable`).

Distillation (consistency distillation, LCM) passes the text as the condition itself:
:func:`text_cond_model` turns ``model`` into ``f(x, t, class_labels=text, **kw)`` so the student, its
target network and the teacher all get the (dropped) caption embeddings, the LCM teacher's
unconditional half the null embedding (expanded to ``(B, ...)``), and extra keywords such as LCM's
``timestep_cond`` pass through.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from fastgen.train.cache import TextEmbeddingCache
from fastgen.train.data import DatasetView


def drop_text(text: dict, null: dict, p: float, generator: Optional[torch.Generator] = None) -> dict:
    """``text`` (``{name: (B, ...)}``) with each sample replaced by ``null`` (``{name: (...)}``) w.p. ``p``."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"text dropout p must be in [0, 1], got {p}")
    if p == 0.0 or not text:
        return text
    first = next(iter(text.values()))
    drop = torch.rand(first.shape[0], generator=generator, device=first.device) < p
    out = {}
    for k, v in text.items():
        n = null[k].to(v.device, v.dtype)
        if n.shape != v.shape[1:]:
            raise ValueError(f"the null embedding {k!r} has shape {tuple(n.shape)}, the batch's samples "
                             f"{tuple(v.shape[1:])}")
        out[k] = torch.where(drop.view(-1, *([1] * (v.dim() - 1))), n.expand_as(v), v)
    return out


def text_keywords(text: dict, text_inputs: dict) -> dict:
    """``{model keyword: tensor}`` for the text outputs ``text`` (``model.text_inputs`` maps the names)."""
    missing = [k for k in text if k not in text_inputs]
    if missing:
        raise ValueError(f"text encoder outputs {missing} have no model keyword in model.text_inputs "
                         f"({text_inputs}); add e.g. {{{missing[0]} = \"encoder_hidden_states\"}}")
    return {text_inputs[k]: v for k, v in text.items()}


def like_x(text: dict, x: torch.Tensor) -> dict:
    """The text outputs on ``x``'s device; floating ones in ``x``'s dtype (bf16 under precision =
    'bf16-pure'), the rest (token ids, masks) in their own."""
    return {k: v.to(x.device, x.dtype if v.is_floating_point() else v.dtype) for k, v in text.items()}


def text_cond_model(model: Callable, text_inputs: dict) -> Callable:
    """``f(x, t, class_labels=text, **kw) = model(x, timestep=t, **text as keywords, **kw)``: the text
    outputs ``{name: (B, ...)}`` ride in the condition argument, which every objective passes on to
    the model (and the distillation objectives to the student, the target network and the teacher)."""

    def call(x, t, class_labels=None, **kw):
        tkw = text_keywords(class_labels, text_inputs) if class_labels is not None else {}
        return model(x, timestep=t, **tkw, **kw)

    return call


def null_batch(null: dict, batch: int, like: dict) -> dict:
    """The null embedding ``{name: (...)}`` as a batch ``{name: (batch, ...)}`` on ``like``'s devices / dtypes."""
    return {k: null[k].to(like[k].device, like[k].dtype).expand(batch, *null[k].shape) for k in like}


class PromptTable(torch.nn.Module):
    """Validation prompts as a class-conditional model: ``class_labels = i`` picks prompt ``i``, the
    last index the null embedding, so the trainer's CFG sampler works unchanged."""

    def __init__(self, model: Callable, prompts: Sequence[dict], null: dict, text_inputs: dict):
        super().__init__()
        self.model, self.text_inputs = model, text_inputs
        self.table = {k: torch.stack([p[k] for p in prompts] + [null[k]]) for k in null}

    @property
    def null_label(self) -> int:
        return next(iter(self.table.values())).shape[0] - 1

    def forward(self, x, t, class_labels=None, **kw):
        # the training step's rule (like_x): floating embeddings follow x's dtype
        text = {k: v[class_labels.to(x.device)] for k, v in like_x(self.table, x).items()}
        return text_cond_model(self.model, self.text_inputs)(x, t, class_labels=text, **kw)


class TextEmbeddingDataset(DatasetView):
    """``dataset`` (items with a ``caption``) plus ``item["text"]``: the cached encoder outputs of the
    caption. ``null`` holds the outputs for ``""``; every caption is encoded once (and never again
    across runs while the encoder is unchanged)."""

    def __init__(self, dataset, encoder: Callable, cache_dir: str, name: Optional[str] = None, batch_size: int = 64):
        self.dataset = dataset
        self.text_cache = TextEmbeddingCache(encoder, cache_dir, name, batch_size)
        meta = dataset.meta if hasattr(dataset, "meta") else (lambda i: dataset[i])
        self.captions = [meta(i)["caption"] for i in range(len(dataset))]
        distinct = sorted(set(self.captions) | {""})
        entries = dict(zip(distinct, self.text_cache.embed(distinct)))
        self.null = entries[""]
        self.embeds = [entries[c] for c in self.captions]
        self.class_names, self.buckets, self.bad = dataset.class_names, dataset.buckets, getattr(dataset, "bad", [])

    def bucket_counts(self) -> dict:
        return self.dataset.bucket_counts()

    def meta(self, i: int) -> dict:
        m = self.dataset.meta(i) if hasattr(self.dataset, "meta") else {
            k: v for k, v in self.dataset[i].items() if k != "image"}
        return {**m, "text": self.embeds[i]}

    def __getitem__(self, i: int) -> dict:
        return {**self.dataset[i], "text": self.embeds[i]}
