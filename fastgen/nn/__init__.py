"""Drop-in ``nn.Module`` layers, state-dict compatible with the modules they replace."""

from fastgen.nn.rms_norm import RMSNorm
from fastgen.nn.layer_norm import LayerNorm
from fastgen.nn.ada_norm import AdaLayerNormContinuous, AdaLayerNormZero
from fastgen.nn.group_norm import GroupNorm

__all__ = ["RMSNorm"]
__all__ += ["LayerNorm", "AdaLayerNormZero", "AdaLayerNormContinuous"]
__all__ += ["GroupNorm"]
