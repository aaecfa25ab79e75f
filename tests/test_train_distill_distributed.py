"""Exact resume of distillation runs (consistency distillation and LCM) with 2 gloo processes (DDP).

One spawn of 2 CPU processes (start-up dominates the cost). In each process, for both kinds: N = 4
optimizer steps straight (2 micro-batches each), versus 2 steps, a checkpoint, a fresh Trainer that
resumes from it and 2 more. The parent checks that the student, its EMA, the target network and the
optimizer state are bit-identical between the two runs on each rank, and equal across the ranks.
Bit-identity holds by construction: the same processes run the same ops on the same inputs (state
restored bit for bit from safetensors, generators from their saved per-rank states, the data order
from its position), and gloo's all-reduce of two ranks sums in a fixed order.

The LCM student takes the w-embedding (``test_train_distill_config.WNet``, ``timestep_cond``) and is
initialised from a teacher of another architecture (``objective.teacher_factory``).
"""

from __future__ import annotations

import datetime
import os
import socket

import pytest
import torch

from fastgen.train import Config, Trainer
from test_train_resume import _assert_identical, _state, _tensor_data

N = 4
KINDS = ("consistency_distillation", "lcm")


def _cfg(out: str, kind: str, teacher: str) -> Config:
    obj = {"kind": kind, "teacher": teacher, "target_decay": 0.9, "init_from_teacher": True, "cond_dropout": 0.2}
    model = {"factory": "test_train_resume:TinyNet"}
    if kind == "consistency_distillation":
        obj.update(cd_num_scales=10)
    else:  # a w-conditioned student, its teacher built by another factory (no w input)
        obj.update(teacher_factory="test_train_resume:TinyNet", lcm_num_ddim_timesteps=10, lcm_w_min=1.0,
                   lcm_w_max=4.0, lcm_embedding_dim=32)
        model = {"factory": "test_train_distill_config:WNet",
                 "kwargs": {"width": 16, "num_classes": 4, "embedding_dim": 32}}
    return Config.from_dict({
        "output_dir": out, "model": model, "objective": obj,
        "optim": {"lr": 1e-3, "lr_scheduler": "cosine", "warmup_steps": 1, "grad_clip": 0.5, "ema_decay": 0.9},
        "train": {"steps": N, "batch_size": 4, "grad_accum": 2, "progress": False, "device": "cpu",
                  "dist_timeout": 60},
        "checkpoint": {"every": 2, "keep_last": 2}})


def _full(tr: Trainer):
    return {"state": _state(tr), "target": {k: v.clone() for k, v in tr.target.state_dict().items()},
            "world": tr.world, "step": tr.step, "batches": tr.batches}


def _worker(rank: int, world: int, port: int, out: str, teacher: str, result_file: str):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        res = {}
        for kind in KINDS:
            quiet = lambda s: None  # noqa: E731
            a = Trainer(_cfg(os.path.join(out, kind, "a"), kind, teacher), dataset=_tensor_data(), log=quiet)
            a.fit()
            b_dir = os.path.join(out, kind, "b")
            Trainer(_cfg(b_dir, kind, teacher), dataset=_tensor_data(), log=quiet).fit(stop_at=N // 2)
            torch.manual_seed(999)  # whatever happened in between does not matter
            lines = []
            b = Trainer(_cfg(b_dir, kind, teacher), dataset=_tensor_data(), resume=True, log=lines.append)
            assert b.step == N // 2, b.step
            b.fit()
            res[kind] = {"a": _full(a), "b": _full(b), "log": lines}
        torch.save(res, f"{result_file}.{rank}")
        dist.barrier()  # both ranks are done with every collective
    except BaseException:
        import traceback

        traceback.print_exc()
        os._exit(1)  # mp.spawn fails the test
    # No gloo teardown: its C++ threads can abort a finished process, which would fail a correct run.
    os._exit(0)


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_distillation_resume_is_bit_exact_with_two_gloo_processes(tmp_path, requires_safetensors):
    import torch.multiprocessing as mp

    from fastgen.train import checkpoint as ckpt
    from test_train_resume import TinyNet

    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available in this build")
    torch.manual_seed(3)
    teacher = str(tmp_path / "teacher.safetensors")
    start = TinyNet().state_dict()
    ckpt.save_tensors(teacher, start)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    res = str(tmp_path / "res")
    mp.spawn(_worker, args=(2, port, str(tmp_path), teacher, res), nprocs=2, join=True)
    r0, r1 = (torch.load(f"{res}.{r}", weights_only=False) for r in (0, 1))
    for kind in KINDS:
        for r in (r0, r1):
            a, b = r[kind]["a"], r[kind]["b"]
            assert a["world"] == b["world"] == 2 and a["step"] == b["step"] == N
            assert a["batches"] == b["batches"] == 2 * N
            _assert_identical(a["state"], b["state"])  # student, EMA, optimizer: straight == stopped + resumed
            assert _same(a["target"], b["target"]), kind  # the target network too
        assert any("resuming from" in s and "step-00000002" in s for s in r0[kind]["log"])  # rank 0 logs
        _assert_identical(r0[kind]["a"]["state"], r1[kind]["a"]["state"])  # DDP: the ranks agree
        assert _same(r0[kind]["a"]["target"], r1[kind]["a"]["target"])
        # the checks can fail: the target is neither the student nor the teacher it started from
        target, student = r0[kind]["a"]["target"], r0[kind]["a"]["state"][0]
        assert not _same(target, student)
        assert not any(torch.equal(target[k], start[k]) for k in start if start[k].is_floating_point())
        ck = tmp_path / kind / "b" / "checkpoints" / f"step-{N:08d}"
        assert (ck / "target.safetensors").exists()
        assert (ck / "rng-rank0.safetensors").read_bytes() != (ck / "rng-rank1.safetensors").read_bytes()
    assert "w.weight" in r0["lcm"]["a"]["target"]  # the LCM student is the w-conditioned one
