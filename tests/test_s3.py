"""Runs and searches on S3 storage, against a real S3 API (moto's server on 127.0.0.1, see
conftest): what lands in the bucket, read back through S3, the --resume guards, resumption,
URIs that carry their options in the query string, and unusable storage paths."""

from __future__ import annotations

import json

import boto3
import pytest
from conftest import S3_PORT, own_lines
from test_tracking import check_search_runs

from lstm import config as cfg
from lstm import storage
from lstm.cli import train_main
from lstm.errors import UserError, run_cli
from lstm.tasks.ptb import PRESETS, PTBConfig
from lstm.tasks.rectangle import ShapeConfig
from lstm.trainer import fit
from tune import cli
from tune.spec import load_spec

RECT = ShapeConfig(examples=200, epochs=2, batch_size=4, valid_examples=16, eval_shapes=8, snapshot_at=(100,))


def keys(bucket: str, prefix: str) -> set[str]:
    """Every object under ``prefix``, relative to it."""
    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/")
    return {o["Key"][len(prefix) + 1 :] for page in pages for o in page.get("Contents", [])}


def read_json(bucket: str, key: str) -> dict:
    return json.loads(boto3.client("s3").get_object(Bucket=bucket, Key=key)["Body"].read())


def settings(root: str, name: str, **kw) -> cfg.RunSettings:
    return cfg.RunSettings(storage_path=root, name=name, max_failures=0, **kw)


def test_a_job_on_s3_writes_everything_to_the_bucket_and_resumes(ray_session, s3):
    root = f"s3://{s3}/runs"
    first = fit("rectangle", RECT, settings(root, "rect"))
    assert first.run_dir == f"{root}/rect" and first.checkpoint.startswith(f"{root}/rect/checkpoint_")
    files = keys(s3, "runs/rect")
    assert {"results.json", "learning_curve.png", "shapes_grid.png"} <= files
    assert any(k.startswith("tensorboard/events.out.tfevents") for k in files)
    checkpoints = {k.split("/")[0] for k in files if k.startswith("checkpoint_2")}
    assert len(checkpoints) == 2 and all(
        {f"{c}/model.pt", f"{c}/optimizer.pt", f"{c}/state.json"} <= files for c in checkpoints
    )
    results = read_json(s3, "runs/rect/results.json")
    assert [e["epoch"] for e in results["epochs"]] == [1, 2] and results["run_dir"] == f"{root}/rect"
    assert results["final"]["valid_consistency"] == first.final["valid_consistency"]

    # the guards read the bucket: no accidental continuation, no resume of nothing
    with pytest.raises(UserError, match=rf"a run named 'rect' already exists at {root}/rect; pass --resume"):
        fit("rectangle", RECT, settings(root, "rect"))
    with pytest.raises(UserError, match=rf"--resume: no run to resume at {root}/nothing"):
        fit("rectangle", RECT, settings(root, "nothing"), resume=True)

    longer = cfg.build(ShapeConfig, {**cfg.to_dict(RECT), "examples": 300, "epochs": 3})
    resumed = fit("rectangle", longer, settings(root, "rect"), resume=True)
    assert [e["epoch"] for e in resumed.history] == [1, 2, 3]
    assert resumed.history[:2] == first.history, "the resumed run keeps the first two epochs as they were"
    assert [e["epoch"] for e in read_json(s3, "runs/rect/results.json")["epochs"]] == [1, 2, 3]


def test_a_uri_with_its_options_in_the_query_string(ray_session, s3, capsys):
    """The endpoint in the URI itself, not in $AWS_ENDPOINT_URL: the run name goes into the
    path, before the query."""
    root = f"s3://{s3}/q?endpoint_override=127.0.0.1:{S3_PORT}&scheme=http"
    result = fit("rectangle", RECT, settings(root, "opts"))
    assert result.run_dir == f"s3://{s3}/q/opts?endpoint_override=127.0.0.1:{S3_PORT}&scheme=http"
    assert "results.json" in keys(s3, "q/opts")
    assert f"[rectangle] run folder: s3://{s3}/q/opts\n" in capsys.readouterr().out  # printed without options


