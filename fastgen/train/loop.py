"""``Trainer(config).fit()``: the training loop on fastgen's fused optimizer, clipping and EMA.

One optimizer step (``train.grad_accum = A`` micro-batches of ``train.batch_size`` per rank)::

    for a in 1..A:   batch <- next bucket batch;  y <- drop_conditions(labels, p, null)
                     loss_a = objective.loss(model, x, y)      (bf16 autocast if asked)
                     (loss_a / A).backward()                   (DDP: gradient all-reduce on the last)
    clip_grad_norm_(params, optim.grad_clip);  FusedAdamW.step();  lr_scheduler.step();  EMA.update()
    distillation (objective.kind consistency_distillation / lcm): update_target(target, model, mu)

Distillation: the frozen teacher (``objective.teacher``, see :func:`build_teacher`) is built once,
moved to the student's device and dtype (bf16 for ``bf16-pure``; under ``bf16`` its forwards run in
the same autocast), put in eval mode without gradients; the student may start from its weights
(``objective.init_from_teacher``); a file / preset teacher of another architecture than the student
(e.g. an LCM student with a w input) is built by ``objective.teacher_factory``. An LCM student gets the
w-embedding under ``objective.lcm_guidance_kwarg`` in training and validation sampling (its forward
is checked for that keyword at start). Text-conditional distillation (``data.text_encoder`` or
in-memory text) passes the (dropped) caption embeddings as the condition to the student, the target
network and the teacher (:func:`fastgen.train.text.text_cond_model`); LCM guides the teacher against
the null (empty-prompt) embedding and validates on :meth:`Trainer.validation_prompts` at its w.
The target network starts as a copy of the student, is updated
after every optimizer step (``theta^- <- mu theta^- + (1 - mu) theta``, ``mu = objective.target_decay``)
and is checkpointed (``target.safetensors``), so resume stays exact.

Randomness: the model is initialised from ``train.seed`` (the same on every rank); training noise,
timesteps and label dropout then come from the global generators seeded with ``seed + rank``.
Checkpoints store those generator states and the number of batches consumed, so a resumed run
draws exactly what the uninterrupted run would have (bit-identical weights on the same machine).
Validation sampling uses its own generator and never touches them.

Outputs under ``output_dir``: ``checkpoints/`` (see :mod:`fastgen.train.checkpoint`),
``log.csv`` (step, loss, lr, grad_norm, seconds), ``loss.png`` (at every checkpoint),
``samples/step-N.png`` (validation grids, one row per class). Rank 0 writes them.
Multi-process: launch with ``torchrun``; the process group is created from its environment
(gloo on CPU, NCCL on CUDA, ``train.dist_timeout`` seconds so a dead rank fails the others).
``train.parallel = "fsdp"`` shards the model with FSDP2 and checkpoints through DCP
(see :mod:`fastgen.train.distributed`).
"""

from __future__ import annotations

import contextlib
import copy
import csv
import dataclasses
import importlib
import math
import os
import random
import time
from typing import Optional

import torch

from fastgen.optim import EMA, FusedAdamW, clip_grad_norm_
from fastgen.train import checkpoint as ckpt
from fastgen.train.config import DISTILL_KINDS, Config, ConfigError, teacher_kind
from fastgen.train.consistency import (ConsistencyDistillationObjective, ConsistencyTrainingObjective, ModelDenoiser,
                                       update_target)
from fastgen.train.data import BucketBatchSampler, build_dataset
from fastgen.train.lcm import LCMDistillationObjective, accepts_keyword
from fastgen.train.distributed import (clip_sharded_grad_norm_, collective_failure, init_distributed, load_dcp,
                                       save_dcp, shard_model)
from fastgen.train.objectives import DenoisingObjective, FlowMatchingObjective, drop_conditions, make_betas
from fastgen.train.progress import append_row, progress_bar, truncate_rows
from fastgen.train.sampling import sample, save_grid
from fastgen.train.text import PromptTable, drop_text, like_x, null_batch, text_cond_model

BUILTIN_SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine")


# --------------------------------------------------------------------------- builders

def resolve_factory(factory, name: str = "model.factory"):
    """``'module:attr.path'`` -> the object (callables pass through); ``name``: the config key, for errors."""
    if callable(factory):
        return factory
    module, _, attr = factory.partition(":")
    try:
        obj = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"{name} {factory!r} cannot be imported: {exc}") from None
    return obj


def build_model(mc, keys: tuple = ("model.factory", "model.kwargs")) -> torch.nn.Module:
    """The model a :class:`ModelConfig` describes. A class with a ``config_class`` (fastgen.models)
    gets ``config_class(**kwargs)``, or its ``preset(kwargs["preset"])`` with the other kwargs on top.
    ``keys``: the config keys the errors name for the factory and its kwargs."""
    obj = resolve_factory(mc.factory, keys[0])
    kwargs = dict(mc.kwargs)
    config_class = getattr(obj, "config_class", None)
    if config_class is not None:
        preset = kwargs.pop("preset", None)
        base = dataclasses.asdict(config_class.preset(preset)) if preset else {}
        try:
            model = obj(config_class(**{**base, **kwargs}))
        except TypeError as exc:
            raise ConfigError(f"{keys[1]} do not fit {config_class.__name__}: {exc}") from None
    else:
        model = obj(**kwargs)
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"{keys[0]} returned {type(model).__name__}, not a torch.nn.Module")
    if mc.weights:
        model.load_state_dict(ckpt.load_tensors(mc.weights))
    return model


