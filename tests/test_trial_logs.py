"""Tune's per-trial result files across a trial that starts again from a checkpoint (a PBT
pause or exploit, a retry, ``--resume``): the search's writers (tune.trial_logs) keep the
epochs the driver wrote since its last sync to the storage path, which Tune's own writers
overwrite with the lagging storage copy; a new driver that resumes starts from the storage
copy; and the epochs after the checkpoint's, which the trial reports again, are there once."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import pyarrow.fs
import pytest
import torch
from ray.train import Checkpoint
from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

from lstm import checkpoint as ckpt
from tune.trial_logs import TrialProgress, TrialResults, trial_log_writers

WRITERS = {  # (the search's writer, Tune's own): the file they write
    (TrialResults, JsonLoggerCallback): "result.json",
    (TrialProgress, CSVLoggerCallback): "progress.csv",
}


class Trial:
    """What Tune's writers read of a trial: its files are written in ``tmp_path/folder`` and
    synced to ``tmp_path/storage``; ``start_epoch``: the epoch of the checkpoint it starts
    from (a checkpoint folder as a run writes it), None for a new trial."""

    def __init__(self, tmp_path: Path, folder: str, *, start_epoch: Optional[int] = None):
        self.local_path, self.config = str(tmp_path / folder), {}
        self.storage = SimpleNamespace(
            trial_fs_path=str(tmp_path / "storage"), storage_filesystem=pyarrow.fs.LocalFileSystem()
        )
        self.checkpoint = None
        if start_epoch is not None:
            directory = tmp_path / f"checkpoint_epoch{start_epoch}"
            directory.mkdir(exist_ok=True)
            model = torch.nn.Linear(2, 2)
            ckpt.save(directory, model, torch.optim.SGD(model.parameters(), lr=0.1), {"epoch": start_epoch})
            self.checkpoint = Checkpoint.from_directory(str(directory))

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
    trial starts again from its epoch-2 checkpoint and reports epoch 3: the search's writer
    keeps all three; Tune's own loses epoch 2 (the defect the search's writer exists for)."""
    name = WRITERS[writers]
    for writer_class in writers:
        run = tmp_path / writer_class.__name__
        report(writer_class, Trial(run, "storage"), [1])  # the last sync
        report(writer_class, Trial(run, "driver"), [1, 2])
        report(writer_class, Trial(run, "driver", start_epoch=2), [3])
    ours, tunes = writers
    assert epochs_in(tmp_path / ours.__name__ / "driver", name) == [1, 2, 3]
    assert epochs_in(tmp_path / tunes.__name__ / "driver", name) == [1, 3]


@pytest.mark.parametrize("writers", WRITERS, ids=WRITERS.values())
def test_epochs_after_the_checkpoint_a_trial_starts_from_are_reported_once(tmp_path, writers):
    """The search was interrupted after the trial reported epoch 3 but before Tune registered
    its checkpoint: it starts again from epoch 2's and reports epoch 3 again, which replaces
    the first."""
    name, (ours, _) = WRITERS[writers], writers
    report(ours, Trial(tmp_path, "driver"), [1, 2, 3])
    report(ours, Trial(tmp_path, "driver", start_epoch=2), [3])
    assert epochs_in(tmp_path / "driver", name) == [1, 2, 3]


@pytest.mark.parametrize("writers", WRITERS, ids=WRITERS.values())
def test_a_resuming_driver_starts_from_the_storage_copy(tmp_path, writers):
    ours, _ = writers
    report(ours, Trial(tmp_path, "storage"), [1, 2])
    report(ours, Trial(tmp_path, "new-driver", start_epoch=2), [3])
    assert epochs_in(tmp_path / "new-driver", WRITERS[writers]) == [1, 2, 3]


def test_a_search_passes_its_writers_so_tune_adds_none_of_its_own():
    from ray.tune.utils.callback import _create_default_callbacks

    callbacks = _create_default_callbacks(trial_log_writers())
    writers = [c for c in callbacks if isinstance(c, (JsonLoggerCallback, CSVLoggerCallback))]
    assert sorted(type(c).__name__ for c in writers) == ["TrialProgress", "TrialResults"]
