"""The plug-in interface of a task, and the registry of tasks.

A task says what differs between workloads -- data, model, loss, metrics, samples, plots --
and nothing about Ray, DDP, checkpoints or reporting, which :mod:`lstm.loop` does once for all.

Contract the loop relies on:

* ``train_batches`` yields the **same number of batches on every rank** (DDP all-reduces
  gradients in lock-step), drawn from that rank's own shard.
* ``train_step`` returns the loss to back-propagate plus *sums* (e.g. summed loss and token
  count); the loop adds the sums over steps and over workers, and ``summarize`` turns global
  sums into metrics, so reported metrics are global, not rank 0's.
* everything a task returns for history (``epoch_extras``, ``on_step``) is JSON-able, so a
  ``results.json`` is enough to redraw every plot.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Iterable, Mapping, Optional

import torch
from torch import nn

from lstm.config import TaskConfig


@dataclass
class StepOutput:
    """What one training step hands back to the loop."""

    loss: torch.Tensor  # scalar to call backward() on
    # Additive statistics, e.g. {"loss_sum": ..., "tokens": ...}. A value may be a detached
    # scalar tensor: the loop sums those on the device, so a GPU step needs no host sync.
    sums: dict[str, float | torch.Tensor]
    samples: int  # units processed (words, chars, shapes) -- for samples/sec
    state: Any = None  # carried to the next step (e.g. LSTM hidden state for truncated BPTT)


@dataclass
class WorkerInfo:
    """Where a task's code runs: rank/world for sharding, device for tensors."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_chief(self) -> bool:
        return self.rank == 0


