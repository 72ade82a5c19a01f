"""The search's TensorBoard in ``<search folder>/tensorboard``, written live by its driver:
HParams (a row per trial, the searched values against the best and final metric) and the
``Search/<metric>`` and ``Search/best_<metric>`` cards, whose capitalised group sorts before
Tune's and the Train runs' own tags. On remote storage each trial's folder is written locally
and uploaded after each result. TensorBoard's own protocol buffers; no TensorFlow needed.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

from ray.tune import Callback

from lstm import storage
from tune.space import Param
from tune.spec import SearchSpec

BOARD_DIR = "tensorboard"
GROUP = "Search"


def metric_tags(metric: str) -> tuple[str, str]:
    """(the per-epoch tag, the best-so-far tag) of ``metric``."""
    return f"{GROUP}/{metric}", f"{GROUP}/best_{metric}"


def _domain(param: Param) -> Any:
    from tensorboard.plugins.hparams import summary_v2 as hp

    if param.kind in ("randint", "lograndint"):
        return hp.IntInterval(int(param.low), int(param.high))
    if param.is_range:
        return hp.RealInterval(float(param.low), float(param.high))
    values = list(param.values)
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return hp.Discrete([float(v) for v in values])
    if all(isinstance(v, bool) for v in values) or all(isinstance(v, str) for v in values):
        return hp.Discrete(values)
    return hp.Discrete([str(v) for v in values])


def _hparam_value(value: Any) -> Any:
    """A value TensorBoard's HParams accept (bool, number or string)."""
    return value if isinstance(value, (bool, int, float, str)) else str(value)


class _Writer:
    """An event file in a local folder."""

    def __init__(self, folder: Path):
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        folder.mkdir(parents=True, exist_ok=True)
        self.events = EventFileWriter(str(folder))

    def summary(self, summary: Any, step: int = 0) -> None:
        from tensorboard.compat.proto import event_pb2

        self.events.add_event(event_pb2.Event(wall_time=time.time(), step=step, summary=summary))

    def scalars(self, values: dict[str, float], step: int) -> None:
        from tensorboard.compat.proto import summary_pb2

        self.summary(
            summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=k, simple_value=v) for k, v in values.items()]),
            step,
        )

    def close(self) -> None:
        self.events.close()


class SearchBoard(Callback):
    """A Tune callback (in the search's driver) that writes the search's TensorBoard."""

    def __init__(self, spec: SearchSpec):
        self.target = storage.join(spec.experiment_dir, BOARD_DIR)
        self.metric, self.mode = spec.metric, spec.mode
        self.params = list(spec.space.params.values())
        self.best: dict[str, float] = {}  # trial id -> best metric so far (kept across --resume)
        self._local: Optional[Path] = None
        self._writers: dict[str, _Writer] = {}

    # Tune pickles its callbacks with the search (for --resume): no open files in the pickle.
    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_local": None, "_writers": {}}

    def get_state(self) -> Optional[dict]:
        return {"best": dict(self.best)}

    def set_state(self, state: dict) -> None:
        self.best = dict(state.get("best", {}))

    @property
    def local(self) -> Path:
        if self._local is None:
            remote = storage.is_remote(self.target)
            self._local = Path(tempfile.mkdtemp(prefix="lstm-board-")) if remote else Path(self.target)
        return self._local

    def setup(self, **info: Any) -> None:
        from tensorboard.plugins.hparams import summary_v2 as hp

        final, best = metric_tags(self.metric)
        config = hp.hparams_config_pb(
            hparams=[hp.HParam(p.name, _domain(p)) for p in self.params],
            metrics=[
                hp.Metric(best, display_name=f"best {self.metric}", description=f"the trial's best ({self.mode})"),
                hp.Metric(final, display_name=f"final {self.metric}", description="the trial's last epoch"),
            ],
        )
        writer = _Writer(self.local)
        writer.summary(config)
        writer.close()
        self._upload()

    def _writer(self, trial: Any) -> _Writer:
        if trial.trial_id not in self._writers:
            from tensorboard.plugins.hparams import summary_v2 as hp

            writer = _Writer(self.local / trial.trial_id)
            hparams = {p.name: _hparam_value(trial.config[p.name]) for p in self.params if p.name in trial.config}
            writer.summary(hp.hparams_pb(hparams, trial_id=trial.trial_id))
            self._writers[trial.trial_id] = writer
        return self._writers[trial.trial_id]

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._writer(trial).events.flush()
        self._upload(trial.trial_id)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        value = result.get(self.metric)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or "epoch" not in result:
            return
        value = float(value)
        previous = self.best.get(trial.trial_id)
        better = previous is None or (value < previous if self.mode == "min" else value > previous)
        self.best[trial.trial_id] = value if better else previous
        final, best = metric_tags(self.metric)
        writer = self._writer(trial)
        writer.scalars({final: value, best: self.best[trial.trial_id]}, step=int(result["epoch"]))
        writer.events.flush()
        self._upload(trial.trial_id)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._close(trial.trial_id)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._close(trial.trial_id)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        for trial_id in list(self._writers):
            self._close(trial_id)
        if self._local is not None and storage.is_remote(self.target):
            shutil.rmtree(self._local, ignore_errors=True)
            self._local = None

    def _close(self, trial_id: str) -> None:
        writer = self._writers.pop(trial_id, None)
        if writer is not None:
            writer.close()
            self._upload(trial_id)

    def _upload(self, trial_id: str = "") -> None:
        """On a remote storage path, copy the board's root files (or a trial's folder) there."""
        if not storage.is_remote(self.target):
            return
        if trial_id:
            storage.upload_dir(self.local / trial_id, storage.join(self.target, trial_id))
            return
        for file in self.local.iterdir():
            if file.is_file():
                storage.write_bytes(storage.join(self.target, file.name), file.read_bytes())