def build_objective(oc, total_steps: int = 1, teacher: Optional[torch.nn.Module] = None, teacher_objective=None):
    """The objective of an :class:`ObjectiveConfig`; distillation kinds need the frozen ``teacher`` and
    ``teacher_objective`` (the ObjectiveConfig it was trained with, from :func:`build_teacher`)."""
    if oc.kind in DISTILL_KINDS:
        if teacher is None:
            raise ConfigError(f"objective.kind = {oc.kind!r} needs the teacher model (objective.teacher)")
        return build_distillation(oc, teacher, teacher_objective or dataclasses.replace(oc, kind=teacher_kind(oc)))
    if oc.kind == "consistency":
        return ConsistencyTrainingObjective(total_steps, oc.ct_s0, oc.ct_s1, sigma_max=oc.ct_sigma_max,
                                            sigma_data=oc.ct_sigma_data)
    if oc.kind == "flow":
        return FlowMatchingObjective(oc.timestep_sampling, oc.logit_mean, oc.logit_std, oc.mode_scale, oc.sigmoid_scale,
                                     oc.shift, oc.resolution_shift, loss_weighting=oc.loss_weighting,
                                     num_train_timesteps=oc.num_train_timesteps)
    return DenoisingObjective(oc.prediction, oc.beta_schedule, oc.num_train_timesteps, oc.beta_start, oc.beta_end,
                              oc.loss_weighting, oc.snr_gamma)


def teacher_denoiser(toc) -> ModelDenoiser:
    """``D(x, sigma)`` of a model trained with the flow / denoising ObjectiveConfig ``toc``."""
    if toc.kind == "flow":
        return ModelDenoiser("flow", toc.num_train_timesteps)
    betas = make_betas(toc.beta_schedule, toc.num_train_timesteps, toc.beta_start, toc.beta_end).double()
    return ModelDenoiser("denoising", toc.num_train_timesteps, torch.cumprod(1 - betas, 0), toc.prediction)


def build_distillation(oc, teacher, toc):
    """:class:`ConsistencyDistillationObjective` or :class:`LCMDistillationObjective` from the config
    ``oc``, the frozen ``teacher`` (called ``teacher(x, t, class_labels=cond)``; a text-conditional one
    through :func:`fastgen.train.text.text_cond_model`) and the ObjectiveConfig ``toc`` that describes
    what it predicts."""
    if toc.kind not in ("flow", "denoising"):
        raise ConfigError(f"objective.teacher was trained with objective.kind = {toc.kind!r}; a teacher must be a "
                          "'flow' or 'denoising' model")
    if oc.kind == "consistency_distillation":
        den = teacher_denoiser(toc)
        if oc.ct_sigma_max > den.sigma_max:
            raise ConfigError(f"objective.ct_sigma_max = {oc.ct_sigma_max} is above the teacher's largest sigma "
                              f"{den.sigma_max:.4g} (its {toc.beta_schedule} schedule); lower it")

        def teacher_fn(x, sigma, cond=None):
            return den(teacher, x, sigma, cond)

        solver = "heun" if oc.teacher_solver == "auto" else oc.teacher_solver
        return ConsistencyDistillationObjective(
            teacher_fn, num_scales=oc.cd_num_scales, solver=solver,
            target_decay=oc.target_decay, sigma_max=oc.ct_sigma_max, sigma_data=oc.ct_sigma_data,
            metric="pseudo_huber" if oc.distill_loss == "huber" else "l2",
            student_denoiser=den if oc.init_from_teacher else None)
    # lcm: one DDPM schedule and prediction for the teacher and the student
    if toc.kind != "denoising":
        raise ConfigError("objective.kind = 'lcm' distils a 'denoising' (DDPM) teacher; the teacher is a "
                          f"{toc.kind!r} model")
    for key in ("prediction", "beta_schedule", "num_train_timesteps", "beta_start", "beta_end"):
        if getattr(toc, key) != getattr(oc, key):
            raise ConfigError(f"objective.{key} = {getattr(oc, key)!r}, but the teacher was trained with "
                              f"{getattr(toc, key)!r}; set it to match")

    def teacher_fn(x, t, cond=None):
        return teacher(x, t, class_labels=cond)

    return LCMDistillationObjective(
        teacher_fn, num_train_timesteps=oc.num_train_timesteps, beta_schedule=oc.beta_schedule,
        beta_start=oc.beta_start, beta_end=oc.beta_end, num_ddim_timesteps=oc.lcm_num_ddim_timesteps,
        w_min=oc.lcm_w_min, w_max=oc.lcm_w_max, embedding_dim=oc.lcm_embedding_dim, prediction=oc.prediction,
        loss_type="huber" if oc.distill_loss == "huber" else "l2", target_decay=oc.target_decay,
        guidance_kwarg=oc.lcm_guidance_kwarg)


