"""lstm.timings: the breakdown of a run's wall time that results.json keeps and the job prints
(test_ptb_job.py checks it on a real run), and the frozen heap at a command's exit."""

from __future__ import annotations

import gc
import subprocess
import sys

import pytest

from lstm.errors import run_cli
from lstm.timings import PHASES, Phases, breakdown, format_line

DRIVER = {
    "imported": 100.0,
    "fit_called": 102.0,
    "checked": 102.5,
    "ray_started": 107.5,
    "fit_started": 108.0,
    "fit_returned": 130.0,
    "outputs_written": 131.0,
}
WORKER = {"started_at": 115.0, "training_at": 116.0, "train_s": 6.0, "eval_s": 4.0, "finished_at": 127.0}


def test_the_phases_follow_each_other_and_add_up_to_the_total():
    t = breakdown(DRIVER, WORKER)
    assert t == {
        "imports_s": 2.0,
        "checks_s": 0.5,
        "ray_start_s": 5.0,
        "cluster_checks_s": 0.5,
        "workers_up_s": 7.0,
        "worker_setup_s": 1.0,
        "train_s": 6.0,
        "eval_s": 4.0,
        "reports_s": 1.0,  # the loop's 11 s less training and evaluation
        "workers_down_s": 3.0,
        "outputs_s": 1.0,
        "total_s": 31.0,
    }
    assert list(t) == [*(p for p in PHASES if p != "recovery_s"), "total_s"]  # no restart, no recovery
    assert sum(v for k, v in t.items() if k != "total_s") == t["total_s"]


def test_a_restarted_worker_group_shows_its_recovery_as_a_phase():
    """The first attempt starts training at 112, trains epoch 1 (3 s train, 1 s eval, kept in
    the history) and dies; the last attempt, restored after epoch 1, starts training at 120 and
    returns its own marks (epoch 2: 3 s train, 2 s eval)."""
    first = {"started_at": 111.0, "training_at": 112.0, "start_epoch": 0}
    last = {"started_at": 119.0, "training_at": 120.0, "start_epoch": 1}
    worker = {"started_at": 119.0, "training_at": 120.0, "train_s": 3.0, "eval_s": 2.0, "finished_at": 126.0}
    history = [{"train_s": 3.0, "eval_s": 1.0}, {"train_s": 3.0, "eval_s": 2.0}]
    t = breakdown(DRIVER, worker, [last, first], history)
    assert (t["workers_up_s"], t["worker_setup_s"], t["recovery_s"]) == (3.0, 1.0, 4.0)  # 8 s, less epoch 1's 4
    assert (t["train_s"], t["eval_s"], t["reports_s"]) == (6.0, 3.0, 1.0)
    assert sum(v for k, v in t.items() if k != "total_s") == t["total_s"] == 31.0
    assert "recovery 4.0s" in format_line(t)


def test_a_run_without_worker_marks_keeps_the_drivers_phases():
    """A run that stopped with a one-line error returns no marks."""
    t = breakdown({k: v for k, v in DRIVER.items() if k != "imported"}, {})
    assert "workers_up_s" not in t and "train_s" not in t and t["ray_start_s"] == 5.0
    assert t["total_s"] == 29.0  # from fit() on


def test_the_line_names_the_phases_that_took_time():
    line = format_line({**breakdown(DRIVER, WORKER), "checks_s": 0.01})
    assert line.startswith("31.0s: imports 2.0s, Ray start 5.0s, cluster checks and trainer 0.5s")
    assert "checks and data" not in line and line.endswith("plots and results 1.0s")


def test_a_command_counts_from_the_packages_first_import():
    import lstm

    marks = Phases(from_import=True).marks
    assert marks["imported"] == lstm.IMPORTED_AT <= marks["fit_called"]
    assert "imported" not in Phases().marks


def test_a_command_freezes_its_objects_at_exit_and_a_caller_that_catches_the_exit_is_untouched():
    """run_cli registers gc.freeze for the process's exit (the last collection then skips the
    job's objects): a handler registered before it runs after it and sees the frozen heap."""
    script = (
        "import atexit, gc\n"
        "atexit.register(lambda: print('frozen at exit:', gc.get_freeze_count() > 0))\n"
        "from lstm.errors import run_cli\n"
        "run_cli(lambda argv: print('frozen while running:', gc.get_freeze_count() > 0))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == ["frozen while running: False", "frozen at exit: True"]
    with pytest.raises(SystemExit):
        run_cli(lambda argv: 0)
    assert gc.get_freeze_count() == 0
