"""The CUDA C++ backend: launchers around the compiled extension ``fastgen._C``.

``fastgen._C`` (built from ``csrc/`` by ``setup.py`` when nvcc is found) takes
raw device pointers, sizes, strides, dtype codes and the CUDA stream as
integers and does not depend on torch. The modules here (``fastgen.cuda.rms_norm``,
...) turn tensors into those arguments.

- :func:`load_extension` returns the module or raises ``RuntimeError`` saying
  why it is unavailable and what to do.
- :func:`extension_info` describes the build without raising.
"""

from __future__ import annotations

import functools
import os
from typing import Any

__all__ = ["DTYPE_CODES", "dtype_code", "extension_info", "load_extension", "named_strides", "named_tables"]

# dtype codes understood by fastgen._C (see csrc/common/dtype.cuh).
DTYPE_CODES = {"float32": 0, "float16": 1, "bfloat16": 2}


def dtype_code(dtype) -> int:
    """fastgen._C dtype code of a torch dtype (float32 -> 0, float16 -> 1, bfloat16 -> 2)."""
    name = str(dtype).removeprefix("torch.")
    try:
        return DTYPE_CODES[name]
    except KeyError:
        raise ValueError(
            f"the CUDA C++ backend supports float32, float16 and bfloat16, got {dtype}"
        ) from None


def named_strides(**strides: tuple[int, int, int]) -> dict[str, int]:
    """Parameter-struct fields of (batch, seq, head) strides: ``named_strides(sq=(1, 2, 3))`` is
    ``{"sqb": 1, "sqs": 2, "sqh": 3}``."""
    return {f"{prefix}{axis}": int(v) for prefix, st in strides.items() for axis, v in zip("bsh", st, strict=True)}


def named_tables(cos: tuple[int, int], sin: tuple[int, int]) -> dict[str, int]:
    """Parameter-struct fields of the (batch, seq) strides of the cos and sin tables."""
    return {"scb": int(cos[0]), "scs": int(cos[1]), "ssb": int(sin[0]), "sss": int(sin[1])}


def _skip_requested() -> bool:
    return os.environ.get("FASTGEN_SKIP_CUDA_BUILD", "0").strip().lower() in ("1", "true", "yes", "on")


@functools.lru_cache(maxsize=None)
def _load() -> tuple[Any, str | None]:
    try:
        from fastgen import _C  # type: ignore[attr-defined]
    except ModuleNotFoundError as exc:
        if exc.name not in ("fastgen._C", "_C"):
            return None, f"fastgen._C failed to import: {type(exc).__name__}: {exc}"
        why = (
            "FASTGEN_SKIP_CUDA_BUILD=1 is set"
            if _skip_requested()
            else "nvcc was not found when fastgen was installed (or FASTGEN_SKIP_CUDA_BUILD=1)"
        )
        return None, (
            f"fastgen._C is not built: {why}. Reinstall with nvcc on PATH (or CUDA_HOME set) and "
            "FASTGEN_SKIP_CUDA_BUILD unset: pip install --no-build-isolation -e ."
        )
    except ImportError as exc:  # built but unloadable (ABI, missing library, ...)
        return None, (
            f"fastgen._C is built but failed to import: {exc}. Rebuild it: "
            "pip install --no-build-isolation --force-reinstall --no-deps -e ."
        )
    return _C, None


def load_extension():
    """The compiled ``fastgen._C`` module (cached); ``RuntimeError`` saying why and what to do if unavailable."""
    module, error = _load()
    if module is None:
        raise RuntimeError(error)
    return module


def extension_info() -> dict[str, Any]:
    """``{"built": bool, "error": str | None}`` plus ``fastgen._C.build_info()`` (archs, ptx,
    cuda_version, nvcc_version, compiled_with) when built."""
    module, error = _load()
    info: dict[str, Any] = {"built": module is not None, "error": error}
    if module is not None:
        info.update(module.build_info())
    return info


# The ops this backend implements, registered beside their launchers (fastgen.cuda.<op>);
# the ops not listed here get "this op has no CUDA C++ implementation" from the registry.
from fastgen.backend import implements  # noqa: E402
from fastgen.limits import group_norm_reason, kernel_dtype_reason, rope_reason  # noqa: E402

implements("rms_norm", "cuda", "fastgen.cuda.rms_norm", serves=kernel_dtype_reason)
implements("group_norm", "cuda", "fastgen.cuda.group_norm", serves=group_norm_reason)
implements("apply_rope", "cuda", "fastgen.cuda.rope", serves=rope_reason)
implements("qk_norm_rope", "cuda", "fastgen.cuda.qk_norm_rope", serves=rope_reason)
# The optimizers' steps with CUDA C++ functors (AdamW, 8-bit AdamW and Lion fold the one-pass clip and EMA).
for _op in ("adamw", "lion", "ema", "clip_grad_norm_", "adamw8bit", "prodigy", "schedulefree"):
    implements(_op, "cuda", "fastgen.cuda.optim")
