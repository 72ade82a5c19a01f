"""Run a search: the trial function, the resources it may use, the Tuner, ``--resume``.

Layout of the search folder ``<storage_path>/<name>/`` (local or remote)::

    search_spec.json        what was searched and how (``--resume`` reads it back)
    trial_<id>/             Tune's folder of a trial: params.json, result.json, progress.csv,
                            TensorBoard events (and, with PBT, Tune's copies of checkpoints)
    train_runs/trial-<id>/  the trial's Ray Train run: checkpoints, results.json, plots,
                            tensorboard/ -- exactly what ``jobs/<task>.py`` writes for a run
    results.csv, results.md, best_config.json, best_trial.json, plots/   (tune.report)

Resources. A trial is a Tune actor (the "trial driver") that builds a TorchTrainer and waits
in ``fit()``; Ray Train then starts a controller actor (0 CPUs) and ``--workers-per-trial``
workers with ``--cpus-per-worker`` CPUs (and ``--gpus-per-worker`` GPUs with ``--gpu``) in a
placement group of its own, which Tune does not see. So the trial driver reserves no CPU, only
:data:`TRIAL_DRIVER_MEMORY` (Tune needs a non-empty request), and the limit on concurrent
trials is what keeps trials from starting more workers than the cluster has CPUs and GPUs. It
defaults to as many trials as fit, fractional GPUs counted (4 trials of 0.25 GPU share one);
asking for more is an error before anything starts. Trial drivers never hold a CPU that a
waiting worker needs, so trials and their workers cannot deadlock, even on 2 cores.

The data is read once, by the search's driver, and reaches every trial's workers through
Ray's object store.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import ray
from ray import tune as rtune
from ray.tune.search.basic_variant import BasicVariantGenerator

from lstm import config as cfg
from lstm import storage, tracking
from lstm.errors import UserError
from lstm.trainer import make_trainer, returned_user_error
from tune import report
from tune.board import SearchBoard
from tune.bridge import Mailbox, relay_reports
from tune.cleanup import ReleaseOrphansCallback, release_after_search
from tune.schedulers import make_scheduler
from tune.spec import SearchSpec, save_spec

TRIAL_DRIVER_MEMORY = 512 * 2**20  # bytes reserved per trial driver (it holds no CPU)
PBT_CHECKPOINTS_TO_KEEP = 4  # Tune's copies per trial; PBT warns below 3 (clones may vanish)


# --------------------------------------------------------------------------- resources


def check_resources(spec: SearchSpec, cluster: Optional[dict[str, float]] = None) -> int:
    """How many trials may run at once: ``spec.max_concurrent`` if it fits the Ray cluster
    (UserError if not), else as many as fit. Call with Ray initialised (or pass ``cluster``)."""
    cluster = ray.cluster_resources() if cluster is None else cluster
    cpus, gpus, memory = (float(cluster.get(k, 0.0)) for k in ("CPU", "GPU", "memory"))
    need_cpu = spec.workers_per_trial * spec.cpus_per_worker
    need_gpu = spec.workers_per_trial * spec.gpus_per_worker if spec.use_gpu else 0.0
    what = f"{spec.workers_per_trial} worker(s) x {spec.cpus_per_worker} CPU" + (
        f" + {spec.gpus_per_worker:g} GPU" if need_gpu else ""
    )
    have = f"{cpus:g} CPUs" + (f" and {gpus:g} GPUs" if need_gpu else "")
    fits = math.floor(cpus / need_cpu + 1e-9)
    if need_gpu:
        fits = min(fits, math.floor(gpus / need_gpu + 1e-9))
    if memory:
        fits = min(fits, math.floor(memory / TRIAL_DRIVER_MEMORY))
    if fits < 1:
        raise UserError(
            f"one trial needs {what} but this Ray cluster has {have}; lower --workers-per-trial "
            "or --cpus-per-worker" + ("" if need_gpu or gpus else ", or drop --gpu")
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


def train_run_name(trial_id: str, start: Any) -> str:
    """The Ray Train run of a trial. A trial that starts from a Tune checkpoint (PBT's clone
    of another trial, or its own after a restore) starts a new run named after it."""
    if start is None:
        return f"trial-{trial_id}"
    return f"trial-{trial_id}-from-{hashlib.sha1(start.path.encode()).hexdigest()[:8]}"


def run_trial(hparams: dict[str, Any], *, spec: SearchSpec, data: tuple[Any], mailbox: Any) -> None:
    """Tune trial function: one Ray Train run of the trial's config, built by
    :func:`lstm.trainer.make_trainer` exactly as ``jobs/<task>.py`` builds it. ``data`` holds
    the object-store reference of the task's data (in a tuple, which keeps Tune's
    ``with_parameters`` from resolving it: the workers fetch it, not the trial driver);
    ``mailbox`` is the search's :class:`tune.bridge.Mailbox`."""
    config = spec.trial_config(hparams)
    start = rtune.get_checkpoint()
    name = train_run_name(rtune.get_context().get_trial_id(), start)
    settings = cfg.RunSettings(
        num_workers=spec.workers_per_trial,
        use_gpu=spec.use_gpu,
        gpus_per_worker=spec.gpus_per_worker,
        cpus_per_worker=spec.cpus_per_worker,
        storage_path=spec.train_runs_dir,
        name=name,
    )
    result = relay_reports(
        mailbox,
        lambda callbacks: make_trainer(
            spec.task_class, config, settings, data[0], callbacks=callbacks, init_checkpoint=start
        ),
        storage.join(spec.train_runs_dir, name),
        with_checkpoints=spec.scheduler == "pbt",
    )
    error = returned_user_error(result)
    if error:
        raise UserError(error)
    # results.json and the task's plots of the run are written by tune.report for every
    # trial, including those a scheduler stopped (their trial function never gets here).


