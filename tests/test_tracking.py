"""MLflow tracking (lstm/tracking.py) against a real `mlflow server` on 127.0.0.1 (SQLite and
artifacts in a temp dir, conftest.mlflow_server), read back through MLflow's client API."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import QUICK_COMMAND_S, REPO

from lstm import config as cfg
from lstm.errors import UserError
from lstm.task import get_task
from lstm.trainer import fit
from tune import cli

METRIC = "valid_consistency"


def client(server):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=server.uri)


def runs_of(server, experiment: str) -> list:
    c = client(server)
    found = c.get_experiment_by_name(experiment)
    assert found is not None, f"no MLflow experiment {experiment!r}"
    return c.search_runs([found.experiment_id])


def history(server, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client(server).get_metric_history(run_id, key))


def artifacts(server, run_id: str) -> set[str]:
    return {a.path for a in client(server).list_artifacts(run_id)}


def rectangle_test_config():
    task = get_task("rectangle")
    return cfg.build(task.config_class, task.presets["test"])


def test_a_job_logs_one_run_with_params_metrics_and_results(mlflow_server, ray_session, tmp_path):
    settings = cfg.RunSettings(
        storage_path=str(tmp_path), name="tracked", max_failures=0, mlflow_tracking_uri=mlflow_server.uri
    )
    config = rectangle_test_config()
    result = fit("rectangle", config, settings)
    (run,) = [r for r in runs_of(mlflow_server, "lstm-ray-rectangle") if r.info.run_name == "tracked"]
    assert run.info.status == "FINISHED"
    assert run.data.params["hidden_size"] == str(config.hidden_size) and run.data.params["examples"] == "600"
    assert json.loads(run.data.params["snapshot_at"]) == list(config.snapshot_at)
    epochs = [e["epoch"] for e in result.history]
    assert history(mlflow_server, run.info.run_id, METRIC) == [
        (e["epoch"], pytest.approx(e[METRIC])) for e in result.history
    ]
    assert [s for s, _ in history(mlflow_server, run.info.run_id, "train_loss")] == epochs == [1, 2]
    assert "results.json" in artifacts(mlflow_server, run.info.run_id)
    local = client(mlflow_server).download_artifacts(run.info.run_id, "results.json", str(tmp_path / "back"))
    assert json.loads(Path(local).read_text())["final"][METRIC] == pytest.approx(result.final[METRIC])


def check_search_runs(server, experiment: str, trials: dict[float, str], best_id: str, best_value: float) -> None:
    """A search's MLflow record (test_s3.py runs the search, on S3 storage): one FINISHED run per
    trial ({learning rate: trial id}) with the trial's whole config as params and every epoch's
    metric, and on the best trial's run only, the tag best_trial and the search's best config."""
    runs = {r.info.run_name: r for r in runs_of(server, experiment)}
    assert set(runs) == set(trials.values())
    for lr, trial_id in trials.items():
        run = runs[trial_id]
        assert run.info.status == "FINISHED" and run.data.tags["trial_id"] == trial_id
        assert float(run.data.params["learning_rate"]) == lr
        assert run.data.params["epochs"] == "2"  # the trial's whole config, not only what was searched
        assert json.loads(run.data.params["snapshot_at"]) == list(rectangle_test_config().snapshot_at)
        steps = history(server, run.info.run_id, METRIC)
        assert [s for s, _ in steps] == [1, 2]
        assert "time_total_s" not in run.data.metrics and "config/learning_rate" not in run.data.metrics
    best = runs[best_id]
    assert best.data.tags.get("best_trial") == "true"
    assert {"best_config.json", "best_trial.json", "results.md"} <= artifacts(server, best.info.run_id)
    assert all("best_trial" not in r.data.tags for r in runs.values() if r is not best)
    assert min(v for _, v in history(server, best.info.run_id, METRIC)) == pytest.approx(best_value)


# --------------------------------------------------------------------------- errors, before anything starts


def test_a_run_that_fails_is_marked_failed(mlflow_server, ray_session, ptb_dir, tmp_path):
    """A loss that diverges stops the run with its one-line error; its MLflow run ends FAILED."""
    settings = cfg.RunSettings(
        storage_path=str(tmp_path),
        name="diverged",
        max_failures=0,
        data_dir=str(ptb_dir),
        mlflow_tracking_uri=mlflow_server.uri,
        cpus_per_worker=1,
    )
    ptb = get_task("ptb")
    config = cfg.build(ptb.config_class, {**ptb.presets["test"], "learning_rate": 1e30, "train_fraction": 0.005})
    with pytest.raises(UserError, match="the loss became"):
        fit("ptb", config, settings)
    (run,) = [r for r in runs_of(mlflow_server, "lstm-ray-ptb") if r.info.run_name == "diverged"]
    assert run.info.status == "FAILED"


def test_an_unreachable_server_is_a_one_line_error_before_anything_starts(tmp_path, monkeypatch):
    from conftest import free_port

    nowhere = f"http://127.0.0.1:{free_port()}"
    settings = cfg.RunSettings(storage_path=str(tmp_path), name="r", mlflow_tracking_uri=nowhere)
    with pytest.raises(UserError, match=rf"cannot reach the MLflow tracking server at {nowhere} \("):
        fit("rectangle", rectangle_test_config(), settings)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", nowhere)
    with pytest.raises(UserError, match="cannot reach the MLflow tracking server"):
        cli.main(["--task", "rectangle", "--base", "test", "--storage-path", str(tmp_path), "--name", "s"])
    assert not list(tmp_path.iterdir())  # no run, no search folder


def test_without_mlflow_the_uri_is_a_one_line_error(tmp_path):
    """A Python where `import mlflow` fails (sys.modules['mlflow'] = None makes the import
    raise ImportError, as on a machine without it): the job says so in one line, exit 2."""
    code = (
        "import sys; sys.modules['mlflow'] = None; sys.argv[0] = 'jobs/rectangle.py'; "
        "from lstm.cli import train_main; from lstm.errors import run_cli; "
        "run_cli(lambda argv: train_main('rectangle', argv))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, "--config", "test", "--storage-path", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=QUICK_COMMAND_S,
        cwd=REPO,
        env={**os.environ, "MLFLOW_TRACKING_URI": "http://127.0.0.1:1"},
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error: --mlflow-tracking-uri (or $MLFLOW_TRACKING_URI) needs mlflow, which is not installed; "
        "pip install 'lstm-ray[mlflow]', or leave the flag and the variable unset"
    ]
