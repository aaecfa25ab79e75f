"""The trainer's configuration: dataclasses loaded from TOML, validated, every default documented.

A config file has one table per section below (``[model]``, ``[objective]``, ``[data]``,
``[optim]``, ``[train]``, ``[checkpoint]``, ``[validation]``) plus top-level ``output_dir``.
Every key is optional; an unknown key is an error that names it (and the closest known key).
``Config.from_toml(path)`` loads, ``config.to_toml()`` writes the resolved config with each
field's documentation as a comment (what ``fastgen train CONFIG --print-config`` prints).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import tomllib
from dataclasses import dataclass, field
from typing import Any, Callable, Union


class ConfigError(ValueError):
    """A config that cannot run: an unknown key, a wrong type or a value out of range."""


def doc_field(default, doc: str):
    """A dataclass field with its documentation (written as a comment by :func:`write_toml`)."""
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata={"doc": doc})
    return field(default=default, metadata={"doc": doc})


_f = doc_field


@dataclass
class ModelConfig:
    factory: Union[str, Callable] = _f("fastgen.models:DiT", "what builds the model: 'module:callable' (a class "
                                       "or function), called with `kwargs`; in Python also a callable")
    kwargs: dict = _f({}, "keyword arguments of the factory (e.g. sample_size, patch_size, num_layers)")
    weights: str = _f("", "optional safetensors file loaded into the model before training (strict)")
    compile: bool = _f(False, "torch.compile the model")
    text_inputs: dict = _f({"embeds": "encoder_hidden_states"}, "text-conditional: the model keyword of each "
                           "text-encoder output, e.g. {prompt_embeds = 'encoder_hidden_states', pooled = "
                           "'pooled_projections'}; the model is called as model(x, timestep=t, **text)")
    gradient_checkpointing: bool = _f(False, "recompute blocks in the backward pass (models with "
                                             "enable_gradient_checkpointing(), e.g. fastgen.models)")


@dataclass
class ObjectiveConfig:
    kind: str = _f("flow", "'flow' (flow matching / rectified flow, velocity target), 'denoising' (DDPM family), "
                           "'consistency' (improved consistency training, pseudo-Huber), "
                           "'consistency_distillation' (CD from a frozen teacher, EMA target network) or 'lcm' "
                           "(latent consistency distillation of a guided DDPM teacher)")
    prediction: str = _f("epsilon", "denoising: 'epsilon', 'v_prediction' or 'sample'")
    beta_schedule: str = _f("linear", "denoising: 'linear', 'scaled_linear' or 'squaredcos_cap_v2'")
    num_train_timesteps: int = _f(1000, "denoising: number of discrete steps T; flow: the model timestep is T * sigma")
    beta_start: float = _f(1e-4, "denoising: first beta")
    beta_end: float = _f(0.02, "denoising: last beta")
    loss_weighting: str = _f("none", "denoising: none | snr | min_snr_gamma | debiased; "
                                     "flow: none | sigma_sqrt | cosmap")
    snr_gamma: float = _f(5.0, "denoising: gamma of min_snr_gamma")
    timestep_sampling: str = _f("uniform", "flow: uniform | logit_normal | mode | sigmoid | shifted")
    logit_mean: float = _f(0.0, "flow: mean of logit_normal")
    logit_std: float = _f(1.0, "flow: std of logit_normal")
    mode_scale: float = _f(1.29, "flow: scale of mode")
    sigmoid_scale: float = _f(1.0, "flow: scale of sigmoid")
    shift: float = _f(1.0, "flow: time shift s (sigma = s u / (1 + (s - 1) u)); 1 = none")
    resolution_shift: bool = _f(False, "flow: Flux's shift from the image token count (overrides shift)")
    ct_s0: int = _f(10, "consistency: initial number of discretization steps s0 (doubles over training)")
    ct_s1: int = _f(1280, "consistency: final number of discretization steps s1")
    ct_sigma_max: float = _f(80.0, "consistency, consistency_distillation: largest noise level (smallest: "
                                   "0.002); CD needs it <= the largest sigma of a denoising teacher")
    ct_sigma_data: float = _f(0.5, "consistency, consistency_distillation: data standard deviation of the "
                                   "boundary scalings")
    teacher: str = _f("", "consistency_distillation, lcm (required): the frozen teacher: a fastgen.train "
                          "checkpoint folder (step-N, or an output_dir / its checkpoints/: the newest good one; "
                          "architecture and objective from its config.toml), a .safetensors file (loaded into "
                          "model.factory built with model.kwargs + teacher_kwargs), a from_pretrained folder of "
                          "model.factory (config.json + safetensors), or a preset name of model.factory "
                          "(random weights: smoke tests only)")
    teacher_kind: str = _f("auto", "what a file / folder / preset teacher predicts: 'flow' (velocity) or "
                                   "'denoising' (DDPM, with prediction, beta_schedule, num_train_timesteps, "
                                   "beta_start, beta_end); 'auto' = flow for consistency_distillation, denoising "
                                   "for lcm (which takes only that); a checkpoint-folder teacher brings its own")
    teacher_factory: Union[str, Callable] = _f("", "what builds a file / preset / from_pretrained teacher when "
                                                   "its architecture is not the student's, e.g. an LCM student "
                                                   "with a w input distilled from a model without one: "
                                                   "'module:callable' (in Python also a callable), called with "
                                                   "teacher_kwargs alone; '' = model.factory with model.kwargs "
                                                   "+ teacher_kwargs")
    teacher_kwargs: dict = _f({}, "model.kwargs overrides for building a file / preset teacher (e.g. a "
                                  "wider net than the student); with teacher_factory, its only kwargs")
    teacher_use_ema: bool = _f(True, "a checkpoint-folder teacher: its EMA weights when it has them")
    teacher_solver: str = _f("auto", "the teacher's ODE step: consistency_distillation 'euler' | 'heun' "
                                     "(auto = heun); lcm 'ddim' (auto = ddim, skipping-step)")
    init_from_teacher: bool = _f(False, "start the student from the teacher's weights (same architecture; "
                                        "student layers the teacher lacks, e.g. a w-embedding, keep their "
                                        "init); CD then keeps the teacher's parametrization inside the "
                                        "boundary scalings (see fastgen.train.consistency)")
    target_decay: float = _f(0.95, "consistency_distillation, lcm: EMA decay mu of the target network "
                                   "theta^- <- mu theta^- + (1 - mu) theta after every optimizer step "
                                   "(separate from optim.ema_decay)")
    distill_loss: str = _f("huber", "consistency_distillation: 'huber' (pseudo-Huber, c = 0.00054 sqrt(dim)) "
                                    "or 'l2'; lcm: 'huber' (elementwise, c = 0.001) or 'l2'")
    cd_num_scales: int = _f(18, "consistency_distillation: N, the points of the fixed Karras grid")
    lcm_num_ddim_timesteps: int = _f(50, "lcm: N solver steps of the skipping-step DDIM (k = T / N)")
    lcm_w_min: float = _f(2.0, "lcm: smallest guidance scale w (teacher guidance (1 + w) c - w u)")
    lcm_w_max: float = _f(14.0, "lcm: largest guidance scale w, w ~ U[lcm_w_min, lcm_w_max]")
    lcm_embedding_dim: int = _f(256, "lcm: size of the w-embedding the student gets")
    lcm_guidance_kwarg: str = _f("timestep_cond", "lcm: the student's keyword for the w-embedding (B, "
                                                  "lcm_embedding_dim), the sinusoid of 1000 w as diffusers' LCM "
                                                  "timestep_cond, given in training and validation sampling "
                                                  "(its forward must take it: checked at start); '' = none (a "
                                                  "student without a w input, e.g. fastgen.models.DiT: set "
                                                  "lcm_w_min = lcm_w_max)")
    cond_dropout: float = _f(0.0, "probability of replacing a class label by the null class (classifier-free "
                                  "guidance), e.g. 0.1 for a model that does not drop labels itself "
                                  "(fastgen.models.DiT does: its class_dropout_prob)")


@dataclass
class DataConfig:
    path: str = _f("", "image folder: one subfolder per class (sorted names = class ids), or images directly "
                       "(one class); captions in <image>.txt next to each image")
    resolution: int = _f(16, "side of the square training size; buckets keep about this area")
    channels: int = _f(3, "image channels the model sees (3 = RGB, 1 = grayscale)")
    bucketing: bool = _f(False, "aspect-ratio buckets of about resolution^2 pixels; every batch from one bucket")
    bucket_step: int = _f(8, "bucket sides are multiples of this")
    max_aspect: float = _f(2.0, "largest bucket aspect ratio (long side / short side)")
    captions: str = _f("optional", "'optional', 'required' (a missing caption is bad data) or 'ignore'")
    on_bad: str = _f("error", "bad data (unreadable image, missing required caption, image smaller than its "
                              "bucket): 'error' refuses to start and lists the files, 'skip' reports and skips them")
    num_workers: int = _f(0, "DataLoader worker processes")
    vae: str = _f("", "latent training: 'module:callable' returning the image encoder (a fastgen or diffusers "
                      "AutoencoderKL, e.g. a function that loads pretrained weights, or any callable images -> "
                      "latents), called with vae_kwargs; its latents are cached in cache_dir; '' = pixels")
    vae_kwargs: dict = _f({}, "keyword arguments of the vae callable")
    text_encoder: str = _f("", "text-conditional training: 'module:callable' returning a text encoder, a callable "
                               "list[str] -> tensor (B, L, D) or a dict of tensors; each caption's outputs are "
                               "cached in cache_dir, dropped to the outputs for '' with objective.cond_dropout")
    text_encoder_kwargs: dict = _f({}, "keyword arguments of the text_encoder callable")
    cache_dir: str = _f("", "folder of the latent / text-embedding caches, shared by runs (entries are keyed by "
                            "content and encoder); '' = <output_dir>/cache")


@dataclass
class OptimConfig:
    lr: float = _f(1e-4, "peak learning rate of FusedAdamW")
    betas: list = _f([0.9, 0.999], "Adam betas (beta1, beta2)")
    eps: float = _f(1e-8, "Adam epsilon")
    weight_decay: float = _f(0.0, "decoupled weight decay")
    grad_clip: float = _f(1.0, "max gradient norm (fastgen.optim.clip_grad_norm_); 0 = no clipping")
    lr_scheduler: str = _f("constant", "diffusers get_scheduler name: constant | constant_with_warmup | linear | "
                                       "cosine (others when diffusers is installed)")
    warmup_steps: int = _f(0, "learning-rate warm-up steps")
    ema_decay: float = _f(0.999, "EMA decay (fastgen.optim.EMA, with warm-up); 0 = no EMA")


@dataclass
class TrainConfig:
    steps: int = _f(1000, "optimizer steps to train for")
    batch_size: int = _f(16, "samples per micro-batch per process")
    grad_accum: int = _f(1, "micro-batches per optimizer step")
    seed: int = _f(0, "seed of the model init, the data order and the noise (each rank adds its rank)")
    precision: str = _f("fp32", "'fp32', 'bf16' (autocast of the forward pass; weights stay fp32) or 'bf16-pure' "
                                "(bf16 weights, fp32 Adam moments, stochastic rounding in FusedAdamW, fp32 EMA)")
    device: str = _f("auto", "'auto' (cuda when available), 'cpu' or 'cuda'")
    parallel: str = _f("ddp", "more than one process: 'ddp' (replicated weights, gradient all-reduce) or 'fsdp' "
                              "(FSDP2 fully_shard: weights, gradients and optimizer state sharded; sharded DCP "
                              "checkpoints that load into any number of processes)")
    dist_timeout: float = _f(600.0, "seconds a collective waits before failing, so a dead or stalled process "
                                    "fails the others with a clear message instead of a hang")
    log_every: int = _f(10, "steps between rows of log.csv")
    progress: bool = _f(True, "tqdm progress bar on stderr (rank 0)")


@dataclass
class CheckpointConfig:
    every: int = _f(500, "steps between checkpoints (the last step always gets one); 0 = only the last")
    keep_last: int = _f(3, "keep the newest N checkpoints (at least 1)")
    keep_every: int = _f(0, "also keep every checkpoint whose step is a multiple of K; 0 = none")


@dataclass
class ValidationConfig:
    every: int = _f(0, "steps between validation sample grids (samples/step-N.png); 0 = none")
    per_class: int = _f(4, "samples per class in a grid (one row per class, at most 16 classes)")
    sampler: str = _f("auto", "'auto' (diffusers FlowMatchEuler / DDIM when installed, else the built-in "
                              "Euler / DDIM), 'builtin', or a diffusers scheduler class name")
    num_steps: int = _f(20, "sampling steps")
    guidance_scale: float = _f(1.0, "classifier-free guidance scale; 1 = none")
    use_ema: bool = _f(True, "sample with the EMA weights when there are some")
    seed: int = _f(0, "seed of the sampling noise (the training RNG is untouched)")


DISTILL_KINDS = ("consistency_distillation", "lcm")  # objectives with a frozen teacher and a target network

SECTIONS = {"model": ModelConfig, "objective": ObjectiveConfig, "data": DataConfig, "optim": OptimConfig,
            "train": TrainConfig, "checkpoint": CheckpointConfig, "validation": ValidationConfig}


@dataclass
class Config:
    output_dir: str = _f("runs/train", "folder for checkpoints/, log.csv, loss.png and samples/")
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        return from_sections(cls, d, SECTIONS)

    @classmethod
    def from_toml(cls, path: str) -> "Config":
        return read_toml(path, cls.from_dict)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for section, key in (("model", "factory"), ("objective", "teacher_factory")):
            f = getattr(getattr(self, section), key)
            if callable(f):
                d[section][key] = f"{f.__module__}:{f.__qualname__}"
        return d

    def to_toml(self, comments: bool = True) -> str:
        """The resolved config as TOML (with each field's documentation as a comment)."""
        return write_toml(self, self.to_dict(), SECTIONS, comments)

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        o, da, op, t, c, v = self.objective, self.data, self.optim, self.train, self.checkpoint, self.validation
        one_of("objective.kind", o.kind, ("flow", "denoising", "consistency", *DISTILL_KINDS))
        if o.kind in DISTILL_KINDS:
            self._validate_distillation()
        elif o.kind == "flow":
            one_of("objective.loss_weighting", o.loss_weighting, ("none", "sigma_sqrt", "cosmap"), "flow")
            one_of("objective.timestep_sampling", o.timestep_sampling,
                   ("uniform", "logit_normal", "mode", "sigmoid", "shifted"))
            if o.timestep_sampling == "shifted" and o.shift == 1.0 and not o.resolution_shift:
                raise ConfigError("objective.timestep_sampling = 'shifted' needs objective.shift != 1 "
                                  "or objective.resolution_shift = true")
        elif o.kind == "consistency":
            one_of("objective.loss_weighting", o.loss_weighting, ("none",), "consistency (its weight is "
                   "1 / (sigma_{i+1} - sigma_i))")
            if not 1 <= o.ct_s0 <= o.ct_s1:
                raise ConfigError(f"objective.ct_s0 and ct_s1 need 1 <= ct_s0 <= ct_s1, got {o.ct_s0}, {o.ct_s1}")
            positive(objective_ct_sigma_max=o.ct_sigma_max, objective_ct_sigma_data=o.ct_sigma_data)
        else:
            one_of("objective.loss_weighting", o.loss_weighting, ("none", "snr", "min_snr_gamma", "debiased"),
                   "denoising")
            one_of("objective.prediction", o.prediction, ("epsilon", "v_prediction", "sample"))
            one_of("objective.beta_schedule", o.beta_schedule, ("linear", "scaled_linear", "squaredcos_cap_v2"))
        positive(objective_num_train_timesteps=o.num_train_timesteps, objective_logit_std=o.logit_std,
                 objective_shift=o.shift, objective_snr_gamma=o.snr_gamma, objective_sigmoid_scale=o.sigmoid_scale,
                 data_resolution=da.resolution, data_channels=da.channels, data_bucket_step=da.bucket_step,
                 optim_lr=op.lr, train_steps=t.steps, train_batch_size=t.batch_size, train_grad_accum=t.grad_accum,
                 train_log_every=t.log_every, checkpoint_keep_last=c.keep_last,
                 validation_num_steps=v.num_steps, validation_per_class=v.per_class)
        unit_interval(objective_cond_dropout=o.cond_dropout, optim_ema_decay=op.ema_decay)
        one_of("data.captions", da.captions, ("optional", "required", "ignore"))
        one_of("data.on_bad", da.on_bad, ("error", "skip"))
        if da.max_aspect < 1.0:
            raise ConfigError(f"data.max_aspect must be >= 1, got {da.max_aspect}")
        if da.resolution % da.bucket_step:
            raise ConfigError(f"data.resolution ({da.resolution}) must be a multiple of data.bucket_step "
                              f"({da.bucket_step})")
        adam_betas(optim_betas=op.betas)
        non_negative(optim_weight_decay=op.weight_decay, optim_grad_clip=op.grad_clip,
                     optim_warmup_steps=op.warmup_steps, data_num_workers=da.num_workers, checkpoint_every=c.every,
                     checkpoint_keep_every=c.keep_every, validation_every=v.every, optim_eps=op.eps)
        one_of("train.precision", t.precision, ("fp32", "bf16", "bf16-pure"))
        one_of("train.device", t.device, ("auto", "cpu", "cuda"))
        one_of("train.parallel", t.parallel, ("ddp", "fsdp"))
        positive(train_dist_timeout=t.dist_timeout)
        if da.text_encoder and ":" not in da.text_encoder:
            raise ConfigError(f"data.text_encoder must look like 'module:callable', got {da.text_encoder!r}")
        if da.vae and ":" not in da.vae:
            raise ConfigError(f"data.vae must look like 'module:callable', got {da.vae!r}")
        if isinstance(self.model.factory, str) and ":" not in self.model.factory:
            raise ConfigError(f"model.factory must look like 'module:callable', got {self.model.factory!r}")


    def _validate_distillation(self) -> None:
        o, kind = self.objective, self.objective.kind
        if not o.teacher:
            raise ConfigError(f"objective.teacher is required for objective.kind = {kind!r} (a fastgen.train "
                              "checkpoint folder, a .safetensors file, a from_pretrained folder or a preset name "
                              "of model.factory)")
        if isinstance(o.teacher_factory, str) and o.teacher_factory and ":" not in o.teacher_factory:
            raise ConfigError(f"objective.teacher_factory must look like 'module:callable', got "
                              f"{o.teacher_factory!r}")
        one_of("objective.loss_weighting", o.loss_weighting, ("none",), kind)
        one_of("objective.distill_loss", o.distill_loss, ("huber", "l2"))
        unit_interval(objective_target_decay=o.target_decay)
        one_of("objective.teacher_kind", o.teacher_kind,
               ("auto", "flow", "denoising") if kind != "lcm" else ("auto", "denoising"), kind)
        if teacher_kind(o) == "denoising":
            one_of("objective.beta_schedule", o.beta_schedule, ("linear", "scaled_linear", "squaredcos_cap_v2"))
            one_of("objective.prediction", o.prediction,
                   ("epsilon", "v_prediction", "sample") if kind != "lcm" else ("epsilon", "v_prediction"), kind)
        if kind == "consistency_distillation":
            one_of("objective.teacher_solver", o.teacher_solver, ("auto", "euler", "heun"), kind)
            if o.cd_num_scales < 2:
                raise ConfigError(f"objective.cd_num_scales must be >= 2, got {o.cd_num_scales}")
            positive(objective_ct_sigma_max=o.ct_sigma_max, objective_ct_sigma_data=o.ct_sigma_data)
            if o.ct_sigma_max <= 0.002:
                raise ConfigError(f"objective.ct_sigma_max must be > 0.002 (sigma_min), got {o.ct_sigma_max}")
        else:
            one_of("objective.teacher_solver", o.teacher_solver, ("auto", "ddim"), kind)
            if not 1 <= o.lcm_num_ddim_timesteps <= o.num_train_timesteps:
                raise ConfigError(f"objective.lcm_num_ddim_timesteps must be in 1..num_train_timesteps "
                                  f"({o.num_train_timesteps}), got {o.lcm_num_ddim_timesteps}")
            if not 0.0 <= o.lcm_w_min <= o.lcm_w_max:
                raise ConfigError(f"objective.lcm_w_min and lcm_w_max need 0 <= lcm_w_min <= lcm_w_max, got "
                                  f"{o.lcm_w_min}, {o.lcm_w_max}")
            positive(objective_lcm_embedding_dim=o.lcm_embedding_dim)
        if self.train.parallel == "fsdp":
            raise ConfigError(f"train.parallel = 'fsdp' is not supported with objective.kind = {kind!r} (the "
                              "target network is a full copy); use 'ddp'")


def teacher_kind(o: ObjectiveConfig) -> str:
    """``objective.teacher_kind`` with 'auto' resolved: 'denoising' for lcm, else 'flow'."""
    if o.teacher_kind != "auto":
        return o.teacher_kind
    return "denoising" if o.kind == "lcm" else "flow"


# --------------------------------------------------------------------------- shared with fastgen.zoo.train_config

def from_sections(cls, d: dict, sections: dict):
    """``cls`` (a dataclass of ``output_dir`` and one field per table of ``sections``) from a parsed TOML
    dict: every key checked (unknown keys and wrong types are ConfigErrors), then ``validate()``."""
    reject_unknown("", d, ["output_dir", *sections])
    kw: dict[str, Any] = {}
    if "output_dir" in d:
        kw["output_dir"] = check_type("output_dir", d["output_dir"], "")
    for name, section in sections.items():
        sub = d.get(name, {})
        if not isinstance(sub, dict):
            raise ConfigError(f"[{name}] must be a table, got {type(sub).__name__}")
        reject_unknown(name + ".", sub, [f.name for f in dataclasses.fields(section)])
        defaults = section()
        kw[name] = section(**{k: check_type(f"{name}.{k}", v, getattr(defaults, k)) for k, v in sub.items()})
    cfg = cls(**kw)
    cfg.validate()
    return cfg


def read_toml(path: str, from_dict):
    """``from_dict`` of the TOML file ``path``; a syntax error or a ConfigError names the file."""
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    try:
        return from_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def write_toml(config, d: dict, sections: dict, comments: bool, more=None) -> str:
    """``d`` (``config.to_dict()``: ``output_dir`` and the tables of ``sections``) as TOML, each field's
    documentation as a comment; a field missing from ``d`` is left out; ``more(name)``: lines written
    after table ``name``."""
    lines = [f"# {dataclasses.fields(config)[0].metadata['doc']}"] if comments else []  # output_dir's
    lines.append(f"output_dir = {toml_value(d['output_dir'])}")
    for name, section in sections.items():
        lines.append(f"\n[{name}]")
        for f in dataclasses.fields(section):
            if f.name in d[name]:
                if comments:
                    lines.append(f"# {f.metadata['doc']}")
                lines.append(f"{f.name} = {toml_value(d[name][f.name])}")
        lines += more(name) if more else []
    return "\n".join(lines) + "\n"


def reject_unknown(prefix: str, d: dict, known: list, known_note: str = "") -> None:
    """A ConfigError for the first key of ``d`` not in ``known``: it names the closest known key, else
    ``known_note`` or the known keys."""
    for key in d:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = known_note or f" (known: {', '.join(known)})"
            if close:
                hint = f" (did you mean '{prefix}{close[0]}'?)"
            raise ConfigError(f"unknown key '{prefix}{key}'{hint}")


def check_type(name: str, value, default):
    """``value`` checked against the type of the field's default (ints are accepted as floats, lists and
    tuples for either)."""
    if callable(value) and not isinstance(value, (str, dict, list)) and name in ("model.factory",
                                                                                 "objective.teacher_factory"):
        return value
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, (list, tuple)):
        ok = isinstance(value, (list, tuple))
        value = type(default)(value) if ok else value
    else:
        ok = isinstance(value, type(default))
    if not ok:
        want = "list" if isinstance(default, (list, tuple)) else type(default).__name__
        raise ConfigError(f"{name} must be {want}, got {type(value).__name__} ({value!r})")
    return value


