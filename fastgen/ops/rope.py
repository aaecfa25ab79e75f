"""Rotary position embeddings: ``apply_rope`` (q and k in one pass), the cos/sin tables
(``rope_frequencies``, 1-D and multi-axis as in Flux / CogVideoX) and grid ids.

The cos / sin convention is diffusers' ``apply_rotary_emb(x, (cos, sin), use_real=True)``:
a table of ``R`` entries per position, entry ``i`` holding the cosine / sine of the angle
of the pair that contains dim ``i``. With ``rot(x)`` the pair-swapped, negated x::

    interleaved=True  (use_real_unbind_dim=-1; Flux, CogVideoX, HunyuanDiT, GPT-J):
        pairs (x[2j], x[2j+1]);       rot(x) = (-x[1], x[0], -x[3], x[2], ...)
    interleaved=False (use_real_unbind_dim=-2; Stable Audio, CogView4, GPT-NeoX, Llama):
        pairs (x[j], x[j + R/2]);     rot(x) = (-x[R/2:R], x[:R/2])

    out[..., :R] = x[..., :R] * cos + rot(x[..., :R]) * sin     (fp32, rounded once)
    out[..., R:] = x[..., R:]                                    (partial rotary)

Implementations (``backend=``): ``"triton"`` (``fastgen/kernels/rope.py``), ``"cuda"``
(``csrc/rope/``), ``"torch"`` (``apply_rope_ref`` below). ``cos`` and ``sin`` are
constants to autograd: no gradient flows to them on the kernel backends.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from fastgen.backend import launcher, resolve
from fastgen.limits import MAX_HEAD_DIM, rope_reason  # noqa: F401
from fastgen.ops._shapes import new_like, rope_call_is_empty

LAYOUTS = ("bshd", "bhsd")


# ----------------------------------------------------------------------------- reference


def _broadcast_table(t: Tensor, layout: str) -> Tensor:
    """(S, R) or (B, S, R) -> broadcastable against (B, S, H, R) / (B, H, S, R)."""
    if t.dim() == 2:
        t = t[None]
    return t[:, :, None, :] if layout == "bshd" else t[:, None, :, :]


def rope_rotate_float(x: Tensor, cos: Tensor, sin: Tensor, layout: str = "bshd", interleaved: bool = False) -> Tensor:
    """The rotation in fp32 without rounding: ``x (B, S|H, H|S, D)`` any float dtype -> fp32."""
    R = cos.shape[-1]
    xr = x[..., :R].float()
    if interleaved:
        a, b = xr.reshape(*xr.shape[:-1], R // 2, 2).unbind(-1)
        rot = torch.stack([-b, a], dim=-1).flatten(-2)
    else:
        a, b = xr.reshape(*xr.shape[:-1], 2, R // 2).unbind(-2)
        rot = torch.cat([-b, a], dim=-1)
    out = xr * _broadcast_table(cos, layout) + rot * _broadcast_table(sin, layout)
    if R == x.shape[-1]:
        return out
    return torch.cat([out, x[..., R:].float()], dim=-1)


def apply_rope_ref(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, layout: str = "bshd",
                   interleaved: bool = False, inplace: bool = False) -> tuple[Tensor, Tensor]:
    """Plain-torch RoPE of q and k: the truth for tests and the ``backend="torch"`` path.

    Exactly diffusers' ``(x.float() * cos + x_rotated.float() * sin).to(x.dtype)`` on the
    first R dims; the remaining dims are returned unchanged.
    """
    outs = []
    for x in (q, k):
        y = rope_rotate_float(x, cos, sin, layout, interleaved).to(x.dtype)
        if inplace:
            x.copy_(y)
            y = x
        outs.append(y)
    return outs[0], outs[1]


# ----------------------------------------------------------------------------- tables and ids


def rope_frequencies(positions: Tensor, axes_dim: Union[int, Sequence[int]], theta: float = 10000.0,
                     interleaved: bool = False) -> tuple[Tensor, Tensor]:
    """cos / sin tables ``(S, sum(axes_dim))`` fp32 for ``apply_rope`` and ``qk_norm_rope``.

    ::

        positions  (S,) or (S, n_axes)   integer or fractional ids (one column per axis)
        axes_dim   int or n_axes ints    rotary dims of each axis (even); axis i rotates
                                         its own slice of the head

    Axis ``i`` with ``d = axes_dim[i]`` has the frequencies ``theta ** (-2m / d)`` for
    ``m < d/2`` and the angles ``pos[:, i] * freq``, computed in float64 from float32
    positions and cast to float32 — the same numbers as diffusers' ``FluxPosEmbed`` /
    ``get_1d_rotary_pos_embed(..., use_real=True)``.

    Layout of the ``R = sum(axes_dim)`` columns, matching ``apply_rope(interleaved=...)``:

    - ``interleaved=True``: per axis, each angle repeated twice (``repeat_interleave``),
      axes concatenated: exactly ``FluxPosEmbed(theta, axes_dim)(positions)`` (Flux:
      ``axes_dim=(16, 56, 56)`` over (text index, h, w) ids) and
      ``get_3d_rotary_pos_embed`` (CogVideoX: (t, h, w) with ``D/4, 3D/8, 3D/8``).
    - ``interleaved=False`` (default, like ``apply_rope``): the half-split layout
      ``[angles of all axes, angles of all axes]``, so pair ``(j, j + R/2)`` shares an
      angle; for one axis this is ``get_1d_rotary_pos_embed(repeat_interleave_real=False)``.
    """
    if not isinstance(positions, Tensor):
        raise TypeError(f"rope_frequencies: positions must be a torch.Tensor, got {type(positions).__name__}")
    pos = positions[:, None] if positions.dim() == 1 else positions
    if pos.dim() != 2:
        raise ValueError(f"rope_frequencies: positions must have shape (S,) or (S, n_axes), got {tuple(positions.shape)}")
    dims = [axes_dim] if isinstance(axes_dim, int) else list(axes_dim)
    if len(dims) != pos.shape[1]:
        raise ValueError(
            f"rope_frequencies: {len(dims)} axes_dim entries {tuple(dims)} for positions with {pos.shape[1]} axes "
            f"(shape {tuple(positions.shape)})"
        )
    if any((not isinstance(d, int)) or d <= 0 or d % 2 for d in dims):
        raise ValueError(f"rope_frequencies: every axes_dim entry must be a positive even int, got {tuple(dims)}")
    f64 = torch.float32 if pos.device.type in ("mps", "npu") else torch.float64  # as diffusers does
    pos = pos.float()
    angles = []
    for i, d in enumerate(dims):
        freqs = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=f64, device=pos.device) / d))
        angles.append(torch.outer(pos[:, i], freqs))  # (S, d/2), float64
    if interleaved:
        cos = torch.cat([a.cos().repeat_interleave(2, dim=1).float() for a in angles], dim=-1)
        sin = torch.cat([a.sin().repeat_interleave(2, dim=1).float() for a in angles], dim=-1)
    else:
        ang = torch.cat(angles, dim=-1)
        cos = torch.cat([ang.cos(), ang.cos()], dim=-1).float()
        sin = torch.cat([ang.sin(), ang.sin()], dim=-1).float()
    return cos, sin


def rope_grid_ids(*sizes: int, prefix_axes: int = 0, dtype: torch.dtype = torch.float32,
                  device: Optional[Union[str, torch.device]] = None) -> Tensor:
    """Integer ids of a row-major grid, ``(prod(sizes), prefix_axes + len(sizes))``.

    ``rope_grid_ids(frames, height, width)`` gives the (t, h, w) ids of a video latent
    (CogVideoX, HunyuanVideo); ``rope_grid_ids(height, width)`` the (h, w) ids of an
    image; ``rope_grid_ids(h, w, prefix_axes=1)`` Flux's image ids ``(0, h, w)`` (the
    leading axes are zero; text tokens use all-zero ids).
    """
    if not sizes or any((not isinstance(n, int)) or n < 0 for n in sizes):
        raise ValueError(f"rope_grid_ids: sizes must be one or more ints >= 0, got {sizes}")
    if prefix_axes < 0:
        raise ValueError(f"rope_grid_ids: prefix_axes must be >= 0, got {prefix_axes}")
    grids = torch.meshgrid(*[torch.arange(n, device=device) for n in sizes], indexing="ij")
    ids = torch.stack([g.reshape(-1) for g in grids], dim=-1)
    if prefix_axes:
        ids = torch.cat([ids.new_zeros(ids.shape[0], prefix_axes), ids], dim=-1)
    return ids.to(dtype)


# ----------------------------------------------------------------------------- validation


def _heads_seq(x: Tensor, layout: str) -> tuple[int, int]:
    return (x.shape[2], x.shape[1]) if layout == "bshd" else (x.shape[1], x.shape[2])


def validate_qk(op: str, q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, layout: str) -> None:
    """Shared input checks of apply_rope and qk_norm_rope (messages asserted in the tests)."""
    for name, t in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{op}: {name} must be a floating-point tensor, got dtype {t.dtype}")
    if layout not in LAYOUTS:
        raise ValueError(f"{op}: layout must be 'bshd' (B, S, H, D) or 'bhsd' (B, H, S, D), got {layout!r}")
    dims = "(B, S, H, D)" if layout == "bshd" else "(B, H, S, D)"
    for name, t in (("q", q), ("k", k)):
        if t.dim() != 4:
            raise ValueError(f"{op}: {name} must be 4-D {dims} for layout={layout!r}, got shape {tuple(t.shape)}")
    if k.dtype != q.dtype:
        raise TypeError(f"{op}: q and k must have the same dtype, got {q.dtype} and {k.dtype}")
    for name, t in (("k", k), ("cos", cos), ("sin", sin)):
        if t.device != q.device:
            raise ValueError(f"{op}: {name} is on {t.device} but q is on {q.device}; put all on one device")
    (_, S), (_, Sk) = _heads_seq(q, layout), _heads_seq(k, layout)
    B, D = q.shape[0], q.shape[3]
    if k.shape[0] != B or Sk != S or k.shape[3] != D:
        raise ValueError(
            f"{op}: q {tuple(q.shape)} and k {tuple(k.shape)} must agree in batch, sequence and head dim "
            f"(layout={layout!r}); only the head counts may differ"
        )
    if cos.shape != sin.shape:
        raise ValueError(f"{op}: cos and sin must have the same shape, got {tuple(cos.shape)} and {tuple(sin.shape)}")
    if cos.dim() not in (2, 3):
        raise ValueError(f"{op}: cos/sin must have shape (S, R) or (B, S, R), got {tuple(cos.shape)}")
    if cos.shape[-2] != S:
        raise ValueError(f"{op}: cos/sin have {cos.shape[-2]} positions (shape {tuple(cos.shape)}) but q has S={S}")
    if cos.dim() == 3 and cos.shape[0] not in (1, B):
        raise ValueError(f"{op}: cos/sin batch {cos.shape[0]} (shape {tuple(cos.shape)}) must be 1 or q's B={B}")
    R = cos.shape[-1]
    if R % 2 or R == 0:
        raise ValueError(f"{op}: the rotary dim R = cos.shape[-1] = {R} must be even and > 0 (pairs of dims rotate)")
    if R > D:
        raise ValueError(f"{op}: the rotary dim R = cos.shape[-1] = {R} exceeds the head dim D = {D}")


unsupported_qk = rope_reason  # the name fastgen.patch reads


def unit_last(t: Tensor) -> Tensor:
    """t itself when its last dim is contiguous, else a contiguous copy (other strides are kept)."""
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


# ----------------------------------------------------------------------------- torch.library ops


@torch.library.custom_op("fastgen::apply_rope", mutates_args=())
def _apply_rope_op(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, layout: str, interleaved: bool, inverse: bool,
                   impl: str) -> tuple[Tensor, Tensor]:
    """Out-of-place rotation (inverse=True: by minus the angle, the backward); new contiguous outputs."""
    qo, ko = new_like(q), new_like(k)
    if not rope_call_is_empty(q, k, cos, layout):
        L = launcher("apply_rope", impl)
        if inverse:
            L.apply_rope_bwd(q, k, cos, sin, layout, interleaved, dq=qo, dk=ko)
        else:
            L.apply_rope_fwd(q, k, cos, sin, layout, interleaved, q_out=qo, k_out=ko)
    return qo, ko


@_apply_rope_op.register_fake
def _(q, k, cos, sin, layout, interleaved, inverse, impl):
    return new_like(q), new_like(k)


@torch.library.custom_op("fastgen::apply_rope_", mutates_args=("q", "k"))
def _apply_rope_inplace_op(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, layout: str, interleaved: bool,
                           impl: str) -> None:
    """In-place rotation of q and k (unit last stride)."""
    if not rope_call_is_empty(q, k, cos, layout):
        launcher("apply_rope", impl).apply_rope_fwd(q, k, cos, sin, layout, interleaved, q_out=q, k_out=k)


@_apply_rope_inplace_op.register_fake
def _(q, k, cos, sin, layout, interleaved, impl):
    return None


# ----------------------------------------------------------------------------- autograd


class _ApplyRopeFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin, layout, interleaved, inplace, impl):
        cos, sin = unit_last(cos), unit_last(sin)
        ctx.save_for_backward(cos, sin)
        ctx.layout, ctx.interleaved, ctx.impl = layout, interleaved, impl
        if inplace:
            q2, k2 = unit_last(q), unit_last(k)
            _apply_rope_inplace_op(q2, k2, cos, sin, layout, interleaved, impl)
            if q2 is not q:
                q.copy_(q2)
            if k2 is not k:
                k.copy_(k2)
            ctx.mark_dirty(q, k)
            return q, k
        return _apply_rope_op(unit_last(q), unit_last(k), cos, sin, layout, interleaved, False, impl)

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        gq, gk = _apply_rope_op(unit_last(dq), unit_last(dk), cos, sin, ctx.layout, ctx.interleaved, True, ctx.impl)
        return gq, gk, None, None, None, None, None, None


def _no_heads(x: Tensor, layout: str) -> Tensor:
    """An empty stand-in with 0 heads for the second tensor of a single-tensor launch."""
    shape = list(x.shape)
    shape[2 if layout == "bshd" else 1] = 0
    return x.new_empty(shape)


class _ApplyRopeInplaceOne(torch.autograd.Function):
    """In-place RoPE of one tensor. Autograd does not let one Function return two tensors
    that it modified in place when they are views, so with gradients q and k take one each."""

    @staticmethod
    def forward(ctx, x, cos, sin, layout, interleaved, impl):
        cos, sin = unit_last(cos), unit_last(sin)
        ctx.save_for_backward(cos, sin)
        ctx.layout, ctx.interleaved, ctx.impl = layout, interleaved, impl
        x2 = unit_last(x)
        _apply_rope_inplace_op(x2, _no_heads(x2, layout), cos, sin, layout, interleaved, impl)
        if x2 is not x:
            x.copy_(x2)
        ctx.mark_dirty(x)
        return x

    @staticmethod
    def backward(ctx, dx):
        cos, sin = ctx.saved_tensors
        dx = unit_last(dx)
        g, _ = _apply_rope_op(dx, _no_heads(dx, ctx.layout), cos, sin, ctx.layout, ctx.interleaved, True, ctx.impl)
        return g, None, None, None, None, None


# ----------------------------------------------------------------------------- public op


def apply_rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, layout: str = "bshd", interleaved: bool = False,
               inplace: bool = False, backend: Optional[str] = "auto") -> tuple[Tensor, Tensor]:
    """Rotary position embedding of q and k in one pass.

    ::

        q    (B, S, Hq, D)  layout="bshd"  |  (B, Hq, S, D)  layout="bhsd"
        k    (B, S, Hk, D)                 |  (B, Hk, S, D)   (Hk may differ: GQA / MQA)
        cos  (S, R) or (B, S, R), R even, R <= D  (rotary dims; dims R..D-1 pass through)
        sin  same shape as cos
        -> (q_out, k_out), shapes and dtype of q and k

    Entry ``i`` of a cos / sin row is the cosine / sine of the angle of the pair that
    holds dim ``i`` (diffusers' ``apply_rotary_emb(use_real=True)`` convention; build
    tables with :func:`rope_frequencies`). ``interleaved=True`` rotates adjacent pairs
    ``(x[2j], x[2j+1])`` (Flux, GPT-J; diffusers ``use_real_unbind_dim=-1``);
    ``False`` rotates ``(x[j], x[j+R/2])`` (GPT-NeoX, Llama; ``use_real_unbind_dim=-2``).

    Numerics: ``(x.float() * cos + rot(x).float() * sin).to(x.dtype)``, one rounding.
    q / k may be any strided views whose last dim is contiguous (e.g. slices of a fused
    ``(B, S, 3, H, D)`` qkv projection): no copy is made. ``inplace=True`` overwrites q
    and k and returns them. Gradients flow to q and k (the backward is the rotation by
    minus the angle); ``cos`` / ``sin`` are treated as constants by the kernel backends.
    In place with gradients enabled, q and k are rotated by one launch each (autograd
    cannot take two in-place-modified views from one Function); otherwise one launch.
    dtypes: float32, float16, bfloat16 (float64 on the torch backend); tables in any of
    those (upcast to fp32). Registered as ``torch.ops.fastgen.apply_rope`` /
    ``apply_rope_``, so ``torch.compile(fullgraph=True)`` traces it.
    """
    validate_qk("apply_rope", q, k, cos, sin, layout)
    impl = resolve("apply_rope", backend, q.device, call=(q, cos, sin))
    if impl == "torch" or q.numel() == 0 or k.numel() == 0:
        return apply_rope_ref(q, k, cos, sin, layout, interleaved, inplace)
    if inplace and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
        args = (cos, sin, layout, bool(interleaved), impl)
        return _ApplyRopeInplaceOne.apply(q, *args), _ApplyRopeInplaceOne.apply(k, *args)
    return _ApplyRopeFunction.apply(q, k, cos, sin, layout, bool(interleaved), bool(inplace), impl)
