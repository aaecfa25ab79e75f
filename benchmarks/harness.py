"""The shared benchmark harness: time, memory, bandwidth and reports for every op.

Installed as ``fastgen.benchmarks.harness``; ``fastgen bench`` drives it. It knows
nothing about any particular op. A suite is a module ``bench_<op>.py`` next to
this file that defines:

``OP``
    the op's name, e.g. ``"rms_norm"``.
``PROVIDERS``
    the providers in report order, e.g. ``("torch", "torch.compile",
    "fastgen-triton", "fastgen-cuda", "liger-kernel")``. ``torch`` (the eager
    reference) and ``torch.compile`` are the baselines of the speedup columns.
``GPU_ONLY``
    the providers that need a GPU (named in the one-line note of a CPU run).
``MODES``
    e.g. ``("fwd", "bwd", "fwd+bwd")``.
``cases(device, quick) -> list[Case]``
    what to measure on ``device`` (``"cuda"`` or ``"cpu"``); ``quick`` keeps a few.
``setup(provider, case, mode, device) -> callable``
    allocates the inputs and returns a no-argument function that runs one
    measured step. The same function serves the speed run and the memory run.
    It may carry ``fn.grad_to_none``: tensors whose ``.grad`` is reset to None
    before every timed call (outside the timed region), see :func:`bench_fn`.
    A provider that cannot serve the case raises :class:`Unavailable` with the
    reason; any other exception becomes an ``error`` row.
``bytes_moved(case, mode) -> int``
    the bytes a perfect kernel must move (each tensor read once, written once),
    the numerator of GB/s.
``flops(case, mode) -> int`` (optional)
    the floating-point operations of one step by an explicit formula (compute-bound
    ops such as attention); rows then also report TFLOP/s.
``PLOT_X``
    the ``case.shape`` key on the x axis of the plot (e.g. ``"N"``).
``ON_REQUEST = True`` (optional)
    the suite runs only when named (``--ops``), not in a plain ``fastgen bench``.

Per row the harness records the median time and the 20-80 % spread, GB/s, the
percentage of the copy bandwidth measured in the same run, the peak memory of
one call above what the inputs already hold (CUDA only), and the speedup over
torch eager and over torch.compile for the same case and mode.

Timing: on CUDA ``triton.testing.do_bench`` (CUDA events, L2 flushed between
calls); on CPU a ``time.perf_counter`` loop with warm-up. Triton's CPU
interpreter is never used here: its timings mean nothing.

Suspect rows are flagged (``row["flags"]``, a ``flags`` column in the table and the
Markdown) and left out of the plots: a spread ``p80 / p20`` above ``SPREAD_LIMIT`` for
the device (the machine was busy: the median means little), or GB/s above the copy
bandwidth measured in the same run (no kernel moves its bytes faster than a copy; the
data sat in a cache, or the byte formula is wrong).

Output: ``./fastgen-bench/<device>/`` under the current directory by default (never into
the installed package); ``--out DIR`` elsewhere. The repository's recorded GPU runs
live under ``benchmarks/results/<device>/`` (``--out benchmarks/results/<device>``).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import gc
import importlib
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
import traceback
from typing import Any, Callable, Iterable, Sequence

import torch

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
RESULTS_DIR = os.path.join(PACKAGE_DIR, "results")  # recorded runs in the repository (written only with --out)
DEFAULT_OUT = "fastgen-bench"                        # under the current directory: ./fastgen-bench/<device>/

# p80 / p20 above this flags a row as noisy (CPU timings on a shared machine wander more)
SPREAD_LIMIT = {"cuda": 1.5, "cpu": 2.0}

STATUS_OK = "ok"

# ----------------------------------------------------------------------------- types


class Unavailable(Exception):
    """Raised by a suite's ``setup`` when a provider cannot run a case; the message says why."""


@dataclasses.dataclass
class Case:
    """One measured configuration of an op: a shape (named sizes), a dtype, a variant."""

    shape: dict[str, int]
    dtype: torch.dtype
    variant: str = ""  # e.g. "residual"; "" is the op's plain form

    @property
    def shape_str(self) -> str:
        return "x".join(str(v) for v in self.shape.values())

    @property
    def dtype_str(self) -> str:
        return dtype_name(self.dtype)


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32",
            torch.float64: "fp64"}.get(dtype, str(dtype).replace("torch.", ""))


