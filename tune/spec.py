"""The search spec: everything a search needs, saved as ``search_spec.json`` in its folder so
that ``--resume`` and ``python -m tune.report`` can rebuild it, and the trials' configs."""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from typing import Any, Optional

from lstm import config as cfg
from lstm import storage
from lstm.errors import UserError
from lstm.task import Task, get_task
from tune.space import SearchSpace

SPEC_FILE = "search_spec.json"
TRAIN_RUNS = "train_runs"


def trial_folder_name(trial_id: str) -> str:
    """A trial's folder in its search: short (Tune's default spells out every hyperparameter)."""
    return f"trial_{trial_id}"


def train_run_name(trial_id: str, start_path: Optional[str] = None) -> str:
    """The Ray Train run of a trial of several workers; one that starts from a Tune checkpoint
    at ``start_path`` (PBT's clone, or a restore) starts a new run named after it."""
    if start_path is None:
        return f"trial-{trial_id}"
    return f"trial-{trial_id}-from-{hashlib.sha1(start_path.encode()).hexdigest()[:8]}"


def is_train_run_of(run: str, trial_id: str) -> bool:
    """Whether the Train run folder ``run`` is one of the trial's (:func:`train_run_name`)."""
    return run == train_run_name(trial_id) or run.startswith(f"{train_run_name(trial_id)}-from-")


@dataclass(frozen=True)
class SearchSpec:
    """A search, JSON-able."""

    task: str
    base: Optional[str]  # the preset trials start from
    base_values: dict[str, Any]  # the preset plus --max-epochs/--train-fraction: a trial's defaults
    preset_values: dict[str, Any]  # the preset alone: best_config.json is built on it
    space: SearchSpace
    storage_path: str  # absolute path or URI (query options included)
    name: str
    scheduler: str = "asha"
    search_alg: str = "random"  # tune.searchers: random (grids included) or tpe
    num_samples: int = 8
    max_epochs: int = 1  # epochs per trial
    time_budget_s: Optional[float] = None
    max_concurrent: Optional[int] = None  # None: as many as fit (tune.runner.check_resources)
    workers_per_trial: int = 1
    use_gpu: bool = False
    gpus_per_worker: float = 1.0
    cpus_per_worker: int = 1
    data_dir: str = ""
    seed: int = 0
    grace_period: int = 1
    reduction_factor: float = 2.0
    perturbation_interval: int = 1
    synch: bool = False  # PBT: synchronous (every trial reaches the interval before any exploits)
    max_failures: int = 3  # retries of a failed trial (Tune's for one worker, Ray Train's for more)
    budget: dict[str, Any] = field(default_factory=dict)  # {field: value} set by the budget flags
    mlflow_tracking_uri: str = ""

    @property
    def experiment_dir(self) -> str:
        return storage.join(self.storage_path, self.name)

    @property
    def train_runs_dir(self) -> str:
        return storage.join(self.experiment_dir, TRAIN_RUNS)

    def trial_dir(self, trial_id: str) -> str:
        """Tune's folder of a trial."""
        return storage.join(self.experiment_dir, trial_folder_name(trial_id))

    @property
    def task_class(self) -> type[Task]:
        return get_task(self.task)

    @property
    def metric(self) -> str:
        return self.task_class.search.metric

    @property
    def mode(self) -> str:
        return self.task_class.search.mode

    @property
    def num_trials(self) -> int:
        return self.num_samples * self.space.num_grid_points()

    def trial_config(self, hparams: dict[str, Any]) -> cfg.TaskConfig:
        """A trial's config: the base, the pinned values, the trial's sampled values."""
        return cfg.build(self.task_class.config_class, {**self.base_values, **self.space.fixed, **hparams})

    def best_config(self, hparams: dict[str, Any]) -> cfg.TaskConfig:
        """The config a job should train: the preset (its own epochs and data, not the search's
        budget) with the pinned and the trial's values."""
        return cfg.build(self.task_class.config_class, {**self.preset_values, **self.space.fixed, **hparams})

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


def save_spec(spec: SearchSpec) -> None:
    storage.write_json(storage.join(spec.experiment_dir, SPEC_FILE), spec.to_dict())


def load_spec(experiment_dir: str) -> SearchSpec:
    """The spec a search was started with; its folder may have moved since."""
    try:
        saved = storage.read_json(storage.join(experiment_dir, SPEC_FILE))
    except FileNotFoundError:
        raise UserError(
            f"no search at {storage.display(experiment_dir)} (no {SPEC_FILE}); check --name and --storage-path"
        ) from None
    root, name = storage.parent_and_name(experiment_dir)
    return dataclasses.replace(SearchSpec.from_dict(saved), storage_path=root, name=name)
