"""`ray job submit` for real, the way the README's cluster section says: a Ray head of its own
(tests/ray_head.py: `ray start --head` with token authentication, its own temp dir and ports),
the rectangle job with the default storage, the PTB job and a 2-trial search submitted at once
with `--working-dir .` through the jobs CLI (conftest's ``head``/``head_jobs``, shared with
test_dashboards.py), their outputs read back and what was uploaded checked.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
from conftest import QUICK_COMMAND_S, RAY_COMMAND_S, RAY_LOG_LINE
from ray_head import REPO, SEARCH_LEARNING_RATES, Job, shell_env

from lstm.tasks.ptb_config import PRESETS

MAX_PACKAGE_BYTES = 2 * 2**20  # the repository without data, runs and environments is ~0.5 MiB


@pytest.fixture(scope="module")
def jobs(head_jobs) -> dict[str, Job]:
    return head_jobs[0]


@pytest.fixture(scope="module")
def storage(head_jobs) -> Path:
    return head_jobs[1]


def check_succeeded(job: Job) -> None:
    assert job.returncode == 0 and job.status == "SUCCEEDED", (
        f"job {job.submission_id}: exit {job.returncode}, status {job.status}\n{job.output[-6000:]}"
    )


def test_the_ptb_job_runs_on_the_cluster_and_writes_its_results(jobs, head, storage):
    job = jobs["ptb"]
    check_succeeded(job)
    # the driver connected to this head (`ray job submit` sets RAY_ADDRESS), and Ray Train's
    # actors did not go looking for another Ray instance on this machine
    assert re.search(rf"Connecting to existing Ray cluster at address: \S+:{head.gcs_port}\b", job.output)
    assert "Found multiple active Ray instances" not in job.output
    run = storage / "ptb-run"
    assert f"done: ptb run in {run}" in job.output
    results = json.loads((run / "results.json").read_text())
    assert results["task"] == "ptb" and results["run_dir"] == str(run)
    assert results["config"]["train_fraction"] == 0.01  # as the command says, the rest the test preset's
    assert results["config"]["hidden_size"] == PRESETS["test"]["hidden_size"]
    assert [e["epoch"] for e in results["epochs"]] == [1]
    final = results["final"]
    assert 0 < final["valid_ppl"] < 5000 and 0 < final["test_ppl"] < 5000 and final["words_per_sec"] > 0
    assert Path(results["checkpoint"]).is_dir() and Path(results["checkpoint"]).parent == run
    assert (run / "learning_curve.png").is_file()
    # the command's time line: from its imports on, Ray joined, not started
    t = results["timings"]
    assert t["imports_s"] > 0 and t["ray_start_s"] < t["workers_up_s"]
    assert re.search(r"^  time: +[\d.]+s: imports [\d.]+s, .*worker group start", job.output, re.M)


def test_the_tune_search_runs_on_the_cluster(jobs, storage):
    job = jobs["search"]
    check_succeeded(job)
    assert "Found multiple active Ray instances" not in job.output
    experiment = storage / "search"
    summary = json.loads((experiment / "search_summary.json").read_text())
    trials = len(SEARCH_LEARNING_RATES)
    assert summary["trials"] == trials and summary["status"] == {"TERMINATED": trials}
    assert summary["best"]["hyperparameters"]["learning_rate"] in SEARCH_LEARNING_RATES
    best = json.loads((experiment / "best_config.json").read_text())
    assert best["learning_rate"] == summary["best"]["hyperparameters"]["learning_rate"]
    runs = sorted(experiment.glob("trial_*/results.json"))  # one-worker trials: in Tune's trial folders
    assert {json.loads(r.read_text())["config"]["learning_rate"] for r in runs} == set(SEARCH_LEARNING_RATES)
    assert len(runs) == trials


def test_without_a_storage_path_the_run_lands_in_home_not_in_the_working_dir(jobs, head):
    job = jobs["default"]
    check_succeeded(job)
    run = head.temp_dir / "home" / "lstm-ray" / "runs" / "default-run"
    assert json.loads((run / "results.json").read_text())["run_dir"] == str(run)
    assert f"[rectangle] run folder: {run}\n" in job.output  # at the start ...
    assert f"done: rectangle run in {run} (" in job.output  # ... and at the end
    packages = head.temp_dir / "ray" / "session_latest" / "runtime_resources" / "working_dir_files"
    assert not list(packages.glob("*/runs")) and not list(packages.glob("*/**/results.json"))


def test_the_uploaded_working_dir_is_the_code_only(jobs, head):
    for job in jobs.values():
        assert re.search(r"Uploading package gcs://_ray_pkg_\w+\.zip", job.output) or re.search(
            r"Package gcs://_ray_pkg_\w+\.zip already exists", job.output
        ), job.output[:3000]
    packages = [
        p
        for p in (head.temp_dir / "ray" / "session_latest" / "runtime_resources" / "working_dir_files").iterdir()
        if p.is_dir()
    ]
    assert packages, "no working_dir package on the head"
    for package in packages:
        files = [p for p in package.rglob("*") if p.is_file()]
        names = {p.relative_to(package).as_posix() for p in files}
        assert {"jobs/ptb.py", "jobs/search.py", "lstm/trainer.py", "lstm/data/ptb.py", "tune/cli.py"} <= names
        top = {n.split("/")[0] for n in names}
        assert not top & {".git", ".venv", "venv", "runs", "data"}, sorted(top)
        assert not any("__pycache__" in n for n in names)
        size = sum(p.stat().st_size for p in files)
        assert size < MAX_PACKAGE_BYTES, f"uploaded {size / 2**20:.1f} MiB"


def test_a_plain_python_job_joins_the_running_head(head, jobs, tmp_path):
    """The README's fast path: after `ray start --head`, a job started with plain `python` in
    the same shell joins that head, without $RAY_ADDRESS (found where `ray start` left its
    address, as `ray.init()` finds it); its driver shows in the head's jobs list. (After the
    submitted jobs: ``jobs``.)"""
    assert "RAY_ADDRESS" not in head.env
    command = ["python", "jobs/rectangle.py", "--config", "test", "--storage-path", str(tmp_path), "--name", "plain"]
    command += ["--cpus-per-worker", "1", "--max-failures", "0"]
    done = subprocess.run(command, env=head.env, cwd=REPO, capture_output=True, text=True, timeout=RAY_COMMAND_S)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]
    assert re.search(rf"Connecting to existing Ray cluster at address: \S+:{head.gcs_port}\b", output)
    # Ray Train's actors got the head's address: none went looking for "the" Ray instance (the
    # driver itself may say it found several, as a plain ray.init() does: another test's)
    assert not [line for line in output.splitlines() if RAY_LOG_LINE.match(line) and "multiple active Ray" in line]
    drivers = [j for j in head.get("/api/jobs/") if j["type"] == "DRIVER" and "jobs/rectangle.py" in j["entrypoint"]]
    assert [j["status"] for j in drivers] == ["SUCCEEDED"]
    assert json.loads((tmp_path / "plain" / "results.json").read_text())["run_dir"] == str(tmp_path / "plain")


def test_a_plain_python_job_without_the_token_mode_stops_with_one_line(head, jobs, tmp_path):
    """The fast path's usual slip: the shell that runs the job lacks RAY_AUTH_MODE=token. Ray
    retries for about 20 s and raises a ConnectionError; the job says what to export, exit 2."""
    env = {k: v for k, v in head.env.items() if k != "RAY_AUTH_MODE"}
    command = ["python", "jobs/rectangle.py", "--config", "test", "--storage-path", str(tmp_path)]
    done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=QUICK_COMMAND_S)
    assert done.returncode == 2, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert re.match(rf"error: the Ray cluster at \S+:{head.gcs_port} refused this job's connection", last), last
    assert "(RAY_AUTH_MODE here: unset); export RAY_AUTH_MODE=token" in last
    assert not list(tmp_path.iterdir())  # no run folder


@pytest.mark.parametrize(
    "setting, message",
    [
        # forgot `export RAY_AUTH_MODE=token`: the token is there, but not sent
        ({}, "Unauthorized: Missing authentication token"),
        # another cluster's token
        ({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64}, "Forbidden: Invalid authentication token"),
    ],
)
def test_the_head_refuses_clients_without_its_token(head, setting, message):
    env = shell_env(head.temp_dir / "bin", RAY_AUTH_TOKEN_PATH=str(head.token_file), **setting)
    refused = head.ray("job", "list", "--address", head.url, env=env)
    assert refused.returncode != 0 and message in refused.stdout + refused.stderr
    allowed = head.ray("job", "list", "--address", head.url)
    assert allowed.returncode == 0, allowed.stdout + allowed.stderr
