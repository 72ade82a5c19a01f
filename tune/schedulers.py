"""Trial schedulers on the task's primary metric, with the epoch as their clock: ``asha``
(asynchronous successive halving, :class:`ResumableASHA`) and ``pbt`` (:class:`FinishingPBT`:
a trial in the bottom quantile takes the checkpoint and config of one in the top quantile and
perturbs the task's ``search.pbt_mutations``; with ``synch``, at every interval). Tune does not save a
scheduler's state, so :class:`ResumableASHA` replays the trials' results from disk: resumed
and new trials face the cut-offs of before the interruption.
"""

from __future__ import annotations

import json
import math
from typing import Any, Callable, Mapping, Optional, Sequence

from ray.tune.schedulers import AsyncHyperBandScheduler, PopulationBasedTraining, TrialScheduler

from lstm import storage
from lstm.errors import UserError
from tune.space import SearchSpace

TIME_ATTR = "epoch"
SCHEDULERS = ("asha", "pbt")
RESULT_FILE = "result.json"  # Tune's per-trial JSON lines of reported results


class ResumableASHA(AsyncHyperBandScheduler):
    """ASHA that rebuilds its rungs from the search's folder for trials restored by
    ``Tuner.restore``, and lets a trial below the cut of a rung at its last epoch finish by
    itself: stopping it there would kill its actor with a call in flight (a failed task on the
    job's page) for nothing left to train. Its result still counts at the rung."""

    def __init__(self, *args: Any, experiment_dir: str = "", last_epoch: Optional[int] = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.experiment_dir, self.last_epoch = experiment_dir, last_epoch

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        action = super().on_trial_result(tune_controller, trial, result)
        at_end = self.last_epoch is not None and result.get(self._time_attr, 0) >= self.last_epoch
        if action == TrialScheduler.STOP and at_end:
            self._num_stopped -= 1
            return TrialScheduler.CONTINUE
        return action

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        super().on_trial_add(tune_controller, trial)
        if not getattr(trial.storage, "trial_dir_name", None) or not self.experiment_dir:  # a new trial
            return
        history = read_trial_results(storage.join(self.experiment_dir, trial.storage.trial_dir_name))
        if not history:
            return
        bracket = self._trial_info[trial.trial_id]
        for result in history:
            if self._time_attr in result and isinstance(result.get(self._metric), (int, float)):
                bracket.on_result(trial, result[self._time_attr], self._metric_op * result[self._metric])


def read_trial_results(trial_dir: Optional[str]) -> list[dict[str, Any]]:
    """The results a trial reported so far (Tune's ``result.json`` in its folder), or []."""
    if not trial_dir:
        return []
    try:
        text = storage.read_text(storage.join(trial_dir, RESULT_FILE))
    except FileNotFoundError:
        return []
    out = []
    for line in text.splitlines():
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short by the interruption
                continue
    return out


def make_scheduler(spec: Any) -> TrialScheduler:
    """The scheduler of a search (``spec.scheduler``: asha or pbt) on the task's metric."""
    task = spec.task_class
    if spec.scheduler == "asha":
        # max_t one past the last epoch: ASHA stops every trial that reaches max_t, and a trial
        # that ends by itself shuts its Train run down cleanly instead of being killed.
        epochs = max(spec.max_epochs, 1)
        return ResumableASHA(
            time_attr=TIME_ATTR,
            metric=spec.metric,
            mode=spec.mode,
            max_t=epochs + 1,
            grace_period=min(spec.grace_period, epochs),
            reduction_factor=spec.reduction_factor,
            experiment_dir=spec.experiment_dir,
            last_epoch=epochs,
        )
    if spec.scheduler == "pbt":
        mutations, clip = pbt_mutations(spec.space, task.search.pbt_mutations)
        return FinishingPBT(
            time_attr=TIME_ATTR,
            metric=spec.metric,
            mode=spec.mode,
            perturbation_interval=spec.perturbation_interval,
            hyperparam_mutations=mutations,
            custom_explore_fn=clip,
            synch=spec.synch,
        )
    raise ValueError(f"unknown scheduler {spec.scheduler!r}")


class FinishingPBT(PopulationBasedTraining):
    """PopulationBasedTraining that does nothing on a trial's last epoch: pausing, cloning into
    it, or cloning its checkpoint into a worse trial would each restart a trial from a
    checkpoint with no epoch left to train (a new config never trained, a last result lost)."""

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> str:
        epochs = result.get("epochs")
        if isinstance(epochs, int) and result.get(TIME_ATTR, 0) >= epochs:
            return TrialScheduler.CONTINUE
        return super().on_trial_result(tune_controller, trial, result)


def pbt_mutations(
    space: SearchSpace, mutated: Sequence[str]
) -> tuple[dict[str, Any], Callable[[dict[str, Any]], dict[str, Any]]]:
    """PBT's ``hyperparam_mutations`` of the searched ``mutated`` fields, and an explore that clips them."""
    mutations: dict[str, Any] = {}
    bounds: dict[str, tuple[float, float]] = {}
    for name in mutated:
        p = space.params.get(name)
        if p is None:
            continue
        if p.is_range:
            mutations[name] = p.to_tune()
            bounds[name] = (float(p.low), float(p.high))
        else:  # a list: PBT shifts to a neighbouring value
            mutations[name] = list(p.values)
    return mutations, _Clip(bounds)


class _Clip:
    """``custom_explore_fn``: PBT multiplies by 0.8 or 1.2, which can leave a range
    (keep_prob 1.0 * 1.2); clip back to it. A class so that Tune can pickle it."""

    def __init__(self, bounds: Mapping[str, tuple[float, float]]):
        self.bounds = dict(bounds)

    def __call__(self, config: dict[str, Any]) -> dict[str, Any]:
        for name, (low, high) in self.bounds.items():
            if name in config and isinstance(config[name], (int, float)) and math.isfinite(config[name]):
                config[name] = min(max(config[name], low), high)
        return config


def check_pbt_space(space: SearchSpace, task: Any) -> None:
    """PBT needs at least one of the fields it mutates in the search space."""
    if not any(n in space.params for n in task.search.pbt_mutations):
        raise UserError(
            f"--scheduler pbt mutates {' and '.join(task.search.pbt_mutations)}, and none is searched for task "
            f"{task.name}; add e.g. --space learning_rate=log:0.0005:0.05"
        )
