"""``fastgen train CONFIG.toml [--resume] [--print-config]`` (wired into ``fastgen.cli``).

Under ``torchrun --nproc-per-node N -m fastgen train CONFIG.toml`` every process runs this;
the Trainer creates the process group from torchrun's environment.
"""

from __future__ import annotations

import sys


def add_parser(sub) -> None:
    t = sub.add_parser("train", help="train a diffusion / flow model from a TOML config",
                       description="Train the model a TOML config describes (see docs/train.md). Checkpoints, "
                                   "log.csv, loss.png and sample grids go to the config's output_dir.")
    t.add_argument("config", help="the TOML config file")
    t.add_argument("--resume", action="store_true",
                   help="continue from the newest good checkpoint in output_dir/checkpoints")
    t.add_argument("--print-config", action="store_true",
                   help="print the resolved config (every key, with its documentation) and exit")


def run(args) -> int:
    from fastgen.zoo.train import is_zoo_config, run as run_zoo

    if is_zoo_config(args.config):  # a [zoo] table: GAN / VAE / flow / score models (fastgen.zoo.train)
        return run_zoo(args)
    from fastgen.train.checkpoint import CheckpointError
    from fastgen.train.config import Config, ConfigError
    from fastgen.train.data import DataError

    try:
        cfg = Config.from_toml(args.config)
    except (OSError, ConfigError) as exc:
        print(f"fastgen train: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        print(cfg.to_toml(), end="")
        return 0
    from fastgen.train.loop import Trainer

    try:
        result = Trainer(cfg, resume=args.resume).fit()
    except (ConfigError, DataError) as exc:
        print(f"fastgen train: {exc}", file=sys.stderr)
        return 2
    except CheckpointError as exc:
        print(f"fastgen train: {exc}", file=sys.stderr)
        return 1
    if result["checkpoint"]:
        print(f"fastgen train: step {result['step']}, checkpoint {result['checkpoint']}")
    return 0
