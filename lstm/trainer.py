"""``fit()``: plan a run (:func:`lstm.plan.plan_run`: every up-front check), claim its folder
(:mod:`lstm.claim`), then train it on Ray Train workers (:func:`run_plan`). The only place
that builds Ray Train's driver objects (TorchTrainer, ScalingConfig, RunConfig, FailureConfig,
CheckpointConfig): a search's trials of two or more workers build theirs with
:func:`make_trainer` too.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
import uuid
from typing import Any, Optional, Sequence

from lstm import checkpoint as ckpt
from lstm import claim, outputs, ray_private, storage, timings, tracking
from lstm import config as cfg
from lstm.errors import UserError
from lstm.loop import LOOP_CONFIG, TIMINGS, WorkerHook, train_loop_per_worker
from lstm.outputs import Run
from lstm.plan import RunPlan, plan_run
from lstm.session import USER_ERROR

logger = logging.getLogger(__name__)


def make_trainer(
    plan: RunPlan,
    *,
    callbacks: Sequence[Any] = (),
    hooks: Sequence[WorkerHook] = (),
    init_checkpoint: Any = None,
    command: str = "",
) -> Any:
    """The TorchTrainer of ``plan``. ``init_checkpoint`` (a ``Checkpoint``) is where a *new*
    run starts (PBT's clone of another trial); a run with checkpoints of its own resumes from
    those instead. ``command`` names the job's command, whose workers record each attempt's
    start (lstm.timings)."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from lstm.callbacks import TensorBoardCallback

    settings = plan.settings
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
        callbacks=[*callbacks, TensorBoardCallback(plan.run_dir)],
    )
    extra = {
        **({"init_checkpoint": init_checkpoint} if init_checkpoint else {}),
        **({"command": command} if command else {}),
    }
    trainer = ray_private.slim_trainer(
        TorchTrainer,
        pg_cleaner=plan.pg_cleaner,
        coordinator=plan.coordinator,
        process_group=settings.num_workers > 1 or settings.use_gpu,
    )
    return trainer(
        train_loop_per_worker,
        # By reference: the controller unpickles train_loop_config, and the task's config
        # classes would import torch there.
        train_loop_config={LOOP_CONFIG: ray.put(plan.loop_config(hooks, **extra))},
        scaling_config=scaling,
        torch_config=TorchConfig(backend="nccl" if settings.use_gpu else "gloo"),
        run_config=run_config,
    )


def fit(
    task_name: str,
    config: cfg.TaskConfig,
    settings: cfg.RunSettings,
    *,
    resume: bool = False,
    callbacks: Sequence[Any] = (),
    hooks: Sequence[WorkerHook] = (),
    phases: Optional[timings.Phases] = None,
) -> Run:
    """Train ``config`` for task ``task_name`` on Ray Train workers; return the run's result
    (its ``timings``: where the time went, from ``phases``' start; lstm.timings).

    ``resume=True`` continues the run named ``settings.name`` from its latest checkpoint (Ray
    Train restores a run whose name and storage path already exist)."""
    phases = phases or timings.Phases()
    plan = plan_run(task_name, config, settings, resume=resume, phases=phases)
    with claim.held(plan.run_dir, what="run"):  # one writer per run folder
        return run_plan(plan, callbacks=callbacks, hooks=hooks, phases=phases)


def run_plan(
    plan: RunPlan, *, callbacks: Sequence[Any] = (), hooks: Sequence[WorkerHook] = (), phases: timings.Phases
) -> Run:
    """Train a planned run on Ray Train workers; write its outputs; return its result."""
    task, run_dir, uri = plan.task, plan.run_dir, plan.settings.mlflow_tracking_uri
    print(f"[{task.name}] run folder: {storage.display(run_dir)}", flush=True)
    run_id = tracking.start_job_run(uri, task.name, plan.settings.name, cfg.to_dict(plan.config)) if uri else None
    if run_id:
        from lstm.callbacks import MetricsCallback

        callbacks = [*callbacks, MetricsCallback(uri, run_id)]
    command = uuid.uuid4().hex[:12]
    trainer = make_trainer(plan, callbacks=callbacks, hooks=hooks, command=command)
    try:
        phases.mark("fit_started")
        try:
            result = fit_interruptibly(trainer)
        finally:
            attempts = timings.collect_attempts(run_dir, command)
        phases.mark("fit_returned")
        error = returned_user_error(result)
        if error:
            raise UserError(error)
        worker_marks = (getattr(result, "return_value", None) or {}).get(TIMINGS, {})
        out = outputs.collect(
            task,
            run_dir,
            ckpt.checkpoint_location(result.checkpoint, run_dir),
            extra={"precision": plan.settings.precision},
            timings=lambda history: timings.breakdown(
                {**phases.marks, "outputs_written": time.time()}, worker_marks, attempts, history
            ),
        )
    except BaseException:
        if run_id:
            tracking.end_job_run(uri, run_id, None, failed=True)
        raise
    if run_id:
        tracking.end_job_run(uri, run_id, out.results_path)
        print(f"[{task.name}] MLflow run {run_id} at {uri}", flush=True)
    return out


def fit_interruptibly(trainer: Any) -> Any:
    """``trainer.fit()``, where Ctrl-C (a notebook's stop button) stops the run as Ray Train's
    own SIGINT handler does -- it aborts the controller; the checkpoints stay -- and then raises
    KeyboardInterrupt, not the ``SystemExit`` that handler ends with. The handler Ray Train
    installs for the call is removed after it, so a later Ctrl-C in the same process (a
    notebook's next cell) is Python's own again."""
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGINT) if main else None
    try:
        return trainer.fit()
    except SystemExit:  # Ray Train's SIGINT handler: the run was stopped
        raise KeyboardInterrupt("the run was stopped; its checkpoints stay: resume it with --resume") from None
    finally:
        if main:
            signal.signal(signal.SIGINT, previous)


def returned_user_error(result: Any) -> Optional[str]:
    """The one-line UserError a run stopped with, if any: returned by rank 0's loop (Ray
    Train V2 keeps only the metrics reported with a checkpoint)."""
    returned = getattr(result, "return_value", None)
    if isinstance(returned, dict) and returned.get(USER_ERROR):
        return str(returned[USER_ERROR])
    return (getattr(result, "metrics", None) or {}).get(USER_ERROR)
