"""Every use of Ray's private APIs, each a workaround for something Ray 2.60 does or lacks.

Each degrades to one warning if a Ray upgrade moves what it relies on, and has a strict
accessor (``reach_*``) that raises instead, which tests/test_ray_private.py calls, so an
upgrade that breaks a workaround fails a test. They save: a Ray Data actor per run, torch in
a one-CPU-worker run's controller, and on a job's own instance a placement-group cleaner and an
autoscaling coordinator (:func:`slim_trainer`); the epochs a search trial reported since the
last sync when it starts again (tune.trial_logs); an INFO line per report, a second at a local
instance's exit, the wait for Ray Train's actors, and a local instance's waits for its dashboard and for a
port another instance holds; they find the latest ``ray start`` and an
autoscaler, and free a search's stopped trials' workers without a dashboard.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
import threading
import time
from typing import Any, Callable, Iterator, Optional

logger = logging.getLogger(__name__)

STATE_TRACKING = "RAY_TRAIN_ENABLE_STATE_TRACKING"
CONTROLLER_CLASS = "TrainController"
_warned: set[str] = set()


def _warn_once(what: str, error: BaseException) -> None:
    if what not in _warned:
        _warned.add(what)
        logger.warning("%s (%s: %s)", what, type(error).__name__, error)


# --------------------------------------------------------------------------- Tune's trial files


def reach_trial_log_restore() -> str:
    """The method of Tune's ``result.json`` and ``progress.csv`` writers that copies a trial's
    file from the storage path when the trial starts from a checkpoint (tune.trial_logs
    overrides it to keep the driver's newer copy)."""
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    name = "_restore_from_remote"
    for writer in (JsonLoggerCallback, CSVLoggerCallback):
        if not callable(getattr(writer, name, None)):
            raise ImportError(f"{writer.__name__}.{name} is gone")
    return name


def check_trial_log_restore() -> None:
    try:
        reach_trial_log_restore()
    except ImportError as e:
        _warn_once("a search trial that starts again may lose the epochs reported since the last sync", e)


# --------------------------------------------------------------------------- Ray Train's driver


def _reached(reach: Callable[[], type], costs: str) -> Optional[type]:
    """``reach()``, or None with a warning that says what its failure ``costs``."""
    try:
        return reach()
    except ImportError as e:
        _warn_once(costs, e)
        return None


def reach_datasets_callback() -> type:
    """The default callback with which Ray Train starts a ``DatasetManager`` actor per run."""
    from ray.train.v2._internal.callbacks import DatasetsCallback

    return DatasetsCallback


def reach_placement_group_cleaner_callback() -> type:
    """The default callback with which Ray Train starts a ``PlacementGroupCleaner`` actor per run."""
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

    return PlacementGroupCleanerCallback


def reach_fixed_scaling_policy() -> type:
    """The scaling policy of a run with a fixed number of workers, which asks Ray Data's
    autoscaling coordinator (a detached actor) for the workers' resources."""
    from ray.train.v2._internal.execution.scaling_policy import FixedScalingPolicy

    return FixedScalingPolicy


def reach_plain_backend(trainer: Any) -> Callable[[], None]:
    """A function that gives ``trainer`` (built, not yet fit) Ray Train's plain
    ``BackendConfig`` in place of its ``TorchConfig``, where the controller reads it."""
    import dataclasses

    from ray.train import BackendConfig

    context = trainer.train_run_context
    if not dataclasses.is_dataclass(context) or not hasattr(context, "backend_config"):
        raise AttributeError("Ray Train's run context has no backend_config field")

    def swap() -> None:
        trainer.backend_config = BackendConfig()
        trainer.train_run_context = dataclasses.replace(context, backend_config=trainer.backend_config)

    return swap


def without_coordinator(policy: type) -> type:
    """``policy`` that never starts nor asks the autoscaling coordinator."""

    class Policy(policy):
        def after_controller_start(self, train_run_context: Any) -> None:
            pass

        async def before_controller_shutdown(self) -> None:
            pass

        def before_controller_abort(self) -> None:
            pass

        def _maybe_send_resource_request(self) -> None:
            pass

    Policy.__name__ = Policy.__qualname__ = policy.__name__
    return Policy


def slim_trainer(base: type, *, pg_cleaner: bool = True, coordinator: bool = True, process_group: bool = True) -> type:
    """``base`` (TorchTrainer) without what Ray Train starts for every run (each a process or
    an import a small machine misses at start) where the run has no use for it: Ray Data's
    ``DatasetManager`` when the run has no Datasets (ours never do); unless ``pg_cleaner``, the
    placement-group cleaner (it also fails beside another Ray instance on the machine, "Found
    multiple active Ray instances"); unless ``coordinator``, the autoscaling coordinator, which
    the controller waits for before placing workers; unless ``process_group``, torch's process
    group (one CPU worker has no peer) and with it ``TorchConfig``, whose module imports torch
    in the controller. :class:`lstm.plan.RunPlan` says which a run needs."""
    datasets = _reached(reach_datasets_callback, "every run starts Ray Train's DatasetManager actor")
    cleaner = (
        None
        if pg_cleaner
        else _reached(reach_placement_group_cleaner_callback, "every run starts Ray Train's PlacementGroupCleaner")
    )
    fixed = None if coordinator else _reached(reach_fixed_scaling_policy, "every run asks the autoscaling coordinator")
    policy = without_coordinator(fixed) if fixed else None

    class Trainer(base):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            if not process_group:
                try:
                    reach_plain_backend(self)()
                except (ImportError, AttributeError) as e:
                    _warn_once("one-worker runs import torch in Ray Train's controller", e)

        def _create_default_callbacks(self):
            unused = tuple(c for c in (cleaner, None if self.datasets else datasets) if c is not None)
            return [c for c in super()._create_default_callbacks() if not isinstance(c, unused)]

        def _initialize_and_run_controller(self, **kwargs: Any):
            if policy and type(kwargs.get("scaling_policy")) is fixed:
                kwargs["scaling_policy"] = policy(self.scaling_config)
            return super()._initialize_and_run_controller(**kwargs)

    Trainer.__name__ = Trainer.__qualname__ = base.__name__
    return Trainer


def reach_train_report_loggers() -> list[str]:
    """The loggers that log every report at INFO: Ray Train's (named by a private module's
    file) and, for Tune's function trainables, the old session's checkpoint line."""
    import ray.train._internal.storage as session_storage
    import ray.train.v2._internal.execution.context as train_context
    import ray.train.v2._internal.execution.storage as train_storage

    return [module.logger.name for module in (train_context, train_storage, session_storage)]


def quiet_train_reports() -> None:
    """Ray Train (and Tune's session) log every report at INFO, the whole metrics dict or the
    checkpoint's path; the loop prints its own line per epoch. If the loggers move, warn and
    leave their logs on."""
    try:
        names = reach_train_report_loggers()
    except (ImportError, AttributeError) as e:
        _warn_once("cannot quiet Ray Train's per-report logs", e)
        return
    for name in names:
        logging.getLogger(name).setLevel(logging.WARNING)


# --------------------------------------------------------------------------- joining and leaving Ray


def reach_address_lookup() -> Callable[[Optional[str], Optional[str]], Optional[str]]:
    """Ray's own lookup of the cluster a plain ``ray.init()`` joins."""
    from ray._private.services import get_ray_address_from_environment

    return get_ray_address_from_environment


def latest_ray_start_address() -> Optional[str]:
    """The cluster a plain ``ray.init()`` joins: ``$RAY_ADDRESS``, else the latest ``ray start``
    on this machine; ConnectionError for ``RAY_ADDRESS=auto`` with no cluster. If Ray's lookup
    moves, warn and read ``$RAY_ADDRESS`` alone."""
    try:
        lookup = reach_address_lookup()
    except ImportError as e:
        _warn_once("could not look for a running Ray cluster", e)
        return os.environ.get("RAY_ADDRESS")
    return lookup(None, None)


def reach_head_node_starts() -> type:
    """Ray's head node, whose constructor starts the dashboard (``start_api_server``, which
    waits until the dashboard writes its address) and only then the raylet and its agents
    (``start_ray_processes``, with the ports of its ``_ray_params``)."""
    from ray._private.node import Node

    for method in ("start_api_server", "start_ray_processes"):
        if not callable(getattr(Node, method, None)):
            raise ImportError(f"ray._private.node.Node has no {method}")
    from ray._private.parameter import RayParams

    if "dashboard_agent_listen_port" not in inspect.signature(RayParams).parameters:
        raise ImportError("ray._private.parameter.RayParams has no dashboard_agent_listen_port")
    return Node


@contextlib.contextmanager
def local_instance_start() -> Iterator[None]:
    """While the body starts a local instance (``ray.init``), its head node:

    * starts the dashboard in a thread and the raylet meanwhile, then waits for both: Ray
      waits for the dashboard's module processes before it starts the raylet, and each takes
      seconds. The dashboard is the same; a dashboard that fails to start raises at the wait.
    * lets the OS pick the dashboard agent's HTTP port: Ray's fixed 52365 is taken wherever
      another instance runs on the machine (another job, a search, the test suite's), and
      the agent then retries it for 3.4 s before it gives up. The dashboard finds the agent
      through the GCS, as on any node."""
    try:
        node = reach_head_node_starts()
    except ImportError as e:
        _warn_once("could not speed up the start of the local Ray instance", e)
        yield
        return
    start_api_server, start_ray_processes = node.start_api_server, node.start_ray_processes

    def start_api_server_in_thread(self: Any, **kwargs: Any) -> None:
        started, failure = threading.Event(), []

        def start() -> None:
            try:
                start_api_server(self, **kwargs)
            except BaseException as e:  # noqa: BLE001 - raised again in the constructor's thread
                failure.append(e)
            started.set()
            # Ray starts the dashboard with a parent-death signal, which Linux sends when the
            # *thread* that started it ends: this one lives as long as the process.
            threading.Event().wait()

        threading.Thread(target=start, name="ray-dashboard-start", daemon=True).start()
        self._lstm_dashboard_start = (started, failure)

    def start_ray_processes_then_wait_for_dashboard(self: Any) -> None:
        self._ray_params.dashboard_agent_listen_port = 0
        start_ray_processes(self)
        started, failure = self.__dict__.pop("_lstm_dashboard_start", (None, []))
        if started is not None:
            started.wait()
        if failure:
            raise failure[0]

    node.start_api_server = start_api_server_in_thread
    node.start_ray_processes = start_ray_processes_then_wait_for_dashboard
    try:
        yield
    finally:
        node.start_api_server, node.start_ray_processes = start_api_server, start_ray_processes


def reach_monitor_processes() -> list[Any]:
    """The autoscaler monitor processes of the instance this process started ([] if it joined one)."""
    from ray._private import ray_constants, worker

    node = worker._global_node
    if node is None or not node.head:
        return []
    return [info.process for info in node.all_processes.get(ray_constants.PROCESS_TYPE_MONITOR, ())]


def reach_local_head() -> Any:
    """The head node this process started (by ``ray.init()`` without an address), or None."""
    from ray._private import worker

    node = worker._global_node
    return node if node is not None and node.head else None


def runs_local_instance() -> bool:
    """Whether this process started the Ray instance it is connected to (so the instance ends
    with it): :func:`reach_local_head`, or False (with a warning) if it cannot be told."""
    try:
        return reach_local_head() is not None
    except Exception as e:  # noqa: BLE001 - private Ray API; never fail a run over it
        _warn_once("could not tell whether this process started its Ray instance", e)
        return False


def stop_autoscaler_monitor() -> None:
    """Kill the local instance's autoscaler monitor while its GCS still runs: Ray's shutdown
    stops the GCS first, then waits a second for the monitor's SIGTERM handler to give up
    reporting to it. A local instance has no nodes to add, so the monitor has nothing to do."""
    try:
        for process in reach_monitor_processes():
            process.kill()
            process.wait(timeout=5)
    except Exception as e:  # noqa: BLE001 - never fail an exit over a faster shutdown
        logger.warning("could not stop Ray's autoscaler monitor early (%s: %s)", type(e).__name__, e)


def reach_train_actor_factories() -> tuple[Callable[[], Any], Callable[[], Any]]:
    """Ray Train's get-or-create functions of its autoscaling coordinator and state actor."""
    from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
        get_or_create_autoscaling_coordinator,
    )
    from ray.train.v2._internal.state.state_actor import get_or_create_state_actor

    return get_or_create_autoscaling_coordinator, get_or_create_state_actor