# ----------------------------------------------------------------------------- suites


def available_ops() -> list[str]:
    """The ops that have a ``bench_<op>.py`` next to this file, sorted."""
    ops = []
    for name in sorted(os.listdir(PACKAGE_DIR)):
        m = re.fullmatch(r"bench_(\w+)\.py", name)
        if m:
            ops.append(m.group(1))
    return ops


def default_ops() -> list[str]:
    """The ops a plain ``fastgen bench`` runs: every suite but those that set
    ``ON_REQUEST = True`` (whole-model suites that take minutes; run them with ``--ops``)."""
    return [op for op in available_ops() if not getattr(load_suite(op), "ON_REQUEST", False)]


def load_suite(op: str):
    """Import the suite module for ``op`` (``<this package>.bench_<op>``)."""
    package = __package__ or "benchmarks"
    try:
        return importlib.import_module(f"{package}.bench_{op}")
    except ModuleNotFoundError as exc:
        if exc.name == f"{package}.bench_{op}":
            known = ", ".join(available_ops()) or "none"
            raise ValueError(f"no benchmark suite for op {op!r} (known: {known})") from None
        raise


# ----------------------------------------------------------------------------- timing


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _reset_grads(fn: Callable) -> None:
    for t in getattr(fn, "grad_to_none", None) or ():
        t.grad = None


def _quantile(sorted_vals: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile of already sorted values (numpy's default rule)."""
    if len(sorted_vals) == 1:
        return float(sorted_vals[0])
    pos = q * (len(sorted_vals) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_vals) - 1)
    return float(sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (pos - lo))


def bench_fn(fn: Callable, device: str, *, cpu_budget_s: float = 0.25) -> tuple[float, float, float]:
    """Time ``fn``: returns (median, p20, p80) in milliseconds.

    CUDA: ``triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])`` with
    ``grad_to_none=fn.grad_to_none``. CPU: a warm-up call and then individually
    timed calls until ``cpu_budget_s`` has passed (at least 5, at most 1000),
    resetting ``fn.grad_to_none`` before each call, outside the timed region.
    """
    grads = list(getattr(fn, "grad_to_none", None) or ()) or None
    if device == "cuda":
        import triton.testing

        med, p20, p80 = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8], grad_to_none=grads)
        return float(med), float(p20), float(p80)
    _reset_grads(fn)
    fn()  # warm-up
    times: list[float] = []
    deadline = time.perf_counter() + cpu_budget_s
    while len(times) < 5 or (time.perf_counter() < deadline and len(times) < 1000):
        _reset_grads(fn)
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return _quantile(times, 0.5), _quantile(times, 0.2), _quantile(times, 0.8)


def fastgen_backend(provider: str, device: str) -> str:
    """The backend of a ``fastgen-<backend>`` provider, or :class:`Unavailable` saying why it
    cannot be timed here (no GPU, extension not built, ...)."""
    from fastgen.backend import unavailable_reason

    backend = provider.split("-", 1)[1]
    if device != "cuda":
        raise Unavailable(f"needs a CUDA GPU (the {backend} kernels are not timed on CPU)")
    reason = unavailable_reason(backend, torch.device(device))
    if reason is not None:
        raise Unavailable(reason)
    return backend


def peer(module: str, *names: str, device: str, package: str = "liger-kernel", kind: str = "Triton-only"):
    """The objects ``names`` of a peer library's ``module`` (one object for one name), or
    :class:`Unavailable` saying why a peer provider cannot be timed: not installed, or no GPU."""
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        raise Unavailable(f"{package} is not installed ({exc})") from None
    missing = [n for n in names if not hasattr(mod, n)]
    if missing:
        raise Unavailable(f"this {package} has no {module}.{missing[0]} (another version?)")
    if device != "cuda":
        raise Unavailable(f"needs a CUDA GPU ({package} is {kind})")
    objs = [getattr(mod, n) for n in names]
    return objs[0] if len(objs) == 1 else objs


def by_mode(mode: str, fwd: float, bwd: float) -> float:
    """A per-mode quantity (bytes, FLOPs) from its forward and backward parts."""
    if mode not in ("fwd", "bwd", "fwd+bwd"):
        raise ValueError(f"unknown mode {mode!r}; expected fwd, bwd or fwd+bwd")
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


