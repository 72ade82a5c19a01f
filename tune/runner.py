"""Run a search: the trial function, the resources it may use, the Tuner, ``--resume``.

Layout under ``<storage_path>/<name>/`` (the experiment folder)::

    search_spec.json        what was searched and how (``--resume`` reads it back)
    trial_<id>/             Tune's folder of a trial: params.json, result.json, progress.csv,
                            TensorBoard events (and, with PBT, Tune's copies of checkpoints)
    train_runs/trial-<id>/  the trial's Ray Train run: checkpoints, results.json, plots,
                            tensorboard/ -- exactly what ``jobs/<task>.py`` writes for a run
    results.csv, results.md, best_config.json, best_trial.json, plots/   (tune.report)

Resources. A trial is a Tune actor (the "trial driver") that builds a TorchTrainer and waits
in ``fit()``; Ray Train then starts a controller actor (0 CPUs) and ``--workers-per-trial``
worker actors with ``--cpus-per-worker`` CPUs (and a GPU each with ``--gpu``) in a placement
group of its own, which Tune does not see. So:

* the trial driver reserves no CPU -- it sleeps in ``fit()`` -- only
  :data:`TRIAL_DRIVER_MEMORY` of memory (Tune needs a non-empty resource request), and
* the limit on concurrent trials is what keeps trials from starting more Train workers than
  the cluster has CPUs/GPUs (Tune cannot: it does not see the workers). It defaults to as
  many trials as fit; asking for more is an error before anything starts. Trial drivers never hold a CPU that a waiting worker needs, so
  trials and their workers cannot deadlock, even on a 2-core machine.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from lstm import config as cfg
from lstm.errors import UserError
from lstm.io import atomic_write_json
from lstm.task import Task, get_task
from tune.space import SearchSpace

SPEC_FILE = "search_spec.json"
TRAIN_RUNS = "train_runs"
TRIAL_DRIVER_MEMORY = 512 * 2**20  # bytes reserved per trial driver (it holds no CPU)
EPOCH_FIELDS = ("max_max_epoch", "epochs", "max_epochs", "num_epochs")  # what --max-epochs sets
PBT_CHECKPOINTS_TO_KEEP = 4  # Tune's copies per trial; PBT warns below 3 (clones may vanish)


@dataclass(frozen=True)
class SearchSpec:
    """Everything a search needs, JSON-able (saved as ``search_spec.json`` for ``--resume``)."""

    task: str
    base: Optional[str]  # the preset trials start from
    base_values: dict[str, Any]  # the preset plus --max-epochs/--train-fraction: a trial's defaults
    preset_values: dict[str, Any]  # the preset alone: best_config.json is built on it
    space: SearchSpace
    storage_path: str  # absolute path or URI
    name: str
    scheduler: str = "asha"
    num_samples: int = 8
    max_epochs: int = 1  # epochs per trial
    time_budget_s: Optional[float] = None
    max_concurrent: Optional[int] = None  # None: as many as fit (see check_resources)
    workers_per_trial: int = 1
    use_gpu: bool = False
    cpus_per_worker: int = 1
    data_dir: str = ""
    seed: int = 0
    grace_period: int = 1
    reduction_factor: float = 2.0
    perturbation_interval: int = 1
    budget: dict[str, Any] = field(default_factory=dict)  # {field: value} set by the budget flags

    @property
    def experiment_dir(self) -> str:
        return self.storage_path.rstrip("/") + "/" + self.name

    @property
    def train_runs_dir(self) -> str:
        return self.experiment_dir + "/" + TRAIN_RUNS

    @property
    def task_obj(self) -> Task:
        return get_task(self.task)

    @property
    def metric(self) -> str:
        return self.task_obj.primary_metric

    @property
    def mode(self) -> str:
        return self.task_obj.metric_mode

    @property
    def num_trials(self) -> int:
        return self.num_samples * self.space.num_grid_points()

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["space"] = self.space.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SearchSpec":
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in d.items() if k in known}
        values["space"] = SearchSpace.from_dict(d["space"])
        return cls(**values)


def epoch_field(config_class: type) -> str:
    """The config field that sets a run's number of epochs."""
    names = {f.name for f in dataclasses.fields(config_class)}
    for name in EPOCH_FIELDS:
        if name in names:
            return name
    raise UserError(f"{config_class.__name__} has none of the epoch fields {', '.join(EPOCH_FIELDS)}; "
                    "this task cannot be searched with --max-epochs")


def trial_config(spec: SearchSpec, hparams: dict[str, Any]) -> cfg.TaskConfig:
    """A trial's full config: the base, the pinned values, the trial's sampled values."""
    task = spec.task_obj
    return cfg.build(task.config_class, {**spec.base_values, **spec.space.fixed, **hparams})


# --------------------------------------------------------------------------- resources


def trial_resources() -> Any:
    """What Tune reserves for one trial driver: no CPU, some memory (see module doc)."""
    from ray.tune import PlacementGroupFactory

    return PlacementGroupFactory([{"CPU": 0, "memory": TRIAL_DRIVER_MEMORY}])


