"""More than one process: FSDP2 sharding, sharded (DCP) checkpoints and failing fast on a dead rank.

``train.parallel = "ddp"`` replicates the model on every rank and all-reduces gradients
(``DistributedDataParallel``). ``"fsdp"`` shards it with FSDP2 (``torch.distributed.fsdp.
fully_shard``): with ``P`` processes each rank holds ``1/P`` of every parameter, gradient and
optimizer moment (dim-0 shards, DTensors), all-gathers a block's weights for its forward and
backward and reduce-scatters its gradients::

    params (N,)  -> P shards of about N / P  (parameters, grads, exp_avg, exp_avg_sq, EMA shadow)
    forward/backward of block b:  all_gather(shards_b) -> full weights -> free after use
    grad of block b:              reduce_scatter(mean over ranks) -> the local shard

Sharding policy (:func:`shard_model`): every entry of an ``nn.ModuleList`` that holds parameters
(the transformer blocks of ``fastgen.models``, a U-Net's down / up blocks) becomes its own FSDP
unit, outermost lists first; the root takes what is left (embeddings, final norm and head).
On one process nothing is sharded (there is nothing to shard across) but checkpoints still take
the DCP format, so a one-process run and a sharded run exchange checkpoints.

Checkpoints (:func:`save_dcp` / :func:`load_dcp`): the model, optimizer and EMA state go to
``<checkpoint>/dcp/`` through ``torch.distributed.checkpoint``: each rank writes its own shards,
and the metadata records every tensor's global shape, so a checkpoint written by ``P`` processes
loads into ``Q`` processes (or one) — DCP reads the pieces each rank's shards overlap. The
optimizer state is keyed by parameter name (``get_state_dict``), so it does not depend on
parameter order or sharding. The EMA shadows (plain local shards in :class:`fastgen.optim.EMA`)
are wrapped as DTensors with their parameter's layout for saving and loading.

Gradient clipping under FSDP uses ``torch.nn.utils.clip_grad_norm_``, which reduces the norm over
the shards (a kernel over local shards would see only ``1/P`` of the gradient).

Failures: the process group is created with ``train.dist_timeout`` seconds, so a collective
whose peer died or stalled fails within that time; :func:`collective_failure` turns the error
into one message that names the rank and the step.
"""

from __future__ import annotations

import datetime
import os
import warnings

import torch

DCP_DIR = "dcp"


def init_distributed(device: torch.device, timeout_s: float = 600.0) -> tuple[int, int]:
    """``(rank, world_size)``: the existing process group, one from torchrun's environment, or ``(0, 1)``."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=timeout_s))
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_sharded(t) -> bool:
    return hasattr(t, "device_mesh") and hasattr(t, "to_local")


def shard_model(model: torch.nn.Module, device: torch.device) -> list[str]:
    """FSDP2 ``fully_shard`` of ``model`` in place (see the module docstring); returns the unit names."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    units: list[str] = []
    for name, m in model.named_modules():
        if not isinstance(m, torch.nn.ModuleList) or any(name.startswith(u + ".") for u in units):
            continue
        for i, child in enumerate(m):
            if any(p.requires_grad for p in child.parameters()):
                fully_shard(child, mesh=mesh)
                units.append(f"{name}.{i}" if name else str(i))
    fully_shard(model, mesh=mesh)
    return units + ["<root>"]


def clip_sharded_grad_norm_(params, max_norm: float) -> float:
    """The global gradient norm of DTensor (sharded) parameters, clipped to ``max_norm`` in place."""
    total = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return float(total.full_tensor() if hasattr(total, "full_tensor") else total)


def _ema_tensors(ema, model) -> dict:
    """The EMA's shadows (as DTensors with their parameter's layout when sharded) and buffers."""
    from torch.distributed.tensor import DTensor

    named = dict(model.named_parameters())
    out = {}
    for n, s in ema.shadow.items():
        p = named[n]
        out[f"shadow.{n}"] = (DTensor.from_local(s, p.device_mesh, p.placements, shape=p.shape, stride=p.stride(),
                                                 run_check=False) if is_sharded(p) else s)
    for n, b in ema.buffers.items():
        out[f"buffer.{n}"] = b
    return out


def _state(model, optimizer, ema) -> dict:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, optimizer)
    state = {"model": msd, "optimizer": osd}
    if ema is not None:
        state["ema"] = _ema_tensors(ema, model)
    return state


def save_dcp(folder: str, model, optimizer, ema=None) -> None:
    """Model, optimizer (by parameter name) and EMA to ``folder/dcp`` (a collective on every rank)."""
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():  # one process: "assuming the intent is to save in a single process"
        warnings.filterwarnings("ignore", message=".*single process.*")
        dcp.save(_state(model, optimizer, ema), checkpoint_id=os.path.join(folder, DCP_DIR))


def load_dcp(folder: str, model, optimizer, ema=None) -> None:
    """Load what :func:`save_dcp` wrote, resharded to this run's processes (a collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    from fastgen.optim._common import local

    state = _state(model, optimizer, ema)  # the targets, in this run's layout (creates the optimizer state)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*single process.*")
        dcp.load(state, checkpoint_id=os.path.join(folder, DCP_DIR))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    if ema is not None:
        et = state["ema"]
        for n, s in ema.shadow.items():
            s.copy_(local(et[f"shadow.{n}"]))
        for n, b in ema.buffers.items():
            b.copy_(et[f"buffer.{n}"])


def collective_failure(exc: BaseException, rank: int, world: int, step: int, timeout_s=None) -> RuntimeError:
    """One clear error for a collective that failed because another process died or stalled
    (``timeout_s``: the group's timeout when the trainer created it, else None)."""
    limit = f"train.dist_timeout = {timeout_s:g} s" if timeout_s else "the process group's own timeout"
    return RuntimeError(
        f"fastgen.train: rank {rank} of {world}: a collective operation failed at step {step + 1} — another "
        f"process probably died or stalled ({limit}); look at the other ranks' "
        f"logs for the first error. Cause: {type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}")
