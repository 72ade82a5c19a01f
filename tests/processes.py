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


def process_table() -> dict[int, Proc]:
    """Every process of the machine, from /proc."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        name, fields = stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 2 :].split()
        table[int(entry)] = Proc(int(fields[1]), int(fields[2]), fields[19], name)  # fields after "pid (name) "
    return table


def descends_from(pid: int, ancestor: int, table: dict[int, Proc]) -> bool:
    while pid in table and pid > 1:
        pid = table[pid].ppid
        if pid == ancestor:
            return True
    return False


def ray_processes(ancestor: int) -> dict[tuple[int, str], str]:
    """The Ray processes (:data:`RAY_PROCESSES`) that descend from process ``ancestor``:
    (pid, start time) -> name."""
    table = process_table()
    return {
        (pid, p.started): p.name
        for pid, p in table.items()
        if p.name in RAY_PROCESSES and descends_from(pid, ancestor, table)
    }


class RayWatch:
    """Ray processes that descend from this process and appear while the watch runs.

    A thread reads /proc every ``interval_s``; :meth:`stop` reads it once more. A Ray instance
    lives for seconds (its start alone takes about 2 s on 2 busy cores, and its GCS server runs
    from the first of them), so one that a test starts, in this process or in a child, is seen
    at 0.2 s intervals however quickly the test stops it again. A Ray instance that this
    process had already started (the suite's, in a full run) is not new."""

    def __init__(self, interval_s: float = 0.2):
        self.pid = os.getpid()
        self.before = set(ray_processes(self.pid))
        self.seen: dict[tuple[int, str], str] = {}
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._poll, args=(interval_s,), name="ray-watch", daemon=True)
        self.thread.start()

    def _look(self) -> None:
        for key, name in ray_processes(self.pid).items():
            if key not in self.before:
                self.seen[key] = name

    def _poll(self, interval_s: float) -> None:
        while not self.done.wait(interval_s):
            self._look()

    def stop(self) -> list[str]:
        """``"<name> (pid <pid>)"`` of every new Ray process seen, in order of pid."""
        self.done.set()
        self.thread.join()
        self._look()
        return [f"{name} (pid {pid})" for (pid, _), name in sorted(self.seen.items())]
