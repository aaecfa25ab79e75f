"""Adapter files: detect the format, read it into :class:`AdapterWeights`, write any format.

=============  ======================================================  ============================
format         keys                                                    written by
=============  ======================================================  ============================
``peft``       ``[unet.|transformer.]<layer>.lora_A.weight`` ...       peft, diffusers, SimpleTuner,
(``diffusers``) alpha in ``lora_adapter_metadata``                      ai-toolkit, OneTrainer (opt.)
``kohya``      ``lora_unet_<layer_flat>.lora_down.weight``, ``alpha``  kohya sd-scripts, A1111,
               ``hada_*``, ``lokr_*``, ``dora_scale``                   LyCORIS, OneTrainer, Civitai
``comfyui``    ``diffusion_model.<layer>.lora_A.weight``, ``alpha``     ComfyUI's own savers
=============  ======================================================  ============================

All files are safetensors (imported when a file is read or written, so ``import fastgen`` does
not need it; ``to_state_dict`` / ``from_state_dict`` work in memory without it). A key that no rule maps raises :class:`UnmappableKeyError` naming it.
"""

from __future__ import annotations

import os

import torch

from fastgen.adapters.formats import comfyui, kohya, peft
from fastgen.adapters.formats.common import UnmappableKeyError, fastgen_metadata, read_fastgen_metadata
from fastgen.adapters.state import AdapterWeights

FORMATS = ("peft", "diffusers", "kohya", "comfyui")

__all__ = ["FORMATS", "UnmappableKeyError", "detect", "read_file", "from_state_dict", "to_state_dict", "write_file"]


def detect(keys) -> str:
    """The format of a state dict's keys: "kohya", "comfyui" or "peft"."""
    keys = list(keys)
    if kohya.matches(keys):
        return "kohya"
    if comfyui.matches(keys):
        return "comfyui"
    if peft.matches(keys):
        return "peft"
    raise UnmappableKeyError(
        f"not an adapter file fastgen knows (PEFT/diffusers, kohya/LyCORIS, ComfyUI); first keys: {keys[:5]}"
    )


def from_state_dict(sd: dict[str, torch.Tensor], metadata: dict | None = None) -> AdapterWeights:
    fmt = detect(sd)
    reader = {"kohya": kohya.read, "comfyui": comfyui.read, "peft": peft.read}[fmt]
    w = reader(sd, metadata or {})
    read_fastgen_metadata(metadata or {}, w)
    w.metadata = dict(metadata or {})
    w.source = sd
    return w


def read_file(path: str | os.PathLike) -> AdapterWeights:
    """Read a safetensors adapter file; ``.format`` says which format it was."""
    from safetensors import safe_open  # imported here: fastgen imports without safetensors

    with safe_open(os.fspath(path), framework="pt") as f:
        meta = f.metadata() or {}
        sd = {k: f.get_tensor(k) for k in f.keys()}
    return from_state_dict(sd, meta)


def to_state_dict(w: AdapterWeights, format: str = "peft", prefix: str | None = None):
    """(state dict, safetensors metadata) of ``w`` in ``format``."""
    if w.names == "flat":
        raise ValueError("resolve kohya layer names against the model first (fastgen.adapters.formats.kohya.resolve)")
    if format in ("peft", "diffusers"):
        sd, meta = peft.write(w, prefix)
    elif format == "kohya":
        sd, meta = kohya.write(w, prefix or "lora_unet")
    elif format == "comfyui":
        sd, meta = comfyui.write(w)
    else:
        raise ValueError(f"unknown adapter format {format!r}; expected one of {FORMATS}")
    meta = {"format": "pt", **meta, **fastgen_metadata(w, w.rslora and format in ("peft", "diffusers"))}
    return sd, meta


def write_file(w: AdapterWeights, path: str | os.PathLike, format: str = "peft", prefix: str | None = None,
               dtype: torch.dtype | None = None) -> None:
    from safetensors.torch import save_file

    sd, meta = to_state_dict(w, format, prefix)
    if dtype is not None:
        sd = {k: v.to(dtype) if v.is_floating_point() and v.dim() else v for k, v in sd.items()}
    save_file({k: v.contiguous() for k, v in sd.items()}, os.fspath(path), metadata=meta)
