"""Optional MLflow tracking: ``--mlflow-tracking-uri URI`` (or ``$MLFLOW_TRACKING_URI``).

A job logs one MLflow run in ``lstm-ray-<task>`` (config as params, each epoch's metrics from
:class:`lstm.callbacks.MetricsCallback`, results.json at the end); a search logs one per trial
through Tune's ``MLflowLoggerCallback``, and tags the best with its config and results table.
mlflow is imported only when a URI is given; :func:`check` refuses, in one line and before
anything starts, a missing mlflow or a server that does not answer.
"""

from __future__ import annotations

import json
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Mapping, Optional

from lstm import storage
from lstm.errors import UserError

URI_ENV = "MLFLOW_TRACKING_URI"
REACH_TIMEOUT_S = 10.0
TRIAL_ID_TAG = "trial_id"
BEST_TAG = "best_trial"


def resolve_uri(uri: str) -> str:
    """``uri``, else ``$MLFLOW_TRACKING_URI``, else '' (no tracking)."""
    return uri or os.environ.get(URI_ENV, "")


def _mlflow() -> Any:
    try:
        import mlflow
    except ImportError:
        raise UserError(
            "--mlflow-tracking-uri (or $MLFLOW_TRACKING_URI) needs mlflow, which is not installed; "
            "pip install 'lstm-ray[mlflow]', or leave the flag and the variable unset"
        ) from None
    return mlflow


def check(uri: str) -> None:
    """One-line UserError if ``uri`` is set but mlflow is missing or its http(s) server does not answer."""
    if not uri:
        return
    _mlflow()
    if not uri.startswith(("http://", "https://")):
        return
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=REACH_TIMEOUT_S) as answer:
            answer.read()
    except urllib.error.HTTPError as e:
        raise UserError(
            f"the MLflow tracking server at {uri} answered HTTP {e.code} at /health; "
            "check --mlflow-tracking-uri (or $MLFLOW_TRACKING_URI)"
        ) from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise UserError(
            f"cannot reach the MLflow tracking server at {uri} ({reason}); start it, or fix "
            "--mlflow-tracking-uri (or $MLFLOW_TRACKING_URI)"
        ) from None


def client(uri: str) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def experiment_id(uri: str, name: str) -> str:
    """The id of the experiment ``name``, created if needed."""
    c = client(uri)
    found = c.get_experiment_by_name(name)
    return found.experiment_id if found is not None else c.create_experiment(name)


def param_values(config: Mapping[str, Any]) -> dict[str, str]:
    """A config as MLflow params: strings, lists and tuples as JSON."""
    return {k: json.dumps(v) if isinstance(v, (list, tuple, dict)) else str(v) for k, v in config.items()}


def _params(config: Mapping[str, Any]) -> list[Any]:
    from mlflow.entities import Param

    return [Param(k, v) for k, v in param_values(config).items()]


def numbers(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The numeric entries of a report (bools and strings left out)."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


# --------------------------------------------------------------------------- a job


def start_job_run(uri: str, task: str, name: str, config: Mapping[str, Any]) -> str:
    """Create the MLflow run of a job (experiment ``lstm-ray-<task>``); returns its id."""
    c = client(uri)
    run = c.create_run(experiment_id(uri, f"lstm-ray-{task}"), run_name=name, tags={"task": task})
    c.log_batch(run.info.run_id, params=_params(config))
    return run.info.run_id


def end_job_run(uri: str, run_id: str, results_path: Optional[str], failed: bool = False) -> None:
    """Attach ``results.json`` (local or remote) and close the run."""
    c = client(uri)
    if results_path:
        log_files(uri, run_id, {"results.json": results_path})
    c.set_terminated(run_id, status="FAILED" if failed else "FINISHED")


def log_files(uri: str, run_id: str, files: Mapping[str, str]) -> None:
    """Log ``{name: location}`` (local paths or URIs) as artifacts of the run."""
    c = client(uri)
    with tempfile.TemporaryDirectory(prefix="lstm-mlflow-") as tmp:
        for name, location in files.items():
            local = Path(tmp) / name
            local.write_bytes(storage.read_bytes(location))
            c.log_artifact(run_id, str(local))


# --------------------------------------------------------------------------- a search


def trial_callback(uri: str, search_name: str, trial_config: Any) -> Any:
    """Ray Tune's ``MLflowLoggerCallback`` for a search's trials: a run named after the trial,
    the trial's whole config as params, each result at step = epoch without Tune's bookkeeping."""
    from ray.air.integrations.mlflow import MLflowLoggerCallback
    from ray.tune.result import AUTO_RESULT_KEYS

    class TrialRuns(MLflowLoggerCallback):
        def log_trial_start(self, trial: Any) -> None:
            if trial in self._trial_runs:  # PBT restarts a trial: MLflow's params cannot change
                return
            tags = {**self.tags, "trial_name": str(trial), TRIAL_ID_TAG: trial.trial_id}
            self._trial_runs[trial] = self.mlflow_util.start_run(tags=tags, run_name=trial.trial_id).info.run_id
            params = param_values(trial_config(trial.config))
            self.mlflow_util.log_params(run_id=self._trial_runs[trial], params_to_log=params)

        def log_trial_result(self, iteration: int, trial: Any, result: dict) -> None:
            if "epoch" not in result:
                return
            skip = {*AUTO_RESULT_KEYS, "done", "training_iteration", "epoch", "epochs"}
            metrics = {k: v for k, v in numbers(result).items() if k not in skip}
            self.mlflow_util.log_metrics(run_id=self._trial_runs[trial], metrics_to_log=metrics, step=result["epoch"])

    return TrialRuns(tracking_uri=uri, experiment_name=search_name)


def log_search_best(uri: str, search_name: str, trial_id: str, files: Mapping[str, str]) -> Optional[str]:
    """Attach the best config and ``files`` to the best trial's run and tag it; its run id, or None."""
    c = client(uri)
    found = c.get_experiment_by_name(search_name)
    if found is None:
        return None
    runs = c.search_runs([found.experiment_id], filter_string=f"tags.{TRIAL_ID_TAG} = '{trial_id}'")
    if not runs:
        return None
    run_id = runs[0].info.run_id
    log_files(uri, run_id, files)
    c.set_tag(run_id, BEST_TAG, "true")
    return run_id
