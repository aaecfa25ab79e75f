"""Training-step benchmark suite: fastgen.models + FusedAdamW against diffusers + torch AdamW.

Run it with ``fastgen bench --ops train`` (not part of a plain ``fastgen bench``: the GPU
models take minutes to build). One measured call is one optimizer step of flow matching, the
same loop for both providers::

    x_t = (1 - s) x0 + s eps,  s ~ U(0, 1)          (B latents; s scaled to the model's timestep)
    loss = mean((model(x_t, s, cond) - (eps - x0))^2)
    loss.backward();  clip_grad_norm_(params, 1.0);  optimizer.step();  zero_grad(set_to_none)

Providers:

- ``torch``: the diffusers model (``FluxTransformer2DModel``, ``UNet2DConditionModel``,
  ``DiTTransformer2DModel``) with ``torch.optim.AdamW`` (its default foreach path) and
  ``torch.nn.utils.clip_grad_norm_``, as diffusers' training scripts use them;
- ``fastgen-models``: the variant's ``fastgen.models`` class built from the same config (no
  diffusers needed) with ``fastgen.optim.FusedAdamW`` and ``fastgen.optim.clip_grad_norm_``,
  Triton backend on a GPU.

Both keep the weights, gradients and Adam moments in the case's dtype (bf16 on a GPU:
``FusedAdamW(state_dtype=bf16)`` matches torch AdamW's bf16 states, so the memory columns compare
like with like). Variants, GPU sizes (from ``bench_models``' specs, 1024 px, batch 1):

- ``flux-dev-width``: a Flux-dev-width stack (24 heads x 128, joint dim 4096, guidance) of 2 double
  + 4 single blocks: 4096 image + 512 text tokens;
- ``sdxl-unet``: the SDXL UNet (2.57 B parameters), 128 x 128 latent, 77 text tokens;
- ``tiny-dit``: the trainer's tiny class-conditional DiT; on CPU every variant runs at a tiny size
  in fp32 (``fastgen-models`` on the torch backend there), which checks the wiring only.

Columns: ``ms`` per step (images/s = B / s; tokens/s = :func:`tokens` / s, see
:func:`throughput`), TFLOP/s for the transformers from ``6 x parameters x tokens`` (the usual
dense-training estimate; 0, no column, for the U-Net whose convolutions reuse weights per pixel),
and the peak memory of one step above what is resident before it (activations, gradients and
temporaries; the resident weights and moments are :func:`resident_bytes`). Goal on a GPU:
``fastgen-models`` >= 1.3x the throughput at <= 0.8x the peak memory of ``torch``.
"""

from __future__ import annotations

import dataclasses

import torch

from .bench_models import _inputs, _spec
from .harness import Case, Unavailable, fastgen_backend

OP = "train"
PROVIDERS = ("torch", "fastgen-models")
GPU_ONLY = ()
MODES = ("step",)
PLOT_X = "px"
ON_REQUEST = True

VARIANTS = {"flux-dev-width": ("flux-stack", "Flux"), "sdxl-unet": ("sdxl-unet", "UNet2DCondition"),
            "tiny-dit": ("dit-xl2", "DiT")}
TINY_DIT = dict(num_attention_heads=2, attention_head_dim=16, num_layers=2, sample_size=8, num_embeds_ada_norm=4,
                in_channels=4, out_channels=4, patch_size=2)


def _kwargs(variant: str, tiny: bool) -> tuple[str, dict]:
    if variant == "tiny-dit":
        return "DiTTransformer2DModel", dict(TINY_DIT)
    return _spec(VARIANTS[variant][0], tiny)


def cases(device: str, quick: bool) -> list[Case]:
    if device == "cuda":
        out = [Case({"B": 1, "px": 1024}, torch.bfloat16, v) for v in ("flux-dev-width", "sdxl-unet")]
        out.append(Case({"B": 16, "px": 64}, torch.bfloat16, "tiny-dit"))
        return out[:1] if quick else out
    out = [Case({"B": 4, "px": 64}, torch.float32, "tiny-dit")]
    return out if quick else out + [Case({"B": 1, "px": 64}, torch.float32, v) for v in ("flux-dev-width", "sdxl-unet")]


def build_model(provider: str, variant: str, device: str, dtype: torch.dtype, backend: str = "triton"):
    """The diffusers model (``torch``) or the ``fastgen.models`` class (``fastgen-models``), seeded."""
    name, kw = _kwargs(variant, tiny=device != "cuda")
    torch.manual_seed(0)
    if provider == "torch":
        try:
            import diffusers
        except ImportError as exc:
            raise Unavailable(f"diffusers is not installed ({exc})") from None
        model = getattr(diffusers, name)(**kw)
    else:
        model = _fastgen_model(variant, kw, backend)
    return model.to(device=device, dtype=dtype).train()


def _fastgen_model(variant: str, kw: dict, backend: str):
    import fastgen.models

    cls = getattr(fastgen.models, VARIANTS[variant][1])
    fields = {f.name for f in dataclasses.fields(cls.config_class)}
    return cls(cls.config_class(**{k: v for k, v in kw.items() if k in fields}), backend=backend)


def _timestep_scale(variant: str) -> float:
    return 1.0 if variant == "flux-dev-width" else 1000.0  # Flux takes sigma, the others 1000 sigma