def start_train_actors(coordinator: bool = True) -> None:
    """Create Ray Train's cluster-wide detached actors now, without waiting: the state actor
    (where tracking is on) and, if ``coordinator``, the autoscaling coordinator. Each run's
    controller would otherwise create them one after the other before placing its workers, and
    a search's first controllers would race to create the state actor (each loser a failed task
    on the dashboard). Ray Train gets them with the same options, so nothing else changes."""
    try:
        get_coordinator, state_actor = reach_train_actor_factories()
        if coordinator:
            get_coordinator()
        if os.environ.get(STATE_TRACKING) == "1":
            state_actor()
    except Exception as e:  # noqa: BLE001 - never fail a run over Ray Train's bookkeeping
        logger.warning("could not start Ray Train's actors early (%s: %s)", type(e).__name__, e)


def reach_autoscaler_status() -> Optional[dict[str, Any]]:
    """The autoscaler's report, as Ray's monitor keeps it in the GCS (None before its first,
    a few seconds after the cluster starts)."""
    from ray.experimental.internal_kv import _internal_kv_get

    raw = _internal_kv_get("__autoscaling_status")
    return json.loads(raw).get("autoscaler_report") if raw else None


def autoscaler_status() -> Optional[dict[str, Any]]:
    """:func:`reach_autoscaler_status`, or None (with a warning) if it cannot be read."""
    try:
        return reach_autoscaler_status()
    except Exception as e:  # noqa: BLE001 - private Ray API; never fail a run over it
        _warn_once("could not read the autoscaler's status; assuming no autoscaler", e)
        return None


