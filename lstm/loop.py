"""The one training loop: ``train_loop_per_worker`` runs on every Ray Train worker.

For every task it does the same things, in this order::

    restore(get_checkpoint())            # model, optimizer, epoch, history -- or start fresh
    for epoch in remaining epochs:
        set the learning rate            # task.learning_rate(config, epoch)
        for batch in this rank's shard:  # task.train_batches / task.train_step
            backward, clip, step         # DDP averages gradients across workers
        evaluate                         # task.evaluate on each split
        all-reduce the sums              # so metrics are global, not rank 0's
        report(metrics, checkpoint)      # every epoch; rank 0 writes the checkpoint

Problems the user can fix (a checkpoint from another vocabulary, a diverging loss) are
reported as a ``user_error`` metric by every rank and the loop returns; the driver turns it
into a one-line :class:`~lstm.errors.UserError` instead of retrying it ``max_failures`` times.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
import torch.distributed as dist
from torch import nn

from lstm import config as cfg
from lstm.errors import UserError
from lstm.io import atomic_torch_save, atomic_write_json
from lstm.progress import Progress
from lstm.task import Task, WorkerInfo, get_task

MODEL_FILE = "model.pt"
OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "state.json"
FAILURE_MARKER = ".injected_failure_done"


# --------------------------------------------------------------------------- helpers


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper (or the model itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def all_reduce_sums(sums: Mapping[str, float], device: torch.device) -> dict[str, float]:
    """Sum each value over all workers (identity with a single process)."""
    keys = sorted(sums)
    if not (dist.is_available() and dist.is_initialized()) or not keys:
        return {k: float(sums[k]) for k in keys}
    t = torch.tensor([float(sums[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return dict(zip(keys, t.tolist()))


def seed_epoch(seed: int, epoch: int, rank: int) -> None:
    """Seed torch per (seed, epoch, rank): an epoch re-run after a resume draws the same
    dropout masks and data order as it did in an uninterrupted run."""
    torch.manual_seed(seed * 1_000_003 + epoch * 1_009 + rank)


def save_checkpoint(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    state: Mapping[str, Any]) -> None:
    """Write model, optimizer and state into ``directory`` (each file atomically)."""
    atomic_torch_save(directory / MODEL_FILE, unwrap(model).state_dict())
    atomic_torch_save(directory / OPTIMIZER_FILE, optimizer.state_dict())
    atomic_write_json(directory / STATE_FILE, state)


def read_checkpoint_state(directory: str | os.PathLike) -> dict[str, Any]:
    """The JSON state (task, config, epoch, history, meta) of a checkpoint folder."""
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        raise UserError(f"{directory} is not an lstm-ray checkpoint (no {STATE_FILE}); pass a checkpoint_* folder of a run")
    return json.loads(path.read_text())


def load_model_state(model: nn.Module, directory: str | os.PathLike) -> None:
    """Load weights, turning a shape/key mismatch into a one-line UserError."""
    state_dict = torch.load(Path(directory) / MODEL_FILE, map_location="cpu", weights_only=True)
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        detail = next((ln.strip() for ln in first[1:] if ln.strip()), first[0] if first else "")
        raise UserError(
            f"checkpoint {directory} does not match this model's architecture ({detail}); "
            "resume with the config it was trained with, or start a new run with another --name"
        ) from None


def _wait_for_reports(timeout_s: float = 30.0) -> None:
    """Block until Ray Train's controller has registered every reported checkpoint. It polls
    the workers every ~2 s, so a crash right after a report (as an injected failure early in
    a short test epoch would be) can lose that report's checkpoint and cost one more epoch;
    a real crash minutes into an epoch cannot. Used only by the fault injection."""
    try:
        import ray.train

        ray.train.get_all_reported_checkpoints(timeout_s=timeout_s)
    except Exception:  # noqa: BLE001 - outside Ray Train, or an older Ray: just crash
        pass


CHECK_EVERY = 50  # steps between looks at a GPU run's non-finite-gradient flag


def _divergence(bad_step: int, epoch: int) -> Optional[str]:
    """The one-line reason a run diverged, or None while every step's gradient was finite."""
    if bad_step < 0:
        return None
    return f"the loss became NaN or infinite at epoch {epoch + 1} step {bad_step}"


def _autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


# --------------------------------------------------------------------------- the loop


def quiet_ray_train_logs() -> None:
    """Ray Train logs every report and checkpoint at INFO with the whole metrics dict; the
    loop prints its own one-line summary per epoch instead."""
    import logging

    import ray.train.v2._internal.execution.context as context_module

    for name in (context_module.__file__, "ray.train.v2._internal.execution.storage"):
        logging.getLogger(name).setLevel(logging.WARNING)


