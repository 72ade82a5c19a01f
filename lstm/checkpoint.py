"""A run's checkpoints: writing one, and finding and reading back an intact one.

A ``checkpoint_*`` folder holds ``model.pt``, ``optimizer.pt``, ``state.json`` (task, config,
epoch, the task's ``meta``, the history) and, written last, ``manifest.json`` (each file's size
and SHA-256). It is intact when every file matches and loads; else :class:`Damaged` names the
file. :func:`resume_source` and :func:`load` fall back to the newest intact one, a line each skip.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import nn

from lstm import config as cfg
from lstm import storage
from lstm.data.vocab import Vocabulary
from lstm.errors import UserError
from lstm.storage import atomic_torch_save, write_json
from lstm.user_files import sha256_file

MODEL_FILE = "model.pt"
OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "state.json"
MANIFEST_FILE = "manifest.json"
FILES = (MODEL_FILE, OPTIMIZER_FILE, STATE_FILE)  # what the manifest lists
FORMAT = 1  # the manifest's format
PREFIX = "checkpoint_"  # Ray Train's checkpoint folders: checkpoint_<timestamp>

Skipped = list[tuple[str, str]]  # (checkpoint folder name, why it was skipped)


class Damaged(Exception):
    """A checkpoint that is incomplete or damaged; the message starts with the file at fault."""


@dataclass
class Contents:
    """An intact checkpoint, read."""

    location: str  # where it is, as a user reads it
    state: dict[str, Any]
    model: Mapping[str, Any]  # the model's state_dict
    optimizer: Optional[dict[str, Any]]  # the optimizer's state_dict, if it was asked for

    @property
    def name(self) -> str:
        return storage.parent_and_name(self.location)[1]


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (or the module itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


# --------------------------------------------------------------------------- writing


def save(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer, state: Mapping[str, Any]) -> None:
    """Write model, optimizer and state into the local folder ``directory``, then the manifest."""
    atomic_torch_save(directory / MODEL_FILE, unwrap(model).state_dict())
    atomic_torch_save(directory / OPTIMIZER_FILE, optimizer.state_dict())
    write_json(str(directory / STATE_FILE), state)
    write_manifest(directory, int(state["epoch"]))


def write_manifest(directory: Path, epoch: int) -> None:
    """The manifest of the files in ``directory`` as they are now (written atomically)."""
    files = {
        name: {"size": (directory / name).stat().st_size, "sha256": sha256_file(directory / name)} for name in FILES
    }
    write_json(str(directory / MANIFEST_FILE), {"format": FORMAT, "epoch": epoch, "files": files})


# --------------------------------------------------------------------------- reading one folder


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise Damaged(f"{path.name} is missing")
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise Damaged(f"{path.name} is not UTF-8 text (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise Damaged(f"{path.name} is not JSON ({e.msg}, line {e.lineno})") from None


def _torch_load(path: Path) -> Any:
    if not path.is_file():
        raise Damaged(f"{path.name} is missing")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - whatever torch fails on (zip, pickle, EOF), the file is at fault
        reason = " ".join(str(e).split())[:160] or type(e).__name__
        raise Damaged(f"{path.name} is not a readable torch file ({reason})") from None


def check(directory: Path) -> Optional[dict[str, Any]]:
    """:class:`Damaged` naming the first file of ``directory`` its manifest disagrees with; the manifest."""
    if not (directory / MANIFEST_FILE).is_file():
        return None
    manifest = _read_json(directory / MANIFEST_FILE)
    files = manifest.get("files") if isinstance(manifest, dict) else None
    for name in FILES:
        entry = files.get(name) if isinstance(files, dict) else None
        if not isinstance(entry, dict) or not (
            isinstance(entry.get("size"), int) and isinstance(entry.get("sha256"), str)
        ):
            raise Damaged(f"{MANIFEST_FILE} gives no size and sha256 of {name}")
        path = directory / name
        if not path.is_file():
            raise Damaged(f"{name} is missing (the manifest lists it)")
        size = path.stat().st_size
        if size != entry["size"]:
            raise Damaged(f"{name} is {size} bytes, the manifest says {entry['size']}")
        if sha256_file(path) != entry["sha256"]:
            raise Damaged(f"{name} does not match the manifest's sha256 (same size, other bytes)")
    return manifest


def read(directory: Path, location: str = "", *, optimizer: bool = True) -> Contents:
    """The checkpoint in the local folder ``directory``, checked and loaded; :class:`Damaged` if not intact."""
    check(directory)
    state = _read_json(directory / STATE_FILE)
    if not (
        isinstance(state, dict)
        and isinstance(state.get("task"), str)
        and isinstance(state.get("epoch"), int)
        and isinstance(state.get("config"), dict)
        and isinstance(state.get("meta", {}), dict)
    ):
        raise Damaged(f"{STATE_FILE} is not a checkpoint's state (task, epoch, config and meta)")
    model = _torch_load(directory / MODEL_FILE)
    if not isinstance(model, Mapping):
        raise Damaged(f"{MODEL_FILE} holds no state_dict")
    return Contents(
        location or str(directory), state, model, _torch_load(directory / OPTIMIZER_FILE) if optimizer else None
    )


def read_state(directory: str | os.PathLike) -> dict[str, Any]:
    """The JSON state of a local checkpoint folder (one-line UserError if it cannot be read)."""
    try:
        state = _read_json(Path(directory) / STATE_FILE)
    except Damaged as e:
        raise UserError(
            f"{directory} is not a readable lstm-ray checkpoint ({e}); pass a run folder or one of its "
            "checkpoint_* folders"
        ) from None
    return state


def task_config(contents: Contents, task: Any) -> Any:
    """The checked config a checkpoint of ``task`` was trained with; a UserError for another task's."""
    found = contents.state["task"]
    if found != task.name:
        raise UserError(
            f"{contents.location} is a checkpoint of task {found!r}, not {task.name!r}; use jobs/{found}.py"
        )
    return cfg.build(task.config_class, contents.state["config"])


