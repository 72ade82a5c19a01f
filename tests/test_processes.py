"""The unit tier's guard (conftest's ``check_unit_tier``, tests/processes.py): a watch reports
the processes of the names it looks for that start below this process while it runs, whether
they are still running when it stops or ended before, and not those that ran before it.

A copy of ``sleep`` under another name stands for a Ray process: the kernel names a process
after its program's file."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

from processes import RayWatch

NAME = "lstm_fake_ray"  # a process name is at most 15 characters
WATCHED = frozenset({NAME})


def fake_ray(tmp_path: Path) -> str:
    program = tmp_path / NAME
    shutil.copy(shutil.which("sleep"), program)
    return str(program)


def test_a_process_started_while_watching_is_seen_and_one_started_before_is_not(tmp_path):
    program = fake_ray(tmp_path)
    before = subprocess.Popen([program, "60"])
    try:
        watch = RayWatch(names=WATCHED)
        during = subprocess.Popen([program, "60"])
        try:
            seen = watch.stop()  # its last look, with `during` running
        finally:
            during.kill()
            during.wait()
    finally:
        before.kill()
        before.wait()
    assert seen == [f"{NAME} (pid {during.pid})"]


def test_a_process_that_ends_before_the_watch_stops_is_seen_by_its_thread(tmp_path):
    program = fake_ray(tmp_path)
    watch = RayWatch(interval_s=0.05, names=WATCHED)
    child = subprocess.Popen([program, "60"])
    try:
        deadline = time.monotonic() + 60  # seen within a poll or two (0.05 s); the limit ends a hung test
        while not watch.seen and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        child.kill()
        child.wait()
    assert watch.stop() == [f"{NAME} (pid {child.pid})"]  # gone by now, and reported
