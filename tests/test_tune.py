"""Ray Tune search (tune/, jobs/search.py).

The searches here use grids, not random samples, so that which trials ASHA stops is fixed:
with two trials at a time, the two good learning rates run first and the bad one, which starts
only after a good one has finished, is stopped at the first rung.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import QUICK_COMMAND_S, REPO, ptb_base_config, ptb_epoch_words
from ray.tune import Callback

from lstm.cli import build_parser, resolve_configs
from lstm.cluster import Node
from lstm.errors import UserError
from lstm.task import get_task
from tune import cli, report, runner
from tune.schedulers import ResumableASHA, pbt_mutations
from tune.space import SearchSpace, parse_space
from tune.spec import TRAIN_RUNS, load_spec

GOOD_LR, BAD_LR = (0.0001, 0.00003), (0.5,)
RECT_SEARCH = [
    "--task",
    "rectangle",
    "--base",
    "test",
    "--max-epochs",
    "3",
    "--num-samples",
    "1",
    "--max-concurrent",
    "2",
    "--space",
    "hidden_size=16",
    "learning_rate=grid:" + ",".join(str(v) for v in GOOD_LR + BAD_LR),
]


def rect_space(*entries: str) -> SearchSpace:
    task = get_task("rectangle")
    return parse_space(
        task.config_class,
        list(entries),
        base_values=dict(task.presets["test"]),
        task_name="rectangle",
        defaults=task.search.space,
    )


# --------------------------------------------------------------------------- search space


def test_space_syntax_and_defaults():
    space = rect_space(
        "learning_rate=log:0.0001:0.1", "hidden_size=4:32", "batch_size=2,4,8", "epochs=grid:2,3", "points_per_edge=1"
    )
    p = space.params
    assert (p["learning_rate"].kind, p["learning_rate"].low, p["learning_rate"].high) == ("loguniform", 0.0001, 0.1)
    assert (p["hidden_size"].kind, p["hidden_size"].low, p["hidden_size"].high) == ("randint", 4, 32)
    assert p["batch_size"].kind == "choice" and p["batch_size"].values == (2, 4, 8)
    assert p["epochs"].kind == "grid" and space.num_grid_points() == 2
    assert space.fixed == {"points_per_edge": 1}
    # int ranges include both ends (Tune's randint excludes the upper one)
    assert p["hidden_size"].to_tune().upper == 33
    # each task declares its own default entries: ranges that fit a 10-unit model of 4 points
    defaults = rect_space()
    assert list(defaults.params) == ["hidden_size", "learning_rate"]
    assert defaults.params["hidden_size"].values == (4, 8, 16, 32)
    assert (defaults.params["learning_rate"].kind, defaults.params["learning_rate"].high) == ("loguniform", 0.01)
    ptb = get_task("ptb")
    assert list(
        parse_space(ptb.config_class, [], base_values=ptb.presets["small"], defaults=ptb.search.space).params
    ) == ["keep_prob", "hidden_size", "lr_decay"]
    # "base" takes a default entry out of the search
    with pytest.raises(UserError, match="search space is empty"):
        rect_space("hidden_size=base", "learning_rate=base")
    assert SearchSpace.from_dict(space.to_dict()) == space


@pytest.mark.parametrize(
    "entry, message",
    [
        ("learning_rate=0.1:0.01", r"learning_rate=0.1:0.01: inverted range \(0.1 > 0.01\)"),
        ("learning_rate=0.01:0.01", r"empty range \(0.01:0.01\).*learning_rate=0.01"),
        ("learning_rate=", "empty value"),
        ("hidden_size=4,,8", "empty value in the list"),
        ("dropout=0.1:0.5", r"unknown hyperparameter 'dropout' for task rectangle; searchable: .*hidden_size"),
        ("hidden_size=200,-5", r"the value -5 is not usable: --hidden-size must be positive \(got -5\)"),
        ("hidden_size=12.5", r"hidden_size must be an integer \(got '12.5'\)"),
        ("hidden_size=big", r"hidden_size must be an integer \(got 'big'\)"),
        ("hidden_size=0:10", r"the value 0 is not usable: --hidden-size must be positive \(got 0\)"),
        ("learning_rate=log:0:1", "a log range needs LOW > 0"),
        ("learning_rate=-1:1", r"the value -1 is not usable: --learning-rate must be positive"),
        ("head=dense:mdn", "head is a str field, which has no range"),
        ("learning_rate", "write NAME=SPEC"),
    ],
)
def test_space_errors_are_one_line(entry, message):
    with pytest.raises(UserError, match=message) as e:
        rect_space(entry)
    assert "\n" not in str(e.value)


def test_pbt_mutations_stay_in_range():
    task = get_task("rectangle")
    space = rect_space("learning_rate=0.001:0.01", "hidden_size=16")
    mutations, clip = pbt_mutations(space, task.search.pbt_mutations)
    assert list(mutations) == ["learning_rate"]
    assert clip({"learning_rate": 0.012})["learning_rate"] == 0.01  # 0.01 * 1.2, clipped
    assert clip({"learning_rate": 0.0008})["learning_rate"] == 0.001
    assert clip({"learning_rate": 0.005})["learning_rate"] == 0.005


# --------------------------------------------------------------------------- resources


def spec_for(argv: list[str], tmp_path: Path) -> runner.SearchSpec:
    return cli.spec_from_args(cli.build_parser().parse_args(argv + ["--storage-path", str(tmp_path)]))


def test_concurrency_fits_the_cluster(tmp_path):
    spec = spec_for(
        ["--task", "rectangle", "--base", "test", "--num-samples", "8", "--space", "hidden_size=4,8"], tmp_path
    )
    four_cpus = [Node("a", {"CPU": 4.0, "memory": 8 * 2**30})]
    assert runner.check_resources(spec, four_cpus) == 4  # 1 worker x 1 CPU each
    two = spec_for(
        ["--task", "rectangle", "--base", "test", "--workers-per-trial", "2", "--space", "hidden_size=4,8"], tmp_path
    )
    assert runner.check_resources(two, four_cpus) == 2  # their trial drivers hold no CPU
    with pytest.raises(UserError, match=r"--max-concurrent 3: only 2 trial\(s\) fit at once .*4 CPUs"):
        runner.check_resources(dataclasses.replace(two, max_concurrent=3), four_cpus)
    with pytest.raises(UserError, match="one trial needs 2 worker.*1 GPU.*0 GPUs.*or drop --gpu"):
        runner.check_resources(dataclasses.replace(two, use_gpu=True), four_cpus)
    with_gpus = [Node("a", {**four_cpus[0].resources, "GPU": 4.0})]
    assert runner.check_resources(dataclasses.replace(two, use_gpu=True), with_gpus) == 2
    with pytest.raises(UserError, match="one trial needs 2 worker.*but this Ray cluster has 1 CPUs"):
        runner.check_resources(two, [Node("a", {"CPU": 1.0})])
    # a worker's CPUs must fit on one node: two nodes of 3 CPUs hold two 2-CPU trials, not three
    wide = dataclasses.replace(spec, cpus_per_worker=2)
    three_and_three = [Node("a", {"CPU": 3.0}), Node("b", {"CPU": 3.0})]
    assert runner.check_resources(wide, three_and_three) == 2
    with pytest.raises(UserError, match=r"only 2 trial\(s\) fit .*6 CPUs on 2 nodes \(at most 3 CPUs on one\)"):
        runner.check_resources(dataclasses.replace(wide, max_concurrent=3), three_and_three)
    # fractional GPUs: four one-worker trials of a quarter GPU share one GPU
    shared = spec_for(
        [
            "--task",
            "rectangle",
            "--base",
            "test",
            "--num-samples",
            "8",
            "--gpu",
            "--gpus-per-worker",
            "0.25",
            "--space",
            "hidden_size=4,8",
        ],
        tmp_path,
    )
    one_gpu = [Node("a", {"CPU": 16.0, "GPU": 1.0})]
    assert runner.check_resources(shared, one_gpu) == 4
    assert runner.check_resources(dataclasses.replace(shared, gpus_per_worker=1.0), one_gpu) == 1


# --------------------------------------------------------------------------- bad input, before anything starts


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--space", "learning_rate=0.1:0.01"], "inverted range"),
        (["--space", "learning_rate=0.01:0.01"], "empty range"),
        (["--space", "keep_prob=0.3:1.0"], "unknown hyperparameter 'keep_prob' for task rectangle"),
        (["--space", "hidden_size=64,1.5"], "hidden_size must be an integer"),
        (["--max-concurrent", "5"], r"--max-concurrent 5: only 4 trial\(s\) fit at once"),
        (["--base", "huge"], "--base 'huge' is not a config of task rectangle"),
        (["--train-fraction", "0.5"], "--train-fraction applies to tasks with a train_fraction field"),
        (["--max-epochs", "0"], "--max-epochs must be >= 1"),
        (
            ["--scheduler", "pbt", "--space", "hidden_size=4,8", "learning_rate=base"],
            "--scheduler pbt mutates learning_rate, and none is searched for task rectangle",
        ),
    ],
)
def test_bad_input_fails_before_anything_starts(tmp_path, ray_session, extra, message):
    argv = ["--task", "rectangle", "--base", "test", "--storage-path", str(tmp_path), "--name", "bad"]
    with pytest.raises(UserError, match=message):
        cli.main(argv + extra)
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("script", ["search.py", "tune_ptb.py"])  # tune_ptb.py: the old name, an alias
def test_cli_prints_one_line_error(tmp_path, script):
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "jobs" / script),
            "--task",
            "rectangle",
            "--base",
            "test",
            "--space",
            "learning_rate=0.1:0.01",
            "--storage-path",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=QUICK_COMMAND_S,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: --space learning_rate=0.1:0.01: inverted range (0.1 > 0.01); write LOW:HIGH with LOW < HIGH"
    ]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--time-budget-s", "0"], "--time-budget-s must be positive (got 0.0)"),
        (["--time-budget-s", "-5"], "--time-budget-s must be positive (got -5.0)"),
        (["--reduction-factor", "1"], "--reduction-factor must be > 1 (got 1.0)"),
        (["--grace-period", "0"], "--grace-period must be >= 1 (got 0)"),
        (["--scheduler", "pbt", "--perturbation-interval", "0"], "--perturbation-interval must be >= 1 (got 0)"),
    ],
)
def test_a_budget_or_scheduler_value_that_cannot_work_is_one_line(argv, message, tmp_path):
    with pytest.raises(UserError) as info:
        cli.main(["--task", "rectangle", "--storage-path", str(tmp_path), *argv])
    assert str(info.value) == message
    assert list(tmp_path.iterdir()) == []


def test_resume_needs_an_existing_search(tmp_path, ray_session):
    with pytest.raises(UserError, match="no search at .*nothing"):
        cli.main(["--storage-path", str(tmp_path), "--name", "nothing", "--resume"])


# --------------------------------------------------------------------------- a search, interrupted and resumed


class InterruptAfter(Callback):
    """Interrupts the search (as Ctrl+C would) once ``n`` trials have finished -- once: the
    marker file keeps the restored copy of this callback from doing it again."""

    def __init__(self, n: int, marker: str):
        self.n, self.marker, self.done = n, marker, 0

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.done += 1
        if self.done >= self.n and not os.path.exists(self.marker):
            Path(self.marker).write_text("interrupted\n")
            os.kill(os.getpid(), signal.SIGUSR1)  # Tune's handler saves the state and stops


def trial_footprint(exp: Path, trial_id: str) -> tuple:
    """What a re-run would change: Tune's results of the trial and its checkpoints."""
    trial = exp / f"trial_{trial_id}"
    files = sorted((str(p.relative_to(trial)), p.stat().st_mtime_ns) for p in trial.glob("checkpoint_*/*"))
    assert files
    return (trial / "result.json").read_text(), files


