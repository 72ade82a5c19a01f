"""Joining Ray, and what a run may ask of the cluster, checked before any worker starts: an
address that does not answer or wants a token, a worker group that can never be placed (Ray
Train would wait forever; with an autoscaler it waits ``--wait-for-workers-s``), local storage
on several nodes (checkpoints would be scattered over them)."""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import math
import os
import socket
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence

from lstm import errors, ray_private, storage
from lstm.errors import UserError
from lstm.ray_private import STATE_TRACKING, stop_autoscaler_monitor

logger = logging.getLogger(__name__)

# The job's actors run with: no print patch (Ray Train V2 would show every worker line twice);
# state tracking (the dashboard's Train page reads Ray Train's state actor); task events sent
# every 0.1 s instead of 1 s, so that a one-worker trial's last call reaches the GCS before
# Tune ends its actor (else the job's page counts it FAILED).
WORKER_ENV = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0", STATE_TRACKING: "1", "RAY_task_events_report_interval_ms": "100"}
# Set in this process unless the user set them; Ray Train passes them on to its controller and
# workers. The controller sees a report or an end only when it polls its workers: every 0.5 s
# instead of Ray's 2 s saves seconds per run for one small remote call per worker.
DRIVER_ENV = {STATE_TRACKING: "1", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
# On the job's own local instance: a poll every 0.1 s, and no preemption watcher (nothing drains it).
LOCAL_DRIVER_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
# Where the project starts a Ray head (a job's own instance, cluster.yaml, the suite's head):
# its dashboard waits 10 s, not Ray's 1 s, for a dead worker's last task events before it marks
# that worker's unfinished tasks FAILED. Tune ends a trial's actor right after its last call;
# on a busy head that call's FINISHED event can take more than a second to arrive.
HEAD_RAY_CONFIG = {"RAY_gcs_mark_task_failed_on_worker_dead_delay_ms": "10000"}
# No idle workers prestarted for the first driver: a run's actors get processes of their own.
LOCAL_RAY_CONFIG = {"RAY_prestart_worker_first_driver": "0", **HEAD_RAY_CONFIG}
AUTOSCALER_WAIT_S = 600.0  # --wait-for-workers-s -1 (auto) on a cluster with an autoscaler
PROGRESS_EVERY_S = 15.0


def ray_address() -> Optional[str]:
    """The cluster a plain ``ray.init()`` joins; None where it starts a local instance (``RAY_ADDRESS=local`` too)."""
    try:
        address = ray_private.latest_ray_start_address()
    except ConnectionError as e:  # RAY_ADDRESS=auto, and no cluster found
        raise UserError(f"$RAY_ADDRESS={os.environ.get('RAY_ADDRESS')}: {e}") from None
    return None if address in (None, "", "local") else address


def is_gcs_address(address: str) -> bool:
    """Whether ``address`` is a cluster's ``host:port``, not Ray Client's ``ray://``, a URL or ``auto``."""
    return "://" not in address and address != "auto"


def check_address(address: str, timeout_s: float = 5.0) -> None:
    """Refuse, with one line, an HTTP address (the dashboard's) or a ``host:port`` where nothing
    listens (``ray.init()`` would retry it for minutes); ``ray://`` and ``auto`` are Ray's."""
    if address.startswith(("http://", "https://")):
        raise UserError(
            f"$RAY_ADDRESS={address} is an HTTP address (the dashboard's, for `ray job submit --address`); a job "
            "started with python needs the cluster's GCS address (<head ip>:6379), or no $RAY_ADDRESS on a Ray node"
        )
    if not is_gcs_address(address):
        return
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            return
    except (OSError, ValueError) as e:
        reason = f"{type(e).__name__}: {e}"
    if os.environ.get("RAY_ADDRESS"):
        fix = "start that cluster, or correct $RAY_ADDRESS, or unset it to run on a local Ray instance"
        raise UserError(f"no Ray cluster answers at $RAY_ADDRESS={address} ({reason}); {fix}")
    fix = (
        "start it again with `ray start --head`, or run `ray stop` to forget it and let the job start a local instance"
    )
    raise UserError(
        f"no Ray cluster answers at {address}, the address the latest `ray start` on this machine left "
        f"({reason}); {fix}"
    )


def ensure_ray() -> bool:
    """Join :func:`ray_address`'s cluster or start a local instance; True if it is this process's own."""
    import ray

    if ray.is_initialized():  # the caller's ray.init(), or an earlier run's
        own = ray_private.runs_local_instance()
        set_defaults({**DRIVER_ENV, **(LOCAL_DRIVER_ENV if own else {})})
        return own
    address = ray_address()
    driver_env = {**DRIVER_ENV, **(LOCAL_DRIVER_ENV if address is None else {})}
    set_defaults(driver_env)
    # The job's actors get them too: a search's trials call fit() in theirs.
    env = {**WORKER_ENV, **{key: os.environ[key] for key in driver_env}}
    if address is None:
        set_defaults(LOCAL_RAY_CONFIG)  # read by the raylet and the dashboard this process starts
    else:
        check_address(address)
        if is_gcs_address(address):
            # For the job's actors: Ray Train's placement-group cleaner finds its controller through
            # the state API, which otherwise may find another Ray instance on this machine.
            env["RAY_ADDRESS"] = address
    # A variable the job's own runtime env sets (`ray job submit --runtime-env-json`) is left to
    # it: Ray refuses to merge two runtime envs that set the same variable.
    env = {k: v for k, v in env.items() if k not in job_env_vars()}
    init_ray(address, env)
    errors.BEFORE_LAST_LINE.append(ray.shutdown)  # the job's last line comes after Ray's forwarded ones
    if address is None:
        errors.BEFORE_LAST_LINE.append(stop_autoscaler_monitor)  # closed first: Ray's shutdown then waits for nothing
        atexit.unregister(stop_autoscaler_monitor)  # registered once, however often Ray starts
        atexit.register(stop_autoscaler_monitor)  # runs before Ray's own shutdown (registered first)
    return address is None


def set_defaults(env: dict[str, str]) -> None:
    """Set each of ``env`` in this process's environment unless the user set it."""
    for key, value in env.items():
        os.environ.setdefault(key, value)


def init_ray(address: Optional[str], env: dict[str, str], **options: Any) -> Any:
    """``ray.init`` on ``address`` (None: a local instance, which inherits ``env``), else with ``env``
    as the job's runtime env, and ``options`` (ray.init's); Ray's context. A cluster refusing
    this process's token is one line."""
    import ray

    try:
        if address is None:
            with ray_private.local_instance_start(), environment(env):
                return ray.init(address="local", **options)
        return ray.init(address=address, runtime_env={"env_vars": env}, **options)
    except ConnectionError as e:
        if address and token_refused(e):
            mode = os.environ.get("RAY_AUTH_MODE", "unset")
            raise UserError(
                f"the Ray cluster at {address} refused this job's connection: it wants its authentication token "
                f"(RAY_AUTH_MODE here: {mode}); export RAY_AUTH_MODE=token, with the cluster's token in "
                "~/.ray/auth_token, $RAY_AUTH_TOKEN_PATH or $RAY_AUTH_TOKEN (docs/cluster.md, Token authentication)"
            ) from None
        raise


@contextlib.contextmanager
def environment(env: dict[str, str]) -> Iterator[None]:
    """``env`` set while the body runs, then as it was: a local instance ``ray.init`` starts, and its
    workers, inherit it; with a runtime env instead, Ray starts each process twice (bench/actor_start.py)."""
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def token_refused(error: BaseException) -> bool:
    """Whether a failed ``ray.init`` was the cluster refusing this process's token (AuthenticationError)."""
    import ray.exceptions

    while error is not None:
        if isinstance(error, ray.exceptions.AuthenticationError) or "InvalidAuthToken" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def job_env_vars() -> dict[str, str]:
    """The environment variables of the runtime env ``ray job submit`` gave this job ({} outside a job)."""
    try:
        job_config = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
    except json.JSONDecodeError:
        return {}
    return dict((job_config.get("runtime_env") or {}).get("env_vars") or {})


# --------------------------------------------------------------------------- nodes


@dataclass(frozen=True)
class Node:
    address: str
    resources: dict[str, float]


def alive_nodes(raw: Optional[Sequence[dict[str, Any]]] = None) -> list[Node]:
    """The cluster's live nodes (``ray.nodes()`` entries, or ``raw`` for tests)."""
    if raw is None:
        import ray

        raw = ray.nodes()
    return [Node(n.get("NodeManagerAddress", ""), dict(n.get("Resources", {}))) for n in raw if n.get("Alive", True)]


def auto_cpus_per_worker(num_workers: int, gpus_per_worker: float, nodes: Sequence[Node]) -> int:
    """CPUs per worker for ``--cpus-per-worker 0``: a fair share of the GPU nodes' or the cluster's CPUs."""
    if gpus_per_worker:
        shares = [n.resources.get("CPU", 0) / n.resources["GPU"] for n in nodes if n.resources.get("GPU")]
        return max(1, int(min(shares) * min(gpus_per_worker, 1.0))) if shares else 1
    cpus = [int(n.resources.get("CPU", 0)) for n in nodes]
    if not cpus:
        return 1
    return max(1, min(sum(cpus) // max(num_workers, 1), max(cpus)))


def placeable(bundle: dict[str, float], nodes: Sequence[Node]) -> int:
    """How many workers of ``bundle`` the nodes can hold at once, if nothing else ran."""
    total = 0
    for node in nodes:
        fits = [math.floor(node.resources.get(k, 0.0) / v + 1e-9) for k, v in bundle.items() if v > 0]
        total += min(fits) if fits else 0
    return total


def describe(num_workers: int, bundle: dict[str, float], nodes: Sequence[Node]) -> str:
    """ "64 workers x 1 CPU requested, the cluster has 2 CPUs" """
    ask = " + ".join(f"{v:g} {k}" for k, v in bundle.items() if v > 0)
    have = ", ".join(f"{sum(n.resources.get(k, 0.0) for n in nodes):g} {k}s" for k, v in bundle.items() if v > 0)
    largest = max((n.resources.get("CPU", 0.0) for n in nodes), default=0.0)
    return (
        f"{num_workers} worker(s) x {ask} requested, the cluster has {have} "
        f"on {len(nodes)} node(s) (at most {largest:g} CPUs on one)"
    )


def describe_nodes(nodes: Sequence[Node], *, gpus: bool = False) -> str:
    """ "4 CPUs", "4 CPUs and 1 GPUs", "6 CPUs on 2 nodes (at most 3 CPUs on one)" """
    total = {k: sum(n.resources.get(k, 0.0) for n in nodes) for k in ("CPU", "GPU")}
    text = f"{total['CPU']:g} CPUs" + (f" and {total['GPU']:g} GPUs" if gpus else "")
    if len(nodes) > 1:
        text += f" on {len(nodes)} nodes (at most {max(n.resources.get('CPU', 0.0) for n in nodes):g} CPUs on one)"
    return text


def autoscaler_can_add_nodes() -> bool:
    """Whether an autoscaler with node types of its own runs; False if unreadable (then fail fast)."""
    report = ray_private.autoscaler_status() or {}
    types = set(report.get("active_nodes") or {}) | set(report.get("idle_nodes") or {})
    # Without an autoscaler the monitor mirrors each live node as a type "node_<id>".
    return any(not t.startswith("node_") for t in types)


def request_nodes(bundles: list[dict[str, float]]) -> None:
    """Ask the autoscaler for room for ``bundles`` ([] withdraws it): it adds nodes only for
    demand it sees, and the worker group's own request comes after the wait."""
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=bundles)


def plan_workers(
    num_workers: int,
    cpus_per_worker: int,
    gpus_per_worker: float,
    wait_s: float,
    *,
    nodes: Callable[[], list[Node]] = alive_nodes,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    request: Callable[[list[dict[str, float]]], None] = request_nodes,
) -> int:
    """The CPUs per worker once the workers can be placed (after ``wait_s``; -1: if an autoscaler runs)."""
    current = nodes()
    cpus = cpus_per_worker or auto_cpus_per_worker(num_workers, gpus_per_worker, current)
    bundle = {"CPU": float(cpus), **({"GPU": gpus_per_worker} if gpus_per_worker else {})}
    if placeable(bundle, current) >= num_workers:
        return cpus
    if wait_s < 0:
        wait_s = AUTOSCALER_WAIT_S if autoscaler_can_add_nodes() else 0.0
    if wait_s > 0:
        request([bundle] * num_workers)
        try:
            if wait_for_nodes(num_workers, bundle, wait_s, nodes, sleep, clock):
                return cpus
        finally:
            request([])
    waited = f" after waiting {wait_s:g}s for the autoscaler" if wait_s > 0 else ""
    raise UserError(
        f"{describe(num_workers, bundle, nodes())}{waited}; lower --num-workers or --cpus-per-worker, "
        "add nodes, or pass --wait-for-workers-s SECONDS to wait for an autoscaler"
    )


def wait_for_nodes(
    num_workers: int,
    bundle: dict[str, float],
    wait_s: float,
    nodes: Callable[[], list[Node]],
    sleep: Callable[[float], None],
    clock: Callable[[], float],
) -> bool:
    """Poll the nodes until the workers fit or ``wait_s`` passes, with a line every 15 s."""
    deadline = clock() + wait_s
    while clock() < deadline:
        print(
            f"waiting for nodes: {describe(num_workers, bundle, nodes())}; {deadline - clock():.0f}s left "
            "(--wait-for-workers-s)",
            flush=True,
        )
        sleep(min(PROGRESS_EVERY_S, max(deadline - clock(), 0.0)))
        if placeable(bundle, nodes()) >= num_workers:
            return True
    return False


# --------------------------------------------------------------------------- shared storage

# Filesystem types (as /proc/mounts names them) that every node of a cluster can share.
SHARED_FILESYSTEMS = frozenset(
    {
        "nfs",
        "nfs4",
        "cifs",
        "smb3",
        "lustre",
        "gpfs",
        "beegfs",
        "ceph",
        "glusterfs",
        "fuse.s3fs",
        "fuse.gcsfuse",
        "fuse.juicefs",
        "fuse.glusterfs",
        "fuse.ceph",
    }
)


def filesystem_type(path: str, mounts_file: str = "/proc/mounts") -> str:
    """The type of the filesystem holding ``path`` (its longest mount point), or '' where unknown (not Linux)."""
    try:
        with open(mounts_file) as f:
            mounts = [line.split()[1:3] for line in f if len(line.split()) >= 3]
    except OSError:
        return ""
    real = os.path.realpath(os.path.expanduser(path))
    best, fstype = "", ""
    for mount_point, kind in mounts:
        mount_point = mount_point.replace("\\040", " ")
        inside = real == mount_point or real.startswith(mount_point.rstrip("/") + "/")
        if inside and len(mount_point) >= len(best):
            best, fstype = mount_point, kind
    return fstype


def check_shared_storage(root: str, nodes: Optional[Sequence[Node]] = None) -> None:
    """UserError for a local, unshared storage path on a cluster of several machines."""
    nodes = alive_nodes() if nodes is None else nodes
    machines = {n.address for n in nodes}
    if len(machines) > 1 and not storage.is_remote(root) and filesystem_type(root) not in SHARED_FILESYSTEMS:
        raise UserError(
            f"storage path {root} is local but this Ray cluster has {len(machines)} nodes; pass "
            "--storage-path s3://bucket/prefix (or a folder on shared storage such as NFS mounted "
            "on every node)"
        )
