"""Functional ops. Each lives in its own module, ``fastgen/ops/<op>.py``."""

from fastgen.ops.rms_norm import rms_norm, rms_norm_ref

__all__ = ["rms_norm", "rms_norm_ref"]
