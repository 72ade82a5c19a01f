"""Tune's per-trial result files (``result.json``, ``progress.csv``), written so that a trial
that starts again in the same search keeps every epoch it reported.

When a trial starts from a checkpoint (a PBT pause or exploit, a retry after a failure), Tune's
writers first copy the trial's file from the storage path over the driver's own copy. The
storage copy is the driver's as of its last sync, which runs in the background and lags by up
to one sync; the epochs reported since were lost from the file, and with them from the report,
its curves and ASHA's rungs on ``--resume``. These writers keep the driver's copy where it
exists (it holds all the storage copy holds, and more) and restore from storage only where it
does not: a new driver that resumes the search.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

from lstm import ray_private


def _restore_unless_local(restore: Any, file_name: str, trial: Any) -> None:
    if not Path(trial.local_path, file_name).exists():
        restore(file_name, trial)


class TrialResults(JsonLoggerCallback):
    """Tune's ``result.json`` writer; a trial that starts again keeps the driver's copy."""

    def _restore_from_remote(self, file_name: str, trial: Any) -> None:
        _restore_unless_local(super()._restore_from_remote, file_name, trial)


class TrialProgress(CSVLoggerCallback):
    """Tune's ``progress.csv`` writer; a trial that starts again keeps the driver's copy."""

    def _restore_from_remote(self, file_name: str, trial: Any) -> None:
        _restore_unless_local(super()._restore_from_remote, file_name, trial)


def trial_log_writers() -> list[Any]:
    """The writers to pass among a search's callbacks (Tune then adds none of its own for these
    files); a warning where a Ray upgrade renamed the restore they override."""
    ray_private.check_trial_log_restore()
    return [TrialResults(), TrialProgress()]
