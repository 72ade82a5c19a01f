"""The regularized model on 2 Ray Train workers: tied weights, weight drop (the fused LSTM
called on a recomputed matrix inside DDP), variable-length BPTT and NT-ASGD train in lock-step."""

from __future__ import annotations

import math

from conftest import run_settings

from lstm.data import ptb
from lstm.tasks.ptb import PTBTask
from lstm.tasks.ptb_config import PRESETS, PTBConfig
from lstm.trainer import fit

CONFIG = PTBConfig(
    **{
        **PRESETS["test"],
        "hidden_size": 8,
        "num_steps": 10,
        "max_epoch": 2,
        "max_max_epoch": 2,
        "train_fraction": 0.02,
        "eval_num_steps": 35,
        "tied": True,
        "locked_dropout_output": 0.2,
        "embedding_dropout": 0.05,
        "weight_drop": 0.3,
        "ar": 1.0,
        "tar": 1.0,
        "vary_num_steps": True,
        "loss_per_token": True,
        "learning_rate": 10.0,
        "optimizer": "nt-asgd",
    }
)


def test_a_regularized_run_on_two_workers_steps_in_lock_step(ray_session, ptb_dir, tmp_path):
    result = fit("ptb", CONFIG, run_settings(tmp_path, "two", ptb_dir, num_workers=2))
    h = result.history
    assert [e["workers"] for e in h] == [2, 2]
    # every epoch trained the windows one worker draws (all 20 rows), no more, no less
    task = PTBTask(CONFIG)
    task.setup(ptb.load_corpus(ptb_dir))
    per_epoch = [sum(x.numel() for x, _ in task.train_batches(epoch)) for epoch in range(2)]
    assert [e["samples_seen"] for e in h] == [per_epoch[0], sum(per_epoch)]
    assert all(math.isfinite(e["valid_ppl"]) for e in h) and h[1]["valid_ppl"] < h[0]["valid_ppl"]
    assert math.isfinite(result.final["test_ppl"])
