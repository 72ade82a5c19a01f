"""Search flags that change how a search runs, each through a real search (jobs/search.py's
``tune.cli.main`` on the suite's Ray instance) or the scheduler the flags build: the time budget
ending a search, ``--reduction-factor`` and ``--perturbation-interval`` reaching the scheduler,
``--resume`` of an interrupted PBT search, and the release of a stopped trial's workers
(``tune.runner.ReleaseOrphans``) that a waiting trial needs."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from hooks import PauseOnce
from ray.tune.schedulers import TrialScheduler
from test_tune import BAD_LR, GOOD_LR, PBT_LR, RECT_SEARCH, InterruptAfter, spec_for, trial_footprint

from tune import cli, report
from tune.schedulers import make_scheduler
from tune.spec import load_spec, save_spec

SEARCH = RECT_SEARCH[:4]  # --task rectangle --base test


def rows_by_lr(exp: Path) -> dict[float, report.TrialRow]:
    return {r.hparams["learning_rate"]: r for r in report.read_rows(load_spec(str(exp)))}


def result_epochs(exp: Path, trial_id: str) -> list[int]:
    """The epochs a trial reported, in order, as Tune recorded them (result.json)."""
    lines = (exp / f"trial_{trial_id}" / "result.json").read_text().splitlines()
    return [json.loads(line)["epoch"] for line in lines if line.strip()]


# --------------------------------------------------------------------------- the time budget

# The first trial reports its first epoch about 6 s after the budget starts on 2 cores (a new
# trial process importing torch, then 75 steps and an evaluation); the budget leaves three
# times that. The test then waits for the budget, and 10 s more in which Tune waits for the
# paused trial to stop by itself before it kills the trial's process.
BUDGET_S = 20


def test_the_time_budget_ends_the_search_and_the_report_holds_what_ran(tmp_path, ray_session):
    """Two learning rates, one trial at a time. The first trial reports epoch 1, then pauses in
    epoch 2 until its process ends (PauseOnce): only the budget can end the search. It stops
    that trial and the second never starts; the report, the best config and the summary are
    those of the one epoch that ran."""
    exp = tmp_path / "budget"
    paused = tmp_path / "paused"
    cli.main(
        [
            *SEARCH,
            *("--max-epochs", "3", "--num-samples", "1", "--max-concurrent", "1"),
            *("--space", "hidden_size=16", "learning_rate=grid:" + ",".join(map(str, GOOD_LR))),
            *("--time-budget-s", str(BUDGET_S), "--storage-path", str(tmp_path), "--name", "budget"),
        ],
        hooks=[PauseOnce(epoch=2, step=0, marker=str(paused), rank=0, timeout_s=600)],
    )
    assert (tmp_path / "paused.ready").is_file(), "the first trial never reached epoch 2"
    rows = report.read_rows(load_spec(str(exp)))
    assert [r.hparams["learning_rate"] for r in rows] == [GOOD_LR[0]], "the second trial started"
    (row,) = rows
    assert (row.status, row.epochs_run, row.epochs_planned, row.stopped_early) == ("TERMINATED", 1, 3, True), (
        f"the first epoch did not report within the {BUDGET_S} s budget"
        if not row.history
        else "the trial was not stopped in epoch 2"
    )
    best_config = json.loads((exp / "best_config.json").read_text())
    assert best_config["learning_rate"] == GOOD_LR[0] and best_config["epochs"] == 2  # the base's, not --max-epochs
    csv_lines = (exp / "results.csv").read_text().splitlines()
    assert len(csv_lines) == 2 and csv_lines[1].startswith(f"1,{row.trial_id},TERMINATED,{GOOD_LR[0]},1,")
    summary = json.loads((exp / "search_summary.json").read_text())
    assert (summary["trials"], summary["status"], summary["stopped_early"]) == (1, {"TERMINATED": 1}, 1)
    assert summary["best"]["trial_id"] == row.trial_id and summary["best"]["epoch"] == 1
    assert summary["best"]["valid_consistency"] == row.history[0][1]


# --------------------------------------------------------------------------- scheduler flags


def asha_decisions(tmp_path: Path, *flags: str) -> list[str]:
    """What the ASHA scheduler of a search with ``flags`` decides when three trials report
    epoch 1 with valid_consistency 0.1, 0.3 and 0.2, in that order. The scheduler is built as
    ``--resume`` builds it: from the search spec saved in the search's folder."""
    spec = spec_for([*SEARCH, "--max-epochs", "9", "--space", "hidden_size=16", *flags], tmp_path)
    save_spec(spec)
    scheduler = make_scheduler(load_spec(spec.experiment_dir))
    decisions = []
    for trial_id, value in (("a", 0.1), ("b", 0.3), ("c", 0.2)):
        trial = SimpleNamespace(trial_id=trial_id, storage=SimpleNamespace(trial_dir_name=None))
        scheduler.on_trial_add(None, trial)
        decisions.append(scheduler.on_trial_result(None, trial, {"epoch": 1, "valid_consistency": value}))
    return decisions


