"""A run whose worker dies mid-epoch completes through FailureConfig, resumes from its last
checkpoint, and ends with the same metrics as an uninterrupted run with the same seed. A damaged
checkpoint costs that checkpoint, not the run: ``--resume`` skips it with one line and resumes
from the one before; with none intact it stops with one line, at once, without a retry.

None of this depends on the task: it is shown on the smallest one, the rectangle task, against
conftest's ``rect_base`` (2 workers, so that the loss of one stops a DDP group). The PTB job's
own run is test_ptb_job.py's."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
from conftest import own_lines, rect_base_config, rect_metrics, run_settings
from hooks import ExitOnce
from test_rectangle import shapes_per_epoch

from lstm import config as cfg
from lstm.cli import train_main
from lstm.errors import run_cli
from lstm.tasks.rectangle import ShapeConfig
from lstm.trainer import fit


def test_a_worker_killed_mid_epoch_costs_one_epoch_and_changes_nothing(rect_base, tmp_path):
    clean, _ = rect_base  # the uninterrupted run of the same config and seed
    # rank 0 exits abruptly at step 20 of epoch 2 (first attempt only); FailureConfig restarts
    # the worker group from the checkpoint of epoch 1, and epoch 2 is trained again.
    settings = run_settings(tmp_path, "killed", num_workers=2, max_failures=1, checkpoints_to_keep=5)
    killed = fit("rectangle", rect_base_config(), settings, hooks=[ExitOnce(epoch=2, step=20)])
    assert (tmp_path / "killed" / ".exited").is_file()
    # it resumed after epoch 1 instead of starting over: two checkpoints were reported, not three
    assert len([p for p in (tmp_path / "killed").glob("checkpoint_*") if p.is_dir()]) == 2
    assert [e["epoch"] for e in killed.history] == [e["epoch"] for e in clean.history] == [1, 2]
    # epoch 1 ran before the kill: the same seed gave the same metrics; epoch 2 ran after the restart
    assert rect_metrics(killed.history) == rect_metrics(clean.history)
    assert killed.final["valid_consistency"] == clean.final["valid_consistency"]
    # the time line shows what the failure cost as a phase of its own, and covers the whole command
    t = killed.timings
    assert t["recovery_s"] > 0 and t["train_s"] == pytest.approx(sum(e["train_s"] for e in killed.history), abs=1e-3)
    assert sum(v for k, v in t.items() if k != "total_s") == pytest.approx(t["total_s"], abs=0.02)
    assert json.loads((tmp_path / "killed" / "results.json").read_text())["wall_time_s"] == t["total_s"]
    assert not (tmp_path / "killed" / ".attempts").exists()


# --------------------------------------------------------------------------- damaged checkpoints


def copy_of_base(rect_base, tmp_path: Path, name: str) -> list[Path]:
    """A copy, called ``name``, of the session's finished 2-epoch run; its two checkpoint
    folders, newest first (Ray Train names them by time)."""
    _, storage = rect_base
    shutil.copytree(storage / "base", tmp_path / name)
    return sorted((p for p in (tmp_path / name).glob("checkpoint_*") if p.is_dir()), reverse=True)


def truncate(path: Path) -> int:
    """Cut ``path`` to half its size; returns the size it had."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return len(data)


# Resumed to 3 epochs of 100 shapes (the run's epochs had 300): an epoch trained again shows.
LONGER = cfg.build(ShapeConfig, {**cfg.to_dict(rect_base_config()), "examples": 300, "epochs": 3})


def resume_job(tmp_path: Path, name: str, capsys) -> tuple[int, str, list[str]]:
    """``jobs/rectangle.py`` resuming the run ``name`` as :data:`LONGER`, on one worker (as a
    user may, on a smaller machine; the job's default of 3 retries), in this process: (exit
    status, stdout, the lines this process wrote to stderr)."""
    argv = ["--config", "test", "--examples", "300", "--epochs", "3", "--num-workers", "1", "--cpus-per-worker", "1"]
    argv += ["--storage-path", str(tmp_path), "--name", name, "--resume"]
    with pytest.raises(SystemExit) as info:
        run_cli(lambda a: train_main("rectangle", a), argv)
    out, err = capsys.readouterr()
    return info.value.code, out, own_lines(err)


def worker_lines(needle: str) -> list[str]:
    """The lines containing ``needle`` that Ray's workers in this test process printed (their
    stdout files in the session's log folder, complete once the run has returned)."""
    logs = Path(os.environ["RAY_TMPDIR"]) / "ray" / "session_latest" / "logs"
    return [
        line for path in sorted(logs.glob("worker-*.out")) for line in path.read_text().splitlines() if needle in line
    ]


def test_a_damaged_newest_checkpoint_is_skipped_with_one_line_and_the_run_resumes(rect_base, tmp_path, capsys):
    clean, _ = rect_base
    newest, older = copy_of_base(rect_base, tmp_path, "damaged")
    size = truncate(newest / "model.pt")
    status, _, _ = resume_job(tmp_path, "damaged", capsys)
    assert status == 0
    skip = (
        f"[rectangle] skipped {newest.name}: model.pt is {size // 2} bytes, the manifest says {size}; "
        f"resuming from {older.name}"
    )
    assert worker_lines(f"skipped {newest.name}") == [skip]  # the chief's line
    epochs = json.loads((tmp_path / "damaged" / "results.json").read_text())["epochs"]
    assert [e["epoch"] for e in epochs] == [1, 2, 3]
    # epoch 1 came from the older checkpoint; epoch 2 was trained again, on LONGER's 100 shapes
    # (one worker) instead of the run's 296 (two workers, 148 each in whole batches)
    assert rect_metrics(epochs[:1]) == rect_metrics(clean.history[:1])
    seen = [e["samples_seen"] for e in epochs]
    assert [seen[1] - seen[0], seen[2] - seen[1]] == [shapes_per_epoch(LONGER, 1)] * 2
    assert shapes_per_epoch(LONGER, 1) < clean.history[1]["samples_seen"] - clean.history[0]["samples_seen"]


def test_nothing_intact_to_resume_from_is_one_line_at_once_without_a_retry(rect_base, tmp_path, capsys):
    checkpoints = copy_of_base(rect_base, tmp_path, "ruined")
    for checkpoint in checkpoints:
        truncate(checkpoint / "model.pt")
    # The job allows 3 retries, and the error still comes back as itself, once: a worker failure
    # retried and failed again would come out of fit() as Ray Train's error after 4 attempts.
    status, out, err = resume_job(tmp_path, "ruined", capsys)
    newest, older = (rf"{re.escape(c.name)}/model\.pt is \d+ bytes, the manifest says \d+" for c in checkpoints)
    assert status == 2 and len(err) == 1, err
    assert re.fullmatch(
        rf"error: cannot resume: no intact checkpoint left in \S+/ruined \({newest}; {older}\); start a new run "
        "with another --name",
        err[0],
    )
    assert (out + err[0]).count("cannot resume") == 1
