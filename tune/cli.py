"""The command line of ``jobs/search.py``: parse, check everything, run the search, report.

Every check that can fail on user input (task, base preset, search space, budget flags,
storage, data, resources) runs before the first trial starts and fails with one line.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Collection, Optional, Sequence

from lstm import cluster, ray_private, storage, tracking
from lstm import config as cfg
from lstm.errors import UserError
from lstm.task import Task, get_task, task_names
from tune import report, runner
from tune.schedulers import SCHEDULERS, check_pbt_space
from tune.searchers import SEARCH_ALGS, check_search_alg, import_optuna
from tune.space import SearchSpace, parse_space
from tune.spec import SearchSpec, load_spec


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="jobs/search.py",
        description="Search hyperparameters with Ray Tune; every trial trains what jobs/<task>.py trains.",
    )
    add_search_flags(p)
    add_budget_flags(p)
    add_run_flags(p)
    return p


def add_search_flags(p: argparse.ArgumentParser) -> None:
    """What is searched, and how."""
    p.add_argument("--task", default="ptb", help=f"task to search: {', '.join(task_names())} (default ptb)")
    p.add_argument(
        "--base",
        default=None,
        metavar="PRESET",
        help="named config trials start from (ptb: small|medium|large|test|...); default: the task's default",
    )
    p.add_argument(
        "--space",
        nargs="+",
        action="extend",
        default=[],
        metavar="NAME=SPEC",
        help="search space entries; each replaces the task's default entry of its NAME (ptb: keep_prob, "
        "hidden_size, lr_decay). SPEC: LOW:HIGH, log:LOW:HIGH, V1,V2 (choice), grid:V1,V2 (every "
        "value), V (pinned) or base (the base's value)",
    )
    p.add_argument(
        "--scheduler",
        choices=SCHEDULERS,
        default="asha",
        help="asha (default): stop bad trials early; pbt: population based training (mutates the task's "
        "pbt fields: ptb keep_prob and learning_rate)",
    )
    p.add_argument(
        "--search-alg",
        choices=SEARCH_ALGS,
        default="random",
        help="random (default): each trial's values drawn independently, grid: entries expanded; tpe: "
        "Optuna's TPE draws each trial where the finished trials scored best (needs optuna; not with "
        "--scheduler pbt or grid: entries)",
    )
    p.add_argument(
        "--synch",
        action="store_true",
        help="with --scheduler pbt: synchronous (every trial reaches each interval first)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the search algorithm (default 0)")
    p.add_argument(
        "--grace-period",
        type=int,
        default=1,
        help="with --scheduler asha: epochs before a trial can be stopped (default 1)",
    )
    p.add_argument(
        "--reduction-factor",
        type=float,
        default=2.0,
        help="with --scheduler asha: keep the best 1/N at each rung (default 2)",
    )
    p.add_argument(
        "--perturbation-interval", type=int, default=1, help="with --scheduler pbt: epochs between exploits (default 1)"
    )


def add_budget_flags(p: argparse.ArgumentParser) -> None:
    """How much each trial and the search may spend."""
    p.add_argument(
        "--num-samples", type=int, default=8, help="trials to sample, times the size of any grid (default 8)"
    )
    p.add_argument("--max-epochs", type=int, default=None, help="epochs per trial (default: the base's)")
    p.add_argument("--time-budget-s", type=float, default=None, help="end the search after this many seconds")
    p.add_argument(
        "--train-fraction",
        type=float,
        default=None,
        help="train every trial on this leading fraction of the training data (ptb)",
    )


def add_run_flags(p: argparse.ArgumentParser) -> None:
    """Where and on what the trials run."""
    p.add_argument(
        "--max-concurrent",
        type=int,
        default=None,
        help="trials at once (default: as many as the cluster's CPUs/GPUs fit)",
    )
    p.add_argument(
        "--workers-per-trial",
        type=int,
        default=1,
        help="workers per trial: 1 trains in Tune's trial process, 2 or more start a Ray Train run (default 1)",
    )
    p.add_argument("--gpu", action="store_true", help="GPU workers (nccl)")
    p.add_argument(
        "--gpus-per-worker",
        type=float,
        default=1.0,
        help="needs --gpu: GPUs per worker; 0.25 packs 4 one-worker trials on a GPU (default 1)",
    )
    p.add_argument("--cpus-per-worker", type=int, default=1, help="CPUs per worker (default 1)")
    p.add_argument(
        "--max-failures",
        type=int,
        default=3,
        help="retries of a trial that fails (a crash, a lost node) from its latest checkpoint; a one-line "
        "user error is not trained again (default 3; -1: retry forever)",
    )
    p.add_argument(
        "--data-dir",
        default="",
        help="the data folder of a task that reads data (default: $LSTM_DATA_DIR or the download cache)",
    )
    p.add_argument(
        "--storage-path",
        default="",
        help="where searches live: a folder or s3://... (default: $LSTM_RAY_STORAGE or ~/lstm-ray/runs)",
    )
    p.add_argument(
        "--name",
        default="",
        help=f"the search's folder name in --storage-path: {storage.NAME_RULE} (default: tune-<task>-<timestamp>)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the interrupted search --name (with its --storage-path) with the settings it started "
        "with; no other flag goes with it",
    )
    p.add_argument(
        "--mlflow-tracking-uri",
        default="",
        help="log every trial to this MLflow server (default: $MLFLOW_TRACKING_URI, or no MLflow)",
    )


SCHEDULER_FLAGS = {"asha": ("grace_period", "reduction_factor"), "pbt": ("synch", "perturbation_interval")}
RESUME_FLAGS = {"resume", "name", "storage_path"}  # what --resume reads; the spec it finds has the rest


def parse_args(argv: Optional[Sequence[str]] = None) -> tuple[argparse.Namespace, set[str]]:
    """The parsed flags, and the dests of those the command line gives (defaults aside)."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    return parser.parse_args(argv), cfg.options_given(parser, argv)


