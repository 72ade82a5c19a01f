"""A Ray head of its own for a test: `ray start --head --block` in a temp dir with free ports, on
127.0.0.1 only, jobs submitted to it with `ray job submit` the way the README does, and the head
stopped again.

Token authentication (Ray 2.59+): `ray start --head` turns it on when ~/.ray/auth_token exists
(every local `ray.init()` writes one), and a client without RAY_AUTH_MODE=token then sends no
token. The README therefore says `export RAY_AUTH_MODE=token` in the shell that runs
`ray start` and `ray job submit`; :func:`running_head` does the same, with the token in a file
of its own (RAY_AUTH_TOKEN_PATH) so that it never touches ~/.ray.

The head is stopped through its own process (`ray start --block` shuts the node down on
SIGTERM), then whatever is left of the processes it started (its process group and their
children) is killed: never `ray stop`, which would stop every Ray instance on the machine,
the test session's own included.
"""

from __future__ import annotations

import contextlib
import json
import os
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
from typing import Any, Iterator

from conftest import (
    QUICK_COMMAND_S,
    RAY_COMMAND_S,
    REPO,
    SERVER_START_S,
    TRAIN_POLL_ENV,
    TRAIN_POLL_S,
    free_ports,
    wait_for_http,
)
from processes import process_table

from lstm.cluster import HEAD_RAY_CONFIG

# For all the jobs at once: measured 60 to 80 s on 2 busy cores, the limit is 7x that (conftest).
JOB_TIMEOUT_S = RAY_COMMAND_S

# The jobs the suite submits to its one head (conftest's `head_jobs`), all at once:
# * "default": the rectangle job without --storage-path nor $LSTM_RAY_STORAGE (the default place);
# * "ptb": the tutorial's test config on 1% of the training words, evaluated in steps of 35 words;
# * "search": a 2-trial rectangle search (a grid over the learning rate), 2 epochs each, with
#   --grace-period 2 = --max-epochs so that ASHA stops none of them: nothing on its job page failed.
SEARCH_LEARNING_RATES = (0.003, 0.0001)


def suite_jobs(storage: Path, ptb_dir: Path) -> dict[str, list[str]]:
    """The entrypoints of the jobs above (``python jobs/...``), outputs under ``storage``."""
    grid = ",".join(str(v) for v in SEARCH_LEARNING_RATES)
    default = ["python", "jobs/rectangle.py", "--config", "test", "--name", "default-run"]
    ptb = ["python", "jobs/ptb.py", "--config", "test", "--train-fraction", "0.01", "--eval-num-steps", "35"]
    ptb += ["--data-dir", str(ptb_dir), "--storage-path", str(storage), "--name", "ptb-run"]
    search = ["python", "jobs/search.py", "--task", "rectangle", "--base", "test", "--max-epochs", "2"]
    search += ["--grace-period", "2", "--num-samples", "1", "--space", "hidden_size=16", f"learning_rate=grid:{grid}"]
    search += ["--storage-path", str(storage), "--name", "search"]
    one_worker = ["--cpus-per-worker", "1", "--max-failures", "0"]
    return {"default": default + one_worker, "ptb": ptb + one_worker, "search": search}


# --------------------------------------------------------------------------- ports


# --------------------------------------------------------------------------- processes


def processes_of(group: int) -> dict[int, str]:
    """The processes of process group ``group`` and all their descendants (Ray's workers make
    process groups of their own under the raylet): pid -> start time."""
    table = process_table()
    found = {pid for pid, p in table.items() if p.group == group}
    while True:
        more = {pid for pid, p in table.items() if p.ppid in found} - found
        if not more:
            return {pid: table[pid].started for pid in found}
        found |= more


def kill_remaining(snapshot: dict[int, str]) -> list[int]:
    """SIGKILL the processes of ``snapshot`` that still run (same pid and start time)."""
    table = process_table()
    killed = []
    for pid, started in snapshot.items():
        if pid in table and table[pid].started == started:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except ProcessLookupError:
                pass
    return killed


# --------------------------------------------------------------------------- the head


@dataclass
class Head:
    temp_dir: Path  # its bin/, home/, token; Ray's files under ray/ (session_latest/ ...)
    gcs_port: int
    url: str  # the dashboard / jobs API
    env: dict[str, str]  # what the README's shell has: RAY_AUTH_MODE=token, the token, ray on PATH
    token_file: Path
    proc: subprocess.Popen

    def ray(
        self, *args: str, env: dict[str, str] | None = None, timeout: float = QUICK_COMMAND_S
    ) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["ray", *args], env=env or self.env, cwd=REPO, capture_output=True, text=True, timeout=timeout
        )

    @property
    def token(self) -> str:
        return self.token_file.read_text()

    def get(self, path: str) -> Any:
        """GET ``path`` of the dashboard's HTTP API (with the token), as JSON."""
        request = urllib.request.Request(f"{self.url}{path}", headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(request, timeout=30) as r:
            return json.load(r)


def shell_env(bin_dir: Path, **extra: str) -> dict[str, str]:
    """This environment without any RAY_* setting (the session's own Ray instance may have put
    RAY_AUTH_MODE or RAY_ADDRESS there), with `python` and `ray` of this interpreter first on PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
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


def wait_until_ready(proc: subprocess.Popen, url: str, token: str, log: Path, timeout: float = SERVER_START_S) -> None:
    """Until the head's jobs API answers (conftest.wait_for_http, with the token)."""
    wait_for_http(f"{url}/api/jobs/", proc, log, timeout, headers={"Authorization": f"Bearer {token}"})


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


@contextlib.contextmanager
def running_head(num_cpus: int) -> Iterator[Head]:
    """A head with ``num_cpus`` logical CPUs, token authentication on; stopped on exit."""
    # Short: Ray's unix socket paths under it must stay below 108 bytes.
    temp_dir = Path(tempfile.mkdtemp(prefix="lstm-rj-", dir="/tmp"))
    make_bin(temp_dir / "bin")
    token_file = temp_dir / "auth_token"
    token_file.write_text(secrets.token_hex(32))
    token_file.chmod(0o600)
    # HOME of its own: where a job without --storage-path writes (~/lstm-ray/runs), kept in the test
    (temp_dir / "home").mkdir()
    # RAY_TMPDIR: where a user's shell has /tmp. `ray start` keeps the head's address in the
    # temp dir's ray/ray_current_cluster, where a plain `ray.init()` in that shell finds it.
    env = shell_env(
        temp_dir / "bin",
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN_PATH=str(token_file),
        HOME=str(temp_dir / "home"),
        RAY_TMPDIR=str(temp_dir),
        **HEAD_RAY_CONFIG,  # as cluster.yaml starts its head
    )
    gcs, dashboard, agent, client = free_ports(4)
    url = f"http://127.0.0.1:{dashboard}"
    log = temp_dir / "ray-start.log"
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
        str(num_cpus),
        "--temp-dir",
        str(temp_dir / "ray"),
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


# --------------------------------------------------------------------------- jobs


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
    return head.get(f"/api/jobs/{submission_id}")["status"]
