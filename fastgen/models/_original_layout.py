"""State-dict layouts of the MMDiT models (SD3, Flux) and their loading.

Three layouts of the same weights::

    original   the reference repositories' single files (Stability's ``joint_blocks.N.x_block.attn.qkv``,
               BFL's ``double_blocks.N.img_attn.qkv`` / ``single_blocks.N.linear1``), often under
               ``model.diffusion_model.``; QKV fused, final AdaLN as (shift, scale)
    diffusers  ``SD3Transformer2DModel`` / ``FluxTransformer2DModel``: separate q, k, v projections,
               final AdaLN as (scale, shift)
    fastgen    diffusers' names, with the projections one GEMM reads fused into one tensor
               (``attn.to_qkv``, ``attn.to_added_qkv``, Flux's single-block ``linear1``)

A layout table is a list of ``(original key, [diffusers keys], rows, swap)``: the original
tensor is the concatenation along dim 0 of the diffusers tensors (``rows`` each; one key
= a rename), and ``swap`` exchanges the two halves (shift, scale) <-> (scale, shift).
The same table converts both ways. ``from_pretrained`` reads any of the first two
layouts, builds the model on the meta device and materialises each tensor once, on the
target device in the target dtype. Missing, unexpected and mis-shaped keys are errors
that name them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor

PREFIX = "model.diffusion_model."
Table = list  # [(original_key, [diffusers_keys], rows or None, swap)]


# ----------------------------------------------------------------------------- layout tables


def _lin(orig: str, diff: str) -> Table:
    return [(f"{orig}.weight", [f"{diff}.weight"], None, False), (f"{orig}.bias", [f"{diff}.bias"], None, False)]


def _split(orig: str, diffs: list, rows: list) -> Table:
    return [(f"{orig}.{k}", [f"{d}.{k}" for d in diffs], rows, False) for k in ("weight", "bias")]


def _swap(orig: str, diff: str) -> Table:
    return [(f"{orig}.{k}", [f"{diff}.{k}"], None, True) for k in ("weight", "bias")]


def _one(orig: str, diff: str) -> Table:
    return [(orig, [diff], None, False)]


def sd3_table(cfg) -> Table:
    """Stability's MMDiT keys <-> diffusers ``SD3Transformer2DModel`` keys for ``cfg`` (an SD3Config)."""
    D, L = cfg.inner_dim, cfg.num_layers
    t = _one("pos_embed", "pos_embed.pos_embed") + _lin("x_embedder.proj", "pos_embed.proj")
    t += _lin("t_embedder.mlp.0", "time_text_embed.timestep_embedder.linear_1")
    t += _lin("t_embedder.mlp.2", "time_text_embed.timestep_embedder.linear_2")
    t += _lin("y_embedder.mlp.0", "time_text_embed.text_embedder.linear_1")
    t += _lin("y_embedder.mlp.2", "time_text_embed.text_embedder.linear_2")
    t += _lin("context_embedder", "context_embedder")
    for i in range(L):
        j, b = f"joint_blocks.{i}.", f"transformer_blocks.{i}."
        last = i == L - 1
        t += _split(j + "x_block.attn.qkv", [b + f"attn.to_{n}" for n in "qkv"], [D] * 3)
        t += _split(j + "context_block.attn.qkv", [b + f"attn.add_{n}_proj" for n in "qkv"], [D] * 3)
        t += _lin(j + "x_block.attn.proj", b + "attn.to_out.0")
        if cfg.qk_norm:
            t += _one(j + "x_block.attn.ln_q.weight", b + "attn.norm_q.weight")
            t += _one(j + "x_block.attn.ln_k.weight", b + "attn.norm_k.weight")
            t += _one(j + "context_block.attn.ln_q.weight", b + "attn.norm_added_q.weight")
            t += _one(j + "context_block.attn.ln_k.weight", b + "attn.norm_added_k.weight")
        if i in cfg.dual_attention_layers:
            t += _split(j + "x_block.attn2.qkv", [b + f"attn2.to_{n}" for n in "qkv"], [D] * 3)
            t += _lin(j + "x_block.attn2.proj", b + "attn2.to_out.0")
            if cfg.qk_norm:
                t += _one(j + "x_block.attn2.ln_q.weight", b + "attn2.norm_q.weight")
                t += _one(j + "x_block.attn2.ln_k.weight", b + "attn2.norm_k.weight")
        t += _lin(j + "x_block.adaLN_modulation.1", b + "norm1.linear")
        t += (_swap if last else _lin)(j + "context_block.adaLN_modulation.1", b + "norm1_context.linear")
        t += _lin(j + "x_block.mlp.fc1", b + "ff.net.0.proj") + _lin(j + "x_block.mlp.fc2", b + "ff.net.2")
        if not last:
            t += _lin(j + "context_block.attn.proj", b + "attn.to_add_out")
            t += _lin(j + "context_block.mlp.fc1", b + "ff_context.net.0.proj")
            t += _lin(j + "context_block.mlp.fc2", b + "ff_context.net.2")
    t += _lin("final_layer.linear", "proj_out") + _swap("final_layer.adaLN_modulation.1", "norm_out.linear")
    return t