def train_loop_per_worker(loop_config: dict[str, Any]) -> Optional[dict[str, str]]:
    """Ray Train entry point. ``loop_config`` = {"task", "config", "run", "run_dir"} and
    optionally "init_checkpoint": a checkpoint to start from when the run has none of its own."""
    import ray.train
    import ray.train.torch

    quiet_ray_train_logs()
    task = get_task(loop_config["task"])
    config = cfg.build(task.config_class, loop_config["config"])
    settings = cfg.build(cfg.RunSettings, loop_config["run"])
    ctx = ray.train.get_context()
    worker = WorkerInfo(rank=ctx.get_world_rank(), world_size=ctx.get_world_size(),
                        device=ray.train.torch.get_device())
    if worker.device.type == "cpu":
        # The CPUs Ray reserved for this worker, but never more threads than the machine has
        # cores (a test cluster may advertise more CPUs than it has).
        torch.set_num_threads(max(1, min(settings.cpus_per_worker, os.cpu_count() or 1, task.max_threads or 1 << 16)))

    def report(metrics: dict[str, Any], checkpoint: Optional["ray.train.Checkpoint"] = None) -> None:
        ray.train.report(metrics, checkpoint=checkpoint)

    init_checkpoint = loop_config.get("init_checkpoint")

    def get_checkpoint() -> Optional["ray.train.Checkpoint"]:
        own = ray.train.get_checkpoint()
        return own if own is not None or not init_checkpoint else ray.train.Checkpoint(init_checkpoint)

    try:
        run_training(task, config, settings, worker, loop_config.get("run_dir", ""),
                     get_checkpoint=get_checkpoint, report=report)
    except UserError as e:
        # Deterministic user errors hit every rank alike; reporting them (instead of raising)
        # keeps FailureConfig from retrying something a retry cannot fix. Ray Train V2's
        # Result.metrics are those of the latest *checkpoint*, so a metrics-only report is
        # lost there: the error is also returned (Result.return_value is rank 0's return).
        report({"user_error": str(e)})
        return {"user_error": str(e)}
    return None


