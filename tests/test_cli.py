"""The ``fastgen`` command: ``info`` and ``bench``, called in-process through ``main``."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from fastgen.cli import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

INFO_KEYS = {
    "fastgen", "python", "platform", "torch", "torch_cuda", "triton", "cuda_available", "gpus",
    "extension", "triton_interpret", "default_backend", "fastgen_backend_env", "auto",
}


def test_info_json(capsys):
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert INFO_KEYS <= set(info)
    assert info["torch"] == torch.__version__
    assert info["cuda_available"] == torch.cuda.is_available()
    assert isinstance(info["extension"]["built"], bool)
    if not info["extension"]["built"]:
        assert info["extension"]["error"]
    from fastgen import backend

    assert set(info["auto"]) == set(backend.AUTO_ON_CUDA)
    from fastgen.kernels import autotune

    assert info["tuning"]["autotune"] == autotune.enabled()
    assert info["tuning"]["tma"] == any(float(g["capability"]) >= 9 for g in info["gpus"])
    for op, picks in info["auto"].items():
        assert picks["cpu"] == backend.resolve(op, "auto", torch.device("cpu"))
        listed = backend.AUTO_ON_CUDA[op]
        runnable = listed == "torch" or backend.unavailable_reason(listed, torch.device("cuda")) is None
        assert picks["cuda"] == (listed if runnable else "torch")


def test_info_text(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for word in ("fastgen", "torch", "triton", "CUDA available", "fastgen._C", "TRITON_INTERPRET",
                 "default backend", "rms_norm", "autotune"):
        assert word in out


def test_info_follows_triton_interpret(capsys, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert main(["info", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["triton_interpret"] is True


def test_python_dash_m():
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-m", "fastgen", "info", "--json"], capture_output=True,
                         text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    assert INFO_KEYS <= set(json.loads(res.stdout))


def test_bench_quick_cpu(tmp_path, capsys):
    out = tmp_path / "res"
    # torch.compile is left out to keep this fast (its first CPU compile takes ~20 s);
    # it runs in the default provider list of a real `fastgen bench`.
    rc = main(["bench", "--quick", "--out", str(out), "--ops", "rms_norm", "--device", "cpu",
               "--providers", "torch,fastgen-triton,liger-kernel", "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "need a GPU" in printed
    data = json.loads((out / "results.json").read_text())
    rows = data["rows"]
    assert {r["provider"] for r in rows} == {"torch", "fastgen-triton", "liger-kernel"}
    assert {r["mode"] for r in rows} == {"fwd", "bwd", "fwd+bwd"}
    assert all(r["status"] == "ok" for r in rows if r["provider"] == "torch")
    assert all(r["status"].startswith("skipped") for r in rows if r["provider"] != "torch")
    assert data["header"]["device"] == "cpu"
    assert (out / "results.md").exists()
    if importlib.util.find_spec("matplotlib") is not None:  # plots need matplotlib; the tables do not
        assert (out / "rms_norm.png").exists()


def test_bench_default_out_is_the_current_directory(tmp_path, capsys, monkeypatch):
    """Without --out: ./fastgen-bench/<device>/, never the installed package's folder."""
    from fastgen.cli import _benchmarks_package
    import importlib

    harness = importlib.import_module(_benchmarks_package().__name__ + ".harness")

    def snapshot():
        return {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns
                for d, _, fs in os.walk(harness.PACKAGE_DIR) for f in fs if not f.endswith(".pyc")}

    before = snapshot()
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "--quick", "--ops", "rms_norm", "--device", "cpu", "--providers", "torch",
                 "--modes", "fwd", "--no-progress"]) == 0
    assert (tmp_path / "fastgen-bench" / "cpu" / "results.json").exists()
    assert str(tmp_path / "fastgen-bench" / "cpu") in capsys.readouterr().out
    assert snapshot() == before


def test_bench_unwritable_out_is_a_message_not_a_traceback(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main(["bench", "--quick", "--ops", "rms_norm", "--device", "cpu", "--providers", "torch",
                 "--out", str(blocker / "res"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"cannot write the reports to {blocker / 'res'}" in err and "--out DIR" in err


def test_version(capsys):
    import fastgen

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"fastgen {fastgen.__version__}"


def test_bench_rejects_bad_arguments(tmp_path, capsys):
    assert main(["bench", "--ops", "no_such_op", "--out", str(tmp_path)]) == 2
    assert "no benchmark for no_such_op" in capsys.readouterr().err
    assert main(["bench", "--ops", "rms_norm", "--providers", "nope", "--out", str(tmp_path)]) == 2
    if not torch.cuda.is_available():
        assert main(["bench", "--device", "cuda", "--out", str(tmp_path)]) == 2
        assert "no CUDA GPU" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "bench" in capsys.readouterr().out
