"""Whole-model benchmark suite: diffusers models, unpatched vs ``fastgen.patch`` vs torch.compile.

Run it with ``fastgen bench --ops models`` (it is not part of a plain ``fastgen bench``:
building and compiling the models takes minutes). Random weights, built once per device
from diffusers' own classes at the sizes of the released checkpoints (bf16 on a GPU); on
CPU a tiny configuration of each, in fp32, so that the suite's plumbing runs in seconds.

Variants (``case.variant``), GPU sizes:

- ``flux-stack``: a ``FluxTransformer2DModel`` with Flux-dev's block size (24 heads x 128,
  joint dim 4096, guidance) and 2 double + 4 single blocks (the full 19 + 38 do not leave
  room for a training step next to the other rows), 1024 px: 4096 image + 512 text tokens;
- ``sd3-medium``: ``SD3Transformer2DModel`` with SD3-medium's config (24 layers, 24 x 64),
  1024 px: 4096 image + 333 text tokens;
- ``sdxl-unet``: ``UNet2DConditionModel`` with SDXL's config, 1024 px (128 x 128 latent);
- ``sdxl-vae``: ``AutoencoderKL`` with SDXL's VAE config, decode at 1024 px and 2048 px;
- ``dit-xl2``: ``DiTTransformer2DModel`` with DiT-XL/2's config, 512 px (64 x 64 latent, 1024 tokens);
- ``pixart-alpha``: ``PixArtTransformer2DModel`` with PixArt-α's 1024 px config (4096 image tokens,
  120 T5 tokens, resolution / aspect-ratio conditions);
- ``cogvideox-2b``: ``CogVideoXTransformer3DModel`` with CogVideoX-2b's config (30 layers, 30 x 64,
  sin-cos positions) on the latents of 49 frames x 480 x 720 px: (13, 16, 60, 90), i.e.
  13 x 30 x 45 = 17,550 video + 226 text tokens.

Providers: ``torch`` (the unpatched model, eager), ``torch.compile`` (the unpatched model
compiled), ``fastgen-triton`` (``fastgen.patch(model, backend="triton")``, eager) and
``fastgen-triton+compile`` (patched, then compiled), ``fastgen-models`` (the variant's own
``fastgen.models`` class, ``from_diffusers(model, backend="triton")``: fused across module
boundaries; every variant but the VAE: DiT, PixArt, SD3, Flux, UNet2DCondition, CogVideoX) and
``fastgen-models+compile``. Modes: ``fwd`` (inference, no grad)
and ``fwd+bwd`` (a training step without the optimizer: forward, ``mean(out^2)``,
backward into every parameter; the VAE rows are decode-only).
"""

from __future__ import annotations

import torch

import fastgen.patch as fp
from fastgen.backend import interpreter_enabled

from .harness import Case, Unavailable, fastgen_backend

OP = "models"
PROVIDERS = ("torch", "torch.compile", "fastgen-triton", "fastgen-triton+compile", "fastgen-models",
             "fastgen-models+compile")
GPU_ONLY = ("fastgen-triton", "fastgen-triton+compile", "fastgen-models", "fastgen-models+compile")
# variant -> its fastgen.models class (the fastgen-models providers); others are "unavailable" rows
FASTGEN_MODELS = {"dit-xl2": "DiT", "pixart-alpha": "PixArt", "sd3-medium": "SD3", "flux-stack": "Flux",
                  "sdxl-unet": "UNet2DCondition", "cogvideox-2b": "CogVideoX"}
MODES = ("fwd", "fwd+bwd")
PLOT_X = "px"
ON_REQUEST = True

_MODELS: dict = {}


def _tiny(device: str) -> bool:
    return device != "cuda"


