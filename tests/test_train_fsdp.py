"""FSDP2 training and sharded (DCP) checkpoints of fastgen.train, on gloo CPU processes.

One spawn of 2 processes checks, in order (process start-up dominates the cost on a busy CPU):
- FSDP2 (``train.parallel = "fsdp"``) trains the same weights and optimizer state as DDP on the
  same data and noise (up to the order of float sums: gradients are reduce-scattered in shards);
- validation sampling under FSDP2 (every rank runs the sharded model, rank 0 writes the grid);
- FSDP2 stop + resume with the same 2 processes is bit-exact (same ops on the same inputs);
- a checkpoint written by 1 process loads into 2 (1 -> 2): the gathered weights, EMA and
  optimizer state equal the writer's bit for bit (DCP copies the bytes);
- a rank that dies mid-run fails the other with the trainer's message, not a hang.
The parent then loads the 2-process checkpoint into 1 process (2 -> 1) and compares the same way.
"""

from __future__ import annotations

import datetime
import os
import socket
import time

import pytest
import torch

from fastgen.train import Trainer
from test_train_resume import _cfg, _tensor_data


def _fsdp_cfg(out, steps=2, parallel="fsdp"):
    cfg = _cfg(out, steps=steps, accum=2)
    cfg.train.parallel = parallel
    cfg.checkpoint.every = 1
    return cfg


def _full_state(tr: Trainer) -> dict:
    """Weights, EMA shadows and optimizer state by parameter name, gathered to full tensors."""
    from fastgen.train.distributed import _ema_tensors

    def full(t):
        return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()

    named = dict(tr.model.named_parameters())
    ema = _ema_tensors(tr.ema, tr.model)
    return {"weights": {n: full(p) for n, p in named.items()},
            "ema": {n: full(ema[f"shadow.{n}"]) for n in tr.ema.shadow},
            "optimizer": {n: {k: full(v) for k, v in tr.optimizer.state[p].items()} for n, p in named.items()},
            "step": tr.step, "batches": tr.batches}


def _assert_states(a: dict, b: dict, exact: bool) -> None:
    check = (lambda x, y, n: torch.testing.assert_close(x, y, rtol=0, atol=0, msg=n)) if exact else (
        lambda x, y, n: torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6, msg=n))
    assert a["weights"].keys() == b["weights"].keys()
    for n in a["weights"]:
        check(a["weights"][n], b["weights"][n], f"weights {n}")
        check(a["ema"][n], b["ema"][n], f"ema {n}")
        assert a["optimizer"][n].keys() == b["optimizer"][n].keys() == {"step", "exp_avg", "exp_avg_sq"}
        for k in a["optimizer"][n]:
            check(a["optimizer"][n][k].float(), b["optimizer"][n][k].float(), f"optimizer {n}.{k}")


def _worker(rank: int, world: int, port: int, out: str, result_file: str):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=20))
    quiet = lambda s: None  # noqa: E731
    res = {}
    ddp = Trainer(_fsdp_cfg(os.path.join(out, "ddp"), parallel="ddp"), dataset=_tensor_data(), log=quiet)
    ddp.fit()
    fcfg = _fsdp_cfg(os.path.join(out, "fsdp"))  # + a validation grid: every rank runs the sharded model
    fcfg.validation.every, fcfg.validation.per_class, fcfg.validation.num_steps = 2, 1, 2
    fcfg.validation.sampler, fcfg.validation.guidance_scale = "builtin", 2.0
    fs = Trainer(fcfg, dataset=_tensor_data(), log=quiet)
    res["sharded"] = all(hasattr(p, "full_tensor") for p in fs.model.parameters())
    res["local_numel"] = sum(p.to_local().numel() for p in fs.model.parameters())
    fs.fit()
    res["ddp"], res["fsdp"] = _full_state(ddp), _full_state(fs)
    # same-world stop + resume
    Trainer(_fsdp_cfg(os.path.join(out, "fsdp_b")), dataset=_tensor_data(), log=quiet).fit(stop_at=1)
    torch.manual_seed(4321)
    rb = Trainer(_fsdp_cfg(os.path.join(out, "fsdp_b")), dataset=_tensor_data(), resume=True, log=quiet)
    rb.fit()
    res["resumed"] = _full_state(rb)
    # 1 -> 2: the one-process checkpoint written by the parent
    lines = []
    r12 = Trainer(_fsdp_cfg(os.path.join(out, "one")), dataset=_tensor_data(), resume=True, log=lines.append)
    res["one_to_two"], res["one_to_two_log"] = _full_state(r12), lines
    torch.save(res, f"{result_file}.{rank}")
    # a rank dies mid-run: the other must fail fast with the trainer's message
    kill = Trainer(_fsdp_cfg(os.path.join(out, "kill"), steps=4, parallel="ddp"), dataset=_tensor_data(), log=quiet)
    if rank == 1:
        inner = kill.model.forward
        calls = []

        def dying(*a, **k):
            calls.append(1)
            if len(calls) == 3:  # step 2, first micro-batch
                os._exit(0)
            return inner(*a, **k)

        kill.model.forward = dying
    t0 = time.time()
    try:
        kill.fit()
        msg = "no error"
    except RuntimeError as exc:
        msg = str(exc)
    with open(f"{result_file}.kill", "w") as fh:
        fh.write(f"{time.time() - t0:.1f}\n{msg}")
    os._exit(0)  # the group is broken: skip its teardown