def flux_table(cfg) -> Table:
    """BFL's Flux keys <-> diffusers ``FluxTransformer2DModel`` keys for ``cfg`` (a FluxConfig)."""
    D = cfg.inner_dim
    t = _lin("img_in", "x_embedder") + _lin("txt_in", "context_embedder")
    t += _lin("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1")
    t += _lin("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2")
    t += _lin("vector_in.in_layer", "time_text_embed.text_embedder.linear_1")
    t += _lin("vector_in.out_layer", "time_text_embed.text_embedder.linear_2")
    if cfg.guidance_embeds:
        t += _lin("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1")
        t += _lin("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2")
    for i in range(cfg.num_layers):
        o, b = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        t += _lin(o + "img_mod.lin", b + "norm1.linear") + _lin(o + "txt_mod.lin", b + "norm1_context.linear")
        t += _split(o + "img_attn.qkv", [b + f"attn.to_{n}" for n in "qkv"], [D] * 3)
        t += _split(o + "txt_attn.qkv", [b + f"attn.add_{n}_proj" for n in "qkv"], [D] * 3)
        t += _one(o + "img_attn.norm.query_norm.scale", b + "attn.norm_q.weight")
        t += _one(o + "img_attn.norm.key_norm.scale", b + "attn.norm_k.weight")
        t += _one(o + "txt_attn.norm.query_norm.scale", b + "attn.norm_added_q.weight")
        t += _one(o + "txt_attn.norm.key_norm.scale", b + "attn.norm_added_k.weight")
        t += _lin(o + "img_attn.proj", b + "attn.to_out.0") + _lin(o + "txt_attn.proj", b + "attn.to_add_out")
        t += _lin(o + "img_mlp.0", b + "ff.net.0.proj") + _lin(o + "img_mlp.2", b + "ff.net.2")
        t += _lin(o + "txt_mlp.0", b + "ff_context.net.0.proj") + _lin(o + "txt_mlp.2", b + "ff_context.net.2")
    for i in range(cfg.num_single_layers):
        o, b = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
        parts = [b + f"attn.to_{n}" for n in "qkv"] + [b + "proj_mlp"]
        t += _split(o + "linear1", parts, [D, D, D, cfg.mlp_hidden_dim])
        t += _lin(o + "linear2", b + "proj_out") + _lin(o + "modulation.lin", b + "norm.linear")
        t += _one(o + "norm.query_norm.scale", b + "attn.norm_q.weight")
        t += _one(o + "norm.key_norm.scale", b + "attn.norm_k.weight")
    t += _lin("final_layer.linear", "proj_out") + _swap("final_layer.adaLN_modulation.1", "norm_out.linear")
    return t


