"""A diverging loss on 2 Ray Train workers stops both with one line. (That 2 workers reproduce
the 1-worker run is tests/test_tune.py's: the job, a one-worker and a two-worker trial.)"""

from __future__ import annotations

import pytest
from conftest import ptb_base_config, run_settings
from test_ptb_errors import DIVERGED

from lstm import config as cfg
from lstm.errors import UserError
from lstm.tasks.ptb_config import PTBConfig
from lstm.trainer import fit


def test_nan_loss_stops_all_workers_with_one_line(ray_session, ptb_dir, tmp_path):
    diverging = cfg.build(PTBConfig, {**cfg.to_dict(ptb_base_config()), "learning_rate": 1e30})
    with pytest.raises(UserError, match=DIVERGED + r"1 step \d+; lower --learning-rate") as info:
        fit("ptb", diverging, run_settings(tmp_path, "nan", ptb_dir, num_workers=2, max_failures=2))
    assert "\n" not in str(info.value)
