"""``fastgen.patch``: fastgen's fused ops in existing diffusers and PyTorch models, in place.

::

    import fastgen.patch
    report = fastgen.patch(model)          # or a diffusers pipeline; returns a PatchReport
    print(report)                          # every replacement, fused child and module left alone
    fastgen.patch.is_patched(model)        # True: any module in it runs fastgen code
    fastgen.patch.unpatch(model)           # the original classes and processors back
    fastgen.patch(pipe, models=True)       # pipe.transformer / unet / vae -> fastgen.models / fastgen.vae
    fastgen.patch(pipe, adapters="x.safetensors")  # an adapter file, unmerged, on the fused LoRA kernel

The package is callable (``fastgen.patch(model)`` is :func:`patch`) while
``fastgen.patch.PatchReport`` etc. stay reachable. Importing it does not import diffusers;
the diffusers rules load on the first ``patch`` call. See ``docs/patch.md``.
"""

import sys
import types

from fastgen.patch.core import Fused, PatchError, PatchReport, Replacement, Skipped, is_patched, patch, unpatch
from fastgen.patch.sdpa import sdpa
from fastgen.patch.serve import PatchFallbackWarning


def known_processors() -> list:
    """Names of the diffusers attention processor classes ``fastgen.patch`` replaces."""
    from fastgen.patch.attention import known_processors as names  # imports diffusers: only when asked

    return names()

__all__ = ["patch", "unpatch", "PatchReport", "Replacement", "Skipped", "Fused", "PatchError",
           "PatchFallbackWarning", "is_patched", "known_processors", "sdpa"]


class _CallableModule(types.ModuleType):
    """Lets ``fastgen.patch(model)`` call :func:`patch` while ``fastgen.patch`` stays this package."""

    def __call__(self, obj, *args, **kwargs):
        return patch(obj, *args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