class Concurrency(Callback):
    """The most trials running at once, counted as Tune's loop starts and ends them (its events
    in order, not timestamps)."""

    def __init__(self):
        self.running: set[str] = set()
        self.most = 0

    def on_trial_start(self, iteration, trials, trial, **info):
        self.running.add(trial.trial_id)
        self.most = max(self.most, len(self.running))

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.running.discard(trial.trial_id)

    on_trial_error = on_trial_complete


def test_asha_search_interrupted_then_resumed(tmp_path, ray_session):
    exp = tmp_path / "rect"
    argv = RECT_SEARCH + ["--storage-path", str(tmp_path), "--name", "rect"]
    # Interrupted as the first trial finishes, by construction before the bad one starts: Tune
    # checks for the interrupt after each step of its loop, a step handles one trial's event,
    # and a new trial starts only at the beginning of a step. (Interrupting later raced the bad
    # trial's first epoch, which then ran before the interrupt but reached Tune only after it.)
    concurrency = Concurrency()
    cli.main(argv, callbacks=[InterruptAfter(1, str(tmp_path / "interrupted")), concurrency])

    before = report.read_rows(load_spec(str(exp)))
    finished = [r for r in before if r.status == "TERMINATED"]
    assert len(finished) == 1 and finished[0].hparams["learning_rate"] in GOOD_LR  # the first two of the grid
    assert any(r.status != "TERMINATED" for r in before), "the search was not interrupted"
    assert not [r for r in before if r.hparams["learning_rate"] in BAD_LR and r.history], "the bad trial ran"
    footprints = {r.trial_id: trial_footprint(exp, r.trial_id) for r in finished}
    assert 1 <= concurrency.most <= 2  # --max-concurrent 2

    cli.main(["--storage-path", str(tmp_path), "--name", "rect", "--resume"])

    rep = report.write_report(load_spec(str(exp)))
    rows = {r.hparams["learning_rate"]: r for r in rep.rows}
    assert sorted(rows) == sorted(GOOD_LR + BAD_LR)
    assert all(r.status == "TERMINATED" for r in rep.rows)
    for trial_id, footprint in footprints.items():  # finished trials were not run again
        assert trial_footprint(exp, trial_id) == footprint
    # ASHA stopped the bad learning rate at the first rung -- after the resume, against the
    # good trials' first epochs from before it (the scheduler replays them: ResumableASHA)
    for lr in BAD_LR:
        assert rows[lr].stopped_early and rows[lr].epochs_run == 1, rows[lr]
    assert rows[GOOD_LR[0]].epochs_run == 3 and not rows[GOOD_LR[0]].stopped_early
    assert rep.summary["stopped_early"] >= 1

    # outputs: table sorted by best metric, plots, a best config the job accepts
    best = [r.best("min")[1] for r in rep.rows]
    assert best == sorted(best)
    assert rep.best.hparams == {"learning_rate": GOOD_LR[0]}
    csv_lines = (exp / "results.csv").read_text().splitlines()
    assert csv_lines[0].startswith("rank,trial,status,learning_rate,epochs run,best valid_consistency")
    assert len(csv_lines) == 4
    md = (exp / "results.md").read_text()
    assert "| 1 | " + rep.best.trial_id in md and md.count("| yes |") >= 1
    for key in ("curves", "vs_hyperparameters"):
        png = Path(rep.files[key])
        assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 5000
    task = get_task("rectangle")
    config, _ = resolve_configs(task, build_parser(task).parse_args(["--config-file", str(exp / "best_config.json")]))
    assert (config.learning_rate, config.hidden_size) == (GOOD_LR[0], 16)
    assert config.epochs == task.presets["test"]["epochs"]  # the preset's epochs, not the search budget
    best_trial = json.loads((exp / "best_trial.json").read_text())
    assert best_trial["config"]["epochs"] == 3
    # each trial's folder has what jobs/rectangle.py writes, the stopped ones included; a
    # one-worker trial trains in Tune's process, so it stops exactly where Tune stopped it
    for r in rep.rows:
        run = exp / f"trial_{r.trial_id}"
        assert json.loads((run / "results.json").read_text())["final"]["epoch"] == r.epochs_run
        assert (run / "learning_curve.png").is_file()
    assert best_trial["run_dir"] == str(exp / f"trial_{rep.best.trial_id}")
    assert not (exp / TRAIN_RUNS).exists()  # no Ray Train run was started
    # Tune's TensorBoard files, so that `tensorboard --logdir <storage path>` shows the search
    assert list((exp / f"trial_{rep.best.trial_id}").glob("events.out.tfevents.*"))
    # the search's own board (tune.board): one run per trial, before and after the resume
    board = read_board(exp / "tensorboard")
    assert set(board) == {".", *(r.trial_id for r in rep.rows)}
    for r in rep.rows:
        scalars, hparams = board[r.trial_id]
        assert hparams == {"learning_rate": pytest.approx(r.hparams["learning_rate"])}
        assert scalars["Search/valid_consistency"] == [(e, pytest.approx(v)) for e, v in r.history]
        assert scalars["Search/best_valid_consistency"][-1][1] == pytest.approx(r.best("min")[1])


