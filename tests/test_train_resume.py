"""Exact resume and checkpoint integrity of fastgen.train.

Bit-identity holds by construction here: the same process runs the same ops on the same inputs
(weights and optimizer state restored bit for bit from safetensors, the generators from their
saved states, the data order from its position).
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastgen.train import Config, Trainer
from fastgen.train import checkpoint as ckpt
from fastgen.train.data import TensorImageDataset

# Every test here writes checkpoints (safetensors): each skips alone where it is missing.
pytestmark = pytest.mark.usefixtures("requires_safetensors")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny CPU ops on a shared 2-core machine: one intra-op thread is ~50x faster than two contended."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class TinyNet(nn.Module):
    """A small conditional conv net: ``forward(x, t, class_labels)`` -> same shape as ``x``."""

    def __init__(self, channels: int = 3, num_classes: int = 4, width: int = 16):
        super().__init__()
        self.inp = nn.Conv2d(channels, width, 3, padding=1)
        self.t = nn.Linear(1, width)
        self.y = nn.Embedding(num_classes + 1, width)  # + the null class of classifier-free guidance
        self.mid = nn.Conv2d(width, width, 3, padding=1)
        self.out = nn.Conv2d(width, channels, 3, padding=1)

    def forward(self, x, t, class_labels=None):
        h = self.inp(x) + (self.t(t.float()[:, None] / 1000) + self.y(class_labels))[:, :, None, None]
        return self.out(F.silu(self.mid(F.silu(h))))


def _cfg(out, steps=6, accum=1, kind="flow", **data):
    return Config.from_dict({
        "output_dir": str(out),
        "model": {"factory": "test_train_resume:TinyNet"},
        "objective": {"kind": kind, "cond_dropout": 0.2, "timestep_sampling": "logit_normal",
                      "loss_weighting": "none" if kind == "flow" else "min_snr_gamma"},
        "optim": {"lr": 1e-3, "lr_scheduler": "cosine", "warmup_steps": 2, "grad_clip": 0.5, "ema_decay": 0.9,
                  "weight_decay": 0.01},
        "train": {"steps": steps, "batch_size": 4, "grad_accum": accum, "progress": False, "log_every": 2,
                  "device": "cpu"},  # the bit-exact contract is a CPU one (cuDNN backward may use atomics)
        "checkpoint": {"every": 2, "keep_last": 2},
        "data": data,
    })


def _tensor_data():
    g = torch.Generator().manual_seed(0)
    return TensorImageDataset(torch.rand(24, 3, 8, 8, generator=g) * 2 - 1, torch.arange(24) % 4)


def _state(tr: Trainer):
    return ({k: v.clone() for k, v in tr.model.state_dict().items()},
            {k: v.clone() for k, v in tr.ema.shadow.items()},
            tr.optimizer.state_dict())


def _assert_identical(a, b):
    (wa, ea, oa), (wb, eb, ob) = a, b
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert all(torch.equal(ea[k], eb[k]) for k in ea)
    for pid, st in oa["state"].items():
        for k, v in st.items():
            w = ob["state"][pid][k]
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(w)), (pid, k)
    assert [g["lr"] for g in oa["param_groups"]] == [g["lr"] for g in ob["param_groups"]]


def _straight_and_resumed(tmp_path, make_cfg, make_data, log=None):
    straight = Trainer(make_cfg(tmp_path / "a"), dataset=make_data())
    straight.fit()
    first = Trainer(make_cfg(tmp_path / "b"), dataset=make_data())
    first.fit(stop_at=3)  # an interrupted run: checkpoint at step 3, process "dies"
    del first
    torch.manual_seed(12345)  # whatever happened in between does not matter
    lines = []
    resumed = Trainer(make_cfg(tmp_path / "b"), dataset=make_data(), resume=True, log=lines.append)
    assert resumed.step == 3
    resumed.fit()
    return straight, resumed, lines


@pytest.mark.parametrize("accum,kind", [(1, "flow"), (2, "denoising")])
def test_resume_is_bit_exact(tmp_path, accum, kind):
    straight, resumed, lines = _straight_and_resumed(tmp_path, lambda o: _cfg(o, accum=accum, kind=kind),
                                                     _tensor_data)
    assert straight.step == resumed.step == 6 and straight.batches == resumed.batches == 6 * accum
    _assert_identical(_state(straight), _state(resumed))
    assert any("resuming from" in line and "step-00000003" in line for line in lines)
    # an un-resumed second run differs (the check can fail)
    other = Trainer(_cfg(tmp_path / "c", accum=accum, kind=kind, ), dataset=_tensor_data())
    other.cfg.train.seed = 1
    other.fit(stop_at=1)
    assert not torch.equal(other.model.out.weight, straight.model.out.weight)


def test_resume_is_bit_exact_on_a_bucketed_image_folder(tmp_path):
    pytest.importorskip("PIL")
    from test_train_data import make_shapes_folder

    folder = make_shapes_folder(tmp_path / "data", per_class=4, sizes=[(16, 16), (24, 12)])
    straight, resumed, _ = _straight_and_resumed(
        tmp_path, lambda o: _cfg(o, accum=2, path=str(folder), resolution=16, bucketing=True, bucket_step=4),
        lambda: None)
    assert len(straight.dataset.bucket_counts()) == 2
    _assert_identical(_state(straight), _state(resumed))


def test_checkpoint_files_retention_and_log(tmp_path):
    tr = Trainer(_cfg(tmp_path, steps=6), dataset=_tensor_data())
    tr.cfg.checkpoint.keep_every = 4
    tr.fit()
    root = tmp_path / "checkpoints"
    assert ckpt.list_steps(str(root)) == [4, 6]  # keep_last 2 (4, 6) + multiples of 4
    files = set(os.listdir(root / "step-00000006"))
    assert {"model.safetensors", "ema.safetensors", "optimizer.safetensors", "rng-rank0.safetensors",
            "rng-rank0.json", "state.json", "config.toml", "index.json"} <= files
    assert Config.from_toml(str(root / "step-00000006" / "config.toml")).optim.lr == 1e-3
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "loss.png").stat().st_size > 1000
    rows = (tmp_path / "log.csv").read_text().splitlines()
    assert rows[0] == "step,loss,lr,grad_norm,seconds" and [r.split(",")[0] for r in rows[1:]] == ["2", "4", "6"]


def test_bf16_autocast_and_validation_grid(tmp_path, requires_image_writer):
    cfg = _cfg(tmp_path, steps=2)
    cfg.train.precision = "bf16"
    cfg.validation.every, cfg.validation.per_class, cfg.validation.num_steps = 2, 2, 3
    cfg.validation.sampler, cfg.validation.guidance_scale = "builtin", 2.0
    tr = Trainer(cfg, dataset=_tensor_data())
    seen = []
    inner = tr.model.forward
    tr.model.forward = lambda *a, **k: seen.append(torch.is_autocast_enabled("cpu")) or inner(*a, **k)
    losses = tr.fit()["losses"]
    assert all(torch.isfinite(torch.tensor(v)) for _, v in losses)
    assert seen[:2] == [True, True]  # the training forwards ran under bf16 autocast
    assert all(p.dtype == torch.float32 for p in tr.model.parameters())
    Image = pytest.importorskip("PIL.Image")

    grid = Image.open(tmp_path / "samples" / "step-00000002.png")
    assert grid.size == (2 * 10 + 2, 4 * 10 + 2)  # 4 classes x 2 samples of 8x8, 2-pixel borders


def test_corrupted_and_partial_checkpoints_are_detected(tmp_path):
    tr = Trainer(_cfg(tmp_path, steps=6), dataset=_tensor_data())
    tr.cfg.checkpoint.keep_last = 3
    tr.fit()
    root = str(tmp_path / "checkpoints")
    assert ckpt.list_steps(root) == [2, 4, 6] and all(ckpt.verify(ckpt.step_dir(root, s)) is None for s in (2, 4, 6))
    # step 6: one flipped byte (same size) -> hash mismatch
    p6 = os.path.join(ckpt.step_dir(root, 6), "model.safetensors")
    data = bytearray(open(p6, "rb").read())
    data[-5] ^= 0xFF
    open(p6, "wb").write(bytes(data))
    assert "model.safetensors does not match its SHA-256" in ckpt.verify(ckpt.step_dir(root, 6))
    # step 4: truncated optimizer file -> size mismatch
    p4 = os.path.join(ckpt.step_dir(root, 4), "optimizer.safetensors")
    os.truncate(p4, os.path.getsize(p4) // 2)
    assert "optimizer.safetensors has" in ckpt.verify(ckpt.step_dir(root, 4))
    # an interrupted write (no index) is not a checkpoint either
    os.makedirs(ckpt.step_dir(root, 8))
    lines = []
    resumed = Trainer(_cfg(tmp_path, steps=6), dataset=_tensor_data(), resume=True, log=lines.append)
    assert resumed.step == 2
    text = "\n".join(lines)
    assert "step-00000008 is corrupted: no index.json" in text
    assert "step-00000006 is corrupted: model.safetensors does not match" in text
    assert "step-00000004 is corrupted: optimizer.safetensors has" in text
    assert "resuming from" in text and "step-00000002 (step 2)" in text
    # nothing good left -> a clear error, not a silent restart
    os.remove(os.path.join(ckpt.step_dir(root, 2), "state.json"))
    with pytest.raises(ckpt.CheckpointError, match="no good checkpoint"):
        Trainer(_cfg(tmp_path, steps=6), dataset=_tensor_data(), resume=True, log=lines.append)


def test_lr_schedules_match_diffusers():
    pytest.importorskip("diffusers")
    from diffusers.optimization import get_scheduler

    from fastgen.train.loop import BUILTIN_SCHEDULES, builtin_lr_lambda

    for name in BUILTIN_SCHEDULES:
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        s = get_scheduler(name, opt, num_warmup_steps=5, num_training_steps=40)
        f = builtin_lr_lambda(name, 5, 40)
        for step in range(40):
            assert s.get_last_lr()[0] == pytest.approx(f(step), abs=1e-12), (name, step)
            opt.step()
            s.step()


def _ddp_worker(rank: int, world: int, port: int, out: str, result_file: str):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        make = lambda o: _cfg(o, steps=4, accum=2)  # noqa: E731
        a = Trainer(make(os.path.join(out, "a")), dataset=_tensor_data(), log=lambda s: None)
        a.fit()
        Trainer(make(os.path.join(out, "b")), dataset=_tensor_data(), log=lambda s: None).fit(stop_at=2)
        torch.manual_seed(999)
        b = Trainer(make(os.path.join(out, "b")), dataset=_tensor_data(), resume=True, log=lambda s: None)
        assert b.step == 2
        b.fit()
        torch.save({"a": _state(a), "b": _state(b)}, f"{result_file}.{rank}")
        dist.barrier()  # both ranks are done with every collective
    except BaseException:
        import traceback

        traceback.print_exc()
        os._exit(1)  # mp.spawn fails the test
    # No gloo teardown: its C++ threads can abort a finished process ("terminate called without an
    # active exception"), which would fail a correct run.
    os._exit(0)


def test_resume_is_bit_exact_with_two_gloo_processes(tmp_path):
    import socket

    import torch.multiprocessing as mp

    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available in this build")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    res = str(tmp_path / "state")
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path), res), nprocs=2, join=True)
    r0, r1 = (torch.load(f"{res}.{r}", weights_only=False) for r in (0, 1))
    _assert_identical(r0["a"], r0["b"])  # straight == stopped + resumed
    _assert_identical(r1["a"], r1["b"])
    _assert_identical(r0["a"], r1["a"])  # DDP keeps the ranks' weights and optimizer states equal
    # each rank saved its own generator states, and they differ (different noise per rank)
    ck = tmp_path / "b" / "checkpoints" / "step-00000004"
    assert (ck / "rng-rank0.safetensors").read_bytes() != (ck / "rng-rank1.safetensors").read_bytes()
    # 2 -> 1 process: the weights, EMA and optimizer continue; the noise streams are reseeded, said so
    lines = []
    cfg = _cfg(tmp_path / "b", steps=5, accum=2)
    one = Trainer(cfg, dataset=_tensor_data(), resume=True, log=lines.append)
    assert one.step == 4 and one.batches == 2 * 8  # 8 batches of each of 2 ranks = 16 of one
    w, e, _ = _state(one)
    assert all(torch.equal(w[k], r0["b"][0][k]) for k in w) and all(torch.equal(e[k], r0["b"][1][k]) for k in e)
    assert any("written by 2 process(es), this run has 1" in line for line in lines)
    one.fit()
    assert one.step == 5


def test_pure_bf16_with_stochastic_rounding_resumes_bit_exact(tmp_path):
    """bf16 weights, FusedAdamW stochastic rounding (its generator is checkpointed), a fastgen DiT
    with gradient checkpointing, built by the config's factory."""
    def make(o):
        cfg = _cfg(o, steps=4)
        cfg.model.factory = "fastgen.models:DiT"
        cfg.model.kwargs = dict(in_channels=3, sample_size=8, patch_size=4, num_attention_heads=1,
                                attention_head_dim=8, num_layers=1, num_embeds_ada_norm=4, class_dropout_prob=0.1)
        cfg.model.gradient_checkpointing = True
        cfg.objective.cond_dropout = 0.0
        cfg.train.precision = "bf16-pure"
        return cfg

    straight, resumed, _ = _straight_and_resumed(tmp_path, make, _tensor_data)
    assert straight.model.gradient_checkpointing
    assert all(p.dtype == torch.bfloat16 for p in straight.model.parameters())
    assert all(s.dtype == torch.float32 for s in straight.ema.shadow.values())
    _assert_identical(_state(straight), _state(resumed))
