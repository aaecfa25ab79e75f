"""Drop-in ``nn.Module`` layers, state-dict compatible with the modules they replace."""

from fastgen.nn.rms_norm import RMSNorm

__all__ = ["RMSNorm"]
