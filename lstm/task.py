"""The contract between a task and the loop that trains it, and the registry of tasks.

A task says what differs between workloads (data, model, loss, metrics) and nothing of Ray,
DDP, devices, checkpoints or reporting, which :mod:`lstm.loop` does once. Its class methods
run once on the driver (``read_data``'s result reaches the workers through the object store);
an instance per worker runs the rest, always on the task's own model, never a DDP wrapper
(``train_step`` runs inside DDP's forward: :class:`lstm.step.StepModule`). Beside the hooks a
task names how a search explores it (:class:`Search`) and how its runs are shown (:class:`Display`).

The loop relies on: the same number of ``train_batches`` on every rank (DDP's lock-step);
*sums* from ``train_step`` and ``evaluate``, which it adds over steps and workers, so metrics
are global; JSON-able history (``epoch_extras``, ``after_step``), so results.json redraws
every plot.
"""

from __future__ import annotations

import contextlib
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Mapping, Optional

import torch
from torch import nn

from lstm.config import TaskConfig
from lstm.errors import UserError


@dataclass
class StepOutput:
    """What one training step hands back to the loop."""

    loss: torch.Tensor  # scalar to call backward() on
    # Additive statistics ({"loss_sum": ..., "words": ...}); a detached scalar tensor is summed
    # on the device, so a GPU step needs no host sync.
    sums: dict[str, float | torch.Tensor]
    samples: int  # units processed (words, chars, shapes): for samples/sec
    mean_loss: torch.Tensor  # detached loss per unit, compared with Task.loss_limit
    state: Any = None  # carried to the next step (e.g. the LSTM state of truncated BPTT)
    lr_scale: float = 1.0  # this step's learning rate relative to the epoch's (variable-length BPTT)


@dataclass(frozen=True)
class WorkerInfo:
    """Where a task's code runs: rank/world for sharding, device for tensors."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_chief(self) -> bool:
        return self.rank == 0


@dataclass(frozen=True)
class Search:
    """How a search (tune/) explores a task."""

    epochs_field: str  # the config field that sets a run's epochs (what --max-epochs sets)
    metric: str  # what a search minimises (or maximises, with mode "max")
    mode: str = "min"
    space: Mapping[str, str] = field(default_factory=dict)  # default --space entries, NAME -> SPEC
    pbt_mutations: tuple[str, ...] = ()  # fields PopulationBasedTraining perturbs


def no_plots(results: Mapping[str, Any], out_dir: Path) -> list[Path]:
    return []


@dataclass(frozen=True)
class Display:
    """How a task's runs are shown: a progress line per epoch (rank 0), PNGs of a finished run (driver)."""

    epoch_line: Callable[[Mapping[str, Any]], str]  # one epoch's metrics -> one line
    plot: Callable[[Mapping[str, Any], Path], list[Path]] = no_plots  # results.json's content, folder -> PNGs