def test_a_one_worker_trial_whose_process_dies_is_retried_by_tune_and_trains_the_same(tmp_path, ray_session):
    """Tune's FailureConfig retries a one-worker trial whose process died mid-epoch (the loop's
    hook exits it once), from the trial's latest checkpoint; the retry ends on the same metrics
    as a trial that never failed (epochs are seeded by (seed, epoch, rank))."""
    from hooks import ExitOnce

    argv = [*RECT_SEARCH[:4], "--max-epochs", "3", "--num-samples", "1", "--space", "hidden_size=16"]
    argv += ["learning_rate=grid:0.0001", "--storage-path", str(tmp_path)]
    cli.main([*argv, "--name", "crashed"], hooks=[ExitOnce(epoch=2, step=1)])
    cli.main([*argv, "--name", "calm"])
    (crashed,), (calm,) = (report.read_rows(load_spec(str(tmp_path / name))) for name in ("crashed", "calm"))
    trial = tmp_path / "crashed" / f"trial_{crashed.trial_id}"
    assert (trial / ".exited").is_file()  # the hook did exit the trial's process
    assert "Failure # 1" in (trial / "error.txt").read_text() and "Failure # 2" not in (trial / "error.txt").read_text()
    assert (crashed.status, crashed.epochs_run) == ("TERMINATED", 3)
    assert crashed.history == calm.history


