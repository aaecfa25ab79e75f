"""Files in a model's *original* layout, converted by diffusers' own loaders.

kohya-style files for Flux name BFL's layers (``lora_unet_double_blocks_0_img_attn_qkv``: one
fused q/k/v LoRA whose ``up`` stacks the three outputs), SDXL files name SGM's blocks
(``lora_unet_input_blocks_4_1_...``). Those names do not exist in a diffusers model, so
:func:`fastgen.adapters.formats.kohya.resolve` cannot map them. When diffusers is installed,
this module hands such a state dict to the ``lora_state_dict`` of the pipeline class that
diffusers uses for the model (``FluxPipeline`` for ``FluxTransformer2DModel``, ...), which splits
fused projections into ``to_q`` / ``to_k`` / ``to_v`` LoRAs (with alpha folded in, or returned
as network alphas), and reads the result as a PEFT-layout file.
"""

from __future__ import annotations

import torch
from torch import nn

from fastgen.adapters.formats import peft
from fastgen.adapters.state import AdapterWeights

PIPELINES = {
    "FluxTransformer2DModel": ("FluxPipeline", {"return_alphas": True}),
    "SD3Transformer2DModel": ("StableDiffusion3Pipeline", {}),
    "UNet2DConditionModel": ("StableDiffusionXLPipeline", {}),
}


def convert(sd: dict[str, torch.Tensor], model: nn.Module) -> AdapterWeights | None:
    """The adapter for ``model`` as diffusers converts ``sd``, or None when diffusers is absent,
    has no converter for this model class, or rejects the file."""
    entry = PIPELINES.get(type(model).__name__)
    if entry is None:
        return None
    try:
        import diffusers
        from diffusers.utils import convert_unet_state_dict_to_peft
    except ImportError:
        return None
    cls = getattr(diffusers, entry[0])
    try:
        out = cls.lora_state_dict({k: v.clone() for k, v in sd.items()}, **entry[1])
    except (AssertionError, KeyError, ValueError, RuntimeError):
        return None
    conv, alphas = (out[0], out[1]) if isinstance(out, tuple) else (out, None)
    conv = dict(conv)
    if any(".lora.down." in k or ".lora.up." in k for k in conv):
        conv = convert_unet_state_dict_to_peft(conv)
    for k, a in (alphas or {}).items():
        conv[k if k.endswith(".alpha") else f"{k}.alpha"] = torch.tensor(float(a))
    w = peft.read(conv, {})
    w.format = "kohya"
    w.metadata = {"converted_by": f"diffusers {cls.__name__}.lora_state_dict"}
    return w
