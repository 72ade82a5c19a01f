"""conftest's ``own_lines``, through which the tests count a job's one-line errors: it leaves out
every kind of line Ray forwards to the driver (a worker's or actor's output, a raylet's or the
autoscaler's warning, local or from another node, coloured or not) and keeps the job's own."""

from __future__ import annotations

from conftest import own_lines

RAY_LINES = [
    "(RayTrainWorker pid=7) [rectangle] epoch 1",
    "\x1b[36m(PlacementGroupCleaner pid=123, ip=10.0.0.2)\x1b[0m stopping",
    "(pid=99) a task's print",
    "\x1b[33m(raylet)\x1b[0m [2026-12-05 22:54:30,463 E 1 2] file_system_monitor.cc:116: /tmp is over 95% full",
    "(raylet, ip=10.0.0.3) a worker died",
    "\x1b[33m(autoscaler +1m2s)\x1b[0m Warning: resources requested cannot be scheduled",
]
OWN_LINES = [
    "error: cannot resume: no intact checkpoint left in /runs/r (x/model.pt is 1 bytes); start a new run",
    "[ptb] skipped checkpoint_000001 (raylet) in the middle",
    "(not Ray) a line of the job's own in parentheses",
]


def test_the_lines_ray_forwards_are_left_out_and_the_jobs_own_kept():
    assert own_lines("\n".join(RAY_LINES[:3] + OWN_LINES + RAY_LINES[3:]) + "\n") == OWN_LINES
