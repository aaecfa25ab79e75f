"""Checkpoints: everything a run depends on, written atomically, verified before a resume.

Layout of one checkpoint, ``<output_dir>/checkpoints/step-00000100/``::

    model.safetensors        the model's state dict
    ema.safetensors          the EMA average (when there is one)
    target.safetensors       the target network of consistency / LCM distillation (its own EMA of
                             the student, ``objective.target_decay``; the frozen teacher is not
                             stored: it is rebuilt from ``objective.teacher``)
    optimizer.safetensors    every tensor of the optimizer state ("state.<param id>.<name>")
    rng-rank<r>.safetensors  torch (and CUDA) generator states of rank r (and FusedAdamW's
                             stochastic-rounding generator)
    rng-rank<r>.json         Python and NumPy generator states of rank r
    state.json               step, data position, optimizer param groups and non-tensor state,
                             LR-scheduler and EMA counters, world size, format
    dcp/                     instead of the model, EMA and optimizer files when train.parallel =
                             "fsdp": a torch.distributed.checkpoint folder (every rank's shards,
                             .metadata with the global shapes; loads into any number of processes)
    config.toml              the resolved config
    index.json               {file: {size, sha256}} of every file above (written last)

A checkpoint is written into ``step-XXXXXXXX.tmp`` and renamed into place after every file and
the index are flushed to disk, so a crash mid-write leaves only a ``.tmp`` folder, which is never
loaded (and removed by the next write). :func:`verify` checks every file's size and SHA-256
against the index; :func:`find_resume` returns the newest checkpoint that passes and the reasons
the newer ones did not. Retention: the newest ``keep_last`` plus every step that is a multiple of
``keep_every``.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from typing import Optional

import torch

STEP_DIR = re.compile(r"^step-(\d{8})$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded (the message says which file and why)."""


def step_dir(root: str, step: int) -> str:
    return os.path.join(root, f"step-{step:08d}")


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- state <-> files

def save_tensors(path: str, tensors: dict) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().cpu().clone() for k, v in tensors.items()}, path)


def load_tensors(path: str) -> dict:
    from safetensors.torch import load_file

    return load_file(path)


def save_target(folder: str, target: torch.nn.Module) -> None:
    """``target.safetensors``: the distillation target network's state dict, bit for bit."""
    save_tensors(os.path.join(folder, "target.safetensors"), target.state_dict())


def load_target(folder: str, target: torch.nn.Module) -> None:
    """Load ``target.safetensors`` into ``target`` (strict; in place, dtypes kept)."""
    path = os.path.join(folder, "target.safetensors")
    if not os.path.isfile(path):
        raise CheckpointError(f"{folder} has no target.safetensors, but this run distils (objective.kind "
                              "consistency_distillation / lcm) and needs its target network")
    try:
        target.load_state_dict(load_tensors(path))
    except RuntimeError as exc:
        raise CheckpointError(f"{path} does not fit the target network: {exc}") from None


EMA_COUNTERS = ("decay", "warmup", "update_every", "num_updates", "num_calls")


def save_ema(folder: str, ema, write: bool = True) -> dict:
    """``ema.safetensors`` (``shadow.<name>``, ``buffer.<name>``) of a fastgen.optim.EMA; returns its
    counters for state.json (``write=False``: only the counters, where DCP writes the tensors)."""
    es = ema.state_dict()
    if write:
        save_tensors(os.path.join(folder, "ema.safetensors"), {**{f"shadow.{k}": v for k, v in es["shadow"].items()},
                                                               **{f"buffer.{k}": v for k, v in es["buffers"].items()}})
    return {k: es[k] for k in EMA_COUNTERS}


def ema_tensors(folder: str) -> tuple[dict, dict]:
    """``(shadow, buffers)``: the EMA average of a checkpoint's ``ema.safetensors``, by state-dict name."""
    et = load_tensors(os.path.join(folder, "ema.safetensors"))
    return ({k[7:]: v for k, v in et.items() if k.startswith("shadow.")},
            {k[7:]: v for k, v in et.items() if k.startswith("buffer.")})


def load_ema(folder: str, ema, state: dict) -> None:
    """Load a checkpoint's EMA (its tensors and the counters in ``state["ema"]``) into ``ema``."""
    if "ema" not in state:
        raise CheckpointError(f"{folder} has no EMA but optim.ema_decay > 0")
    shadow, buffers = ema_tensors(folder)
    ema.load_state_dict({**state["ema"], "shadow": shadow, "buffers": buffers})