def check_given(args: argparse.Namespace, given: Collection[str]) -> None:
    """UserError for a flag given where it has no effect: any but --name and --storage-path
    with --resume, another scheduler's setting, --gpus-per-worker without --gpu."""
    if args.resume:
        ignored = sorted(cfg.flag_name(dest) for dest in given if dest not in RESUME_FLAGS)
        if ignored:
            raise UserError(
                f"--resume continues the search --name with the settings it was started with, so "
                f"{', '.join(ignored)} would have no effect; drop {'them' if len(ignored) > 1 else 'it'} "
                "(or start a new search without --resume)"
            )
    for scheduler, dests in SCHEDULER_FLAGS.items():
        for dest in dests:
            if dest in given and scheduler != args.scheduler:
                raise UserError(
                    f"{cfg.flag_name(dest)} is for --scheduler {scheduler} and has no effect with --scheduler "
                    f"{args.scheduler}; add --scheduler {scheduler}, or drop {cfg.flag_name(dest)}"
                )
    cfg.refuse_unused(given, cfg.RunSettings(use_gpu=args.gpu).unused_flags())


def check_flags(args: argparse.Namespace) -> None:
    for flag, value in (
        ("--num-samples", args.num_samples),
        ("--workers-per-trial", args.workers_per_trial),
        ("--cpus-per-worker", args.cpus_per_worker),
        ("--grace-period", args.grace_period),
        ("--perturbation-interval", args.perturbation_interval),
    ):
        if value < 1:
            raise UserError(f"{flag} must be >= 1 (got {value})")
    if args.reduction_factor <= 1:
        raise UserError(f"--reduction-factor must be > 1 (got {args.reduction_factor})")
    if args.time_budget_s is not None and not args.time_budget_s > 0:
        raise UserError(f"--time-budget-s must be positive (got {args.time_budget_s})")
    if args.max_failures < -1:
        raise UserError(f"--max-failures must be -1 (retry forever) or >= 0 (got {args.max_failures})")
    if args.max_epochs is not None and args.max_epochs < 1:
        raise UserError(f"--max-epochs must be >= 1 (got {args.max_epochs})")
    cfg.RunSettings(
        num_workers=args.workers_per_trial, use_gpu=args.gpu, gpus_per_worker=args.gpus_per_worker
    ).validate()


def budget_of(args: argparse.Namespace, task: type[Task]) -> dict[str, Any]:
    """The config fields the budget flags set: the epochs field and train_fraction."""
    budget: dict[str, Any] = {}
    if args.max_epochs is not None:
        budget[task.search.epochs_field] = args.max_epochs
    if args.train_fraction is not None:
        if "train_fraction" not in cfg.scalar_fields(task.config_class):
            raise UserError(f"--train-fraction applies to tasks with a train_fraction field (ptb), not {task.name}")
        if not 0 < args.train_fraction <= 1:
            raise UserError(f"--train-fraction must be in (0, 1] (got {args.train_fraction})")
        budget["train_fraction"] = args.train_fraction
    return budget


def check_budget_space(budget: dict[str, Any], space: SearchSpace, task: type[Task]) -> None:
    """UserError for a budget flag whose field --space sets to something else: the trials
    would train the space's values, not the flag's."""
    flags = {task.search.epochs_field: "--max-epochs", "train_fraction": "--train-fraction"}
    for name, value in budget.items():
        if name in space.params or space.fixed.get(name, value) != value:
            raise UserError(
                f"{flags[name]} has no effect on the trials: --space sets {name} too; drop {flags[name]}, "
                f"or the --space entry of {name}"
            )