def autograd_step(f: Callable, inputs: Sequence[Any], mode: str, grads: Sequence[torch.Tensor],
                  leaves: Sequence[torch.Tensor]) -> Callable:
    """The measured function of a differentiable op, for a suite's ``setup``.

    ``fwd``: ``f(*inputs)``; ``bwd``: the backward alone of one forward recorded here
    (``retain_graph``); ``fwd+bwd``: both. ``grads`` are the upstream gradients, one per
    output of ``f``; ``leaves`` get their ``.grad`` reset between timed calls.
    """
    if mode == "fwd":
        def fn():
            return f(*inputs)
        return fn

    def outputs():
        out = f(*inputs)
        return out if isinstance(out, tuple) else (out,)

    if mode == "bwd":
        recorded = outputs()
        if len(recorded) != len(grads):
            raise RuntimeError(f"the op returned {len(recorded)} outputs, expected {len(grads)}")

        def fn():
            torch.autograd.backward(recorded, list(grads), retain_graph=True)
    elif mode == "fwd+bwd":
        def fn():
            torch.autograd.backward(outputs(), list(grads))
    else:
        raise ValueError(f"unknown mode {mode!r}; expected fwd, bwd or fwd+bwd")
    fn.grad_to_none = list(leaves)
    return fn


def host_ms(fn: Callable, reps: int = 10) -> float:
    """Median host time of one call (ms), the GPU idle before each: the CPU cost of issuing the
    work (Python, dispatch, launches), which is what large sharded models wait on."""
    times = []
    for _ in range(reps):
        _reset_grads(fn)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    torch.cuda.synchronize()
    return sorted(times)[len(times) // 2]


def peak_memory_bytes(fn: Callable, device: str) -> int | None:
    """Peak CUDA memory of one call of ``fn`` above what is allocated before it (None on CPU)."""
    if device != "cuda":
        return None
    _reset_grads(fn)
    gc.collect()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return int(max(peak, 0))


def measure_copy_bandwidth(device: str) -> float:
    """GB/s of ``dst.copy_(src)`` on a large buffer (1 GiB on CUDA, 64 MiB on CPU): 2*bytes/time."""
    nbytes = (1 << 30) if device == "cuda" else (64 << 20)

    def timed() -> float:
        src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
        dst = torch.empty_like(src)
        return bench_fn(lambda: dst.copy_(src), device)[0]

    ms = timed()
    _free(device)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def measure_matmul_tflops(device: str, n: int = 8192) -> float | None:
    """TFLOP/s of a bf16 ``n x n x n`` matmul on CUDA (None elsewhere)."""
    if device != "cuda":
        return None

    def timed() -> float:
        a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        return bench_fn(lambda: a @ b, device)[0]

    ms = timed()
    _free(device)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def _free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- environment


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(torch.cuda.current_device())
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    model = model or platform.processor() or platform.machine()
    return f"CPU: {model} ({torch.get_num_threads()} threads)"


def device_slug(device: str) -> str:
    """Folder name under results/: the GPU name in lower-case-with-dashes, or ``cpu``."""
    if device != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-") or "cuda"


def default_out_dir(device: str) -> str:
    """``./fastgen-bench/<device>/`` under the current directory."""
    return os.path.join(os.getcwd(), DEFAULT_OUT, device_slug(device))


def git_commit(path: str = PACKAGE_DIR) -> str | None:
    """``git rev-parse HEAD`` of the repository holding ``path``, or None."""
    try:
        res = subprocess.run(["git", "rev-parse", "HEAD"], cwd=path, capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    out = res.stdout.strip()
    return out if res.returncode == 0 and re.fullmatch(r"[0-9a-f]{40}", out) else None


def git_dirty(path: str = PACKAGE_DIR) -> bool | None:
    """Whether the repository holding ``path`` has uncommitted changes to tracked files, or None."""
    try:
        res = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=path,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return bool(res.stdout.strip()) if res.returncode == 0 else None


def _version(mod: str) -> str | None:
    try:
        return importlib.import_module(mod).__version__
    except Exception:
        return None


def header(device: str, ops: Sequence[str], quick: bool, copy_gbps: float | None,
           matmul_tflops: float | None) -> dict[str, Any]:
    try:
        import fastgen

        fastgen_version = getattr(fastgen, "__version__", None)
    except Exception:
        fastgen_version = None
    return {
        "device": device,
        "device_name": device_name(device),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "git_dirty": git_dirty(),
        "fastgen": fastgen_version,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _version("triton"),
        "ops": list(ops),
        "quick": quick,
        "copy_gbps": copy_gbps,
        "matmul_bf16_tflops": matmul_tflops,
    }


# ----------------------------------------------------------------------------- running


def _progress(total: int, enabled: bool):
    """A tqdm bar on stderr, or plain lines on stderr when tqdm is missing."""
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, file=sys.stderr, unit="row", dynamic_ncols=True, leave=False)


def _short_error(exc: BaseException) -> str:
    msg = " ".join(str(exc).split())
    if len(msg) > 300:
        msg = msg[:297] + "..."
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


def run_case(suite, provider: str, case: Case, mode: str, device: str) -> dict[str, Any]:
    """Measure one row; never raises (an exception becomes the row's status)."""
    row: dict[str, Any] = {
        "op": suite.OP, "provider": provider, "mode": mode, "shape": dict(case.shape),
        "shape_str": case.shape_str, "variant": case.variant, "dtype": case.dtype_str,
        "status": STATUS_OK, "ms": None, "ms_p20": None, "ms_p80": None,
        "bytes": None, "gbps": None, "pct_copy_bw": None, "flops": None, "tflops": None,
        "peak_mem_bytes": None, "mem_note": None, "host_ms": None,
        "speedup_vs_torch": None, "speedup_vs_compile": None,
    }
    try:
        row["bytes"] = int(suite.bytes_moved(case, mode))
    except Exception as exc:  # a broken formula must not hide the timing
        row["bytes"] = None
        row["mem_note"] = f"bytes formula failed: {_short_error(exc)}"
    if hasattr(suite, "flops"):
        try:
            row["flops"] = int(suite.flops(case, mode))
        except Exception as exc:
            row["mem_note"] = row["mem_note"] or f"flops formula failed: {_short_error(exc)}"
    fn = None
    try:
        fn = suite.setup(provider, case, mode, device)
        _reset_grads(fn)
        fn()  # first call: compiles / autotunes, and surfaces errors early
        _sync(device)
        if device == "cuda":
            row["peak_mem_bytes"] = peak_memory_bytes(fn, device)
        else:
            row["mem_note"] = row["mem_note"] or "peak memory is measured on CUDA only"
        ms, p20, p80 = bench_fn(fn, device)
        row.update(ms=ms, ms_p20=p20, ms_p80=p80)
        if device == "cuda":
            row["host_ms"] = host_ms(fn)
        if row["bytes"] and ms > 0:
            row["gbps"] = row["bytes"] / (ms * 1e-3) / 1e9
        if row["flops"] and ms > 0:
            row["tflops"] = row["flops"] / (ms * 1e-3) / 1e12
    except Unavailable as exc:
        row["status"] = f"skipped: {exc}"
    except Exception as exc:
        row["status"] = f"error: {_short_error(exc)}"
        row["traceback"] = traceback.format_exc(limit=8)
    finally:
        del fn
        _free(device)
    return row


def _add_speedups(rows: list[dict[str, Any]], copy_gbps: float | None) -> None:
    def key(r):
        return (r["op"], r["mode"], r["shape_str"], r["variant"], r["dtype"])

    base: dict[tuple, dict[str, float]] = {}
    for r in rows:
        if r["status"] == STATUS_OK and r["provider"] in ("torch", "torch.compile"):
            base.setdefault(key(r), {})[r["provider"]] = r["ms"]
    for r in rows:
        if r["status"] != STATUS_OK:
            continue
        b = base.get(key(r), {})
        if b.get("torch"):
            r["speedup_vs_torch"] = b["torch"] / r["ms"]
        if b.get("torch.compile"):
            r["speedup_vs_compile"] = b["torch.compile"] / r["ms"]
        if copy_gbps and r["gbps"] is not None:
            r["pct_copy_bw"] = 100.0 * r["gbps"] / copy_gbps


def flag_rows(rows: list[dict[str, Any]], copy_gbps: float | None, spread_limit: float) -> int:
    """Set ``row["flags"]`` (a list of short reasons, empty when clean) on every row; returns
    how many were flagged. A flagged row stays in the table and the JSON, not in the plots."""
    n = 0
    for r in rows:
        flags = []
        p20, p80 = r.get("ms_p20"), r.get("ms_p80")
        if r["status"] == STATUS_OK and p20 and p80 and p80 / p20 > spread_limit:
            flags.append(f"noisy: p80/p20 {p80 / p20:.1f} > {spread_limit:g}")
        if r["status"] == STATUS_OK and copy_gbps and r.get("gbps") is not None and r["gbps"] > copy_gbps:
            flags.append(f"GB/s above the measured copy ({100.0 * r['gbps'] / copy_gbps:.0f}%)")
        r["flags"] = flags
        n += bool(flags)
    return n


def _plan(suites, device: str, quick: bool, only_providers, only_modes) -> list[tuple]:
    """Every (suite, provider, case, mode) to run, in order, after the provider / mode filters."""
    return [(suite, provider, case, mode)
            for suite in suites for case in suite.cases(device, quick)
            for mode in suite.MODES if not only_modes or mode in only_modes
            for provider in suite.PROVIDERS if not only_providers or provider in only_providers]


def _run_plan(plan: list[tuple], device: str, progress: bool, stream) -> list[dict[str, Any]]:
    """Run each planned case with a progress bar (or numbered lines without tqdm); Ctrl-C (the
    time limit of gpu_suite.sh sends SIGINT) stops early and keeps the rows measured so far."""
    bar = _progress(len(plan), progress)
    rows = []
    try:
        for i, (suite, provider, case, mode) in enumerate(plan):
            label = f"{suite.OP} {mode} {case.shape_str}{'+' + case.variant if case.variant else ''} {case.dtype_str} {provider}"
            if bar is not None:
                bar.set_description(label, refresh=False)
            elif progress:
                print(f"[{i + 1}/{len(plan)}] {label}", file=sys.stderr, flush=True)
            rows.append(run_case(suite, provider, case, mode, device))
            if bar is not None:
                bar.update(1)
    except KeyboardInterrupt:
        print(f"interrupted: reporting the {len(rows)} of {len(plan)} rows measured", file=stream)
    if bar is not None:
        bar.close()
    return rows


def _print_summary(rows: list[dict[str, Any]], flagged: int, limit: float, stream) -> None:
    """The table, the row counts by status, and the flagged-row line."""
    print(format_table(rows), file=stream)
    counts = {k: sum(1 for r in rows if r["status"].split(":")[0] == k) for k in ("ok", "skipped", "error")}
    print(f"{len(rows)} rows: {counts['ok']} ok, {counts['skipped']} skipped, {counts['error']} errors",
          file=stream)
    if flagged:
        print(f"{flagged} rows flagged (p80/p20 spread above {limit:g}, or GB/s above the measured copy): "
              f"see the flags column; they are left out of the plots", file=stream)


def run(
    ops: Iterable[str] | None = None,
    *,
    device: str | None = None,
    quick: bool = False,
    out: str | None = None,
    providers: Iterable[str] | None = None,
    modes: Iterable[str] | None = None,
    suites: Sequence[Any] | None = None,
    progress: bool = True,
    stream=None,
    spread_limit: float | None = None,
) -> dict[str, Any]:
    """Run the suites of ``ops`` (default: all) on ``device`` and write the reports.

    ``suites`` may pass suite modules (or objects with the same attributes)
    directly instead of names. ``providers`` / ``modes`` restrict what runs.
    ``out``: the folder for the reports (default :func:`default_out_dir`).
    ``spread_limit``: the p80 / p20 ratio above which a row is flagged (default ``SPREAD_LIMIT``).
    Returns ``{"header": ..., "rows": [...], "files": [...]}``.
    """
    stream = stream if stream is not None else sys.stdout
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cuda", "cpu"):
        raise ValueError(f"device must be 'cuda' or 'cpu', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for, but torch sees no CUDA GPU here")
    if suites is None:
        suites = [load_suite(op) for op in (list(ops) if ops else default_ops())]
    only_providers = set(providers) if providers else None
    only_modes = set(modes) if modes else None

    print(f"fastgen bench on {device_name(device)}", file=stream)
    if device == "cpu":
        gpu_only = sorted({p for s in suites for p in getattr(s, "GPU_ONLY", ())})
        print("note: this is a CPU-only run; the GPU figures "
              f"({', '.join(gpu_only) or 'GPU providers'}) need a GPU, so those rows are skipped",
              file=stream)

    copy_gbps = measure_copy_bandwidth(device)
    matmul_tflops = measure_matmul_tflops(device)
    peaks = f"copy {copy_gbps:.1f} GB/s"
    if matmul_tflops is not None:
        peaks += f", bf16 matmul {matmul_tflops:.1f} TFLOP/s"
    print(f"measured peaks: {peaks}", file=stream)

    plan = _plan(suites, device, quick, only_providers, only_modes)
    rows = _run_plan(plan, device, progress, stream)
    _add_speedups(rows, copy_gbps)
    limit = SPREAD_LIMIT[device] if spread_limit is None else float(spread_limit)
    flagged = flag_rows(rows, copy_gbps, limit)
    result = {"header": header(device, [s.OP for s in suites], quick, copy_gbps, matmul_tflops),
              "rows": rows}
    result["header"]["spread_limit"] = limit
    _print_summary(rows, flagged, limit, stream)
    out = out or default_out_dir(device)
    result["files"] = write_reports(result, out, suites, stream=stream)
    return result


# ----------------------------------------------------------------------------- reports

_COLUMNS = [
    ("op", "op"), ("mode", "mode"), ("shape", "shape"), ("dtype", "dtype"),
    ("provider", "provider"), ("ms", "ms"), ("p20-p80", "spread"), ("GB/s", "gbps"),
    ("%copy", "pct"), ("TFLOP/s", "tflops"), ("peak MiB", "mem"), ("host ms", "host"), ("x eager", "xe"),
    ("x compile", "xc"), ("flags", "flags"),
    ("status", "status"),
]


def _cells(r: dict[str, Any]) -> list[str]:
    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    shape = r["shape_str"] + (f" +{r['variant']}" if r["variant"] else "")
    spread = "-" if r["ms_p20"] is None else f"{r['ms_p20']:.4g}-{r['ms_p80']:.4g}"
    mem = None if r["peak_mem_bytes"] is None else r["peak_mem_bytes"] / 2**20
    return [r["op"], r["mode"], shape, r["dtype"], r["provider"],
            "-" if r["ms"] is None else f"{r['ms']:.4g}", spread, f(r["gbps"], ".1f"),
            f(r["pct_copy_bw"], ".0f"), f(r.get("tflops"), ".1f"), f(mem, ".1f"), f(r.get("host_ms"), ".3g"),
            f(r["speedup_vs_torch"], ".2f"),
            f(r["speedup_vs_compile"], ".2f"), "; ".join(r.get("flags") or []) or "-", r["status"]]


def format_table(rows: list[dict[str, Any]]) -> str:
    """Plain aligned text: one line per row (numbers right-aligned)."""
    heads = [h for h, _ in _COLUMNS]
    body = [_cells(r) for r in rows]
    widths = [max([len(h)] + [len(b[i]) for b in body]) for i, h in enumerate(heads)]
    numeric = {5, 6, 7, 8, 9, 10, 11, 12, 13}

    def line(cells):
        parts = []
        for i, c in enumerate(cells):
            last = i == len(cells) - 1
            parts.append(c if last else (c.rjust(widths[i]) if i in numeric else c.ljust(widths[i])))
        return "  ".join(parts)

    out = [line(heads), "  ".join("-" * w for w in widths)]
    out += [line(b) for b in body]
    return "\n".join(out)


def format_markdown(result: dict[str, Any]) -> str:
    h = result["header"]
    lines = [f"# fastgen benchmarks: {', '.join(h['ops'])}", ""]
    facts = [
        ("device", h["device_name"]), ("date (UTC)", h["date"]),
        ("git commit", (h["git_commit"] or "unknown")
         + (" (with uncommitted changes)" if h.get("git_dirty") else "")),
        ("fastgen", h["fastgen"]),
        ("python", h["python"]), ("torch", h["torch"]), ("torch CUDA", h["torch_cuda"]),
        ("triton", h["triton"]), ("quick", h["quick"]),
        ("copy bandwidth (measured)", None if h["copy_gbps"] is None else f"{h['copy_gbps']:.1f} GB/s"),
        ("bf16 matmul 8192^3 (measured)",
         None if h["matmul_bf16_tflops"] is None else f"{h['matmul_bf16_tflops']:.1f} TFLOP/s"),
    ]
    lines += [f"- **{k}**: {'-' if v is None else v}" for k, v in facts]
    lines += ["", "GB/s counts each tensor read once and written once (see each bench file's "
              "`bytes_moved`); %copy is GB/s over the copy bandwidth above; TFLOP/s (compute-bound "
              "ops) comes from the bench file's `flops` formula; peak MiB is one "
              "call's peak CUDA memory above its inputs; host ms is the CPU time of issuing one call "
              "(CUDA only); x eager / x compile are speedups over "
              "torch eager / torch.compile on the same case. flags: a p80/p20 spread above "
              f"{h.get('spread_limit', '-')} or GB/s above the measured copy; flagged rows are left out "
              "of the plots.", ""]
    heads = [h for h, _ in _COLUMNS]
    lines.append("| " + " | ".join(heads) + " |")
    lines.append("|" + "|".join("---:" if i in {5, 6, 7, 8, 9, 10, 11, 12, 13} else "---"
                                for i in range(len(heads))) + "|")
    for r in result["rows"]:
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in _cells(r)) + " |")
    return "\n".join(lines) + "\n"


