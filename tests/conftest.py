"""Shared fixtures: one local Ray instance for the whole session, paths to the shared data."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# ../shared/data beside the checkout (tests and benchmarks only; users download the data).
SHARED_DATA = Path(os.environ.get("LSTM_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray instance shared by every test that needs one (start-up costs seconds).

    4 logical CPUs on this 2-core machine: a 2-worker run plus Ray Train's own actors fit.
    """
    import ray

    from lstm.trainer import WORKER_ENV

    if not ray.is_initialized():
        # Pin the GCS port and tell this cluster's processes its address: Ray Train's
        # placement-group cleaner looks the controller up through Ray's state API, which
        # otherwise auto-detects "the" cluster and can pick another one on this machine
        # (e.g. the head a job-submission test starts), then frees a live run's workers.
        port = free_port()
        os.environ["RAY_GCS_SERVER_PORT"] = str(port)
        try:
            ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level="WARNING",
                     runtime_env={"env_vars": {**WORKER_ENV, "RAY_ADDRESS": f"127.0.0.1:{port}"}})
        finally:
            del os.environ["RAY_GCS_SERVER_PORT"]
    yield ray
    ray.shutdown()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
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
