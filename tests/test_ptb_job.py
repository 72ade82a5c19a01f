"""The PTB job on Ray Train (one worker): what a run of the tutorial's test config reports and
writes, and `--resume` with another architecture stops with one line (test_ptb_errors.py has
the other refusals). That a run survives a lost worker or node with the same metrics is
test_fault.py's and test_multinode.py's, on the rectangle task; that 2 workers reproduce this
one worker is test_tune.py's (the job, a one-worker and a two-worker trial)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import ptb_base_config, ptb_epoch_words, run_settings
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lstm import config as cfg
from lstm.checkpoint import read_state
from lstm.errors import UserError
from lstm.tasks.ptb import PTBTask
from lstm.tasks.ptb_config import PTBConfig
from lstm.trainer import fit

CONFIG = ptb_base_config()  # the config of the session's run, conftest.ptb_base


def test_a_run_learns_and_writes_its_outputs(ptb_base):
    result, _, data = ptb_base
    h = result.history
    lr = CONFIG.learning_rate
    assert [e["epoch"] for e in h] == [1, 2] and [e["lr"] for e in h] == [lr, lr * CONFIG.lr_decay]  # max_epoch 1
    assert h[1]["train_ppl"] < h[0]["train_ppl"] < 2000 and h[1]["valid_ppl"] < 1500
    assert "test_ppl" in h[1] and "test_ppl" not in h[0]
    words = ptb_epoch_words(data, CONFIG.train_fraction, CONFIG.batch_size, CONFIG.num_steps)
    assert [e["samples_seen"] for e in h] == [words, 2 * words] and h[0]["words_per_sec"] > 0
    results = json.loads(Path(result.results_path).read_text())
    assert results["config"]["train_fraction"] == 0.02 and results["final"]["test_ppl"] == h[1]["test_ppl"]
    assert results["wall_time_s"] > 0
    # where the time went (lstm.timings): fit's phases, one after the other, the worker's included
    t = results["timings"]
    assert t["train_s"] == pytest.approx(sum(e["train_s"] for e in h), abs=1e-3) and t["workers_up_s"] > 0
    assert t["eval_s"] == pytest.approx(sum(e["eval_s"] for e in h), abs=1e-3)
    assert "imports_s" not in t  # fit() was called, not the command
    assert sum(v for k, v in t.items() if k != "total_s") == pytest.approx(t["total_s"], abs=0.02)
    assert min(t.values()) >= -0.01 and result.timings == t
    assert [Path(p).name for p in result.plots] == ["learning_curve.png"]
    assert Path(result.plots[0]).stat().st_size > 5000
    board = EventAccumulator(str(Path(result.run_dir) / "tensorboard"))
    board.Reload()  # the controller's TensorBoard callback: every epoch's scalars, step = epoch
    assert [(e.step, e.value) for e in board.Scalars("valid_ppl")] == [
        (r["epoch"], pytest.approx(r["valid_ppl"], rel=1e-6)) for r in h
    ]
    meta = read_state(result.checkpoint)["meta"]
    assert meta["vocab_size"] == 10000 and meta["vocab"][:3] == ["the", "<unk>", "<eos>"]


def test_the_epoch_line_shows_lr_perplexities_speed_and_time(ptb_base):
    line = PTBTask.display.epoch_line(ptb_base[0].history[-1])
    for part in ("epoch  2/2", "lr 0.5", "train ppl ", "valid ppl ", "test ppl ", "words/sec ", "elapsed "):
        assert part in line


def test_resume_with_another_architecture_is_a_one_line_error(ptb_base):
    _, storage, data = ptb_base
    other = cfg.build(PTBConfig, {**cfg.to_dict(CONFIG), "hidden_size": 3, "max_max_epoch": 3})
    with pytest.raises(
        UserError, match="does not match this model's architecture .* resume with the config it was trained with"
    ) as info:
        fit("ptb", other, run_settings(storage, "base", data), resume=True)
    assert "\n" not in str(info.value)


def test_a_one_worker_cpu_runs_controller_never_imports_torch(ptb_base):
    """lstm.ray_private.slim_trainer gives a one-worker CPU run Ray Train's plain backend, and the loop config
    travels by reference: nothing the controller unpickles imports torch (seconds of a run's
    start on a small machine)."""
    _, storage, _ = ptb_base
    assert json.loads((storage / "controller-imports.json").read_text()) == {"torch": False}