def check_resources(spec: SearchSpec, cluster: Optional[dict[str, float]] = None) -> int:
    """How many trials may run at once: ``spec.max_concurrent`` if it fits the Ray cluster
    (UserError if not), else as many as fit. Call with Ray initialised (or pass ``cluster``)."""
    if cluster is None:
        import ray

        cluster = ray.cluster_resources()
    cpus, gpus, memory = (float(cluster.get(k, 0.0)) for k in ("CPU", "GPU", "memory"))
    need_cpu = spec.workers_per_trial * spec.cpus_per_worker
    need_gpu = spec.workers_per_trial if spec.use_gpu else 0
    what = f"{spec.workers_per_trial} worker(s) x {spec.cpus_per_worker} CPU" + (" + 1 GPU" if need_gpu else "")
    have = f"{cpus:g} CPUs" + (f" and {gpus:g} GPUs" if need_gpu else "")
    fits = math.floor(cpus / need_cpu + 1e-9)
    if need_gpu:
        fits = min(fits, math.floor(gpus / need_gpu + 1e-9))
    if memory:
        fits = min(fits, math.floor(memory / TRIAL_DRIVER_MEMORY))
    if fits < 1:
        raise UserError(f"one trial needs {what} but this Ray cluster has {have}; lower --workers-per-trial "
                        "or --cpus-per-worker" + ("" if need_gpu or gpus else ", or drop --gpu"))
    if spec.max_concurrent is None:
        return max(1, min(fits, spec.num_trials))
    if spec.max_concurrent < 1:
        raise UserError(f"--max-concurrent must be >= 1 (got {spec.max_concurrent})")
    if spec.max_concurrent > fits:
        raise UserError(f"--max-concurrent {spec.max_concurrent}: only {fits} trial(s) fit at once on this Ray "
                        f"cluster ({have}; each trial runs {what}); use --max-concurrent {fits} or leave it out")
    return spec.max_concurrent


# --------------------------------------------------------------------------- the trial


def train_run_name(trial_id: str, start_checkpoint: Optional[str]) -> str:
    """The Ray Train run of a trial. A trial that starts from a Tune checkpoint (PBT's clone
    of another trial, or its own after a restore) starts a new run named after it."""
    if not start_checkpoint:
        return f"trial-{trial_id}"
    return f"trial-{trial_id}-from-{hashlib.sha1(start_checkpoint.encode()).hexdigest()[:8]}"


def run_trial(hparams: dict[str, Any], *, spec: SearchSpec) -> None:
    """Tune trial function: one Ray Train run of the trial's config, built by
    :func:`lstm.trainer.make_trainer` exactly as ``jobs/<task>.py`` builds it."""
    from ray import tune as rtune

    from lstm.trainer import make_trainer
    from tune.bridge import TrialReportCallback, forward_reports

    task = spec.task_obj
    config = trial_config(spec, hparams)
    trial_id = rtune.get_context().get_trial_id()
    start = rtune.get_checkpoint()
    start_path = start.path if start is not None else None
    name = train_run_name(trial_id, start_path)
    settings = cfg.build(cfg.RunSettings, {
        "num_workers": spec.workers_per_trial, "use_gpu": spec.use_gpu, "cpus_per_worker": spec.cpus_per_worker,
        "storage_path": spec.train_runs_dir, "name": name, "data_dir": spec.data_dir,
    }, source="run setting")
    run_dir = spec.train_runs_dir + "/" + name

    def make(callbacks: list[Any]) -> Any:
        return make_trainer(task, config, settings, spec.train_runs_dir, name, run_dir, callbacks,
                            init_checkpoint=start_path)

    if spec.scheduler == "pbt":
        result = forward_reports(make)
    else:
        result = make([TrialReportCallback()]).fit()
    user_error = (result.metrics or {}).get("user_error")
    if user_error:
        raise UserError(user_error)
    # results.json and the task's plots of the run are written by tune.report for every
    # trial, including those a scheduler stopped (their trial function never gets here).


def trial_run_dir(spec: SearchSpec, trial_id: str) -> Optional[str]:
    """The local Train run folder that holds a trial's latest checkpoint (with PBT a trial
    has one run per clone; the latest carries the whole lineage's history), or None."""
    from lstm.loop import read_checkpoint_state
    from lstm.trainer import is_remote, latest_checkpoint_dir

    root = Path(spec.train_runs_dir)
    if is_remote(spec.train_runs_dir) or not root.is_dir():
        return None
    best: Optional[tuple[int, float, str]] = None
    for run in root.iterdir():
        if run.name != f"trial-{trial_id}" and not run.name.startswith(f"trial-{trial_id}-from-"):
            continue
        try:
            ckpt = latest_checkpoint_dir(run)
            key = (int(read_checkpoint_state(ckpt)["epoch"]), ckpt.stat().st_mtime, str(run))
        except (UserError, KeyError, ValueError, OSError):
            continue
        best = max(best, key) if best else key
    return best[2] if best else None


def trial_dirname(trial: Any) -> str:
    """Short trial folder names (Tune's default spells out every hyperparameter)."""
    return f"trial_{trial.trial_id}"


