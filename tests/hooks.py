"""Worker hooks for tests (lstm.loop.WorkerHook): they travel to the Ray Train workers by
value (conftest registers this module with Ray's cloudpickle), so the library carries no
test-only code in its loop."""

from __future__ import annotations

import os
import time
from pathlib import Path

from lstm.loop import WorkerHook
from lstm.task import WorkerInfo


def wait_for_reports() -> None:
    """Block until Ray Train's controller has registered every checkpoint this worker reported:
    it polls the workers, so a crash right after a report could lose that report's checkpoint
    and cost one more epoch (a real crash minutes into an epoch cannot). No time limit: the call
    returns once the controller has processed the reports (within its next poll, 0.5 s in the
    suite). A Tune trial's own process (a one-worker trial), which is no Ray Train worker (Ray
    Train says so), persists each report as it makes it: nothing to wait for."""
    import ray.train

    try:
        ray.train.get_all_reported_checkpoints()
    except RuntimeError as e:
        if "outside of a Ray Train training function" not in str(e):
            raise


class ExitOnce(WorkerHook):
    """Rank 0 exits abruptly (``os._exit``) before step ``step`` of ``epoch``, on the first
    attempt only: a marker file in the run folder remembers that it happened."""

    def __init__(self, epoch: int, step: int):
        self.epoch, self.step = epoch, step

    def on_step(self, epoch: int, step: int, worker: WorkerInfo, run_dir: str) -> None:
        marker = Path(run_dir) / ".exited"
        if (epoch, step) != (self.epoch, self.step) or not worker.is_chief or marker.exists():
            return
        marker.write_text("exited\n")
        print(f"[test] worker exits at epoch {epoch} step {step}", flush=True)
        wait_for_reports()
        os._exit(1)


def node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


class RecordNode(WorkerHook):
    """Each rank writes the id of its node to ``<run_dir>/.node-<rank>`` before its first step."""

    def on_step(self, epoch: int, step: int, worker: WorkerInfo, run_dir: str) -> None:
        if (epoch, step) == (1, 0):
            (Path(run_dir) / f".node-{worker.rank}").write_text(node_id())


class PauseOnce(WorkerHook):
    """Rank ``rank`` writes "<pid> <node id>" to ``<marker>.ready`` before step ``step`` of
    ``epoch`` and waits there until the test removes its node (the test watches for the
    file), on the first attempt only. The limit only ends a run whose test failed before removing
    the node (the test removes it as soon as the file is there)."""

    def __init__(self, epoch: int, step: int, marker: str, rank: int = 1, timeout_s: float = 300.0):
        self.epoch, self.step, self.marker, self.rank, self.timeout_s = epoch, step, marker, rank, timeout_s

    def on_step(self, epoch: int, step: int, worker: WorkerInfo, run_dir: str) -> None:
        ready = Path(self.marker + ".ready")
        if (epoch, step) != (self.epoch, self.step) or worker.rank != self.rank or ready.exists():
            return
        wait_for_reports()
        ready.write_text(f"{os.getpid()} {node_id()}\n")
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:  # the node goes away under us
            time.sleep(0.2)
        raise RuntimeError(f"the test did not remove this worker's node within {self.timeout_s:.0f}s")


def controller_imports_recorder(path: str) -> object:
    """A Ray Train callback that writes, at the run's first report, whether the controller's
    process has imported torch: {"torch": bool} as JSON at ``path``."""
    import ray.train

    class RecordControllerImports(ray.train.UserCallback):
        def after_report(self, run_context: object, metrics: list, checkpoint: object) -> None:
            import json
            import sys

            if not os.path.exists(path):
                Path(path).write_text(json.dumps({"torch": "torch" in sys.modules}))

    return RecordControllerImports()