def test_the_reduction_factor_sets_how_many_trials_asha_keeps(tmp_path):
    """Keep the best half (the default, 2) or the best third (3): the third trial, between the
    two before it, continues with 2 and is stopped with 3."""
    go, stop = TrialScheduler.CONTINUE, TrialScheduler.STOP
    assert asha_decisions(tmp_path, "--name", "half") == [go, stop, go]
    assert asha_decisions(tmp_path, "--name", "third", "--reduction-factor", "3") == [go, stop, stop]


def test_a_pbt_search_interrupted_then_resumed_finishes_and_exploits_at_its_interval(tmp_path, ray_session):
    """Synchronous PBT, two trials of three epochs, --perturbation-interval 2: both trials reach
    epoch 2 before the worse one is exploited, and nothing happens at epoch 1 (an interval of 1
    would exploit there too) nor at epoch 3, the last. The search is interrupted as the first
    trial finishes (InterruptAfter), which by construction is after the exploit, and resumed
    with --resume: the finished trial is not run again, the other one ends, and no trial
    reports an epoch twice (where the interrupt falls after the other trial reported epoch 3
    but before Tune registered its checkpoint, it runs epoch 3 again: its file holds it once)."""
    exp = tmp_path / "pbt"
    cli.main(
        [
            *SEARCH,
            *("--scheduler", "pbt", "--synch", "--perturbation-interval", "2"),
            *("--max-epochs", "3", "--num-samples", "2", "--max-concurrent", "2", "--seed", "0"),
            *("--space", "hidden_size=16", f"learning_rate=log:{PBT_LR[0]}:{PBT_LR[1]}"),
            *("--storage-path", str(tmp_path), "--name", "pbt"),
        ],
        callbacks=[InterruptAfter(1, str(tmp_path / "interrupted"))],
    )
    before = report.read_rows(load_spec(str(exp)))
    (finished,) = [r for r in before if r.status == "TERMINATED"]
    assert len(before) == 2 and finished.epochs_run == 3
    footprint = trial_footprint(exp, finished.trial_id)

    cli.main(["--storage-path", str(tmp_path), "--name", "pbt", "--resume"])

    rows = report.read_rows(load_spec(str(exp)))
    assert sorted(r.trial_id for r in rows) == sorted(r.trial_id for r in before)
    assert all(r.status == "TERMINATED" and r.epochs_run == 3 for r in rows), rows
    assert trial_footprint(exp, finished.trial_id) == footprint  # not run again
    for r in rows:
        assert result_epochs(exp, r.trial_id) == [1, 2, 3], r.trial_id
    # One exploit (Tune's log: [target tag, source tag, ..., source config, new config]): the
    # target's history is the source's first two epochs, at the source's learning rate, then
    # its own third epoch at the mutated one. (An interval of 1 would also exploit at epoch 1.)
    (exploit,) = [json.loads(line) for line in (exp / "pbt_global.txt").read_text().splitlines() if line.strip()]
    target_tag, _, _, _, source_config, new_config = exploit
    target = next(r for r in rows if int(r.trial_id.rsplit("_", 1)[1]) == int(target_tag.split("_")[0]))
    history = json.loads((exp / f"trial_{target.trial_id}" / "results.json").read_text())["epochs"]
    old_lr, new_lr = source_config["learning_rate"], new_config["learning_rate"]
    assert old_lr != new_lr and [e["lr"] for e in history] == pytest.approx([old_lr, old_lr, new_lr])


# --------------------------------------------------------------------------- a stopped trial's workers

# The search takes 90 to 140 s on 2 busy cores (three Train runs start); the budget only ends
# one whose third trial waits for CPUs that are never released, as it does without
# ReleaseOrphans in Ray 2.60.
STARVED_AFTER_S = 300


def test_a_trial_stopped_by_asha_frees_the_cpus_the_next_trial_waits_for(tmp_path, ray_session):
    """Two-worker trials of 2 CPUs each on the suite's 4-CPU instance: one trial fits at a
    time. The second learning rate is stopped by ASHA at epoch 1, which kills its trial actor
    and, with it, its Ray Train controller, leaving the workers' placement group reserved (Ray
    Train's own cleaner needs the dashboard; a search starts none, lstm/ray_private.py). The
    third trial needs those 4 CPUs: it trains only once ReleaseOrphans removes that group."""
    exp = tmp_path / "orphans"
    lrs = (GOOD_LR[0], BAD_LR[0], GOOD_LR[1])
    cli.main(
        [
            *SEARCH,
            *("--max-epochs", "2", "--num-samples", "1", "--max-concurrent", "1"),
            *("--workers-per-trial", "2", "--cpus-per-worker", "2"),
            *("--space", "hidden_size=16", "learning_rate=grid:" + ",".join(map(str, lrs))),
            *("--time-budget-s", str(STARVED_AFTER_S), "--storage-path", str(tmp_path), "--name", "orphans"),
        ]
    )
    rows = rows_by_lr(exp)
    assert sorted(rows) == sorted(lrs)
    assert rows[BAD_LR[0]].stopped_early and rows[BAD_LR[0]].epochs_run == 1, rows[BAD_LR[0]]
    third = rows[GOOD_LR[1]]
    assert third.epochs_run >= 1, f"the third trial never trained: starved of CPUs for {STARVED_AFTER_S} s"
    assert third.status == "TERMINATED" and rows[GOOD_LR[0]].epochs_run == 2
