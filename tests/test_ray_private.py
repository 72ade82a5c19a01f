"""What lstm.ray_private relies on in Ray's private modules, reached strictly: each test fails
when a Ray upgrade moves it, where the workaround itself would only warn."""

from __future__ import annotations

import logging
import os
import time

import pytest

from lstm import ray_private


def callback_types(trainer: type) -> set[type]:
    return {type(c) for c in trainer(lambda: None)._create_default_callbacks()}


def test_ray_train_adds_the_callbacks_that_slim_trainer_drops(ray_session):
    from ray.train.torch import TorchTrainer

    datasets, cleaner = ray_private.reach_datasets_callback(), ray_private.reach_placement_group_cleaner_callback()
    assert {datasets, cleaner} <= callback_types(TorchTrainer)
    on_a_cluster = ray_private.slim_trainer(TorchTrainer)
    assert on_a_cluster.__name__ == "TorchTrainer" and on_a_cluster is not TorchTrainer
    assert datasets not in callback_types(on_a_cluster) and cleaner in callback_types(on_a_cluster)
    on_its_own_instance = ray_private.slim_trainer(TorchTrainer, pg_cleaner=False)
    assert not {datasets, cleaner} & callback_types(on_its_own_instance)
    assert callback_types(TorchTrainer) - {datasets, cleaner} == callback_types(on_its_own_instance)


def test_the_per_report_loggers_are_quieted():
    names = ray_private.reach_train_report_loggers()
    assert len(names) == 3 and any(name.endswith("context.py") for name in names)
    ray_private.quiet_train_reports()
    assert all(logging.getLogger(name).level == logging.WARNING for name in names)


def test_rays_address_lookup_reads_ray_address(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "10.1.2.3:6379")
    assert ray_private.reach_address_lookup()(None, None) == "10.1.2.3:6379"


def test_the_instance_this_process_started_is_told_apart(ray_session):
    assert ray_private.reach_local_head() is not None and ray_private.runs_local_instance()


def test_the_monitor_of_the_instance_this_process_started_is_found(ray_session):
    (monitor,) = ray_private.reach_monitor_processes()  # the suite's instance, started here
    assert monitor.poll() is None and callable(monitor.kill)


def test_ray_trains_actor_factories_are_where_they_were():
    coordinator, state_actor = ray_private.reach_train_actor_factories()
    assert callable(coordinator) and callable(state_actor)


def test_the_autoscalers_status_lists_the_live_node(ray_session):
    """Ray's monitor writes its first report a few seconds after the instance starts (the
    limit, 60 s, only ends a test where it never comes)."""
    deadline = time.monotonic() + 60
    while (status := ray_private.reach_autoscaler_status()) is None and time.monotonic() < deadline:
        time.sleep(0.5)
    assert status is not None and any(t.startswith("node_") for t in status["active_nodes"])


def test_the_gcs_tables_hold_this_jobs_placement_groups(ray_session):
    from ray.util.placement_group import placement_group, remove_placement_group

    pg = placement_group([{"CPU": 0.01}])
    ray_session.get(pg.ready(), timeout=60)
    try:
        pgs, actors, job, removed, dead = ray_private.reach_gcs_tables()
        assert job == ray_session.get_runtime_context().get_job_id()
        (mine,) = [p for p in pgs if p.placement_group_id == pg.id.binary()]
        assert mine.state != removed and not mine.is_detached
        assert isinstance(actors, list) and isinstance(dead, int)
    finally:
        remove_placement_group(pg)


def test_the_plain_backend_replaces_torchs_where_the_controller_reads_it():
    from ray.train import BackendConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    trainer = TorchTrainer(lambda: None, torch_config=TorchConfig(backend="gloo"))
    ray_private.reach_plain_backend(trainer)()
    assert type(trainer.backend_config) is BackendConfig
    assert type(trainer.train_run_context.backend_config) is BackendConfig
    kept = ray_private.slim_trainer(TorchTrainer)(lambda: None)
    assert isinstance(kept.train_run_context.backend_config, TorchConfig)


