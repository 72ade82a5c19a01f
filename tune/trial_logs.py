"""Tune's per-trial result files (``result.json``, ``progress.csv``), written so that a trial
that starts again from a checkpoint holds each epoch once, all of them.

When a trial starts from a checkpoint (a PBT pause or exploit, a retry, ``--resume``), Tune's
writers copy the trial's file from the storage path over the driver's own copy, which lags by
up to one background sync: the epochs reported since were lost, from the report and its curves
too. And a search interrupted after a trial reported an epoch but before Tune registered that
epoch's checkpoint resumes the trial from the checkpoint before: that epoch ran, and is
reported, twice. These writers keep the driver's copy where it exists (it holds all the storage
copy holds), restore from storage only where it does not (a new driver that resumes), and drop
the lines after the epoch of the checkpoint the trial starts from: it reports those again.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Callable, Optional

from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

from lstm import ray_private, storage
from lstm.checkpoint import MANIFEST_FILE

EPOCH = "epoch"


def start_epoch(trial: Any) -> Optional[int]:
    """The epoch of the checkpoint ``trial`` starts from (its manifest's), None if unknown."""
    checkpoint = trial.checkpoint
    if checkpoint is None:
        return None
    try:
        with checkpoint.filesystem.open_input_stream(f"{checkpoint.path}/{MANIFEST_FILE}") as f:
            return int(json.loads(f.read())["epoch"])
    except (OSError, KeyError, ValueError, TypeError):
        return None


def _json_lines_through(lines: list[str], epoch: int) -> list[str]:
    def at(line: str) -> float:
        try:
            return float(json.loads(line).get(EPOCH, 0))
        except (ValueError, TypeError, AttributeError):  # a line cut short: dropped
            return float("inf")

    return [line for line in lines if at(line) <= epoch]


def _csv_lines_through(lines: list[str], epoch: int) -> list[str]:
    if not lines:
        return lines
    column = next(csv.reader([lines[0]]))
    if EPOCH not in column:
        return lines
    at = column.index(EPOCH)

    def kept(line: str) -> bool:
        row = next(csv.reader([line]), [])
        try:
            return float(row[at]) <= epoch
        except (IndexError, ValueError):
            return False

    return lines[:1] + [line for line in lines[1:] if kept(line)]


def _resume(restore: Callable[[str, Any], None], file_name: str, trial: Any, through: Callable) -> None:
    local = Path(trial.local_path, file_name)
    if not local.exists():
        restore(file_name, trial)
    epoch = start_epoch(trial)
    if epoch is not None and local.exists():
        lines = local.read_text().splitlines(keepends=True)
        kept = through(lines, epoch)
        if kept != lines:  # atomically: a driver stopped meanwhile leaves the whole file
            storage.atomic_write(local, lambda f: f.write("".join(kept).encode("utf-8")))


class TrialResults(JsonLoggerCallback):
    """Tune's ``result.json`` writer, each epoch once across restarts."""

    def _restore_from_remote(self, file_name: str, trial: Any) -> None:
        _resume(super()._restore_from_remote, file_name, trial, _json_lines_through)


class TrialProgress(CSVLoggerCallback):
    """Tune's ``progress.csv`` writer, each epoch once across restarts."""

    def _restore_from_remote(self, file_name: str, trial: Any) -> None:
        _resume(super()._restore_from_remote, file_name, trial, _csv_lines_through)


def trial_log_writers() -> list[Any]:
    """The writers to pass among a search's callbacks (Tune then adds none of its own for these
    files); a warning where a Ray upgrade renamed the restore they override."""
    ray_private.check_trial_log_restore()
    return [TrialResults(), TrialProgress()]
