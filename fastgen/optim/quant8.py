"""Block-wise dynamic 8-bit quantization of optimizer states (the scheme of 8-bit Adam,
Dettmers et al., 2022, "8-bit Optimizers via Block-wise Quantization").

A state tensor, flattened in memory order, is cut into blocks of ``QBLOCK = 256`` elements.
Each block stores one fp32 ``absmax = max |x|`` and one uint8 code per element::

    code = #{ i : boundary[i] < x / absmax }         (0 when absmax = 0)
    x'   = qmap[code] * absmax                         (dequantized)

``qmap`` is a sorted table of 256 fp32 values in [-1, 1] (signed, first moment) or [0, 1]
(unsigned, second moment); ``boundary[i] = (qmap[i] + qmap[i + 1]) / 2`` in fp32, so a code
is the nearest table value, ties to the lower one. The tables are the *dynamic* maps:
a decimal exponent ``e`` in 0..6 selects the scale ``10^(e - 6)``; within it, the midpoints
of ``n_e + 1`` evenly spaced points of ``[0.1, 1]`` (fp32 ``linspace``) are the fractions,
with ``n_e = 2^e`` for the signed map (each also negated) and ``n_e = 2^(e + 1)`` for the
unsigned one; ``0`` and ``1`` complete the 256 values (127 + 127 + 2 signed, 254 + 2
unsigned). Small numbers keep relative precision (a 10^-6 entry next to a 0.1 one), which
is what Adam's second moment needs.

Everything here is plain fp32 torch, the reference path of ``FusedAdamW8bit``; the Triton
kernel (``kernels/adamw8bit.py``) computes the same codes from the same fp32 values.
"""

from __future__ import annotations

import functools

import torch

QBLOCK = 256


@functools.lru_cache(maxsize=None)
def _dynamic_map(signed: bool) -> tuple:
    values = []
    for e in range(7):
        n = 2 ** e if signed else 2 ** (e + 1)
        points = torch.linspace(0.1, 1.0, n + 1, dtype=torch.float32)
        fractions = (points[:-1] + points[1:]) / 2.0
        scaled = (10.0 ** (e - 6)) * fractions  # a python float times an fp32 tensor: fp32
        values += scaled.tolist()
        if signed:
            values += (-scaled).tolist()
    values += [0.0, 1.0]
    assert len(values) == 256
    return tuple(sorted(values))


def dynamic_map(signed: bool, device=None) -> torch.Tensor:
    """The 256 fp32 values of the signed (first moment) or unsigned (second moment) dynamic map, sorted."""
    return torch.tensor(_dynamic_map(bool(signed)), dtype=torch.float32, device=device)


def boundaries(signed: bool, device=None) -> torch.Tensor:
    """256 fp32 decision boundaries: the 255 fp32 midpoints of the map, then +inf."""
    q = dynamic_map(signed)
    mid = (q[:-1] + q[1:]) / 2.0
    return torch.cat([mid, torch.tensor([float("inf")])]).to(device)


@functools.lru_cache(maxsize=None)
def _tables(signed: bool, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return dynamic_map(signed, device), boundaries(signed, device)


def tables(signed: bool, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(qmap, boundary) on ``device``, cached."""
    return _tables(bool(signed), torch.device(device))


def num_blocks(numel: int) -> int:
    return (numel + QBLOCK - 1) // QBLOCK


def _blocks(x: torch.Tensor) -> torch.Tensor:
    """``x`` (contiguous) flattened and zero-padded to ``[num_blocks, QBLOCK]`` fp32."""
    flat = x.reshape(-1).float()
    pad = (-flat.numel()) % QBLOCK
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.view(-1, QBLOCK)


def quantize(x: torch.Tensor, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 codes shaped like ``x``, fp32 absmax ``[num_blocks]``) of a contiguous tensor."""
    qmap, bound = tables(signed, x.device)
    blocks = _blocks(x)
    absmax = blocks.abs().amax(dim=1)
    scaled = torch.where(absmax[:, None] > 0, blocks / absmax[:, None], torch.zeros_like(blocks))
    codes = torch.searchsorted(bound, scaled.contiguous(), right=False)  # #{i: bound[i] < x}
    codes = codes.reshape(-1)[: x.numel()].to(torch.uint8).view(x.shape)
    return codes, absmax


def dequantize(codes: torch.Tensor, absmax: torch.Tensor, signed: bool) -> torch.Tensor:
    """fp32 tensor shaped like ``codes``: ``qmap[code] * absmax`` of its block."""
    qmap, _ = tables(signed, codes.device)
    flat = qmap[codes.reshape(-1).long()]
    scale = absmax.repeat_interleave(QBLOCK)[: flat.numel()]
    return (flat * scale).view(codes.shape)
