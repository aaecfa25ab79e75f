"""fastgen.train: a diffusion and flow trainer on fastgen's fused optimizer, clipping and EMA.

    from fastgen.train import Config, Trainer
    Trainer(Config.from_toml("configs/train/dit_shapes.toml")).fit()

Parts (each usable alone): ``objectives`` (denoising and flow-matching losses, timestep
sampling, weightings, condition dropout), ``consistency`` (improved consistency training and
consistency distillation; ``ModelDenoiser`` turns a flow or DDPM teacher into the denoiser it
needs), ``lcm`` (LCM distillation of a guided latent teacher); both distillations are selected
by ``[objective] kind`` in the config,
``config`` (the TOML config), ``data`` (image folder, buckets, resumable sharded order),
``checkpoint`` (atomic, verified checkpoints), ``sampling`` (validation samples), ``cache``
(latent and text-embedding caches), ``text`` (text-conditional training), ``distributed``
(FSDP2, sharded DCP checkpoints, failing fast on a dead rank), ``progress`` (log.csv rows and the
progress bar, shared with the zoo runner), ``loop`` (the Trainer).
See docs/train.md.
"""

from fastgen.train.config import Config, ConfigError
from fastgen.train.consistency import (ConsistencyDistillationObjective, ConsistencyTrainingObjective,
                                       ModelDenoiser)
from fastgen.train.lcm import LCMDistillationObjective
from fastgen.train.objectives import DenoisingObjective, FlowMatchingObjective, drop_conditions

__all__ = ["Config", "ConfigError", "ConsistencyDistillationObjective", "ConsistencyTrainingObjective",
           "DenoisingObjective", "FlowMatchingObjective", "LCMDistillationObjective", "ModelDenoiser", "Trainer",
           "drop_conditions"]


def __getattr__(name: str):
    if name == "Trainer":  # imported on first use: the loop pulls in the optimizers and tqdm
        from fastgen.train.loop import Trainer

        return Trainer
    raise AttributeError(f"module 'fastgen.train' has no attribute {name!r}")
