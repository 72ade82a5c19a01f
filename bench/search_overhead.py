"""What a search costs beyond its training: ``jobs/search.py`` against the plain Ray Tune
script a user would write for the same training (bench/peer_tune_ptb.py: same model, data,
space, seeded samples, ASHA and checkpoints), run as commands in alternating order (ABBA).

    python bench/search_overhead.py --data-dir ../shared/data/ptb --repeats 2
    python bench/search_overhead.py --data-dir ../shared/data/ptb --workers-per-trial 2 --baseline ../old --no-peer

The project's command is the one below, plus ``--workers-per-trial`` (default 1)::

    python jobs/search.py --base small --train-fraction 0.02 --max-epochs 2 --num-samples 6 \\
        --space hidden_size=200,400

``--baseline DIR`` (another checkout, e.g. ``git worktree add ../old <commit>``) runs that
checkout's command too, in the same alternating order; ``--no-peer`` leaves the peer out.

Prints one JSON line: per command the median wall time (process start to exit) and each run's
trials' fixed cost -- a trial's wall time (Tune's ``time_total_s``, from the trial function's
start to its last report) minus its training and evaluation (the reported ``train_s`` and
``eval_s``), and the ratios ``project_over_peer`` and ``project_over_baseline`` of the median
walls. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SEARCH = ["--base", "small", "--train-fraction", "0.02", "--max-epochs", "2", "--num-samples", "6"]
SEARCH += ["--space", "hidden_size=200,400"]


def trial_costs(experiment: Path) -> list[dict[str, float]]:
    """Each trial's wall time, train and eval seconds, and fixed cost, from Tune's result.json."""
    costs = []
    for result in sorted(experiment.glob("*/result.json")):
        rows = [json.loads(line) for line in result.read_text().splitlines() if line.strip()]
        rows = [r for r in rows if "epoch" in r]
        if not rows:
            continue
        wall = float(rows[-1]["time_total_s"])
        busy = sum(float(r.get("train_s", 0.0)) + float(r.get("eval_s", 0.0)) for r in rows)
        costs.append({"trial": result.parent.name, "wall_s": wall, "busy_s": busy, "fixed_s": wall - busy})
    return costs


def run(kind: str, command: list[str], storage: Path, name: str) -> dict:
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{kind} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    trials = trial_costs(storage / name)
    print(f"{kind}: {wall:.1f} s, {len(trials)} trials", file=sys.stderr, flush=True)
    return {"wall_s": wall, "trials": trials}


def commands(args: argparse.Namespace, storage: Path, name: str) -> dict[str, list[str]]:
    data = ["--data-dir", str(Path(args.data_dir).resolve())]
    where = ["--storage-path", str(storage), "--name", name]
    project = [*SEARCH, "--workers-per-trial", str(args.workers_per_trial), *data, *where]
    out = {"project": [sys.executable, "jobs/search.py", *project]}
    if args.baseline:
        # the search's old name, which older checkouts have and newer ones keep as an alias
        out["baseline"] = [sys.executable, str(Path(args.baseline).resolve() / "jobs" / "tune_ptb.py"), *project]
    if not args.no_peer:
        out["peer"] = [sys.executable, "bench/peer_tune_ptb.py", *data, *where]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", required=True, help="a folder with ptb.{train,valid,test}.txt")
    p.add_argument("--repeats", type=int, default=2, help="runs of each command")
    p.add_argument("--workers-per-trial", type=int, default=1)
    p.add_argument("--baseline", default="", help="another checkout of this project to run beside")
    p.add_argument("--no-peer", action="store_true", help="leave the plain Ray Tune script out")
    args = p.parse_args()
    runs: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="search-overhead-") as tmp:
        for i in range(args.repeats):
            cmds = commands(args, Path(tmp), f"r{i}")
            order = list(cmds) if i % 2 == 0 else list(reversed(cmds))
            for kind in order:
                storage = Path(tmp) / kind
                runs.setdefault(kind, []).append(run(kind, commands(args, storage, f"r{i}")[kind], storage, f"r{i}"))
    out: dict = {"repeats": args.repeats, "workers_per_trial": args.workers_per_trial}
    for kind, results in runs.items():
        fixed = [t["fixed_s"] for r in results for t in r["trials"]]
        out[kind] = {
            "wall_s": [round(r["wall_s"], 1) for r in results],
            "median_wall_s": round(statistics.median(r["wall_s"] for r in results), 1),
            "median_trial_fixed_s": round(statistics.median(fixed), 2) if fixed else None,
            "trial_fixed_s": [round(v, 2) for v in fixed],
        }
    for other in ("peer", "baseline"):
        if other in out:
            out[f"project_over_{other}"] = round(out["project"]["median_wall_s"] / out[other]["median_wall_s"], 3)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
