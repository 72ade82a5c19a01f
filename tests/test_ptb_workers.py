"""The PTB job on 2 Ray Train workers reproduces the 1-worker run, and a diverging loss stops
both workers with one line."""

from __future__ import annotations

import pytest
from conftest import ptb_base_config, run_settings
from test_ptb_errors import DIVERGED

from lstm import config as cfg
from lstm.errors import UserError
from lstm.tasks.ptb import PTBConfig
from lstm.trainer import fit

CONFIG = ptb_base_config()
KEYS = ("train_loss", "valid_loss")


@pytest.fixture(scope="module")
def runs(ptb_base, ptb_two, tmp_path_factory):
    """The session's 1-worker run and 2-worker run of the same config and seed."""
    one, _, data = ptb_base
    two, _ = ptb_two
    return one, two, tmp_path_factory.mktemp("runs"), data


def test_two_workers_reproduce_one_worker(runs):
    """batch_size is global: 2 workers x 10 rows take the same steps as 1 worker x 20 rows."""
    one, two, _, _ = runs
    assert [e["workers"] for e in two.history] == [2, 2] and [e["workers"] for e in one.history] == [1, 1]
    assert [e["samples_seen"] for e in two.history] == [e["samples_seen"] for e in one.history]
    for a, b in zip(one.history, two.history, strict=True):
        for key in KEYS:
            assert b[key] == pytest.approx(a[key], rel=1e-4), key
    assert two.metrics["test_ppl"] == pytest.approx(one.metrics["test_ppl"], rel=1e-4)


def test_nan_loss_stops_all_workers_with_one_line(runs):
    _, _, storage, data = runs
    diverging = cfg.build(PTBConfig, {**cfg.to_dict(CONFIG), "learning_rate": 1e30})
    with pytest.raises(UserError, match=DIVERGED + r"1 step \d+; lower --learning-rate") as info:
        fit("ptb", diverging, run_settings(storage, "nan", data, num_workers=2, max_failures=2))
    assert "\n" not in str(info.value)
