"""The zoo runner's configuration: a TOML file with a top-level ``[zoo]`` table, validated.

``fastgen train configs/zoo/gan.toml`` sends a config with a ``[zoo]`` table to the zoo runner
(``fastgen.zoo.train``); the layout::

    output_dir = "runs/zoo/gan"      checkpoints/, log.csv, measures.json
    [zoo]         model = "gan"      one of MODELS (below)
    [zoo.config]  g_channels = ...   fields of the model's config dataclass (GANConfig, ...)
    [data]        the generated dataset (fastgen.zoo.data), train and held-out splits
    [optim]       fastgen.optim fused optimizers, one per group of model.optimizer_params()
    [train]       steps, batch size, seed, device, log rows, progress bar
    [checkpoint]  every K steps, retention (fastgen.train.checkpoint's atomic folders)
    [measure]     the model's own measure (model.measure) at step 0 and at the last step

Every key but ``zoo.model`` is optional, with the default documented beside it (the model
config's defaults are its dataclass's, except the two noted in MODELS); ``ZooConfig.to_toml()``
writes the resolved config with each key's documentation as a comment (``--print-config``). An
unknown key, a wrong type or a value out of range is a ``ConfigError`` that names the key.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import re
from dataclasses import dataclass, field

from fastgen.train.config import (ConfigError, adam_betas, check_type, doc_field as _f, from_sections, non_negative,
                                  one_of, positive, read_toml, reject_unknown, toml_value, unit_interval, write_toml)

# name -> (module, model class, config class, datasets it trains on (the first is the default))
MODELS = {
    "gan": ("fastgen.zoo.gan", "GAN", "GANConfig", ("shapes",)),
    "cgan": ("fastgen.zoo.cgan", "ConditionalGAN", "ConditionalGANConfig", ("shapes",)),
    "cyclegan": ("fastgen.zoo.cyclegan", "CycleGAN", "CycleGANConfig", ("colour_swap",)),
    "wgangp": ("fastgen.zoo.wgangp", "WGANGP", "WGANGPConfig", ("shapes",)),
    "vae": ("fastgen.zoo.vae", "VAE", "VAEConfig", ("shapes",)),
    "beta_vae": ("fastgen.zoo.vae", "BetaVAE", "VAEConfig", ("shapes",)),           # beta defaults to 4
    "vqvae": ("fastgen.zoo.vqvae", "VQVAE", "VQVAEConfig", ("shapes",)),
    "realnvp": ("fastgen.zoo.realnvp", "RealNVP", "RealNVPConfig", ("two_moons", "gaussian_mixture", "shapes")),
    "score_sde": ("fastgen.zoo.score_sde", "ScoreSDE", "ScoreSDEConfig", ("gaussian_mixture", "two_moons")),
    "consistency": ("fastgen.zoo.consistency", "ConsistencyModel", "ConsistencyModelConfig",
                    ("shapes",)),                                          # total_steps defaults to train.steps
}
DATASETS = ("shapes", "colour_swap", "two_moons", "gaussian_mixture")


@dataclass
class ZooSection:
    model: str = _f("", "the zoo model: " + " | ".join(MODELS) + " (required)")
    config: dict = _f({}, "fields of the model's config dataclass (e.g. GANConfig); the rest keep its defaults")


@dataclass
class DataSection:
    name: str = _f("auto", "'auto' (the model's dataset) | 'shapes' (16x16 RGB shapes, 9 labelled classes) | "
                           "'colour_swap' (red shapes vs green shapes, CycleGAN) | 'two_moons' | 'gaussian_mixture' "
                           "(2-D, 8-mode ring)")
    size: int = _f(2048, "training examples generated (per domain for colour_swap)")
    seed: int = _f(1, "seed of the training split")
    test_size: int = _f(512, "held-out examples generated (per domain) for the measure")
    test_seed: int = _f(2, "seed of the held-out split")
    noise: float = _f(0.05, "two_moons: std of the Gaussian noise on the moons")


@dataclass
class OptimSection:
    name: str = _f("adamw", "'adamw' (fastgen.optim.FusedAdamW) or 'lion' (fastgen.optim.FusedLion, no eps)")
    lr: float = _f(1e-3, "learning rate of every optimizer")
    d_lr: float = _f(0.0, "learning rate of the discriminator / critic optimizer ('d') of the GANs; 0 = lr")
    betas: list = _f([0.5, 0.999], "betas (beta1, beta2); (0.5, 0.999) is the DCGAN setting")
    eps: float = _f(1e-8, "adamw epsilon")
    weight_decay: float = _f(0.0, "decoupled weight decay")
    ema_decay: float = _f(0.0, "EMA of the weights (fastgen.optim.EMA, with warm-up), used by the measure; 0 = none")


@dataclass
class TrainSection:
    steps: int = _f(300, "training steps (one train_step each: for the GANs one D and one G update)")
    batch_size: int = _f(64, "examples per batch (per critic step for wgangp)")
    seed: int = _f(0, "seed of the model init (torch.manual_seed) and of the batch and noise generator")
    device: str = _f("cpu", "'cpu' or 'cuda' (the batch and noise generator lives there)")
    threads: int = _f(0, "torch intra-op threads; 0 = leave torch's default (1 is fastest for these tiny "
                         "models on a small shared CPU)")
    log_every: int = _f(10, "steps per row of log.csv (the mean of the window's losses)")
    progress: bool = _f(True, "tqdm progress bar on stderr (none when tqdm is not installed)")


@dataclass
class CheckpointSection:
    every: int = _f(100, "steps between checkpoints (the last step always gets one); 0 = only the last")
    keep_last: int = _f(2, "keep the newest N checkpoints (at least 1)")
    keep_every: int = _f(0, "also keep every checkpoint whose step is a multiple of K; 0 = none")


@dataclass
class MeasureSection:
    at_start: bool = _f(True, "also measure the untrained model at step 0")
    samples: int = _f(256, "samples the measure draws (for the models that sample)")
    sampling_steps: int = _f(200, "score_sde: predictor-corrector steps of the measure's sampler")
    seed: int = _f(5, "seed of the measure's noise (the training generator is untouched)")


SECTIONS = {"zoo": ZooSection, "data": DataSection, "optim": OptimSection, "train": TrainSection,
            "checkpoint": CheckpointSection, "measure": MeasureSection}


@dataclass
class ZooConfig:
    output_dir: str = _f("runs/zoo", "folder for checkpoints/, log.csv and measures.json")
    zoo: ZooSection = field(default_factory=ZooSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    measure: MeasureSection = field(default_factory=MeasureSection)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_dict(cls, d: dict) -> "ZooConfig":
        return from_sections(cls, d, SECTIONS)

    @classmethod
    def from_toml(cls, path: str) -> "ZooConfig":
        return read_toml(path, cls.from_dict)

    # ------------------------------------------------------------------ the model
    def model_class(self):
        module, name, _, _ = MODELS[self.zoo.model]
        return getattr(importlib.import_module(module), name)

    def config_class(self):
        module, _, name, _ = MODELS[self.zoo.model]
        return getattr(importlib.import_module(module), name)

    def model_config(self):
        """The model's config dataclass from ``zoo.config`` over its defaults (ConfigError if invalid)."""
        cls, kw = self.config_class(), dict(self.zoo.config)
        if self.zoo.model == "beta_vae":
            kw.setdefault("beta", self.model_class().default_beta)
        if self.zoo.model == "consistency":
            kw.setdefault("total_steps", self.train.steps)
        try:
            return cls(**kw)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"zoo.config ({cls.__name__}): {exc}") from None

    def dataset(self) -> str:
        return MODELS[self.zoo.model][3][0] if self.data.name == "auto" else self.data.name

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        z, da, op, t, c, m = self.zoo, self.data, self.optim, self.train, self.checkpoint, self.measure
        if not z.model:
            raise ConfigError("zoo.model is required: one of " + ", ".join(map(repr, MODELS)))
        one_of("zoo.model", z.model, tuple(MODELS))
        cls = self.config_class()
        fields = {f.name: f for f in dataclasses.fields(cls)}
        reject_unknown("zoo.config.", z.config, list(fields), f" ({cls.__name__} fields: {', '.join(fields)})")
        defaults = cls()
        z.config = {k: check_type(f"zoo.config.{k}", v, getattr(defaults, k)) for k, v in z.config.items()}
        mc = self.model_config()
        one_of("data.name", da.name, ("auto",) + MODELS[z.model][3], f"zoo.model = {z.model!r}")
        _check_data_fits(z.model, self.dataset(), mc)
        positive(data_size=da.size, data_test_size=da.test_size, optim_lr=op.lr, train_steps=t.steps,
                 train_batch_size=t.batch_size, train_log_every=t.log_every, checkpoint_keep_last=c.keep_last,
                 measure_samples=m.samples, measure_sampling_steps=m.sampling_steps)
        non_negative(data_noise=da.noise, optim_d_lr=op.d_lr, optim_eps=op.eps, optim_weight_decay=op.weight_decay,
                     train_threads=t.threads, checkpoint_every=c.every, checkpoint_keep_every=c.keep_every)
        one_of("optim.name", op.name, ("adamw", "lion"))
        adam_betas(optim_betas=op.betas)
        unit_interval(optim_ema_decay=op.ema_decay)
        one_of("train.device", t.device, ("cpu", "cuda"))

    # ------------------------------------------------------------------ writing
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        mc = dataclasses.asdict(self.model_config())
        d["zoo"]["config"] = {k: list(v) if isinstance(v, tuple) else v for k, v in mc.items()}
        return d

    def to_toml(self, comments: bool = True) -> str:
        """The resolved config as TOML: every key (the model config's too) with its documentation."""
        d = self.to_dict()
        model_config, notes = d["zoo"].pop("config"), _field_comments(self.config_class())

        def config_table(name: str) -> list:
            if name != "zoo":
                return []
            lines = [f"\n[zoo.config]" + (f"  # {self.config_class().__name__}" if comments else "")]
            for k, v in model_config.items():
                if comments and notes.get(k):
                    lines.append(f"# {notes[k]}")
                lines.append(f"{k} = {toml_value(v)}")
            return lines

        return write_toml(self, d, SECTIONS, comments, config_table)


