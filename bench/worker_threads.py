"""Threads per worker for a small model: the test suite's short PTB run (the tutorial's test
config on 2% of the training words, 2 epochs, evaluation in steps of 35 words; tests/conftest.py
``ptb_base_config``) with 1 and with 2 CPUs (torch threads) for its one worker, in alternating
order (ABBA), on one local Ray instance of 4 logical CPUs, as the suite's own.

    python bench/worker_threads.py --data-dir ../shared/data/ptb --repeats 2

Prints one JSON line: for each thread count the medians of the run's ``train_s``, ``eval_s``
and ``wall_s`` (the whole fit), each run's figures, ``two_over_one`` (the median of the
per-block ratios of train_s + eval_s), and the 1-minute load average before and after.
Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lstm import config as cfg  # noqa: E402
from lstm.tasks.ptb_config import PRESETS, PTBConfig  # noqa: E402

CONFIG = {**PRESETS["test"], "max_max_epoch": 2, "train_fraction": 0.02, "eval_num_steps": 35}


def load() -> float:
    return os.getloadavg()[0]


def one_run(threads: int, data_dir: str, storage: str, name: str) -> dict[str, float]:
    from lstm.trainer import fit

    settings = cfg.RunSettings(
        storage_path=storage, name=name, data_dir=data_dir, cpus_per_worker=threads, max_failures=0
    )
    start = time.perf_counter()
    result = fit("ptb", cfg.build(PTBConfig, CONFIG), settings)
    wall = time.perf_counter() - start
    return {"train_s": result.timings["train_s"], "eval_s": result.timings["eval_s"], "wall_s": wall}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", required=True, help="a folder with ptb.{train,valid,test}.txt")
    parser.add_argument("--repeats", type=int, default=2, help="ABBA blocks (each runs both thread counts twice)")
    args = parser.parse_args(argv)
    import ray

    before = load()
    ray.init(num_cpus=4, include_dashboard=False, logging_level="WARNING")
    storage = tempfile.mkdtemp(prefix="worker-threads-")
    runs: dict[int, list[dict[str, float]]] = {1: [], 2: []}
    ratios = []
    for block in range(args.repeats):
        got: dict[int, list[float]] = {1: [], 2: []}
        for threads in (1, 2, 2, 1):
            with contextlib.redirect_stdout(sys.stderr):  # the run's lines and its workers' are progress
                figures = one_run(threads, args.data_dir, storage, f"b{block}-t{threads}-{len(runs[threads])}")
            print(f"block {block}, {threads} thread(s): {figures}", file=sys.stderr, flush=True)
            runs[threads].append(figures)
            got[threads].append(figures["train_s"] + figures["eval_s"])
        ratios.append(statistics.mean(got[2]) / statistics.mean(got[1]))
    ray.shutdown()
    out = {
        f"threads_{t}": {k: round(statistics.median(r[k] for r in rs), 2) for k in ("train_s", "eval_s", "wall_s")}
        for t, rs in runs.items()
    }
    out |= {"two_over_one": round(statistics.median(ratios), 2), "runs": runs}
    out |= {"load_avg_1min": [round(before, 1), round(load(), 1)]}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
