"""Attention rules of ``fastgen.patch``: diffusers attention processors -> fastgen processors.

A fastgen processor is a subclass of the diffusers processor it replaces (``isinstance``
checks in diffusers still hold) whose ``__call__`` is the same computation with the
attention product on :func:`fastgen.ops.scaled_dot_product_attention` and, in the
rotary processors, the rotation on :func:`fastgen.ops.apply_rope`::

    AttnProcessor2_0        q, k, v (B, H, S, D) -> sdpa -> (B, S, H*D)   (masks go to torch SDPA)
    JointAttnProcessor2_0   [x; context] joint attention (SD3)
    FluxAttnProcessor       q, k (B, S, H, D), image_rotary_emb = (cos, sin) of shape (S, D),
                            interleaved pairs (diffusers use_real_unbind_dim=-1) -> apply_rope
                            (layout "bshd", interleaved=True), then sdpa on (B, H, S, D)
    CogVideoXAttnProcessor2_0  rotary on the video tokens (B, H, S_video, D), interleaved

Calls they do not cover the same way (an attention mask in Flux, complex rotary tables,
cross-attention rotary in CogVideoX) run the original diffusers ``__call__``.
"""

from __future__ import annotations

import dataclasses

import torch

from fastgen.ops import apply_rope, qk_norm_rope, scaled_dot_product_attention
from fastgen.patch.core import ORIG_CLASS, ORIG_PROCESSOR, Skipped, replaced, run, site
from fastgen.patch.records import ROPE_OPS, Plan, Step
from fastgen.patch.serve import mark, param_dtype

try:
    from diffusers.models import attention_processor as _ap
    from diffusers.models.normalization import RMSNorm as _dn_rms
    from diffusers.models.transformers import transformer_flux as _flux
except Exception:  # pragma: no cover - diffusers missing or broken
    _ap = None
    _flux = None
    _dn_rms = None


def _heads(t, attn):
    """(B, S, heads * head_dim) projections -> (B, heads, S, head_dim), as diffusers' processors view them."""
    return t.unflatten(-1, (attn.heads, -1)).transpose(1, 2)


def _sdpa(proc, q, k, v, attn_mask=None):
    return run(proc, "attention", scaled_dot_product_attention, q, k, v, attn_mask=attn_mask, dropout_p=0.0,
               is_causal=False)


def _tables(rot, q):
    """``(cos, sin)`` as float32 (Flux builds them in float64 on CPU), or None if not a real pair."""
    if not (isinstance(rot, (tuple, list)) and len(rot) == 2):
        return None
    cos, sin = rot
    if cos.dim() != 2 or cos.shape != sin.shape:
        return None
    if cos.dtype == torch.float64 and q.dtype != torch.float64:
        cos, sin = cos.float(), sin.float()
    return cos.to(q.device), sin.to(q.device)


def _rms_static(norm):
    """``(eps,)`` of an RMSNorm (torch's or diffusers', patched or not) whose function
    ``qk_norm_rope`` has (one dim, a weight, no bias), else None. ``eps`` None: dtype's eps."""
    if norm is None:
        return None
    cls = norm.__dict__.get(ORIG_CLASS, type(norm))
    if cls is torch.nn.RMSNorm:
        eps, ok = norm.eps, len(norm.normalized_shape) == 1
    elif _dn_rms is not None and cls is _dn_rms:
        eps, ok = norm.eps, len(norm.dim) == 1 and norm.bias is None
    else:
        return None
    return (eps,) if ok and norm.weight is not None else None


def _rms_weight(norm, x):
    """``(weight, eps)`` of an RMSNorm that ``qk_norm_rope`` reproduces exactly on ``x``, else None."""
    static = _rms_static(norm)
    w = norm.weight if static is not None else None
    if w is None or w.dtype != x.dtype or w.shape != (x.shape[-1],):
        return None
    eps = static[0] if static[0] is not None else torch.finfo(x.dtype).eps
    return w, float(eps)


def _fusable_children(attn) -> tuple:
    """The names of the q / k norms a Flux processor runs inside ``qk_norm_rope`` (known before
    any call: plain RMSNorms with one eps per pair), else ()."""
    pairs = [("norm_q", "norm_k")]
    if getattr(attn, "added_kv_proj_dim", None) is not None:
        pairs.append(("norm_added_q", "norm_added_k"))
    for nq, nk in pairs:
        sq, sk = _rms_static(getattr(attn, nq, None)), _rms_static(getattr(attn, nk, None))
        if sq is None or sk is None or sq != sk:
            return ()
    return tuple(n for pair in pairs for n in pair)


