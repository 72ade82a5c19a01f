"""The one training loop: :func:`run_worker` runs it in each process that trains a run, a Ray
Train worker or a Tune trial's (:class:`lstm.session.Session`). ``restore``, then per epoch
``train_epoch``, ``evaluate_and_reduce`` (the task's sums all-reduced: global metrics) and
``report`` (rank 0 writes the checkpoint). Epoch ``e`` is seeded by (seed, e, rank), so an
epoch re-run after a failure draws the same masks and data.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from lstm import checkpoint as ckpt
from lstm import config as cfg
from lstm import ray_private, timings
from lstm.errors import UserError
from lstm.progress import Progress
from lstm.session import Session, TrainSession
from lstm.step import DivergenceGuard, StepModule, autocast, make_stepper
from lstm.task import Task, WorkerInfo, get_task

TIMINGS = "timings"  # the return value's marks of the worker's loop (lstm.timings)


class WorkerHook:
    """Called by the loop on every rank (tests inject faults with it); picklable: it travels to the workers."""

    def on_step(self, epoch: int, step: int, worker: WorkerInfo, run_dir: str) -> None:
        """Before training step ``step`` (0-based) of ``epoch`` (1-based)."""


@dataclass
class History:
    """What a run has done so far: carried in every checkpoint."""

    start_epoch: int = 0
    epochs: list[dict[str, Any]] = field(default_factory=list)
    elapsed_before: float = 0.0

    @property
    def samples_seen(self) -> int:
        return int(self.epochs[-1].get("samples_seen", 0)) if self.epochs else 0


def seed_epoch(seed: int, epoch: int, rank: int) -> None:
    torch.manual_seed(seed * 1_000_003 + epoch * 1_009 + rank)


def all_reduce_sums(sums: Mapping[str, float], device: torch.device) -> dict[str, float]:
    """Each value summed over all workers (the identity with one process)."""
    keys = sorted(sums)
    if not (dist.is_available() and dist.is_initialized()) or not keys:
        return {k: float(sums[k]) for k in keys}
    values = torch.tensor([float(sums[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return dict(zip(keys, values.tolist(), strict=True))


# --------------------------------------------------------------------------- the parts


def restore(
    task: Task, model: nn.Module, checkpoint: Any, run_dir: str = ""
) -> tuple[History, Optional[dict[str, Any]]]:
    """Load a checkpoint (or the run folder's newest intact one) into ``model``; the history and optimizer state."""
    if checkpoint is None:
        return History(), None
    contents, skipped = ckpt.resume_source(checkpoint, run_dir)
    state = contents.state
    if state["task"] != task.name:
        raise UserError(
            f"checkpoint {contents.location} is from task {state['task']!r}, not {task.name!r}; use another --name"
        )
    task.check_checkpoint(state.get("meta", {}))
    ckpt.load_model(model, contents)
    history = History(int(state["epoch"]), list(state.get("history", [])), float(state.get("elapsed_s", 0.0)))
    if task.worker.is_chief:
        if skipped:
            print(f"[{task.name}] skipped {ckpt.describe(skipped)}; resuming from {contents.name}", flush=True)
        print(f"[{task.name}] resumed from checkpoint after epoch {history.start_epoch}", flush=True)
    return history, contents.optimizer


class Loop:
    """The parts of one worker's run; :func:`run_training` strings them together."""

    def __init__(self, task: Task, settings: cfg.RunSettings, run_dir: str, hooks: Sequence[WorkerHook] = ()):
        self.task, self.settings, self.run_dir, self.hooks = task, settings, run_dir, list(hooks)
        self.worker = task.worker
        self.n_epochs = task.num_epochs(task.config)

    def prepare(self, model: nn.Module, optimizer_state: Optional[dict[str, Any]]) -> None:
        """Device placement, the DDP wrapper, the optimizer and the stepper."""
        self.model = model.to(self.worker.device)
        forward: nn.Module = StepModule(self.task, self.model)
        if self.worker.world_size > 1:
            import ray.train.torch

            forward = ray.train.torch.prepare_model(forward, move_to_device=False)
        optimizer = self.task.build_optimizer(self.model)
        if optimizer_state is not None:
            optimizer.load_state_dict(optimizer_state)
        guard = DivergenceGuard(
            self.task.loss_limit(),
            self.worker.device,
            self.worker.world_size,
            check_gradients=self.settings.precision != "fp16",
        )
        self.stepper = make_stepper(
            forward,
            optimizer,
            [p for p in self.model.parameters() if p.requires_grad],
            max_grad_norm=self.task.max_grad_norm(),
            guard=guard,
            precision=self.settings.precision,
            device=self.worker.device,
        )

    def train_epoch(self, epoch: int, seen_before: int) -> tuple[dict[str, float], list[dict[str, Any]], float]:
        """One epoch of this rank's batches: (sums, the task's step records, seconds)."""
        task, worker = self.task, self.worker
        seed_epoch(task.config.seed, epoch, worker.rank)
        self.stepper.set_lr(task.learning_rate(epoch))
        self.model.train()
        sums: dict[str, Any] = defaultdict(float)
        records, state = [], None
        progress = Progress(
            task.num_train_batches(), f"[{task.name}] epoch {epoch + 1}", task.sample_unit, enabled=worker.is_chief
        )
        start = time.perf_counter()
        index = -1
        for index, batch in enumerate(task.train_batches(epoch)):
            for hook in self.hooks:
                hook.on_step(epoch + 1, index, worker, self.run_dir)
            out = self.stepper.step(batch, state, index, epoch)
            for key, value in out.sums.items():
                sums[key] = sums[key] + (value.detach() if torch.is_tensor(value) else value)
            sums["samples"] += out.samples
            state = out.state
            progress.update(out.samples)
            record = task.after_step(self.model, seen_before + progress.items * worker.world_size)
            if record is not None:
                records.append(record)
        self.stepper.raise_if_diverged(epoch)
        return {k: float(v) for k, v in sums.items()}, records, time.perf_counter() - start  # one sync per epoch

    def evaluate_and_reduce(self, epoch: int, train_sums: Mapping[str, float]) -> dict[str, Any]:
        """The task's sums on each split, summed over all workers, turned into metrics."""
        task = self.task
        splits = list(task.eval_splits) + (list(task.final_splits) if epoch == self.n_epochs - 1 else [])
        all_sums = {f"train:{k}": v for k, v in train_sums.items()}
        start = time.perf_counter()
        self.model.eval()
        weights = task.evaluation_weights(self.model, self.stepper.optimizer)
        with torch.no_grad(), autocast(self.settings.precision, self.worker.device), weights:
            for split in splits:
                all_sums.update({f"{split}:{k}": v for k, v in task.evaluate(self.model, split).items()})
        eval_seconds = time.perf_counter() - start
        global_sums = all_reduce_sums(all_sums, self.worker.device)
        metrics: dict[str, Any] = {"epoch": epoch + 1, "epochs": self.n_epochs, "lr": self.stepper.lr}
        for split in ["train"] + splits:
            head = split + ":"
            metrics.update(
                task.summarize({k[len(head) :]: v for k, v in global_sums.items() if k.startswith(head)}, f"{split}_")
            )
        metrics["global_samples"] = global_sums["train:samples"]
        metrics["eval_s"] = eval_seconds
        metrics.update(task.after_evaluation(self.stepper.optimizer, metrics))
        return metrics

    def report(
        self, metrics: dict[str, Any], history: History, records: list[dict[str, Any]], session: Session
    ) -> None:
        """Keep the epoch in the history, print it, and report it with a checkpoint."""
        task, worker = self.task, self.worker
        extras = task.epoch_extras(self.model, metrics["epoch"] - 1) if worker.is_chief else {}
        history.epochs.append(
            {**metrics, **({"extras": extras} if extras else {}), **({"steps": records} if records else {})}
        )
        if worker.is_chief:
            print(task.display.epoch_line(metrics), flush=True)
            for line in extras.get("print", []):
                print(line, flush=True)
        scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool))}
        with tempfile.TemporaryDirectory(prefix="lstm-ckpt-") as tmp:
            if worker.is_chief:
                ckpt.save(
                    Path(tmp),
                    self.model,
                    self.stepper.optimizer,
                    {
                        "task": task.name,
                        "config": cfg.to_dict(task.config),
                        "epoch": metrics["epoch"],
                        "elapsed_s": metrics["elapsed_s"],
                        "meta": task.checkpoint_meta(),
                        "history": history.epochs,
                    },
                )
            session.report(scalars, tmp if worker.is_chief else None)


