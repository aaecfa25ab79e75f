"""Weight-only quantized base layers for adapter training: ``quantize(model, "int8" | "fp8_e4m3")``.

Each frozen ``nn.Linear`` weight ``W (out, in)`` becomes ``q (out, in)`` (int8 or float8_e4m3fn)
and ``scale (out, n_blocks)`` fp32, one scale per output channel (``block_size=None``) or per
``block_size`` input columns::

    int8:      scale = max|W_block| / 127,  q = clamp(round(W / scale), -127, 127)
    fp8_e4m3:  scale = max|W_block| / 448,  q = fp8(W / scale)   (round to nearest)
    W_hat = q * scale

Error bound per weight (what the tests check): int8 ``|W - W_hat| <= scale / 2``; fp8 e4m3 (3
mantissa bits) ``|W - W_hat| <= max(|W| * 2^-4, scale * 2^-10)`` (relative half-ulp for normal
numbers, half the subnormal spacing below 2^-6). An output ``y = x W_hat^T`` is then within
``|x| @ bound^T`` of the full-precision one.

The forward is :func:`fastgen.adapters.quant_linear.quant_linear`: with the torch backend it
dequantizes one layer's weight at a time to the input dtype and calls ``F.linear``; with the
Triton backend a dequantize-GEMM (``kernels/quant_matmul.py``) serves the forward and the input
gradient without a full-precision weight. Gradients reach the input (adapters upstream keep
training), never the frozen quantized weight. Bytes per weight: 1 (+ 4 per scale) instead of 2 or 4.

``save_quantized`` / ``load_quantized`` write the quantized model (without adapters) as one
safetensors file, the scheme of each layer in its metadata.
"""

from __future__ import annotations

import json
import os

import torch
from torch import nn

from fastgen.adapters import targets as _targets
from fastgen.adapters.layers import forward_hook
from fastgen.adapters.quant_linear import dequantize_weight, quant_linear

SCHEMES = {"int8": (torch.int8, 127.0), "fp8_e4m3": (torch.float8_e4m3fn, 448.0)}
META = "fastgen_quantized"


def quantize_weight(w: torch.Tensor, scheme: str, block_size: int | None = None):
    """(q, scale) of ``w (out, in)``; ``scale (out, n_blocks)`` fp32."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantization scheme {scheme!r}; expected one of {sorted(SCHEMES)}")
    qdtype, qmax = SCHEMES[scheme]
    out_f, in_f = w.shape
    bs = in_f if block_size is None else int(block_size)
    if bs <= 0 or in_f % bs:
        raise ValueError(f"block_size {block_size} must divide in_features {in_f}")
    wb = w.detach().float().reshape(out_f, in_f // bs, bs)
    scale = wb.abs().amax(dim=2) / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    v = wb / scale[..., None]
    q = v.round().clamp(-qmax, qmax).to(qdtype) if scheme == "int8" else v.clamp(-qmax, qmax).to(qdtype)
    return q.reshape(out_f, in_f), scale


class QuantLinear(nn.Module):
    """A frozen Linear with a weight-only quantized weight (see the module docstring)."""

    fastgen_quantized = True

    def __init__(self, in_features: int, out_features: int, scheme: str, n_blocks: int = 1, bias: bool = True,
                 dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.in_features, self.out_features, self.scheme, self.compute_dtype = in_features, out_features, scheme, dtype
        self.backend = "auto"  # who runs the dequantize-GEMM: "auto" | "triton" | "torch" (fastgen.adapters.use_backend)
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=SCHEMES[scheme][0], device=device))
        self.register_buffer("scale", torch.ones(out_features, n_blocks, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, layer: nn.Linear, scheme: str, block_size: int | None = None) -> "QuantLinear":
        q, scale = quantize_weight(layer.weight, scheme, block_size)
        new = cls(layer.in_features, layer.out_features, scheme, scale.shape[1], layer.bias is not None,
                  dtype=layer.weight.dtype, device=layer.weight.device)
        new.qweight.copy_(q)
        new.scale.copy_(scale)
        if layer.bias is not None:
            new.bias.data.copy_(layer.bias.detach())
        return new

    @property
    def block_size(self) -> int:
        return self.in_features // self.scale.shape[1]

    def dequantize_weight(self) -> torch.Tensor:
        return dequantize_weight(self.qweight, self.scale, self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quant_linear(x, self.qweight, self.scale, self.bias, backend=self.backend)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme}, block_size={self.block_size}"


def _move_adapters(old: nn.Module, new: nn.Module) -> None:
    if hasattr(old, "fastgen_adapters"):
        if old.fastgen_adapters.merged:
            raise RuntimeError("unmerge the adapters before (de)quantizing: merged weights would be baked in")
        new.fastgen_adapters = old.fastgen_adapters
        old.fastgen_adapter_hook.remove()
        new.fastgen_adapter_hook = new.register_forward_hook(forward_hook)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def quantize(model: nn.Module, scheme: str = "int8", block_size: int | None = None, targets="all", exclude=()) -> nn.Module:
    """Replace the model's ``nn.Linear`` layers (those ``targets`` selects) by :class:`QuantLinear`,
    in place; adapters already attached move along. Returns the model.

    The base must be frozen: a targeted weight that requires grad is an error (its training would
    be lost). Adapters added with ``fastgen.adapters.add_adapter`` freeze the base."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantization scheme {scheme!r}; expected one of {sorted(SCHEMES)}")
    from fastgen.adapters.fastgen_models import is_fastgen_model

    if is_fastgen_model(model):
        raise TypeError(
            f"{type(model).__name__} is a fastgen model: its fused kernels read Linear weights directly, so a "
            "quantized base cannot run there yet; quantize the diffusers model instead"
        )
    names = [n for n in _targets.select(model, targets, exclude) if isinstance(model.get_submodule(n), nn.Linear)]
    training = [n for n in names if model.get_submodule(n).weight.requires_grad]
    if training:
        raise RuntimeError(
            f"cannot quantize a model that is training its base weights ({len(training)} Linear weights require grad, "
            f"e.g. {training[:3]}); freeze them first (model.requires_grad_(False), or add adapters, which freeze the base)"
        )
    for n in names:
        old = model.get_submodule(n)
        new = QuantLinear.from_linear(old, scheme, block_size)
        _move_adapters(old, new)
        _replace(model, n, new)
    return model