def _spec(variant: str, tiny: bool):
    """(diffusers class name, constructor kwargs, latent channels, latent downsampling)."""
    if variant == "flux-stack":
        kw = (dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                   num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=True,
                   axes_dims_rope=(4, 6, 6)) if tiny else
              dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=4, attention_head_dim=128,
                   num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                   guidance_embeds=True, axes_dims_rope=(16, 56, 56)))
        return "FluxTransformer2DModel", kw
    if variant == "sd3-medium":
        kw = (dict(sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8,
                   num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                   pooled_projection_dim=16, out_channels=4, pos_embed_max_size=16) if tiny else
              dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                   num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                   pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192))
        return "SD3Transformer2DModel", kw
    if variant == "sdxl-unet":
        common = dict(in_channels=4, out_channels=4, addition_embed_type="text_time", use_linear_projection=True,
                      down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                      up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))
        kw = (dict(common, sample_size=8, block_out_channels=(8, 16, 16), layers_per_block=1, norm_num_groups=4,
                   transformer_layers_per_block=(1, 1, 1), attention_head_dim=(2, 4, 4), cross_attention_dim=16,
                   addition_time_embed_dim=4, projection_class_embeddings_input_dim=16 + 6 * 4) if tiny else
              dict(common, sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
                   transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
                   cross_attention_dim=2048, addition_time_embed_dim=256,
                   projection_class_embeddings_input_dim=2816))
        return "UNet2DConditionModel", kw
    if variant == "sdxl-vae":
        kw = dict(in_channels=3, out_channels=3, latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4,
                  **(dict(block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4) if tiny else
                     dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32)))
        return "AutoencoderKL", kw
    if variant == "dit-xl2":
        kw = (dict(num_attention_heads=2, attention_head_dim=16, num_layers=1, sample_size=8, num_embeds_ada_norm=10,
                   out_channels=8) if tiny else
              dict(num_attention_heads=16, attention_head_dim=72, num_layers=28, sample_size=64, out_channels=8))
        return "DiTTransformer2DModel", kw
    if variant == "pixart-alpha":
        kw = (dict(num_attention_heads=2, attention_head_dim=24, num_layers=1, sample_size=8, caption_channels=20,
                   cross_attention_dim=48, use_additional_conditions=True) if tiny else
              dict(num_attention_heads=16, attention_head_dim=72, num_layers=28, sample_size=128,
                   caption_channels=4096, cross_attention_dim=1152, use_additional_conditions=True))
        return "PixArtTransformer2DModel", kw
    if variant == "cogvideox-2b":
        kw = (dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=8,
                   text_embed_dim=16, num_layers=1, sample_width=6, sample_height=4, sample_frames=9,
                   max_text_seq_length=7) if tiny else
              dict(num_attention_heads=30, attention_head_dim=64, in_channels=16, out_channels=16, time_embed_dim=512,
                   text_embed_dim=4096, num_layers=30, sample_width=90, sample_height=60, sample_frames=49,
                   max_text_seq_length=226, use_rotary_positional_embeddings=False))
        return "CogVideoXTransformer3DModel", kw
    raise ValueError(f"unknown model variant {variant!r}")


def _build(variant: str, device: str, dtype: torch.dtype, meta: bool = False):
    try:
        import diffusers
    except ImportError as exc:
        raise Unavailable(f"diffusers is not installed ({exc})") from None
    name, kw = _spec(variant, _tiny(device))
    torch.manual_seed(0)
    if meta:
        with torch.device("meta"):
            return getattr(diffusers, name)(**kw)
    return getattr(diffusers, name)(**kw).to(device=device, dtype=dtype)


def _model(variant: str, device: str, dtype: torch.dtype):
    key = (variant, device, dtype)
    if key not in _MODELS:
        _MODELS.clear()  # one model in memory at a time: the GPU rows are large
        _MODELS[key] = _build(variant, device, dtype)
    return _MODELS[key]