def _fusable(norm_q, norm_k, x):
    """``(q_weight, k_weight, eps)`` when ``qk_norm_rope`` can stand in for these two norms."""
    wq, wk = _rms_weight(norm_q, x), _rms_weight(norm_k, x)
    if wq is None or wk is None or wq[1] != wk[1]:
        return None
    return wq[0], wk[0], wq[1]


def _norm_rope(proc, q, k, fusable, cos, sin):
    wq, wk, eps = fusable
    return run(proc, "qk_norm_rope", qk_norm_rope, q, k, wq, wk, cos, sin, eps=eps, layout="bshd",
               interleaved=True)


_CLASSES: dict = {}  # diffusers processor class -> (fastgen processor class, Plan)
_SDPA = Step(("attention",))
_QK_NORM_ROPE = Step(("qk_norm_rope",))

if _ap is not None:

    class FastgenAttnProcessor2_0(_ap.AttnProcessor2_0):
        """``AttnProcessor2_0`` on fastgen's SDPA."""

        def __init__(self, backend: str = "auto"):
            self.fastgen_backend = backend

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                     *args, **kwargs):
            residual = hidden_states
            if attn.spatial_norm is not None:
                hidden_states = attn.spatial_norm(hidden_states, temb)
            input_ndim = hidden_states.ndim
            if input_ndim == 4:
                batch_size, channel, height, width = hidden_states.shape
                hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
            batch_size, sequence_length, _ = (
                hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape)
            if attention_mask is not None:
                attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
                attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
            if attn.group_norm is not None:
                hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
            query = attn.to_q(hidden_states)
            if encoder_hidden_states is None:
                encoder_hidden_states = hidden_states
            elif attn.norm_cross:
                encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
            key = attn.to_k(encoder_hidden_states)
            value = attn.to_v(encoder_hidden_states)
            head_dim = key.shape[-1] // attn.heads
            query, key, value = _heads(query, attn), _heads(key, attn), _heads(value, attn)
            if attn.norm_q is not None:
                query = attn.norm_q(query)
            if attn.norm_k is not None:
                key = attn.norm_k(key)
            hidden_states = _sdpa(self, query, key, value, attention_mask)
            hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
            hidden_states = hidden_states.to(query.dtype)
            hidden_states = attn.to_out[0](hidden_states)
            hidden_states = attn.to_out[1](hidden_states)
            if input_ndim == 4:
                hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
            if attn.residual_connection:
                hidden_states = hidden_states + residual
            return hidden_states / attn.rescale_output_factor

    class FastgenJointAttnProcessor2_0(_ap.JointAttnProcessor2_0):
        """``JointAttnProcessor2_0`` (SD3 joint attention) on fastgen's SDPA."""

        def __init__(self, backend: str = "auto"):
            self.fastgen_backend = backend

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
            residual = hidden_states
            batch_size = hidden_states.shape[0]

            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
            head_dim = key.shape[-1] // attn.heads
            query, key, value = _heads(query, attn), _heads(key, attn), _heads(value, attn)
            if attn.norm_q is not None:
                query = attn.norm_q(query)
            if attn.norm_k is not None:
                key = attn.norm_k(key)
            if encoder_hidden_states is not None:
                eq = _heads(attn.add_q_proj(encoder_hidden_states), attn)
                ek = _heads(attn.add_k_proj(encoder_hidden_states), attn)
                ev = _heads(attn.add_v_proj(encoder_hidden_states), attn)
                if attn.norm_added_q is not None:
                    eq = attn.norm_added_q(eq)
                if attn.norm_added_k is not None:
                    ek = attn.norm_added_k(ek)
                query = torch.cat([query, eq], dim=2)
                key = torch.cat([key, ek], dim=2)
                value = torch.cat([value, ev], dim=2)
            hidden_states = _sdpa(self, query, key, value)
            hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
            hidden_states = hidden_states.to(query.dtype)
            if encoder_hidden_states is not None:
                hidden_states, encoder_hidden_states = (hidden_states[:, : residual.shape[1]],
                                                        hidden_states[:, residual.shape[1]:])
                if not attn.context_pre_only:
                    encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
            hidden_states = attn.to_out[0](hidden_states)
            hidden_states = attn.to_out[1](hidden_states)
            if encoder_hidden_states is not None:
                return hidden_states, encoder_hidden_states
            return hidden_states

    class FastgenCogVideoXAttnProcessor2_0(_ap.CogVideoXAttnProcessor2_0):
        """``CogVideoXAttnProcessor2_0`` on fastgen's SDPA and RoPE (interleaved, on the video tokens)."""

        def __init__(self, backend: str = "auto", rope: bool = True):
            self.fastgen_backend = backend
            self.fastgen_rope = rope

        def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask=None, image_rotary_emb=None):
            text_seq_length = encoder_hidden_states.size(1)
            hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
            batch_size, sequence_length, _ = hidden_states.shape
            if attention_mask is not None:
                attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
                attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
            head_dim = key.shape[-1] // attn.heads
            query, key, value = _heads(query, attn), _heads(key, attn), _heads(value, attn)
            if attn.norm_q is not None:
                query = attn.norm_q(query)
            if attn.norm_k is not None:
                key = attn.norm_k(key)
            if image_rotary_emb is not None:
                tables = _tables(image_rotary_emb, query) if self.fastgen_rope else None
                t = text_seq_length
                if tables is not None and not attn.is_cross_attention:
                    q_img, k_img = run(self, "apply_rope", apply_rope, query[:, :, t:], key[:, :, t:], *tables,
                                       layout="bhsd", interleaved=True)
                    query = torch.cat([query[:, :, :t], q_img], dim=2)
                    key = torch.cat([key[:, :, :t], k_img], dim=2)
                else:
                    from diffusers.models.embeddings import apply_rotary_emb

                    query = torch.cat([query[:, :, :t], apply_rotary_emb(query[:, :, t:], image_rotary_emb)], dim=2)
                    if not attn.is_cross_attention:
                        key = torch.cat([key[:, :, :t], apply_rotary_emb(key[:, :, t:], image_rotary_emb)], dim=2)
            hidden_states = _sdpa(self, query, key, value, attention_mask)
            hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
            hidden_states = attn.to_out[0](hidden_states)
            hidden_states = attn.to_out[1](hidden_states)
            encoder_hidden_states, hidden_states = hidden_states.split(
                [text_seq_length, hidden_states.size(1) - text_seq_length], dim=1)
            return hidden_states, encoder_hidden_states

    _CLASSES[_ap.AttnProcessor2_0] = (FastgenAttnProcessor2_0, Plan((_SDPA,)))
    _CLASSES[_ap.JointAttnProcessor2_0] = (FastgenJointAttnProcessor2_0, Plan((_SDPA,)))
    _CLASSES[_ap.CogVideoXAttnProcessor2_0] = (FastgenCogVideoXAttnProcessor2_0,
                                               Plan((_SDPA, Step(("apply_rope",)))))

