"""Where a run's wall time goes outside training and evaluation: results.json's ``timings``
and the job's ``time:`` line. The driver marks its phases (:class:`Phases`) from the first
import; rank 0 returns the wall-clock marks of its loop, which :func:`breakdown` sets between
the driver's (``time.time()`` on both: one clock on one node, NTP's skew across nodes). After
a lost worker the marks are the last worker group's; the failed attempt is in ``workers_up_s``.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Mapping, Sequence

from lstm import storage
from lstm.errors import UserError

ATTEMPTS_DIR = ".attempts"

# The phases in the order they happen: key -> the words the job prints.
PHASES = {
    "imports_s": "imports",
    "checks_s": "checks and data",
    "ray_start_s": "Ray start",
    "cluster_checks_s": "cluster checks and trainer",
    "workers_up_s": "worker group start",
    "worker_setup_s": "worker setup",
    "train_s": "train",
    "eval_s": "eval",
    "recovery_s": "recovery",
    "reports_s": "checkpoints and reports",
    "workers_down_s": "worker group shutdown",
    "outputs_s": "plots and results",
}


class Phases:
    """The driver's marks: ``mark(name)`` ends the phase ``name``; ``from_import``: from the first import."""

    def __init__(self, from_import: bool = False) -> None:
        import lstm

        self.marks: dict[str, float] = {"imported": lstm.IMPORTED_AT} if from_import else {}
        self.marks["fit_called"] = time.time()

    def mark(self, name: str) -> None:
        self.marks[name] = time.time()


def breakdown(
    driver: Mapping[str, float],
    worker: Mapping[str, float],
    attempts: Sequence[Mapping[str, Any]] = (),
    history: Sequence[Mapping[str, Any]] = (),
) -> dict[str, float]:
    """Seconds per phase of :data:`PHASES` (those whose marks exist), plus ``total_s``, from the
    driver's :class:`Phases` marks and rank 0's (``*_at``, ``train_s``, ``eval_s``);
    ``attempts`` (:func:`collect_attempts`) and ``history`` for a restarted worker group."""
    marks = dict(driver)
    marks.update({f"worker_{k}": v for k, v in worker.items() if k.endswith("_at")})
    train, evaluation, recovery = float(worker.get("train_s", 0.0)), float(worker.get("eval_s", 0.0)), None
    if len(attempts) > 1:
        first, last = min(attempts, key=lambda a: a["started_at"]), max(attempts, key=lambda a: a["started_at"])
        kept = [e for e in history[int(first["start_epoch"]) : int(last["start_epoch"])]]
        earlier_train, earlier_eval = (sum(float(e.get(k, 0.0)) for e in kept) for k in ("train_s", "eval_s"))
        recovery = last["training_at"] - first["training_at"] - earlier_train - earlier_eval
        train, evaluation = train + earlier_train, evaluation + earlier_eval
        marks.update(worker_started_at=first["started_at"], worker_first_training_at=first["training_at"])
    spans = {
        "imports_s": ("imported", "fit_called"),
        "checks_s": ("fit_called", "checked"),
        "ray_start_s": ("checked", "ray_started"),
        "cluster_checks_s": ("ray_started", "fit_started"),
        "workers_up_s": ("fit_started", "worker_started_at"),
        "worker_setup_s": (
            "worker_started_at",
            "worker_first_training_at" if recovery is not None else "worker_training_at",
        ),
        "reports_s": ("worker_training_at", "worker_finished_at"),  # minus this attempt's train and eval, below
        "workers_down_s": ("worker_finished_at", "fit_returned"),
        "outputs_s": ("fit_returned", "outputs_written"),
    }
    out = {key: marks[b] - marks[a] for key, (a, b) in spans.items() if a in marks and b in marks}
    if "train_s" in worker:
        out.update(train_s=train, eval_s=evaluation)
        if "reports_s" in out:
            out["reports_s"] -= float(worker["train_s"]) + float(worker.get("eval_s", 0.0))
    if recovery is not None:
        out["recovery_s"] = recovery
    first_mark = marks.get("imported", marks["fit_called"])
    out["total_s"] = max(marks.values()) - first_mark
    return {key: round(out[key], 3) for key in [*PHASES, "total_s"] if key in out}


def attempt_location(run_dir: str, command: str, started_at: float) -> str:
    """Where an attempt of the command ``command`` records its start."""
    return storage.join(run_dir, ATTEMPTS_DIR, f"{command}-{started_at:.6f}.json")


def record_attempt(location: str, marks: Mapping[str, float], start_epoch: int) -> None:
    storage.write_json(
        location, {"started_at": marks["started_at"], "training_at": marks["training_at"], "start_epoch": start_epoch}
    )


def collect_attempts(run_dir: str, command: str) -> list[dict[str, Any]]:
    """The records of ``command``'s attempts, deleted once read ([] if unreadable: no recovery shown)."""
    folder = storage.join(run_dir, ATTEMPTS_DIR)
    found: list[dict[str, Any]] = []
    with contextlib.suppress(OSError, ValueError, UserError):
        for name in storage.list_dir(folder):
            if name.startswith(f"{command}-") and not name.startswith("."):
                location = storage.join(folder, name)
                found.append(storage.read_json(location))
                storage.delete(location)
        if not storage.list_dir(folder):
            storage.delete_dir(folder)
    return found


def format_line(timings: Mapping[str, float]) -> str:
    """``12.3s: Ray start 4.1s, worker group start 3.0s, ...`` (the phases that took 0.05 s or more)."""
    parts = [f"{words} {timings[key]:.1f}s" for key, words in PHASES.items() if timings.get(key, 0.0) >= 0.05]
    return f"{timings.get('total_s', 0.0):.1f}s: " + ", ".join(parts)
