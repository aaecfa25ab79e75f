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

import os
from typing import Callable

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


def _raise_key_errors(what: str, missing: list, unexpected: list) -> None:
    if not (missing or unexpected):
        return
    from fastgen.models._common import CheckpointMismatchError

    lines = [f"{what} does not match the model (a checkpoint of another model or size?):"]
    if missing:
        lines.append(f"{len(missing)} missing key(s), first: {missing[:5]}")
    if unexpected:
        lines.append(f"{len(unexpected)} unexpected key(s), first: {unexpected[:5]}")
    raise CheckpointMismatchError(" ".join(lines))


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
    _raise_key_errors("original-layout checkpoint", missing, sorted(sd))
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
    _raise_key_errors("diffusers-layout state dict", missing, sorted(sd))
    return out


# ----------------------------------------------------------------------------- diffusers <-> fastgen


def fuse_blocks(sd: dict, fused: tuple, unrename: Callable[[str], str]) -> dict:
    """Diffusers-layout ``sd`` -> fastgen layout. ``fused``: ``(scope, name, parts)`` triples; under every
    key prefix ``<scope><i>.`` the tensors ``<part>.weight`` / ``.bias`` of all parts, concatenated on
    dim 0, become ``<name>.weight`` / ``.bias``. Every other key is renamed by ``unrename``. Incomplete
    groups are left unfused (the model's key check then names them)."""
    out, used = {}, set()
    for scope, name, parts in fused:
        for key in sd:
            for kind in ("weight", "bias"):
                tail = f".{parts[0]}.{kind}"
                if not (key.startswith(scope) and key.endswith(tail)):
                    continue
                pre = key[: -len(tail)] + "."
                if pre.count(".") != scope.count(".") + 1:  # <scope><i>. exactly
                    continue
                srcs = [f"{pre}{p}.{kind}" for p in parts]
                if all(k in sd for k in srcs):
                    out[f"{pre}{name}.{kind}"] = torch.cat([sd[k] for k in srcs], dim=0)
                    used.update(srcs)
    for key, t in sd.items():
        if key not in used:
            out[unrename(key)] = t
    return out


def split_blocks(sd: dict, fused: tuple, rename: Callable[[str], str], rows: dict) -> dict:
    """fastgen-layout ``sd`` -> diffusers layout (the inverse of ``fuse_blocks``; ``rows``: the size of each
    part along dim 0, by fused name)."""
    out = {}
    for key, x in sd.items():
        for scope, name, parts in fused:
            for kind in ("weight", "bias"):
                tail = f".{name}.{kind}"
                if key.startswith(scope) and key.endswith(tail):
                    pre = key[: -len(tail)] + "."
                    for p, part in zip(parts, torch.split(x, rows[name], dim=0)):
                        out[f"{pre}{p}.{kind}"] = part.clone()
                    break
            else:
                continue
            break
        else:
            out[rename(key)] = x
    return out


# ----------------------------------------------------------------------------- loading


def _strip(k: str) -> str:
    return k[len(PREFIX):] if k.startswith(PREFIX) else k


def from_pretrained(cls, path, torch_dtype=None, device="cpu", backend="auto", config=None, subfolder=None):
    """The body of ``SD3.from_pretrained`` / ``Flux.from_pretrained``: original layout here, diffusers
    layout through ``FastgenModel.from_pretrained``."""
    from fastgen.models._common import (
        CheckpointMismatchError,
        FastgenModel,
        _read_tensors,
        check_state_dict,
        load_safetensors_dir,
    )

    p = os.fspath(path)
    if subfolder is None and os.path.isdir(p) and not os.path.exists(os.path.join(p, "config.json")) \
            and os.path.isdir(os.path.join(p, "transformer")):
        subfolder = "transformer"  # a pipeline folder
    raw, where = load_safetensors_dir(p, subfolder)
    if any(k.startswith(PREFIX) for k in where):  # a full single-file checkpoint: keep the denoiser only
        where = {k: v for k, v in where.items() if k.startswith(PREFIX)}  # (not its VAE / text encoders)
    keys = [_strip(k) for k in where]
    name = cls.__name__
    if any(k.startswith("transformer_blocks.") for k in keys) and not any(
            k.startswith(cls.ORIGINAL_MARKER) for k in keys):
        return FastgenModel.from_pretrained.__func__(cls, p, torch_dtype, device, backend, config, subfolder)
    if not any(k.startswith(cls.ORIGINAL_MARKER) for k in keys):
        raise CheckpointMismatchError(
            f"{name}.from_pretrained: {p} is not a {name} checkpoint: no key starts with "
            f"{cls.ORIGINAL_MARKER!r} (original layout) or 'transformer_blocks.' (diffusers layout); "
            f"first keys: {sorted(where)[:5]}")
    shapes = {_strip(k): s for k, (_, s) in where.items()}
    config = cls.infer_config(shapes) if config is None else cls._resolve_config(config)
    model = cls._skeleton(config, backend)
    table = cls.original_table(config)
    expected = {k: tuple(v.shape) for k, v in diffusers_to_original(model.to_diffusers_state_dict(), table).items()}
    check_state_dict(expected, shapes, f"{name}.from_pretrained (original layout)")
    sd = {_strip(k): v for k, v in _read_tensors(where, device, torch_dtype).items()}
    model._assign(cls.state_dict_from_diffusers(original_to_diffusers(sd, table)))
    return model.eval()
