"""``fastgen train CONFIG.toml [--resume] [--print-config]`` (wired into ``fastgen.cli``).

Under ``torchrun --nproc-per-node N -m fastgen train CONFIG.toml`` every process runs this;
the Trainer creates the process group from torchrun's environment. A config with a top-level
``[zoo]`` table goes to the zoo runner (:mod:`fastgen.zoo.train`), through the same
:func:`run_config`.
"""

from __future__ import annotations

import sys


def add_parser(sub) -> None:
    t = sub.add_parser("train", help="train or distil a diffusion / flow model, or a zoo model, from a TOML config",
                       description="Train the model a TOML config describes (see docs/train.md): a diffusion / "
                                   "flow model, its consistency or LCM distillation, or with a [zoo] table one of "
                                   "the zoo's models (configs/zoo/*.toml). Checkpoints, log.csv, loss.png and "
                                   "sample grids go to the config's output_dir.")
    t.add_argument("config", help="the TOML config file")
    t.add_argument("--resume", action="store_true",
                   help="continue from the newest good checkpoint in output_dir/checkpoints")
    t.add_argument("--print-config", action="store_true",
                   help="print the resolved config (every key, with its documentation) and exit")


def run(args) -> int:
    from fastgen.zoo.train import is_zoo_config, run as run_zoo

    if is_zoo_config(args.config):  # a [zoo] table: GAN / VAE / flow / score models (fastgen.zoo.train)
        return run_zoo(args)
    from fastgen.train.config import Config
    from fastgen.train.data import DataError

    def trainer(cfg, resume: bool):
        from fastgen.train.loop import Trainer

        return Trainer(cfg, resume=resume)

    def summary(cfg, result) -> str | None:
        return f"step {result['step']}, checkpoint {result['checkpoint']}" if result["checkpoint"] else None

    return run_config(args, Config, trainer, summary, usage_errors=(DataError,))


def run_config(args, config_class, trainer, summary, usage_errors=(), failures=()) -> int:
    """Load ``args.config`` as ``config_class`` and print it (``--print-config``) or train it with
    ``trainer(cfg, resume=args.resume).fit()``, then print ``summary(cfg, result)`` (unless None).
    Exit status 2 for a bad config (ConfigError, OSError, ``usage_errors``), 1 for a failed run
    (CheckpointError, ``failures``), each with a one-line message."""
    from fastgen.train.checkpoint import CheckpointError
    from fastgen.train.config import ConfigError

    try:
        cfg = config_class.from_toml(args.config)
    except (OSError, ConfigError) as exc:
        print(f"fastgen train: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        print(cfg.to_toml(), end="")
        return 0
    try:
        result = trainer(cfg, resume=args.resume).fit()
    except (ConfigError, *usage_errors) as exc:
        print(f"fastgen train: {exc}", file=sys.stderr)
        return 2
    except (CheckpointError, *failures) as exc:
        print(f"fastgen train: {exc}", file=sys.stderr)
        return 1
    line = summary(cfg, result)
    if line is not None:
        print(f"fastgen train: {line}")
    return 0
