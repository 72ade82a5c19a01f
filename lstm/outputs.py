"""What a run leaves in its run folder besides Ray Train's ``checkpoint_*`` folders:

* ``results.json`` -- task, config, every epoch's metrics (enough to redraw every plot) and
  the final checkpoint's location, written when the run ends;
* the task's PNG plots (``learning_curve.png``, ...), drawn from ``results.json``;
* ``tensorboard/`` -- every reported scalar as it arrives, written by
  :class:`lstm.callbacks.TensorBoardCallback` in the Ray Train controller, so TensorBoard
  shows a run live.

All of it goes through :mod:`lstm.storage`, so a run on S3 gets the same files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from lstm import checkpoint as ckpt
from lstm import storage
from lstm.errors import UserError
from lstm.task import Task

RESULTS_FILE = "results.json"
TENSORBOARD_DIR = "tensorboard"


@dataclass
class Run:
    """A finished run: what :func:`lstm.train` returns (and a job prints). Locations are local
    paths or URIs, as the storage path is."""

    task: str
    run_dir: str
    final: dict[str, Any]  # the last epoch's metrics: run.final["test_ppl"]
    history: list[dict[str, Any]]  # one dict per epoch (plus "extras"/"steps" where the task keeps them)
    checkpoint: Optional[str]  # the final checkpoint's folder: lstm.load(run.checkpoint)
    results_path: Optional[str]
    plots: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)  # lstm.timings.breakdown


def collect(
    task: type[Task],
    run_dir: str,
    checkpoint_path: str,
    *,
    extra: Optional[dict[str, Any]] = None,
    timings: Optional[Callable[[list[dict[str, Any]]], dict[str, float]]] = None,
) -> Run:
    """Read the history from the final checkpoint (a folder or URI); write results.json and
    the plots into the run folder. ``timings(history)`` gives the run's lstm.timings once the
    plots are written: results.json keeps them under "timings", and its ``wall_time_s`` is then
    their ``total_s``, the whole command's (else the training's own elapsed time)."""
    state = storage.read_json(storage.join(checkpoint_path, ckpt.STATE_FILE))
    history = state.get("history", [])
    results = {
        "task": task.name,
        "config": state.get("config", {}),
        "run_dir": storage.display(run_dir),
        "checkpoint": storage.display(checkpoint_path),
        "epochs": history,
        "final": history[-1] if history else {},
        "wall_time_s": history[-1].get("elapsed_s") if history else None,
        **(extra or {}),
    }
    with storage.staging(run_dir) as out:
        plots = [p.name for p in task.plot(results, out)]
    if timings:
        results["timings"] = timings(history)
        results["wall_time_s"] = results["timings"]["total_s"]
    results_path = storage.write_json(storage.join(run_dir, RESULTS_FILE), results)
    return Run(
        task=task.name,
        run_dir=run_dir,
        final=history[-1] if history else {},
        history=history,
        checkpoint=checkpoint_path,
        results_path=results_path,
        plots=[storage.join(run_dir, name) for name in plots],
        timings=results.get("timings", {}),
    )


def checkpoint_location(checkpoint: Any, run_dir: str) -> str:
    """A Ray ``Checkpoint`` of the run as a path or URI a user can pass back (Ray gives
    remote paths without their scheme): the run folder joined with the checkpoint's name."""
    if checkpoint is None:
        raise UserError(f"the run at {storage.display(run_dir)} reported no checkpoint; see the worker logs above")
    return storage.join(run_dir, os.path.basename(checkpoint.path.rstrip("/")))


def load_results(run_dir: str) -> dict[str, Any]:
    """A run's results.json (local or remote)."""
    try:
        return storage.read_json(storage.join(run_dir, RESULTS_FILE))
    except FileNotFoundError:
        raise UserError(
            f"{storage.display(run_dir)} has no {RESULTS_FILE}; pass the folder of a finished run"
        ) from None