def read_board(folder: Path) -> dict[str, tuple[dict[str, list], dict[str, float]]]:
    """{run: ({tag: [(step, value)]}, {hyperparameter: value})} of a TensorBoard folder."""
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer
    from tensorboard.plugins.hparams import plugin_data_pb2

    mux = EventMultiplexer()
    mux.AddRunsFromDirectory(str(folder))
    mux.Reload()
    board = {}
    for run in mux.Runs():
        acc = mux.GetAccumulator(run)
        scalars = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
        hparams = {}
        for content in acc.PluginTagToContent("hparams").values():
            start = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
            hparams.update({k: v.number_value for k, v in start.hparams.items()})
        board[run] = (scalars, hparams)
    return board


def test_a_resumed_run_with_nothing_left_relays_its_last_epoch():
    """A trial interrupted after its Train run finished, but before Tune got the last epoch:
    resumed, the run trains nothing, and the trial reports the epoch from Ray Train's result
    (the latest checkpoint's metrics). A run that ended on a one-line error reports nothing."""
    from types import SimpleNamespace

    from lstm.session import USER_ERROR
    from tune.bridge import already_finished

    done = SimpleNamespace(metrics={"epoch": 3, "epochs": 3, "valid_consistency": 0.05}, checkpoint="ckpt")
    assert already_finished(done) == {"metrics": done.metrics, "checkpoint": "ckpt"}
    assert already_finished(SimpleNamespace(metrics={USER_ERROR: "the loss became NaN"}, checkpoint=None)) is None
    assert already_finished(SimpleNamespace(metrics=None, checkpoint=None)) is None


