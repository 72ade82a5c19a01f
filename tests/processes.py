"""This machine's processes, read from /proc: the table (tests/ray_head.py stops a head's
processes with it), and :class:`RayWatch`, conftest's guard that a test of the unit tier starts
no Ray instance."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import NamedTuple

# A Ray instance's own processes: every local instance, a `ray start` and a ray.init() alike,
# runs one GCS server (on its head) and a raylet per node. /proc gives 15 characters of a name.
RAY_PROCESSES = frozenset({"gcs_server", "raylet"})


class Proc(NamedTuple):
    ppid: int
    group: int  # process group
    started: str  # start time, in clock ticks after boot: with the pid, tells a reused pid apart
    name: str


def read_proc(pid: int) -> Proc | None:
    """Process ``pid`` from /proc/<pid>/stat; None once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    name, fields = stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 2 :].split()
    return Proc(int(fields[1]), int(fields[2]), fields[19], name)  # fields after "pid (name) "


def pids() -> set[int]:
    return {int(entry) for entry in os.listdir("/proc") if entry.isdigit()}


def process_table() -> dict[int, Proc]:
    """Every process of the machine."""
    return {pid: proc for pid in pids() if (proc := read_proc(pid)) is not None}


def descends_from(pid: int, ancestor: int) -> bool:
    seen = set()
    while pid > 1 and pid not in seen:
        seen.add(pid)
        proc = read_proc(pid)
        if proc is None:
            return False
        pid = proc.ppid
        if pid == ancestor:
            return True
    return False


class RayWatch:
    """Ray processes (or processes of other ``names``) that descend from this process and start
    while the watch runs.

    A thread lists /proc every ``interval_s`` and reads only the processes that were not there
    when the watch started (a new Ray process is one of them; a Ray instance this process had
    already started, the suite's in a full run, is not); :meth:`stop` looks once more. A Ray
    instance lives for seconds (its start alone takes about 2 s on 2 busy cores, its GCS server
    running from the first of them), so one that a test starts, in this process or in a child,
    is seen at 0.2 s intervals however quickly the test stops it again."""

    def __init__(self, interval_s: float = 0.2, names: frozenset[str] = RAY_PROCESSES):
        self.pid, self.names = os.getpid(), names
        self.old = pids()
        self.seen: dict[tuple[int, str], str] = {}
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._poll, args=(interval_s,), name="ray-watch", daemon=True)
        self.thread.start()

    def _look(self) -> None:
        for pid in pids() - self.old:
            proc = read_proc(pid)
            if proc is not None and proc.name in self.names and descends_from(pid, self.pid):
                self.seen[(pid, proc.started)] = proc.name

    def _poll(self, interval_s: float) -> None:
        while not self.done.wait(interval_s):
            self._look()

    def stop(self) -> list[str]:
        """``"<name> (pid <pid>)"`` of every new Ray process seen, in order of pid."""
        self.done.set()
        self.thread.join()
        self._look()
        return [f"{name} (pid {pid})" for (pid, _), name in sorted(self.seen.items())]
