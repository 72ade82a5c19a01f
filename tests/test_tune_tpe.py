"""``--search-alg tpe``: Optuna's TPE through Ray Tune's OptunaSearch (tune/searchers.py)."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO
from test_tune import Concurrency, InterruptAfter, trial_footprint

import tune as tune_api
from lstm.errors import UserError
from tune import cli, report, searchers
from tune.spec import load_spec, save_spec

optuna = pytest.importorskip("optuna", reason="optuna is not installed (pip install -e '.[test]')")

RECT = ["--task", "rectangle", "--base", "test"]
SPACE = ["--space", "hidden_size=4,8,16", "learning_rate=log:0.0003:0.01"]


def tpe_search(seed: int = 3) -> list[str]:
    """4 trials of 2 epochs, 2 at a time."""
    budget = ["--max-epochs", "2", "--num-samples", "4", "--max-concurrent", "2"]
    return [*RECT, "--search-alg", "tpe", *budget, "--seed", str(seed), *SPACE]


TPE_SEARCH = tpe_search()


# --------------------------------------------------------------------------- what cannot work, in one line


@pytest.mark.parametrize(
    "extra, message",
    [
        (
            ["--scheduler", "pbt", "--space", "learning_rate=log:0.0003:0.01"],
            "--search-alg tpe cannot run with --scheduler pbt (PBT replaces the trials' values as they train, so "
            "TPE would learn from values the trials no longer have); use --scheduler asha, or drop --search-alg "
            "for PBT's random sampling",
        ),
        (
            ["--space", "hidden_size=grid:4,8", "learning_rate=base"],
            "--search-alg tpe chooses every trial's values itself and cannot run every value of a grid "
            "(hidden_size=grid:4,8); write a choice (hidden_size=4,8) for TPE to pick from, or drop --search-alg "
            "for the grid",
        ),
        (
            ["--space", "hidden_size=4,8", "learning_rate=grid:0.001,0.01"],
            "--search-alg tpe chooses every trial's values itself and cannot run every value of a grid "
            "(learning_rate=grid:0.001,0.01); write a choice (learning_rate=0.001,0.01) for TPE to pick from, "
            "or drop --search-alg for the grid",
        ),
    ],
)
def test_tpe_with_pbt_or_a_grid_is_one_line_before_anything_starts(tmp_path, extra, message):
    with pytest.raises(UserError) as info:
        cli.main([*RECT, "--search-alg", "tpe", *extra, "--storage-path", str(tmp_path), "--name", "bad"])
    assert str(info.value) == message
    assert list(tmp_path.iterdir()) == []


def test_the_python_api_takes_the_search_algorithm(tmp_path):
    """tune.search(search_alg=...) reaches the same checks as the flag."""
    with pytest.raises(UserError, match=r"^--search-alg tpe chooses every trial's values .*hidden_size=grid:4,8"):
        tune_api.search("rectangle", base="test", search_alg="tpe", space=["hidden_size=grid:4,8"])
    with pytest.raises(UserError, match=r"^--search-alg 'bayes' is not one of random, tpe$"):
        tune_api.search("rectangle", base="test", search_alg="bayes", storage_path=str(tmp_path))
    assert list(tmp_path.iterdir()) == []


def test_tpe_without_optuna_says_what_to_install(tmp_path):
    """A process where Optuna cannot be imported: the job's one line, exit status 2, nothing written."""
    code = (
        "import runpy, sys; sys.modules['optuna'] = None; "
        f"sys.argv = ['jobs/search.py', *{TPE_SEARCH!r}, '--storage-path', {str(tmp_path)!r}]; "
        "runpy.run_path('jobs/search.py', run_name='__main__')"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error: --search-alg tpe needs Optuna, which is not installed; pip install 'lstm-ray[optuna]' "
        "(or pip install 'optuna>=5')"
    ]
    assert list(tmp_path.iterdir()) == []