def test_a_trials_latest_train_run_is_found_by_the_name_its_runs_are_given(tmp_path):
    """A trial of two workers has a Train run per start (its own, then PBT clones named after
    their checkpoint): the report finds the one with the latest epoch among that trial's runs
    alone, not those of a trial whose id it prefixes."""
    from tune.spec import SearchSpec, train_run_name

    spec = SearchSpec("ptb", "test", {}, {}, SearchSpace({}, {}), str(tmp_path), "s", workers_per_trial=2)
    runs = {
        train_run_name("t_00001"): 2,
        train_run_name("t_00001", "/x/checkpoint_a"): 3,
        train_run_name("t_000010"): 9,  # another trial
        train_run_name("t_00002", "/x/checkpoint_b"): 7,
    }
    for run, epoch in runs.items():
        folder = Path(spec.train_runs_dir) / run / "checkpoint_2026-01-01_00-00-00"
        folder.mkdir(parents=True)
        (folder / "state.json").write_text(json.dumps({"epoch": epoch}))
    assert report.trial_run_dir(spec, "t_00001") == str(Path(spec.train_runs_dir) / runs_named(runs, 3))
    assert report.trial_run_dir(spec, "t_00002") == str(Path(spec.train_runs_dir) / runs_named(runs, 7))
    assert report.trial_run_dir(spec, "t_00003") is None


