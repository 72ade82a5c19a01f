"""How a trial's Ray Train run reports to its Tune trial: through a :class:`Mailbox`, one async
actor per search with a one-report slot per run, whose calls never raise or wait long (Ray's
``TuneReportCallback`` polls a queue whose every empty poll is a failed task on the job page,
and an actor ended with a call in flight leaves it failed). :class:`MailboxCallback` offers
each report from the Train controller; :func:`relay_reports` hands them to ``tune.report``,
the last only once ``fit()`` returns (Tune stops a trial at its last report, which would kill
a controller still shutting down). A run's ``user_error`` is raised by the trial instead.
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
    """Run ``make(callbacks).fit()`` in a thread, reporting each result to Tune through ``mailbox``."""
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
    """The last epoch of a resumed run that had finished before Tune got its last report, from its result."""
    metrics = getattr(result, "metrics", None) or {}
    if not metrics.get("epoch") or USER_ERROR in metrics:
        return None
    return {"metrics": metrics, "checkpoint": getattr(result, "checkpoint", None)}


def _relay(item: dict[str, Any], with_checkpoints: bool) -> None:
    rtune.report(item["metrics"], checkpoint=item["checkpoint"] if with_checkpoints else None)