def test_fsdp_matches_ddp_resumes_and_reshards_2_to_1_and_1_to_2(tmp_path):
    import torch.multiprocessing as mp

    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available in this build")
    pytest.importorskip("safetensors")
    torch.set_num_threads(1)
    # the 1 -> 2 source: one process, train.parallel = "fsdp" (unsharded, DCP checkpoint)
    one = Trainer(_fsdp_cfg(tmp_path / "one"), dataset=_tensor_data(), log=lambda s: None)
    one.fit()
    ref_one = _full_state(one)
    assert os.path.isfile(tmp_path / "one" / "checkpoints" / "step-00000002" / "dcp" / ".metadata")

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    res = str(tmp_path / "res")
    mp.spawn(_worker, args=(2, port, str(tmp_path), res), nprocs=2, join=True)
    r0, r1 = (torch.load(f"{res}.{r}", weights_only=False) for r in (0, 1))

    assert os.path.getsize(tmp_path / "fsdp" / "samples" / "step-00000002.png") > 0
    n_params = sum(p.numel() for p in one.model.parameters())
    assert r0["sharded"] and r1["sharded"] and r0["local_numel"] + r1["local_numel"] == n_params
    assert r0["local_numel"] < n_params
    _assert_states(r0["fsdp"], r1["fsdp"], exact=True)  # the gathered state is one state
    _assert_states(r0["fsdp"], r0["ddp"], exact=False)  # FSDP2 == DDP up to summation order
    assert not torch.equal(r0["fsdp"]["weights"]["out.weight"], ref_one["weights"]["out.weight"])  # it trained
    _assert_states(r0["fsdp"], r0["resumed"], exact=True)  # stop + resume, same 2 processes
    _assert_states(r0["one_to_two"], ref_one, exact=True)  # 1 -> 2
    _assert_states(r1["one_to_two"], ref_one, exact=True)
    assert any("written by 1 process(es), this run has 2" in s for s in r0["one_to_two_log"])

    # 2 -> 1: the sharded checkpoint into one process
    lines = []
    two_one = Trainer(_fsdp_cfg(tmp_path / "fsdp", steps=3), dataset=_tensor_data(), resume=True, log=lines.append)
    _assert_states(_full_state(two_one), r0["fsdp"], exact=True)
    assert two_one.batches == 2 * 2 * 2 and any("written by 2 process(es), this run has 1" in s for s in lines)
    loss = two_one.fit()["losses"][-1][1]
    assert torch.isfinite(torch.tensor(loss)) and two_one.step == 3

    seconds, msg = open(f"{res}.kill").read().split("\n", 1)
    assert "rank 0 of 2: a collective operation failed at step 2" in msg, msg
    assert "another process probably died" in msg and float(seconds) < 60  # the group timeout is 20 s


def test_fsdp_config_and_ddp_checkpoint_refusal(tmp_path):
    from fastgen.train import Config, ConfigError

    with pytest.raises(ConfigError, match="train.parallel must be one of 'ddp', 'fsdp'"):
        Config.from_dict({"train": {"parallel": "zero3"}})
    with pytest.raises(ConfigError, match="train.dist_timeout must be > 0"):
        Config.from_dict({"train": {"dist_timeout": 0}})
    assert "parallel = \"ddp\"" in Config().to_toml() and "dist_timeout = 600.0" in Config().to_toml()
