"""A job's run as users start it (``jobs/ptb.py`` in this process, on the suite's Ray
instance): an NT-ASGD run stopped after an epoch and continued with ``--resume --name`` ends
as the run uninterrupted, and without ``--storage-path`` both commands use
``$LSTM_RAY_STORAGE``."""

from __future__ import annotations

import json

from test_nt_asgd import CONFIG, drifting_data  # noqa: F401 - drifting_data is a fixture
from test_ptb_errors import train
from test_ptb_score import run_job

from lstm import config as cfg

# What the deterministic-resume promise covers: every epoch's losses and NT-ASGD's state.
KEYS = ("epoch", "lr", "train_loss", "valid_loss", "asgd_switched", "asgd_steps")


def test_an_nt_asgd_run_in_lstm_ray_storage_resumed_by_name_ends_as_the_run_uninterrupted(
    drifting_data,  # noqa: F811
    ray_session,
    one_torch_thread,
    tmp_path,
    capsys,
    monkeypatch,
):
    """test_nt_asgd.py's config (it switches to averaging after epoch 3) through jobs/ptb.py:
    four epochs, then ``--resume --name`` with five. The fifth epoch continues the average of
    the weights from the checkpoint of the fourth (its validation loss is the averaged
    weights'), so it matches the uninterrupted run only if the averages, the switch and the
    loss history were restored. The uninterrupted run is the loop in this process, one thread
    as the job's worker has here (test_tune.py shows that the two train the same epochs).

    Both commands name no --storage-path: the run goes to, and is resumed from,
    ``$LSTM_RAY_STORAGE/<name>``."""
    storage = tmp_path / "from-env"
    monkeypatch.setenv("LSTM_RAY_STORAGE", str(storage))
    config_file = tmp_path / "nt-asgd.json"
    config_file.write_text(json.dumps({"task": "ptb", **cfg.to_dict(CONFIG)}))
    common = ["--config-file", str(config_file), "--data-dir", str(drifting_data), "--name", "run"]
    common += ["--cpus-per-worker", "1"]  # two threads' waits on 2 busy cores make epochs 10x longer

    def job(*argv: str) -> list[dict]:
        status, out, err = run_job([*common, *argv], capsys)
        assert status == 0, err[-3000:]
        assert f"[ptb] run folder: {storage / 'run'}" in out and f"done: ptb run in {storage / 'run'}" in out
        return json.loads((storage / "run" / "results.json").read_text())["epochs"]

    stopped = job("--max-max-epoch", "4")
    resumed = job("--resume")
    whole = train(CONFIG, drifting_data)
    assert [e["asgd_switched"] for e in whole] == [False, False, True, False, False]
    assert [e["asgd_steps"] > 0 for e in whole] == [False, False, False, True, True]
    assert [{k: e[k] for k in KEYS} for e in resumed] == [{k: e[k] for k in KEYS} for e in whole]
    assert resumed[-1]["test_loss"] == whole[-1]["test_loss"]
    # the resume trained the fifth epoch only: the first four are the stopped run's own records
    # (timings included, which a run trained again would not repeat)
    assert resumed[:4] == stopped
    assert sorted(p.name for p in tmp_path.iterdir()) == ["from-env", "nt-asgd.json"]
