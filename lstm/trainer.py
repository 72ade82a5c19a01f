"""``fit()``: check everything, then train a task on Ray Train workers. The only place that
builds Ray Train's driver objects (TorchTrainer, ScalingConfig, RunConfig, FailureConfig,
CheckpointConfig); Tune's trial function builds its trainer with :func:`make_trainer` too.

Before any worker starts, ``fit`` checks, each failing with one line: the config, the run
folder (exists without ``--resume``, missing with it), the data (read once, here; the workers
get it through Ray's object store), the config against the data and the worker count, shared
storage on a multi-node cluster, that the storage path can be written, and that the worker
group can be placed at all.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Optional, Sequence

from lstm import checkpoint as ckpt
from lstm import cluster, outputs, storage, timings, tracking
from lstm import config as cfg
from lstm.errors import UserError
from lstm.loop import TIMINGS, USER_ERROR, WorkerHook, train_loop_per_worker
from lstm.outputs import RunResult
from lstm.task import Task, get_task

logger = logging.getLogger(__name__)


def check_run_folder(run_dir: str, name: str, resume: bool) -> None:
    """A run is never continued by accident, nor a missing one 'resumed' from scratch."""
    exists = ckpt.has_checkpoints(run_dir)
    if resume and not exists:
        raise UserError(
            f"--resume: no run to resume at {storage.display(run_dir)}; check --name/--storage-path, "
            "or drop --resume to start one"
        )
    if exists and not resume:
        raise UserError(
            f"a run named {name!r} already exists at {storage.display(run_dir)}; pass --resume to "
            "continue it, or choose another --name"
        )


def make_trainer(
    task: type[Task],
    config: cfg.TaskConfig,
    settings: cfg.RunSettings,
    data: Any,
    *,
    callbacks: Sequence[Any] = (),
    hooks: Sequence[WorkerHook] = (),
    init_checkpoint: Any = None,
) -> Any:
    """The TorchTrainer of one run. ``settings`` is complete (storage root, name, CPUs per
    worker); ``data`` is the object-store reference of what ``task.read_data`` returned;
    ``init_checkpoint`` (a ``Checkpoint``) is where a *new* run starts (PBT's clone of another
    trial); a run with checkpoints of its own resumes from those instead."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    run_dir = storage.join(settings.storage_path, settings.name)
    scaling = ray.train.ScalingConfig(
        num_workers=settings.num_workers,
        use_gpu=settings.use_gpu,
        resources_per_worker={"CPU": settings.cpus_per_worker, **({"GPU": settings.gpus} if settings.use_gpu else {})},
    )
    run_config = ray.train.RunConfig(
        name=settings.name,
        storage_path=settings.storage_path,
        failure_config=ray.train.FailureConfig(max_failures=settings.max_failures),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=settings.checkpoints_to_keep),
        callbacks=[*callbacks, outputs.TensorBoardCallback(run_dir)],
    )
    loop_config = {
        "task": task.name,
        "config": cfg.to_dict(config),
        "run": cfg.to_dict(dataclasses.replace(settings, data_dir="")),  # the data comes through the object store
        "run_dir": run_dir,
        "data": data,
        "hooks": list(hooks),
        **({"init_checkpoint": init_checkpoint} if init_checkpoint else {}),
    }
    return trainer_class(TorchTrainer)(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=scaling,
        torch_config=TorchConfig(backend="nccl" if settings.use_gpu else "gloo"),
        run_config=run_config,
    )


def trainer_class(base: type) -> type:
    """``base`` (TorchTrainer) without Ray Train's Ray Data callback when a run has no Ray
    Datasets, as ours never do (each worker gets its data through the object store). Ray 2.60
    adds that callback to every run, and it starts a ``DatasetManager`` actor per run: one more
    process, which imports Ray Data (CPU that a busy machine misses, though the run does not
    wait for it). The callback is a private class: if it moves, this warns and returns
    ``base`` unchanged."""
    try:
        from ray.train.v2._internal.callbacks import DatasetsCallback
    except ImportError as e:
        logger.warning("every run starts Ray Train's DatasetManager actor (%s)", e)
        return base

    class Trainer(base):
        def _create_default_callbacks(self):
            callbacks = super()._create_default_callbacks()
            if self.datasets:
                return callbacks
            return [c for c in callbacks if not isinstance(c, DatasetsCallback)]

    Trainer.__name__ = Trainer.__qualname__ = base.__name__
    return Trainer