def _swap_halves(x: Tensor) -> Tensor:
    a, b = x.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def original_to_diffusers(sd: dict, table: Table) -> dict:
    """Original-layout state dict -> diffusers layout (every key consumed, or an error naming the rest)."""
    sd = {k[len(PREFIX):] if k.startswith(PREFIX) else k: v for k, v in sd.items()}
    out, missing = {}, []
    for okey, dkeys, rows, swap in table:
        if okey not in sd:
            missing.append(okey)
            continue
        x = sd.pop(okey)
        if swap:
            x = _swap_halves(x)
        if len(dkeys) == 1:
            out[dkeys[0]] = x
        else:
            for k, part in zip(dkeys, torch.split(x, rows, dim=0)):
                out[k] = part
    _raise_key_errors("original-layout checkpoint", missing, sorted(sd), [])
    return out


def diffusers_to_original(sd: dict, table: Table) -> dict:
    """Diffusers-layout state dict -> original layout (the inverse of ``original_to_diffusers``)."""
    sd = dict(sd)
    out, missing = {}, []
    for okey, dkeys, rows, swap in table:
        if any(k not in sd for k in dkeys):
            missing += [k for k in dkeys if k not in sd]
            continue
        x = torch.cat([sd.pop(k) for k in dkeys], dim=0) if len(dkeys) > 1 else sd.pop(dkeys[0])
        out[okey] = _swap_halves(x) if swap else x
    _raise_key_errors("diffusers-layout state dict", missing, sorted(sd), [])
    return out


# ----------------------------------------------------------------------------- diffusers <-> fastgen


def _raise_key_errors(what: str, missing: list, unexpected: list, shapes: list) -> None:
    if not (missing or unexpected or shapes):
        return
    lines = [f"{what} does not match the model:"]
    if missing:
        lines.append(f"  {len(missing)} missing keys, first: {missing[:8]}")
    if unexpected:
        lines.append(f"  {len(unexpected)} unexpected keys, first: {unexpected[:8]}")
    for k, want, got in shapes[:8]:
        lines.append(f"  {k}: the model has shape {tuple(want)}, the checkpoint {tuple(got)}")
    if shapes:
        lines.append(f"  ({len(shapes)} mismatched shapes; a checkpoint of another model or size?)")
    raise ValueError("\n".join(lines))


def fuse(sd: dict, expected: dict, fused_parts: dict, rename: Callable[[str], str],
         convert: Callable[[Tensor], Tensor] = lambda t: t) -> dict:
    """Diffusers-layout ``sd`` -> fastgen layout for a model whose state dict (shapes) is ``expected``.

    ``fused_parts``: fastgen key -> [(diffusers key, rows)], concatenated along dim 0; every other
    fastgen key is ``sd[rename(key)]``. ``convert`` is applied to each tensor before fusing (the
    device / dtype cast, so each is materialised once)."""
    out, used, missing, shapes = {}, set(), [], []
    for key, want in expected.items():
        srcs = [k for k, _ in fused_parts[key]] if key in fused_parts else [rename(key)]
        absent = [k for k in srcs if k not in sd]
        if absent:
            missing += absent
            continue
        used.update(srcs)
        parts = [convert(sd[k]) for k in srcs]
        x = torch.cat(parts, dim=0) if len(parts) > 1 else parts[0]
        if tuple(x.shape) != tuple(want.shape):
            shapes.append((srcs[0] if len(srcs) == 1 else f"{key} (from {srcs})", want.shape, x.shape))
            continue
        out[key] = x
    _raise_key_errors("diffusers-layout checkpoint", missing, sorted(set(sd) - used), shapes)
    return out


def split_fused(sd: dict, fused_parts: dict, rename: Callable[[str], str]) -> dict:
    """fastgen-layout ``sd`` -> diffusers layout (the inverse of ``fuse``)."""
    out = {}
    for key, x in sd.items():
        if key in fused_parts:
            names, rows = zip(*fused_parts[key])
            for k, part in zip(names, torch.split(x, list(rows), dim=0)):
                out[k] = part.clone()
        else:
            out[rename(key)] = x
    return out