def one_of(name: str, value, allowed, when: str = "") -> None:
    if value not in allowed:
        extra = f" for {when}" if when else ""
        raise ConfigError(f"{name} must be one of {', '.join(map(repr, allowed))}{extra}, got {value!r}")


def _check(values: dict, ok, what: str) -> None:
    for key, value in values.items():
        if not ok(value):
            section, name = key.split("_", 1)
            raise ConfigError(f"{section}.{name} must be {what}, got {value}")


def positive(**values) -> None:
    """``section_name=value`` pairs that must be > 0 (the error names ``section.name``)."""
    _check(values, lambda v: v > 0, "> 0")


def non_negative(**values) -> None:
    """``section_name=value`` pairs that must be >= 0."""
    _check(values, lambda v: v >= 0, ">= 0")


def unit_interval(**values) -> None:
    """``section_name=value`` pairs that must be in [0, 1) (dropout rates, EMA decays)."""
    _check(values, lambda v: 0.0 <= v < 1.0, "in [0, 1)")


def adam_betas(**values) -> None:
    """``section_name=betas`` pairs that must be two numbers in [0, 1)."""
    _check(values, lambda v: len(v) == 2 and all(isinstance(b, (int, float)) and 0.0 <= b < 1.0 for b in v),
           "two numbers in [0, 1)")


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))} = {toml_value(x)}" for k, x in v.items()) + "}"
    raise ConfigError(f"cannot write {type(v).__name__} to TOML")
