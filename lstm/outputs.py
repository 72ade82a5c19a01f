"""What a run leaves in its run folder besides Ray Train's ``checkpoint_*`` folders:

* ``results.json`` -- task, config, every epoch's metrics (enough to redraw every plot) and
  the final checkpoint's location, written when the run ends;
* the task's PNG plots (``learning_curve.png``, ...), drawn from ``results.json``;
* ``tensorboard/`` -- every reported scalar as it arrives, written by
  :class:`TensorBoardCallback` in the Ray Train controller, so TensorBoard shows a run live.

All of it goes through :mod:`lstm.storage`, so a run on S3 gets the same files.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from lstm import checkpoint as ckpt
from lstm import storage
from lstm.errors import UserError
from lstm.task import Task

RESULTS_FILE = "results.json"
TENSORBOARD_DIR = "tensorboard"


@dataclass
class RunResult:
    """What a finished run left behind."""

    task: str
    run_dir: str
    metrics: dict[str, Any]  # the last epoch's metrics
    history: list[dict[str, Any]]  # one dict per epoch (plus "extras"/"steps" where the task keeps them)
    checkpoint_path: Optional[str]
    results_path: Optional[str]
    plots: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)  # lstm.timings.breakdown


def collect(
    task: type[Task],
    run_dir: str,
    checkpoint_path: str,
    *,
    extra: Optional[dict[str, Any]] = None,
    timings: Optional[Callable[[], dict[str, float]]] = None,
) -> RunResult:
    """Read the history from the final checkpoint (a folder or URI); write results.json and
    the plots into the run folder. ``timings`` gives the run's lstm.timings once the plots are
    written: results.json keeps them under "timings"."""
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
        results["timings"] = timings()
    results_path = storage.write_json(storage.join(run_dir, RESULTS_FILE), results)
    return RunResult(
        task=task.name,
        run_dir=run_dir,
        metrics=history[-1] if history else {},
        history=history,
        checkpoint_path=checkpoint_path,
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


# --------------------------------------------------------------------------- TensorBoard

try:  # the callback base class of Ray Train V2
    from ray.train import UserCallback as _UserCallback
except ImportError:  # pragma: no cover - another Ray
    _UserCallback = object  # type: ignore[assignment,misc]


class TensorBoardCallback(_UserCallback):  # type: ignore[misc,valid-type]
    """Writes every reported scalar to ``<run_dir>/tensorboard`` as it arrives. Runs in the
    Ray Train controller; for a remote run folder it writes locally and uploads the events
    file after each report."""

    def __init__(self, run_dir: str):
        self.target = storage.join(run_dir, TENSORBOARD_DIR)
        self._writer = None
        self._local: Optional[str] = None

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        if not metrics or "epoch" not in metrics[0]:
            return
        writer = self._open()
        m = metrics[0]
        for key, value in m.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in ("epoch", "epochs"):
                writer.add_scalar(key, value, global_step=int(m["epoch"]))
        writer.flush()
        if storage.is_remote(self.target):
            storage.upload_dir(self._local, self.target)

    def _open(self) -> Any:
        if self._writer is None:
            from tensorboardX import SummaryWriter

            remote = storage.is_remote(self.target)
            self._local = tempfile.mkdtemp(prefix="lstm-tb-") if remote else self.target
            self._writer = SummaryWriter(self._local)
        return self._writer

    def __del__(self) -> None:
        if self._local and storage.is_remote(self.target):
            shutil.rmtree(self._local, ignore_errors=True)
