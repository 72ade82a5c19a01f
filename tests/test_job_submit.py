"""`ray job submit` for real, the way the README's cluster section says: a Ray head of its own
(`ray start --head` with token authentication, its own temp dir and ports), the PTB job and a
tiny Tune search submitted with `--working-dir .` through the jobs CLI, their outputs read back,
what was uploaded checked, and the head stopped again.

Token authentication (Ray 2.59+): `ray start --head` turns it on when ~/.ray/auth_token exists
(every local `ray.init()` writes one), and a client without RAY_AUTH_MODE=token then sends no
token. The README therefore says `export RAY_AUTH_MODE=token` in the shell that runs
`ray start` and `ray job submit`; this test does the same, with the token in a file of its own
(RAY_AUTH_TOKEN_PATH) so that it never touches ~/.ray.

The head is stopped through its own process (`ray start --block` shuts the node down on
SIGTERM), then whatever is left of the processes it started (its process group and their
children) is killed: never `ray stop`, which would stop every Ray instance on the machine,
this test session's own included.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import SHARED_DATA, TRAIN_POLL_ENV, TRAIN_POLL_S

REPO = Path(__file__).resolve().parents[1]
JOB_TIMEOUT_S = 300
MAX_PACKAGE_BYTES = 2 * 2**20  # the repository without data, runs and environments is ~0.5 MiB

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="needs Linux /proc")


def free_ports(n: int) -> list[int]:
    import socket

    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


# --------------------------------------------------------------------------- processes


def process_table() -> dict[int, tuple[int, int, str]]:
    """pid -> (ppid, process group, start time) of every process, from /proc."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
        table[int(entry)] = (int(fields[1]), int(fields[2]), fields[19])
    return table


def processes_of(group: int) -> dict[int, str]:
    """The processes of process group ``group`` and all their descendants (Ray's workers make
    process groups of their own under the raylet): pid -> start time."""
    table = process_table()
    found = {pid for pid, (_, pgid, _) in table.items() if pgid == group}
    while True:
        more = {pid for pid, (ppid, _, _) in table.items() if ppid in found} - found
        if not more:
            return {pid: table[pid][2] for pid in found}
        found |= more


def kill_remaining(snapshot: dict[int, str]) -> list[int]:
    """SIGKILL the processes of ``snapshot`` that still run (same pid and start time)."""
    table = process_table()
    killed = []
    for pid, started in snapshot.items():
        if pid in table and table[pid][2] == started:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except ProcessLookupError:
                pass
    return killed


# --------------------------------------------------------------------------- the head


@dataclass
class Head:
    temp_dir: Path
    gcs_port: int
    url: str  # the dashboard / jobs API
    env: dict[str, str]  # what the README's shell has: RAY_AUTH_MODE=token, the token, ray on PATH
    token_file: Path
    proc: subprocess.Popen

    def ray(self, *args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["ray", *args], env=env or self.env, cwd=REPO, capture_output=True, text=True, timeout=timeout
        )


