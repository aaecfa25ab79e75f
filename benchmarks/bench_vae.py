"""VAE decode benchmark suite: time and peak memory against image size, full vs tiled.

Run it with ``fastgen bench --ops vae`` (see ``harness.py`` for the suite contract), or
``python -m benchmarks.bench_vae --sizes 256 512 1024`` from the repo root for the large
sweep of the issue (each provider timed once after a warm-up: a 4096 px decode takes
seconds, too long for the harness's repeated timing). Providers, all on the same random
weights (SDXL config, bf16, on a GPU; a tiny config in fp32 on CPU so the run takes seconds):

- ``torch``: ``fastgen.vae.AutoencoderKL.decode`` with the torch GroupNorm (the eager
  reference: the same math as diffusers' full decode);
- ``diffusers``: ``diffusers.AutoencoderKL.decode`` (full image);
- ``diffusers-tiled``: ``diffusers.AutoencoderKL.tiled_decode`` (its default tile settings);
- ``fastgen-triton``: the full decode with fastgen's fused Triton GroupNorm+SiLU kernels;
- ``fastgen-tiled``: ``fastgen.vae.tiled_decode(..., blend="linear")`` at the same settings
  (diffusers' result, streaming the blend), GroupNorm backend ``auto``;
- ``fastgen-tiled-triton``: the same with the Triton GroupNorm+SiLU kernels;
- ``fastgen-consistent``: ``tiled_decode(..., consistent_colors=True)``: the lossless layout
  (halo exchange, whole-image GroupNorm statistics, global attention; equal to the full decode
  up to summation order), activations staged in host memory beyond the default budget;
- ``fastgen-blend``: ``tiled_decode(..., consistent_colors=True, halo=False)``, the older
  blended layout with whole-image statistics.

The sweep also records each tiled provider's PSNR against the full decode (``torch``) where
that one ran at the same size. ``--video`` decodes CogVideoX's video VAE instead (fastgen's
``AutoencoderKLCogVideoX`` and diffusers', one-pass, frame-batched and tiled, 49 x 480 x 720 on a
GPU; PSNR against the one-pass decode): :func:`video_sweep`. ``meta_peak`` / ``video_meta_peak``
measure allocated-bytes peaks of large decodes without a GPU (the meta device).

Shape keys: ``N`` batch, ``h`` = ``w`` latent side (image side ``8 h`` on SDXL), ``T`` tile side in
latent positions. Mode ``fwd`` only (inference).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time

import torch

import fastgen
from fastgen.backend import interpreter_enabled, unavailable_reason
from fastgen.vae import AutoencoderKL, AutoencoderKLConfig, sdxl_config, tiled_decode
from fastgen.vae.video_tiling import _factor

from .harness import Case, Unavailable

OP = "vae"
PROVIDERS = ("torch", "diffusers", "fastgen-triton", "diffusers-tiled", "fastgen-tiled", "fastgen-tiled-triton",
             "fastgen-consistent", "fastgen-blend")
GPU_ONLY = ("fastgen-triton", "fastgen-tiled-triton")
MODES = ("fwd",)
PLOT_X = "h"

TINY = dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, sample_size=16)
_MODELS: dict = {}


def _config(device: str) -> AutoencoderKLConfig:
    return sdxl_config() if device == "cuda" else AutoencoderKLConfig(**TINY)


def _case(h: int, tile: int, dtype: torch.dtype, n: int = 1) -> Case:
    return Case({"N": n, "h": h, "w": h, "T": tile}, dtype)


def cases(device: str, quick: bool) -> list[Case]:
    """Latent sizes. On a GPU the SDXL VAE in bf16 at 1024 px with 512 px tiles (9 tiles): the
    harness times each row ~18 times and the whole GPU suite shares one 10-minute call, so the
    large sizes of the issue (4096 / 8192 px) are measured by :func:`sweep` (``main``) instead."""
    if device != "cuda":
        return [_case(16, 8, torch.float32)] if quick else [_case(16, 8, torch.float32), _case(24, 8, torch.float32)]
    return [_case(128, 64, torch.bfloat16)]


def bytes_moved(case: Case, mode: str) -> int:
    """A floor, not a roofline (the decode is compute-bound): read the latent, write the image.

    ``N * 4 * h * w * e + N * 3 * (8 h) * (8 w) * e``, e = element size, with SDXL's factor 8
    (the CPU run's tiny config has factor 2, so its GB/s column is nominal).
    """
    s = case.shape
    e = torch.empty((), dtype=case.dtype).element_size()
    return s["N"] * e * (4 * s["h"] * s["w"] + 3 * 64 * s["h"] * s["w"])


def _models(device: str, dtype: torch.dtype):
    """(fastgen VAE, diffusers VAE or None) with the same random weights, built once per device and dtype."""
    key = (device, dtype)
    if key not in _MODELS:
        cfg = _config(device)
        torch.manual_seed(0)
        ours = AutoencoderKL(cfg).to(device=device, dtype=dtype).eval()
        theirs = None
        try:
            import diffusers

            n = len(cfg.block_out_channels)
            theirs = diffusers.AutoencoderKL(
                in_channels=cfg.in_channels, out_channels=cfg.out_channels, latent_channels=cfg.latent_channels,
                block_out_channels=cfg.block_out_channels, layers_per_block=cfg.layers_per_block,
                norm_num_groups=cfg.norm_num_groups, sample_size=cfg.sample_size,
                down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
            ).to(device=device, dtype=dtype).eval()
            theirs.load_state_dict(ours.state_dict())
        except ImportError:
            pass
        _MODELS[key] = (ours, theirs)
    return _MODELS[key]


def setup(provider: str, case: Case, mode: str, device: str):
    """The latent and the no-argument decode that ``provider`` runs (speed and memory runs)."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
    if provider not in PROVIDERS:
        raise ValueError(f"unknown provider {provider!r}; expected one of {PROVIDERS}")
    ours, theirs = _models(device, case.dtype)
    if provider.startswith("diffusers") and theirs is None:
        raise Unavailable("diffusers is not installed (pip install diffusers)")
    if provider in GPU_ONLY:
        if device != "cuda":
            raise Unavailable("needs a CUDA GPU (the Triton kernels are not timed on CPU)")
        reason = unavailable_reason("triton", torch.device(device))
        if reason is not None or interpreter_enabled():
            raise Unavailable(reason or "TRITON_INTERPRET=1 is set: interpreter timings mean nothing")
    s = case.shape
    gen = torch.Generator(device=device).manual_seed(0)
    z = torch.randn(s["N"], ours.config.latent_channels, s["h"], s["w"], device=device, dtype=case.dtype,
                    generator=gen)
    tile = s["T"]

    backend = "triton" if provider in GPU_ONLY else ("torch" if provider == "torch" else "auto")

    @torch.no_grad()
    def fn():
        with fastgen.backend(backend):
            return run()

    def run():
        if provider in ("torch", "fastgen-triton"):
            return ours.decode(z)
        if provider == "diffusers":
            return theirs.decode(z).sample
        if provider == "diffusers-tiled":
            theirs.tile_latent_min_size = tile
            theirs.tile_sample_min_size = tile * ours.downsample_factor
            return theirs.tiled_decode(z).sample
        if provider in ("fastgen-tiled", "fastgen-tiled-triton"):
            return tiled_decode(ours, z, tile_size=tile, progress=False)
        return tiled_decode(ours, z, tile_size=tile, consistent_colors=True, halo=provider != "fastgen-blend",
                            progress=False)

    return fn


def psnr(x: torch.Tensor, ref: torch.Tensor) -> float:
    """10 log10(range(ref)^2 / MSE) in float64 (inf when equal)."""
    mse = (x.double() - ref.double()).square().mean()
    return float(10 * torch.log10((ref.double().max() - ref.double().min()) ** 2 / mse))


def _timed(fn, device: str, row: dict):
    """``fn()`` once: ``row["ms"]`` and, on a GPU, ``row["peak_gb"]`` (peak allocated above what was
    allocated before). Returns what ``fn`` returns."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    out = fn()
    if device == "cuda":
        torch.cuda.synchronize()
        row["peak_gb"] = (torch.cuda.max_memory_allocated() - base) / 2**30
    row["ms"] = (time.perf_counter() - t0) * 1e3
    return out


def sweep(sizes, tile: int = 128, providers=PROVIDERS, device: str = "cuda", dtype=torch.bfloat16,
          rows: list | None = None) -> list[dict]:
    """Each provider once per latent size after a warm-up at the smallest size: ms and peak GB.
    Rows are appended to ``rows`` (if given) as they are measured, so an interrupted sweep keeps them."""
    rows = [] if rows is None else rows
    for h in sizes:
        case = _case(h, tile, dtype)
        full = None
        for p in providers:
            row = {"provider": p, "latent": h, "image": h * _config(device).downsample_factor, "tile": tile}
            try:
                out = _timed(setup(p, case, "fwd", device), device, row)
                if p == "torch":
                    full = out
                elif full is not None and out.shape == full.shape:
                    row["psnr_db"] = psnr(out, full)
                del out
            except Exception as exc:  # an OOM is a result here
                row["status"] = f"{type(exc).__name__}: {str(exc)[:120]}"
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def plot_sweep(rows: list[dict], path: str) -> str | None:
    """Time and peak memory against image side, one line per provider (what :func:`sweep`
    measured; failed rows, e.g. out of memory, are left out). None, or why nothing was written."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return "matplotlib is not installed; no plot written"
    fig = Figure(figsize=(10.0, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax_t, ax_m = fig.subplots(1, 2)
    for provider in dict.fromkeys(r["provider"] for r in rows):
        pts = sorted((r["image"], r.get("ms"), r.get("peak_gb")) for r in rows
                     if r["provider"] == provider and "status" not in r)
        if pts:
            ax_t.plot([p[0] for p in pts], [p[1] / 1e3 for p in pts], marker="o", label=provider)
            if all(p[2] is not None for p in pts):
                ax_m.plot([p[0] for p in pts], [p[2] for p in pts], marker="o", label=provider)
    for ax, label in ((ax_t, "decode time (s)"), (ax_m, "peak memory above the inputs (GiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("image side (px)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    ax_t.legend(fontsize=8)
    fig.savefig(path, dpi=110)
    return None


class _LiveBytes:
    """A dispatch mode that counts the bytes of live tensor storages created inside it, and their peak.

    On the ``meta`` device nothing is computed or allocated, so this measures the allocated-bytes
    peak of a decode of any size in seconds (what the device's caching allocator would report as
    ``max_memory_allocated`` above the inputs, less kernel workspaces). Storages made while
    ``skip`` is set (activations staged in host memory) are not counted.
    """

    def __init__(self) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode

        outer = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in (out if isinstance(out, (tuple, list)) else (out,)):
                    if isinstance(t, torch.Tensor):
                        outer._track(t)
                return out

        self.mode, self.live, self.peak, self.skip = Mode(), 0, 0, False
        self._refs: dict = {}

    def _track(self, t: torch.Tensor) -> None:
        import weakref

        key = t.untyped_storage()._cdata
        if key not in self._refs:
            nbytes = 0 if self.skip else t.untyped_storage().nbytes()
            self._refs[key] = [0, nbytes]
            self.live += nbytes
            self.peak = max(self.peak, self.live)
        self._refs[key][0] += 1
        weakref.finalize(t, self._release, key)

    def _release(self, key) -> None:
        entry = self._refs[key]
        entry[0] -= 1
        if entry[0] == 0:
            self.live -= entry[1]
            del self._refs[key]


@contextlib.contextmanager
def _counting(mode: str):
    """Count live allocated bytes (a :class:`_LiveBytes`); with ``mode == "lossless-offload"`` the
    halo engine's staged activations are left out (they would sit in host memory)."""
    import fastgen.vae.halo as halo

    counter = _LiveBytes()
    new = halo._Staging.new

    def staged(self, shape, dt, force_device=False):
        counter.skip = mode == "lossless-offload" and not force_device
        try:
            return new(self, shape, dt, force_device)
        finally:
            counter.skip = False

    halo._Staging.new = staged
    try:
        with counter.mode:
            yield counter
    finally:
        halo._Staging.new = new


def meta_peak(image: int, mode: str, tile: int = 64, config=None, dtype=torch.bfloat16) -> dict:
    """Allocated-bytes peak of a decode of an ``image`` px square (SDXL config unless given), on ``meta``.

    ``mode``: ``"full"`` (``vae.decode``), ``"lossless"`` (``tiled_decode(consistent_colors=True)``,
    staged activations on the device) or ``"lossless-offload"`` (the same, staged in host memory:
    what ``offload=True`` leaves on the GPU). Returns GiB figures: the peak above the weights and
    the latent, and the weights.
    """
    cfg = config or sdxl_config()
    with torch.device("meta"):
        vae = AutoencoderKL(cfg).to(dtype).eval()
    f = cfg.downsample_factor
    z = torch.empty(1, cfg.latent_channels, image // f, image // f, device="meta", dtype=dtype)
    with _counting(mode) as counter, torch.no_grad():
        out = vae.decode(z) if mode == "full" else tiled_decode(vae, z, tile_size=tile, consistent_colors=True,
                                                                  progress=False)
    assert out.shape == (1, 3, image, image)
    weights = sum(p.numel() * p.element_size() for p in vae.decoder.parameters())
    return {"image": image, "mode": mode, "tile": tile, "peak_gib": counter.peak / 2**30, "weights_gib": weights / 2**30}


VIDEO_PROVIDERS = ("fastgen-video-onepass", "fastgen-video", "diffusers-video", "fastgen-video-tiled",
                   "diffusers-video-tiled")


def _video_config(device: str):
    from fastgen.vae import CogVideoXVAEConfig

    return CogVideoXVAEConfig() if device == "cuda" else CogVideoXVAEConfig(
        block_out_channels=(8, 16, 16, 16), latent_channels=4, layers_per_block=1, norm_num_groups=4)


def _diffusers_video(cfg, ours, device: str, dtype):
    """diffusers' ``AutoencoderKLCogVideoX`` with ``cfg``'s shape and ``ours``' weights; None without diffusers."""
    try:
        import diffusers
    except ImportError:
        return None
    n = len(cfg.block_out_channels)
    theirs = diffusers.AutoencoderKLCogVideoX(
        block_out_channels=cfg.block_out_channels, latent_channels=cfg.latent_channels,
        layers_per_block=cfg.layers_per_block, norm_num_groups=cfg.norm_num_groups,
        down_block_types=("CogVideoXDownBlock3D",) * n, up_block_types=("CogVideoXUpBlock3D",) * n,
    ).to(device=device, dtype=dtype).eval()
    theirs.load_state_dict(ours.state_dict())
    return theirs


@torch.no_grad()
def _timed_video_decode(fn, z, device: str, row: dict):
    """One warm-up on 2 latent frames, then one timed decode of ``z`` (:func:`_timed`). Returns the decode."""
    fn(z[:, :, :2])
    return _timed(lambda: fn(z), device, row)


def video_sweep(device: str = "cuda", dtype=torch.bfloat16, frames: int = 49, height: int = 480,
                width: int = 720, rows: list | None = None, tile=None, frame_chunk: int = 2) -> list[dict]:
    """CogVideoX's video VAE decode (``AutoencoderKLCogVideoX``), one timed decode per provider after a
    warm-up, time and peak memory, on the same random weights. On a GPU the CogVideoX-2b config at
    ``frames x height x width`` (49 x 480 x 720: 13 latent frames of 60 x 90); on CPU a tiny config.

    Providers: ``fastgen-video-onepass`` (all frames in one chunk: whole-video GroupNorm statistics,
    the reference of ``psnr_db``), ``fastgen-video`` / ``diffusers-video`` (frame-batched decode, 2
    latent frames per chunk, per-chunk statistics; ``psnr_db_vs_fastgen`` compares the two),
    ``fastgen-video-tiled`` (``tiled_decode``: lossless spatial tiles of ``tile`` latent positions,
    default diffusers' 30 x 45, and ``frame_chunk`` latent frames; staged activations beyond 5 % of
    the GPU go to host memory) and ``diffusers-video-tiled`` (``enable_tiling()``: blended tiles,
    per-tile and per-chunk statistics).
    """
    from fastgen.vae import AutoencoderKLCogVideoX

    rows = [] if rows is None else rows
    cfg = _video_config(device)
    torch.manual_seed(0)
    ours = AutoencoderKLCogVideoX(cfg).to(device=device, dtype=dtype).eval()
    f = _factor(ours)
    tile = tile or ((cfg.sample_height // 2 // f, cfg.sample_width // 2 // f) if device == "cuda" else (6, 5))

    def onepass(z):
        ours.num_latent_frames_batch_size = z.shape[2]
        try:
            return ours.decode(z).sample
        finally:
            ours.num_latent_frames_batch_size = 2

    models = {"fastgen-video-onepass": onepass, "fastgen-video": lambda z: ours.decode(z).sample}
    theirs = _diffusers_video(cfg, ours, device, dtype)
    if theirs is not None:
        models["diffusers-video"] = lambda z: theirs.decode(z).sample
    else:
        rows.append({"provider": "diffusers-video", "status": "diffusers is not installed"})
    models["fastgen-video-tiled"] = lambda z: tiled_decode(ours, z, tile_size=tile, frame_chunk=frame_chunk,
                                                           progress=False)
    if theirs is not None:
        def theirs_tiled(z):
            theirs.enable_tiling(*((None, None) if device == "cuda" else (tile[0] * f, tile[1] * f)))
            try:
                return theirs.decode(z).sample
            finally:
                theirs.disable_tiling()

        models["diffusers-video-tiled"] = theirs_tiled
    else:
        rows.append({"provider": "diffusers-video-tiled", "status": "diffusers is not installed"})
    t = (frames - 1) // int(cfg.temporal_compression_ratio) + 1
    z = torch.randn(1, cfg.latent_channels, t, height // f, width // f, device=device, dtype=dtype)
    outs: dict = {}
    for name, fn in models.items():
        row = {"provider": name, "frames": frames, "height": height, "width": width}
        if name.endswith("tiled"):
            row["tile"] = list(tile)
        try:
            out = _timed_video_decode(fn, z, device, row)
            if "fastgen-video-onepass" in outs:
                row["psnr_db"] = psnr(out, outs["fastgen-video-onepass"])
            if name == "diffusers-video" and "fastgen-video" in outs:
                row["psnr_db_vs_fastgen"] = psnr(out, outs["fastgen-video"])
            if name in ("fastgen-video-onepass", "fastgen-video"):
                outs[name] = out
        except Exception as exc:  # an OOM is a result here
            row["status"] = f"{type(exc).__name__}: {str(exc)[:120]}"
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def video_meta_peak(latent: tuple, mode: str, tile=6, frame_chunk: int = 2, config=None,
                    dtype=torch.bfloat16) -> dict:
    """Allocated-bytes peak of a video decode of ``latent = (t, h, w)`` latent frames (CogVideoX-2b
    config unless given), on ``meta`` (as :func:`meta_peak`). ``mode``: ``"onepass"`` (all frames at
    once), ``"batched"`` (``vae.decode``: 2 latent frames at a time), ``"lossless"`` (``tiled_decode``,
    staged activations on the device) or ``"lossless-offload"`` (staged in host memory: what
    ``offload=True`` leaves on the GPU). GiB figures: the peak above the weights and the latent,
    the output, the weights."""
    from fastgen.vae import AutoencoderKLCogVideoX, CogVideoXVAEConfig

    cfg = config or CogVideoXVAEConfig()
    with torch.device("meta"):
        vae = AutoencoderKLCogVideoX(cfg).to(dtype).eval()
    z = torch.empty(1, cfg.latent_channels, *latent, device="meta", dtype=dtype)
    if mode == "onepass":
        vae.num_latent_frames_batch_size = latent[0]
    with _counting(mode) as counter, torch.no_grad():
        out = vae.decode(z).sample if mode in ("onepass", "batched") else tiled_decode(
            vae, z, tile_size=tile, frame_chunk=frame_chunk, progress=False)
    weights = sum(p.numel() * p.element_size() for p in vae.decoder.parameters())
    return {"latent": list(latent), "mode": mode, "tile": tile, "frame_chunk": frame_chunk,
            "peak_gib": counter.peak / 2**30, "output_gib": out.numel() * out.element_size() / 2**30,
            "weights_gib": weights / 2**30}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[128, 256, 512, 1024], help="latent sides")
    ap.add_argument("--tile", type=int, default=128, help="tile side in latent positions")
    ap.add_argument("--providers", nargs="+", default=list(PROVIDERS))
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    ap.add_argument("--plot", default=None, help="write a PNG of time and peak memory against image size here")
    ap.add_argument("--video", action="store_true", help="decode CogVideoX's video VAE (49 x 480 x 720 on a GPU)")
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.video:
        kw = {} if device == "cuda" else dict(frames=9, height=56, width=48)
        rows = video_sweep(device, torch.bfloat16 if device == "cuda" else torch.float32, **kw)
        if args.out:
            with open(args.out, "w") as fh:
                json.dump(rows, fh, indent=1)
        return
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if device == "cpu":
        args.sizes, args.tile = [min(s, 32) for s in args.sizes], min(args.tile, 8)
    sweep(args.sizes[:1], args.tile, args.providers, device, dtype)  # warm-up
    rows: list = []
    try:
        sweep(args.sizes, args.tile, args.providers, device, dtype, rows)
    finally:  # an interrupted sweep (a time limit) still reports what it measured
        print("\n| provider | latent | image | ms | peak GB | PSNR dB | status |\n|---|---|---|---|---|---|---|")
        for r in rows:
            pk = f"{r['peak_gb']:.2f}" if "peak_gb" in r else "-"
            ms = f"{r['ms']:.0f}" if "ms" in r else "-"
            db = f"{r['psnr_db']:.1f}" if "psnr_db" in r else "-"
            print(f"| {r['provider']} | {r['latent']} | {r['image']} | {ms} | {pk} | {db} | {r.get('status', 'ok')} |")
        if args.out:
            with open(args.out, "w") as fh:
                json.dump(rows, fh, indent=1)
        if args.plot:
            why = plot_sweep(rows, args.plot)
            print(why or f"wrote {args.plot}")


if __name__ == "__main__":
    main()