class Task(ABC):
    """Base class of a task: set the class attributes (``search``, ``display`` too), implement the abstract methods."""

    name: ClassVar[str]
    config_class: ClassVar[type[TaskConfig]]
    presets: ClassVar[Mapping[str, Mapping[str, Any]]] = {}
    default_preset: ClassVar[Optional[str]] = None
    sample_unit: ClassVar[str] = "samples"  # "words", "windows", "shapes": used in "<unit>/sec"
    eval_splits: ClassVar[tuple[str, ...]] = ("valid",)  # evaluated every epoch
    final_splits: ClassVar[tuple[str, ...]] = ()  # evaluated once, after the last epoch
    # Most intra-op threads a CPU worker uses (None: all its CPUs); a tiny model runs faster on one.
    max_threads: ClassVar[Optional[int]] = None

    search: ClassVar[Search]
    display: ClassVar[Display]

    def __init__(self, config: TaskConfig, worker: WorkerInfo = WorkerInfo()):
        self.config = config
        self.worker = worker

    # ------------------------------------------------------------------ driver side
    @classmethod
    def read_data(cls, config: TaskConfig, data_dir: Optional[str]) -> Any:
        """Read (or download) the data once, on the driver; it travels by the object store: arrays, plain values."""
        return None

    @classmethod  # noqa: B027 - an optional hook: most tasks have nothing to check
    def check(cls, config: TaskConfig, data: Any, num_workers: int) -> None:
        """UserError if ``config`` cannot train on ``data`` with ``num_workers`` workers."""

    @classmethod
    def num_epochs(cls, config: TaskConfig) -> int:
        return int(getattr(config, cls.search.epochs_field))

    # ------------------------------------------------------------------ worker side
    @abstractmethod
    def setup(self, data: Any) -> None:
        """Take this rank's share of what :meth:`read_data` returned."""

    @abstractmethod
    def build_model(self) -> nn.Module:
        """A fresh model (on the CPU). The loop seeds torch first, so all ranks agree."""

    def build_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.Adam(model.parameters(), lr=self.learning_rate(0))

    def learning_rate(self, epoch: int) -> float:
        """Learning rate of 0-based ``epoch``; the loop sets it on the optimizer."""
        return float(self.config.learning_rate)

    def max_grad_norm(self) -> Optional[float]:
        """Clip gradients to this global norm (None: no clipping)."""
        return getattr(self.config, "max_grad_norm", None)

    @abstractmethod
    def loss_limit(self) -> float:
        """A per-unit training loss no training model reaches: above it, the run diverged."""

    @abstractmethod
    def train_batches(self, epoch: int) -> Iterable[Any]:
        """This rank's batches for one epoch; the same count on every rank."""

    def num_train_batches(self) -> Optional[int]:
        """Batches per epoch, for the progress line (None if unknown)."""
        return None

    @abstractmethod
    def train_step(self, model: nn.Module, batch: Any, state: Any) -> StepOutput:
        """Forward one batch; return the loss to back-propagate and additive sums."""

    def static_step(self) -> bool:
        """True when every step has the same shapes and ``lr_scale`` 1, so a GPU run may capture it."""
        return False

    def after_step(self, model: nn.Module, examples_seen: int) -> Optional[dict[str, Any]]:
        """After each step, with the global count of examples so far: a JSON-able record to keep, or None."""
        return None

    @abstractmethod
    def evaluate(self, model: nn.Module, split: str) -> dict[str, float]:
        """Sums over this rank's share of ``split`` (called under ``torch.no_grad``)."""

    def evaluation_weights(
        self, model: nn.Module, optimizer: torch.optim.Optimizer
    ) -> contextlib.AbstractContextManager:
        """The weights :meth:`evaluate` runs under (e.g. an averaging optimizer's); the model's own by default."""
        return contextlib.nullcontext()

    def after_evaluation(self, optimizer: torch.optim.Optimizer, metrics: Mapping[str, Any]) -> dict[str, Any]:
        """On every rank, with the epoch's global metrics, before the checkpoint: metrics to add (NT-ASGD's switch)."""
        return {}

    @staticmethod
    @abstractmethod
    def summarize(sums: Mapping[str, float], prefix: str) -> dict[str, float]:
        """Metrics from global sums; keys start with ``prefix`` ("train_", "valid_", ...)."""

    def epoch_extras(self, model: nn.Module, epoch: int) -> dict[str, Any]:
        """Rank 0: JSON-able things to keep for this epoch; a list of strings under "print" is printed."""
        return {}

    def checkpoint_meta(self) -> dict[str, Any]:
        """JSON-able facts a checkpoint must carry to be usable alone (e.g. the vocabulary)."""
        return {}

    def check_checkpoint(self, meta: Mapping[str, Any]) -> None:  # noqa: B027 - an optional hook
        """UserError if a checkpoint's meta does not fit this data (another vocabulary)."""


def perplexity(loss_sum: float, count: float) -> float:
    """exp(mean loss), guarded against overflow."""
    mean = loss_sum / max(count, 1.0)
    return math.exp(mean) if mean < 700 else float("inf")


# --------------------------------------------------------------------------- registry

_TASKS: dict[str, type[Task]] = {}


def register(cls: type[Task]) -> type[Task]:
    """Class decorator: make a task available by name to the loop, the jobs and Tune."""
    missing = [a for a in ("name", "config_class", "search", "display") if not hasattr(cls, a)]
    if missing:
        raise TypeError(f"task {cls.__name__} does not set {', '.join(missing)}")
    _TASKS[cls.name] = cls
    return cls


def get_task(name: str) -> type[Task]:
    """The task class called ``name`` (importing the built-in tasks on first use)."""
    import lstm.tasks  # the registry's lazy import

    lstm.tasks.register_builtin()
    if name not in _TASKS:
        raise UserError(f"unknown task {name!r}; choose one of: {', '.join(sorted(_TASKS))}")
    return _TASKS[name]


def task_names() -> list[str]:
    import lstm.tasks

    lstm.tasks.register_builtin()
    return sorted(_TASKS)
