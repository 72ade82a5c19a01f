"""How a trial's Ray Train run reports to its Tune trial.

A trial is a function that builds a TorchTrainer and calls ``fit()``. Ray 2.60's own pattern
is ``TuneReportCallback``: it hands each report to Tune through a ``ray.util.queue.Queue``
that Tune polls with a timeout, and every empty poll raises ``queue.Empty`` inside the queue's
actor, which Ray counts as a failed task: the job page shows hundreds of failed
``_QueueActor.get`` tasks for a healthy search. So here:

* one :class:`Mailbox` per search, a small async actor (0 CPUs) that the search's driver
  creates and holds until the search's report is written. It has a slot per Train run; its
  calls never raise and never wait long: ``offer`` answers at once whether the slot took the
  report, ``get`` answers ``None`` when nothing came within its timeout;
* :class:`MailboxCallback`, a Train ``UserCallback`` that runs in the Train controller, offers
  each report to its run's slot until the slot takes it (the slot holds one report, so the run
  waits while the trial function is still handing the previous checkpoint to Tune);
* :func:`relay_reports` runs ``fit()`` in a thread while the trial function takes each report
  out of the slot and reports it to Tune with ``ray.tune.report``: with the checkpoint when
  the scheduler needs Tune to hold checkpoints (PBT clones them from one trial into another),
  the metrics only otherwise.

Why one mailbox for the whole search: an actor that ends while Ray still counts one of its
calls as running (its worker reports finished calls in batches, every second) leaves that
call *failed* on the job page; a mailbox per trial, dropped as its trial ended, did that now
and then. The search's mailbox ends once, after the search, when none of its calls has run
for seconds; and a trial that Tune kills (a scheduler's stop) leaves no call waiting in it.

A run's ``user_error`` report is not relayed: it has no metric for the scheduler, and the
trial function raises it as the trial's error.

The run's last epoch is relayed only once ``fit()`` has returned. Tune stops a trial as soon
as it reports its last epoch (ASHA's ``max_t``), killing the trial's actor and with it the
Train controller that is still shutting its workers down: the job page then counts a failed
``TrainController.run`` task, and Ray Train's state API an ABORTED run, for a trial that
finished. A search interrupted in that window leaves a Train run that has finished while its
trial has not: resumed, the run has nothing to train and reports nothing, so its last epoch is
relayed from the run's result (:func:`already_finished`).
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from typing import Any, Callable, Optional

import ray
from ray import tune as rtune
from ray.train import UserCallback

from lstm import storage
from lstm.session import USER_ERROR

CHECKPOINT_PATH = "checkpoint_path"  # the metric Ray's TuneReportCallback adds too
OFFER_RETRY_S = 0.1  # while the trial function still hands the previous report to Tune


@ray.remote(num_cpus=0)
class Mailbox:
    """A search's reports in transit: one slot per Train run, one report per slot."""

    def __init__(self) -> None:
        self.slots: dict[str, asyncio.Queue] = {}

    def _slot(self, run: str) -> asyncio.Queue:
        if run not in self.slots:
            self.slots[run] = asyncio.Queue(maxsize=1)
        return self.slots[run]

    async def offer(self, run: str, item: dict[str, Any]) -> bool:
        """Put ``item`` into the run's slot if it is empty; whether it did."""
        slot = self._slot(run)
        if slot.full():
            return False
        slot.put_nowait(item)
        return True

    async def get(self, run: str, timeout_s: float) -> Optional[dict[str, Any]]:
        """The run's report, waiting at most ``timeout_s`` for one; ``None`` if none came."""
        slot = self._slot(run)
        if timeout_s <= 0:
            return None if slot.empty() else slot.get_nowait()
        try:
            return await asyncio.wait_for(slot.get(), timeout_s)
        except asyncio.TimeoutError:
            return None

    async def close(self, run: str) -> None:
        self.slots.pop(run, None)


class MailboxCallback(UserCallback):
    """Offers ``{"metrics": ..., "checkpoint": ...}`` of every report to the run's slot."""

    def __init__(self, mailbox: Any, run: str, run_dir: str):
        self.mailbox, self.run, self.run_dir = mailbox, run, run_dir

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        if not metrics or USER_ERROR in metrics[0]:
            return
        item = dict(metrics[0])
        if checkpoint is not None:
            item[CHECKPOINT_PATH] = storage.display(
                storage.join(self.run_dir, checkpoint.path.rstrip("/").rsplit("/", 1)[-1])
            )
        while not ray.get(self.mailbox.offer.remote(self.run, {"metrics": item, "checkpoint": checkpoint})):
            time.sleep(OFFER_RETRY_S)


def relay_reports(
    mailbox: Any, make: Callable[[list[Any]], Any], run_dir: str, *, with_checkpoints: bool, poll_s: float = 1.0
) -> Any:
    """Run ``make(callbacks).fit()`` in a thread and report each of its results to Tune,
    through the search's ``mailbox``. Returns the Train ``Result``; re-raises the run's
    exception."""
    run = uuid.uuid4().hex  # this call's slot (a restarted trial gets a fresh one)
    trainer = make([MailboxCallback(mailbox, run, run_dir)])
    outcome: dict[str, Any] = {}
    done = threading.Event()

    def run_fit(trainer: Any) -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as e:  # noqa: BLE001 - re-raised in the trial's thread
            outcome["error"] = e
        finally:
            done.set()

    threading.Thread(target=run_fit, args=(trainer,), name="train-run", daemon=True).start()
    last: Optional[dict[str, Any]] = None  # the last epoch's report, relayed after fit() returns
    relayed = 0
    while True:
        finished = done.is_set()  # read before the get: a report put before fit() returned is then seen
        item = ray.get(mailbox.get.remote(run, 0.0 if finished else poll_s))
        if item is None:
            if finished:
                break
            continue
        if item["metrics"].get("epoch", 0) >= item["metrics"].get("epochs", float("inf")):
            last = item
            continue
        _relay(item, with_checkpoints)
        relayed += 1
    ray.get(mailbox.close.remote(run))
    del trainer
    if last is None and not relayed and "result" in outcome:
        last = already_finished(outcome["result"])
    if last is not None:
        _relay(last, with_checkpoints)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def already_finished(result: Any) -> Optional[dict[str, Any]]:
    """The last epoch of a resumed run that had nothing left to train: its worker finished the
    run before the search was interrupted, but Tune never got the last report (it is relayed
    only once fit() returns). Ray Train's result carries the latest checkpoint's metrics."""
    metrics = getattr(result, "metrics", None) or {}
    if not metrics.get("epoch") or USER_ERROR in metrics:
        return None
    return {"metrics": metrics, "checkpoint": getattr(result, "checkpoint", None)}


def _relay(item: dict[str, Any], with_checkpoints: bool) -> None:
    rtune.report(item["metrics"], checkpoint=item["checkpoint"] if with_checkpoints else None)
