"""FusedAdamW under torch.distributed on CPU: DDP and FSDP2 (fully_shard), 2 processes, gloo.

Each rank trains on its own data; the result must equal one process training on the
ranks' mean gradient with torch.optim.AdamW. Under FSDP2 the parameters are DTensors
and the optimizer updates each rank's local shard.
"""

from __future__ import annotations

import copy
import os
import socket
import sys
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import INTERPRET

from fastgen.optim import FusedAdamW, clip_grad_norm_

WORLD = 2
STEPS = 8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _batch(step: int, rank: int) -> torch.Tensor:
    return torch.randn(4, 8, generator=torch.Generator().manual_seed(1000 * step + rank))


def _worker(rank: int, port: int, kind: str, backend: str) -> None:
    """Runs the check in a spawned process and leaves with os._exit: 1 with the traceback on any
    failure (mp.spawn then fails the test), 0 otherwise. The gloo group is not torn down: its C++
    threads can abort a process at teardown ("terminate called without an active exception", seen
    in CI) after every check has passed, which would fail a correct run."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        _check(rank, kind, backend)
        dist.barrier()  # both ranks are done with every collective
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _check(rank: int, kind: str, backend: str) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    ref = copy.deepcopy(model)
    if kind == "ddp":
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
    else:
        from torch.distributed.fsdp import fully_shard

        fully_shard(model)
        wrapped = model
    opt = FusedAdamW(wrapped.parameters(), lr=1e-2, backend=backend)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, foreach=False)
    for step in range(STEPS):
        wrapped(_batch(step, rank)).square().mean().backward()
        clip_grad_norm_(wrapped.parameters(), 1e9, backend="torch")  # a no-op clip that must accept DTensors
        opt.step()
        opt.zero_grad()
        (sum(ref(_batch(step, r)).square().mean() for r in range(WORLD)) / WORLD).backward()
        ref_opt.step()
        ref_opt.zero_grad()
    for p, q in zip(wrapped.parameters(), ref.parameters()):
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        torch.testing.assert_close(full.detach(), q.detach(), atol=1e-5, rtol=1e-5)
    if kind == "fsdp2":
        shard = next(iter(wrapped.parameters()))
        assert type(shard).__name__ == "DTensor"
        assert shard.to_local().numel() < shard.numel()  # really sharded


@pytest.mark.parametrize("kind, backend", [("ddp", "torch"), ("fsdp2", "torch"), ("fsdp2", "triton")])
def test_fused_adamw_distributed(kind, backend):
    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this build")
    if backend == "triton" and not INTERPRET:
        pytest.skip("gloo runs on CPU tensors: the Triton path needs TRITON_INTERPRET=1 there "
                    "(the GPU tier tests FusedAdamW on CUDA tensors)")
    mp.spawn(_worker, args=(_free_port(), kind, backend), nprocs=WORLD, join=True)