def shell_env(bin_dir: Path, **extra: str) -> dict[str, str]:
    """This environment without any RAY_* setting (the session's own Ray instance may have put
    RAY_AUTH_MODE or RAY_ADDRESS there) nor $LSTM_RAY_STORAGE, with `python` and `ray` of this
    interpreter first on PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_") and k != "LSTM_RAY_STORAGE"}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


def make_bin(bin_dir: Path) -> None:
    """`python` and `ray` commands that run this interpreter (a venv or not)."""
    bin_dir.mkdir()
    for name, command in (
        ("python", f'exec "{sys.executable}" "$@"'),
        ("ray", f'exec "{sys.executable}" -m ray.scripts.scripts "$@"'),
    ):
        (bin_dir / name).write_text(f"#!/bin/sh\n{command}\n")
        (bin_dir / name).chmod(0o755)


def wait_until_ready(proc: subprocess.Popen, url: str, token: str, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    request = urllib.request.Request(f"{url}/api/jobs/", headers={"Authorization": f"Bearer {token}"})
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"ray start exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(request, timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    pytest.fail(f"the Ray head did not serve {url} within {timeout:.0f}s:\n{log.read_text()[-3000:]}")


def stop_head(proc: subprocess.Popen) -> None:
    snapshot = processes_of(proc.pid)  # `ray start` leads its own process group (start_new_session)
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # --block: Ray kills the node's processes, then exits
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    time.sleep(1)
    kill_remaining({**snapshot, **processes_of(proc.pid)})


@pytest.fixture(scope="module")
def head():
    if not (SHARED_DATA / "ptb" / "ptb.train.txt").is_file():
        pytest.skip(f"PTB data not found at {SHARED_DATA / 'ptb'}")
    # Short: Ray's unix socket paths under it must stay below 108 bytes.
    temp_dir = Path(tempfile.mkdtemp(prefix="lstm-rj-", dir="/tmp"))
    make_bin(temp_dir / "bin")
    token_file = temp_dir / "auth_token"
    token_file.write_text(secrets.token_hex(32))
    token_file.chmod(0o600)
    # HOME of its own: where a job without --storage-path writes (~/lstm-ray/runs), kept in the test
    (temp_dir / "home").mkdir()
    env = shell_env(
        temp_dir / "bin", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_file), HOME=str(temp_dir / "home")
    )
    gcs, dashboard, agent, client = free_ports(4)
    url = f"http://127.0.0.1:{dashboard}"
    log = temp_dir / "ray-start.log"
    # 3 logical CPUs: the PTB job's worker and the search's two trial workers at once.
    command = [
        "ray",
        "start",
        "--head",
        "--block",
        "--node-ip-address",
        "127.0.0.1",
        "--port",
        str(gcs),
        "--dashboard-host",
        "127.0.0.1",
        "--dashboard-port",
        str(dashboard),
        "--dashboard-agent-listen-port",
        str(agent),
        "--ray-client-server-port",
        str(client),
        "--num-cpus",
        "3",
        "--temp-dir",
        str(temp_dir),
        "--disable-usage-stats",
    ]
    # Without the drain wait, SIGTERM stops the node at once (the default waits 30 s for Serve).
    # The Train controllers of the jobs poll their workers every 0.5 s instead of 2 s, as in
    # the rest of the suite (conftest.TRAIN_POLL_S): the node's processes inherit this.
    start_env = {**env, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0", TRAIN_POLL_ENV: TRAIN_POLL_S}
    with open(log, "w") as out:
        proc = subprocess.Popen(
            command,
            env=start_env,
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    try:
        wait_until_ready(proc, url, token_file.read_text(), log)
        yield Head(temp_dir, gcs, url, env, token_file, proc)
    finally:
        stop_head(proc)
        shutil.rmtree(temp_dir, ignore_errors=True)


# --------------------------------------------------------------------------- the jobs


@dataclass
class Job:
    submission_id: str
    returncode: int
    output: str  # `ray job submit`'s own lines and the job's logs
    status: str  # what the jobs API says at the end


def submit_all(head: Head, log_dir: Path, jobs: dict[str, list[str]]) -> dict[str, Job]:
    """Submit the jobs at once, exactly as the README does (`ray job submit --address URL
    --working-dir . -- python jobs/...`), and wait for all of them. Their output goes to
    ``log_dir/<name>.log``."""
    running = {}
    for name, entrypoint in jobs.items():
        sid = f"{name}-{secrets.token_hex(4)}"
        log = log_dir / f"{name}.log"
        with open(log, "w") as out:  # a file, not a pipe: the jobs are read one after the other
            running[name] = (
                sid,
                log,
                subprocess.Popen(
                    [
                        "ray",
                        "job",
                        "submit",
                        "--address",
                        head.url,
                        "--working-dir",
                        ".",
                        "--submission-id",
                        sid,
                        "--",
                        *entrypoint,
                    ],
                    env=head.env,
                    cwd=REPO,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                ),
            )
    done = {}
    deadline = time.monotonic() + JOB_TIMEOUT_S
    for name, (sid, log, proc) in running.items():
        try:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            head.ray("job", "stop", "--address", head.url, sid)
            proc.kill()
            proc.wait()
            with open(log, "a") as out:
                out.write(f"\n[test] gave up after {JOB_TIMEOUT_S}s\n")
        done[name] = Job(sid, proc.returncode, log.read_text(), job_status(head, sid))
    return done


def job_status(head: Head, submission_id: str) -> str:
    """The job's status as the jobs API reports it (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED)."""
    request = urllib.request.Request(
        f"{head.url}/api/jobs/{submission_id}", headers={"Authorization": f"Bearer {head.token_file.read_text()}"}
    )
    with urllib.request.urlopen(request, timeout=30) as r:
        return json.load(r)["status"]


