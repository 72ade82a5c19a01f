"""Give back the resources of Train runs whose trial Tune stopped.

When Tune stops a trial (ASHA, PBT, the time budget) it kills the trial's actor, and with it
the Ray Train controller the trial started. Ray 2.60's Train V2 then relies on a detached
``PlacementGroupCleaner`` actor to remove the run's worker placement group -- and that actor
asks Ray's State API, which only works while the Ray dashboard runs. Without the dashboard
(``ray.init(include_dashboard=False)``, or a dashboard that failed to start) the placement
group is never removed: its CPUs stay reserved until the driver exits, so after a few stopped
trials the next trial waits forever for workers. The cleaner actors also stay alive, polling.

:func:`release_orphans` does the cleaner's job from the Tune driver, reading the placement
group and actor tables straight from Ray's GCS (no dashboard needed): it removes the placement
groups created by this job's dead Train controllers. :class:`ReleaseOrphansCallback` runs it
during a search. (The cleaner actors themselves take no CPUs; without a dashboard they stay
until Ray shuts down. The driver cannot kill them: ``ray.kill`` needs an actor handle, and only
the controllers that started them held one.) These are Ray internals; if they change, the
clean-up logs one warning and does nothing.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from ray.tune import Callback

logger = logging.getLogger(__name__)

CONTROLLER_CLASS = "TrainController"
_warned = False


def _tables() -> tuple[list[Any], list[Any], str]:
    """Placement groups, actors and this job's id, straight from the GCS (Ray internals: the
    callers turn any failure into one warning)."""
    import ray

    try:
        from ray._private.state import state
        from ray.core.generated import gcs_pb2
    except ImportError as e:
        raise RuntimeError(f"this Ray has no GCS tables where lstm-ray expects them ({e})") from e
    accessor = state._connect_and_get_accessor()
    pgs = [gcs_pb2.PlacementGroupTableData.FromString(raw) for raw in accessor.get_placement_group_table()]
    actors = [gcs_pb2.ActorTableData.FromString(raw) for raw in accessor.get_actor_table(None, None)]
    return pgs, actors, ray.get_runtime_context().get_job_id()


def release_orphans() -> int:
    """Remove the placement groups of this job's dead Train controllers; returns how many."""
    global _warned
    try:
        import ray
        from ray.core.generated import gcs_pb2
        from ray.util.placement_group import PlacementGroup, remove_placement_group

        pgs, actors, job = _tables()
        removed_state = gcs_pb2.PlacementGroupTableData.PlacementGroupState.Value("REMOVED")
        dead = gcs_pb2.ActorTableData.ActorState.Value("DEAD")
        dead_ids = {
            a.actor_id for a in actors if a.class_name == CONTROLLER_CLASS and a.job_id.hex() == job and a.state == dead
        }
        removed = 0
        for pg in pgs:  # the worker groups' placement groups, created by the controllers
            if pg.state != removed_state and not pg.is_detached and pg.creator_actor_id in dead_ids:
                remove_placement_group(PlacementGroup(ray.PlacementGroupID(pg.placement_group_id)))
                removed += 1
        if removed:
            logger.info("released %d placement group(s) of stopped trials", removed)
        return removed
    except Exception as e:  # noqa: BLE001 - Ray internals; never fail a search over this
        if not _warned:
            _warned = True
            logger.warning(
                f"could not release the resources of stopped trials ({type(e).__name__}: {e}); "
                "run Ray with its dashboard so that Ray Train cleans them up itself"
            )
        return 0


def controllers_alive() -> set[bytes]:
    """The ids of this job's Train controllers still alive (or starting)."""
    try:
        from ray.core.generated import gcs_pb2

        _, actors, job = _tables()
        dead = gcs_pb2.ActorTableData.ActorState.Value("DEAD")
        return {
            a.actor_id for a in actors if a.class_name == CONTROLLER_CLASS and a.job_id.hex() == job and a.state != dead
        }
    except Exception:  # noqa: BLE001
        return set()


def release_after_search(before: set[bytes] = frozenset(), timeout_s: float = 30.0) -> None:
    """At the end of a search: wait for the last stopped trials' controllers to die (not those
    alive ``before`` the search: a driver's own runs), then release what they left."""
    deadline = time.monotonic() + timeout_s
    while controllers_alive() - before and time.monotonic() < deadline:
        time.sleep(0.5)
    release_orphans()


class ReleaseOrphansCallback(Callback):
    """Runs :func:`release_orphans` every ``interval_s`` seconds while a search runs."""

    def __init__(self, interval_s: float = 5.0):
        self.interval_s = interval_s
        self._last = 0.0

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        now = time.monotonic()
        if now - self._last >= self.interval_s:
            self._last = now
            release_orphans()
