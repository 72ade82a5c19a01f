"""Runs and searches on S3 storage, against a real S3 API (moto's server on 127.0.0.1, see
conftest): what lands in the bucket, read back through S3, the --resume guards, resumption,
URIs that carry their options in the query string (printed with them, and usable as printed),
and storage paths that cannot be used, each refused with one line naming the cause."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.request

import boto3
import pytest
from conftest import QUICK_COMMAND_S, REPO, S3_PORT, free_port, own_lines
from test_tracking import check_search_runs

from lstm import config as cfg
from lstm import storage
from lstm.cli import train_main
from lstm.errors import UserError, run_cli
from lstm.tasks.ptb_config import PRESETS, PTBConfig
from lstm.tasks.rectangle import ShapeConfig
from lstm.trainer import fit
from tune import cli
from tune.spec import load_spec

RECT = ShapeConfig(examples=200, epochs=2, batch_size=4, valid_examples=16, eval_shapes=8, snapshot_at=(100,))


def keys(bucket: str, prefix: str) -> set[str]:
    """Every object under ``prefix``, relative to it."""
    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/")
    return {o["Key"][len(prefix) + 1 :] for page in pages for o in page.get("Contents", [])}


def bucket_keys(bucket: str) -> set[str]:
    """Every object in the bucket."""
    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return {o["Key"] for page in pages for o in page.get("Contents", [])}


QUERY = f"?endpoint_override=127.0.0.1:{S3_PORT}&scheme=http"  # the server's address in the URI itself


def without_endpoint_env() -> dict[str, str]:
    """This process's environment without $AWS_ENDPOINT_URL: a URI only reaches the local
    server through its own query options."""
    return {k: v for k, v in os.environ.items() if k != "AWS_ENDPOINT_URL"}


def printed(pattern: str, out: str) -> str:
    """The one capture of ``pattern`` in the lines ``out``."""
    found = re.findall(pattern, out, re.MULTILINE)
    assert len(found) == 1, (pattern, out)
    return found[0]


def trial_object_versions(bucket: str, prefix: str) -> tuple[dict[str, set[str]], set[str]]:
    """The trials' objects (``trial_*``) under ``prefix`` in a versioned bucket: {key: its version
    ids} (an object written before versioning was on has the version "null"), and the keys
    deleted since, all relative to ``prefix``."""
    listing = boto3.client("s3").list_object_versions(Bucket=bucket, Prefix=f"{prefix}/trial_")
    found: dict[str, set[str]] = {}
    for v in listing.get("Versions", []):
        found.setdefault(v["Key"][len(prefix) + 1 :], set()).add(v["VersionId"])
    return found, {m["Key"][len(prefix) + 1 :] for m in listing.get("DeleteMarkers", [])}


def object_bytes(bucket: str, key: str, version: str) -> bytes:
    return boto3.client("s3").get_object(Bucket=bucket, Key=key, VersionId=version)["Body"].read()


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


def test_the_ptb_job_and_its_command_line_on_s3(ray_session, s3, ptb_dir, tmp_path, capsys):
    """...with the endpoint in the URI, not in $AWS_ENDPOINT_URL: the run name goes into the
    path, before the query; the run folder the job prints at its start and in its summary, and
    saves in results.json, carries the options, and is what `jobs/ptb.py score --checkpoint`
    takes, as it is, in a shell without $AWS_ENDPOINT_URL."""
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
        f"s3://{s3}/ptb{QUERY}",
        "--name",
        "tiny",
        "--max-failures",
        "0",
        "--cpus-per-worker",
        "1",
    ]
    assert train_main("ptb", argv) == 0
    out = capsys.readouterr().out
    run = f"s3://{s3}/ptb/tiny{QUERY}"
    assert printed(r"^\[ptb\] run folder: (.*)$", out) == printed(r"^done: ptb run in (\S+) \(valid_ppl ", out) == run
    results = read_json(s3, "ptb/tiny/results.json")
    assert results["config"] == cfg.to_dict(config) and results["run_dir"] == run
    assert 0 < results["final"]["test_ppl"] < 10000
    assert "learning_curve.png" in keys(s3, "ptb/tiny")
    with pytest.raises(SystemExit) as exit_info:  # the same command again: one line, exit 2
        run_cli(lambda a: train_main("ptb", a), argv)
    assert exit_info.value.code == 2
    assert own_lines(capsys.readouterr().err) == [
        f"error: a run named 'tiny' already exists at {run}; pass --resume to continue it, or choose another --name"
    ]

    text = tmp_path / "valid-head.txt"
    text.write_text("\n".join((ptb_dir / "ptb.valid.txt").read_text().splitlines()[:20]) + "\n")
    score = [sys.executable, "jobs/ptb.py", "score", "--checkpoint", run, "--text", str(text)]
    done = subprocess.run(
        score, cwd=REPO, env=without_endpoint_env(), capture_output=True, text=True, timeout=QUICK_COMMAND_S
    )
    assert done.returncode == 0, done.stderr[-3000:]
    scored = json.loads(done.stdout.strip().splitlines()[-1])
    assert scored["checkpoint"] == run and 0 < scored["ppl"] < 10000 and scored["tokens"] > 0


def test_a_search_on_s3_writes_its_report_to_the_bucket_and_resumes(
    ray_session, s3, mlflow_server, monkeypatch, capsys
):
    """...and, tracked by MLflow ($MLFLOW_TRACKING_URI, a real server), logs a run per trial.
    The endpoint is in the URI: the search folder it prints is what `python -m tune.report`
    takes, as it is, in a shell without $AWS_ENDPOINT_URL."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)  # the variable, not the flag
    plain = f"s3://{s3}/searches"
    root = plain + QUERY
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
    folder = printed(r"^  folder: (.*)$", capsys.readouterr().out)
    assert folder == f"{plain}/s{QUERY}"
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
    # one-worker trials train in Tune's process
    assert best["run_dir"].startswith(f"{plain}/s/trial_") and best["run_dir"].endswith(QUERY)
    # each trial's folder has its checkpoints and its own results.json in the bucket
    runs = {k.split("/")[0] for k in files if k.startswith("trial_") and k.endswith("/results.json")}
    assert len(runs) == 2
    assert all(any(k.startswith(f"{run}/checkpoint_") for k in files) for run in runs)
    trials = {float(ln.split(",")[3]): ln.split(",")[1] for ln in lines[1:]}
    check_search_runs(mlflow_server, "s", trials, summary["best"]["trial_id"], summary["best"]["valid_consistency"])

    with pytest.raises(UserError, match=re.escape(f"a search named 's' already exists at {folder}; pass --resume")):
        cli.main(argv)
    # Resumed with its folder's options alone, the finished search runs no trial again. The bucket
    # is versioned from here on: what is written again gets a second version, beside the first.
    boto3.client("s3").put_bucket_versioning(Bucket=s3, VersioningConfiguration={"Status": "Enabled"})
    cli.main(["--storage-path", root, "--name", "s", "--resume"])
    versions, deleted = trial_object_versions(s3, "searches/s")
    assert set(versions) == {k for k in files if k.startswith("trial_")} and not deleted  # none added or deleted
    rewritten = {k for k, ids in versions.items() if ids != {"null"}}
    assert not [k for k in rewritten if "/checkpoint_" in k]  # no checkpoint written: no epoch trained
    for key in rewritten:  # Tune uploads its copy of the trials' folders again: the same bytes
        assert {object_bytes(s3, f"searches/s/{key}", v) for v in versions[key]} == {
            object_bytes(s3, f"searches/s/{key}", "null")
        }, key
    assert read_json(s3, "searches/s/search_summary.json")["status"] == {"TERMINATED": 2}
    # the spec it resumed is the one the command line gave, read through the printed folder
    space = load_spec(folder).space
    assert space.fixed == {"hidden_size": 8} and list(space.params) == ["learning_rate"]
    assert (space.params["learning_rate"].kind, space.params["learning_rate"].values) == ("grid", (0.003, 0.0001))

    report = [sys.executable, "-m", "tune.report", folder]
    done = subprocess.run(
        report, cwd=REPO, env=without_endpoint_env(), capture_output=True, text=True, timeout=QUICK_COMMAND_S
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"best: trial {summary['best']['trial_id']} valid_consistency " in done.stdout


CLOSED_PORT = free_port()  # nothing listens there


@pytest.mark.parametrize(
    "where, message",
    [
        ("/proc/nope", r"cannot write to storage path /proc/nope \(.*\); pass --storage-path with a folder you can"),
        (
            "s3://no-such-bucket-x/runs",
            r"s3://no-such-bucket-x/runs: the bucket 'no-such-bucket-x' does not exist \(NO_SUCH_BUCKET during \w+\); "
            "create it or correct the bucket name",
        ),
        (
            f"s3://bucket-x/runs?endpoint_override=127.0.0.1:{CLOSED_PORT}&scheme=http",
            rf"s3://bucket-x/runs/x\?endpoint_override=127.0.0.1:{CLOSED_PORT}&scheme=http: cannot reach the S3 "
            r"endpoint \(NETWORK_CONNECTION during \w+: .*\); check endpoint_override in the URI or \$AWS_ENDPOINT_URL",
        ),
        (
            "s3:///runs",
            r"storage path s3:///runs/x is not usable \(Missing bucket name in S3 URI\); pass --storage-path",
        ),
        ("foo://host/runs", r"storage path foo://host/runs/x is not usable \(Unrecognized filesystem type in URI: "),
        (
            "s3://AKIAEXAMPLE:s3cr3t@bucket-x/runs",
            r"s3://\*\*\*@bucket-x/runs/x: credentials in a storage URI are refused \(.*\); remove them and set "
            "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY",
        ),
        (
            f"s3://bucket-x/runs{QUERY}&secret_key=s3cr3t",
            r"s3://bucket-x/runs/x\?endpoint_override=.*&secret_key=\*\*\*: credentials in a storage URI are refused",
        ),
    ],
    ids=["unwritable", "no-bucket", "no-endpoint", "no-bucket-name", "unknown-scheme", "user-info", "secret-option"],
)
def test_an_unusable_storage_path_is_one_line_before_any_worker(ray_session, s3_server, where, message, capsys):
    """Each cause its own line, exit status 2: a folder that cannot be written, a bucket that
    does not exist, an endpoint nobody answers at, a URI that pyarrow cannot read, a URI that
    carries credentials (never printed)."""
    err = job_error(where, capsys)
    assert re.fullmatch(rf"error: {message}.*", err), err
    assert "s3cr3t" not in err


def job_error(where: str, capsys) -> str:
    """The one line a rectangle job prints for ``--storage-path WHERE`` (exit status 2)."""
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda a: train_main("rectangle", a), ["--config", "test", "--storage-path", where, "--name", "x"])
    assert exit_info.value.code == 2
    err = own_lines(capsys.readouterr().err)
    assert len(err) == 1, err
    return err[0]


