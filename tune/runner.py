"""Run a search: the trial function, the resources it may use, the Tuner, ``--resume``.

Two kinds of trial, one loop (:func:`lstm.loop.run_worker`); the folders are in docs/tune.md.

* **One worker** (the default): the trial trains in Tune's own trial process, Tune's function-
  trainable idiom (``tune.report`` with a checkpoint, Tune's retries, ``reuse_actors``), so a
  short trial trains instead of waiting for a Ray Train controller and worker group.
* **Two or more workers**: the trial's actor runs a Ray Train run and relays its reports
  (:mod:`tune.bridge`). It holds no CPU (only :data:`TRIAL_DRIVER_MEMORY`); the workers' CPUs
  are in Ray Train's placement group, which Tune does not see, so the limit on concurrent
  trials (by default as many as fit) is what keeps them within the cluster.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import ray
from ray import tune as rtune

from lstm import claim, cluster, ray_private, tracking
from lstm import config as cfg
from lstm.errors import UserError
from lstm.loop import WorkerHook, run_worker
from lstm.plan import RunPlan, check_run_folder
from lstm.session import TuneSession
from lstm.trainer import make_trainer, returned_user_error
from tune import report
from tune.board import SearchBoard
from tune.bridge import Mailbox, relay_reports
from tune.schedulers import make_scheduler
from tune.searchers import make_search_alg
from tune.spec import SearchSpec, save_spec, train_run_name, trial_folder_name
from tune.trial_logs import trial_log_writers

TRIAL_DRIVER_MEMORY = 512 * 2**20  # bytes reserved per trial driver (it holds no CPU)
PBT_CHECKPOINTS_TO_KEEP = 4


# --------------------------------------------------------------------------- resources


def check_resources(spec: SearchSpec, nodes: Optional[Sequence[cluster.Node]] = None) -> int:
    """How many trials may run at once: ``spec.max_concurrent`` if it fits the Ray cluster's
    nodes (UserError if not), else as many as fit. A worker's CPUs and GPU share must fit on one
    node. Call with Ray initialised (or pass ``nodes``)."""
    nodes = cluster.alive_nodes() if nodes is None else list(nodes)
    bundle = {"CPU": float(spec.cpus_per_worker), **({"GPU": spec.gpus_per_worker} if spec.use_gpu else {})}
    what = f"{spec.workers_per_trial} worker(s) x {spec.cpus_per_worker} CPU" + (
        f" + {spec.gpus_per_worker:g} GPU" if spec.use_gpu else ""
    )
    have = cluster.describe_nodes(nodes, gpus=spec.use_gpu)
    fits = cluster.placeable(bundle, nodes) // spec.workers_per_trial
    memory = sum(n.resources.get("memory", 0.0) for n in nodes)
    if spec.workers_per_trial > 1 and memory:
        fits = min(fits, math.floor(memory / TRIAL_DRIVER_MEMORY))
    if fits < 1:
        raise UserError(
            f"one trial needs {what} but this Ray cluster has {have}; lower --workers-per-trial "
            "or --cpus-per-worker"
            + (", or drop --gpu" if spec.use_gpu and not any(n.resources.get("GPU") for n in nodes) else "")
        )
    if spec.max_concurrent is None:
        return max(1, min(fits, spec.num_trials))
    if spec.max_concurrent < 1:
        raise UserError(f"--max-concurrent must be >= 1 (got {spec.max_concurrent})")
    if spec.max_concurrent > fits:
        raise UserError(
            f"--max-concurrent {spec.max_concurrent}: only {fits} trial(s) fit at once on this Ray "
            f"cluster ({have}; each trial runs {what}); use --max-concurrent {fits} or leave it out"
        )
    return spec.max_concurrent


# --------------------------------------------------------------------------- the trial


def trial_settings(spec: SearchSpec, *, storage_path: str, name: str) -> cfg.RunSettings:
    """The run settings of every trial of ``spec``: complete, as the search checked them."""
    return cfg.RunSettings(
        num_workers=spec.workers_per_trial,
        use_gpu=spec.use_gpu,
        gpus_per_worker=spec.gpus_per_worker,
        cpus_per_worker=spec.cpus_per_worker,
        max_failures=spec.max_failures,
        checkpoints_to_keep=checkpoints_to_keep(spec),
        storage_path=storage_path,
        name=name,
    )


def run_trial(
    hparams: dict[str, Any], *, spec: SearchSpec, data: tuple[Any], mailbox: Any, hooks: Sequence[WorkerHook] = ()
) -> None:
    """Tune trial function: the trial's plan, trained in this process (one worker) or as a Ray
    Train run (two or more). ``data`` holds the object-store reference of the task's data (in a
    tuple, which keeps Tune's ``with_parameters`` from resolving it: whoever trains fetches
    it); ``mailbox`` is the search's :class:`tune.bridge.Mailbox` (None for one-worker trials);
    ``hooks`` reach the loop as a job's do (tests inject faults with them)."""
    config = spec.trial_config(hparams)
    trial_id = rtune.get_context().get_trial_id()
    if spec.workers_per_trial == 1:
        settings = trial_settings(spec, storage_path=spec.experiment_dir, name=trial_folder_name(trial_id))
        plan = RunPlan(spec.task_class, config, settings, data[0])
        run_worker(plan.loop_config(hooks), TuneSession(plan.run_dir))
        return
    start = rtune.get_checkpoint()
    name = train_run_name(trial_id, start.path if start is not None else None)
    settings = trial_settings(spec, storage_path=spec.train_runs_dir, name=name)
    plan = RunPlan(spec.task_class, config, settings, data[0], pg_cleaner=False)
    result = relay_reports(
        mailbox,
        lambda callbacks: make_trainer(plan, callbacks=callbacks, hooks=hooks, init_checkpoint=start),
        plan.run_dir,
        with_checkpoints=spec.scheduler == "pbt",
    )
    error = returned_user_error(result)
    if error:
        raise UserError(error)
    # results.json and the task's plots of the run are written by tune.report for every
    # trial, including those a scheduler stopped (their trial function never gets here).