def optimizer_to_files(state_dict: dict) -> tuple[dict, dict]:
    """An optimizer state dict as ``(tensors, json_able)``."""
    tensors, scalars = {}, {}
    for pid, st in state_dict["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"state.{pid}.{k}"] = v
            else:
                scalars.setdefault(str(pid), {})[k] = v
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def optimizer_from_files(tensors: dict, meta: dict) -> dict:
    state: dict = {}
    for key, v in tensors.items():
        _, pid, name = key.split(".", 2)
        state.setdefault(int(pid), {})[name] = v
    for pid, st in meta["scalars"].items():
        state.setdefault(int(pid), {}).update(st)
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_state() -> tuple[dict, dict]:
    """This process's generator states as ``(tensors, json_able)``: torch, CUDA, Python, NumPy."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    py = random.getstate()
    meta = {"python": [py[0], list(py[1]), py[2]]}
    try:
        import numpy as np

        ns = np.random.get_state()
        meta["numpy"] = [ns[0], ns[1].tolist(), int(ns[2]), int(ns[3]), float(ns[4])]
    except ImportError:  # pragma: no cover
        pass
    return tensors, meta


def rounding_seed(optimizer) -> Optional[torch.Generator]:
    """FusedAdamW's stochastic-rounding generator (saved with the RNG states); None for other optimizers."""
    g = getattr(optimizer, "_seed", None)
    return g if isinstance(g, torch.Generator) else None


def set_rng_state(tensors: dict, meta: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda.")), key=lambda k: int(k[5:]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    v, st, gauss = meta["python"]
    random.setstate((v, tuple(st), gauss))
    if "numpy" in meta:
        import numpy as np

        name, keys, pos, has_gauss, cached = meta["numpy"]
        np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


# --------------------------------------------------------------------------- write / verify / find

def write_index(folder: str) -> None:
    files = {}
    for sub, _, names in sorted(os.walk(folder)):  # sub-folders too: dcp/ of a sharded checkpoint
        for name in sorted(names):
            rel = os.path.relpath(os.path.join(sub, name), folder).replace(os.sep, "/")
            if rel == "index.json":
                continue
            p = os.path.join(folder, rel)
            _fsync(p)
            files[rel] = {"size": os.path.getsize(p), "sha256": _sha256(p)}
    with open(os.path.join(folder, "index.json"), "w") as fh:
        json.dump({"files": files}, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())


def begin(root: str, step: int) -> str:
    """A fresh temporary folder for the checkpoint of ``step`` (stale ones are removed)."""
    os.makedirs(root, exist_ok=True)
    tmp = step_dir(root, step) + ".tmp"
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    return tmp


def commit(root: str, step: int, keep_last: int, keep_every: int = 0) -> str:
    """Index the temporary folder, rename it into place, then apply the retention rule."""
    tmp, final = step_dir(root, step) + ".tmp", step_dir(root, step)
    write_index(tmp)
    if os.path.exists(final):
        shutil.rmtree(final)
    os.rename(tmp, final)
    try:
        dfd = os.open(root, os.O_RDONLY)
        os.fsync(dfd)
        os.close(dfd)
    except OSError:  # pragma: no cover - some file systems cannot fsync folders
        pass
    prune(root, keep_last, keep_every)
    return final


def list_steps(root: str) -> list[int]:
    """Steps of the committed checkpoints under ``root``, ascending."""
    if not os.path.isdir(root):
        return []
    return sorted(int(m.group(1)) for m in map(STEP_DIR.match, os.listdir(root)) if m)


def prune(root: str, keep_last: int, keep_every: int = 0) -> None:
    steps = list_steps(root)
    keep = set(steps[-max(keep_last, 1):])
    if keep_every:
        keep |= {s for s in steps if s % keep_every == 0}
    for s in steps:
        if s not in keep:
            shutil.rmtree(step_dir(root, s), ignore_errors=True)
    for name in os.listdir(root):
        if name.endswith(".tmp"):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def verify(folder: str) -> Optional[str]:
    """``None`` when every file matches the index; else the first reason it does not."""
    index = os.path.join(folder, "index.json")
    if not os.path.isfile(index):
        return "no index.json (an interrupted write)"
    try:
        with open(index) as fh:
            files = json.load(fh)["files"]
    except (ValueError, KeyError) as exc:
        return f"index.json is unreadable ({exc})"
    for name, want in files.items():
        p = os.path.join(folder, name)
        if not os.path.isfile(p):
            return f"{name} is missing"
        size = os.path.getsize(p)
        if size != want["size"]:
            return f"{name} has {size} bytes, the index says {want['size']}"
        if _sha256(p) != want["sha256"]:
            return f"{name} does not match its SHA-256 in index.json"
    return None


def find_resume(root: str) -> tuple[Optional[str], list[str]]:
    """The newest checkpoint under ``root`` that verifies, and one message per newer one that did not."""
    problems = []
    for s in reversed(list_steps(root)):
        folder = step_dir(root, s)
        why = verify(folder)
        if why is None:
            return folder, problems
        problems.append(f"checkpoint {folder} is corrupted: {why}")
    return None, problems


def resume_folder(root: str, say) -> Optional[str]:
    """The checkpoint to resume from: the newest good one under ``root`` (each newer, corrupted one is
    told to ``say``), or None (told) when there is none; a CheckpointError when all are corrupted."""
    path, problems = find_resume(root)
    for p in problems:
        say(p)
    if path is None:
        if problems:
            raise CheckpointError(f"no good checkpoint to resume from in {root}:\n  " + "\n  ".join(problems))
        say(f"no checkpoint in {root}; starting from step 0")
    return path


def read_json(folder: str, name: str) -> dict:
    with open(os.path.join(folder, name)) as fh:
        return json.load(fh)


def write_json(folder: str, name: str, obj) -> None:
    with open(os.path.join(folder, name), "w") as fh:
        json.dump(obj, fh)


def write_text(folder: str, name: str, text: str) -> None:
    with open(os.path.join(folder, name), "w") as fh:
        fh.write(text)