class Task(ABC):
    """Base class of a task. Subclasses set the class attributes and implement the abstract
    methods; the defaults of the others fit most tasks."""

    name: ClassVar[str]
    config_class: ClassVar[type[TaskConfig]]
    presets: ClassVar[Mapping[str, Mapping[str, Any]]] = {}
    default_preset: ClassVar[Optional[str]] = None
    sample_unit: ClassVar[str] = "samples"  # "words", "chars", "shapes": used in "<unit>/sec"
    eval_splits: ClassVar[tuple[str, ...]] = ("valid",)  # evaluated every epoch
    final_splits: ClassVar[tuple[str, ...]] = ()  # evaluated once, after the last epoch
    primary_metric: ClassVar[str] = "valid_loss"  # what a search minimises
    # Most intra-op threads a CPU worker uses (None: all its CPUs). A model too small to
    # split over threads runs faster on one.
    max_threads: ClassVar[Optional[int]] = None
    metric_mode: ClassVar[str] = "min"

    # ---------------------------------------------------------------- driver side
    def check(self, config: TaskConfig, data_dir: Optional[str]) -> None:
        """Fail fast on the driver (before any worker starts) for bad data or config."""

    def plot(self, results: Mapping[str, Any], out_dir: Path) -> list[Path]:
        """Draw PNGs from a results dict (the content of results.json). Returns their paths."""
        return []

    # ---------------------------------------------------------------- worker side
    @abstractmethod
    def load_data(self, config: TaskConfig, data_dir: Optional[str], worker: WorkerInfo) -> Any:
        """Load (or generate) this rank's data."""

    @abstractmethod
    def build_model(self, config: TaskConfig, data: Any) -> nn.Module:
        """A fresh model. The loop seeds torch before calling this, so all ranks agree."""

    def build_optimizer(self, config: TaskConfig, model: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.Adam(model.parameters(), lr=self.learning_rate(config, 0))

    @abstractmethod
    def num_epochs(self, config: TaskConfig) -> int:
        """How many epochs a run has."""

    def learning_rate(self, config: TaskConfig, epoch: int) -> float:
        """Learning rate of 0-based ``epoch``; the loop sets it on the optimizer."""
        return float(getattr(config, "learning_rate"))

    def max_grad_norm(self, config: TaskConfig) -> Optional[float]:
        """Clip gradients to this global norm (None: no clipping)."""
        return getattr(config, "max_grad_norm", None)

    @abstractmethod
    def train_batches(self, config: TaskConfig, data: Any, epoch: int, worker: WorkerInfo) -> Iterable[Any]:
        """This rank's batches for one epoch; the same count on every rank."""

    def num_train_batches(self, config: TaskConfig, data: Any, worker: WorkerInfo) -> Optional[int]:
        """Batches per epoch, for the progress bar (None if unknown)."""
        return None

    @abstractmethod
    def train_step(self, model: nn.Module, batch: Any, state: Any, config: TaskConfig,
                   worker: WorkerInfo) -> StepOutput:
        """Forward one batch; return the loss to back-propagate and additive sums."""

    def after_step(self, model: nn.Module, data: Any, config: TaskConfig, examples_seen: int,
                   worker: WorkerInfo) -> Optional[dict[str, Any]]:
        """Called on every rank after each optimizer step with the global count of training
        examples so far; return a JSON-able record to keep in the history (rank 0's is kept)."""
        return None

    @abstractmethod
    def evaluate(self, model: nn.Module, data: Any, split: str, config: TaskConfig,
                 worker: WorkerInfo) -> dict[str, float]:
        """Sums over this rank's share of ``split`` (no gradients)."""

    @abstractmethod
    def summarize(self, sums: Mapping[str, float], prefix: str) -> dict[str, float]:
        """Metrics from global sums; keys start with ``prefix`` ("train_", "valid_", ...)."""

    def epoch_extras(self, model: nn.Module, data: Any, config: TaskConfig, epoch: int,
                     worker: WorkerInfo) -> dict[str, Any]:
        """Rank 0 only: JSON-able things to show and keep for this epoch (text samples...)."""
        return {}

    def checkpoint_meta(self, data: Any) -> dict[str, Any]:
        """JSON-able facts a checkpoint must carry to be usable alone (e.g. the vocabulary)."""
        return {}

    def check_checkpoint(self, meta: Mapping[str, Any], data: Any) -> None:
        """Raise UserError if a checkpoint's meta does not fit this data (another vocabulary)."""

    def format_epoch_line(self, metrics: Mapping[str, Any]) -> str:
        """One progress line per epoch; tasks may override to lead with their metric."""
        parts = [f"epoch {metrics['epoch']:>3}/{metrics['epochs']}"]
        for key in ("lr",):
            if key in metrics:
                parts.append(f"lr {metrics[key]:.4g}")
        for key, value in metrics.items():
            if key.startswith(("train_", "valid_", "test_")) and isinstance(value, (int, float)):
                parts.append(f"{key} {value:.4f}" if abs(value) < 1e4 else f"{key} {value:.4g}")
        unit = self.sample_unit
        parts.append(f"{unit}/sec {metrics.get(f'{unit}_per_sec', 0):,.0f}")
        parts.append(f"elapsed {metrics.get('elapsed_s', 0):.1f}s")
        return " | ".join(parts)


def perplexity(loss_sum: float, count: float) -> float:
    """exp(mean loss), guarded against overflow."""
    mean = loss_sum / max(count, 1.0)
    return math.exp(mean) if mean < 700 else float("inf")


# --------------------------------------------------------------------------- registry

_TASKS: dict[str, type[Task]] = {}


def register(cls: type[Task]) -> type[Task]:
    """Class decorator: make a task available by name to the loop, the jobs and Tune."""
    _TASKS[cls.name] = cls
    return cls


def get_task(name: str) -> Task:
    """The task called ``name`` (importing the built-in tasks on first use)."""
    import lstm.tasks  # noqa: F401  (registers the built-in tasks)

    if name not in _TASKS:
        from lstm.errors import UserError

        raise UserError(f"unknown task {name!r}; choose one of: {', '.join(sorted(_TASKS))}")
    return _TASKS[name]()


def task_names() -> list[str]:
    import lstm.tasks  # noqa: F401

    return sorted(_TASKS)
