"""What a runtime env costs each process Ray starts: actors created without one and with one
that only sets a variable (as a job's ``ray.init(runtime_env={"env_vars": ...})`` gives all its
workers), in alternating order on one local instance. Each is timed from its creation to its
first answer, with the CPU seconds its process had used by then (``exec`` keeps a process's CPU
times, so a runtime env's ``setup_worker.py`` start is counted). No idle workers are prestarted:
each actor gets a process of its own, as a run's actors do.

    python bench/actor_start.py --repeats 6

Prints one JSON line: per kind the medians of ``latency_s`` and ``cpu_s``, and the ratios of
the runtime env's to none's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

KINDS = {"no_runtime_env": {}, "env_vars_runtime_env": {"runtime_env": {"env_vars": {"LSTM_BENCH": "1"}}}}


def load_avg() -> float:
    return round(os.getloadavg()[0], 2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=6, help="actors of each kind, after one warm-up each")
    args = p.parse_args()
    os.environ["RAY_prestart_worker_first_driver"] = "0"
    import ray

    load_before = load_avg()
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")

    @ray.remote(num_cpus=0)
    class Probe:
        def cpu_s(self) -> float:
            times = os.times()
            return times.user + times.system

    def start(options: dict) -> tuple[float, float]:
        began = time.perf_counter()
        actor = Probe.options(**options).remote()
        cpu = ray.get(actor.cpu_s.remote())
        latency = time.perf_counter() - began
        ray.kill(actor)
        time.sleep(0.5)  # its process exits before the next starts
        return latency, cpu

    rows: dict[str, list[tuple[float, float]]] = {kind: [] for kind in KINDS}
    for options in KINDS.values():
        start(options)  # warm-up: the first of each kind reads its files from disk
    for i in range(args.repeats):
        order = list(KINDS) if i % 2 == 0 else list(reversed(KINDS))
        for kind in order:
            rows[kind].append(start(KINDS[kind]))
            print(f"{kind} {i + 1}/{args.repeats}: {rows[kind][-1]}", file=sys.stderr)
    ray.shutdown()
    out: dict = {"repeats": args.repeats, "load_avg_1min": [load_before, load_avg()]}
    for kind, values in rows.items():
        out[kind] = {
            "latency_s": round(statistics.median(v[0] for v in values), 3),
            "cpu_s": round(statistics.median(v[1] for v in values), 3),
        }
    for key in ("latency_s", "cpu_s"):
        out[f"{key}_ratio"] = round(out["env_vars_runtime_env"][key] / out["no_runtime_env"][key], 2)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
