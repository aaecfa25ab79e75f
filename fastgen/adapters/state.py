"""Adapter weights independent of any file format, and their conversion to and from branches.

``ModuleWeights`` holds one layer's adapter in fastgen's canonical names:

=========  ==========================================================  ===================
kind       tensors                                                     scale
=========  ==========================================================  ===================
lora       ``down (r, in[, kh, kw])``, ``up (out, r[, 1, 1])``         alpha / r
dora       the LoRA pair + ``magnitude (out,)``                        alpha / r
loha       ``w1a (out, r)``, ``w1b (r, in_flat)``, ``w2a``, ``w2b``    alpha / r
lokr       ``w1`` or ``w1a, w1b``; ``w2`` or ``w2a, w2b``              alpha / r (1 if full)
=========  ==========================================================  ===================

``alpha`` is the per-layer value the formats store; ``rslora`` (whole adapter) swaps ``r`` for
``sqrt(r)``. ``AdapterWeights`` is a whole adapter: ``modules`` by layer name, plus the format
it was read from and the base model's fingerprint when the file records it.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from fastgen.adapters.layers import LoHa, LoKr, LoRA, layer_shape

TENSORS = {
    "lora": ("down", "up"),
    "dora": ("down", "up", "magnitude"),
    "loha": ("w1a", "w1b", "w2a", "w2b"),
    "lokr": ("w1", "w1a", "w1b", "w2", "w2a", "w2b"),
}


@dataclasses.dataclass
class ModuleWeights:
    kind: str
    tensors: dict[str, torch.Tensor]
    alpha: float | None = None

    @property
    def rank(self) -> int:
        t = self.tensors
        if self.kind in ("lora", "dora"):
            return t["down"].shape[0]
        if self.kind == "loha":
            return t["w1a"].shape[1]
        return t["w2a"].shape[1] if "w2a" in t else t["w1a"].shape[1] if "w1a" in t else 1


@dataclasses.dataclass
class AdapterWeights:
    modules: dict[str, ModuleWeights]
    format: str = "fastgen"
    rslora: bool = False
    base: str | None = None  # fingerprint of the base model, when the file records it
    base_class: str | None = None
    metadata: dict = dataclasses.field(default_factory=dict)
    # "dotted": modules keyed by the model's layer names; "flat": kohya's names ('.' -> '_'),
    # resolved against a model by fastgen.adapters.formats.kohya.resolve
    names: str = "dotted"
    # adapters for other pipeline components in the same file ("text_encoder", ...), by component
    extra: dict = dataclasses.field(default_factory=dict)
    # the file's own key for each layer (for error messages)
    keys: dict = dataclasses.field(default_factory=dict)
    # the state dict it was read from (for conversions that need the raw file, formats/via_diffusers.py)
    source: dict | None = dataclasses.field(default=None, repr=False)

    @property
    def kinds(self) -> set[str]:
        return {m.kind for m in self.modules.values()}

    def __repr__(self) -> str:
        ranks = sorted({m.rank for m in self.modules.values()})
        return (
            f"AdapterWeights(format={self.format!r}, {len(self.modules)} layers, kinds={sorted(self.kinds)}, "
            f"ranks={ranks}, rslora={self.rslora}, base={self.base_class or 'unrecorded'})"
        )


def branch_to_weights(branch: nn.Module) -> ModuleWeights:
    kind = branch.kind_name
    tensors = {k: p.detach() for k, p in branch.named_parameters() if k in TENSORS[kind]}
    if kind == "lokr" and not branch.factored_w1 and not branch.factored_w2:
        return ModuleWeights(kind, tensors, None)
    return ModuleWeights(kind, tensors, branch.alpha)


def weights_to_branch(w: ModuleWeights, layer: nn.Module, name: str, rslora: bool = False) -> nn.Module:
    """A branch for ``layer`` holding ``w``'s tensors; shape errors name the layer."""
    out_f, in_f, kernel = layer_shape(layer)
    shape = (out_f, in_f, *kernel) if isinstance(layer, nn.Conv2d) else (out_f, in_f)
    t = {k: v.detach().float() for k, v in w.tensors.items()}
    alpha = float(w.alpha) if w.alpha is not None else float(w.rank)
    if w.kind in ("lora", "dora"):
        r = t["down"].shape[0]
        down = t["down"].reshape(r, in_f, *kernel) if len(shape) == 4 and t["down"].dim() == 2 else t["down"]
        up = t["up"].reshape(out_f, r, 1, 1) if len(shape) == 4 and t["up"].dim() == 2 else t["up"]
        if tuple(down.shape) != (r, *shape[1:]) or up.reshape(up.shape[0], -1).shape != (out_f, r):
            raise ValueError(
                f"adapter for {name!r} has down {tuple(t['down'].shape)} / up {tuple(t['up'].shape)}, "
                f"which do not fit the layer's weight {shape}: is the file for another model?"
            )
        branch = LoRA(r, alpha, 0.0, shape, rslora=rslora, dora=w.kind == "dora")
        branch.down.data.copy_(down)
        branch.up.data.copy_(up.reshape(branch.up.shape))
        if w.kind == "dora":
            branch.magnitude.data.copy_(t["magnitude"].reshape(-1))
        return branch
    if w.kind == "loha":
        r = t["w1a"].shape[1]
        branch = LoHa(r, alpha, 0.0, shape)
        for k in TENSORS["loha"]:
            if tuple(t[k].shape) != tuple(getattr(branch, k).shape):
                raise ValueError(f"LoHa {k} of {name!r} is {tuple(t[k].shape)}, the layer needs {tuple(getattr(branch, k).shape)}")
            getattr(branch, k).data.copy_(t[k])
        return branch
    branch = LoKr.from_tensors(t, w.alpha, shape)
    try:
        got = tuple(branch.kron().shape)
    except RuntimeError as exc:
        raise ValueError(f"LoKr factors of {name!r} do not multiply: {exc}") from exc
    if got[:2] != shape[:2] or math.prod(got) != math.prod(shape):
        raise ValueError(f"LoKr factors of {name!r} give a {tuple(got)} update, the layer's weight is {shape}")
    return branch