def trial_dirname(trial: Any) -> str:
    """Tune's ``trial_dirname_creator`` (a saved search refers to it by this name on ``--resume``)."""
    return trial_folder_name(trial.trial_id)


# --------------------------------------------------------------------------- the search


class ReleaseOrphans(rtune.Callback):
    """Frees stopped Train trials' workers every few seconds of a search
    (:func:`lstm.ray_private.release_orphans` says why)."""

    def __init__(self, interval_s: float = 5.0):
        self.interval_s = interval_s
        self._last = 0.0

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        now = time.monotonic()
        if now - self._last >= self.interval_s:
            self._last = now
            ray_private.release_orphans()


class TrialLines(rtune.Callback):
    """A line per trial start, epoch and end, in place of Tune's own tables (``verbose=0``):
    a search's output stays a few lines per trial epoch, in a shell or a notebook cell."""

    def __init__(self, metric: str):
        self.metric = metric

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in trial.config.items())
        print(f"trial {trial.trial_id} started: {params}", flush=True)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if "epoch" in result and self.metric in result:
            epochs = f"/{result['epochs']}" if "epochs" in result else ""
            print(
                f"trial {trial.trial_id} epoch {result['epoch']}{epochs}: {self.metric} {result[self.metric]:.4g}",
                flush=True,
            )

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        print(f"trial {trial.trial_id} done", flush=True)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        print(f"trial {trial.trial_id} ERROR (its reason is in the table at the end)", flush=True)


@dataclass
class SearchOutcome:
    """What :func:`run_search` returns."""

    spec: SearchSpec
    max_concurrent: int
    wall_time_s: float
    report: Any  # tune.report.SearchReport (None when write_report=False)


def checkpoints_to_keep(spec: SearchSpec) -> int:
    """Checkpoints kept per trial: PBT warns below 3 (a clone's source may vanish)."""
    return PBT_CHECKPOINTS_TO_KEEP if spec.scheduler == "pbt" else cfg.RunSettings.checkpoints_to_keep


def _trainable(spec: SearchSpec, data: Any, mailbox: Any, hooks: Sequence[WorkerHook] = ()) -> Any:
    if spec.workers_per_trial == 1:
        bundle = {"CPU": spec.cpus_per_worker, **({"GPU": spec.gpus_per_worker} if spec.use_gpu else {})}
    else:
        bundle = {"CPU": 0, "memory": TRIAL_DRIVER_MEMORY}
    trial = rtune.with_parameters(run_trial, spec=spec, data=(data,), mailbox=mailbox, hooks=tuple(hooks))
    return rtune.with_resources(trial, rtune.PlacementGroupFactory([bundle]))


