"""The zoo runner: ``fastgen train configs/zoo/<model>.toml`` for GANs, VAEs, flows and score models.

A config with a top-level ``[zoo]`` table (schema: ``fastgen.zoo.train_config``) comes here
instead of the diffusion trainer. Every zoo model speaks one small protocol:

    model.optimizer_params() -> {name: [parameters]}      one fused optimizer per entry
                                                           ("d" / "g" for the GANs, "model" else)
    model.train_step(batch, optimizers, step, generator) -> {loss name: float}
    model.batches_per_step                                 real batches a step consumes (1; wgangp:
                                                           n_critic, concatenated along dim 0)
    model.measure(test, generator, samples, sampling_steps) -> {measure name: float}

so the runner owns only the data, the loop and the files. Batches are dicts of tensors drawn
with replacement by one ``torch.Generator`` (seeded ``train.seed``) that also feeds the
models' noise: ``{"x", "y"}`` images and labels (shapes), ``{"a", "b"}`` two unpaired domains
(colour_swap), ``{"x"}`` (B, 2) points (two_moons, gaussian_mixture).

Output in ``output_dir``: ``log.csv`` (step, the mean of each loss over the window, seconds),
``measures.json`` ({"start": {...}, "end": {...}}, each with its step; the measure runs in eval
mode, on the EMA weights when there are some, with its own generator), and
``checkpoints/step-XXXXXXXX/`` written by fastgen.train.checkpoint's atomic helpers::

    model.safetensors, optimizer-<name>.safetensors, ema.safetensors (with an EMA),
    rng.safetensors (torch state, the batch/noise generator, FusedAdamW rounding seeds),
    rng.json (Python / NumPy), state.json, config.toml, index.json (sizes and SHA-256)

``--resume`` continues from the newest checkpoint that verifies, bit for bit: the same steps
as a run that was never stopped.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
import tomllib
from typing import Optional

import torch

from fastgen.train import checkpoint as ckpt
from fastgen.train.cli import run_config
from fastgen.train.config import ConfigError
from fastgen.train.progress import append_row, progress_bar, truncate_rows
from fastgen.zoo._common import draw
from fastgen.zoo.train_config import ZooConfig


def is_zoo_config(path: str) -> bool:
    """Whether ``path`` is a TOML file with a top-level ``zoo`` key (False if unreadable)."""
    try:
        with open(path, "rb") as fh:
            return "zoo" in tomllib.load(fh)
    except (OSError, tomllib.TOMLDecodeError):
        return False


# --------------------------------------------------------------------------- data

def make_data(cfg: ZooConfig, device) -> tuple[dict, dict, list]:
    """(train, test, groups): dicts of tensors and the key groups that share one index draw."""
    from fastgen.zoo import data as zd

    d, name, mc = cfg.data, cfg.dataset(), cfg.model_config()

    def split(n: int, seed: int) -> dict:
        g = torch.Generator().manual_seed(seed)
        if name == "shapes":
            size = mc.data_shape[1] if cfg.zoo.model == "realnvp" else mc.image_size
            x, y = zd.shapes(n, g, size=size)
            return {"x": x, "y": y}
        if name == "colour_swap":
            a = zd.colour_domain(n, 0, g, size=mc.image_size)
            return {"a": a, "b": zd.colour_domain(n, 1, g, size=mc.image_size)}
        if name == "two_moons":
            return {"x": zd.two_moons(n, d.noise, g)}
        return {"x": zd.gaussian_mixture(n, g)}

    train, test = split(d.size, d.seed), split(d.test_size, d.test_seed)
    groups = [["a"], ["b"]] if name == "colour_swap" else [list(train)]
    move = lambda s: {k: v.to(device) for k, v in s.items()}  # noqa: E731
    return move(train), move(test), groups


# --------------------------------------------------------------------------- the runner

class ZooTrainer:
    """Builds the model, data and optimizers of a :class:`ZooConfig`; :meth:`fit` trains."""

    def __init__(self, cfg: ZooConfig, resume: bool = False, log=None) -> None:
        self.cfg, self.log = cfg, log or (lambda msg: print(msg, file=sys.stderr))
        t = cfg.train
        if t.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("train.device = 'cuda' but torch sees no CUDA device")
        if t.threads:
            torch.set_num_threads(t.threads)
        self.device = torch.device(t.device)
        self.out = cfg.output_dir
        self.ckpt_root = os.path.join(self.out, "checkpoints")
        self.train_data, self.test_data, self.groups = make_data(cfg, self.device)
        torch.manual_seed(t.seed)
        self.model = cfg.model_class()(cfg.model_config()).to(self.device)
        self.optimizers = {name: self._optimizer(name, params)
                           for name, params in self.model.optimizer_params().items()}
        self.ema = None
        if cfg.optim.ema_decay > 0:
            from fastgen.optim import EMA

            self.ema = EMA(self.model, decay=cfg.optim.ema_decay)
        self.generator = torch.Generator(device=self.device).manual_seed(t.seed)
        self.step = 0
        self.measures: dict = {}
        if resume:
            self._resume()

    def _optimizer(self, name: str, params):
        from fastgen.optim import FusedAdamW, FusedLion

        o = self.cfg.optim
        lr = o.d_lr if name == "d" and o.d_lr > 0 else o.lr
        if o.name == "lion":
            return FusedLion(params, lr=lr, betas=tuple(o.betas), weight_decay=o.weight_decay)
        return FusedAdamW(params, lr=lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)

    # ------------------------------------------------------------------ batches
    def draw(self) -> dict:
        """One batch: ``batch_size * batches_per_step`` rows per key, indices from the generator."""
        n = self.cfg.train.batch_size * getattr(self.model, "batches_per_step", 1)
        return draw(self.train_data, self.groups, n, self.generator)

    # ------------------------------------------------------------------ measure
    def measure(self) -> dict:
        """``model.measure`` on the held-out split, eval mode, EMA weights when there are some."""
        m = self.cfg.measure
        g = torch.Generator(device=self.device).manual_seed(m.seed)
        self.model.eval()
        try:
            with self.ema.average_parameters(self.model) if self.ema is not None else contextlib.nullcontext():
                return self.model.measure(self.test_data, g, m.samples, m.sampling_steps)
        finally:
            self.model.train()

    def _record(self, when: str) -> None:
        values = self.measure()
        self.measures[when] = {"step": self.step, **values}
        with open(os.path.join(self.out, "measures.json"), "w") as fh:
            json.dump(self.measures, fh, indent=1)
        shown = ", ".join(f"{k} {v:.4g}" for k, v in values.items())
        self.log(f"fastgen train: {self.cfg.zoo.model} measure at step {self.step}: {shown}")

    # ------------------------------------------------------------------ fit
    def fit(self, stop_at: Optional[int] = None) -> dict:
        """Train to ``train.steps`` (or stop at ``stop_at`` with a checkpoint there, as an
        interrupted run would); returns {"step", "losses": [(step, {name: value})],
        "checkpoint", "measures"}."""
        t = self.cfg.train
        end = t.steps if stop_at is None else min(stop_at, t.steps)
        os.makedirs(self.out, exist_ok=True)
        self.model.train()
        if self.step >= end:
            self.log(f"fastgen train: already at step {self.step} of {t.steps}; nothing to train")
        if self.step == 0 and self.cfg.measure.at_start and "start" not in self.measures:
            self._record("start")
        bar = progress_bar(t.steps, self.step, disable=not t.progress)
        losses, window, last, t0 = [], [], None, time.time()
        try:
            while self.step < end:
                out = self.model.train_step(self.draw(), self.optimizers, self.step, self.generator)
                if self.ema is not None:
                    self.ema.update()
                bad = [k for k, v in out.items() if not math.isfinite(v)]
                if bad:
                    raise FloatingPointError(f"fastgen train: {', '.join(bad)} not finite at step {self.step}: {out}")
                self.step += 1
                losses.append((self.step, out))
                window.append(out)
                bar.update(1)
                bar.set_postfix({k: f"{v:.4g}" for k, v in list(out.items())[:3]})
                if self.step % t.log_every == 0 or self.step == end:
                    self._log_row(window, time.time() - t0)
                    window = []
                every = self.cfg.checkpoint.every
                if (every and self.step % every == 0) or self.step == end:
                    last = self.save()
        finally:
            bar.close()
        if self.step == t.steps and "end" not in self.measures:
            self._record("end")
        return {"step": self.step, "losses": losses, "checkpoint": last, "measures": self.measures}

    def _log_row(self, window: list, seconds: float) -> None:
        keys = list(window[0])
        append_row(os.path.join(self.out, "log.csv"), ["step", *keys, "seconds"],
                   [self.step, *(f"{sum(r[k] for r in window) / len(window):.6g}" for k in keys), f"{seconds:.1f}"])

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> str:
        """Write this step's checkpoint (atomically: a .tmp folder renamed into place); its folder."""
        tmp = ckpt.begin(self.ckpt_root, self.step)
        ckpt.save_tensors(os.path.join(tmp, "model.safetensors"), self.model.state_dict())
        state = {"format": "zoo", "model": self.cfg.zoo.model, "step": self.step, "optimizers": {},
                 "measures": self.measures}
        rt, rm = ckpt.rng_state()
        rt["generator"] = self.generator.get_state()
        for name, opt in self.optimizers.items():
            tensors, meta = ckpt.optimizer_to_files(opt.state_dict())
            ckpt.save_tensors(os.path.join(tmp, f"optimizer-{name}.safetensors"), tensors)
            state["optimizers"][name] = meta
            if (seed := ckpt.rounding_seed(opt)) is not None:  # FusedAdamW's rounding seeds
                rt[f"optimizer_seed.{name}"] = seed.get_state()
        if self.ema is not None:
            state["ema"] = ckpt.save_ema(tmp, self.ema)
        ckpt.save_tensors(os.path.join(tmp, "rng.safetensors"), rt)
        ckpt.write_json(tmp, "rng.json", rm)
        ckpt.write_json(tmp, "state.json", state)
        ckpt.write_text(tmp, "config.toml", self.cfg.to_toml())
        c = self.cfg.checkpoint
        return ckpt.commit(self.ckpt_root, self.step, c.keep_last, c.keep_every)

    def _resume(self) -> None:
        path = ckpt.resume_folder(self.ckpt_root, lambda msg: self.log(f"fastgen train: {msg}"))
        if path is None:
            return
        state = ckpt.read_json(path, "state.json")
        if state.get("format") != "zoo" or state.get("model") != self.cfg.zoo.model:
            raise ckpt.CheckpointError(f"{path} is not a checkpoint of zoo model {self.cfg.zoo.model!r} "
                                       f"(format {state.get('format')!r}, model {state.get('model')!r})")
        self.model.load_state_dict(ckpt.load_tensors(os.path.join(path, "model.safetensors")))
        for name, opt in self.optimizers.items():
            tensors = ckpt.load_tensors(os.path.join(path, f"optimizer-{name}.safetensors"))
            opt.load_state_dict(ckpt.optimizer_from_files(tensors, state["optimizers"][name]))
        if self.ema is not None:
            ckpt.load_ema(path, self.ema, state)
        rt = ckpt.load_tensors(os.path.join(path, "rng.safetensors"))
        self.generator.set_state(rt.pop("generator"))
        for name, opt in self.optimizers.items():
            if f"optimizer_seed.{name}" in rt and (seed := ckpt.rounding_seed(opt)) is not None:
                seed.set_state(rt[f"optimizer_seed.{name}"])
        ckpt.set_rng_state(rt, ckpt.read_json(path, "rng.json"))
        self.step, self.measures = state["step"], state.get("measures", {})
        saved = os.path.join(self.out, "measures.json")  # an end measure taken after the last checkpoint
        if os.path.exists(saved):
            with open(saved) as fh:
                self.measures.update({k: v for k, v in json.load(fh).items() if v.get("step", -1) <= self.step})
        truncate_rows(os.path.join(self.out, "log.csv"), self.step)
        self.log(f"fastgen train: resuming from {path} (step {self.step})")


# --------------------------------------------------------------------------- the command

def run(args) -> int:
    """``fastgen train CONFIG.toml [--resume] [--print-config]`` for a config with a [zoo] table."""
    def summary(cfg: ZooConfig, result: dict) -> str:
        where = f"checkpoint {result['checkpoint']}" if result["checkpoint"] else "no new checkpoint"
        return f"{cfg.zoo.model}, step {result['step']}, {where}"

    return run_config(args, ZooConfig, ZooTrainer, summary, failures=(FloatingPointError,))