def dequantize(model: nn.Module) -> nn.Module:
    """Replace every QuantLinear by an ``nn.Linear`` holding ``W_hat`` (frozen), in place."""
    for n, m in list(model.named_modules()):
        if isinstance(m, QuantLinear):
            lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device=m.qweight.device,
                            dtype=m.compute_dtype)
            lin.weight.data.copy_(m.dequantize_weight())
            if m.bias is not None:
                lin.bias.data.copy_(m.bias.detach())
            lin.requires_grad_(False)
            _move_adapters(m, lin)
            _replace(model, n, lin)
    return model


def base_nbytes(model: nn.Module) -> int:
    """Bytes of the weights (and scales) of the model's Linear / QuantLinear layers."""
    total = 0
    for m in model.modules():
        if isinstance(m, QuantLinear):
            total += m.qweight.nbytes + m.scale.nbytes
        elif isinstance(m, nn.Linear):
            total += m.weight.nbytes
    return total


def _plain_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if ".fastgen_adapters." not in f".{k}"}


def save_quantized(model: nn.Module, path: str | os.PathLike) -> None:
    """The model's state (quantized weights, scales, everything else; adapters excluded) as safetensors."""
    from safetensors.torch import save_file

    layers = {n: {"scheme": m.scheme, "n_blocks": m.scale.shape[1], "dtype": str(m.compute_dtype).replace("torch.", "")}
              for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    sd = {k: v.detach().contiguous() for k, v in _plain_state(model).items()}
    save_file(sd, os.fspath(path), metadata={"format": "pt", META: json.dumps(layers)})


def load_quantized(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a :func:`save_quantized` file into a model of the same architecture (quantizing the same
    layers first); every tensor must match. Returns the model."""
    from safetensors import safe_open

    with safe_open(os.fspath(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get(META, "{}"))
        sd = {k: f.get_tensor(k) for k in f.keys()}
    modules = dict(model.named_modules())
    absent = sorted(n for n in meta if n not in modules)
    if absent:
        raise KeyError(f"quantized checkpoint does not match the model: missing layers {absent[:10]}")
    for n, info in meta.items():
        old = modules[n]
        if not isinstance(old, (nn.Linear, QuantLinear)):
            raise KeyError(f"quantized layer {n!r} of the file is a {type(old).__name__} in this model")
        dev = next(iter(old.buffers() if isinstance(old, QuantLinear) else old.parameters())).device
        new = QuantLinear(old.in_features, old.out_features, info["scheme"], info["n_blocks"], old.bias is not None,
                          dtype=getattr(torch, info["dtype"]), device=dev)
        _move_adapters(old, new)
        _replace(model, n, new)
    own = _plain_state(model)
    missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    if missing or unexpected:
        raise KeyError(f"quantized checkpoint does not match the model: missing {missing[:10]}, unexpected {unexpected[:10]}")
    for k, v in sd.items():
        if own[k].shape != v.shape or own[k].dtype != v.dtype:
            raise ValueError(f"{k}: file has {tuple(v.shape)} {v.dtype}, model has {tuple(own[k].shape)} {own[k].dtype}")
    model.load_state_dict({**model.state_dict(), **sd})
    return model
