"""Where the test suite's time goes: the suite (`python -m pytest`, the README's test command
without its setup) with every process's CPU seconds counted while it runs, by kind of process:
the pytest processes, each Ray actor by its class (RayTrainWorker, TrainController, a trial's
actor ...), Ray's own processes, and the servers the tests start. On a 2-core machine the suite
is CPU-bound (``busy_cores`` near 2), so its wall time is this work over two cores.

    python bench/suite_cpu.py [pytest arguments, e.g. -x or tests/test_tune.py]

Prints one JSON line: ``wall_s``, pytest's exit status, ``busy_cores`` (the machine's busy CPU
time from /proc/stat over the wall time), ``cpu_s`` (the processes counted) and per kind its
CPU seconds and how many processes spent any. Processes are read from /proc every 0.2 s (as
run_overhead.py does), so one that lives less than that is missed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

from run_overhead import CpuSampler, process_group

REPO = Path(__file__).resolve().parents[1]
# Kinds of the processes that are not Ray's, by a word of their command line.
OTHER_PROCESSES = {
    "pytest": "pytest",
    "exec(eval(sys.stdin.readline()))": "pytest",  # pytest-xdist's workers (execnet's bootstrap)
    "chrom": "chromium",
    "moto": "s3_server",
    "mlflow": "mlflow_server",
    "tensorboard": "tensorboard",
    "jobs/": "job_driver",
    "ray.scripts.scripts": "ray_cli",
}


def busy_seconds() -> float:
    """The machine's busy CPU seconds since boot (all cores; /proc/stat less idle and iowait)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def kind(cmdline: str, pid: int) -> str:
    found = process_group(cmdline, -1, pid)
    if found != "other":
        return found
    return next((name for word, name in OTHER_PROCESSES.items() if word in cmdline), "other")


def main() -> None:
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *sys.argv[1:]]
    sampler = CpuSampler(driver_pid=-1)
    busy, began = busy_seconds(), time.monotonic()
    status = subprocess.run(command, cwd=REPO, stdout=sys.stderr).returncode
    wall, busy = time.monotonic() - began, busy_seconds() - busy
    sampler.stop()
    kinds: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for pid, (cpu, cmdline) in sampler.last.items():
        spent = cpu - sampler.first.get(pid, 0.0)
        if spent >= 0.01:
            counted = kinds[kind(cmdline, pid)]
            counted[0] += spent
            counted[1] += 1
    ranked = sorted(kinds.items(), key=lambda kv: -kv[1][0])
    out = {
        "bench": "suite_cpu",
        "command": " ".join(["python", "-m", "pytest", *command[3:]]),
        "exit": status,
        "wall_s": round(wall, 1),
        "busy_cores": round(busy / wall, 2),
        "cpu_s": round(sum(v[0] for v in kinds.values()), 1),
        "kinds": {name: {"cpu_s": round(cpu, 1), "processes": n} for name, (cpu, n) in ranked},
        "load_avg_1min": round(os.getloadavg()[0], 2),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
