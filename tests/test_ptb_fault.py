"""A PTB run whose worker dies mid-epoch completes through FailureConfig, resumes from its last
checkpoint, and ends with the same metrics as an uninterrupted run with the same seed. A damaged
checkpoint costs that checkpoint, not the run: ``--resume`` skips it with one line and resumes
from the one before; with none intact it stops with one line, at once, without a retry."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
from conftest import ptb_base_config, run_settings
from hooks import ExitOnce
from test_ptb_score import run_job

from lstm import config as cfg
from lstm.errors import UserError
from lstm.tasks.ptb import PTBConfig
from lstm.trainer import fit

KEYS = ("train_loss", "valid_loss")


def test_a_worker_killed_mid_epoch_costs_one_epoch_and_changes_nothing(ptb_base, tmp_path):
    clean, _, data = ptb_base  # the uninterrupted run of the same config and seed
    # the worker exits abruptly at step 100 of epoch 2 (first attempt only); FailureConfig
    # restarts the worker from the checkpoint of epoch 1, and epoch 2 is trained again.
    killed = fit(
        "ptb",
        ptb_base_config(),
        run_settings(tmp_path, "killed", data, max_failures=1, checkpoints_to_keep=5),
        hooks=[ExitOnce(epoch=2, step=100)],
    )
    assert (tmp_path / "killed" / ".exited").is_file()
    # it resumed after epoch 1 instead of starting over: two checkpoints were reported, not three
    assert len([p for p in (tmp_path / "killed").glob("checkpoint_*") if p.is_dir()]) == 2
    assert [e["epoch"] for e in killed.history] == [1, 2]
    assert [e["epoch"] for e in clean.history] == [1, 2]
    # epoch 1 ran before the kill: the same seed gave the same losses; epoch 2 ran after the restart
    for a, b in zip(clean.history, killed.history, strict=True):
        assert [b[k] for k in KEYS] == [a[k] for k in KEYS]
    assert killed.final["test_loss"] == clean.final["test_loss"]
    # the time line shows what the failure cost as a phase of its own, and covers the whole command
    t = killed.timings
    assert t["recovery_s"] > 0 and t["train_s"] == pytest.approx(sum(e["train_s"] for e in killed.history), abs=1e-3)
    assert sum(v for k, v in t.items() if k != "total_s") == pytest.approx(t["total_s"], abs=0.02)
    assert json.loads((tmp_path / "killed" / "results.json").read_text())["wall_time_s"] == t["total_s"]
    assert not (tmp_path / "killed" / ".attempts").exists()
    assert killed.final["test_ppl"] == pytest.approx(clean.final["test_ppl"], rel=0)


# --------------------------------------------------------------------------- damaged checkpoints


def copy_of_base(ptb_base, tmp_path: Path, name: str) -> list[Path]:
    """A copy, called ``name``, of the session's finished 2-epoch run; its two checkpoint
    folders, newest first (Ray Train names them by time)."""
    _, storage, _ = ptb_base
    shutil.copytree(storage / "base", tmp_path / name)
    return sorted((p for p in (tmp_path / name).glob("checkpoint_*") if p.is_dir()), reverse=True)


def truncate(path: Path) -> int:
    """Cut ``path`` to half its size; returns the size it had."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return len(data)


def resume_flags(tmp_path: Path, name: str, data: Path) -> list[str]:
    """``jobs/ptb.py`` flags that resume the run ``name`` to 3 epochs, each on 0.5% of PTB."""
    base = ["--config", "test", "--train-fraction", "0.005", "--eval-num-steps", "35", "--max-max-epoch", "3"]
    return base + ["--data-dir", str(data), "--storage-path", str(tmp_path), "--name", name, "--resume"]


def worker_lines(needle: str) -> list[str]:
    """The lines containing ``needle`` that Ray's workers in this test process printed (their
    stdout files in the session's log folder, complete once the run has returned)."""
    logs = Path(os.environ["RAY_TMPDIR"]) / "ray" / "session_latest" / "logs"
    return [
        line for path in sorted(logs.glob("worker-*.out")) for line in path.read_text().splitlines() if needle in line
    ]


def test_a_damaged_newest_checkpoint_is_skipped_with_one_line_and_the_run_resumes(ptb_base, tmp_path, capsys):
    clean, _, data = ptb_base
    newest, older = copy_of_base(ptb_base, tmp_path, "damaged")
    size = truncate(newest / "model.pt")
    status, _, _ = run_job(resume_flags(tmp_path, "damaged", data), capsys)
    assert status == 0
    skip = (
        f"[ptb] skipped {newest.name}: model.pt is {size // 2} bytes, the manifest says {size}; "
        f"resuming from {older.name}"
    )
    assert worker_lines(f"skipped {newest.name}") == [skip]
    epochs = json.loads((tmp_path / "damaged" / "results.json").read_text())["epochs"]
    assert [e["epoch"] for e in epochs] == [1, 2, 3]
    # epoch 1 came from the older checkpoint; epoch 2 was trained again (on less data this time)
    assert [epochs[0][k] for k in KEYS] == [clean.history[0][k] for k in KEYS]
    assert epochs[1]["train_loss"] != clean.history[1]["train_loss"]


def test_nothing_intact_to_resume_from_is_one_line_at_once_without_a_retry(ptb_base, tmp_path, capsys):
    _, _, data = ptb_base
    checkpoints = copy_of_base(ptb_base, tmp_path, "ruined")
    for checkpoint in checkpoints:
        truncate(checkpoint / "model.pt")
    # With retries allowed, the error still comes back as itself: a worker failure retried
    # and failed again would come out of fit() as Ray Train's error after 4 attempts.
    longer = cfg.build(PTBConfig, {**cfg.to_dict(ptb_base_config()), "max_max_epoch": 3})
    with pytest.raises(UserError) as info:
        fit("ptb", longer, run_settings(tmp_path, "ruined", data, max_failures=3), resume=True)
    assert type(info.value) is UserError
    message = str(info.value)
    newest, older = (rf"{re.escape(c.name)}/model\.pt is \d+ bytes, the manifest says \d+" for c in checkpoints)
    assert re.match(rf"cannot resume: no intact checkpoint left in \S+/ruined \({newest}; {older}\); start ", message)
    # the job (jobs' default: 3 retries) prints it once, as its only line on stderr, and exits 2
    status, out, err = run_job(resume_flags(tmp_path, "ruined", data), capsys)
    assert status == 2 and err.strip().splitlines() == [f"error: {message}"]
    assert (out + err).count("cannot resume") == 1