# --------------------------------------------------------------------------- helpers

def _check_data_fits(model: str, dataset: str, mc) -> None:
    """The generated data must have the shape the model's config expects."""
    if dataset in ("shapes", "colour_swap"):
        if model == "realnvp":
            if len(mc.data_shape) != 3 or mc.data_shape[0] != 3 or mc.data_shape[1] != mc.data_shape[2]:
                raise ConfigError(f"zoo.config.data_shape must be [3, S, S] for data.name = 'shapes', "
                                  f"got {list(mc.data_shape)}")
        elif mc.in_channels != 3:
            raise ConfigError(f"zoo.config.in_channels must be 3: the {dataset} data is RGB, got {mc.in_channels}")
        if model == "cgan" and mc.num_classes != 9:
            raise ConfigError(f"zoo.config.num_classes must be 9 (the shapes classes), got {mc.num_classes}")
        if model == "consistency" and mc.num_classes not in (0, 9):
            raise ConfigError(f"zoo.config.num_classes must be 0 (unconditional) or 9 (the shapes classes), "
                              f"got {mc.num_classes}")
    else:  # 2-D points
        dim = mc.dim if model == "score_sde" else (mc.data_shape[0] if len(mc.data_shape) == 1 else None)
        key = "dim" if model == "score_sde" else "data_shape"
        if dim != 2:
            raise ConfigError(f"zoo.config.{key} must be {'2' if key == 'dim' else '[2]'} for data.name = "
                              f"{dataset!r} (2-D points)")


def _field_comments(cls) -> dict:
    """The ``# comment`` beside each field in the config dataclass's source (its documentation)."""
    notes: dict = {}
    for klass in reversed(cls.__mro__[:-1]):
        try:
            src = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        for m in re.finditer(r"^\s+(\w+):[^#\n]*#\s*(.+)$", src, re.M):
            notes[m.group(1)] = m.group(2).strip()
    return notes
