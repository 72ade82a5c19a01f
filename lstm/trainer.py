"""``fit()``: build a TorchTrainer for a task and run it. The only place that touches Ray
Train's driver API (TorchTrainer, ScalingConfig, RunConfig, FailureConfig, CheckpointConfig).

Everything a run writes lives in its run folder ``<storage_path>/<name>/``: Ray Train's
``checkpoint_*`` folders, ``results.json`` (config + per-epoch metrics, enough to redraw every
plot), the task's PNGs and TensorBoard event files under ``tensorboard/``.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from lstm import config as cfg
from lstm.errors import UserError
from lstm.io import atomic_write_json
from lstm.loop import read_checkpoint_state, train_loop_per_worker
from lstm.task import Task, get_task

RESULTS_FILE = "results.json"


@dataclass
class RunResult:
    """What a finished run left behind."""

    task: str
    run_dir: str
    metrics: dict[str, Any]  # the last epoch's metrics
    history: list[dict[str, Any]]  # one dict per epoch (plus "extras"/"steps" where the task keeps them)
    checkpoint_path: Optional[str]
    results_path: Optional[str]
    plots: list[str] = field(default_factory=list)


def default_storage_path() -> str:
    """``$LSTM_RAY_STORAGE`` or ``./runs`` (absolute: Ray needs an absolute path or a URI)."""
    return os.path.abspath(os.environ.get("LSTM_RAY_STORAGE") or "runs")


def is_remote(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def ensure_ray(num_cpus: Optional[int] = None) -> None:
    """Connect to a cluster (``RAY_ADDRESS``, or the job's cluster under ``ray job submit``)
    or start a local instance; no-op when Ray is already up."""
    import ray

    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        env = dict(WORKER_ENV)
        if address and "://" not in address and address not in ("auto", "local"):
            # Under `ray job submit` this is the cluster's GCS address. Hand it to the job's
            # actors: Ray Train's placement-group cleaner looks its controller up through the
            # state API, which otherwise guesses "the" cluster and can find another Ray
            # instance on the same machine (or a stale /tmp/ray/ray_current_cluster).
            env["RAY_ADDRESS"] = address
        ray.init(num_cpus=num_cpus if not address else None, runtime_env={"env_vars": env})


# Ray Train V2 patches print() on workers to also go through its logger, which shows every
# progress line twice in the driver's output; the loop's own lines are enough.
WORKER_ENV = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}


def check_multinode_storage(storage_path: str) -> None:
    """Refuse a local storage path on a multi-node cluster: since Ray 2.7 checkpoints are not
    synced to the head node, so they would be scattered over the workers' disks. A folder on
    a network filesystem (NFS, Lustre, ...; mounted at the same path on every node) is shared."""
    import ray

    alive = [n for n in ray.nodes() if n.get("Alive")]
    if (len({n.get("NodeManagerAddress") for n in alive}) > 1 and not is_remote(storage_path)
            and filesystem_type(storage_path) not in SHARED_FILESYSTEMS):
        raise UserError(
            f"storage path {storage_path} is local but this Ray cluster has {len(alive)} nodes; "
            "pass --storage-path s3://bucket/prefix (or a folder on shared storage such as NFS mounted on every node)")


# Filesystem types (as /proc/mounts names them) that every node of a cluster can share.
SHARED_FILESYSTEMS = frozenset({"nfs", "nfs4", "cifs", "smb3", "lustre", "gpfs", "beegfs", "ceph", "glusterfs",
                                "fuse.s3fs", "fuse.gcsfuse", "fuse.juicefs", "fuse.glusterfs", "fuse.ceph"})


def filesystem_type(path: str, mounts_file: str = "/proc/mounts") -> str:
    """The type of the filesystem that holds ``path`` (the longest mount point above it), or
    '' where that cannot be read (not Linux)."""
    try:
        with open(mounts_file) as f:
            mounts = [line.split()[1:3] for line in f if len(line.split()) >= 3]
    except OSError:
        return ""
    real = os.path.realpath(os.path.expanduser(path))
    best, fstype = "", ""
    for mount_point, kind in mounts:
        mount_point = mount_point.replace("\\040", " ")
        inside = real == mount_point or real.startswith(mount_point.rstrip("/") + "/")
        if inside and len(mount_point) >= len(best):
            best, fstype = mount_point, kind
    return fstype


def auto_cpus_per_worker(num_workers: int, use_gpu: bool, nodes: Sequence[dict[str, Any]]) -> int:
    """CPUs per worker when ``--cpus-per-worker`` is 0: a fair share that still fits.

    GPU workers: the fewest CPUs per GPU of any GPU node (so each GPU keeps a worker). CPU
    workers: the cluster's CPUs split evenly over the workers, but no more than the largest
    node has (a worker cannot span nodes). ``nodes`` are ``ray.nodes()`` entries. On a
    2-core machine one worker gets both cores, two workers one each.
    """
    alive = [n for n in nodes if n.get("Alive", True)]
    cpus = [int(n.get("Resources", {}).get("CPU", 0)) for n in alive]
    if use_gpu:
        shares = [int(n["Resources"].get("CPU", 0) // n["Resources"]["GPU"])
                  for n in alive if n.get("Resources", {}).get("GPU")]
        return max(1, min(shares)) if shares else 1
    if not cpus:
        return 1
    return max(1, min(sum(cpus) // max(num_workers, 1), max(cpus)))


def run_dir_of(settings: cfg.RunSettings, task: Task) -> tuple[str, str, str]:
    """(storage_path, name, run_dir) with defaults filled in."""
    storage = settings.storage_path or default_storage_path()
    if not is_remote(storage):
        storage = os.path.abspath(os.path.expanduser(storage))
    name = settings.name or f"{task.name}-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    return storage, name, storage.rstrip("/") + "/" + name


def _has_checkpoints(run_dir: str) -> bool:
    p = Path(run_dir)
    return p.is_dir() and any(c.is_dir() and c.name.startswith("checkpoint") for c in p.iterdir())


def make_trainer(task: Task, config: cfg.TaskConfig, settings: cfg.RunSettings, storage: str, name: str,
                 run_dir: str, callbacks: Sequence[Any] = (), *, init_checkpoint: Optional[str] = None) -> Any:
    """The TorchTrainer for one run (also used by Tune's trial function).

    ``init_checkpoint`` (a checkpoint folder or URI) is where a *new* run starts from, as Tune's
    PopulationBasedTraining needs when it clones another trial's weights; a run that has its
    own checkpoints (a restored run) resumes from those instead.
    """
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    scaling = ray.train.ScalingConfig(
        num_workers=settings.num_workers,
        use_gpu=settings.use_gpu,
        resources_per_worker={"CPU": settings.cpus_per_worker, **({"GPU": 1} if settings.use_gpu else {})},
    )
    run_config = ray.train.RunConfig(
        name=name,
        storage_path=storage,
        failure_config=ray.train.FailureConfig(max_failures=settings.max_failures),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=settings.checkpoints_to_keep),
        callbacks=[*callbacks, *([TensorBoardCallback(run_dir)] if not is_remote(run_dir) else [])],
    )
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"task": task.name, "config": cfg.to_dict(config),
                           "run": cfg.to_dict(settings), "run_dir": run_dir,
                           **({"init_checkpoint": init_checkpoint} if init_checkpoint else {})},
        scaling_config=scaling,
        torch_config=TorchConfig(backend="nccl" if settings.use_gpu else "gloo"),
        run_config=run_config,
    )


def fit(task_name: str, config: cfg.TaskConfig, settings: cfg.RunSettings, *, resume: bool = False,
        callbacks: Sequence[Any] = (), write_outputs: bool = True) -> RunResult:
    """Train ``config`` for task ``task_name`` on Ray Train workers; returns the run's result.

    ``resume=True`` continues the run named ``settings.name`` from its latest checkpoint (Ray
    Train restores a run whose name and storage path already exist). Without it, an existing
    run folder is an error, so a run is never continued by accident.
    """
    task = get_task(task_name)
    config.validate()
    settings.validate()
    storage, name, run_dir = run_dir_of(settings, task)
    if not is_remote(run_dir):
        exists = _has_checkpoints(run_dir)
        if resume and not exists:
            raise UserError(f"--resume: no run to resume at {run_dir}; check --name/--storage-path, or drop --resume to start one")
        if exists and not resume:
            raise UserError(f"a run named {name!r} already exists at {run_dir}; pass --resume to continue it, or choose another --name")
    task.check(config, settings.data_dir or None)
    ensure_ray()
    check_multinode_storage(storage)
    # Ray Train workers run in their own working directory: a relative --data-dir must be
    # made absolute here, where the user meant it.
    data_dir = settings.data_dir
    if data_dir and not is_remote(data_dir):
        data_dir = os.path.abspath(os.path.expanduser(data_dir))
    import ray

    cpus = settings.cpus_per_worker or auto_cpus_per_worker(settings.num_workers, settings.use_gpu, ray.nodes())
    settings = cfg.build(cfg.RunSettings, {**cfg.to_dict(settings), "storage_path": storage, "name": name,
                                           "data_dir": data_dir, "cpus_per_worker": cpus})

    trainer = make_trainer(task, config, settings, storage, name, run_dir, callbacks)
    result = trainer.fit()
    user_error = returned_user_error(result)
    if user_error:
        raise UserError(user_error)
    return collect_outputs(task, config, run_dir, result.checkpoint, write_outputs=write_outputs)


def returned_user_error(result: Any) -> Optional[str]:
    """The one-line UserError a run stopped with, if any: returned by the loop (Ray Train V2
    keeps only the metrics reported with a checkpoint) or, on older Ray, reported as a metric."""
    returned = getattr(result, "return_value", None)
    if isinstance(returned, dict) and returned.get("user_error"):
        return str(returned["user_error"])
    return (result.metrics or {}).get("user_error")


def collect_outputs(task: Task, config: cfg.TaskConfig, run_dir: str, checkpoint: Any,
                    *, write_outputs: bool = True) -> RunResult:
    """Read the history from the final checkpoint; write results.json and the plots."""
    if checkpoint is None:
        raise UserError(f"the run at {run_dir} reported no checkpoint; see the worker logs above")
    with checkpoint.as_directory() as ckpt_dir:
        state = read_checkpoint_state(ckpt_dir)
    history = state.get("history", [])
    results = {
        "task": task.name,
        "config": state.get("config", cfg.to_dict(config)),
        "run_dir": run_dir,
        "checkpoint": checkpoint.path,
        "epochs": history,
        "final": history[-1] if history else {},
        "wall_time_s": history[-1].get("elapsed_s") if history else None,
    }
    results_path, plots = None, []
    if write_outputs:
        out = Path(run_dir) if not is_remote(run_dir) else Path(_local_mirror(run_dir))
        results_path = str(atomic_write_json(out / RESULTS_FILE, results))
        plots = [str(p) for p in task.plot(results, out)]
        if is_remote(run_dir):
            _upload(out, run_dir)
    return RunResult(task=task.name, run_dir=run_dir, metrics=history[-1] if history else {},
                     history=history, checkpoint_path=checkpoint.path, results_path=results_path, plots=plots)


def _local_mirror(run_dir: str) -> str:
    import tempfile

    return tempfile.mkdtemp(prefix="lstm-ray-outputs-")


def _upload(local_dir: Path, run_dir: str) -> None:
    import pyarrow.fs

    fs, path = pyarrow.fs.FileSystem.from_uri(run_dir)
    pyarrow.fs.copy_files(str(local_dir), path, destination_filesystem=fs)
    shutil.rmtree(local_dir, ignore_errors=True)


def load_results(run_dir: str | os.PathLike) -> dict[str, Any]:
    """Read a run's results.json."""
    path = Path(run_dir) / RESULTS_FILE
    if not path.is_file():
        raise UserError(f"{path} does not exist; pass the folder of a finished run")
    return json.loads(path.read_text())


def latest_checkpoint_dir(run_dir: str | os.PathLike) -> Path:
    """The newest complete checkpoint folder of a local run (by its epoch)."""
    run = Path(run_dir)
    if (run / "state.json").is_file():  # already a checkpoint folder
        return run
    candidates = []
    for c in run.glob("checkpoint*"):
        try:
            candidates.append((read_checkpoint_state(c)["epoch"], c.stat().st_mtime, c))
        except (UserError, KeyError, json.JSONDecodeError):
            continue
    if not candidates:
        raise UserError(f"no checkpoint found under {run}; pass a run folder or one of its checkpoint_* folders")
    return max(candidates)[2]


# --------------------------------------------------------------------------- callbacks

try:  # the callback base class lives in Ray Train V2
    from ray.train import UserCallback as _UserCallback
except ImportError:  # pragma: no cover - older Ray
    _UserCallback = object  # type: ignore[assignment,misc]


class TensorBoardCallback(_UserCallback):  # type: ignore[misc,valid-type]
    """Writes every reported scalar to ``<run_dir>/tensorboard`` as it arrives (runs in the
    Ray Train controller, so TensorBoard shows a run live)."""

    def __init__(self, run_dir: str):
        self.log_dir = os.path.join(run_dir, "tensorboard")
        self._writer = None

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        if not metrics:
            return
        m = metrics[0]
        if "epoch" not in m:
            return
        try:
            from tensorboardX import SummaryWriter
        except ImportError:  # pragma: no cover
            return
        if self._writer is None:
            self._writer = SummaryWriter(self.log_dir)
        for k, v in m.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("epoch", "epochs"):
                self._writer.add_scalar(k, v, global_step=int(m["epoch"]))
        self._writer.flush()