# --------------------------------------------------------------------------- stopped trials' workers
#
# Tune kills a stopped Train trial's actor and its controller; Ray 2.60 then leaves removing the
# workers' placement group to a cleaner actor that needs the dashboard's State API. Without one
# the CPUs stay reserved and later trials wait forever, so the search's driver removes the
# placement groups of its dead controllers itself, from the GCS's tables.


def reach_gcs_tables() -> tuple[list[Any], list[Any], str, int, int]:
    """Placement groups, actors, this job's id, and the REMOVED and DEAD states, from the GCS."""
    import ray
    from ray._private.state import state
    from ray.core.generated import gcs_pb2

    accessor = state._connect_and_get_accessor()
    pgs = [gcs_pb2.PlacementGroupTableData.FromString(raw) for raw in accessor.get_placement_group_table()]
    actors = [gcs_pb2.ActorTableData.FromString(raw) for raw in accessor.get_actor_table(None, None)]
    removed = gcs_pb2.PlacementGroupTableData.PlacementGroupState.Value("REMOVED")
    dead = gcs_pb2.ActorTableData.ActorState.Value("DEAD")
    return pgs, actors, ray.get_runtime_context().get_job_id(), removed, dead


def _controller_ids(actors: list[Any], job: str, dead: int, alive: bool) -> set[bytes]:
    ours = [a for a in actors if a.class_name == CONTROLLER_CLASS and a.job_id.hex() == job]
    return {a.actor_id for a in ours if (a.state != dead) == alive}