def run_training(task: Task, config: cfg.TaskConfig, settings: cfg.RunSettings, worker: WorkerInfo,
                 run_dir: str, *, get_checkpoint, report) -> None:
    """The loop body, separated from Ray's context so that its parts stay testable."""
    import ray.train
    import ray.train.torch

    data = task.load_data(config, settings.data_dir or None, worker)
    torch.manual_seed(config.seed)
    raw_model = task.build_model(config, data)

    start_epoch, history, elapsed_before = 0, [], 0.0
    optimizer_state = None
    checkpoint = get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            state = read_checkpoint_state(ckpt_dir)
            if state.get("task") != task.name:
                raise UserError(f"checkpoint {ckpt_dir} is from task {state.get('task')!r}, not {task.name!r}; use another --name")
            task.check_checkpoint(state.get("meta", {}), data)
            load_model_state(raw_model, ckpt_dir)
            optimizer_state = torch.load(Path(ckpt_dir) / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
            start_epoch, history = int(state["epoch"]), list(state.get("history", []))
            elapsed_before = float(state.get("elapsed_s", 0.0))
        if worker.is_chief:
            print(f"[{task.name}] resumed from checkpoint after epoch {start_epoch}", flush=True)

    model = ray.train.torch.prepare_model(raw_model) if worker.world_size > 1 else raw_model.to(worker.device)
    raw_model = unwrap(model)
    optimizer = task.build_optimizer(config, raw_model)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    scaler = torch.amp.GradScaler(worker.device.type) if settings.precision == "fp16" else None
    params = [p for p in raw_model.parameters() if p.requires_grad]
    max_norm = task.max_grad_norm(config)
    n_epochs = task.num_epochs(config)
    n_batches = task.num_train_batches(config, data, worker)
    inject = cfg.failure_spec(settings)
    marker = Path(run_dir) / FAILURE_MARKER if run_dir else None
    run_start = time.perf_counter()

    seen_before = int(history[-1].get("samples_seen", 0)) if history else 0
    if start_epoch >= n_epochs and worker.is_chief:
        print(f"[{task.name}] nothing to do: the run already finished its {n_epochs} epochs", flush=True)
    for epoch in range(start_epoch, n_epochs):
        seed_epoch(config.seed, epoch, worker.rank)
        lr = task.learning_rate(config, epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        model.train()
        sums: dict[str, float] = defaultdict(float)
        samples, state, step_records = 0, None, []
        progress = Progress(n_batches, f"[{task.name}] epoch {epoch + 1}", task.sample_unit,
                            enabled=worker.is_chief)
        epoch_start = time.perf_counter()
        diverged: Optional[str] = None
        sync_free = worker.device.type != "cpu"
        bad_step = torch.full((), -1, dtype=torch.long, device=worker.device)
        for step, batch in enumerate(task.train_batches(config, data, epoch, worker)):
            if inject and (epoch + 1, step) == inject and worker.is_chief and marker and not marker.exists():
                marker.parent.mkdir(parents=True, exist_ok=True)
                marker.write_text("injected\n")
                print(f"[{task.name}] injecting a worker failure at epoch {epoch + 1} step {step}", flush=True)
                _wait_for_reports()
                os._exit(1)
            with _autocast(settings.precision, worker.device):
                out = task.train_step(model, batch, state, config, worker)
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(out.loss).backward()
                scaler.unscale_(optimizer)
            else:
                out.loss.backward()
            # The gradient norm is computed after DDP's all-reduce, so every rank sees the
            # same value: a non-finite norm stops all ranks at the same step, with no extra
            # communication.
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm else math.inf)
            if scaler is not None:
                scaler.step(optimizer)  # skips steps with inf/NaN gradients, as fp16 needs
                scaler.update()
                if scaler.get_scale() < 1e-6:
                    diverged = f"the fp16 loss scale collapsed at epoch {epoch + 1} step {step}"
            elif not sync_free:
                if not torch.isfinite(norm):
                    diverged = f"the loss became {'NaN' if torch.isnan(norm) else 'infinite'} at epoch {epoch + 1} step {step}"
                else:
                    optimizer.step()
            else:
                # On a GPU, reading the norm every step would stall the host on the device:
                # remember the first bad step on the device and look every CHECK_EVERY steps.
                bad_step = torch.where((bad_step < 0) & ~torch.isfinite(norm), step, bad_step)
                optimizer.step()
                if step % CHECK_EVERY == CHECK_EVERY - 1:
                    diverged = _divergence(int(bad_step), epoch)
            if diverged:
                break
            for k, v in out.sums.items():
                sums[k] = sums[k] + (v.detach() if torch.is_tensor(v) else v)
            samples += out.samples
            state = out.state
            progress.update(out.samples)
            record = task.after_step(model, data, config, seen_before + progress.items * worker.world_size, worker)
            if record is not None:
                step_records.append(record)
        if sync_free and not diverged:
            diverged = _divergence(int(bad_step), epoch)
        if diverged:
            raise UserError(f"{diverged}; lower --learning-rate or set a smaller --max-grad-norm")
        sums = {k: float(v) for k, v in sums.items()}  # one device sync per epoch
        train_seconds = time.perf_counter() - epoch_start

        # ------------------------------------------------------------ evaluate + reduce
        all_sums = {f"train:{k}": v for k, v in sums.items()}
        all_sums["train:samples"] = samples
        splits = list(task.eval_splits) + (list(task.final_splits) if epoch == n_epochs - 1 else [])
        eval_start = time.perf_counter()
        raw_model.eval()
        with torch.no_grad(), _autocast(settings.precision, worker.device):
            for split in splits:
                for k, v in task.evaluate(raw_model, data, split, config, worker).items():
                    all_sums[f"{split}:{k}"] = v
        eval_seconds = time.perf_counter() - eval_start
        global_sums = all_reduce_sums(all_sums, worker.device)

        metrics: dict[str, Any] = {"epoch": epoch + 1, "epochs": n_epochs, "lr": lr}
        for split in ["train"] + splits:
            split_sums = {k.split(":", 1)[1]: v for k, v in global_sums.items() if k.startswith(split + ":")}
            metrics.update(task.summarize(split_sums, f"{split}_"))
        metrics[f"{task.sample_unit}_per_sec"] = global_sums["train:samples"] / max(train_seconds, 1e-9)
        seen_before += int(global_sums["train:samples"])
        metrics["samples_seen"] = seen_before
        metrics["train_s"] = train_seconds
        metrics["eval_s"] = eval_seconds
        metrics["elapsed_s"] = elapsed_before + (time.perf_counter() - run_start)
        metrics["workers"] = worker.world_size

        extras = task.epoch_extras(raw_model, data, config, epoch, worker) if worker.is_chief else {}
        history.append({**metrics, **({"extras": extras} if extras else {}),
                        **({"steps": step_records} if step_records else {})})
        if worker.is_chief:
            print(task.format_epoch_line(metrics), flush=True)
            for line in extras.get("print", []):
                print(line, flush=True)

        # ------------------------------------------------------------ checkpoint + report
        with tempfile.TemporaryDirectory(prefix="lstm-ckpt-") as tmp:
            checkpoint = None
            if worker.is_chief:
                save_checkpoint(Path(tmp), model, optimizer, {
                    "task": task.name,
                    "config": cfg.to_dict(config),
                    "epoch": epoch + 1,
                    "elapsed_s": metrics["elapsed_s"],
                    "meta": task.checkpoint_meta(data),
                    "history": history,
                })
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            report({k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool))}, checkpoint)