def plottable(r: dict[str, Any]) -> bool:
    """A plain-variant ok row with a GB/s figure and no flags."""
    return not r["variant"] and r["status"] == STATUS_OK and r["gbps"] is not None and not r.get("flags")


def plot(result: dict[str, Any], suite, path: str) -> str | None:
    """GB/s vs ``suite.PLOT_X`` per provider, one subplot per mode, for the suite's first
    dtype and the plain variant. Returns None on success, or why no plot was written."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return "matplotlib is not installed; no plot written"
    rows = [r for r in result["rows"] if r["op"] == suite.OP]
    if not rows:
        return "no rows"
    dtype = rows[0]["dtype"]
    xkey = getattr(suite, "PLOT_X", None)
    modes = [m for m in suite.MODES if any(r["mode"] == m for r in rows)]
    fig = Figure(figsize=(5.0 * max(len(modes), 1), 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, max(len(modes), 1), squeeze=False)[0]
    copy = result["header"].get("copy_gbps")
    for ax, mode in zip(axes, modes):
        for provider in suite.PROVIDERS:
            pts = sorted(
                (r["shape"].get(xkey, 0) if xkey else i, r["gbps"])
                for i, r in enumerate(rows)
                if r["mode"] == mode and r["provider"] == provider and r["dtype"] == dtype
                and plottable(r)
            )
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=provider)
        if copy:
            ax.axhline(copy, color="gray", linestyle="--", linewidth=1, label="copy (measured)")
        ax.set_title(f"{suite.OP} {mode} ({dtype})")
        ax.set_xlabel(xkey or "case")
        if xkey:
            ax.set_xscale("log", base=2)
        ax.set_ylabel("GB/s")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(result["header"]["device_name"], fontsize=9)
    fig.savefig(path, dpi=110)
    return None


def write_reports(result: dict[str, Any], out: str, suites: Sequence[Any], *, stream=None) -> list[str]:
    """Write results.json, results.md and one <op>.png per suite into ``out``."""
    stream = stream if stream is not None else sys.stdout
    os.makedirs(out, exist_ok=True)
    files = []
    path = os.path.join(out, "results.json")
    with open(path, "w") as f:
        json.dump({"header": result["header"], "rows": result["rows"]}, f, indent=1)
        f.write("\n")
    files.append(path)
    path = os.path.join(out, "results.md")
    with open(path, "w") as f:
        f.write(format_markdown(result))
    files.append(path)
    for suite in suites:
        path = os.path.join(out, f"{suite.OP}.png")
        why = plot(result, suite, path)
        if why is None:
            files.append(path)
        else:
            print(f"{suite.OP}: {why}", file=stream)
    print("wrote " + ", ".join(files), file=stream)
    return files
