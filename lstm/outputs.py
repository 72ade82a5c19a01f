"""What a finished run leaves beside its checkpoints: results.json and the task's plots.

results.json holds the config and every epoch's metrics, enough to redraw every plot; the
live ``tensorboard/`` is :class:`lstm.callbacks.TensorBoardCallback`'s.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from lstm import checkpoint as ckpt
from lstm import storage
from lstm.errors import UserError
from lstm.task import Task

RESULTS_FILE = "results.json"


@dataclass
class Run:
    """A finished run: what :func:`lstm.train` returns; locations are paths or URIs, as the storage path is."""

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
    """Write results.json and the plots from the final checkpoint; ``timings`` adds the command's time line."""
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
        plots = [p.name for p in task.display.plot(results, out)]
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


def load_results(run_dir: str) -> dict[str, Any]:
    """A run's results.json (local or remote)."""
    try:
        return storage.read_json(storage.join(run_dir, RESULTS_FILE))
    except FileNotFoundError:
        raise UserError(
            f"{storage.display(run_dir)} has no {RESULTS_FILE}; pass the folder of a finished run"
        ) from None