# --------------------------------------------------------------------------- the search


@dataclass
class SearchOutcome:
    """What :func:`run_search` returns."""

    spec: SearchSpec
    experiment_dir: str
    max_concurrent: int
    wall_time_s: float
    report: Any  # tune.report.SearchReport (None when write_report=False)


def save_spec(spec: SearchSpec) -> None:
    """Write ``search_spec.json`` into the experiment folder (local path or URI)."""
    from lstm.trainer import is_remote

    if not is_remote(spec.experiment_dir):
        atomic_write_json(Path(spec.experiment_dir) / SPEC_FILE, spec.to_dict())
        return
    import pyarrow.fs

    fs, path = pyarrow.fs.FileSystem.from_uri(spec.experiment_dir + "/" + SPEC_FILE)
    with fs.open_output_stream(path) as f:
        f.write(json.dumps(spec.to_dict(), indent=2).encode())


def load_spec(experiment_dir: str) -> SearchSpec:
    """The spec a search was started with (its folder may have moved since)."""
    from lstm.trainer import is_remote

    experiment_dir = experiment_dir.rstrip("/")
    try:
        if is_remote(experiment_dir):
            import pyarrow.fs

            fs, path = pyarrow.fs.FileSystem.from_uri(experiment_dir + "/" + SPEC_FILE)
            with fs.open_input_stream(path) as f:
                text = f.readall().decode()
        else:
            text = (Path(experiment_dir) / SPEC_FILE).read_text()
    except (FileNotFoundError, OSError):
        raise UserError(f"no search at {experiment_dir} (no {SPEC_FILE}); check --name and --storage-path") from None
    spec = SearchSpec.from_dict(json.loads(text))
    parent, _, name = experiment_dir.rpartition("/")
    return dataclasses.replace(spec, storage_path=parent, name=name)


def _trainable(spec: SearchSpec) -> Any:
    from ray import tune as rtune

    return rtune.with_resources(rtune.with_parameters(run_trial, spec=spec), trial_resources())


def make_tuner(spec: SearchSpec, max_concurrent: int, callbacks: Sequence[Any] = ()) -> Any:
    """The Tuner of a new search."""
    from ray import tune as rtune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from tune.cleanup import ReleaseOrphansCallback
    from tune.schedulers import make_scheduler

    scheduler = make_scheduler(spec.scheduler, metric=spec.metric, mode=spec.mode, max_epochs=spec.max_epochs,
                               space=spec.space, base_values=spec.base_values, grace_period=spec.grace_period,
                               reduction_factor=spec.reduction_factor,
                               perturbation_interval=spec.perturbation_interval)
    checkpoint_config = (rtune.CheckpointConfig(num_to_keep=PBT_CHECKPOINTS_TO_KEEP)
                         if spec.scheduler == "pbt" else None)
    return rtune.Tuner(
        _trainable(spec),
        param_space=spec.space.param_space(),
        tune_config=rtune.TuneConfig(
            num_samples=spec.num_samples,
            scheduler=scheduler,
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
            checkpoint_config=checkpoint_config,
            callbacks=[ReleaseOrphansCallback(), *callbacks],
            verbose=1,
        ),
    )


def search_exists(experiment_dir: str) -> bool:
    from ray import tune as rtune

    return rtune.Tuner.can_restore(experiment_dir)


def run_search(spec: SearchSpec, *, resume: bool = False, callbacks: Sequence[Any] = (),
               write_report: bool = True) -> SearchOutcome:
    """Start (or with ``resume=True`` continue) the search ``spec`` describes; write the
    report. Ray must be initialised (``lstm.trainer.ensure_ray``)."""
    from ray import tune as rtune

    from tune import report
    from tune.cleanup import release_after_search

    exists = search_exists(spec.experiment_dir)
    if resume and not exists:
        raise UserError(f"--resume: no search to resume at {spec.experiment_dir}; check --name/--storage-path, "
                        "or drop --resume to start one")
    if exists and not resume:
        raise UserError(f"a search named {spec.name!r} already exists at {spec.experiment_dir}; pass --resume "
                        "to continue it, or choose another --name")
    max_concurrent = check_resources(spec)
    start = time.perf_counter()
    if resume:
        # Finished and errored trials stay as they are; unfinished ones continue (their Train
        # runs restore from their own checkpoints). The RunConfig, callbacks included, is the
        # original search's.
        tuner = rtune.Tuner.restore(spec.experiment_dir, trainable=_trainable(spec), resume_unfinished=True,
                                    resume_errored=False, restart_errored=False)
    else:
        save_spec(spec)
        tuner = make_tuner(spec, max_concurrent, callbacks)
    tuner.fit()
    release_after_search()  # what stopped trials' Train runs left behind (see tune.cleanup)
    wall = time.perf_counter() - start
    rep = report.write_report(spec, wall_time_s=wall) if write_report else None
    return SearchOutcome(spec=spec, experiment_dir=spec.experiment_dir, max_concurrent=max_concurrent,
                         wall_time_s=wall, report=rep)
