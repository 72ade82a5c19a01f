"""A run's plan: everything resolved and checked once, before any worker starts.

:class:`RunPlan` holds the task, its validated config, the completed run settings and the
object-store reference of the data; :meth:`RunPlan.loop_config` is what reaches the loop. A job
plans with :func:`plan_run` (each check one line: config, run folder, data, workers, shared
and writable storage, placement); a search checks the same once for all trials (``tune.cli``)
and each trial makes its ``RunPlan`` from those parts (``tune.runner.run_trial``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import threading
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence

from lstm import cluster, ray_private, storage, timings, tracking
from lstm import config as cfg
from lstm.errors import UserError
from lstm.task import Task, get_task


@dataclass(frozen=True)
class RunPlan:
    """One run, resolved and checked."""

    task: type[Task]
    config: cfg.TaskConfig
    settings: cfg.RunSettings  # complete: storage root, name, CPUs per worker, MLflow URI
    data: Any  # the object-store reference of what task.read_data returned
    # Whether the run needs Ray Train's placement-group cleaner, which frees the workers of a
    # controller that died while its driver lives on. Not on a local instance the job started
    # (it ends with the job), nor in a search (tune.runner.ReleaseOrphans frees stopped trials').
    pg_cleaner: bool = True
    # Whether the run tells Ray's autoscaler what its workers need (Ray Train's autoscaling
    # coordinator). Not on a local instance the job started: no autoscaler adds nodes there.
    coordinator: bool = True

    @property
    def run_dir(self) -> str:
        return storage.join(self.settings.storage_path, self.settings.name)

    def loop_config(self, hooks: Sequence[Any] = (), **extra: Any) -> dict[str, Any]:
        """What the loop gets: the validated config and settings as they are (frozen dataclasses,
        checked once, here) and the data's reference (so the settings' data_dir is dropped)."""
        return {
            "task": self.task.name,
            "config": self.config,
            "run": dataclasses.replace(self.settings, data_dir=""),
            "run_dir": self.run_dir,
            "data": self.data,
            "hooks": list(hooks),
            **extra,
        }


def check_run_folder(
    run_dir: str, name: str, resume: bool, *, exists: Optional[bool] = None, what: str = "run"
) -> None:
    """A run (or search) is never continued by accident, nor a missing one 'resumed' from
    scratch. ``exists`` defaults to: the folder holds a checkpoint."""
    if exists is None:
        from lstm import checkpoint as ckpt

        exists = ckpt.has_checkpoints(run_dir)
    if resume and not exists:
        raise UserError(
            f"--resume: no {what} to resume at {storage.display(run_dir)}; check --name/--storage-path, "
            f"or drop --resume to start one"
        )
    if exists and not resume:
        raise UserError(
            f"a {what} named {name!r} already exists at {storage.display(run_dir)}; pass --resume to "
            "continue it, or choose another --name"
        )


def plan_run(
    task_name: str,
    config: cfg.TaskConfig,
    settings: cfg.RunSettings,
    *,
    resume: bool = False,
    phases: Optional[timings.Phases] = None,
) -> RunPlan:
    """Check a job's run (see the module docstring) and start or join Ray; ``phases`` gets
    the marks of lstm.timings."""
    import ray

    phases = phases or timings.Phases()
    task = get_task(task_name)
    config.validate()
    settings.validate()
    settings = dataclasses.replace(settings, mlflow_tracking_uri=tracking.resolve_uri(settings.mlflow_tracking_uri))
    tracking.check(settings.mlflow_tracking_uri)
    where = storage.locate(settings.storage_path, settings.name, task.name)
    check_run_folder(where.path, where.name, resume)
    data = task.read_data(config, settings.data_dir or None)
    task.check(config, data, settings.num_workers)
    phases.mark("checked")
    with importing(*AFTER_RAY_STARTS):
        own_ray = cluster.ensure_ray()
    if own_ray:
        ray_private.start_train_actors(coordinator=False)
    phases.mark("ray_started")
    cluster.check_shared_storage(where.root)  # before the write check: a refused path stays unwritten
    storage.check_writable(where.root)
    cpus = cluster.plan_workers(
        settings.num_workers, settings.cpus_per_worker, settings.gpus, settings.wait_for_workers_s
    )
    settings = dataclasses.replace(settings, storage_path=where.root, name=where.name, cpus_per_worker=cpus)
    return RunPlan(
        task=task, config=config, settings=settings, data=ray.put(data), pg_cleaner=not own_ray, coordinator=not own_ray
    )


# What a job's driver imports only once Ray is up: Ray Train (the trainer, its callbacks) and
# matplotlib (the plots at the end). Ray's start is mostly a wait for its processes, so these
# are imported meanwhile (bench/README.md has what that saves).
AFTER_RAY_STARTS = ("ray.train.torch", "lstm.callbacks", "matplotlib.pyplot")


@contextlib.contextmanager
def importing(*modules: str) -> Iterator[None]:
    """Import ``modules`` in a thread while the body runs; wait for them at its end. An import
    that fails there is left to fail again, with its own traceback, where it is used."""

    def load() -> None:
        for name in modules:
            with contextlib.suppress(Exception):
                importlib.import_module(name)

    thread = threading.Thread(target=load, name="lstm-imports", daemon=True)
    thread.start()
    try:
        yield
    finally:
        thread.join()