def trial_dirname(trial: Any) -> str:
    """Short trial folder names (Tune's default spells out every hyperparameter)."""
    return f"trial_{trial.trial_id}"


# --------------------------------------------------------------------------- the search


@dataclass
class SearchOutcome:
    """What :func:`run_search` returns."""

    spec: SearchSpec
    max_concurrent: int
    wall_time_s: float
    report: Any  # tune.report.SearchReport (None when write_report=False)


def _trainable(spec: SearchSpec, data: Any, mailbox: Any) -> Any:
    resources = rtune.PlacementGroupFactory([{"CPU": 0, "memory": TRIAL_DRIVER_MEMORY}])
    trial = rtune.with_parameters(run_trial, spec=spec, data=(data,), mailbox=mailbox)
    return rtune.with_resources(trial, resources)


def make_tuner(spec: SearchSpec, data: Any, mailbox: Any, max_concurrent: int, callbacks: Sequence[Any] = ()) -> Any:
    """The Tuner of a new search."""
    return rtune.Tuner(
        _trainable(spec, data, mailbox),
        param_space=spec.space.param_space(),
        tune_config=rtune.TuneConfig(
            num_samples=spec.num_samples,
            scheduler=make_scheduler(spec),
            # The concurrency limit goes to the (seeded) search algorithm itself: Tune ignores
            # TuneConfig(max_concurrent_trials) when given a BasicVariantGenerator.
            search_alg=BasicVariantGenerator(random_state=spec.seed, max_concurrent=max_concurrent),
            time_budget_s=spec.time_budget_s,
            reuse_actors=False,  # a stopped trial's actor must die, taking its Train run with it
            trial_dirname_creator=trial_dirname,
        ),
        run_config=rtune.RunConfig(
            name=spec.name,
            storage_path=spec.storage_path,
            checkpoint_config=rtune.CheckpointConfig(num_to_keep=PBT_CHECKPOINTS_TO_KEEP)
            if spec.scheduler == "pbt"
            else None,
            callbacks=[ReleaseOrphansCallback(), SearchBoard(spec), *mlflow_callbacks(spec), *callbacks],
            verbose=1,
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
    spec: SearchSpec, data: Any, *, resume: bool = False, callbacks: Sequence[Any] = (), write_report: bool = True
) -> SearchOutcome:
    """Start (or with ``resume=True`` continue) the search ``spec`` describes on ``data`` (what
    the task's ``read_data`` returned); write the report. Ray must be initialised."""
    exists = rtune.Tuner.can_restore(spec.experiment_dir)
    where = storage.display(spec.experiment_dir)
    if resume and not exists:
        raise UserError(
            f"--resume: no search to resume at {where}; check --name/--storage-path, or drop --resume to start one"
        )
    if exists and not resume:
        raise UserError(
            f"a search named {spec.name!r} already exists at {where}; pass --resume "
            "to continue it, or choose another --name"
        )
    max_concurrent = check_resources(spec)
    data_ref = ray.put(data)
    mailbox = Mailbox.remote()  # held until the report is written (tune/bridge.py says why)
    start = time.perf_counter()
    if resume:
        # Finished and errored trials stay as they are; unfinished ones continue (their Train
        # runs restore from their own checkpoints). The RunConfig, callbacks included, is the
        # original search's.
        tuner = rtune.Tuner.restore(
            spec.experiment_dir,
            trainable=_trainable(spec, data_ref, mailbox),
            resume_unfinished=True,
            resume_errored=False,
            restart_errored=False,
        )
    else:
        save_spec(spec)
        tuner = make_tuner(spec, data_ref, mailbox, max_concurrent, callbacks)
    tuner.fit()
    release_after_search()  # what stopped trials' Train runs left behind (see tune.cleanup)
    wall = time.perf_counter() - start
    rep = report.write_report(spec, wall_time_s=wall) if write_report else None
    log_best_to_mlflow(spec, rep)
    # Tune's registry keeps the trainable, and with it a handle on the mailbox, for the life of
    # the driver: without this, a driver that runs several searches keeps one idle actor each.
    ray.kill(mailbox)
    return SearchOutcome(spec=spec, max_concurrent=max_concurrent, wall_time_s=wall, report=rep)