def runs_named(runs: dict[str, int], epoch: int) -> str:
    [name] = [run for run, e in runs.items() if e == epoch]
    return name


def test_resumable_asha_replays_results(tmp_path):
    """The scheduler rebuilds its rungs from a restored trial's result.json."""
    from types import SimpleNamespace

    trial_dir = tmp_path / "trial_a"
    trial_dir.mkdir()
    (trial_dir / "result.json").write_text(
        "\n".join(json.dumps({"epoch": e, "m": v}) for e, v in [(1, 0.5), (2, 0.4)]) + '\n{"epoch": 3, "m"'
    )
    sched = ResumableASHA(
        time_attr="epoch",
        metric="m",
        mode="min",
        max_t=4,
        grace_period=1,
        reduction_factor=2,
        experiment_dir=str(tmp_path),
    )
    restored = SimpleNamespace(trial_id="a", storage=SimpleNamespace(trial_dir_name="trial_a"))
    sched.on_trial_add(None, restored)
    rungs = {milestone: dict(recorded) for milestone, recorded in sched._trial_info["a"]._rungs}
    assert rungs[1] == {"a": -0.5} and rungs[2] == {"a": -0.4} and rungs[4] == {}
    new = SimpleNamespace(trial_id="b", storage=SimpleNamespace(trial_dir_name=None))
    sched.on_trial_add(None, new)
    assert sched._trial_info["b"]._rungs[-1][1] == {"a": -0.5}


def test_asha_lets_a_trial_finish_its_last_epoch_and_still_cuts_before_it():
    """A rung at the last epoch does not stop the trials below its cut (they finish by
    themselves, so Tune never stops their actor mid-call); a rung before it still does."""
    from types import SimpleNamespace

    from ray.tune.schedulers import TrialScheduler

    def trials(grace: int) -> tuple[ResumableASHA, list]:
        sched = ResumableASHA(
            time_attr="epoch", metric="m", mode="min", max_t=3, grace_period=grace, reduction_factor=2, last_epoch=2
        )
        made = [SimpleNamespace(trial_id=i, storage=SimpleNamespace(trial_dir_name=None)) for i in "ab"]
        for t in made:
            sched.on_trial_add(None, t)
        return sched, made

    sched, (a, b) = trials(grace=2)
    assert sched.on_trial_result(None, a, {"epoch": 2, "m": 0.1}) == TrialScheduler.CONTINUE
    assert sched.on_trial_result(None, b, {"epoch": 2, "m": 0.9}) == TrialScheduler.CONTINUE  # below the cut, but done
    sched, (a, b) = trials(grace=1)
    assert sched.on_trial_result(None, a, {"epoch": 1, "m": 0.1}) == TrialScheduler.CONTINUE
    assert sched.on_trial_result(None, b, {"epoch": 1, "m": 0.9}) == TrialScheduler.STOP  # cut at epoch 1


# --------------------------------------------------------------------------- PTB


PBT_LR = (0.00003, 0.5)  # a log range from good to far too large


