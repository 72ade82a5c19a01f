"""How a trial's Ray Train run reports to its Tune trial.

A trial is a function that builds a TorchTrainer and calls ``fit()``. Ray 2.60's own pattern
is ``TuneReportCallback``: it hands each report to Tune through a ``ray.util.queue.Queue``
that Tune polls with a timeout, and every empty poll raises ``queue.Empty`` inside the queue's
actor, which Ray counts as a failed task: the job page shows hundreds of failed
``_QueueActor.get`` tasks for a healthy search. So here:

* :class:`MailboxCallback`, a Train ``UserCallback`` that runs in the Train controller, puts
  each report into a :class:`Mailbox`, a small async actor (0 CPUs) whose ``get`` answers
  ``None`` when nothing came in time instead of raising;
* :func:`relay_reports` runs ``fit()`` in a thread while the trial function takes each report
  out of the mailbox and reports it to Tune with ``ray.tune.report``: with the checkpoint
  when the scheduler needs Tune to hold checkpoints (PBT clones them from one trial into
  another), the metrics only otherwise.

A run's ``user_error`` report is not relayed: it has no metric for the scheduler, and the
trial function raises it as the trial's error. The mailbox holds one report, so the run waits
while the trial function is still handing the previous checkpoint to Tune.

The run's last epoch is relayed only once ``fit()`` has returned. Tune stops a trial as soon
as it reports its last epoch (ASHA's ``max_t``), killing the trial's actor and with it the
Train controller that is still shutting its workers down: the job page then counts a failed
``TrainController.run`` task, and Ray Train's state API an ABORTED run, for a trial that
finished.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any, Callable, Optional

import ray
from ray import tune as rtune
from ray.train import UserCallback

from lstm import storage
from lstm.loop import USER_ERROR

CHECKPOINT_PATH = "checkpoint_path"  # the metric Ray's TuneReportCallback adds too
TASK_EVENTS_FLUSH_S = 3.0  # > 2 of Ray's task-event report intervals (1 s each by default)


@ray.remote(num_cpus=0)
class Mailbox:
    """One report at a time, from the Train controller to the trial function."""

    def __init__(self) -> None:
        self.items: asyncio.Queue = asyncio.Queue(maxsize=1)

    async def put(self, item: dict[str, Any]) -> None:
        await self.items.put(item)

    async def get(self, timeout_s: float) -> Optional[dict[str, Any]]:
        if timeout_s <= 0:
            return None if self.items.empty() else self.items.get_nowait()
        try:
            return await asyncio.wait_for(self.items.get(), timeout_s)
        except asyncio.TimeoutError:
            return None


class MailboxCallback(UserCallback):
    """Puts ``{"metrics": ..., "checkpoint": ...}`` of every report into the mailbox."""

    def __init__(self, mailbox: Any, run_dir: str):
        self.mailbox = mailbox
        self.run_dir = run_dir

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        if not metrics or USER_ERROR in metrics[0]:
            return
        item = dict(metrics[0])
        if checkpoint is not None:
            item[CHECKPOINT_PATH] = storage.display(
                storage.join(self.run_dir, checkpoint.path.rstrip("/").rsplit("/", 1)[-1])
            )
        ray.get(self.mailbox.put.remote({"metrics": item, "checkpoint": checkpoint}))


def relay_reports(
    make: Callable[[list[Any]], Any], run_dir: str, *, with_checkpoints: bool, poll_s: float = 1.0
) -> Any:
    """Run ``make(callbacks).fit()`` in a thread and report each of its results to Tune.
    Returns the Train ``Result``; re-raises the run's exception."""
    mailbox = Mailbox.remote()
    trainer = make([MailboxCallback(mailbox, run_dir)])
    outcome: dict[str, Any] = {}
    done = threading.Event()

    def run(trainer: Any) -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as e:  # noqa: BLE001 - re-raised in the trial's thread
            outcome["error"] = e
        finally:
            done.set()

    threading.Thread(target=run, args=(trainer,), name="train-run", daemon=True).start()
    last: Optional[dict[str, Any]] = None  # the last epoch's report, relayed after fit() returns
    while True:
        finished = done.is_set()  # read before the get: a report put before fit() returned is then seen
        item = ray.get(mailbox.get.remote(0.0 if finished else poll_s))
        if item is None:
            if finished:
                break
            continue
        if item["metrics"].get("epoch", 0) >= item["metrics"].get("epochs", float("inf")):
            last = item
            continue
        _relay(item, with_checkpoints)
    # Dropping the last handle ends the actor gracefully. ray.kill() would end it before it had
    # reported its last get() as finished, and the job page would count that get as failed. A
    # worker reports its tasks' ends in batches (every RAY_task_events_report_interval_ms, 1 s
    # by default), so the handle is kept a little longer: dropped at once, one trial in a few
    # still left a last get() counted as failed (seen in 1 of 3 suite runs).
    time.sleep(TASK_EVENTS_FLUSH_S)
    del mailbox, trainer
    if last is not None:
        _relay(last, with_checkpoints)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def _relay(item: dict[str, Any], with_checkpoints: bool) -> None:
    rtune.report(item["metrics"], checkpoint=item["checkpoint"] if with_checkpoints else None)
