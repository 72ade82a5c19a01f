"""Tune's per-trial result files across a trial that starts again from a checkpoint in the same
search (a PBT pause or exploit, a retry): the search's writers (tune.trial_logs) keep the epochs
the driver wrote since its last sync to the storage path, which Tune's own writers overwrite
with the lagging storage copy; a driver that resumes the search, with no copy of its own,
still starts from the storage copy."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import pyarrow.fs
import pytest
from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

from tune.trial_logs import TrialProgress, TrialResults, trial_log_writers

WRITERS = {  # (the search's writer, Tune's own): the file they write
    (TrialResults, JsonLoggerCallback): "result.json",
    (TrialProgress, CSVLoggerCallback): "progress.csv",
}


class Trial:
    """What Tune's writers read of a trial: its files are written in ``tmp_path/folder`` and
    synced to ``tmp_path/storage``; ``restarted``: it starts from a checkpoint."""

    def __init__(self, tmp_path: Path, folder: str, *, restarted: bool):
        self.local_path, self.config = str(tmp_path / folder), {}
        self.checkpoint = object() if restarted else None
        self.storage = SimpleNamespace(
            trial_fs_path=str(tmp_path / "storage"), storage_filesystem=pyarrow.fs.LocalFileSystem()
        )

    def init_local_path(self) -> None:
        Path(self.local_path).mkdir(parents=True, exist_ok=True)


def report(writer_class: type, trial: Trial, epochs: list[int]) -> None:
    writer = writer_class()
    trial.init_local_path()  # Tune makes the trial's folder before its writers start
    writer.log_trial_start(trial)
    for epoch in epochs:
        writer.log_trial_result(epoch, trial, {"epoch": epoch, "loss": 1.0 / epoch})
    writer.log_trial_end(trial)


def epochs_in(folder: Path, name: str) -> list[int]:
    text = (folder / name).read_text()
    if name.endswith(".csv"):
        return [int(row["epoch"]) for row in csv.DictReader(text.splitlines())]
    return [json.loads(line)["epoch"] for line in text.splitlines() if line.strip()]


@pytest.mark.parametrize("writers", WRITERS, ids=WRITERS.values())
def test_a_trial_that_starts_again_keeps_the_epochs_since_the_last_sync(tmp_path, writers):
    """The storage copy was synced after epoch 1, the driver's holds epochs 1 and 2, and the
    trial starts again and reports epoch 3: the search's writer keeps all three; Tune's own
    loses epoch 2 (the defect the search's writer exists for)."""
    name = WRITERS[writers]
    for writer_class in writers:
        run = tmp_path / writer_class.__name__
        report(writer_class, Trial(run, "storage", restarted=False), [1])  # the last sync
        report(writer_class, Trial(run, "driver", restarted=False), [1, 2])
        report(writer_class, Trial(run, "driver", restarted=True), [3])
    ours, tunes = writers
    assert epochs_in(tmp_path / ours.__name__ / "driver", name) == [1, 2, 3]
    assert epochs_in(tmp_path / tunes.__name__ / "driver", name) == [1, 3]


@pytest.mark.parametrize("writers", WRITERS, ids=WRITERS.values())
def test_a_resuming_driver_starts_from_the_storage_copy(tmp_path, writers):
    ours, _ = writers
    report(ours, Trial(tmp_path, "storage", restarted=False), [1, 2])
    report(ours, Trial(tmp_path, "new-driver", restarted=True), [3])
    assert epochs_in(tmp_path / "new-driver", WRITERS[writers]) == [1, 2, 3]


def test_a_search_passes_its_writers_so_tune_adds_none_of_its_own():
    from ray.tune.utils.callback import _create_default_callbacks

    callbacks = _create_default_callbacks(trial_log_writers())
    writers = [c for c in callbacks if isinstance(c, (JsonLoggerCallback, CSVLoggerCallback))]
    assert sorted(type(c).__name__ for c in writers) == ["TrialProgress", "TrialResults"]