@pytest.fixture
def s3_checks_credentials(s3):
    """The bucket ``s3``, on a server that checks every request's credentials until the test
    ends (moto's IAM checks: it has no IAM users, so the suite's keys are unknown to it)."""

    def checks_after(requests: bytes) -> None:
        url = f"http://127.0.0.1:{S3_PORT}/moto-api/reset-auth"
        request = urllib.request.Request(url, data=requests, method="POST", headers={"Content-Type": "text/plain"})
        urllib.request.urlopen(request, timeout=10).close()

    checks_after(b"0")
    try:
        yield s3
    finally:
        checks_after(b"inf")


def test_refused_credentials_are_named_before_any_worker(ray_session, s3_checks_credentials, capsys):
    """Keys the server does not know: one line that says so and where keys come from."""
    root = f"s3://{s3_checks_credentials}/runs"
    assert job_error(root, capsys) == (
        f"error: {root}/x: access denied (ACCESS_DENIED during HeadObject): wrong credentials, or keys without "
        "access to this bucket or prefix; set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) to keys that "
        "may read, write and delete there; a job under `ray job submit` gets them as docs/cluster.md says"
    )
    # the write check of a whole bucket writes first: the server says the key is unknown to it
    with pytest.raises(
        UserError,
        match=rf"^s3://{s3_checks_credentials}: the S3 server does not accept the credentials "
        r"\(INVALID_ACCESS_KEY_ID during \w+\); set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY ",
    ):
        storage.check_writable(f"s3://{s3_checks_credentials}")


def test_the_write_check_leaves_nothing_in_the_bucket(s3):
    """On S3 the probe's file is deleted, and so is the folder object pyarrow leaves when it
    made the folder; in a folder that holds files, only those files are left (and the folder
    object pyarrow's delete writes)."""
    for root in ("runs", "a/b/c", ""):
        storage.check_writable(f"s3://{s3}/{root}".rstrip("/"))
        assert bucket_keys(s3) == set(), root
    boto3.client("s3").put_object(Bucket=s3, Key="kept/run/results.json", Body=b"{}")
    storage.check_writable(f"s3://{s3}/kept")
    assert bucket_keys(s3) - {"kept/"} == {"kept/run/results.json"}