def tokens(case: Case) -> int:
    """Tokens per sample that the model attends over (image + text); pixels / 64 for the U-Net latent."""
    lat = case.shape["px"] // 8
    if case.variant == "flux-dev-width":
        return (lat // 2) ** 2 + (512 if case.shape["px"] >= 256 else 8)
    if case.variant == "tiny-dit":
        return (lat // TINY_DIT["patch_size"]) ** 2
    return lat * lat


def _meta_count(provider: str, variant: str, device: str) -> int:
    name, kw = _kwargs(variant, tiny=device != "cuda")
    with torch.device("meta"):
        if provider == "torch":
            import diffusers

            model = getattr(diffusers, name)(**kw)
        else:
            model = _fastgen_model(variant, kw, "torch")
    return sum(p.numel() for p in model.parameters())


def resident_bytes(case: Case, device: str = "cuda") -> int:
    """Weights + Adam moments held between steps (gradients are freed by ``zero_grad``)."""
    e = torch.empty((), dtype=case.dtype).element_size()
    return 3 * e * _meta_count("fastgen-models", case.variant, device)


def bytes_moved(case: Case, mode: str) -> int:
    """A floor for a compute-bound step: weights read in the forward and the backward, gradients
    written, then the optimizer reads p, g, m, v and writes p, m, v."""
    device = "cuda" if case.shape["px"] >= 256 or case.dtype != torch.float32 else "cpu"
    e = torch.empty((), dtype=case.dtype).element_size()
    return 10 * e * _meta_count("fastgen-models", case.variant, device)


def flops(case: Case, mode: str) -> int:
    if case.variant == "sdxl-unet":
        return 0  # convolutions: 6 N T does not apply; no TFLOP/s column for this row
    device = "cuda" if case.dtype != torch.float32 else "cpu"
    return 6 * _meta_count("fastgen-models", case.variant, device) * tokens(case) * case.shape["B"]


def throughput(row: dict) -> dict:
    """``{"images_per_s", "tokens_per_s"}`` of a measured row of this suite."""
    if not row.get("ms"):
        return {"images_per_s": None, "tokens_per_s": None}
    case = Case(row["shape"], torch.float32, row["variant"])
    per_s = row["shape"]["B"] / (row["ms"] * 1e-3)
    return {"images_per_s": per_s, "tokens_per_s": per_s * tokens(case)}


def _x0_key(variant: str) -> str:
    return "sample" if variant == "sdxl-unet" else "hidden_states"


def setup(provider: str, case: Case, mode: str, device: str):
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
    if provider not in PROVIDERS:
        raise ValueError(f"unknown provider {provider!r}; expected one of {PROVIDERS}")
    backend = "torch"
    if provider == "fastgen-models" and device == "cuda":
        fastgen_backend("fastgen-triton", device)
        backend = "triton"
    return build(provider, case, device, backend)


def build(provider: str, case: Case, device: str, backend: str = "triton", model=None):
    """The timed training step (see the module docstring); ``model`` replaces the built one (the
    tests pass models with equal weights); ``step.model`` / ``step.optimizer`` / ``step.losses``."""
    if model is None:
        model = build_model(provider, case.variant, device, case.dtype, backend)
    params = [p for p in model.parameters() if p.requires_grad]
    if provider == "torch":
        opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
        clip = torch.nn.utils.clip_grad_norm_
    else:
        from fastgen.optim import FusedAdamW, clip_grad_norm_

        opt = FusedAdamW(params, lr=1e-4, weight_decay=0.01, backend=backend,
                         state_dtype=None if case.dtype == torch.float32 else case.dtype)

        def clip(ps, max_norm):
            return clip_grad_norm_(ps, max_norm, backend=backend)

    B = case.shape["B"]
    if case.variant == "tiny-dit":
        lat = case.shape["px"] // 8
        g = torch.Generator(device=device).manual_seed(0)
        cond = dict(hidden_states=torch.randn(B, TINY_DIT["in_channels"], lat, lat, generator=g, device=device,
                                              dtype=case.dtype),
                    class_labels=torch.arange(B, device=device) % TINY_DIT["num_embeds_ada_norm"])
    else:
        cond = _inputs(VARIANTS[case.variant][0], B, case.shape["px"], device, case.dtype, model, case.shape)
    key, scale = _x0_key(case.variant), _timestep_scale(case.variant)
    x0 = cond.pop(key)
    cond.pop("timestep", None)
    g = torch.Generator(device=device).manual_seed(1)
    losses = []

    def step():
        eps = torch.randn(x0.shape, generator=g, device=device, dtype=x0.dtype)
        s = torch.rand(B, generator=g, device=device, dtype=torch.float32)
        sb = s.view(B, *([1] * (x0.dim() - 1))).to(x0.dtype)
        out = model(**{key: (1 - sb) * x0 + sb * eps}, timestep=(s * scale).to(case.dtype), **cond)
        out = out.sample if hasattr(out, "sample") else (out[0] if isinstance(out, tuple) else out)
        out = out[:, :x0.shape[1]] if out.dim() == 4 else out  # DiT's learned variance: keep the mean
        loss = (out.float() - (eps - x0).float()).square().mean()
        loss.backward()
        clip(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())
        return loss.detach()

    step.model, step.optimizer, step.losses = model, opt, losses
    return step