if _flux is not None:

    class FastgenFluxAttnProcessor(_flux.FluxAttnProcessor):
        """Flux's processor on fastgen: QK-RMSNorm + RoPE fused (``qk_norm_rope``, interleaved, layout
        ``bshd``; ``apply_rope`` after the norms when they are not plain RMSNorms), then fastgen's SDPA."""

        def __init__(self, backend: str = "auto", rope: bool = True):
            self.fastgen_backend = backend
            self.fastgen_rope = rope

        def _heads(self, attn, t):
            return t.unflatten(-1, (-1, attn.head_dim))

        def _norm_rope(self, attn, q, k, eq, ek, tables):
            """Text and image tokens normed with their own weights and rotated by one fused kernel
            each, joined text-first as Flux does; None where the fused op does not apply."""
            cos, sin = tables
            img = _fusable(attn.norm_q, attn.norm_k, q)
            if img is None:
                return None
            if eq is None:
                return _norm_rope(self, q, k, img, cos, sin)
            T = eq.shape[1]
            txt = _fusable(attn.norm_added_q, attn.norm_added_k, eq)
            if txt is None or cos.shape[0] != T + q.shape[1]:
                return None
            tq, tk = _norm_rope(self, eq, ek, txt, cos[:T], sin[:T])
            iq, ik = _norm_rope(self, q, k, img, cos[T:], sin[T:])
            return torch.cat([tq, iq], dim=1), torch.cat([tk, ik], dim=1)

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                     image_rotary_emb=None):
            if attention_mask is not None:  # diffusers' dispatcher prepares masks its own way
                return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
            query, key, value, eq, ek, ev = _flux._get_qkv_projections(attn, hidden_states, encoder_hidden_states)
            query, key, value = self._heads(attn, query), self._heads(attn, key), self._heads(attn, value)
            joint = attn.added_kv_proj_dim is not None and encoder_hidden_states is not None
            if joint:
                eq, ek, ev = self._heads(attn, eq), self._heads(attn, ek), self._heads(attn, ev)
            else:
                eq = ek = ev = None
            tables = None
            if image_rotary_emb is not None and self.fastgen_rope:
                tables = _tables(image_rotary_emb, query)
            fused = self._norm_rope(attn, query, key, eq, ek, tables) if tables is not None else None
            if fused is not None:
                query, key = fused
                if joint:
                    value = torch.cat([ev, value], dim=1)
            else:
                query, key = attn.norm_q(query), attn.norm_k(key)
                if joint:
                    query = torch.cat([attn.norm_added_q(eq), query], dim=1)
                    key = torch.cat([attn.norm_added_k(ek), key], dim=1)
                    value = torch.cat([ev, value], dim=1)
                if tables is not None:
                    query, key = run(self, "apply_rope", apply_rope, query, key, *tables, layout="bshd",
                                     interleaved=True)
                elif image_rotary_emb is not None:
                    query = _flux.apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
                    key = _flux.apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
            out = _sdpa(self, query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2))
            hidden_states = out.transpose(1, 2).flatten(2, 3).to(query.dtype)
            if encoder_hidden_states is not None:
                encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
                    [encoder_hidden_states.shape[1], hidden_states.shape[1] - encoder_hidden_states.shape[1]], dim=1)
                hidden_states = attn.to_out[0](hidden_states.contiguous())
                hidden_states = attn.to_out[1](hidden_states)
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())
                return hidden_states, encoder_hidden_states
            return hidden_states

    # the q / k norms fused into qk_norm_rope are filled in per module (_fusable_children)
    _CLASSES[_flux.FluxAttnProcessor] = (FastgenFluxAttnProcessor,
                                         Plan((_SDPA, Step(("qk_norm_rope", "apply_rope"))), fuser=_QK_NORM_ROPE))


