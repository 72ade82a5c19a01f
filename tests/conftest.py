"""Shared fixtures: one local Ray instance for the whole session, paths to the shared data, a
real MLflow tracking server; the slow marker."""

from __future__ import annotations

import os
import re
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
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import hooks  # noqa: E402  (tests/hooks.py: worker hooks, sent to the workers by value)
import ray  # noqa: E402
import ray.cloudpickle  # noqa: E402
from processes import RayWatch  # noqa: E402

from lstm.cluster import LOCAL_DRIVER_ENV, LOCAL_RAY_CONFIG, WORKER_ENV, init_ray  # noqa: E402
from lstm.data.download import DATASETS  # noqa: E402
from lstm.ray_private import stop_autoscaler_monitor  # noqa: E402

ray.cloudpickle.register_pickle_by_value(hooks)

# ../shared/data beside the checkout (tests and benchmarks only; users download the data).
SHARED_DATA = Path(os.environ.get("LSTM_SHARED_DATA", REPO.parent / "shared" / "data"))

# Time limits of the commands the tests run as child processes and of the waits for a server to
# answer. They end a test that hangs, with what the command printed; none decides what passes.
# Measured on the project's 2-core machine with other work running (load average 10 to 40):
# * a command that stops before Ray starts (a one-line error, --print-config): 4 to 21 s, its
#   imports of torch and Ray; `score` or `python -m tune.report` of a small run: up to 30 s;
# * a job that starts or joins Ray and trains a test config: 25 to 60 s;
# * moto's S3 server, the MLflow server, TensorBoard, a `ray start --head`: 2 to 30 s to answer.
# Each limit is 10x the slowest of its kind.
QUICK_COMMAND_S = 300
RAY_COMMAND_S = 600
SERVER_START_S = 300


# Ports a test server or Ray instance is told to use come from below Linux's ephemeral range
# (/proc/sys/net/ipv4/ip_local_port_range, 32768-60999 by default): a port the kernel handed out
# for bind(0) is free again once closed, and any process's next bind(0) or outgoing connection
# may take it before the server binds it (a Ray head then loses a process and stops).
UNEPHEMERAL_PORTS = range(20000, 32000)


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports below the ephemeral range that nothing on 127.0.0.1 holds now."""
    import random
    import socket

    found: list[int] = []
    while len(found) < n:
        port = random.choice(UNEPHEMERAL_PORTS)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        if port not in found:
            found.append(port)
    return found


def free_port() -> int:
    return free_ports(1)[0]


# Each test process (pytest-xdist runs two) keeps its Ray files under a temp dir of its own. A
# plain `ray.init()` joins the cluster whose address is in <temp dir>/ray/ray_current_cluster,
# which ray.cluster_utils.Cluster writes (tests/test_multinode.py): a job another process
# starts meanwhile must not join that cluster. (Assigned, not defaulted: the workers inherit the
# environment of pytest's main process, which reads this file too.)
os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix=f"lstm-{os.environ.get('PYTEST_XDIST_WORKER', 'main')}-")

# A local S3 API (moto's server, started by the `s3` fixture) for the tests of S3 storage.
# Its address and dummy credentials are in the environment before Ray starts, so that Ray's
# workers and Train controllers, which write checkpoints there, see them too.
S3_PORT = free_port()
os.environ.update(
    {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{S3_PORT}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
)
for _var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
    os.environ.pop(_var, None)


# Ray prints the logs of its actors and workers on the driver's stdout/stderr, prefixed with the
# process ("(PlacementGroupCleaner pid=123)", "(RayTrainWorker pid=7, ip=10.0.0.2)"), and its
# raylets' and autoscaler's warnings ("(raylet) ... is over 95% full"), often in colour, whenever
# they arrive (ray/_private/worker.py, print_worker_logs): a test of what the job itself printed
# leaves those lines out.
RAY_LOG_LINE = re.compile(r"^(?:\x1b\[[0-9;]*m)*\((?:(?:[^()]* )?pid=\d+|raylet|autoscaler \+[^,)]*)(?:, ip=[^)]*)?\)")


def own_lines(text: str) -> list[str]:
    """The lines of captured output that this process printed, not Ray's forwarded logs."""
    return [line for line in text.strip().splitlines() if not RAY_LOG_LINE.match(line)]


TRAIN_POLL_ENV, TRAIN_POLL_S = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5"