def make_tuner(
    spec: SearchSpec,
    data: Any,
    mailbox: Any,
    max_concurrent: int,
    callbacks: Sequence[Any] = (),
    hooks: Sequence[WorkerHook] = (),
) -> Any:
    """The Tuner of a new search."""
    in_process = spec.workers_per_trial == 1
    keep = checkpoints_to_keep(spec) if in_process or spec.scheduler == "pbt" else None
    return rtune.Tuner(
        _trainable(spec, data, mailbox, hooks),
        param_space=spec.space.param_space(),
        tune_config=rtune.TuneConfig(
            num_samples=spec.num_samples,
            scheduler=make_scheduler(spec),
            search_alg=make_search_alg(spec, max_concurrent),  # seeded; it holds the concurrency limit
            time_budget_s=spec.time_budget_s,
            # A Train run's trial actor must die when Tune stops it, taking its run with it.
            reuse_actors=in_process,
            trial_dirname_creator=trial_dirname,
        ),
        run_config=rtune.RunConfig(
            name=spec.name,
            storage_path=spec.storage_path,
            # One-worker trials retry in Tune; a Train run retries its workers itself.
            failure_config=rtune.FailureConfig(max_failures=spec.max_failures if in_process else 0),
            checkpoint_config=rtune.CheckpointConfig(num_to_keep=keep) if keep else None,
            callbacks=[
                *([] if in_process else [ReleaseOrphans()]),
                *trial_log_writers(),
                SearchBoard(spec),
                TrialLines(spec.metric),
                *mlflow_callbacks(spec),
                *callbacks,
            ],
            verbose=0,
        ),
    )


def mlflow_callbacks(spec: SearchSpec) -> list[Any]:
    """One MLflow run per trial (lstm.tracking), when the search has a tracking URI."""
    if not spec.mlflow_tracking_uri:
        return []
    return [
        tracking.trial_callback(
            spec.mlflow_tracking_uri, spec.name, lambda hparams: cfg.to_dict(spec.trial_config(hparams))
        )
    ]


def log_best_to_mlflow(spec: SearchSpec, rep: Any) -> None:
    """The best config (and the results table) as artifacts of the best trial's MLflow run."""
    if not spec.mlflow_tracking_uri or rep is None or rep.best is None:
        return
    names = {"best_config": "best_config.json", "best_trial": "best_trial.json", "markdown": "results.md"}
    files = {name: rep.files[key] for key, name in names.items() if key in rep.files}
    tracking.log_search_best(spec.mlflow_tracking_uri, spec.name, rep.best.trial_id, files)


def run_search(
    spec: SearchSpec,
    data: Any,
    *,
    resume: bool = False,
    callbacks: Sequence[Any] = (),
    hooks: Sequence[WorkerHook] = (),
    write_report: bool = True,
) -> SearchOutcome:
    """Start (or with ``resume=True`` continue) the search ``spec`` describes on ``data`` (what
    the task's ``read_data`` returned); write the report. Ray must be initialised. ``callbacks``:
    more Tune callbacks; ``hooks``: worker hooks for every trial's loop."""
    exists = rtune.Tuner.can_restore(spec.experiment_dir)
    check_run_folder(spec.experiment_dir, spec.name, resume, exists=exists, what="search")
    max_concurrent = check_resources(spec)
    with claim.held(spec.experiment_dir, what="search"):  # one writer per search folder
        return fit_search(spec, data, resume, max_concurrent, callbacks, hooks, write_report)


def fit_search(
    spec: SearchSpec,
    data: Any,
    resume: bool,
    max_concurrent: int,
    callbacks: Sequence[Any],
    hooks: Sequence[WorkerHook],
    write_report: bool,
) -> SearchOutcome:
    """Run (or continue) the search's Tuner to its end; write the report."""
    data_ref = ray.put(data)
    in_process = spec.workers_per_trial == 1
    # Train runs report through the search's mailbox, held until the report is written (tune/bridge.py).
    mailbox = None if in_process else Mailbox.remote()
    controllers_before = set() if in_process else ray_private.controllers(alive=True)
    start = time.perf_counter()
    if resume:
        # Finished and errored trials stay as they are; unfinished ones continue (their Train
        # runs restore from their own checkpoints). The RunConfig, callbacks included, is the
        # original search's.
        tuner = rtune.Tuner.restore(
            spec.experiment_dir,
            trainable=_trainable(spec, data_ref, mailbox, hooks),
            resume_unfinished=True,
            resume_errored=False,
            restart_errored=False,
        )
    else:
        save_spec(spec)
        tuner = make_tuner(spec, data_ref, mailbox, max_concurrent, callbacks, hooks)
    tuner.fit()
    if not in_process:
        ray_private.release_after_search(controllers_before)  # what stopped trials' Train runs left
    wall = time.perf_counter() - start
    rep = report.write_report(spec, wall_time_s=wall) if write_report else None
    log_best_to_mlflow(spec, rep)
    # Tune's registry keeps the trainable, and with it a handle on the mailbox, for the life of
    # the driver: without this, a driver that runs several searches keeps one idle actor each.
    if mailbox is not None:
        ray.kill(mailbox)
    return SearchOutcome(spec=spec, max_concurrent=max_concurrent, wall_time_s=wall, report=rep)