@pytest.mark.parametrize("workers", [1, 2])
def test_pbt_clones_better_trials_and_mutates_the_learning_rate(tmp_path, ray_session, workers):
    """PBT: a trial in the bottom quantile continues from a copy of a better trial's checkpoint
    (carrying its history) with a mutated learning rate: a one-worker trial in its own Tune
    process, a two-worker trial as a new Train run that starts from the copy."""
    exp = tmp_path / "pbt"
    # Synchronous PBT: every trial reaches epoch 1 before the worst is exploited, so the exploit
    # is certain (and epoch 2, the last, is left alone). Two trials: the bottom quantile (25%,
    # rounded up) is one trial, which clones the other.
    cli.main(
        [
            "--task",
            "rectangle",
            "--base",
            "test",
            "--scheduler",
            "pbt",
            "--synch",
            "--max-epochs",
            "2",
            "--num-samples",
            "2",
            "--max-concurrent",
            "2",
            "--seed",
            "0",
            "--space",
            "hidden_size=16",
            f"learning_rate=log:{PBT_LR[0]}:{PBT_LR[1]}",
            "--storage-path",
            str(tmp_path),
            "--name",
            "pbt",
            "--workers-per-trial",
            str(workers),
        ]
    )
    spec = load_spec(str(exp))
    rep = report.write_report(spec)
    assert len(rep.rows) == 2 and all(r.status == "TERMINATED" and r.epochs_run == 2 for r in rep.rows), rep.rows
    by_index = {int(r.trial_id.rsplit("_", 1)[1]): r for r in rep.rows}
    # Tune's log of exploits: [target tag, source tag, target epoch, source epoch, old config, new config]
    exploits = [json.loads(line) for line in (exp / "pbt_global.txt").read_text().splitlines() if line.strip()]
    assert exploits, "PBT never cloned a trial"
    cloned = {}  # target trial -> (the learning rate of the trial it cloned, its own mutated one)
    for target_tag, source_tag, _, _, source_config, new in exploits:
        target, source = int(target_tag.split("_")[0]), int(source_tag.split("_")[0])
        assert target != source and new["learning_rate"] != source_config["learning_rate"]
        assert PBT_LR[0] <= new["learning_rate"] <= PBT_LR[1]  # mutated, then clipped to the range
        cloned[target] = (source_config["learning_rate"], new["learning_rate"])
    for index, (source_lr, mutated_lr) in cloned.items():
        row = by_index[index]
        run = Path(report.trial_run_dir(spec, row.trial_id))
        # a Train run (two workers) that starts from a cloned checkpoint is a new run named after it
        assert ("-from-" in run.name) == (workers == 2)
        history = json.loads((run / "results.json").read_text())["epochs"]
        assert [e["epoch"] for e in history] == [1, 2]
        assert history[-1]["lr"] == pytest.approx(mutated_lr)  # it ends on the mutated lr, the trial's last config
        assert mutated_lr == pytest.approx(row.hparams["learning_rate"])
        # ... and its first epoch is the one the trial it cloned trained, at that trial's lr (a
        # run that ignored the checkpoint would have trained every epoch at the mutated lr)
        assert history[0]["lr"] == pytest.approx(source_lr)


def test_ptb_asha_search_and_best_config_runs_as_is(tmp_path, ray_session, ptb_dir):
    """A tiny PTB search from the test config on a prefix of the data, one trial at a time: the
    second learning rate diverges and ends ERROR with the loop's one-line error while the search
    goes on; the best config is accepted by jobs/ptb.py as it is. (ASHA's stops are
    test_asha_search_interrupted_then_resumed's.)"""
    exp = tmp_path / "ptb"
    cli.main(
        [
            "--task",
            "ptb",
            "--base",
            "test",
            "--data-dir",
            str(ptb_dir),
            "--train-fraction",
            "0.02",
            "--max-epochs",
            "2",
            "--num-samples",
            "1",
            "--max-concurrent",
            "1",
            "--space",
            "hidden_size=8",
            "learning_rate=grid:1.0,1e30",
            "--max-failures",
            "1",
            "--storage-path",
            str(tmp_path),
            "--name",
            "ptb",
        ]
    )
    rep = report.write_report(load_spec(str(exp)))
    assert rep.metric == "valid_ppl" and rep.params == ["keep_prob", "lr_decay", "learning_rate"]
    by_lr = {r.hparams["learning_rate"]: r for r in rep.rows}
    good, diverged = by_lr[1.0], by_lr[1e30]
    assert (diverged.status, diverged.epochs_run) == ("ERROR", 0), diverged
    assert re.fullmatch(
        r"the loss became (NaN|infinite|too large \(over 92.1 per unit, beyond any training model\)) "
        r"at epoch 1 step \d+; lower --learning-rate or set a smaller --max-grad-norm",
        diverged.error,
    )
    assert diverged.error in (exp / "results.md").read_text()
    # Tune retried the trial (--max-failures 1) and the retry raised the error again at once,
    # before training: it failed in the loop's start check, not at an epoch's step
    trial = exp / f"trial_{diverged.trial_id}"
    assert (trial / "user_error.txt").read_text().strip() == diverged.error
    failures = (trial / "error.txt").read_text().split("Failure # ")[1:]
    assert len(failures) == 2 and "check_start" not in failures[0] and "check_start" in failures[1]
    assert (good.status, good.epochs_run, good.stopped_early, good.error) == ("TERMINATED", 2, False, "")
    assert rep.rows == [good, diverged]  # a trial with no result ranks last
    assert 0.3 <= good.hparams["keep_prob"] <= 1.0 and 0.5 <= good.hparams["lr_decay"] <= 1.0
    for name in (
        "results.csv",
        "results.md",
        "plots/valid_ppl_per_epoch.png",
        "plots/final_valid_ppl_vs_hyperparameters.png",
    ):
        assert (exp / name).stat().st_size > 0
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "jobs" / "ptb.py"),
            "--config-file",
            str(exp / "best_config.json"),
            "--print-config",
        ],
        capture_output=True,
        text=True,
        timeout=QUICK_COMMAND_S,
    )
    assert proc.returncode == 0, proc.stderr
    printed = json.loads(proc.stdout)
    assert printed == json.loads((exp / "best_config.json").read_text())
    assert (printed["learning_rate"], printed["hidden_size"], printed["keep_prob"]) == (
        1.0,
        8,
        good.hparams["keep_prob"],
    )
    # the test preset's own epochs and all of the training data, not the search's budget
    preset_epochs = get_task("ptb").presets["test"]["max_max_epoch"]
    assert (printed["max_max_epoch"], printed["train_fraction"]) == (preset_epochs, 1.0)