def closed_url() -> str:
    """An http:// URL on 127.0.0.1 where nothing listens."""
    return f"http://127.0.0.1:{free_port()}/closed.tgz"


# The environment of the session's workers: an empty data cache, and every dataset's download
# at a port where nothing listens, so that a worker that looked for data itself (a run's
# settings reach the workers without their --data-dir) would fail.
NO_DATA_ON_WORKERS = {
    "LSTM_CACHE_DIR": tempfile.mkdtemp(prefix="lstm-empty-cache-"),
    **{f"LSTM_{name.upper()}_URL": closed_url() for name in DATASETS},
}


def pytest_unconfigure(config):
    """This process's temp dirs (Ray's session files are megabytes) go with it: a machine that
    runs the suite day after day keeps none of them."""
    for path in (os.environ["RAY_TMPDIR"], NO_DATA_ON_WORKERS["LSTM_CACHE_DIR"]):
        shutil.rmtree(path, ignore_errors=True)


def start_session_ray() -> None:
    """The suite's local Ray instance: 4 logical CPUs on this 2-core machine (a 2-worker run
    plus Ray Train's own actors fit), no dashboard.

    Its GCS port is pinned and its processes are told its address: Ray Train's placement-group
    cleaner looks the controller up through Ray's state API, which otherwise auto-detects
    "the" cluster and can pick another one on this machine (e.g. the head a job-submission
    test starts), then frees a live run's workers. Ray Train's controller polls its workers
    every 2 s by default, and every run waits on that poll a few times: here every 0.5 s.

    The workers read no data (:data:`NO_DATA_ON_WORKERS`): every run of a task that reads data
    shows that its workers take what the driver read, through Ray's object store.

    Without a dashboard, Ray still records 127.0.0.1:8265 as the instance's state API, so no
    test may start another instance with a dashboard on that default port while the suite runs:
    the cleaner would ask that one, not find the controller, and remove a live run's workers."""

    port = free_port()
    os.environ["RAY_GCS_SERVER_PORT"] = str(port)
    os.environ[TRAIN_POLL_ENV] = os.environ.get(TRAIN_POLL_ENV, TRAIN_POLL_S)
    os.environ.update({**LOCAL_DRIVER_ENV, **LOCAL_RAY_CONFIG})  # as lstm.cluster.ensure_ray does for a local instance
    env = {
        **WORKER_ENV,
        **LOCAL_DRIVER_ENV,
        "RAY_ADDRESS": f"127.0.0.1:{port}",
        TRAIN_POLL_ENV: os.environ[TRAIN_POLL_ENV],
        **NO_DATA_ON_WORKERS,
    }
    try:
        # as a job starts its own: the agent on a free port, the workers' environment inherited
        init_ray(None, env, num_cpus=4, include_dashboard=False, logging_level="WARNING")
    finally:
        del os.environ["RAY_GCS_SERVER_PORT"]


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance shared by every test that needs one (start-up costs seconds)."""
    import ray

    if not ray.is_initialized():
        start_session_ray()
    yield ray
    stop_autoscaler_monitor()  # as a job's exit does: Ray's shutdown would wait a second for it
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on 127.0.0.1:S3_PORT for the whole session (stopped at the end)."""
    import subprocess
    import time
    import urllib.request

    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(S3_PORT)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + SERVER_START_S
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{S3_PORT}/", timeout=2).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail("moto's S3 server did not start")
            time.sleep(0.2)
    yield f"127.0.0.1:{S3_PORT}"
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture
def s3(s3_server) -> str:
    """A fresh, empty bucket on the local S3 server: returns its name."""
    import uuid

    import boto3

    bucket = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    return bucket


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module that trains in the test process
    (``pytestmark = pytest.mark.usefixtures("one_torch_thread")``): on a small shared machine,
    OpenMP threads waiting for each other make these small ops many times slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def ptb_dir() -> Path:
    d = SHARED_DATA / "ptb"
    if not (d / "ptb.train.txt").is_file():
        pytest.skip(f"PTB data not found at {d}")
    return d


@pytest.fixture
def char_dir() -> Path:
    d = SHARED_DATA / "char"
    if not (d / "nietzsche.txt").is_file():
        pytest.skip(f"char corpora not found at {d}")
    return d