def test_the_policy_without_coordinator_places_workers_without_asking_it():
    """Ray Train's fixed policy asks the autoscaling coordinator (a detached actor it creates)
    at the controller's start and before each decision; the slim one never does."""
    from ray.train import ScalingConfig

    fixed = ray_private.reach_fixed_scaling_policy()
    for hook in ("after_controller_start", "before_controller_shutdown", "before_controller_abort"):
        assert hook in vars(fixed.__mro__[1])  # where the coordinator is created and released
    policy = ray_private.without_coordinator(fixed)(ScalingConfig(num_workers=2))
    policy.after_controller_start(None)
    decision = policy.make_decision_for_non_running_worker_group()  # Ray's would assert a client
    assert decision.num_workers == 2 and policy._coordinator_client is None


LOCAL_INSTANCE_START = """
import json, os, socket, threading, urllib.error, urllib.request
import ray
from lstm import cluster, ray_private

holder = socket.socket()  # Ray's fixed agent port, as another instance on the machine holds it
holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
try:
    holder.bind(("0.0.0.0", 52365))
    holder.listen()
except OSError:  # another instance holds it already
    pass
node = ray_private.reach_head_node_starts()
order = []
for name in ("start_api_server", "start_ray_processes"):
    def record(self, *args, _original=getattr(node, name), _name=name, **kwargs):
        order.append((_name, threading.current_thread().name))
        return _original(self, *args, **kwargs)
    setattr(node, name, record)
context = cluster.init_ray(None, {"LSTM_PROBE": "inherited"})  # as a job starts its own instance
url = context.dashboard_url
try:  # the dashboard answers HTTP (401 without this instance's token)
    status = urllib.request.urlopen(f"http://{url}/api/version", timeout=30).status
except urllib.error.HTTPError as e:
    status = e.code
@ray.remote
def probe():
    return os.getpid(), dict(ray.get_runtime_context().runtime_env), os.environ.get("LSTM_PROBE")
pid, runtime_env, probed = ray.get(probe.remote(), timeout=120)
agent = ray.nodes()[0]["DashboardAgentListenPort"]
log = open(f"{context.address_info['session_dir']}/logs/dashboard_agent.log").read()
retried = "Failed to bind" in log
env = {"worker": probed, "runtime_env": runtime_env, "driver": os.environ.get("LSTM_PROBE")}
result = {"order": order, "url": url, "status": status, "worker": pid, "agent": agent, "retried": retried}
print(json.dumps({**result, "env": env}))
ray.shutdown()
"""


@pytest.mark.slow  # starts a local instance of its own, in a subprocess
def test_a_local_instance_starts_its_dashboard_alongside_its_raylet_and_its_agent_on_a_free_port():
    """A local instance started as a job starts its own (``lstm.cluster.init_ray``) while Ray's
    fixed agent port is taken: its node starts the dashboard in a thread of its own and the
    raylet in the constructor's thread; the dashboard answers at the address ray.init returns,
    and the agent listens on a port the OS chose, without retrying the taken one. A task runs
    with the job's environment inherited, no runtime env (which would start its process
    twice), and the driver's own environment is as it was."""
    import json
    import subprocess
    import sys

    from conftest import QUICK_COMMAND_S, REPO

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS" and not k.startswith("RAY_GCS")}
    proc = subprocess.run(
        [sys.executable, "-c", LOCAL_INSTANCE_START],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=QUICK_COMMAND_S,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    started_in = dict(result["order"])  # which thread called each (their order is the threads' race)
    assert started_in == {"start_api_server": "ray-dashboard-start", "start_ray_processes": "MainThread"}
    assert result["url"] and result["status"] in (200, 401) and result["worker"] > 0
    assert result["agent"] not in (0, 52365) and not result["retried"]
    assert result["env"] == {"worker": "inherited", "runtime_env": {}, "driver": None}


def test_tunes_trial_file_writers_still_restore_through_the_method_the_search_overrides():
    assert ray_private.reach_trial_log_restore() == "_restore_from_remote"