def spec_from_args(args: argparse.Namespace, given: Collection[str] = ()) -> SearchSpec:
    """Check the flags (``given``: those the command line gives, see :func:`parse_args`) and
    build the search spec (no Ray needed)."""
    task = get_task(args.task)
    base = args.base or task.default_preset
    if base is not None and base not in task.presets:
        raise UserError(
            f"--base {base!r} is not a config of task {task.name}; choose one of: {', '.join(task.presets)}"
        )
    preset_values = dict(task.presets.get(base, {})) if base is not None else {}
    check_flags(args)
    budget = budget_of(args, task)
    base_values = {**preset_values, **budget}
    space = parse_space(
        task.config_class, args.space, base_values=base_values, task_name=task.name, defaults=task.search.space
    )
    check_budget_space(budget, space, task)
    if args.scheduler == "pbt":
        check_pbt_space(space, task)
    check_search_alg(args.search_alg, args.scheduler, space)
    pinned = cfg.build(task.config_class, {**base_values, **space.fixed})
    cfg.refuse_unused({"data_dir"} & set(given), pinned.unused_flags())
    where = storage.locate(args.storage_path, args.name, f"tune-{task.name}")
    return SearchSpec(
        task=task.name,
        base=base,
        base_values=base_values,
        preset_values=preset_values,
        space=space,
        storage_path=where.root,
        name=where.name,
        scheduler=args.scheduler,
        search_alg=args.search_alg,
        synch=args.synch,
        num_samples=args.num_samples,
        max_epochs=task.num_epochs(cfg.build(task.config_class, base_values)),
        time_budget_s=args.time_budget_s,
        max_concurrent=args.max_concurrent,
        workers_per_trial=args.workers_per_trial,
        use_gpu=args.gpu,
        gpus_per_worker=args.gpus_per_worker,
        cpus_per_worker=args.cpus_per_worker,
        max_failures=args.max_failures,
        data_dir=os.path.abspath(os.path.expanduser(args.data_dir)) if args.data_dir else "",
        seed=args.seed,
        grace_period=args.grace_period,
        reduction_factor=args.reduction_factor,
        perturbation_interval=args.perturbation_interval,
        budget=budget,
        mlflow_tracking_uri=tracking.resolve_uri(args.mlflow_tracking_uri),
    )


def resume_spec(args: argparse.Namespace) -> SearchSpec:
    """The saved spec of the search ``--name`` (:func:`check_given` refuses other flags with ``--resume``)."""
    if not args.name:
        raise UserError("--resume needs the --name of the search to continue")
    spec = load_spec(storage.locate(args.storage_path, args.name, "").path)
    if spec.search_alg == "tpe":  # the saved searcher is Optuna's
        import_optuna()
    return spec


def read_data(spec: SearchSpec) -> Any:
    """The task's data, read once here (it reaches every trial through the object store),
    checked against the base config with the pinned values."""
    task = spec.task_class
    config = cfg.build(task.config_class, {**spec.base_values, **spec.space.fixed})
    data = task.read_data(config, spec.data_dir or None)
    task.check(config, data, spec.workers_per_trial)
    return data


def search_from_args(
    args: argparse.Namespace, given: Collection[str], *, callbacks: Sequence[Any] = (), hooks: Sequence[Any] = ()
) -> runner.SearchOutcome:
    """Check, plan and run the search of ``args`` (``given``: the flags or keywords the caller
    gave, see :func:`parse_args`): what ``jobs/search.py`` and :func:`tune.search` both do.
    ``callbacks``: extra Tune callbacks; ``hooks``: worker hooks for every trial (tests)."""
    check_given(args, given)
    spec = resume_spec(args) if args.resume else spec_from_args(args, given)
    if not args.resume:
        storage.check_writable(spec.storage_path)
    tracking.check(spec.mlflow_tracking_uri)
    data = read_data(spec)
    cluster.ensure_ray()
    if spec.workers_per_trial > 1:  # one-worker trials start no Ray Train run
        ray_private.start_train_actors()
    cluster.check_shared_storage(spec.storage_path)
    max_concurrent = runner.check_resources(spec)
    print(
        f"search {spec.name}: task {spec.task}, base {spec.base}, {spec.scheduler}, {spec.search_alg} search, "
        f"{spec.num_trials} trial(s) "
        f"of {spec.max_epochs} epoch(s), {max_concurrent} at a time, {spec.workers_per_trial} worker(s) each"
    )
    for line in spec.space.describe():
        print(f"  {line}")
    print(f"  folder: {storage.display(spec.experiment_dir)}", flush=True)
    return runner.run_search(spec, data, resume=args.resume, callbacks=callbacks, hooks=hooks)


def main(argv: Optional[Sequence[str]] = None, *, callbacks: Sequence[Any] = (), hooks: Sequence[Any] = ()) -> int:
    """Entry point of ``jobs/search.py``: the search of the flags, then its report."""
    args, given = parse_args(argv)
    outcome = search_from_args(args, given, callbacks=callbacks, hooks=hooks)
    report.print_report(outcome.report, outcome.wall_time_s)
    return 0
