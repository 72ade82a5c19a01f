"""Where a run's loop is running, as the loop sees it: rank, world size, device, the checkpoint
to start from, and where each epoch's metrics and checkpoint go.

:class:`TrainSession` is a Ray Train worker: a user error is reported and returned, not
raised, so that Ray Train's ``FailureConfig`` does not retry what a retry cannot fix.
:class:`TuneSession` is a one-worker trial's own process (Tune's function-trainable idiom): a
user error is raised, so the trial ends ERROR with its line, and left in the trial's folder,
so that Tune's retry raises it again at once instead of training.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Optional

import torch

from lstm import ray_private, storage
from lstm.errors import UserError
from lstm.task import WorkerInfo

USER_ERROR = "user_error"  # the metric (and return value) that carries a one-line UserError
USER_ERROR_FILE = "user_error.txt"  # a Tune trial's one-line error, read back by its retries


class Session(ABC):
    """The loop's view of the process it runs in."""

    worker: WorkerInfo

    @abstractmethod
    def get_checkpoint(self) -> Any:
        """The ``Checkpoint`` to start from (the run's own latest, or where a new run starts), or None."""

    @abstractmethod
    def report(self, metrics: dict[str, Any], checkpoint_dir: Optional[str]) -> None:
        """Report one epoch's metrics; rank 0 passes the folder of its checkpoint."""

    @abstractmethod
    def user_error(self, error: UserError) -> dict[str, Any]:
        """End the run on a user error: return what the loop returns, or raise."""

    def check_start(self) -> None:  # noqa: B027 - an optional hook: a Train run has nothing to check
        """Raise the user error a previous attempt of this run ended with, if it left one."""


class TrainSession(Session):
    """A Ray Train worker; ``init_checkpoint``: where a run with none of its own starts (PBT's clone)."""

    def __init__(self, init_checkpoint: Any = None):
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.worker = WorkerInfo(
            rank=ctx.get_world_rank(), world_size=ctx.get_world_size(), device=ray.train.torch.get_device()
        )
        self.init_checkpoint = init_checkpoint

    def get_checkpoint(self) -> Any:
        import ray.train

        own = ray.train.get_checkpoint()
        return own if own is not None else self.init_checkpoint

    def report(self, metrics: dict[str, Any], checkpoint_dir: Optional[str]) -> None:
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint)

    def user_error(self, error: UserError) -> dict[str, Any]:
        # Ray Train V2 keeps only the metrics reported with a checkpoint, so the error is also
        # returned (the driver reads rank 0's return value).
        import ray.train

        ray.train.report({USER_ERROR: str(error)})
        return {USER_ERROR: str(error)}


class TuneSession(Session):
    """Tune's trial process as the only worker of its run; ``trial_dir``: the trial's folder."""

    def __init__(self, trial_dir: str) -> None:
        import ray

        ray_private.quiet_train_reports()
        gpu = bool(ray.get_gpu_ids()) and torch.cuda.is_available()
        self.worker = WorkerInfo(rank=0, world_size=1, device=torch.device("cuda", 0) if gpu else torch.device("cpu"))
        self.trial_dir = trial_dir

    def get_checkpoint(self) -> Any:
        from ray import tune

        return tune.get_checkpoint()

    def report(self, metrics: dict[str, Any], checkpoint_dir: Optional[str]) -> None:
        from ray import tune

        checkpoint = tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        tune.report(metrics, checkpoint=checkpoint)

    def _error_file(self) -> str:
        return storage.join(self.trial_dir, USER_ERROR_FILE)

    def user_error(self, error: UserError) -> dict[str, Any]:
        storage.write_text(self._error_file(), str(error) + "\n")
        raise error

    def check_start(self) -> None:
        try:
            line = storage.read_bytes(self._error_file()).decode("utf-8").strip()
        except FileNotFoundError:
            return
        raise UserError(line)
