"""How a trial's Ray Train run reports to its Tune trial.

Ray 2.60's pattern (Train V2) is a Tune trial function that builds a TorchTrainer with
``callbacks=[TuneReportCallback()]`` and calls ``fit()``. That callback runs in the Train
controller and forwards each report's metrics -- the checkpoint only as a ``checkpoint_path``
metric -- so Tune itself never holds a checkpoint:

* :class:`TrialReportCallback` is that callback, minus the loop's ``user_error`` report (it
  has no metric for the scheduler; the trial function raises it as the trial's error).
  ASHA needs nothing more: a trial that is resumed continues its own Train run, whose name
  is fixed by the trial id.
* PopulationBasedTraining clones the checkpoint of a better trial into a worse one, so
  Tune must hold real checkpoints. :func:`forward_reports` runs ``fit()`` in a thread
  while the trial function re-reports every (metrics, checkpoint) pair with
  ``ray.tune.report(..., checkpoint=...)``; :class:`CheckpointForwardCallback` hands the
  pairs over through a small Ray queue.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Optional

from ray.train import UserCallback
from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY, TuneReportCallback

USER_ERROR_KEY = "user_error"


def _is_user_error(metrics: list[dict[str, Any]]) -> bool:
    return bool(metrics) and USER_ERROR_KEY in metrics[0]


class TrialReportCallback(TuneReportCallback):
    """``TuneReportCallback`` that keeps a run's ``user_error`` report away from Tune."""

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        if _is_user_error(metrics):
            return
        super().after_report(run_context, metrics, checkpoint)


class CheckpointForwardCallback(UserCallback):
    """Puts ``{**metrics, "checkpoint_path": path}`` of every report on ``queue`` (runs in
    the Train controller; the queue holds one item, so the run waits while the trial
    function is still copying the previous checkpoint into Tune)."""

    def __init__(self, queue: Any):
        self.queue = queue

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        if not metrics or _is_user_error(metrics):
            return
        item = dict(metrics[0])
        if checkpoint is not None:
            item[CHECKPOINT_PATH_KEY] = checkpoint.path
        self.queue.put(item)


def forward_reports(make: Callable[[list[Any]], Any], *, poll_s: float = 0.5) -> Any:
    """Run ``make(callbacks).fit()`` in a thread; report each of its results to Tune with
    its checkpoint. Returns the Train ``Result`` (re-raises the run's exception)."""
    from ray import tune as rtune
    from ray.util.queue import Empty, Queue

    queue = Queue(maxsize=1, actor_options={"num_cpus": 0})
    trainer = make([CheckpointForwardCallback(queue)])
    outcome: dict[str, Any] = {}
    done = threading.Event()

    def run() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as e:  # noqa: BLE001 - re-raised in the trial's thread
            outcome["error"] = e
        finally:
            done.set()

    threading.Thread(target=run, name="train-run", daemon=True).start()
    while True:
        try:
            item: Optional[dict[str, Any]] = queue.get(timeout=poll_s)
        except Empty:
            if done.is_set() and queue.empty():
                break
            continue
        path = item.get(CHECKPOINT_PATH_KEY)
        # Tune copies the checkpoint into the trial's folder (PBT clones from there).
        rtune.report(item, checkpoint=rtune.Checkpoint(path) if path else None)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]