@pytest.fixture(scope="module")
def storage(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("job-submit-runs")


@pytest.fixture(scope="module")
def jobs(head, storage) -> dict[str, Job]:
    data = str(SHARED_DATA / "ptb")
    return submit_all(
        head,
        storage,
        {
            # no --storage-path and no $LSTM_RAY_STORAGE: the default, outside the job's working dir
            "default": [
                "python",
                "jobs/rectangle.py",
                "--config",
                "test",
                "--name",
                "default-run",
                "--cpus-per-worker",
                "1",
                "--max-failures",
                "0",
            ],
            # the tutorial's test config on 1% of the training words, evaluated in steps of 35 words
            "ptb": [
                "python",
                "jobs/ptb.py",
                "--config",
                "test",
                "--train-fraction",
                "0.01",
                "--eval-num-steps",
                "35",
                "--cpus-per-worker",
                "1",
                "--data-dir",
                data,
                "--storage-path",
                str(storage),
                "--name",
                "ptb-run",
                "--max-failures",
                "0",
            ],
            # two trials (a grid over the learning rate) of one epoch each
            "tune": [
                "python",
                "jobs/tune_ptb.py",
                "--base",
                "test",
                "--data-dir",
                data,
                "--train-fraction",
                "0.01",
                "--max-epochs",
                "1",
                "--num-samples",
                "1",
                "--space",
                "hidden_size=base",
                "keep_prob=base",
                "lr_decay=base",
                "eval_num_steps=35",
                "learning_rate=grid:1.0,0.5",
                "--storage-path",
                str(storage),
                "--name",
                "search",
            ],
        },
    )


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
    assert results["config"]["train_fraction"] == 0.01 and results["config"]["hidden_size"] == 2
    assert [e["epoch"] for e in results["epochs"]] == [1]
    final = results["final"]
    assert 0 < final["valid_ppl"] < 5000 and 0 < final["test_ppl"] < 5000 and final["words_per_sec"] > 0
    assert Path(results["checkpoint"]).is_dir() and Path(results["checkpoint"]).parent == run
    assert (run / "learning_curve.png").is_file()


def test_the_tune_search_runs_on_the_cluster(jobs, storage):
    job = jobs["tune"]
    check_succeeded(job)
    assert "Found multiple active Ray instances" not in job.output
    experiment = storage / "search"
    summary = json.loads((experiment / "search_summary.json").read_text())
    assert summary["trials"] == 2 and summary["status"] == {"TERMINATED": 2}
    assert summary["best"]["hyperparameters"]["learning_rate"] in (1.0, 0.5)
    best = json.loads((experiment / "best_config.json").read_text())
    assert best["learning_rate"] == summary["best"]["hyperparameters"]["learning_rate"]
    runs = sorted((experiment / "train_runs").glob("trial-*/results.json"))
    assert len(runs) == 2
    assert {json.loads(r.read_text())["config"]["learning_rate"] for r in runs} == {1.0, 0.5}


def test_without_a_storage_path_the_run_lands_in_home_not_in_the_working_dir(jobs, head):
    job = jobs["default"]
    check_succeeded(job)
    run = head.temp_dir / "home" / "lstm-ray" / "runs" / "default-run"
    assert json.loads((run / "results.json").read_text())["run_dir"] == str(run)
    assert f"[rectangle] run folder: {run}\n" in job.output  # at the start ...
    assert f"done: rectangle run in {run} (" in job.output  # ... and at the end
    packages = head.temp_dir / "session_latest" / "runtime_resources" / "working_dir_files"
    assert not list(packages.glob("*/runs")) and not list(packages.glob("*/**/results.json"))


def test_the_uploaded_working_dir_is_the_code_only(jobs, head):
    for job in jobs.values():
        assert re.search(r"Uploading package gcs://_ray_pkg_\w+\.zip", job.output) or re.search(
            r"Package gcs://_ray_pkg_\w+\.zip already exists", job.output
        ), job.output[:3000]
    packages = [
        p
        for p in (head.temp_dir / "session_latest" / "runtime_resources" / "working_dir_files").iterdir()
        if p.is_dir()
    ]
    assert packages, "no working_dir package on the head"
    for package in packages:
        files = [p for p in package.rglob("*") if p.is_file()]
        names = {p.relative_to(package).as_posix() for p in files}
        assert {"jobs/ptb.py", "jobs/tune_ptb.py", "lstm/trainer.py", "lstm/data/ptb.py", "tune/cli.py"} <= names
        top = {n.split("/")[0] for n in names}
        assert not top & {".git", ".venv", "venv", "runs", "data"}, sorted(top)
        assert not any("__pycache__" in n for n in names)
        size = sum(p.stat().st_size for p in files)
        assert size < MAX_PACKAGE_BYTES, f"uploaded {size / 2**20:.1f} MiB"


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
