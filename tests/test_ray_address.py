"""Which Ray a job runs on (lstm.cluster.ray_address): the cluster in $RAY_ADDRESS, else the one
the latest `ray start` on this machine left its address for, else a local instance of its own;
and an address where no cluster answers refused in one line, before Ray is asked to connect
(it would retry for minutes). The job joining a real `ray start --head` this way is in
tests/test_job_submit.py. At its exit, a job that started its own instance stops the instance's
autoscaler monitor before Ray's shutdown stops the GCS (lstm.cluster.stop_autoscaler_monitor)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Iterator

import pytest
from conftest import QUICK_COMMAND_S, RAY_COMMAND_S, REPO

from lstm.cluster import check_address, ray_address
from lstm.errors import UserError
from lstm.ray_private import stop_autoscaler_monitor


@pytest.fixture
def dead_port() -> Iterator[int]:
    """A port of 127.0.0.1 where nothing listens, held for the test (bound, never listening:
    a connection is refused, and no other process can start listening there meanwhile)."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        yield held.getsockname()[1]


@pytest.fixture
def ray_tmpdir(tmp_path, monkeypatch) -> Path:
    """An empty temp dir of Ray's for this test (no `ray start` recorded), RAY_ADDRESS unset."""
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    (tmp_path / "ray").mkdir()
    return tmp_path


def record_ray_start(ray_tmpdir: Path, address: str) -> None:
    """What `ray start --head` leaves for the next `ray.init()` on the machine."""
    (ray_tmpdir / "ray" / "ray_current_cluster").write_text(address)


def test_nothing_recorded_means_a_local_instance(ray_tmpdir):
    assert ray_address() is None


def test_the_latest_ray_start_is_joined(ray_tmpdir):
    record_ray_start(ray_tmpdir, "10.1.2.3:6379")
    assert ray_address() == "10.1.2.3:6379"


def test_ray_address_comes_first(ray_tmpdir, monkeypatch):
    record_ray_start(ray_tmpdir, "10.1.2.3:6379")
    monkeypatch.setenv("RAY_ADDRESS", "10.9.9.9:6379")
    assert ray_address() == "10.9.9.9:6379"
    monkeypatch.setenv("RAY_ADDRESS", "local")  # Ray's word for "start one of your own"
    assert ray_address() is None


def test_a_listening_address_passes():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        check_address(f"127.0.0.1:{server.getsockname()[1]}")


def test_a_dead_ray_address_names_the_variable(monkeypatch, dead_port):
    port = dead_port
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
    with pytest.raises(UserError) as error:
        check_address(f"127.0.0.1:{port}")
    message = str(error.value)
    assert message.startswith(f"no Ray cluster answers at $RAY_ADDRESS=127.0.0.1:{port} (ConnectionRefusedError")
    assert "unset it to run on a local Ray instance" in message


def test_a_dashboard_url_in_ray_address_is_refused(monkeypatch):
    """Ray's job docs export RAY_ADDRESS=http://127.0.0.1:8265 for `ray job submit`."""
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")
    with pytest.raises(UserError, match=r"^\$RAY_ADDRESS=http://127.0.0.1:8265 is an HTTP address .*<head ip>:6379"):
        check_address(ray_address())


def test_ray_client_and_auto_are_left_to_ray():
    check_address("ray://10.1.2.3:10001")  # nothing listens there; Ray Client connects itself
    check_address("auto")


def test_a_dead_recorded_address_stops_the_job_in_one_line_before_ray_starts(ray_tmpdir, tmp_path, dead_port):
    """`ray start --head --block` stopped with Ctrl-C (or a head killed) leaves its address
    behind; a plain `ray.init()` would retry it for minutes."""
    port = dead_port
    record_ray_start(ray_tmpdir, f"127.0.0.1:{port}")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "jobs/rectangle.py", "--config", "test", "--storage-path", str(tmp_path / "runs")]
    done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=QUICK_COMMAND_S)
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.splitlines()[-1].startswith(
        f"error: no Ray cluster answers at 127.0.0.1:{port}, the address the latest `ray start` on this machine left"
    )
    assert "`ray stop` to forget it" in done.stderr
    assert not list((ray_tmpdir / "ray").glob("session_*"))  # no Ray instance was started