def load_fused(cls, cfg, sd: dict, backend: str = "auto", device=None, dtype: Optional[torch.dtype] = None):
    """A ``cls(cfg)`` built on the meta device and given the diffusers-layout ``sd`` (materialised
    on ``device`` in ``dtype``: floating tensors only are cast)."""
    with torch.device("meta"):
        model = cls(cfg, backend=backend)

    def convert(t: Tensor) -> Tensor:
        t = t.detach()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        return t.to(device) if device is not None else t

    fused = fuse(sd, model.state_dict(), cls.fused_parts(cfg), cls.rename, convert)
    model.load_state_dict(fused, strict=True, assign=True)
    return model


# ----------------------------------------------------------------------------- files


def _files(path: Path, subfolder: Optional[str]) -> tuple[list, Optional[Path]]:
    """(safetensors files, config.json or None) of a file, model folder or pipeline folder."""
    if subfolder:
        path = path / subfolder
    if path.is_file():
        cfg = path.parent / "config.json"
        return [path], None if not cfg.is_file() else cfg
    if not path.is_dir():
        raise FileNotFoundError(f"from_pretrained: {path} is neither a file nor a folder")
    if not (path / "config.json").is_file() and (path / "transformer").is_dir():
        path = path / "transformer"
    cfg = path / "config.json" if (path / "config.json").is_file() else None
    index = path / "diffusion_pytorch_model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / s for s in shards], cfg
    single = path / "diffusion_pytorch_model.safetensors"
    if single.is_file():
        return [single], cfg
    found = sorted(path.glob("*.safetensors"))
    if len(found) != 1:
        raise FileNotFoundError(f"from_pretrained: expected diffusion_pytorch_model.safetensors (or its sharded index) "
                                f"or one .safetensors file in {path}, found {[f.name for f in found]}")
    return found, cfg


def read_safetensors(files: list, device) -> dict:
    """All tensors of the files, read straight onto ``device`` (CPU when None)."""
    from safetensors import safe_open

    sd = {}
    dev = str(torch.device(device)) if device is not None else "cpu"
    for f in files:
        with safe_open(str(f), framework="pt", device=dev) as fh:
            for k in fh.keys():
                sd[k] = fh.get_tensor(k)
    return sd


def from_pretrained(cls, path, torch_dtype=None, device=None, config=None, backend="auto", subfolder=None,
                    original_table=None, infer_config=None, original_marker: str = "", diffusers_marker: str = ""):
    """Shared body of ``SD3.from_pretrained`` / ``Flux.from_pretrained`` (see there)."""
    files, cfg_file = _files(Path(os.fspath(path)), subfolder)
    sd = read_safetensors(files, "cpu" if device is None or torch.device(device).type == "meta" else device)
    keys = [k[len(PREFIX):] if k.startswith(PREFIX) else k for k in sd]
    name = cls.__name__
    if any(k.startswith(original_marker) for k in keys):
        layout = "original"
    elif any(k.startswith(diffusers_marker) for k in keys):
        layout = "diffusers"
    else:
        raise ValueError(f"{name}.from_pretrained: {files[0]} is not a {name} checkpoint: no key starts with "
                         f"{original_marker!r} (original layout) or {diffusers_marker!r} (diffusers layout); "
                         f"first keys: {sorted(sd)[:6]}")
    if config is None and cfg_file is not None and layout == "diffusers":
        config = json.loads(cfg_file.read_text())
    if isinstance(config, dict):
        config = cls.config_class.from_dict(config)
    elif isinstance(config, str):
        config = cls.config_class.preset(config)
    elif config is None:
        config = infer_config(sd, layout)
    if layout == "original":
        sd = original_to_diffusers(sd, original_table(config))
    return load_fused(cls, config, sd, backend=backend, device=device, dtype=torch_dtype)