def test_one_worker_trials_two_worker_trials_and_the_job_train_alike(tmp_path, ray_session, ptb_base):
    """The same config and seed, trained three ways: by jobs/ptb.py's fit() (conftest's
    ptb_base: the tutorial's test config on 2% of PTB, one thread), by a one-worker trial (in
    Tune's trial process) and by a two-worker trial (a Ray Train run of two ranks that share
    each batch of 20 rows). Without dropout the three compute the same epochs: the job and the
    one-worker trial exactly (one process, one thread each), the two ranks up to the order of
    float sums (DDP averages the two halves' gradients; the sums are all-reduced)."""
    job, _, ptb_dir = ptb_base
    config = ptb_base_config()
    trials = {}
    for workers in (1, 2):
        name = f"w{workers}"
        cli.main(
            [
                *("--task", "ptb", "--base", "test", "--data-dir", str(ptb_dir), "--num-samples", "1"),
                *("--train-fraction", str(config.train_fraction), "--max-epochs", str(config.max_max_epoch)),
                *("--space", f"hidden_size=grid:{config.hidden_size}", "keep_prob=base", "lr_decay=base"),
                f"eval_num_steps={config.eval_num_steps}",
                *("--workers-per-trial", str(workers), "--storage-path", str(tmp_path), "--name", name),
            ]
        )
        (result,) = (tmp_path / name).glob("trial_*/result.json")
        trials[workers] = [json.loads(line) for line in result.read_text().splitlines()]
    assert not (tmp_path / "w1" / TRAIN_RUNS).exists() and (tmp_path / "w2" / TRAIN_RUNS).is_dir()
    keys = ["train_loss", "train_ppl", "valid_loss", "valid_ppl"]
    expected = [{k: e[k] for k in keys} for e in job.history]
    assert [e["epoch"] for e in job.history] == [r["epoch"] for r in trials[1]] == [r["epoch"] for r in trials[2]]
    assert [{k: r[k] for k in keys} for r in trials[1]] == expected
    assert trials[1][-1]["test_ppl"] == job.final["test_ppl"]
    assert [{k: pytest.approx(r[k], rel=1e-5) for k in keys} for r in trials[2]] == expected
    assert trials[2][-1]["test_ppl"] == pytest.approx(job.final["test_ppl"], rel=1e-5)
    assert [r["workers"] for r in trials[2]] == [2, 2]
    # the trials trained the config's 2% of the words, 20 rows x 2 steps at a time (a search
    # that ignored --train-fraction would not match: it trains on all the words)
    words = ptb_epoch_words(ptb_dir, config.train_fraction)
    assert [r["samples_seen"] for r in trials[1]] == [r["samples_seen"] for r in trials[2]] == [words, 2 * words]
