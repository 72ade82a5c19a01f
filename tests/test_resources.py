"""Resource requests the cluster can never satisfy: refused at once with one line, or waited for
(boundedly, with a progress line) when an autoscaler can add nodes."""

from __future__ import annotations

import time

import pytest
from conftest import own_lines

from lstm.cli import train_main
from lstm.cluster import alive_nodes, autoscaler_can_add_nodes, plan_workers
from lstm.errors import UserError, run_cli
from lstm.ray_private import STATE_TRACKING, start_train_actors


def node(cpus: float, gpus: float = 0, address: str = "10.0.0.1") -> dict:
    return {"Alive": True, "NodeManagerAddress": address, "Resources": {"CPU": cpus, **({"GPU": gpus} if gpus else {})}}


class FakeClock:
    """Time that passes only when the code under test sleeps."""

    def __init__(self) -> None:
        self.now, self.sleeps = 0.0, []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def test_workers_that_fit_are_planned_without_waiting():
    nodes = alive_nodes([node(2)])
    assert plan_workers(2, 0, 0.0, 0, nodes=lambda: nodes) == 1  # a fair share: one CPU each
    assert plan_workers(1, 0, 0.0, 0, nodes=lambda: nodes) == 2


@pytest.mark.parametrize(
    "workers, cpus, gpus, nodes, message",
    [
        (
            64,
            0,
            0.0,
            [node(2)],
            "64 worker(s) x 1 CPU requested, the cluster has 2 CPUs on 1 node(s) (at most 2 CPUs on one)",
        ),
        # 4 CPUs in all, but no node holds 3 of them
        (
            1,
            3,
            0.0,
            [node(2), node(2, address="10.0.0.2")],
            "1 worker(s) x 3 CPU requested, the cluster has 4 CPUs on 2 node(s) (at most 2 CPUs on one)",
        ),
        (2, 1, 1.0, [node(8)], "2 worker(s) x 1 CPU + 1 GPU requested, the cluster has 8 CPUs, 0 GPUs on 1 node(s)"),
    ],
)
def test_a_group_that_can_never_fit_is_refused_at_once(workers, cpus, gpus, nodes, message):
    clock = FakeClock()
    with pytest.raises(UserError) as info:
        plan_workers(
            workers,
            cpus,
            gpus,
            0,
            nodes=lambda: alive_nodes(nodes),
            sleep=clock.sleep,
            clock=clock,
            request=lambda b: pytest.fail("no autoscaler to ask"),
        )
    assert str(info.value).startswith(message) and "--wait-for-workers-s" in str(info.value)
    assert clock.sleeps == []


def test_an_autoscaler_is_asked_and_waited_for_with_a_progress_line(capsys):
    clock, requests = FakeClock(), []
    grown = alive_nodes([node(0), node(1, address="10.0.0.2"), node(1, address="10.0.0.3")])
    looks = iter([alive_nodes([node(0)])] * 2)  # the plan's look and the progress line's; then the nodes are up

    def nodes():
        return next(looks, grown)

    assert plan_workers(2, 1, 0.0, 100, nodes=nodes, sleep=clock.sleep, clock=clock, request=requests.append) == 1
    assert requests == [[{"CPU": 1.0}] * 2, []]  # the demand the autoscaler scales for, then withdrawn
    lines = own_lines(capsys.readouterr().out)
    assert lines == [
        "waiting for nodes: 2 worker(s) x 1 CPU requested, the cluster has 0 CPUs on 1 node(s) (at most "
        "0 CPUs on one); 100s left (--wait-for-workers-s)"
    ]
    assert clock.sleeps == [15.0]


def test_the_wait_is_bounded():
    clock, requests = FakeClock(), []
    with pytest.raises(UserError, match=r"^2 worker\(s\) x 1 CPU requested, .* after waiting 40s for the autoscaler; "):
        plan_workers(
            2, 1, 0.0, 40, nodes=lambda: alive_nodes([node(0)]), sleep=clock.sleep, clock=clock, request=requests.append
        )
    assert clock.sleeps == [15.0, 15.0, 10.0] and requests[-1] == []


def test_a_plain_local_instance_has_no_autoscaler_that_adds_nodes(ray_session):
    assert autoscaler_can_add_nodes() is False


def test_the_driver_starts_ray_trains_cluster_actors_itself(ray_session, caplog, monkeypatch):
    """``start_train_actors`` reaches the private Ray functions it guards (a Ray upgrade that
    moves them makes it warn), and the actors it creates are the named ones Ray Train looks up."""
    monkeypatch.setenv(STATE_TRACKING, "1")
    with caplog.at_level("WARNING", logger="lstm.ray_private"):
        start_train_actors()
    assert not caplog.records
    ray_session.get_actor("AutoscalingCoordinator", namespace="AutoscalingCoordinator")
    ray_session.get_actor("train_v2_state_actor", namespace="_train_state_actor")


def test_the_job_refuses_64_workers_at_once_with_one_line(ray_session, ptb_dir, tmp_path, capsys):
    argv = ["--config", "test", "--data-dir", str(ptb_dir), "--storage-path", str(tmp_path), "--name", "big"]
    start = time.perf_counter()
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda a: train_main("ptb", a), argv + ["--num-workers", "64"])
    assert exit_info.value.code == 2
    assert own_lines(capsys.readouterr().err) == [
        "error: --batch-size 20 is not a multiple of --num-workers 64; pass a --batch-size that is "
        "(it is the global batch, split over the workers)"
    ]
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda a: train_main("ptb", a), argv + ["--num-workers", "64", "--batch-size", "64"])
    seconds = time.perf_counter() - start
    assert exit_info.value.code == 2
    err = own_lines(capsys.readouterr().err)
    assert err == [
        "error: 64 worker(s) x 1 CPU requested, the cluster has 4 CPUs on 1 node(s) (at most 4 CPUs on "
        "one); lower --num-workers or --cpus-per-worker, add nodes, or pass --wait-for-workers-s SECONDS "
        "to wait for an autoscaler"
    ]
    assert not (tmp_path / "big").exists(), "nothing of the run was written"
    print(f"refused in {seconds:.1f}s")
