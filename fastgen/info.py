"""What this fastgen installation can run here: ``fastgen info`` prints :func:`collect`."""

from __future__ import annotations

import importlib
import platform
from typing import Any

import torch


def _triton() -> dict[str, Any]:
    try:
        triton = importlib.import_module("triton")
    except Exception as exc:
        return {"version": None, "error": f"{type(exc).__name__}: {exc}"}
    return {"version": getattr(triton, "__version__", None), "error": None}


def _gpus() -> list[dict[str, Any]]:
    gpus = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        gpus.append({
            "index": i,
            "name": props.name,
            "capability": f"{props.major}.{props.minor}",
            "memory_gib": round(props.total_memory / 2**30, 1),
            "sm_count": props.multi_processor_count,
        })
    return gpus


def _extension() -> dict[str, Any]:
    try:
        from fastgen.cuda import extension_info

        info = dict(extension_info())
    except Exception as exc:
        return {"built": False, "error": f"fastgen.cuda.extension_info() failed: "
                                         f"{type(exc).__name__}: {exc}"}
    info.setdefault("built", False)
    info.setdefault("error", None)
    return info


def _auto_choices() -> dict[str, dict[str, str]]:
    from fastgen import backend

    out = {}
    for op in sorted(backend.AUTO_ON_CUDA):
        row = {}
        for dev in ("cuda", "cpu"):
            try:
                row[dev] = backend.resolve(op, "auto", torch.device(dev))
            except Exception as exc:
                row[dev] = f"error: {type(exc).__name__}: {exc}"
        out[op] = row
    return out


def _implementations() -> dict[str, list[str]]:
    """{op: implementations registered for it, the torch reference included}: the registry."""
    from fastgen import backend

    return {op: list(backend.implementations(op)) for op in sorted(backend.REGISTRY)}


def _tuning(gpus: list[dict[str, Any]]) -> dict[str, Any]:
    """Whether the Triton kernels tune their launch configs here, and whether the attention
    kernels may read through TMA descriptors (a Hopper-class GPU, ``FASTGEN_TMA`` not 0)."""
    import os

    try:
        from fastgen.kernels import autotune

        tune = autotune.enabled()
    except Exception as exc:  # Triton does not import
        tune = f"error: {type(exc).__name__}: {exc}"
    hopper = any(float(g["capability"]) >= 9 for g in gpus)
    return {"autotune": tune, "tma": hopper and os.environ.get("FASTGEN_TMA", "1") != "0"}


def collect() -> dict[str, Any]:
    """Versions, devices, the CUDA extension and the backend choices, as a JSON-able dict.

    Keys: ``fastgen``, ``python``, ``platform``, ``torch``, ``torch_cuda``,
    ``triton`` ({version, error}), ``cuda_available``, ``gpus`` (list of {index,
    name, capability, memory_gib, sm_count}), ``extension`` (``fastgen._C``:
    built, error, and when built archs / ptx / cuda_version), ``triton_interpret``,
    ``default_backend``, ``fastgen_backend_env``, ``auto`` ({op: {cuda: impl,
    cpu: impl}}: what ``backend="auto"`` runs for CUDA / CPU tensors here), ``implementations``
    ({op: [impl, ...]}: the registry of ``fastgen.backend``), ``tuning``
    ({autotune: bool, tma: bool}: launch-config tuning on, TMA attention tiles possible).
    """
    import os

    import fastgen
    from fastgen import backend

    try:
        default = backend.default()
    except Exception as exc:
        default = f"error: {exc}"
    gpus = _gpus() if torch.cuda.is_available() else []
    return {
        "fastgen": getattr(fastgen, "__version__", None),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _triton(),
        "cuda_available": torch.cuda.is_available(),
        "gpus": gpus,
        "extension": _extension(),
        "triton_interpret": backend.interpreter_enabled(),
        "default_backend": default,
        "fastgen_backend_env": os.environ.get("FASTGEN_BACKEND"),
        "auto": _auto_choices(),
        "implementations": _implementations(),
        "tuning": _tuning(gpus),
    }


def _cuda_version(v) -> str:
    """CUDART_VERSION style 13000 -> "13.0"; anything else as given."""
    try:
        n = int(v)
    except (TypeError, ValueError):
        return str(v)
    return f"{n // 1000}.{(n % 1000) // 10}" if n >= 1000 else str(v)


def format_text(info: dict[str, Any]) -> str:
    """The human-readable form of :func:`collect`'s dict."""
    lines = [
        f"fastgen         {info['fastgen']}",
        f"python          {info['python']} ({info['platform']})",
        f"torch           {info['torch']} (CUDA {info['torch_cuda'] or 'none: CPU build'})",
    ]
    tri = info["triton"]
    lines.append(f"triton          {tri['version'] or 'not importable: ' + str(tri['error'])}")
    if info["cuda_available"]:
        lines.append(f"CUDA available  yes, {len(info['gpus'])} GPU(s)")
        for g in info["gpus"]:
            lines.append(f"  cuda:{g['index']}        {g['name']}, sm_{g['capability'].replace('.', '')}"
                         f" (capability {g['capability']}), {g['memory_gib']} GiB, {g['sm_count']} SMs")
    else:
        lines.append("CUDA available  no")
    ext = info["extension"]
    if ext.get("built"):
        archs = ext.get("archs")
        if isinstance(archs, (list, tuple)):
            archs = " ".join(f"sm_{a}" for a in archs)
        detail = f"{archs}"
        if ext.get("ptx"):
            detail += f" + PTX compute_{ext.get('ptx')}"
        if ext.get("cuda_version"):
            detail += f", CUDA {_cuda_version(ext.get('cuda_version'))}"
        if ext.get("compiled_with"):
            detail += f"; {ext.get('compiled_with')}"
        lines.append(f"fastgen._C      built ({detail})")
    else:
        lines.append(f"fastgen._C      not built: {ext.get('error')}")
    lines.append(f"TRITON_INTERPRET {'on (Triton kernels run in the CPU interpreter)' if info['triton_interpret'] else 'off'}")
    tun = info.get("tuning", {})
    lines.append(f"autotune        {'on' if tun.get('autotune') is True else 'off'} (FASTGEN_AUTOTUNE; never under "
                 f"the interpreter), TMA attention tiles {'possible' if tun.get('tma') else 'off (needs sm_90+, FASTGEN_TMA not 0)'}")
    env = info["fastgen_backend_env"]
    lines.append(f"default backend {info['default_backend']}"
                 + (f" (FASTGEN_BACKEND={env})" if env else ""))
    lines.append("auto picks      (op: on CUDA tensors / on CPU tensors)")
    width = max((len(op) for op in info["auto"]), default=0)
    for op, row in info["auto"].items():
        lines.append(f"  {op:<{width}}  {row['cuda']} / {row['cpu']}")
    lines.append("implementations (op: registered in fastgen.backend)")
    width = max((len(op) for op in info.get("implementations", {})), default=0)
    for op, names in info.get("implementations", {}).items():
        lines.append(f"  {op:<{width}}  {', '.join(names)}")
    return "\n".join(lines)
