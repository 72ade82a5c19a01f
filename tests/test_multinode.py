"""Several nodes for real: a multi-raylet cluster on this machine (``ray.cluster_utils.Cluster``:
a head with 0 CPUs and three 1-CPU nodes, so two 1-CPU workers cannot share a node).

* A 2-worker PTB run whose workers sit on different nodes, one of which is removed mid-epoch
  (a node loss: its raylet and every process on it gone, not one worker's ``os._exit``),
  costs at most that epoch and ends with the metrics of the same config and seed on 1 worker
  (conftest's ``ptb_base``): batch_size is global, so 2 workers x 10 rows take the same steps
  as 1 worker x 20 rows.
* The workers read no data: they get the corpus the driver read through Ray's object store.
  Their environment points the data cache at an empty folder and the download at a closed
  port, so a worker that looked for data itself would fail.

The module swaps the suite's shared Ray instance out for the cluster and back in afterwards.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import ray
from conftest import (
    TRAIN_POLL_ENV,
    TRAIN_POLL_S,
    WORKER_ENV,
    free_port,
    ptb_base_config,
    run_settings,
    start_session_ray,
)
from hooks import PauseOnce, RecordNode
from ray.cluster_utils import Cluster

from lstm.trainer import fit

KEYS = ("train_loss", "valid_loss")


@pytest.fixture(scope="module")
def cluster(ptb_base, tmp_path_factory):
    """The cluster, once the single-node run it is compared with is done."""
    empty_cache = tmp_path_factory.mktemp("empty-cache")
    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    nodes = [cluster.add_node(num_cpus=1) for _ in range(3)]
    cluster.wait_for_nodes()
    env = {
        **WORKER_ENV,
        TRAIN_POLL_ENV: TRAIN_POLL_S,
        "RAY_ADDRESS": cluster.address,
        "LSTM_CACHE_DIR": str(empty_cache),
        "LSTM_PTB_URL": f"http://127.0.0.1:{free_port()}/closed.tgz",
    }
    ray.init(address=cluster.address, runtime_env={"env_vars": env}, logging_level="WARNING")
    try:
        yield cluster, nodes
    finally:
        ray.shutdown()
        cluster.shutdown()
        start_session_ray()


def losses(history):
    return [tuple(e[k] for k in KEYS) for e in history]


@pytest.fixture(scope="module")
def lost(cluster, ptb_dir, tmp_path_factory):
    """A 2-worker run on the cluster whose rank 1 loses its node mid-epoch 2 (the node is
    removed: its raylet and every process on it gone, not one worker's ``os._exit``).
    Returns the result, the node each rank started on, and the node removed."""
    the_cluster, nodes = cluster
    storage = tmp_path_factory.mktemp("multinode")
    marker = str(storage / "paused")
    outcome: dict = {}

    def run() -> None:
        try:
            settings = run_settings(
                storage, "lost", ptb_dir, num_workers=2, cpus_per_worker=1, max_failures=1, checkpoints_to_keep=5
            )
            hooks = [RecordNode(), PauseOnce(2, 100, marker, rank=1)]
            outcome["result"] = fit("ptb", ptb_base_config(), settings, hooks=hooks)
        except BaseException as e:  # noqa: BLE001 - re-raised below
            outcome["error"] = e

    thread = threading.Thread(target=run)
    thread.start()
    ready = Path(marker + ".ready")
    deadline = time.monotonic() + 300
    while not ready.exists() and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ready.exists(), f"rank 1 never reached epoch 2 step 100: {outcome}"
    node_id = ready.read_text().split()[1]
    [node] = [n for n in nodes if n.node_id == node_id]
    the_cluster.remove_node(node)  # rank 1 waits at epoch 2 step 100: its node goes away under it
    thread.join(timeout=600)
    assert not thread.is_alive() and "error" not in outcome, outcome
    result = outcome["result"]
    # written at epoch 1 step 0, which the restarted group (from epoch 1's checkpoint) does not re-run
    placement = {rank: (Path(result.run_dir) / f".node-{rank}").read_text() for rank in (0, 1)}
    return result, placement, node_id


def test_two_workers_on_two_nodes_reproduce_one_worker(cluster, lost, ptb_base):
    _, nodes = cluster
    result, placement, _ = lost
    print(f"placement: rank 0 on {placement[0][:12]}, rank 1 on {placement[1][:12]}")
    assert placement[0] != placement[1], "the two workers shared a node"
    assert set(placement.values()) <= {n.node_id for n in nodes}, "a worker ran on the head (0 CPUs)"
    one, _, _ = ptb_base
    assert [e["workers"] for e in result.history] == [2, 2] and [e["workers"] for e in one.history] == [1, 1]
    assert [e["samples_seen"] for e in result.history] == [e["samples_seen"] for e in one.history]
    for a, b in zip(losses(one.history), losses(result.history), strict=True):
        assert b == pytest.approx(a, rel=1e-4)
    assert result.final["test_ppl"] == pytest.approx(one.final["test_ppl"], rel=1e-4)


def test_a_node_lost_mid_epoch_costs_at_most_the_epoch(lost):
    result, placement, removed = lost
    assert removed == placement[1], "the node removed was rank 1's"
    run_dir = Path(result.run_dir)
    # it resumed from the checkpoint of epoch 1 instead of starting over: two checkpoints, not three
    assert len([p for p in run_dir.glob("checkpoint_2*") if p.is_dir()]) == 2
    assert [e["epoch"] for e in result.history] == [1, 2]
