"""Which layers of a model get an adapter: module-name patterns and presets.

A pattern is matched against each module's qualified name (``down_blocks.0.attentions.0.
transformer_blocks.0.attn1.to_q``):

- with glob characters (``*?[``): ``fnmatch`` on the whole name (``"*attn1.to_[qkv]"``);
- ``"re:<regex>"``: ``re.fullmatch`` on the whole name;
- otherwise a suffix at a dot boundary, as PEFT's ``target_modules`` (``"to_q"`` matches
  ``...attn1.to_q``, ``"attn1.to_q"`` too, ``"o_q"`` does not).

Presets (``"attention"``, ``"attention+ff"``, ``"all"``) are pattern lists that cover diffusers'
UNets and DiT/MMDiT transformers, fastgen.models and common torch naming; ``"all"`` is every
Linear and Conv2d. Only Linear-like layers (``nn.Linear``, fastgen's quantized linear) and
``nn.Conv2d`` (groups = 1) are ever targets.
"""

from __future__ import annotations

import fnmatch
import re
from typing import Iterable

from torch import nn

ATTENTION = [
    "to_q", "to_k", "to_v", "to_out.0", "to_qkv", "to_kv",
    "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
    "q_proj", "k_proj", "v_proj", "out_proj", "qkv", "attn.proj", "attn.qkv", "attn.out",
]
FEED_FORWARD = [
    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
    "proj_mlp", "single_transformer_blocks.*.proj_out", "mlp.fc1", "mlp.fc2", "mlp.0", "mlp.2", "fc1", "fc2",
    "ff.proj_in", "ff.proj_out", "ff.linear_in", "ff.linear_out", "ff.fc1", "ff.fc2", "mlp.proj_in", "mlp.proj_out",
]
PRESETS = {
    "attention": ATTENTION,
    "attention+ff": ATTENTION + FEED_FORWARD,
    "all": ["*"],
}


def adaptable(module: nn.Module) -> bool:
    """True for the layer types adapters attach to."""
    if isinstance(module, nn.Conv2d):
        return module.groups == 1
    return isinstance(module, nn.Linear) or getattr(module, "fastgen_quantized", False)


def _matches(pattern: str, name: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    if any(c in pattern for c in "*?["):
        return fnmatch.fnmatchcase(name, pattern)
    return name == pattern or name.endswith("." + pattern)


def expand(targets: str | Iterable[str]) -> list[str]:
    """A preset name, one pattern or a list of patterns/presets -> a flat pattern list."""
    items = [targets] if isinstance(targets, str) else list(targets)
    out: list[str] = []
    for item in items:
        out.extend(PRESETS.get(item, [item]))
    return out


def select(model: nn.Module, targets: str | Iterable[str], exclude: Iterable[str] = ()) -> list[str]:
    """Names of the adaptable modules of ``model`` matched by ``targets`` (minus ``exclude``).

    Raises ValueError when a pattern (other than inside a preset) matches no adaptable module,
    or when nothing at all is matched."""
    names = [n for n, m in model.named_modules() if n and adaptable(m)]
    patterns = expand(targets)
    explicit = [t for t in ([targets] if isinstance(targets, str) else list(targets)) if t not in PRESETS]
    for p in explicit:
        if not any(_matches(p, n) for n in names):
            sample = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
            raise ValueError(
                f"adapter target pattern {p!r} matches no Linear or Conv2d module of {type(model).__name__} "
                f"(its layers: {sample or 'none'})"
            )
    chosen = [n for n in names if any(_matches(p, n) for p in patterns)]
    chosen = [n for n in chosen if not any(_matches(p, n) for p in exclude)]
    if not chosen:
        raise ValueError(f"adapter targets {targets!r} select no Linear or Conv2d module of {type(model).__name__}")
    return chosen