def prepare(
    task: type[Task], config: cfg.TaskConfig, settings: cfg.RunSettings, *, resume: bool, phases: timings.Phases
) -> tuple[cfg.RunSettings, Any]:
    """Every up-front check of ``fit`` (see the module docstring). Returns the completed
    settings and the task's data; starts or joins Ray. ``phases`` gets the marks of
    lstm.timings."""
    config.validate()
    settings.validate()
    settings = dataclasses.replace(settings, mlflow_tracking_uri=tracking.resolve_uri(settings.mlflow_tracking_uri))
    tracking.check(settings.mlflow_tracking_uri)
    where = storage.locate(settings.storage_path, settings.name, task.name)
    check_run_folder(where.path, where.name, resume)
    data = task.read_data(config, settings.data_dir or None)
    task.check(config, data, settings.num_workers)
    phases.mark("checked")
    if cluster.ensure_ray():
        cluster.start_train_actors()
    phases.mark("ray_started")
    cluster.check_shared_storage(where.root)
    storage.check_writable(where.root)
    cpus = cluster.plan_workers(
        settings.num_workers, settings.cpus_per_worker, settings.gpus, settings.wait_for_workers_s
    )
    return dataclasses.replace(settings, storage_path=where.root, name=where.name, cpus_per_worker=cpus), data


def fit(
    task_name: str,
    config: cfg.TaskConfig,
    settings: cfg.RunSettings,
    *,
    resume: bool = False,
    callbacks: Sequence[Any] = (),
    hooks: Sequence[WorkerHook] = (),
    phases: Optional[timings.Phases] = None,
) -> RunResult:
    """Train ``config`` for task ``task_name`` on Ray Train workers; return the run's result
    (its ``timings``: where the time went, from ``phases``' start; lstm.timings).

    ``resume=True`` continues the run named ``settings.name`` from its latest checkpoint (Ray
    Train restores a run whose name and storage path already exist)."""
    import ray

    task = get_task(task_name)
    phases = phases or timings.Phases()
    settings, data = prepare(task, config, settings, resume=resume, phases=phases)
    run_dir = storage.join(settings.storage_path, settings.name)
    print(f"[{task.name}] run folder: {storage.display(run_dir)}", flush=True)
    uri = settings.mlflow_tracking_uri
    run_id = tracking.start_job_run(uri, task.name, settings.name, cfg.to_dict(config)) if uri else None
    if run_id:
        callbacks = [*callbacks, tracking.MetricsCallback(uri, run_id)]
    trainer = make_trainer(task, config, settings, ray.put(data), callbacks=callbacks, hooks=hooks)
    try:
        phases.mark("fit_started")
        result = trainer.fit()
        phases.mark("fit_returned")
        error = returned_user_error(result)
        if error:
            raise UserError(error)
        worker_marks = (getattr(result, "return_value", None) or {}).get(TIMINGS, {})
        out = outputs.collect(
            task,
            run_dir,
            outputs.checkpoint_location(result.checkpoint, run_dir),
            timings=lambda: timings.breakdown({**phases.marks, "outputs_written": time.time()}, worker_marks),
        )
    except BaseException:
        if run_id:
            tracking.end_job_run(uri, run_id, None, failed=True)
        raise
    if run_id:
        tracking.end_job_run(uri, run_id, out.results_path)
        print(f"[{task.name}] MLflow run {run_id} at {uri}", flush=True)
    return out


def returned_user_error(result: Any) -> Optional[str]:
    """The one-line UserError a run stopped with, if any: returned by rank 0's loop (Ray
    Train V2 keeps only the metrics reported with a checkpoint)."""
    returned = getattr(result, "return_value", None)
    if isinstance(returned, dict) and returned.get(USER_ERROR):
        return str(returned[USER_ERROR])
    return (getattr(result, "metrics", None) or {}).get(USER_ERROR)
