"""A whole run's fixed cost: the wall time of a short PTB command minus its training and
evaluation, with the breakdown of lstm.timings, for a command that starts its own local Ray
instance ("local", plain `python jobs/ptb.py`) and one that joins a running head ("joined":
`ray start --head` once, then RAY_ADDRESS), run in alternating order (ABBA) in one call.

    python bench/run_overhead.py --data-dir ../shared/data/ptb --repeats 2
    python bench/run_overhead.py --data-dir ../shared/data/ptb --baseline ../old-checkout

``--baseline DIR`` (another checkout of this project, e.g. ``git worktree add ../old <commit>``)
runs its ``jobs/ptb.py`` too, in both modes, in the same alternating order, and reports the
ratios of this tree's overhead to the baseline's, measured side by side.

Prints one JSON line: per mode the medians of ``wall_s``, ``overhead_s`` (wall_s - train_s -
eval_s) and of each phase of results.json's ``timings``; ``after_results_s`` is what came after
results.json was written (Ray's shutdown for "local"). Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMMAND = ["--config", "test", "--train-fraction", "0.02", "--max-max-epoch", "1"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_head(temp_dir: Path, env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    """`ray start --head --block` on free ports under ``temp_dir``; (process, GCS address)."""
    port = free_port()
    command = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", "--disable-usage-stats"]
    command += ["--node-ip-address", "127.0.0.1", "--port", str(port), "--dashboard-port", str(free_port())]
    command += ["--temp-dir", str(temp_dir)]
    log = open(temp_dir / "head.log", "w")
    proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        status = subprocess.run(
            [sys.executable, "-m", "ray.scripts.scripts", "status", "--address", address], env=env, capture_output=True
        )
        if status.returncode == 0:
            return proc, address
        time.sleep(1)
    stop_head(proc)
    sys.exit(f"error: the head did not start; see {temp_dir / 'head.log'}")


def stop_head(proc: subprocess.Popen) -> None:
    """SIGTERM: `ray start --block` stops the node's processes; then whatever is left of its group."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def run_once(mode: str, repo: Path, env: dict[str, str], storage: Path, data_dir: str, index: int) -> dict[str, float]:
    name = f"{mode}-{index}"
    command = [sys.executable, str(repo / "jobs" / "ptb.py"), *COMMAND, "--data-dir", data_dir]
    command += ["--storage-path", str(storage), "--name", name]
    start = time.perf_counter()
    env = {**env, "PYTHONPATH": str(repo)}  # that checkout's package, not an installed one
    proc = subprocess.run(command, env=env, capture_output=True, text=True, cwd=repo)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"error: the {mode} run failed:\n{proc.stderr[-3000:]}")
    timings = json.loads((storage / name / "results.json").read_text())["timings"]
    row = {"wall_s": wall, "overhead_s": wall - timings["train_s"] - timings["eval_s"], **timings}
    row["after_results_s"] = wall - timings["total_s"]
    print(f"{mode}: {json.dumps({k: round(v, 2) for k, v in row.items()})}", file=sys.stderr, flush=True)
    return row


def medians(rows: list[dict[str, float]]) -> dict[str, float]:
    return {key: round(statistics.median(r[key] for r in rows if key in r), 2) for key in rows[0]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", required=True, help="the folder of ptb.{train,valid,test}.txt")
    p.add_argument("--repeats", type=int, default=2, help="ABBA blocks (each runs every mode twice)")
    p.add_argument("--baseline", type=Path, default=None, help="another checkout to run side by side")
    args = p.parse_args()
    if args.baseline and not (args.baseline / "jobs" / "ptb.py").is_file():
        sys.exit(f"error: --baseline {args.baseline} has no jobs/ptb.py; pass a checkout of this project")
    temp_dir = Path(tempfile.mkdtemp(prefix="lstm-oh-", dir="/tmp"))  # short: Ray's socket paths
    token = temp_dir / "auth_token"
    token.write_text(secrets.token_hex(32))
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    base.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token))
    local_env = {**base, "RAY_TMPDIR": str(temp_dir / "local")}  # no other instance to join by accident
    (temp_dir / "local").mkdir()
    load_before = os.getloadavg()[0]
    head, address = start_head(temp_dir, base)
    envs = {"local": local_env, "joined": {**base, "RAY_ADDRESS": address}}
    repos = {"": REPO, **({"baseline_": args.baseline.resolve()} if args.baseline else {})}
    modes = [(prefix + mode, repo, envs[mode]) for prefix, repo in repos.items() for mode in envs]
    rows: dict[str, list[dict[str, float]]] = {mode: [] for mode, _, _ in modes}
    try:
        for block in range(args.repeats):
            for i, (mode, repo, env) in enumerate([*modes, *reversed(modes)]):
                index = 2 * len(modes) * block + i
                rows[mode].append(run_once(mode, repo, env, temp_dir / "runs", args.data_dir, index))
    finally:
        stop_head(head)
    result = {mode: medians(r) for mode, r in rows.items()}
    out = {
        "command": "python jobs/ptb.py " + " ".join(COMMAND),
        "repeats": args.repeats,
        **result,
        "joined_over_local_overhead": round(result["joined"]["overhead_s"] / result["local"]["overhead_s"], 3),
        "load_avg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }
    if args.baseline:
        out["baseline"] = str(args.baseline)
        for mode in envs:
            pairs = zip(rows[mode], rows["baseline_" + mode], strict=True)  # the same block, side by side
            ratios = [r["overhead_s"] / b["overhead_s"] for r, b in pairs]
            out[f"{mode}_over_baseline_overhead"] = round(statistics.median(ratios), 3)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
