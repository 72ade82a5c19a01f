"""A run's checkpoints: what one holds, writing and reading it, and finding the newest.

A checkpoint is a folder (Ray Train's ``checkpoint_*``, local or in remote storage) with

* ``model.pt`` -- the model's ``state_dict`` (never a DDP wrapper's),
* ``optimizer.pt`` -- the optimizer's ``state_dict``,
* ``state.json`` -- task, config, epoch, elapsed time, the task's ``meta`` (e.g. the
  vocabulary) and the history of every epoch's metrics so far.

Each file is written atomically; Ray Train then copies the folder into the run folder.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from torch import nn

from lstm import storage
from lstm.errors import UserError
from lstm.io import atomic_torch_save, atomic_write_json

MODEL_FILE = "model.pt"
OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "state.json"
PREFIX = "checkpoint_"  # Ray Train's checkpoint folders: checkpoint_<timestamp>


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (or the module itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def save(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer, state: Mapping[str, Any]) -> None:
    """Write model, optimizer and state into the local folder ``directory``."""
    atomic_torch_save(directory / MODEL_FILE, unwrap(model).state_dict())
    atomic_torch_save(directory / OPTIMIZER_FILE, optimizer.state_dict())
    atomic_write_json(directory / STATE_FILE, state)


def read_state(directory: str | os.PathLike) -> dict[str, Any]:
    """The JSON state of a local checkpoint folder."""
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        raise UserError(
            f"{directory} is not an lstm-ray checkpoint (no {STATE_FILE}); "
            "pass a run folder or one of its checkpoint_* folders"
        )
    return json.loads(path.read_text())


def load_model(model: nn.Module, directory: str | os.PathLike) -> None:
    """Load weights, turning a shape/key mismatch into a one-line UserError."""
    state_dict = torch.load(Path(directory) / MODEL_FILE, map_location="cpu", weights_only=True)
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as e:
        lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
        detail = lines[1] if len(lines) > 1 else (lines[0] if lines else "")
        raise UserError(
            f"checkpoint {directory} does not match this model's architecture ({detail}); "
            "resume with the config it was trained with, or start a new run with another --name"
        ) from None


def load_optimizer_state(directory: str | os.PathLike) -> dict[str, Any]:
    return torch.load(Path(directory) / OPTIMIZER_FILE, map_location="cpu", weights_only=True)


def is_checkpoint_name(name: str) -> bool:
    """A Ray Train checkpoint folder's name (not its checkpoint_manager_snapshot.json)."""
    return name.startswith(PREFIX) and not name.endswith(".json")


def has_checkpoints(run_dir: str) -> bool:
    """Whether the run folder (local or remote) holds any checkpoint folder."""
    return any(is_checkpoint_name(name) for name in storage.list_dir(run_dir))


def latest(location: str) -> str:
    """The newest complete checkpoint (by epoch) of a run folder, or ``location`` itself if it
    is a checkpoint folder; local or remote. UserError if there is none."""
    if storage.exists(storage.join(location, STATE_FILE)):
        return location
    found = []
    for name in storage.list_dir(location):
        if not is_checkpoint_name(name):
            continue
        try:
            state = storage.read_json(storage.join(location, name, STATE_FILE))
            found.append((int(state["epoch"]), name))
        except (FileNotFoundError, KeyError, ValueError, TypeError):
            continue  # a checkpoint still being written, or not ours
    if not found:
        what = "does not exist" if not storage.exists(location) else "holds no checkpoint"
        raise UserError(f"{storage.display(location)} {what}; pass a run folder or one of its checkpoint_* folders")
    return storage.join(location, max(found)[1])


@contextlib.contextmanager
def opened(location: str) -> Iterator[Path]:
    """The newest checkpoint of ``location`` (see :func:`latest`) as a local folder."""
    with storage.local_dir(latest(location)) as directory:
        yield directory