def test_the_ptb_job_and_its_command_line_on_s3(ray_session, s3, ptb_dir, capsys):
    config = PTBConfig(**{**PRESETS["test"], "train_fraction": 0.01, "eval_num_steps": 35})
    argv = [
        "--config",
        "test",
        "--train-fraction",
        "0.01",
        "--eval-num-steps",
        "35",
        "--data-dir",
        str(ptb_dir),
        "--storage-path",
        f"s3://{s3}/ptb",
        "--name",
        "tiny",
        "--max-failures",
        "0",
    ]
    assert train_main("ptb", argv) == 0
    out = capsys.readouterr().out
    assert f"done: ptb run in s3://{s3}/ptb/tiny (valid_ppl " in out
    results = read_json(s3, "ptb/tiny/results.json")
    assert results["config"] == cfg.to_dict(config)
    assert 0 < results["final"]["test_ppl"] < 10000
    assert "learning_curve.png" in keys(s3, "ptb/tiny")
    with pytest.raises(SystemExit) as exit_info:  # the same command again: one line, exit 2
        run_cli(lambda a: train_main("ptb", a), argv)
    assert exit_info.value.code == 2
    assert own_lines(capsys.readouterr().err) == [
        f"error: a run named 'tiny' already exists at s3://{s3}/ptb/tiny; "
        "pass --resume to continue it, or choose another --name"
    ]


def test_a_search_on_s3_writes_its_report_to_the_bucket_and_resumes(ray_session, s3, mlflow_server, monkeypatch):
    """...and, tracked by MLflow ($MLFLOW_TRACKING_URI, a real server), logs a run per trial."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)  # the variable, not the flag
    root = f"s3://{s3}/searches"
    # grace period = every epoch: ASHA stops no trial, whatever order the two finish in
    argv = [
        "--task",
        "rectangle",
        "--base",
        "test",
        "--max-epochs",
        "2",
        "--grace-period",
        "2",
        "--num-samples",
        "1",
        "--max-concurrent",
        "2",
        "--space",
        "hidden_size=8",
        "learning_rate=grid:0.003,0.0001",
        "--storage-path",
        root,
        "--name",
        "s",
    ]
    cli.main(argv)
    files = keys(s3, "searches/s")
    for name in (
        "results.md",
        "results.csv",
        "best_config.json",
        "best_trial.json",
        "search_summary.json",
        "search_spec.json",
        "plots/valid_consistency_per_epoch.png",
        "plots/final_valid_consistency_vs_hyperparameters.png",
    ):
        assert name in files, name
    summary = read_json(s3, "searches/s/search_summary.json")
    assert summary["trials"] == 2 and summary["status"] == {"TERMINATED": 2}
    rows = boto3.client("s3").get_object(Bucket=s3, Key="searches/s/results.csv")["Body"].read().decode()
    lines = rows.splitlines()
    print("results.csv in the bucket:", *lines, sep="\n  ")
    assert lines[0].startswith("rank,trial,status,learning_rate,epochs run,best valid_consistency")
    assert len(lines) == 3 and all(",TERMINATED,0.003," in ln or ",TERMINATED,0.0001," in ln for ln in lines[1:])
    assert all(ln.split(",")[4] == "2" for ln in lines[1:]), "each trial ran its 2 epochs"
    best = read_json(s3, "searches/s/best_trial.json")
    assert best["epochs_run"] == 2 and best["best"] == summary["best"]["valid_consistency"] > 0
    assert best["run_dir"].startswith(f"{root}/s/trial_")  # one-worker trials train in Tune's process
    # each trial's folder has its checkpoints and its own results.json in the bucket
    runs = {k.split("/")[0] for k in files if k.startswith("trial_") and k.endswith("/results.json")}
    assert len(runs) == 2
    assert all(any(k.startswith(f"{run}/checkpoint_") for k in files) for run in runs)
    trials = {float(ln.split(",")[3]): ln.split(",")[1] for ln in lines[1:]}
    check_search_runs(mlflow_server, "s", trials, summary["best"]["trial_id"], summary["best"]["valid_consistency"])

    with pytest.raises(UserError, match=rf"a search named 's' already exists at {root}/s; pass --resume"):
        cli.main(argv)
    cli.main(["--storage-path", root, "--name", "s", "--resume"])  # finished trials are not run again
    assert load_spec(storage.join(root, "s")).space == load_spec(f"{root}/s").space
    assert read_json(s3, "searches/s/search_summary.json")["status"] == {"TERMINATED": 2}


@pytest.mark.parametrize(
    "where, message",
    [
        ("/proc/nope", r"^cannot write to storage path /proc/nope \(.*\); pass --storage-path with a folder you can"),
        ("s3://no-such-bucket-x/runs", r"^cannot write to storage path s3://no-such-bucket-x/runs \(.*\); pass"),
    ],
)
def test_an_unusable_storage_path_is_one_line_before_any_worker(ray_session, s3_server, where, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda a: train_main("rectangle", a), ["--config", "test", "--storage-path", where, "--name", "x"])
    assert exit_info.value.code == 2
    err = own_lines(capsys.readouterr().err)
    assert len(err) == 1 and err[0].startswith("error: ")
    import re

    assert re.match(message, err[0][len("error: ") :]), err[0]