def run_training(
    task: Task,
    settings: cfg.RunSettings,
    session: Session,
    *,
    run_dir: str = "",
    hooks: Sequence[WorkerHook] = (),
    marks: Optional[dict[str, float]] = None,
    attempt_log: str = "",
) -> None:
    """One worker's run, apart from Ray's context so that its parts stay testable. ``marks``
    gets its lstm.timings marks; rank 0 also records its attempt at ``attempt_log``."""
    marks = {} if marks is None else marks
    loop = Loop(task, settings, run_dir, hooks)
    torch.manual_seed(task.config.seed)
    model = task.build_model()
    history, optimizer_state = restore(task, model, session.get_checkpoint(), run_dir)
    loop.prepare(model, optimizer_state)
    run_start = time.perf_counter()
    marks.update(training_at=time.time(), train_s=0.0, eval_s=0.0)
    if attempt_log and task.worker.is_chief:
        timings.record_attempt(attempt_log, marks, history.start_epoch)
    if history.start_epoch >= loop.n_epochs and task.worker.is_chief:
        print(f"[{task.name}] nothing to do: the run already finished its {loop.n_epochs} epochs", flush=True)
    for epoch in range(history.start_epoch, loop.n_epochs):
        sums, records, train_seconds = loop.train_epoch(epoch, history.samples_seen)
        metrics = loop.evaluate_and_reduce(epoch, sums)
        samples = int(metrics.pop("global_samples"))
        metrics[f"{task.sample_unit}_per_sec"] = samples / max(train_seconds, 1e-9)
        metrics.update(
            samples_seen=history.samples_seen + samples,
            train_s=train_seconds,
            elapsed_s=history.elapsed_before + time.perf_counter() - run_start,
            workers=task.worker.world_size,
        )
        marks["train_s"] += train_seconds
        marks["eval_s"] += metrics["eval_s"]
        loop.report(metrics, history, records, session)
    marks["finished_at"] = time.time()


