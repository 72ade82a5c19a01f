"""The command line of ``jobs/tune_ptb.py``: parse, check everything, run the search, report.

Every check that can fail on user input (task, base preset, search space, budget flags,
data, resources) runs before the first trial starts and fails with a one-line UserError.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import os
from typing import Any, Optional, Sequence

from lstm import config as cfg
from lstm.errors import UserError
from lstm.task import get_task, task_names
from tune import runner
from tune.schedulers import SCHEDULERS, check_pbt_space
from tune.space import DEFAULT_SPACE, parse_space


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="jobs/tune_ptb.py",
        description="Search hyperparameters with Ray Tune; every trial is a Ray Train run of jobs/<task>.py.",
    )
    p.add_argument("--task", default="ptb", help=f"task to search: {', '.join(task_names())} (default ptb)")
    p.add_argument("--base", default=None, metavar="PRESET",
                   help="named config trials start from (ptb: small|medium|large|test); default: the task's default")
    p.add_argument("--space", nargs="+", action="extend", default=[], metavar="NAME=SPEC",
                   help="search space entries; each replaces the default of its NAME (defaults: "
                        f"{' '.join(f'{k}={v}' for k, v in DEFAULT_SPACE.items())}). SPEC: LOW:HIGH, "
                        "log:LOW:HIGH, V1,V2 (choice), grid:V1,V2 (every value), V (pinned) or base (the base's value)"),
    p.add_argument("--scheduler", choices=SCHEDULERS, default="asha",
                   help="asha (default): stop bad trials early; pbt: population based training (mutates keep_prob, learning_rate)")
    p.add_argument("--num-samples", type=int, default=8, help="trials to sample, times the size of any grid (default 8)")
    p.add_argument("--max-epochs", type=int, default=None, help="epochs per trial (default: the base's)")
    p.add_argument("--time-budget-s", type=float, default=None, help="end the search after this many seconds")
    p.add_argument("--max-concurrent", type=int, default=None,
                   help="trials at once (default: as many as the cluster's CPUs/GPUs fit)")
    p.add_argument("--train-fraction", type=float, default=None,
                   help="train every trial on this leading fraction of the training data (ptb)")
    p.add_argument("--workers-per-trial", type=int, default=1, help="Ray Train workers per trial (default 1)")
    p.add_argument("--gpu", action="store_true", help="one GPU per worker")
    p.add_argument("--cpus-per-worker", type=int, default=1, help="CPUs per worker (default 1)")
    p.add_argument("--data-dir", default="", help="the task's data folder (default: $LSTM_DATA_DIR or the download cache)")
    p.add_argument("--storage-path", default="", help="where searches live (default: $LSTM_RAY_STORAGE or ./runs)")
    p.add_argument("--name", default="", help="the search's name (default: tune-<task>-<timestamp>)")
    p.add_argument("--resume", action="store_true",
                   help="continue the interrupted search --name with its original settings")
    p.add_argument("--seed", type=int, default=0, help="seed of the random search (default 0)")
    p.add_argument("--grace-period", type=int, default=1, help="ASHA: epochs before a trial can be stopped (default 1)")
    p.add_argument("--reduction-factor", type=float, default=2.0, help="ASHA: keep the best 1/N at each rung (default 2)")
    p.add_argument("--perturbation-interval", type=int, default=1, help="PBT: epochs between exploit/explore steps (default 1)")
    return p


def spec_from_args(args: argparse.Namespace) -> runner.SearchSpec:
    """Check the flags and build the search spec (no Ray needed)."""
    from lstm.trainer import default_storage_path, is_remote

    task = get_task(args.task)
    base = args.base or task.default_preset
    if base is not None and base not in task.presets:
        raise UserError(f"--base {base!r} is not a config of task {task.name}; choose one of: {', '.join(task.presets)}")
    preset_values = dict(task.presets.get(base, {})) if base is not None else {}
    cfg.build(task.config_class, preset_values)

    for flag, value, low in (("--num-samples", args.num_samples, 1), ("--workers-per-trial", args.workers_per_trial, 1),
                             ("--cpus-per-worker", args.cpus_per_worker, 1), ("--grace-period", args.grace_period, 1),
                             ("--perturbation-interval", args.perturbation_interval, 1)):
        if value < low:
            raise UserError(f"{flag} must be >= {low} (got {value})")
    if args.reduction_factor <= 1:
        raise UserError(f"--reduction-factor must be > 1 (got {args.reduction_factor})")
    if args.time_budget_s is not None and not args.time_budget_s > 0:
        raise UserError(f"--time-budget-s must be positive (got {args.time_budget_s})")

    budget: dict[str, Any] = {}
    epochs_name = runner.epoch_field(task.config_class)
    if args.max_epochs is not None:
        if args.max_epochs < 1:
            raise UserError(f"--max-epochs must be >= 1 (got {args.max_epochs})")
        budget[epochs_name] = args.max_epochs
    if args.train_fraction is not None:
        if "train_fraction" not in {f.name for f in dataclasses.fields(task.config_class)}:
            raise UserError(f"--train-fraction applies to tasks with a train_fraction field (ptb), not {task.name}")
        if not 0 < args.train_fraction <= 1:
            raise UserError(f"--train-fraction must be in (0, 1] (got {args.train_fraction})")
        budget["train_fraction"] = args.train_fraction
    base_values = {**preset_values, **budget}
    base_config = cfg.build(task.config_class, base_values)

    space = parse_space(task.config_class, args.space, base_values=base_values, task_name=task.name)
    if args.scheduler == "pbt":
        check_pbt_space(space, task.name)
    data_dir = os.path.abspath(os.path.expanduser(args.data_dir)) if args.data_dir else ""
    task.check(cfg.build(task.config_class, {**base_values, **space.fixed}), data_dir or None)

    storage = args.storage_path or default_storage_path()
    if not is_remote(storage):
        storage = os.path.abspath(os.path.expanduser(storage))
    name = args.name or f"tune-{task.name}-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    return runner.SearchSpec(
        task=task.name, base=base, base_values=base_values, preset_values=preset_values, space=space,
        storage_path=storage, name=name, scheduler=args.scheduler, num_samples=args.num_samples,
        max_epochs=task.num_epochs(base_config), time_budget_s=args.time_budget_s,
        max_concurrent=args.max_concurrent, workers_per_trial=args.workers_per_trial, use_gpu=args.gpu,
        cpus_per_worker=args.cpus_per_worker, data_dir=data_dir, seed=args.seed,
        grace_period=args.grace_period, reduction_factor=args.reduction_factor,
        perturbation_interval=args.perturbation_interval, budget=budget,
    )


def resume_spec(args: argparse.Namespace) -> runner.SearchSpec:
    """The saved spec of the search ``--name`` (``--resume`` ignores the other search flags)."""
    from lstm.trainer import default_storage_path, is_remote

    if not args.name:
        raise UserError("--resume needs the --name of the search to continue")
    storage = args.storage_path or default_storage_path()
    if not is_remote(storage):
        storage = os.path.abspath(os.path.expanduser(storage))
    return runner.load_spec(storage.rstrip("/") + "/" + args.name)


def main(argv: Optional[Sequence[str]] = None, *, callbacks: Sequence[Any] = ()) -> int:
    """Entry point of ``jobs/tune_ptb.py``. ``callbacks``: extra Tune callbacks (tests)."""
    from lstm.trainer import ensure_ray
    from tune import report

    args = build_parser().parse_args(argv)
    spec = resume_spec(args) if args.resume else spec_from_args(args)
    ensure_ray()
    max_concurrent = runner.check_resources(spec)
    print(f"search {spec.name}: task {spec.task}, base {spec.base}, {spec.scheduler}, {spec.num_trials} trial(s) "
          f"of {spec.max_epochs} epoch(s), {max_concurrent} at a time, {spec.workers_per_trial} worker(s) each")
    for line in spec.space.describe():
        print(f"  {line}")
    print(f"  folder: {spec.experiment_dir}")
    outcome = runner.run_search(spec, resume=args.resume, callbacks=callbacks)
    report.print_report(outcome.report, outcome.wall_time_s)
    return 0
