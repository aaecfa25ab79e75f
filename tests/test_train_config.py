"""fastgen.train.config: validation errors that name the key, documented defaults, TOML round trip; the CLI."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import pytest

from fastgen.train.config import SECTIONS, Config, ConfigError

ROOT = Path(__file__).resolve().parent.parent


def _err(d: dict) -> str:
    with pytest.raises(ConfigError) as e:
        Config.from_dict(d)
    return str(e.value)


def test_defaults_are_valid_and_every_field_is_documented():
    Config().validate()
    for section in [Config, *SECTIONS.values()]:
        for f in dataclasses.fields(section):
            if f.name not in SECTIONS:
                assert len(f.metadata.get("doc", "")) > 10, f"{section.__name__}.{f.name} has no documentation"


def test_unknown_keys_are_named():
    assert _err({"data": {"reslution": 16}}) == "unknown key 'data.reslution' (did you mean 'data.resolution'?)"
    assert "unknown key 'optimizer'" in _err({"optimizer": {}}) and "'optim'" in _err({"optimizer": {}})
    assert "unknown key 'train.xyz' (known: steps, batch_size" in _err({"train": {"xyz": 1}})


@pytest.mark.parametrize("d,msg", [
    ({"train": {"steps": "10"}}, "train.steps must be int, got str"),
    ({"train": {"steps": True}}, "train.steps must be int, got bool"),
    ({"train": {"progress": 1}}, "train.progress must be bool"),
    ({"data": {"path": 3}}, "data.path must be str"),
    ({"model": []}, "[model] must be a table"),
    ({"train": {"steps": 0}}, "train.steps must be > 0, got 0"),
    ({"optim": {"lr": 0}}, "optim.lr must be > 0"),
    ({"objective": {"cond_dropout": 1.5}}, "objective.cond_dropout must be in [0, 1)"),
    ({"objective": {"kind": "gan"}}, "objective.kind must be one of 'flow', 'denoising'"),
    ({"objective": {"loss_weighting": "snr"}}, "objective.loss_weighting must be one of 'none', 'sigma_sqrt', "
                                               "'cosmap' for flow, got 'snr'"),
    ({"objective": {"kind": "denoising", "loss_weighting": "cosmap"}}, "for denoising"),
    ({"objective": {"kind": "denoising", "prediction": "eps"}}, "objective.prediction must be one of"),
    ({"objective": {"timestep_sampling": "shifted"}}, "needs objective.shift != 1"),
    ({"data": {"resolution": 20}}, "data.resolution (20) must be a multiple of data.bucket_step (8)"),
    ({"data": {"on_bad": "ignore"}}, "data.on_bad must be one of 'error', 'skip'"),
    ({"optim": {"betas": [0.9]}}, "optim.betas must be two numbers"),
    ({"optim": {"ema_decay": 1.0}}, "optim.ema_decay must be in [0, 1)"),
    ({"checkpoint": {"keep_last": 0}}, "checkpoint.keep_last must be > 0"),
    ({"train": {"precision": "fp16"}}, "train.precision must be one of 'fp32', 'bf16'"),
    ({"model": {"factory": "fastgen.models.DiT"}}, "model.factory must look like 'module:callable'"),
])
def test_invalid_values_are_explained(d, msg):
    assert msg in _err(d)


def test_ints_are_accepted_as_floats_and_toml_round_trips(tmp_path):
    cfg = Config.from_dict({"optim": {"lr": 1, "betas": [0.9, 0.95]}, "model": {"kwargs": {"a": 1, "b": "x"}}})
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    text = cfg.to_toml()
    assert "# peak learning rate" in text
    assert Config.from_dict(tomllib.loads(text)) == cfg
    p = tmp_path / "c.toml"
    p.write_text("[train]\nsteps = 5\n[data]\nresolution = 1x\n")
    with pytest.raises(ConfigError, match="c.toml: not valid TOML"):
        Config.from_toml(str(p))


def test_shipped_config_is_valid():
    cfg = Config.from_toml(str(ROOT / "configs" / "train" / "dit_shapes.toml"))
    assert cfg.model.factory == "fastgen.models:DiT" and cfg.train.steps == 300


def test_the_config_in_docs_train_md_is_valid():
    import re

    text = (ROOT / "docs" / "train.md").read_text()
    block = re.search(r"```toml\n(.*?)```", text, re.S).group(1)
    assert len(block.strip().splitlines()) <= 11
    cfg = Config.from_dict(tomllib.loads(block))
    assert cfg.model.factory == "fastgen.models:DiT" and cfg.data.path == "data/shapes"


def test_cli_print_config_and_errors(tmp_path, capsys):
    from fastgen.cli import main

    p = tmp_path / "c.toml"
    p.write_text('output_dir = "x"\n[train]\nsteps = 7\n')
    assert main(["train", str(p), "--print-config"]) == 0
    out = capsys.readouterr().out
    assert Config.from_dict(tomllib.loads(out)).train.steps == 7
    p.write_text("[train]\nstep = 7\n")
    assert main(["train", str(p)]) == 2
    assert "unknown key 'train.step' (did you mean 'train.steps'?)" in capsys.readouterr().err
    assert main(["train", str(tmp_path / "missing.toml")]) == 2


def test_cli_trains_and_resumes(tmp_path, capsys):
    pytest.importorskip("PIL")
    import torch

    from fastgen.cli import main
    from test_train_data import make_shapes_folder

    folder = make_shapes_folder(tmp_path / "data", per_class=2, size=8)
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'output_dir = "{tmp_path / "run"}"\n[model]\nfactory = "test_train_resume:TinyNet"\n'
                   f'[data]\npath = "{folder}"\nresolution = 8\n[train]\nsteps = 2\nbatch_size = 4\nprogress = false\n'
                   "[checkpoint]\nevery = 1\n")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["train", str(cfg)]) == 0
        assert "step 2, checkpoint" in capsys.readouterr().out
        cfg.write_text(cfg.read_text().replace("steps = 2", "steps = 3"))
        assert main(["train", str(cfg), "--resume"]) == 0
    finally:
        torch.set_num_threads(n)
    out = capsys.readouterr().out
    assert "resuming from" in out and "(step 2)" in out and "step 3, checkpoint" in out