def _teacher_checkpoint(spec: str) -> Optional[str]:
    """The fastgen.train checkpoint folder ``spec`` names (itself, or the newest good one under it)."""
    if os.path.isfile(os.path.join(spec, "state.json")):
        why = ckpt.verify(spec)
        if why is not None:
            raise ConfigError(f"objective.teacher {spec!r} is corrupted: {why}")
        return spec
    for root in (os.path.join(spec, "checkpoints"), spec):
        if ckpt.list_steps(root):
            path, problems = ckpt.find_resume(root)
            if path is None:
                raise ConfigError(f"objective.teacher {spec!r}: no good checkpoint:\n  " + "\n  ".join(problems))
            return path
    return None


def build_teacher(cfg: Config, log=print):
    """``(teacher, teacher_objective)``: the model ``objective.teacher`` names (weights loaded, on the CPU,
    fp32, training mode untouched) and the ObjectiveConfig describing what it predicts."""
    o = cfg.objective
    spec = o.teacher
    if not spec:
        raise ConfigError(f"objective.teacher is required for objective.kind = {o.kind!r}")
    own = dataclasses.replace(o, kind=teacher_kind(o))
    # a file / folder / preset teacher: built by objective.teacher_factory (its kwargs alone) when given,
    # else by model.factory with model.kwargs + teacher_kwargs
    fname = "objective.teacher_factory" if o.teacher_factory else "model.factory"
    fkw = "objective.teacher_kwargs" if o.teacher_factory else "model.kwargs + objective.teacher_kwargs"
    mc = dataclasses.replace(cfg.model, factory=o.teacher_factory or cfg.model.factory, weights="",
                             kwargs=dict(o.teacher_kwargs) if o.teacher_factory else {**cfg.model.kwargs,
                                                                                      **o.teacher_kwargs})
    if os.path.isdir(spec):
        folder = _teacher_checkpoint(spec)
        if folder is not None:  # a fastgen.train run: its architecture and objective come with it
            tcfg = Config.from_toml(os.path.join(folder, "config.toml"))
            if ckpt.read_json(folder, "state.json").get("format") == "dcp":
                raise ConfigError(f"objective.teacher {folder!r} is a sharded (FSDP) checkpoint; resume it in one "
                                  "process with train.parallel = 'ddp' to get a one-file checkpoint")
            teacher = build_model(dataclasses.replace(tcfg.model, weights=""))
            sd = ckpt.load_tensors(os.path.join(folder, "model.safetensors"))
            what = "weights"
            if o.teacher_use_ema and os.path.isfile(os.path.join(folder, "ema.safetensors")):
                sd.update(ckpt.ema_tensors(folder)[0])
                what = "EMA weights"
            teacher.load_state_dict(sd)
            log(f"fastgen.train: teacher: {folder} ({what}, objective.kind = {tcfg.objective.kind!r})")
            return teacher, tcfg.objective
        factory = resolve_factory(mc.factory, fname)
        if not hasattr(factory, "from_pretrained"):
            raise ConfigError(f"objective.teacher {spec!r} is a folder without a fastgen.train checkpoint, and "
                              f"{fname} {mc.factory!r} has no from_pretrained")
        teacher = factory.from_pretrained(spec)
        log(f"fastgen.train: teacher: {spec} (from_pretrained, objective.teacher_kind = {own.kind!r})")
        return teacher, own
    if os.path.isfile(spec):
        teacher = build_model(mc, (fname, fkw))
        try:
            teacher.load_state_dict(ckpt.load_tensors(spec))
        except RuntimeError as exc:
            hint = "" if o.teacher_factory else (" (a teacher of another architecture than the student, e.g. "
                                                 "without the student's w input: set objective.teacher_factory)")
            raise ConfigError(f"objective.teacher {spec!r} does not fit {fname} built with {fkw}{hint}: "
                              f"{exc}") from None
        log(f"fastgen.train: teacher: {spec} (objective.teacher_kind = {own.kind!r})")
        return teacher, own
    factory = resolve_factory(mc.factory, fname)
    config_class = getattr(factory, "config_class", None)
    try:
        if config_class is None:
            raise KeyError(f"{mc.factory} has no presets")
        config_class.preset(spec)
    except KeyError as exc:
        raise ConfigError(f"objective.teacher {spec!r} is no file or folder, nor a preset of {fname} "
                          f"({exc.args[0] if exc.args else exc})") from None
    teacher = build_model(dataclasses.replace(mc, kwargs={**o.teacher_kwargs, "preset": spec}), (fname, fkw))
    log(f"fastgen.train: teacher: preset {spec!r} with RANDOM weights (a smoke test; give a checkpoint or "
        "safetensors file for a real teacher)")
    return teacher, own


def init_student_from_teacher(student: torch.nn.Module, teacher: torch.nn.Module, log=print) -> None:
    """Copy the teacher's weights into the student. Student tensors the teacher lacks keep their init
    (said so); a teacher tensor the student lacks, or of another shape, is a ConfigError."""
    ss, ts = student.state_dict(), teacher.state_dict()
    extra = [k for k in ts if k not in ss]
    bad = [k for k in ts if k in ss and ts[k].shape != ss[k].shape]
    if extra or bad:
        raise ConfigError("objective.init_from_teacher: the teacher does not fit the student (" +
                          (f"not in the student: {extra[:3]}" if extra else
                           f"shapes differ: {bad[0]} {tuple(ts[bad[0]].shape)} vs {tuple(ss[bad[0]].shape)}") + ")")
    student.load_state_dict(ts, strict=False)
    missing = [k for k in ss if k not in ts]
    log("fastgen.train: student initialised from the teacher" +
        (f" ({len(missing)} student tensors keep their init, e.g. {missing[0]})" if missing else ""))


