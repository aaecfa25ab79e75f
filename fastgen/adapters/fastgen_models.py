"""Adapters on fastgen.models (Flux, SD3, PixArt, DiT, CogVideoX, UNet).

Those models run their projections inside fused ops that read a layer's weight directly
(``norm_linear(x, ..., attn.to_qkv)``), so a forward hook on the layer would never fire: an
adapter attached that way would load without error and do nothing. fastgen therefore refuses
hooks on them and folds adapters into the weights instead (:func:`merge_weights`).

Adapter files name diffusers' layers (``attn.to_q``, ``attn.to_k``, ``attn.to_v``); fastgen models
fuse some of them (``attn.to_qkv``, Flux's ``linear1``). The merge goes through the model's own
interchange: ``to_diffusers_state_dict()`` gives the weights under diffusers' names, each adapted
layer gets ``W <- W + s dW`` (DoRA: ``m (W + s dW) / ||W + s dW||``), and
``state_dict_from_diffusers`` fuses them back — so a LoRA on ``to_q`` lands on exactly the rows of
``to_qkv`` that ``to_q`` occupies, the same effect as separate LoRAs on the separate projections.
"""

from __future__ import annotations

import torch
from torch import nn

from fastgen.adapters.formats.common import UnmappableKeyError
from fastgen.adapters.layers import row_norm
from fastgen.adapters.state import AdapterWeights, weights_to_branch


def is_fastgen_model(model: nn.Module) -> bool:
    return type(model).__module__.startswith("fastgen.models") and hasattr(model, "to_diffusers_state_dict")


HOOK_ERROR = (
    "{cls} is a fastgen model: its projections run inside fused kernels that read the weights directly, "
    "so an adapter hook would have no effect. Fold the adapter into the weights with "
    "fastgen.adapters.apply(model, path, merge=True), or put adapters on the diffusers model."
)


def _stand_in(weight: torch.Tensor) -> nn.Module:
    """A weightless layer of the weight's shape (for the branch constructors)."""
    if weight.dim() == 4:
        return nn.Conv2d(weight.shape[1], weight.shape[0], tuple(weight.shape[2:]), device="meta")
    return nn.Linear(weight.shape[1], weight.shape[0], device="meta")


@torch.no_grad()
def merge_weights(model: nn.Module, w: AdapterWeights, scale: float = 1.0) -> list[str]:
    """Fold adapter ``w`` (diffusers layer names) into a fastgen model's weights; returns the layers.
    Layers of ``w`` that the model does not have are an error naming them."""
    sd = model.to_diffusers_state_dict()
    missing = sorted(n for n in w.modules if f"{n}.weight" not in sd)
    if missing:
        more = f" (and {len(missing) - 10} more)" if len(missing) > 10 else ""
        raise UnmappableKeyError(
            f"{len(missing)} of the adapter's {len(w.modules)} layers are not layers of {type(model).__name__} "
            f"(diffusers names): {', '.join(w.keys.get(n, n) for n in missing[:10])}{more}"
        )
    for name, m in w.modules.items():
        key = f"{name}.weight"
        W = sd[key]
        branch = weights_to_branch(m, _stand_in(W), name, rslora=w.rslora)
        s = branch.scale * scale
        new = W.float() + s * branch.delta_weight().float()
        if getattr(branch, "magnitude", None) is not None:
            new = new * (branch.magnitude.float() / row_norm(new)).view(-1, *([1] * (W.dim() - 1)))
        sd[key] = new.to(W.dtype)
    model.load_state_dict(type(model).state_dict_from_diffusers(sd), strict=True)
    return sorted(w.modules)


def diffusers_layer_names(model: nn.Module) -> list[str]:
    """The model's weight-bearing layers under diffusers' names (for resolving kohya names)."""
    return [k[: -len(".weight")] for k, v in model.to_diffusers_state_dict().items() if k.endswith(".weight") and v.dim() in (2, 4)]