def vocabulary(contents: Contents, task_name: str) -> Vocabulary:
    """The vocabulary a checkpoint carries in its ``meta`` (a one-line UserError if none)."""
    vocab = Vocabulary(tuple(contents.state.get("meta", {}).get("vocab") or ()))
    if not len(vocab):
        raise UserError(
            f"checkpoint {contents.location} carries no vocabulary; it was not written by the {task_name} task"
        )
    return vocab


def load_model(model: nn.Module, contents: Contents) -> None:
    """Load the checkpoint's weights, turning a shape/key mismatch into a one-line UserError."""
    try:
        model.load_state_dict(contents.model)
    except RuntimeError as e:
        lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
        detail = lines[1] if len(lines) > 1 else (lines[0] if lines else "")
        raise UserError(
            f"checkpoint {contents.location} does not match this model's architecture ({detail}); "
            "resume with the config it was trained with, or start a new run with another --name"
        ) from None


# --------------------------------------------------------------------------- a run folder


def checkpoint_location(checkpoint: Any, run_dir: str) -> str:
    """A Ray ``Checkpoint`` of the run as a location a user can pass back (Ray drops a URI's scheme)."""
    if checkpoint is None:
        raise UserError(f"the run at {storage.display(run_dir)} reported no checkpoint; see the worker logs above")
    return storage.join(run_dir, os.path.basename(checkpoint.path.rstrip("/")))


def is_checkpoint_name(name: str) -> bool:
    """A Ray Train checkpoint folder's name (not its checkpoint_manager_snapshot.json)."""
    return name.startswith(PREFIX) and not name.endswith(".json")


def has_checkpoints(run_dir: str) -> bool:
    """Whether the run folder (local or remote) holds any checkpoint folder."""
    return any(is_checkpoint_name(name) for name in storage.list_dir(run_dir))


def _epoch(location: str) -> int:
    """A checkpoint's epoch, from its manifest or its state; -1 if neither can be read."""
    for name in (MANIFEST_FILE, STATE_FILE):
        try:
            return int(storage.read_json(storage.join(location, name))["epoch"])
        except (FileNotFoundError, KeyError, ValueError, TypeError):  # JSON and UTF-8 errors are ValueErrors
            continue
    return -1


def candidates(run_dir: str) -> list[str]:
    """The run's checkpoint folder names, newest first: by epoch, then name; unknown epochs last."""
    names = [name for name in storage.list_dir(run_dir) if is_checkpoint_name(name)]
    return sorted(names, key=lambda name: (_epoch(storage.join(run_dir, name)), name), reverse=True)


def latest(location: str) -> str:
    """The newest checkpoint (by epoch) of a run folder, or ``location`` if it is one; UserError if none."""
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