def known_processors() -> list:
    """Names of the diffusers processor classes ``fastgen.patch`` replaces."""
    return sorted(c.__name__ for c in _CLASSES)


def _facts(attn) -> dict:
    """What the patcher knows of a module's attention calls: the head dim and the dtype."""
    heads = getattr(attn, "heads", None)
    to_q = getattr(attn, "to_q", None)
    head_dim = getattr(attn, "head_dim", None)
    if head_dim is None and heads and to_q is not None and hasattr(to_q, "out_features"):
        head_dim = to_q.out_features // heads
    return dict(dtype=param_dtype(to_q), head_dim=head_dim)


def _plan(module, plan: Plan, rope: bool) -> Plan:
    """The class's plan for this module: without the rotary steps under ``rope=False``, with the
    q / k norms its fused kernel absorbs."""
    if not rope:
        return plan.without(ROPE_OPS)
    if plan.fuser == _QK_NORM_ROPE:
        return dataclasses.replace(plan, fuses=_fusable_children(module))
    return plan


def _skip_reason(proc):
    """Why a processor is left alone (None: it is replaced)."""
    cls = type(proc)
    if cls not in _CLASSES:
        return (f"attention processor {cls.__name__} is not known to fastgen.patch "
                f"(known: {', '.join(known_processors()) or 'none: diffusers is not importable'})")
    if getattr(proc, "_attention_backend", None) is not None or getattr(proc, "_parallel_config", None) is not None:
        return f"{cls.__name__} has a diffusers attention backend or parallel config set; kept"
    return None


def patch_attention(module, path: str, report, backend: str, rope: bool, strict: bool):
    """Give ``module`` the fastgen processor of its processor's class; returns the :class:`Plan`
    it runs (its ``fuses``: the child norms run inside a fused kernel), or None if left alone."""
    proc = module.processor
    cls = type(proc)
    reason = _skip_reason(proc)
    if reason is not None:
        report.skipped.append(Skipped(path, cls.__name__, reason, strict_error=True))
        return None
    new_cls, class_plan = _CLASSES[cls]
    plan = _plan(module, class_plan, rope)
    facts = _facts(module)
    reference = site(path, report, backend, cls.__name__, {op: facts for op in plan.ops})
    if reference is None:
        return None
    new = new_cls(backend, rope) if class_plan.uses(ROPE_OPS) else new_cls(backend)
    mark(new, backend, path, reference, strict)
    module.__dict__[ORIG_PROCESSOR] = proc
    module.processor = new
    replaced(report, path, cls.__name__, plan, reference)
    return plan