def builtin_lr_lambda(name: str, warmup: int, total: int):
    """The multiplier diffusers' ``get_scheduler(name)`` applies at step ``s`` (for the four common names)."""
    def warm(s):
        return s / max(1, warmup)

    if name == "constant":
        return lambda s: 1.0
    if name == "constant_with_warmup":
        return lambda s: warm(s) if s < warmup else 1.0
    if name == "linear":
        return lambda s: warm(s) if s < warmup else max(0.0, (total - s) / max(1, total - warmup))
    if name == "cosine":
        return lambda s: warm(s) if s < warmup else max(
            0.0, 0.5 * (1.0 + math.cos(math.pi * 0.5 * 2.0 * (s - warmup) / max(1, total - warmup))))
    raise ConfigError(f"optim.lr_scheduler {name!r} needs diffusers (built in: {', '.join(BUILTIN_SCHEDULES)})")


def make_lr_scheduler(name: str, optimizer, warmup: int, total: int):
    """The four common names built in (the same multipliers as diffusers' ``get_scheduler``, tested
    against it; no diffusers import at start-up); any other name through diffusers' ``get_scheduler``."""
    if name in BUILTIN_SCHEDULES:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, builtin_lr_lambda(name, warmup, total))
    try:
        from diffusers.optimization import get_scheduler
    except ImportError:
        raise ConfigError(f"optim.lr_scheduler {name!r} needs diffusers (built in: "
                          f"{', '.join(BUILTIN_SCHEDULES)})") from None
    try:
        return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total)
    except ValueError as exc:
        raise ConfigError(f"optim.lr_scheduler: {exc}") from None


def _is_collective_error(exc: BaseException) -> bool:
    """A failed collective (a dead, stalled or unreachable peer), as gloo / NCCL / c10d report it."""
    if isinstance(exc, getattr(torch.distributed, "DistError", ())):
        return True
    msg = str(exc).lower()
    return any(s in msg for s in ("gloo", "nccl", "connection", "timed out", "timeout", "peer", "socket"))


def _barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2 ** 32)
    except ImportError:  # pragma: no cover
        pass


# --------------------------------------------------------------------------- trainer