def cases(device: str, quick: bool) -> list[Case]:
    dt = torch.bfloat16 if device == "cuda" else torch.float32
    px = 1024 if device == "cuda" else 64
    if quick:
        return [Case({"B": 1, "px": px}, dt, "flux-stack")]
    out = [Case({"B": 1, "px": px}, dt, v) for v in ("flux-stack", "sd3-medium", "sdxl-unet", "sdxl-vae")]
    out.append(Case({"B": 1, "px": 2 * px}, dt, "sdxl-vae"))
    out.append(Case({"B": 1, "px": px // 2}, dt, "dit-xl2"))  # DiT-XL/2 at 512 px
    out.append(Case({"B": 1, "px": px}, dt, "pixart-alpha"))
    # CogVideoX-2b's released size: 49 frames x 480 x 720 px (tiny: 9 frames x 32 x 48)
    video = dict(px=480, W=720, frames=49) if device == "cuda" else dict(px=32, W=48, frames=9)
    out.append(Case({"B": 1, **video}, dt, "cogvideox-2b"))
    return out


def _inputs(variant: str, B: int, px: int, device: str, dtype: torch.dtype, model, shape: dict = None) -> dict:
    """Keyword inputs of one call at ``px`` x ``px`` pixels (latent = px / 8); the video variant
    reads the width and the frame count from ``shape`` (``W``, ``frames``)."""
    shape = shape or {}
    g = torch.Generator(device=device).manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, device=device, dtype=dtype)

    cfg, lat = model.config, px // 8
    t = torch.full((B,), 500.0, device=device, dtype=dtype)
    if variant == "flux-stack":
        side = lat // 2  # 2x2 latent patches packed into tokens
        text = 512 if device == "cuda" else 8
        img_ids = torch.stack(torch.meshgrid(torch.arange(1), torch.arange(side), torch.arange(side),
                                             indexing="ij"), -1).reshape(-1, 3).to(device, dtype)
        return dict(hidden_states=rnd(B, side * side, cfg.in_channels),
                    encoder_hidden_states=rnd(B, text, cfg.joint_attention_dim),
                    pooled_projections=rnd(B, cfg.pooled_projection_dim), timestep=t / 1000,
                    img_ids=img_ids, txt_ids=torch.zeros(text, 3, device=device, dtype=dtype),
                    guidance=torch.full((B,), 3.5, device=device, dtype=dtype))
    if variant == "sd3-medium":
        text = 333 if device == "cuda" else 5
        return dict(hidden_states=rnd(B, cfg.in_channels, lat, lat),
                    encoder_hidden_states=rnd(B, text, cfg.joint_attention_dim),
                    pooled_projections=rnd(B, cfg.pooled_projection_dim), timestep=t)
    if variant == "sdxl-unet":
        text_embeds = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        return dict(sample=rnd(B, cfg.in_channels, lat, lat), timestep=t,
                    encoder_hidden_states=rnd(B, 77, cfg.cross_attention_dim),
                    added_cond_kwargs={"text_embeds": rnd(B, text_embeds), "time_ids": rnd(B, 6)})
    if variant == "dit-xl2":
        return dict(hidden_states=rnd(B, cfg.in_channels, lat, lat), timestep=t,
                    class_labels=torch.arange(B, device=device) % cfg.num_embeds_ada_norm)
    if variant == "pixart-alpha":
        text = 120 if device == "cuda" else 7
        return dict(hidden_states=rnd(B, cfg.in_channels, lat, lat), timestep=t,
                    encoder_hidden_states=rnd(B, text, cfg.caption_channels),
                    added_cond_kwargs={"resolution": torch.tensor([[px, px]] * B, device=device, dtype=dtype),
                                       "aspect_ratio": torch.ones(B, 1, device=device, dtype=dtype)})
    if variant == "cogvideox-2b":
        return dict(hidden_states=rnd(B, *video_latent_shape(dict(shape, px=px), cfg)),
                    encoder_hidden_states=rnd(B, cfg.max_text_seq_length, cfg.text_embed_dim), timestep=t)
    return dict(z=rnd(B, cfg.latent_channels, lat, lat))


def video_latent_shape(shape: dict, cfg) -> tuple:
    """``(F, C, H, W)`` of a video latent: frames compressed ``temporal_compression_ratio`` x (the
    first kept), pixels 8 x; ``shape``: ``px`` (height), ``W`` (width), ``frames``."""
    frames = (shape.get("frames", 49) - 1) // cfg.temporal_compression_ratio + 1
    return frames, cfg.in_channels, shape["px"] // 8, shape.get("W", shape["px"]) // 8


def parameter_count(variant: str, device: str) -> int:
    """Parameters of the variant's model at ``device``'s size (built on the meta device)."""
    return sum(p.numel() for p in _build(variant, device, torch.float32, meta=True).parameters())


def bytes_moved(case: Case, mode: str) -> int:
    """A floor, not a roofline (these models are compute-bound): the weights read once in the
    forward; a training step reads them again in the backward and writes their gradients."""
    device = "cpu" if case.shape["px"] < 256 else "cuda"
    e = torch.empty((), dtype=case.dtype).element_size()
    return parameter_count(case.variant, device) * e * (1 if mode == "fwd" else 3)


def setup(provider: str, case: Case, mode: str, device: str):
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
    if provider not in PROVIDERS:
        raise ValueError(f"unknown provider {provider!r}; expected one of {PROVIDERS}")
    if case.variant == "sdxl-vae" and mode != "fwd":
        raise Unavailable("the VAE rows are decode-only (inference)")
    native = provider.startswith("fastgen-models")
    patched = provider.startswith("fastgen")
    if patched:
        if device == "cuda" and interpreter_enabled():
            raise Unavailable("TRITON_INTERPRET=1 is set: interpreter timings mean nothing; unset it")
        fastgen_backend("fastgen-triton", device)  # Unavailable without a GPU
        if native and case.variant not in FASTGEN_MODELS:
            raise Unavailable(f"no fastgen.models class for {case.variant} yet")
    return build(provider, case, mode, device)


def native_model(variant: str, model, backend: str = "triton"):
    """The variant's ``fastgen.models`` class with ``model``'s weights (the fastgen-models rows)."""
    import fastgen.models

    return getattr(fastgen.models, FASTGEN_MODELS[variant]).from_diffusers(model, backend=backend)


def build(provider: str, case: Case, mode: str, device: str, backend: str = "triton"):
    """The timed callable of ``setup`` once the provider is known to be available; ``backend``
    is the fastgen rows' backend (``"triton"`` when timed; the CPU tests wire it with ``"torch"``)."""
    native = provider.startswith("fastgen-models")
    model = _model(case.variant, device, case.dtype)
    fp.unpatch(model)
    if native:
        model = native_model(case.variant, model, backend)
    elif provider.startswith("fastgen"):
        fp.patch(model, backend=backend)
    call = model.decode if case.variant == "sdxl-vae" else model.forward
    if provider.endswith("compile"):
        torch._dynamo.reset()
        call = torch.compile(call)
    inputs = _inputs(case.variant, case.shape["B"], case.shape["px"], device, case.dtype, model, case.shape)

    def output():
        out = call(**inputs)
        return out.sample if hasattr(out, "sample") else out[0]

    if mode == "fwd":
        model.eval()

        def fn():
            with torch.no_grad():
                return output()
        return fn

    model.train()
    params = [p for p in model.parameters() if p.requires_grad]

    def step():
        output().float().square().mean().backward()

    step.grad_to_none = params
    return step