@pytest.mark.slow  # starts a Ray instance, in a child process
def test_a_job_that_started_ray_kills_its_autoscaler_monitor_while_the_gcs_runs(monkeypatch):
    """Ray's shutdown stops the GCS, then gives the monitor SIGTERM and a second to report its
    end to that GCS, then kills it: a second of every local run's exit. The job's exit hook kills
    it first; a hook registered before ``ensure_ray`` runs after that one, before Ray's shutdown."""
    script = textwrap.dedent(
        """
        import atexit, functools
        import ray
        from ray._private import worker
        from lstm import cluster

        # No dashboard: one on Ray's default port would answer the state API queries of the
        # suite's own instance (tests/conftest.py, start_session_ray).
        ray.init = functools.partial(ray.init, include_dashboard=False)
        seen = {}
        atexit.register(lambda: print("at exit:", seen["monitor"].poll(), seen["gcs"].poll(), flush=True))
        assert cluster.ensure_ray()  # a local instance of its own
        seen["monitor"] = worker._global_node.all_processes["monitor"][0].process
        seen["gcs"] = worker._global_node.all_processes["gcs_server"][0].process
        print("running:", seen["monitor"].poll(), flush=True)
        """
    )
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    # Ray's socket paths must stay under 108 bytes; its processes may still be exiting at cleanup.
    with tempfile.TemporaryDirectory(dir="/tmp", ignore_cleanup_errors=True) as short:
        env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_TMPDIR": short}
        done = subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=RAY_COMMAND_S
        )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith(("running:", "at exit:"))]
    assert lines == ["running: None", "at exit: -9 None"]  # the monitor killed, the GCS still up
    assert "could not stop Ray's autoscaler monitor" not in done.stderr
    assert "The autoscaler failed" not in done.stderr


def test_stopping_the_monitor_warns_when_ray_moved_its_processes(monkeypatch, caplog):
    """The private attributes it reads are guarded: gone, it warns and leaves the exit to Ray."""
    from ray._private import worker

    monkeypatch.setattr(worker, "_global_node", object())
    with caplog.at_level("WARNING", logger="lstm.ray_private"):
        stop_autoscaler_monitor()
    assert [r.getMessage() for r in caplog.records] == [
        "could not stop Ray's autoscaler monitor early (AttributeError: 'object' object has no attribute 'head')"
    ]


# --------------------------------------------------------------------------- beside another instance

NO_DASHBOARD_JOB = textwrap.dedent(
    """
    import functools, runpy, sys
    import ray

    # No dashboard on Ray's default port, which the suite's instance names as its state API
    # (tests/conftest.py, start_session_ray).
    ray.init = functools.partial(ray.init, include_dashboard=False)
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
    """
)


def run_own_instance_job(*argv: str) -> subprocess.CompletedProcess:
    """A plain job that starts a local Ray instance of its own while the suite's runs (both in
    Ray's default temp dir, as two jobs of one user are); stdout and stderr in one stream, in
    the order they were written."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_ADDRESS": "local"}
    command = [sys.executable, "-c", NO_DASHBOARD_JOB, *argv]
    return subprocess.run(
        command, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=RAY_COMMAND_S
    )


def test_a_job_beside_another_ray_instance_runs_quietly(ray_session, tmp_path):
    done = run_own_instance_job("jobs/rectangle.py", "--config", "test", "--storage-path", str(tmp_path))
    assert done.returncode == 0, done.stdout[-3000:]
    assert "multiple active Ray instances" not in done.stdout and "Traceback" not in done.stdout
    assert done.stdout.splitlines()[-1].startswith("  time:")


def test_a_job_that_stops_with_an_error_prints_it_last(ray_session, tmp_path, ptb_dir):
    argv = ["--config", "test", "--train-fraction", "0.005", "--learning-rate", "1e30", "--max-max-epoch", "1"]
    done = run_own_instance_job("jobs/ptb.py", *argv, "--data-dir", str(ptb_dir), "--storage-path", str(tmp_path))
    assert done.returncode == 2, done.stdout[-3000:]
    assert done.stdout.splitlines()[-1].startswith("error: the loss became"), done.stdout[-3000:]
    assert "Traceback" not in done.stdout
