"""TPE against random sampling on the same budget: searches of the rectangle task (its default
space: hidden_size 4,8,16,32 and a log range of learning rates, from the ``test`` preset),
each algorithm with the same seeds, in one process (one Ray instance, ``tune.search``), the
order of the two alternating from seed to seed.

    python bench/tpe_vs_random.py                       # 16 trials of 2 epochs, seeds 0 1 2
    python bench/tpe_vs_random.py --num-samples 32 --seeds 0 1 2 3 4

Prints one JSON line: per algorithm and seed the best metric of the search (the lowest
``valid_consistency`` any trial reached: lower is better), the median of the trials' best
(how many good trials the budget bought) and the search's wall time; their means over the
seeds, and ``tpe_wins``: the seeds where TPE's best is lower. Under ASHA (the default) a trial
stopped early counts with the epochs it ran, the same for both. Progress goes to stderr.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ALGS = ("random", "tpe")


def one_search(alg: str, seed: int, args: argparse.Namespace, storage: str) -> dict:
    """A search's best metric, the median of its trials' best, and its wall time."""
    import tune
    from tune import report
    from tune.spec import load_spec

    start = time.perf_counter()
    result = tune.search(
        "rectangle",
        base="test",
        search_alg=alg,
        seed=seed,
        num_samples=args.num_samples,
        max_epochs=args.max_epochs,
        max_concurrent=args.max_concurrent,
        storage_path=storage,
        name=f"{alg}-{seed}",
    )
    wall = time.perf_counter() - start
    spec = load_spec(result.folder)
    bests = [b[1] for b in (r.best(spec.mode) for r in report.read_rows(spec)) if b is not None]
    out = {"best": min(bests), "median_trial": statistics.median(bests), "trials": len(bests), "wall_s": wall}
    print(f"{alg} seed {seed}: best {out['best']:.4f}, median {out['median_trial']:.4f}, {wall:.0f} s", file=sys.stderr)
    return out


def summarize(runs: dict[str, dict[int, dict]], seeds: list[int]) -> dict:
    out: dict = {}
    for alg in ALGS:
        per_seed = [runs[alg][s] for s in seeds]
        out[alg] = {
            "best": [round(r["best"], 5) for r in per_seed],
            "median_trial": [round(r["median_trial"], 5) for r in per_seed],
            "wall_s": [round(r["wall_s"], 1) for r in per_seed],
            "mean_best": round(statistics.mean(r["best"] for r in per_seed), 5),
            "mean_median_trial": round(statistics.mean(r["median_trial"] for r in per_seed), 5),
        }
    out["tpe_wins"] = sum(runs["tpe"][s]["best"] < runs["random"][s]["best"] for s in seeds)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-samples", type=int, default=16, help="trials per search")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one search per algorithm and seed")
    p.add_argument("--max-epochs", type=int, default=2, help="epochs per trial")
    p.add_argument("--max-concurrent", type=int, default=2, help="trials at once")
    args = p.parse_args()
    load_before = os.getloadavg()[0]  # the machine may be shared: say how busy it was
    start = time.perf_counter()
    runs: dict[str, dict[int, dict]] = {alg: {} for alg in ALGS}
    # the searches' own lines go to stderr with the progress: stdout is the JSON line
    with tempfile.TemporaryDirectory(prefix="tpe-vs-random-") as storage, contextlib.redirect_stdout(sys.stderr):
        for i, seed in enumerate(args.seeds):
            for alg in ALGS if i % 2 == 0 else reversed(ALGS):
                runs[alg][seed] = one_search(alg, seed, args, storage)
    out = {
        "task": "rectangle",
        "base": "test",
        "metric": "valid_consistency (min)",
        "num_samples": args.num_samples,
        "max_epochs": args.max_epochs,
        "max_concurrent": args.max_concurrent,
        "seeds": args.seeds,
        **summarize(runs, args.seeds),
        "wall_s": round(time.perf_counter() - start, 1),
        "load_avg_1min": [round(load_before, 1), round(os.getloadavg()[0], 1)],
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