def read_location(location: str, *, optimizer: bool = True) -> Contents:
    """:func:`read` of the checkpoint folder ``location``, local or remote."""
    with storage.local_dir(location) as directory:
        return read(directory, storage.display(location), optimizer=optimizer)


def newest_intact(
    run_dir: str, *, tried: Sequence[str] = (), optimizer: bool = True
) -> tuple[Optional[Contents], Skipped]:
    """The newest intact checkpoint of ``run_dir`` but those in ``tried`` (or None), and each newer one skipped."""
    skipped: Skipped = []
    for name in candidates(run_dir):
        if name in tried:
            continue
        try:
            return read_location(storage.join(run_dir, name), optimizer=optimizer), skipped
        except Damaged as e:
            skipped.append((name, str(e)))
    return None, skipped


def describe(skipped: Skipped, sep: str = ": ") -> str:
    """``checkpoint_b: model.pt is ...; checkpoint_a: ...`` (``sep="/"``: the file's path)."""
    return "; ".join(f"{name}{sep}{reason}" for name, reason in skipped)


# --------------------------------------------------------------------------- the readers


def _in_folder(checkpoint: Any, run_dir: str) -> bool:
    """Whether the Ray ``Checkpoint`` is one of ``run_dir``'s (a PBT clone starts from another trial's)."""
    if not run_dir:
        return False
    _, path = storage.filesystem(run_dir)
    parent = str(checkpoint.path).rstrip("/").rpartition("/")[0]
    if storage.is_remote(run_dir):
        return parent.rstrip("/") == path.rstrip("/")
    return os.path.realpath(parent) == os.path.realpath(path)


def resume_source(checkpoint: Any, run_dir: str = "") -> tuple[Contents, Skipped]:
    """The intact checkpoint a run resumes from (Ray's, else its run folder's newest), and those skipped."""
    name = str(checkpoint.path).rstrip("/").rpartition("/")[2]
    ours = _in_folder(checkpoint, run_dir)
    where = storage.display(storage.join(run_dir, name)) if ours else str(checkpoint.path)
    try:
        with checkpoint.as_directory() as directory:
            return read(Path(directory), where), []
    except Damaged as e:
        first = (name, str(e))
    if not ours:
        raise UserError(
            f"cannot resume: checkpoint {where} is damaged: {first[1]}; start a new run with another --name"
        )
    contents, skipped = newest_intact(run_dir, tried=[name])
    skipped = [first, *skipped]
    if contents is None:
        raise UserError(
            f"cannot resume: no intact checkpoint left in {storage.display(run_dir)} ({describe(skipped, '/')}); "
            "start a new run with another --name"
        )
    return contents, skipped


def _is_checkpoint_folder(location: str) -> bool:
    return is_checkpoint_name(storage.parent_and_name(location)[1]) or any(
        storage.exists(storage.join(location, name)) for name in (STATE_FILE, MANIFEST_FILE)
    )


def load(location: str | os.PathLike, *, label: str, optimizer: bool = False) -> Contents:
    """The checkpoint a user names: a checkpoint folder, or a run folder's newest intact one (a line per skip)."""
    location = str(location)
    shown = storage.display(location)
    if not storage.exists(location):
        raise UserError(f"{shown} does not exist; pass a run folder or one of its checkpoint_* folders")
    if not storage.is_remote(location) and not Path(location).is_dir():
        raise UserError(f"{shown} is a file, not a folder; pass a run folder or one of its checkpoint_* folders")
    if _is_checkpoint_folder(location):
        try:
            return read_location(location, optimizer=optimizer)
        except Damaged as e:
            raise UserError(
                f"checkpoint {shown} is damaged: {e}; pass another of the run's checkpoint_* folders, "
                "or the run folder to use its newest intact checkpoint"
            ) from None
    contents, skipped = newest_intact(location, optimizer=optimizer)
    if contents is None and not skipped:
        raise UserError(f"{shown} holds no checkpoint; pass a run folder or one of its checkpoint_* folders")
    if contents is None:
        raise UserError(
            f"{shown} holds no intact checkpoint ({describe(skipped, '/')}); pass another run folder or checkpoint"
        )
    if skipped:
        print(f"[{label}] skipped {describe(skipped)}; using {contents.name}", file=sys.stderr, flush=True)
    return contents
