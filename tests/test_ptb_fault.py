"""A PTB run whose worker dies mid-epoch completes through FailureConfig, resumes from its last
checkpoint, and ends with the same metrics as an uninterrupted run with the same seed."""

from __future__ import annotations

import pytest
from conftest import ptb_base_config, run_settings
from hooks import ExitOnce

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
    assert killed.final["test_ppl"] == pytest.approx(clean.final["test_ppl"], rel=0)
