"""The Ray Train callbacks of a job's run. Both run in the Ray Train controller, once per
report, so a run's TensorBoard and MLflow views fill in live:

* :class:`TensorBoardCallback` -- every reported scalar to ``<run_dir>/tensorboard``;
* :class:`MetricsCallback` -- every epoch's numeric metrics to the job's MLflow run.

They live apart from :mod:`lstm.outputs` and :mod:`lstm.tracking` so that a job's driver can
check its run without importing Ray Train (:mod:`lstm.plan` imports it while Ray starts).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from typing import Any, Optional

from ray.train import UserCallback

from lstm import storage, tracking
from lstm.outputs import TENSORBOARD_DIR


def epoch_scalars(metrics: list[dict[str, Any]]) -> Optional[tuple[int, dict[str, float]]]:
    """(epoch, numeric metrics) of an epoch's report; None for any other report."""
    if not metrics or "epoch" not in metrics[0]:
        return None
    values = {k: v for k, v in tracking.numbers(metrics[0]).items() if k not in ("epoch", "epochs")}
    return int(metrics[0]["epoch"]), values


class TensorBoardCallback(UserCallback):
    """Writes every reported scalar to ``<run_dir>/tensorboard`` as it arrives; for a remote
    run folder it writes locally and uploads the events file after each report."""

    def __init__(self, run_dir: str):
        self.target = storage.join(run_dir, TENSORBOARD_DIR)
        self._writer = None
        self._local: Optional[str] = None

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        report = epoch_scalars(metrics)
        if report is None:
            return
        epoch, values = report
        writer = self._open()
        for key, value in values.items():
            writer.add_scalar(key, value, global_step=epoch)
        writer.flush()
        if storage.is_remote(self.target):
            storage.upload_dir(self._local, self.target)

    def _open(self) -> Any:
        if self._writer is None:
            from tensorboardX import SummaryWriter

            remote = storage.is_remote(self.target)
            self._local = tempfile.mkdtemp(prefix="lstm-tb-") if remote else self.target
            self._writer = SummaryWriter(self._local)
        return self._writer

    def __del__(self) -> None:
        if self._local and storage.is_remote(self.target):
            shutil.rmtree(self._local, ignore_errors=True)


class MetricsCallback(UserCallback):
    """Logs every epoch's numeric metrics to an MLflow run (step = epoch)."""

    def __init__(self, uri: str, run_id: str):
        self.uri, self.run_id = uri, run_id

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        report = epoch_scalars(metrics)
        if report is None:
            return
        from mlflow.entities import Metric

        epoch, values = report
        now = int(time.time() * 1000)
        tracking.client(self.uri).log_batch(self.run_id, metrics=[Metric(k, v, now, epoch) for k, v in values.items()])
