"""The command line every job shares: config flags, run flags, fit, a short summary.

A job's training command is one call of :func:`train_main` (``jobs/rectangle.py`` is nothing
more); ``jobs/ptb.py`` and ``jobs/char.py`` add sub-commands of their own for a trained run
(``score``, ``generate``, ``sample``), whose flags are not config fields.
"""

from __future__ import annotations

import argparse
import json
from typing import Optional, Sequence

from lstm import config as cfg
from lstm import storage, timings
from lstm.api import resolve_run
from lstm.errors import UserError
from lstm.outputs import Run
from lstm.task import Task, get_task
from lstm.trainer import fit


def build_parser(task: type[Task], description: Optional[str] = None) -> argparse.ArgumentParser:
    """Flags: --config PRESET, --config-file, one flag per config field, run/scaling flags."""
    p = argparse.ArgumentParser(
        prog=f"jobs/{task.name}.py", description=description or f"Train the {task.name} task with Ray Train."
    )
    if task.presets:
        p.add_argument(
            "--config",
            default=None,
            metavar="PRESET",
            help=f"named config: {', '.join(task.presets)} (default {task.default_preset})",
        )
    p.add_argument("--config-file", default=None, help="JSON file of config fields (e.g. a search's best_config.json)")
    p.add_argument(
        "--resume", action="store_true", help="continue the run called --name (needed) from its latest checkpoint"
    )
    p.add_argument(
        "--gpu",
        dest="run__use_gpu",
        action="store_const",
        const=True,
        default=None,
        help="GPU workers, nccl backend (--gpus-per-worker: each worker's share, default 1)",
    )
    p.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved config as JSON and exit (run flags are checked, not printed; not with --resume)",
    )
    cfg.add_config_flags(p, task.config_class, group_title=f"{task.name} config (override any preset field)")
    cfg.add_config_flags(p, cfg.RunSettings, prefix="run", group_title="run and scaling", exclude=("use_gpu",))
    return p


def resolve_configs(task: type[Task], args: argparse.Namespace) -> tuple[cfg.TaskConfig, cfg.RunSettings]:
    """Task config and run settings from parsed args, checked as :func:`lstm.train`'s keywords are."""
    preset = getattr(args, "config", None)
    if preset is None and not args.config_file:
        preset = task.default_preset
    if args.resume and args.print_config:
        raise UserError(
            "--resume has no effect with --print-config, which prints the config and exits; drop one of them"
        )
    return resolve_run(
        task,
        preset=preset,
        config_file=args.config_file,
        overrides=cfg.flags_given(args),
        run_options=cfg.flags_given(args, prefix="run"),
        resume=args.resume,
    )


def train_main(task_name: str, argv: Optional[Sequence[str]] = None) -> int:
    """Parse ``argv``, train, print where the outputs are. Returns the exit status."""
    task = get_task(task_name)
    parser = build_parser(task)
    args = parser.parse_args(argv)
    config, settings = resolve_configs(task, args)
    if args.print_config:
        print(json.dumps({"task": task.name, **cfg.to_dict(config)}, indent=2))
        return 0
    result = fit(task.name, config, settings, resume=args.resume, phases=timings.Phases(from_import=True))
    print_summary(result)
    return 0


def print_summary(result: Run) -> None:
    final = {k: v for k, v in result.final.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    headline = ", ".join(
        f"{k} {v:.4g}" for k, v in final.items() if k.startswith(("valid_", "test_")) and not k.endswith("_loss")
    )
    print(f"done: {result.task} run in {storage.display(result.run_dir)}" + (f" ({headline})" if headline else ""))
    if result.results_path:
        print(f"  results:    {storage.display(result.results_path)}")
    for plot in result.plots:
        print(f"  plot:       {storage.display(plot)}")
    print(f"  checkpoint: {storage.display(result.checkpoint)}")
    if result.timings:
        print(f"  time:       {timings.format_line(result.timings)}")