def ptb_base_config():
    """The tutorial's test config on 2% of the training words (18.6k words, 464 steps per
    epoch), two epochs so that the second runs at lr * lr_decay; evaluation in steps of 35 words."""
    from lstm.tasks.ptb_config import PRESETS, PTBConfig

    return PTBConfig(**{**PRESETS["test"], "max_max_epoch": 2, "train_fraction": 0.02, "eval_num_steps": 35})


def ptb_epoch_words(data_dir: Path, fraction: float, batch_size: int = 20, num_steps: int = 2) -> int:
    """The words one PTB epoch trains on, counted from ``ptb.train.txt`` as the tutorial's
    reader and producer count them: every newline is a word (<eos>); the leading ``fraction``
    of the words is cut into ``batch_size`` rows; a step takes ``num_steps`` columns, and the
    last column of a row is only a target."""
    words = len((data_dir / "ptb.train.txt").read_text().replace("\n", " <eos> ").split())
    row = int(words * fraction) // batch_size
    return batch_size * num_steps * ((row - 1) // num_steps)


# One CPU per worker in the suite's runs unless a test asks for more: the suite's two processes
# share 2 cores, and a worker with two threads on a small model spends its time waiting for its
# other thread (bench/README.md, `bench/worker_threads.py`: ptb_base_config's run trained and
# evaluated 8.6x slower with 2 threads than with 1 on the busy 2-core machine).
TEST_CPUS_PER_WORKER = 1


def run_settings(storage: Path, name: str, data_dir: Path | None = None, **kw: Any):
    """RunSettings of a test run called ``name`` under ``storage`` (no retries unless asked,
    :data:`TEST_CPUS_PER_WORKER`)."""
    from lstm import config as cfg

    where = {"storage_path": str(storage), "name": name, "data_dir": str(data_dir or "")}
    return cfg.RunSettings(**where, **{"max_failures": 0, "cpus_per_worker": TEST_CPUS_PER_WORKER, **kw})


def rect_base_config():
    """The rectangle task's test config: 2 epochs of 300 shapes."""
    from lstm import config as cfg
    from lstm.tasks.rectangle import RectangleTask, ShapeConfig

    return cfg.build(ShapeConfig, RectangleTask.presets["test"])


def rect_metrics(history: list[dict]) -> list[dict]:
    """What a rectangle run's epochs computed, their timings aside: a run that trained,
    evaluated and drew the same shapes has the same values, to the bit."""
    keys = ("samples_seen", "train_loss", "valid_loss", "valid_consistency", "valid_width_std", "steps", "extras")
    return [{k: e.get(k) for k in keys} for e in history]


@pytest.fixture(scope="session")
def ptb_base(ray_session, ptb_dir, tmp_path_factory):
    """One 1-worker PTB run of :func:`ptb_base_config` (one thread), for the PTB job's own
    figures and as the run that trials of the same config must reproduce:
    ``(result, storage folder, data folder)``; the run is called "base". Its controller
    records what it imported in ``controller-imports.json`` (tests/hooks.py)."""
    from lstm.trainer import fit

    storage = tmp_path_factory.mktemp("ptb-base")
    record = hooks.controller_imports_recorder(str(storage / "controller-imports.json"))
    return fit("ptb", ptb_base_config(), run_settings(storage, "base", ptb_dir), callbacks=[record]), storage, ptb_dir


@pytest.fixture(scope="session")
def rect_base(ray_session, tmp_path_factory):
    """One uninterrupted 2-worker run of :func:`rect_base_config`, shared by the tests that
    compare against it or copy it (a worker killed mid-run, a node lost mid-run, damaged
    checkpoints, a resumed run): ``(result, storage folder)``; the run is called "base"."""
    from lstm.trainer import fit

    storage = tmp_path_factory.mktemp("rect-base")
    return fit("rectangle", rect_base_config(), run_settings(storage, "base", num_workers=2)), storage


# --------------------------------------------------------------------------- slow tests

# Tests that use these fixtures of this file, directly or through another fixture, start Ray, a
# head, a server or a browser: marked slow (`pytest -m 'not slow'` runs the rest, the unit tier).
# A fixture of a test module with one of these names is another fixture (tests/test_cluster.py's
# `cluster` is a parsed YAML file): what counts is where the fixture is defined. Test modules
# that start them without such a fixture mark themselves; a test of the unit tier that starts
# Ray all the same fails (`check_unit_tier`).
SLOW_FIXTURES = frozenset({"ray_session", "head", "s3_server", "mlflow_server"})


def uses_slow_fixture(item: pytest.Item) -> bool:
    """Whether ``item`` uses one of this file's :data:`SLOW_FIXTURES` (through pytest's fixture
    definitions of the item, a private attribute: the last definition of a name is the one used)."""
    defs = getattr(getattr(item, "_fixtureinfo", None), "name2fixturedefs", {})
    return any(
        name in SLOW_FIXTURES and defs.get(name) and defs[name][-1].func.__module__ == __name__
        for name in getattr(item, "fixturenames", ())
    )


def pytest_collection_modifyitems(config, items):
    for item in items:
        if uses_slow_fixture(item):
            item.add_marker(pytest.mark.slow)
        for group in GROUP_FIXTURES & set(getattr(item, "fixturenames", ())):  # the map below must name their modules
            if parallel_group(item.nodeid) != group:
                raise pytest.UsageError(f"{item.nodeid} uses `{group}`: add its module to SHARED_FIXTURE_GROUPS")
    items.sort(key=lambda item: group_rank(parallel_group(item.nodeid)))


# The unit tier starts no Ray: while a test not marked slow sets up, runs and tears down, a
# RayWatch (tests/processes.py) looks for Ray processes started below this process, and the
# test's teardown fails if it saw any (or if Ray is initialized in this process afterwards and
# was not before): `check_unit_tier`, called by `pytest_runtest_teardown` below.
RAY_WATCH = pytest.StashKey["tuple[RayWatch, bool]"]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    if item.get_closest_marker("slow") is None:
        item.stash[RAY_WATCH] = (RayWatch(), ray.is_initialized())
    return (yield)


def check_unit_tier(item: pytest.Item) -> None:
    """Fail ``item`` if it is a test of the unit tier that started Ray (see above)."""
    if RAY_WATCH not in item.stash:
        return
    watch, initialized = item.stash[RAY_WATCH]
    started = watch.stop()
    if ray.is_initialized() and not initialized:
        started.append("ray.init() in this process")
    if started:
        pytest.fail(
            f"a test of the unit tier (not marked slow) started Ray: {', '.join(started)}; mark it "
            "pytest.mark.slow, or use conftest's ray_session",
            pytrace=False,
        )


# --------------------------------------------------------------------------- parallel workers

# The README's test command runs the suite in 2 processes (pytest-xdist, `-n 2`, set in
# pyproject.toml), with the scheduler below: the tests of one group run in one process, one
# after another, so that a costly fixture they share is built once, and the costliest groups
# are handed out first, so that no long group starts last. Every process has its own session
# Ray instance (and S3 or MLflow server when its tests need one).
SHARED_FIXTURE_GROUPS = {  # test module (or module::test) -> the group sharing a session fixture
    "test_dashboards": "head",  # conftest's `head` and `head_jobs`
    "test_job_submit": "head",
    "test_fault": "rect_base",  # conftest's `rect_base`
    "test_multinode": "rect_base",
    "test_rectangle": "rect_base",
    "test_ptb_job": "ptb_base",  # conftest's `ptb_base`
    "test_tune::test_one_worker_trials_two_worker_trials_and_the_job_train_alike": "ptb_base",
}
GROUP_FIXTURES = frozenset({"head", "rect_base", "ptb_base"})  # session fixtures that name their group
SPLIT_MODULES = frozenset({"test_tune", "test_s3", "test_search_paths"})  # independent costly tests: a group each
GROUPS_FIRST = [
    "rect_base",
    "head",
    "test_tune::test_pbt_clones_better_trials_and_mutates_the_learning_rate",
    "ptb_base",
    "test_char",
    "test_tune::test_asha_search_interrupted_then_resumed",
    "test_tune::test_ptb_asha_search_and_best_config_runs_as_is",
    "test_s3::test_a_search_on_s3_writes_its_report_to_the_bucket_and_resumes",
    "test_search_paths::test_a_trial_stopped_by_asha_frees_the_cpus_the_next_trial_waits_for",
]


def parallel_group(nodeid: str) -> str:
    """The group of the test ``nodeid`` ("tests/test_x.py::test_y[param]")."""
    path, _, name = nodeid.partition("::")
    module = Path(path).stem
    test = f"{module}::{name.split('[')[0]}"
    if test in SHARED_FIXTURE_GROUPS:
        return SHARED_FIXTURE_GROUPS[test]
    if module in SPLIT_MODULES:
        return test
    return SHARED_FIXTURE_GROUPS.get(module, module)


def group_rank(group: str) -> int:
    return GROUPS_FIRST.index(group) if group in GROUPS_FIRST else len(GROUPS_FIRST)


def pytest_xdist_make_scheduler(config, log):
    """pytest-xdist's scope scheduler, with :func:`parallel_group` as the scope, in collection
    order (which :func:`pytest_collection_modifyitems` sorts by :data:`GROUPS_FIRST`)."""
    from xdist.scheduler import LoadScopeScheduling

    class GroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return parallel_group(nodeid)

    config.option.loadscopereorder = False
    return GroupScheduling(config, log)


# Session fixtures that a test process stops as soon as its next test does not use them (the
# group map above keeps their tests together): an idle head's dozen processes would otherwise
# take their share of the 2 cores until the session ends. A later test that asks for one again
# gets a new one. (pytest's FixtureDef.finish, through two private attributes of the item.)
RELEASE_EARLY = ("head",)


def release_early(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    request = getattr(item, "_request", None)
    fixturedefs = getattr(getattr(item, "_fixtureinfo", None), "name2fixturedefs", {})
    if request is None:
        return
    for name in RELEASE_EARLY:
        if name in item.fixturenames and (nextitem is None or name not in nextitem.fixturenames):
            for fixturedef in fixturedefs.get(name, ()):
                fixturedef.finish(request)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item, nextitem):
    """After a test's own teardown: stop what :data:`RELEASE_EARLY` names once the next test
    does not use it, then fail a test of the unit tier that started Ray."""
    result = yield
    release_early(item, nextitem)
    check_unit_tier(item)
    return result


# --------------------------------------------------------------------------- a Ray head


@pytest.fixture(scope="session")
def head():
    """One `ray start --head` of the suite's own (tests/ray_head.py), for the tests of
    `ray job submit` and of the dashboards; 4 logical CPUs: the jobs below run at once."""
    from ray_head import running_head

    if not Path("/proc/self/stat").is_file():
        pytest.skip("needs Linux /proc (to stop the head's processes)")
    with running_head(num_cpus=4) as h:
        yield h


@pytest.fixture(scope="session")
def head_jobs(head, tmp_path_factory):
    """``(jobs, storage)``: ray_head.suite_jobs submitted to the head at once, all finished."""
    from ray_head import submit_all, suite_jobs

    ptb_dir = SHARED_DATA / "ptb"
    if not (ptb_dir / "ptb.train.txt").is_file():
        pytest.skip(f"PTB data not found at {ptb_dir}")
    storage = tmp_path_factory.mktemp("head-runs")
    return submit_all(head, storage, suite_jobs(storage, ptb_dir)), storage


# --------------------------------------------------------------------------- MLflow


@dataclass
class MlflowServer:
    uri: str
    root: Path  # the SQLite database and the artifacts


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1: SQLite backend and artifacts in a temp dir, one
    worker; stopped (its own process group) at the end of the session."""
    pytest.importorskip("mlflow", reason="mlflow is not installed (pip install -e '.[test]')")
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    log = root / "server.log"
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination",
        str(root / "artifacts"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    # MLflow 3's server also starts a job runner (a dozen huey consumer processes, each importing
    # mlflow) for server-side jobs that tracking never uses: off, it starts in a fraction of the CPU.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with open(log, "w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    try:
        wait_for_http(f"{uri}/health", proc, log, timeout_s=SERVER_START_S)
        yield MlflowServer(uri, root)
    finally:
        stop_group(proc)


def wait_for_http(
    url: str, proc: subprocess.Popen, log: Path, timeout_s: float, headers: dict[str, str] | None = None
) -> None:
    """Until ``url`` answers 200 (fail if ``proc`` exits first or time runs out)."""
    deadline = time.monotonic() + timeout_s
    request = urllib.request.Request(url, headers=headers or {})
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{' '.join(proc.args[:2])} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(request, timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    pytest.fail(f"{url} did not answer within {timeout_s:.0f}s:\n{log.read_text()[-3000:]}")


def stop_group(proc: subprocess.Popen, timeout_s: float = 20) -> None:
    """SIGTERM the process group ``proc`` leads (started with start_new_session), then SIGKILL."""
    for sig, wait in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            os.killpg(proc.pid, 0)  # anything left in the group?
        except subprocess.TimeoutExpired:
            continue
        except ProcessLookupError:
            return