class Trainer:
    """Train the model of ``config`` (see the module docstring).

    ``model=`` and ``dataset=`` replace the ones the config would build (an ``nn.Module`` called as
    ``model(x, t, class_labels=y)``; a dataset with ``bucket_ids``, ``num_classes`` and items
    ``{"image", "label"}`` such as :class:`fastgen.train.data.TensorImageDataset`).
    ``resume=True`` continues from the newest good checkpoint in ``output_dir``.
    """

    def __init__(self, config: Config, *, model: Optional[torch.nn.Module] = None, dataset=None,
                 resume: bool = False, log=print):
        config.validate()
        self.cfg, self.log = config, log
        t = config.train
        self._init_device()
        self.out = config.output_dir
        self.ckpt_root = os.path.join(self.out, "checkpoints")
        _seed_all(t.seed)
        self._init_data(dataset)
        self._init_model(model)
        teacher_objective = self._init_teacher()
        if t.precision == "bf16-pure":
            self.model.to(torch.bfloat16)
            if self.teacher is not None:
                self.teacher.to(torch.bfloat16)
        teacher = self.teacher
        if teacher is not None and self.text_null is not None:  # text-conditional: the text is the condition
            teacher = text_cond_model(teacher, config.model.text_inputs)
        self.objective = build_objective(config.objective, t.steps, teacher, teacher_objective)
        self._check_guidance_input()
        self._init_optimizer()
        self._init_forward()
        self.step, self.batches = 0, 0
        _seed_all(t.seed + 1 + self.rank)  # the training noise stream of this rank
        if resume:
            self._resume()

    # ------------------------------------------------------------------ set-up (in this order)
    def _init_device(self) -> None:
        """The process group (from torchrun's environment) and this rank's device."""
        t = self.cfg.train
        want = t.device if t.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        if want == "cuda" and not torch.cuda.is_available():
            raise ConfigError("train.device = 'cuda' but torch sees no CUDA GPU")
        had_group = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.rank, self.world = init_distributed(torch.device(want), t.dist_timeout)
        self.dist_timeout = None if had_group else t.dist_timeout  # for the dead-rank message
        if want == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", self.rank)))
            self.device = torch.device("cuda", torch.cuda.current_device())
        else:
            self.device = torch.device("cpu")

    def _init_data(self, dataset) -> None:
        """The dataset (given or from ``[data]``), wrapped in the latent and text-embedding caches."""
        d = self.cfg.data
        self.dataset = dataset if dataset is not None else build_dataset(d)
        self.vae = None
        if d.vae:  # latent training: encode once into the cache
            from fastgen.train.cache import CachedLatentDataset

            self.vae = resolve_factory(d.vae)(**d.vae_kwargs)
            self._wrap_cached(lambda ds, folder: CachedLatentDataset(ds, self.vae, folder))
            if self.rank == 0:
                c = self.dataset.cache
                self.log(f"fastgen.train: latents of {c.folder}: {c.hits} cached, {c.misses} encoded")
        if d.text_encoder:  # text-conditional: caption embeddings cached
            from fastgen.train.text import TextEmbeddingDataset

            encoder = resolve_factory(d.text_encoder)(**d.text_encoder_kwargs)
            self._wrap_cached(lambda ds, folder: TextEmbeddingDataset(ds, encoder, folder))
            if self.rank == 0:
                c = self.dataset.text_cache.cache
                self.log(f"fastgen.train: text embeddings of {c.folder}: {c.hits} cached, {c.misses} encoded")
        # text-conditional when the data carries text-encoder outputs (and their null embedding)
        self.text_null = getattr(self.dataset, "null", None)
        if self.rank == 0:
            counts = ", ".join(f"{w}x{h}: {n}" for (h, w), n in self.dataset.bucket_counts().items())
            self.log(f"fastgen.train: {len(self.dataset)} images, {self.dataset.num_classes} classes, "
                     f"buckets {counts}")

    def _wrap_cached(self, wrap) -> None:
        """``dataset = wrap(dataset, cache_dir)``: rank 0 first (it fills the cache), then the others read it."""
        cache_dir = self.cfg.data.cache_dir or os.path.join(self.cfg.output_dir, "cache")
        for r in range(min(self.world, 2)):
            if (self.rank == 0) == (r == 0):
                self.dataset = wrap(self.dataset, cache_dir)
            _barrier(self.world)

    def _init_model(self, model: Optional[torch.nn.Module]) -> None:
        """The model (given or from ``[model]``) on the device; its classes checked against the data."""
        config = self.cfg
        self.model = (model if model is not None else build_model(config.model)).to(self.device)
        mcfg = getattr(self.model, "config", None)
        n_model = getattr(mcfg, "num_embeds_ada_norm", None)
        if n_model is not None and n_model < self.dataset.num_classes:
            raise ConfigError(f"the model has {n_model} classes, the data {self.dataset.num_classes}")
        self.null_label = n_model if n_model is not None else self.dataset.num_classes
        if getattr(mcfg, "class_dropout_prob", 0) and config.objective.cond_dropout:
            self.log("fastgen.train: note: the model drops labels itself (class_dropout_prob) and "
                     "objective.cond_dropout drops them again; set one of them to 0")
        if config.model.gradient_checkpointing:
            if not hasattr(self.model, "enable_gradient_checkpointing"):
                raise ConfigError(f"model.gradient_checkpointing: {type(self.model).__name__} has no "
                                  "enable_gradient_checkpointing()")
            self.model.enable_gradient_checkpointing()

    def _init_teacher(self):
        """Distillation: the frozen teacher on the student's device (``self.teacher``, else None);
        returns the ObjectiveConfig it was trained with."""
        self.teacher = None
        o = self.cfg.objective
        if o.kind not in DISTILL_KINDS:
            return None
        quiet = self.log if self.rank == 0 else (lambda s: None)
        teacher, teacher_objective = build_teacher(self.cfg, quiet)
        self.teacher = teacher.to(self.device).eval().requires_grad_(False)
        if (o.kind == "lcm" and self.text_null is None
                and getattr(getattr(teacher, "config", None), "class_dropout_prob", None) == 0):
            raise ConfigError("objective.kind = 'lcm' guides the teacher with its null class, but the teacher has "
                              "none (class_dropout_prob = 0)")
        if o.init_from_teacher:
            init_student_from_teacher(self.model, self.teacher, quiet)
        return teacher_objective

    def _check_guidance_input(self) -> None:
        """LCM: the student's forward must take the w-embedding under ``objective.lcm_guidance_kwarg``."""
        name = getattr(self.objective, "guidance_kwarg", None)
        if isinstance(self.objective, LCMDistillationObjective) and name and not accepts_keyword(self.model, name):
            raise ConfigError(f"objective.lcm_guidance_kwarg = {name!r}, but {type(self.model).__name__}.forward "
                              "takes no such keyword: give a model.factory whose forward takes the w-embedding "
                              "under that name, or set lcm_guidance_kwarg = '' for a student without a w input "
                              "(and lcm_w_min = lcm_w_max to train it at one w)")

    def _init_optimizer(self) -> None:
        """FSDP sharding (first: the optimizer and the EMA hold the sharded parameters), FusedAdamW, the
        LR schedule, the EMA and the distillation target network theta^- (a copy of the student)."""
        t, o = self.cfg.train, self.cfg.optim
        self.fsdp = t.parallel == "fsdp" and self.world > 1
        if self.fsdp:
            self.model.to(self.device)
            shard_model(self.model, self.device)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = FusedAdamW(self.params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay,
                                    stochastic_rounding=t.precision == "bf16-pure")
        self.lr_scheduler = make_lr_scheduler(o.lr_scheduler, self.optimizer, o.warmup_steps, t.steps)
        self.ema = EMA(self.model, o.ema_decay) if o.ema_decay > 0 else None
        self.target = None
        if self.teacher is not None:
            self.target = copy.deepcopy(self.model).eval().requires_grad_(False)

    def _init_forward(self) -> None:
        """The module the steps call (compiled, DDP-wrapped across processes) and the batch sampler."""
        t = self.cfg.train
        self.forward_model = self.model
        if self.cfg.model.compile:
            self.forward_model = torch.compile(self.model)
        if self.world > 1 and not self.fsdp:
            from torch.nn.parallel import DistributedDataParallel

            self.forward_model = DistributedDataParallel(
                self.forward_model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.sampler = BucketBatchSampler(self.dataset.bucket_ids, t.batch_size, t.seed, self.rank, self.world)

    # ------------------------------------------------------------------ one step
    def _micro_batch(self, batch, sync: bool):
        x = batch["image"].to(self.device, non_blocking=True)
        if self.cfg.train.precision == "bf16-pure":
            x = x.to(torch.bfloat16)
        model = self.forward_model
        if self.text_null is not None:  # text-conditional: drop captions to the null embedding, call by keyword
            # the text rides in the condition (to the student, and in distillation the target and the teacher)
            y = drop_text(like_x(batch["text"], x), self.text_null, self.cfg.objective.cond_dropout)
            model = text_cond_model(self.forward_model, self.cfg.model.text_inputs)
        else:
            y = drop_conditions(batch["label"].to(self.device), self.cfg.objective.cond_dropout, self.null_label)
        amp = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.train.precision == "bf16")
        ctx = contextlib.nullcontext()
        if self.fsdp:  # FSDP2: skip the reduce-scatter on all but the last micro-batch
            self.model.set_requires_gradient_sync(sync)
        elif self.world > 1 and not sync:
            ctx = self.forward_model.no_sync()
        with ctx:
            with amp:
                loss = self.objective.loss(model, x, y, **self._distill_kwargs(y))
            (loss / self.cfg.train.grad_accum).backward()
        return loss.detach()

    def _distill_kwargs(self, y) -> dict:
        if self.target is None:
            return {}
        target = self.target
        if self.text_null is not None:  # y: the text outputs {name: (B, ...)}
            target = text_cond_model(target, self.cfg.model.text_inputs)
        if not isinstance(self.objective, LCMDistillationObjective):
            return {"target_model": target}
        # the guided teacher's unconditional half: the null class, or the null (empty-prompt) embedding
        uncond = (torch.full_like(y, self.null_label) if self.text_null is None else
                  null_batch(self.text_null, next(iter(y.values())).shape[0], y))
        return {"target_model": target, "uncond": uncond}

    def train_step(self, batches) -> tuple[float, float]:
        """One optimizer step over ``grad_accum`` micro-batches; returns ``(loss, grad_norm)``."""
        A = self.cfg.train.grad_accum
        self.optimizer.zero_grad(set_to_none=True)
        if hasattr(self.objective, "set_step"):  # consistency training: the discretization curriculum
            self.objective.set_step(self.step)
        total = torch.zeros((), device=self.device)
        for a in range(A):
            total += self._micro_batch(next(batches), sync=a == A - 1)
            self.batches += 1
        gn = float("nan")
        if self.cfg.optim.grad_clip > 0 and self.fsdp:  # the norm over all shards
            gn = clip_sharded_grad_norm_(self.params, self.cfg.optim.grad_clip)
        elif self.cfg.optim.grad_clip > 0:
            gn = float(clip_grad_norm_(self.params, self.cfg.optim.grad_clip))
        self.optimizer.step()
        self.lr_scheduler.step()
        if self.ema is not None:
            self.ema.update(self.model)
        if self.target is not None:
            update_target(self.target, self.model, self.cfg.objective.target_decay)
        self.step += 1
        return float(total) / A, gn

    # ------------------------------------------------------------------ fit
    def fit(self, stop_at: Optional[int] = None) -> dict:
        """Train to ``train.steps`` (or stop early at step ``stop_at`` with a checkpoint there, as an
        interrupted run would); returns ``{"step", "losses": [(step, loss)], "checkpoint"}``."""
        cfg, t = self.cfg, self.cfg.train
        end = t.steps if stop_at is None else min(stop_at, t.steps)
        if self.step >= end and self.rank == 0:
            self.log(f"fastgen.train: already at step {self.step} of {t.steps}; nothing to train")
        if self.rank == 0:
            os.makedirs(self.out, exist_ok=True)
        self.sampler.set_position(self.batches)
        # its own generator: a DataLoader iterator otherwise draws its worker seed from the global RNG,
        # which would shift the noise stream of a resumed run
        loader = torch.utils.data.DataLoader(self.dataset, batch_sampler=self.sampler,
                                             num_workers=cfg.data.num_workers, pin_memory=self.device.type == "cuda",
                                             generator=torch.Generator().manual_seed(t.seed))
        batches = iter(loader)
        bar = progress_bar(total=t.steps, initial=self.step, disable=not t.progress or self.rank != 0)
        losses, window, last_path, t0 = [], [], None, time.time()
        try:
            while self.step < end:
                loss, gn = self.train_step(batches)
                if not math.isfinite(loss):
                    raise FloatingPointError(f"fastgen.train: loss is {loss} at step {self.step}")
                losses.append((self.step, loss))
                window.append(loss)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{self.lr_scheduler.get_last_lr()[0]:.2e}")
                if self.step % t.log_every == 0 or self.step == end:
                    self._log_row(sum(window) / len(window), gn, time.time() - t0)
                    window = []
                v = cfg.validation
                if v.every and self.step % v.every == 0:
                    self.validate()
                if (cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0) or self.step == end:
                    last_path = self.save()
        except RuntimeError as exc:  # a dead or stalled peer: one clear message, not a bare gloo / NCCL error
            if self.world > 1 and _is_collective_error(exc):
                raise collective_failure(exc, self.rank, self.world, self.step, self.dist_timeout) from exc
            raise
        finally:
            bar.close()
        return {"step": self.step, "losses": losses, "checkpoint": last_path}

    # ------------------------------------------------------------------ logs
    def _log_row(self, loss: float, gn: float, seconds: float) -> None:
        if self.rank == 0:
            append_row(os.path.join(self.out, "log.csv"), ["step", "loss", "lr", "grad_norm", "seconds"],
                       [self.step, f"{loss:.6g}", f"{self.lr_scheduler.get_last_lr()[0]:.6g}", f"{gn:.6g}",
                        f"{seconds:.1f}"])

    def plot_loss(self) -> Optional[str]:
        """``loss.png`` from ``log.csv`` (rank 0)."""
        path = os.path.join(self.out, "log.csv")
        if self.rank != 0 or not os.path.exists(path):
            return None
        try:
            import matplotlib
        except ImportError:  # the CSV log is the record; the plot is a convenience
            return None

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        with open(path, newline="") as fh:
            rows = list(csv.DictReader(fh))
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot([int(r["step"]) for r in rows], [float(r["loss"]) for r in rows])
        ax.set(xlabel="step", ylabel="loss", yscale="log", title=f"training loss (step {self.step})")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        out = os.path.join(self.out, "loss.png")
        fig.savefig(out, dpi=100)
        plt.close(fig)
        return out

    # ------------------------------------------------------------------ validation
    def generate(self, labels: torch.Tensor, use_ema: Optional[bool] = None, seed: Optional[int] = None,
                 bucket: Optional[tuple] = None) -> torch.Tensor:
        """Samples ``(B, C, H, W)`` in about [-1, 1] for ``labels`` with the validation settings."""
        v = self.cfg.validation
        use_ema = v.use_ema if use_ema is None else use_ema
        if bucket is None:  # the most populated bucket
            bucket = max(self.dataset.bucket_counts().items(), key=lambda kv: kv[1])[0]
        h, w = bucket
        c = self.dataset[0]["image"].shape[0] if len(self.dataset) else self.cfg.data.channels
        g = torch.Generator().manual_seed(v.seed if seed is None else seed)
        was_training = self.model.training
        self.model.eval()
        try:
            with (self.ema.average_parameters(self.model) if (use_ema and self.ema) else contextlib.nullcontext()):
                model, null = self.model, self.null_label
                if self.text_null is not None:  # labels index the validation prompts (validation_prompts())
                    model = PromptTable(self.model, [e for _, e in self.validation_prompts()], self.text_null,
                                        self.cfg.model.text_inputs)
                    null = model.null_label
                if isinstance(self.objective, LCMDistillationObjective):
                    return self._lcm_sample(model, labels.to(self.device), (c, h, w), g)
                return sample(model, self.objective, labels.to(self.device), (c, h, w), v.num_steps, g,
                              v.sampler, v.guidance_scale, null, self.device)
        finally:
            self.model.train(was_training)

    def _lcm_sample(self, model, labels: torch.Tensor, shape: tuple, g: torch.Generator) -> torch.Tensor:
        """LCM validation: ``validation.num_steps`` (at most N) consistency steps down the solver grid,
        at ``w = validation.guidance_scale - 1`` (the teacher's guidance (1 + w) c - w u), or the middle
        of [lcm_w_min, lcm_w_max] when guidance_scale is 1. ``model``: the student, or its
        :class:`PromptTable` (``labels`` index the validation prompts)."""
        o, v = self.objective, self.cfg.validation
        n = min(v.num_steps, len(o.ddim_timesteps))
        ts = o.ddim_timesteps[torch.linspace(len(o.ddim_timesteps) - 1, 0, n).round().long()].tolist()
        w = v.guidance_scale - 1 if v.guidance_scale > 1 else (o.w_min + o.w_max) / 2
        dtype = next(self.model.parameters()).dtype
        noise = torch.randn((labels.shape[0], *shape), generator=g).to(self.device, dtype)
        return o.sample(model, noise, w, labels, ts, g).float()

    def validation_prompts(self) -> list:
        """Text-conditional runs: ``[(caption, text outputs)]``, the first 16 distinct captions of the data."""
        if not hasattr(self, "_prompts"):
            seen: dict = {}
            meta = self.dataset.meta if hasattr(self.dataset, "meta") else (lambda i: self.dataset[i])
            for i in range(len(self.dataset)):
                m = meta(i)
                if m["caption"] not in seen:
                    seen[m["caption"]] = m["text"]
                if len(seen) == 16:
                    break
            self._prompts = list(seen.items())
        return self._prompts

    def validate(self) -> Optional[str]:
        """``samples/step-N.png``: one row per class (at most 16), ``validation.per_class`` each."""
        if self.rank != 0 and not self.fsdp:
            return None
        v = self.cfg.validation
        n_cls = min(self.dataset.num_classes if self.text_null is None else len(self.validation_prompts()), 16)
        labels = torch.arange(n_cls).repeat_interleave(v.per_class)
        images = self.generate(labels)  # under FSDP every rank runs the (sharded) model; rank 0 writes
        if self.vae is not None and hasattr(self.vae, "decode"):  # latents -> images for the grid
            cfg = self.vae.config
            get = (lambda k: cfg.get(k)) if isinstance(cfg, dict) else (lambda k: getattr(cfg, k, None))
            p = next(self.vae.parameters())
            with torch.no_grad():
                z = images.to(p.device, p.dtype) / get("scaling_factor") + (get("shift_factor") or 0.0)
                out = self.vae.decode(z)
            images = getattr(out, "sample", out).float().clamp(-1, 1)
        if self.rank != 0:
            return None
        os.makedirs(os.path.join(self.out, "samples"), exist_ok=True)
        path = os.path.join(self.out, "samples", f"step-{self.step:08d}.png")
        save_grid(images, path, v.per_class)
        return path

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> str:
        """Write the checkpoint of this step (all ranks take part); returns its folder."""
        c = self.cfg.checkpoint
        if self.rank == 0:
            ckpt.begin(self.ckpt_root, self.step)
        _barrier(self.world)
        tmp = ckpt.step_dir(self.ckpt_root, self.step) + ".tmp"
        rt, rm = ckpt.rng_state()
        if (seed := ckpt.rounding_seed(self.optimizer)) is not None:  # FusedAdamW's rounding seeds
            rt["optimizer_seed"] = seed.get_state()
        ckpt.save_tensors(os.path.join(tmp, f"rng-rank{self.rank}.safetensors"), rt)
        ckpt.write_json(tmp, f"rng-rank{self.rank}.json", rm)
        _barrier(self.world)
        final = ckpt.step_dir(self.ckpt_root, self.step)
        dcp = self.cfg.train.parallel == "fsdp"
        if dcp:  # every rank writes its shards of the model, optimizer and EMA
            save_dcp(tmp, self.model, self.optimizer, self.ema)
            _barrier(self.world)
        if self.rank == 0:
            state = {"step": self.step, "batches": self.batches, "world_size": self.world,
                     "lr_scheduler": self.lr_scheduler.state_dict(), "format": "dcp" if dcp else "safetensors"}
            if not dcp:
                ckpt.save_tensors(os.path.join(tmp, "model.safetensors"), self.model.state_dict())
            if self.ema is not None:
                state["ema"] = ckpt.save_ema(tmp, self.ema, write=not dcp)
            if self.target is not None:
                ckpt.save_target(tmp, self.target)
            if not dcp:
                ot, om = ckpt.optimizer_to_files(self.optimizer.state_dict())
                ckpt.save_tensors(os.path.join(tmp, "optimizer.safetensors"), ot)
                state["optimizer"] = om
            ckpt.write_json(tmp, "state.json", state)
            ckpt.write_text(tmp, "config.toml", self.cfg.to_toml())
            ckpt.commit(self.ckpt_root, self.step, c.keep_last, c.keep_every)
            self.plot_loss()
        _barrier(self.world)
        return final

    def _resume(self) -> None:
        say = (lambda msg: self.log(f"fastgen.train: {msg}")) if self.rank == 0 else (lambda msg: None)
        path = ckpt.resume_folder(self.ckpt_root, say)
        if path is None:
            return
        state = ckpt.read_json(path, "state.json")
        if self.ema is not None and "ema" not in state:
            raise ckpt.CheckpointError(f"{path} has no EMA but optim.ema_decay > 0")
        if state.get("format") == "dcp":  # sharded: resharded to this run's processes by DCP
            load_dcp(path, self.model, self.optimizer, self.ema)
            if self.ema is not None:
                self.ema.load_state_dict({**state["ema"], "shadow": self.ema.shadow, "buffers": self.ema.buffers})
        elif self.fsdp:
            raise ckpt.CheckpointError(f"{path} is a one-file (DDP) checkpoint; resume it with train.parallel = "
                                       "'ddp' or in one process, whose next checkpoint is sharded when "
                                       "train.parallel = 'fsdp'")
        else:
            self.model.load_state_dict(ckpt.load_tensors(os.path.join(path, "model.safetensors")))
            if self.target is not None:
                ckpt.load_target(path, self.target)
            if self.ema is not None:
                ckpt.load_ema(path, self.ema, state)
            self.optimizer.load_state_dict(ckpt.optimizer_from_files(
                ckpt.load_tensors(os.path.join(path, "optimizer.safetensors")), state["optimizer"]))
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.step, self.batches = state["step"], state["batches"]
        rng = os.path.join(path, f"rng-rank{self.rank}.safetensors")
        if state["world_size"] == self.world and os.path.exists(rng):
            rt = ckpt.load_tensors(rng)
            ckpt.set_rng_state(rt, ckpt.read_json(path, f"rng-rank{self.rank}.json"))
            if "optimizer_seed" in rt and (seed := ckpt.rounding_seed(self.optimizer)) is not None:
                seed.set_state(rt["optimizer_seed"])
        else:
            _seed_all(self.cfg.train.seed + 1 + self.rank + 7919 * self.step)
            if self.rank == 0:
                self.log(f"fastgen.train: the checkpoint was written by {state['world_size']} process(es), this run "
                         f"has {self.world}: the noise streams are reseeded (the data order continues)")
            if state["world_size"] != self.world:
                self.batches = self.batches * state["world_size"] // self.world
        if self.rank == 0:
            truncate_rows(os.path.join(self.out, "log.csv"), self.step)
            self.log(f"fastgen.train: resuming from {path} (step {self.step})")
