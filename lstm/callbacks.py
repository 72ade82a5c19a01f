"""The Ray Train callbacks of a job's run, in the controller, once per report: every scalar to
``<run_dir>/tensorboard`` and every epoch's metrics to MLflow, live. Apart from
:mod:`lstm.outputs` and :mod:`lstm.tracking` so that the driver checks a run without importing
Ray Train.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from typing import Any, Optional

from ray.train import UserCallback

from lstm import storage, tracking

TENSORBOARD_DIR = "tensorboard"  # in the run folder


def epoch_scalars(metrics: list[dict[str, Any]]) -> Optional[tuple[int, dict[str, float]]]:
    """(epoch, numeric metrics) of an epoch's report; None for any other report."""
    if not metrics or "epoch" not in metrics[0]:
        return None
    values = {k: v for k, v in tracking.numbers(metrics[0]).items() if k not in ("epoch", "epochs")}
    return int(metrics[0]["epoch"]), values


class TensorBoardCallback(UserCallback):
    """Every reported scalar to ``<run_dir>/tensorboard``, written locally and uploaded for a remote run."""

    def __init__(self, run_dir: str):
        self.target = storage.join(run_dir, TENSORBOARD_DIR)
        self._writer = None
        self._local: Optional[str] = None

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        report = epoch_scalars(metrics)
        if report is None:
            return
        epoch, values = report
        from tensorboard.compat.proto import event_pb2, summary_pb2

        scalars = [summary_pb2.Summary.Value(tag=key, simple_value=value) for key, value in values.items()]
        writer = self._open()
        writer.add_event(event_pb2.Event(wall_time=time.time(), step=epoch, summary=summary_pb2.Summary(value=scalars)))
        writer.flush()
        if storage.is_remote(self.target):
            storage.upload_dir(self._local, self.target)

    def _open(self) -> Any:
        """TensorBoard's own event-file writer: tensorboardX's would import torch in the controller."""
        if self._writer is None:
            from tensorboard.summary.writer.event_file_writer import EventFileWriter

            remote = storage.is_remote(self.target)
            self._local = tempfile.mkdtemp(prefix="lstm-tb-") if remote else self.target
            self._writer = EventFileWriter(self._local)
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