# --------------------------------------------------------------------------- Ray Train entry point


def set_threads(settings: cfg.RunSettings, task_class: type[Task], device: torch.device) -> None:
    """Ray's CPUs for this worker, but no more threads than the machine's cores or the task can use."""
    if device.type == "cpu":
        cap = task_class.max_threads or os.cpu_count() or 1
        torch.set_num_threads(max(1, min(settings.cpus_per_worker, os.cpu_count() or 1, cap)))


def attempt_log(loop_config: dict[str, Any], started_at: float) -> str:
    """Where this attempt records its start: a job's run only ('' for a search's trials)."""
    command = loop_config.get("command")
    return timings.attempt_location(loop_config["run_dir"], command, started_at) if command else ""


def run_worker(loop_config: dict[str, Any], session: Session) -> dict[str, Any]:
    """One worker's whole run in ``session``'s process; its timing marks, or the user error that ended it."""
    import ray

    marks = {"started_at": time.time()}
    task_class = get_task(loop_config["task"])
    settings: cfg.RunSettings = loop_config["run"]
    set_threads(settings, task_class, session.worker.device)
    try:
        session.check_start()
        task = task_class(loop_config["config"], session.worker)
        task.setup(ray.get(loop_config["data"]))
        run_training(
            task,
            settings,
            session,
            run_dir=loop_config.get("run_dir", ""),
            hooks=loop_config.get("hooks", ()),
            marks=marks,
            attempt_log=attempt_log(loop_config, marks["started_at"]),
        )
    except UserError as e:
        return session.user_error(e)
    return {TIMINGS: marks}


LOOP_CONFIG = "loop_config_ref"  # the key of the loop config's reference in train_loop_config


def train_loop_per_worker(train_loop_config: dict[str, Any]) -> dict[str, Any]:
    """Ray Train entry point: :func:`run_worker` in a Ray Train worker, on the loop config that
    lstm.trainer.make_trainer put in the object store."""
    import ray

    ray_private.quiet_train_reports()
    loop_config = ray.get(train_loop_config[LOOP_CONFIG])
    return run_worker(loop_config, TrainSession(loop_config.get("init_checkpoint")))