def test_resuming_a_tpe_search_without_optuna_says_what_to_install(tmp_path, monkeypatch):
    spec = cli.spec_from_args(cli.build_parser().parse_args([*TPE_SEARCH, "--storage-path", str(tmp_path)]))
    save_spec(spec)
    monkeypatch.setitem(sys.modules, "optuna", None)  # as where it is not installed: `import optuna` fails
    with pytest.raises(UserError, match=r"^--search-alg tpe needs Optuna, which is not installed; pip install"):
        cli.main(["--storage-path", str(tmp_path), "--name", spec.name, "--resume"])


def test_the_tpe_searcher_is_seeded_and_holds_the_concurrency_limit(tmp_path):
    """The same --seed suggests the same first trials, another seed others; the limit on trials
    at once is the searcher's (Tune ignores TuneConfig's with a search algorithm of its own)."""

    def first_suggestions(seed: int) -> list[dict]:
        spec = cli.spec_from_args(cli.build_parser().parse_args([*tpe_search(seed), "--storage-path", str(tmp_path)]))
        alg = searchers.make_search_alg(spec, max_concurrent=2)
        assert alg.set_search_properties(None, None, spec.space.param_space())
        return [alg.suggest(f"t{i}") for i in range(3)]

    same, again, other = first_suggestions(3), first_suggestions(3), first_suggestions(4)
    assert same[:2] == again[:2] and same[0] != other[0]
    assert same[2] is None  # the third waits: two trials run at once
    assert {s["hidden_size"] for s in same[:2]} <= {4, 8, 16}
    assert all(0.0003 <= s["learning_rate"] <= 0.01 for s in same[:2])


# --------------------------------------------------------------------------- a TPE search, interrupted and resumed


def newest_study(exp: Path):
    """The Optuna study a resume restores: Tune names each run's searcher state by its start
    time and restores the last name (``ray.tune.utils.util._load_newest_checkpoint``). File
    times do not order them: syncing to the storage path copies the earlier runs' files again."""
    newest = max(exp.glob("searcher-state-*.pkl"), key=lambda p: p.name)
    return pickle.loads(newest.read_bytes())["_ot_study"]


def test_a_tpe_search_interrupted_then_resumed_keeps_its_study(tmp_path, ray_session):
    """TPE under ASHA, two trials at a time: interrupted as the first trial finishes, then
    resumed. The finished trial is not run again, the search ends with its 4 trials (no more:
    the searcher's count came back), and the resumed searcher's study holds every trial of
    both runs, each told its final metric: TPE after the resume learns from the trials before it."""
    exp = tmp_path / "tpe"
    argv = [*TPE_SEARCH, "--storage-path", str(tmp_path), "--name", "tpe"]
    concurrency = Concurrency()
    cli.main(argv, callbacks=[InterruptAfter(1, str(tmp_path / "interrupted")), concurrency])

    before = report.read_rows(load_spec(str(exp)))
    finished = [r for r in before if r.status == "TERMINATED"]
    assert len(finished) == 1 and any(r.status != "TERMINATED" for r in before), before
    footprints = {r.trial_id: trial_footprint(exp, r.trial_id) for r in finished}
    asked_before = len(newest_study(exp).trials)
    assert asked_before == len(before)

    resumed = Concurrency()
    cli.main(["--storage-path", str(tmp_path), "--name", "tpe", "--resume"], callbacks=[resumed])

    rows = report.read_rows(load_spec(str(exp)))
    assert len(rows) == 4 and all(r.status == "TERMINATED" for r in rows), rows
    for trial_id, footprint in footprints.items():
        assert trial_footprint(exp, trial_id) == footprint
    assert concurrency.most <= 2 and resumed.most <= 2  # two at a time, counted from Tune's events
    study = newest_study(exp)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 4
    told = sorted((t.params["learning_rate"], t.params["hidden_size"], t.value) for t in study.trials)
    ran = sorted((r.hparams["learning_rate"], r.hparams["hidden_size"], r.final) for r in rows)
    assert [t[:2] for t in told] == [r[:2] for r in ran]  # the values Optuna chose are the ones trained
    assert [t[2] for t in told] == pytest.approx([r[2] for r in ran])  # each told its final metric
    summary = (exp / "results.md").read_text()
    assert "search algorithm tpe" in summary.splitlines()[0]