def controllers(alive: bool) -> set[bytes]:
    """The ids of this job's Train controllers that are alive (or starting), or dead."""
    try:
        _, actors, job, _, dead = reach_gcs_tables()
    except Exception:  # noqa: BLE001 - Ray internals; release_orphans warns
        return set()
    return _controller_ids(actors, job, dead, alive)


def release_orphans() -> int:
    """Remove the placement groups of this job's dead Train controllers; returns how many."""
    try:
        import ray
        from ray.util.placement_group import PlacementGroup, remove_placement_group

        pgs, actors, job, removed_state, dead = reach_gcs_tables()  # one read of the GCS's tables
        dead_ids = _controller_ids(actors, job, dead, alive=False)
        removed = 0
        for pg in pgs:  # the worker groups' placement groups, created by the controllers
            if pg.state != removed_state and not pg.is_detached and pg.creator_actor_id in dead_ids:
                remove_placement_group(PlacementGroup(ray.PlacementGroupID(pg.placement_group_id)))
                removed += 1
        if removed:
            logger.info("released %d placement group(s) of stopped trials", removed)
        return removed
    except Exception as e:  # noqa: BLE001 - Ray internals; never fail a search over this
        _warn_once(
            "could not release the resources of stopped trials; run Ray with its dashboard so that Ray Train "
            "cleans them up itself",
            e,
        )
        return 0


def release_after_search(before: set[bytes] = frozenset(), timeout_s: float = 30.0) -> None:
    """At the end of a search: wait for the last stopped trials' controllers to die (not those
    alive ``before`` the search: a driver's own runs), then release what they left."""
    deadline = time.monotonic() + timeout_s
    while controllers(alive=True) - before and time.monotonic() < deadline:
        time.sleep(0.5)
    release_orphans()
