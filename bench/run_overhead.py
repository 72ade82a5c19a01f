"""A whole run's fixed cost: the wall time of a short PTB command minus its training and
evaluation, with the breakdown of lstm.timings, for a command that starts its own local Ray
instance ("local", plain `python jobs/ptb.py`) and one that joins a running head ("joined":
`ray start --head` once, then the same plain command, which finds the head where `ray start`
left its address, as `ray.init()` does), run in alternating order (ABBA) in one call.

    python bench/run_overhead.py --data-dir ../shared/data/ptb --repeats 2
    python bench/run_overhead.py --data-dir ../shared/data/ptb --baseline ../old-checkout

``--baseline DIR`` (another checkout of this project, e.g. ``git worktree add ../old <commit>``)
runs its ``jobs/ptb.py`` too, in both modes, in the same alternating order, and reports the
ratios of this tree's overhead to the baseline's, measured side by side.

Prints one JSON line: per mode the medians of ``wall_s``, ``overhead_s`` (wall_s - train_s -
eval_s) and of each phase of results.json's ``timings``; ``after_results_s`` is what came after
results.json was written (Ray's shutdown for "local"). Progress goes to stderr. Before the
alternating runs, one joined run warms the new head (``joined_first``: it creates Ray Train's
cluster-wide actors, which later runs reuse, as a user's repeated runs do); each run starts
once the previous run's Ray processes have finished exiting.

It also counts the CPU time every process on the machine spent during each run (``cpu_s``, by
process: the job's driver, each Ray actor by its class, Ray's own processes; read from /proc
every 0.2 s, so a process that lives less than that may be missed), and ``busy_cores``, that
total over the wall time. On a machine with few cores this is the floor under the fixed cost:
work that all of a run's processes must do, however well they overlap.
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
import threading
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMMAND = ["--config", "test", "--train-fraction", "0.02", "--max-max-epoch", "1"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_head(temp_dir: Path, env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    """`ray start --head --block` on free ports, its files in ``temp_dir/ray`` (where a job
    with RAY_TMPDIR=temp_dir finds it); (process, GCS address)."""
    port = free_port()
    command = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", "--disable-usage-stats"]
    command += ["--node-ip-address", "127.0.0.1", "--port", str(port), "--dashboard-port", str(free_port())]
    command += ["--temp-dir", str(temp_dir / "ray")]
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


# Ray's own processes by a word of their command line; an actor's process is titled ray::Class.
RAY_PROCESSES = {
    "gcs_server": "gcs_server",
    "raylet/raylet": "raylet",
    "dashboard": "dashboard",
    "log_monitor.py": "log_monitor",
    "autoscaler/_private/monitor.py": "autoscaler_monitor",
}


def process_group(cmdline: str, driver_pid: int, pid: int) -> str:
    """The name ``cpu_s`` counts a process under: "driver", an actor's class ("RayTrainWorker"),
    "idle_worker", one of :data:`RAY_PROCESSES`, or "other" (anything else on the machine)."""
    if pid == driver_pid:
        return "driver"
    if cmdline.startswith("ray::"):
        title = cmdline[5:].split()[0] if cmdline[5:].strip() else "?"
        return "idle_worker" if title == "IDLE" else title.split(".")[0]
    for word, name in RAY_PROCESSES.items():
        if word in cmdline:
            return name
    return "other"


def cpu_times() -> dict[int, tuple[float, str]]:
    """Every process's CPU seconds so far (user + system) and its command line, from /proc."""
    ticks = os.sysconf("SC_CLK_TCK")
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # it exited meanwhile
            continue
        fields = stat[stat.rfind(")") + 2 :].split()  # after "pid (comm) "; utime, stime are 14th, 15th
        out[int(entry)] = ((int(fields[11]) + int(fields[12])) / ticks, cmdline.strip())
    return out


class CpuSampler:
    """CPU seconds per process group while it runs: each process's last reading minus its
    reading at the start (0 for a process that started later). ``stop()`` returns them."""

    def __init__(self, driver_pid: int, every_s: float = 0.2) -> None:
        self.driver_pid, self.every_s = driver_pid, every_s
        self.first = {pid: cpu for pid, (cpu, _) in cpu_times().items()}
        self.last: dict[int, tuple[float, str]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self._sample()

    def _sample(self) -> None:
        me = os.getpid()
        for pid, (cpu, cmdline) in cpu_times().items():
            if pid != me:
                known = self.last.get(pid, (0.0, ""))[1]
                self.last[pid] = (cpu, cmdline or known)  # a dying process's command line reads empty

    def stop(self) -> dict[str, float]:
        """The CPU seconds per group, from a last reading now and the earlier ones (of the
        processes that have exited since)."""
        self._stop.set()
        self._thread.join()
        self._sample()
        groups: dict[str, float] = defaultdict(float)
        for pid, (cpu, cmdline) in self.last.items():
            groups[process_group(cmdline, self.driver_pid, pid)] += cpu - self.first.get(pid, 0.0)
        return {name: round(cpu, 2) for name, cpu in sorted(groups.items(), key=lambda kv: -kv[1]) if cpu >= 0.01}


def settle(quiet_s: float = 1.0, limit_s: float = 30.0) -> None:
    """Wait until the machine's Ray processes stop changing for ``quiet_s`` (at most
    ``limit_s``): a local instance's processes go on exiting for a second or two after its
    driver, and the next run would share the CPU with them."""

    def ray_pids() -> set[int]:
        return {pid for pid, (_, cmdline) in cpu_times().items() if cmdline.startswith("ray::") or "/ray/" in cmdline}

    deadline = time.monotonic() + limit_s
    last, since = ray_pids(), time.monotonic()
    while time.monotonic() < deadline and time.monotonic() - since < quiet_s:
        time.sleep(0.1)
        now = ray_pids()
        if now != last:
            last, since = now, time.monotonic()


def run_once(mode: str, repo: Path, env: dict[str, str], storage: Path, data_dir: str, index: int) -> dict[str, float]:
    """One run of the command, after the machine has settled; its row of figures."""
    settle()
    name = f"{mode}-{index}"
    command = [sys.executable, str(repo / "jobs" / "ptb.py"), *COMMAND, "--data-dir", data_dir]
    command += ["--storage-path", str(storage), "--name", name]
    start = time.perf_counter()
    env = {**env, "PYTHONPATH": str(repo)}  # that checkout's package, not an installed one
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=repo)
    sampler = CpuSampler(proc.pid)
    _, stderr = proc.communicate()
    wall = time.perf_counter() - start
    cpu = sampler.stop()
    if proc.returncode != 0:
        sys.exit(f"error: the {mode} run failed:\n{stderr[-3000:]}")
    timings = json.loads((storage / name / "results.json").read_text())["timings"]
    row = {"wall_s": wall, "overhead_s": wall - timings["train_s"] - timings["eval_s"], **timings}
    row["after_results_s"] = wall - timings["total_s"]
    row["cpu_total_s"] = sum(cpu.values())
    row["busy_cores"] = row["cpu_total_s"] / wall
    row.update({f"cpu_s.{group}": seconds for group, seconds in cpu.items()})
    print(f"{mode}: {json.dumps({k: round(v, 2) for k, v in row.items()})}", file=sys.stderr, flush=True)
    return row


def medians(rows: list[dict[str, float]]) -> dict:
    """Each key's median over the rows that have it; the ``cpu_s.<group>`` keys gathered under
    ``cpu_s``, counting 0 for a row without the group (that process did not run then)."""
    plain = [key for key in rows[0] if not key.startswith("cpu_s.")]
    out: dict = {key: round(statistics.median(r[key] for r in rows if key in r), 2) for key in plain}
    groups = dict.fromkeys(key for r in rows for key in r if key.startswith("cpu_s."))
    cpu = {key.split(".", 1)[1]: round(statistics.median(r.get(key, 0.0) for r in rows), 2) for key in groups}
    out["cpu_s"] = dict(sorted(cpu.items(), key=lambda kv: -kv[1]))
    return out


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", required=True, help="the folder of ptb.{train,valid,test}.txt")
    p.add_argument("--repeats", type=int, default=2, help="ABBA blocks (each runs every mode twice)")
    p.add_argument("--baseline", type=Path, default=None, help="another checkout to run side by side")
    p.add_argument(
        "--modes",
        nargs="+",
        choices=["local", "joined"],
        default=["local", "joined"],
        help="which modes to run (joined alone: a user's repeated runs on one head, back to back)",
    )
    args = p.parse_args()
    if args.baseline and not (args.baseline / "jobs" / "ptb.py").is_file():
        sys.exit(f"error: --baseline {args.baseline} has no jobs/ptb.py; pass a checkout of this project")
    return args


def main() -> None:
    args = parse_args()
    temp_dir = Path(tempfile.mkdtemp(prefix="lstm-oh-", dir="/tmp"))  # short: Ray's socket paths
    token = temp_dir / "auth_token"
    token.write_text(secrets.token_hex(32))
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    base.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token))
    local_env = {**base, "RAY_TMPDIR": str(temp_dir / "local")}  # no other instance to join by accident
    (temp_dir / "local").mkdir()
    load_before = os.getloadavg()[0]
    envs = {"local": local_env} if "local" in args.modes else {}
    head, first_joined = None, None
    if "joined" in args.modes:
        head, address = start_head(temp_dir, base)
        envs["joined"] = {**base, "RAY_TMPDIR": str(temp_dir)}  # no RAY_ADDRESS: as a user's shell
        print(f"head at {address}", file=sys.stderr, flush=True)
    repos = {"": REPO, **({"baseline_": args.baseline.resolve()} if args.baseline else {})}
    modes = [(prefix + mode, repo, envs[mode]) for prefix, repo in repos.items() for mode in envs]
    rows: dict[str, list[dict[str, float]]] = {mode: [] for mode, _, _ in modes}
    try:
        # The first run on a new head creates Ray Train's cluster-wide actors (its state actor
        # and autoscaling coordinator), which every later run reuses: it is reported apart.
        if head:
            first_joined = run_once("joined_first", REPO, envs["joined"], temp_dir / "runs", args.data_dir, 0)
        for block in range(args.repeats):
            for i, (mode, repo, env) in enumerate([*modes, *reversed(modes)]):
                index = 2 * len(modes) * block + i
                rows[mode].append(run_once(mode, repo, env, temp_dir / "runs", args.data_dir, index))
    finally:
        if head:
            stop_head(head)
    result = {mode: medians(r) for mode, r in rows.items()}
    out = {
        "command": "python jobs/ptb.py " + " ".join(COMMAND),
        "repeats": args.repeats,
        **result,
        **({"joined_first": medians([first_joined])} if first_joined else {}),
        "modes": args.modes,
        "load_avg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }
    if len(envs) == 2:
        out["joined_over_local_overhead"] = round(result["joined"]["overhead_s"] / result["local"]["overhead_s"], 3)
    if args.baseline:
        out["baseline"] = str(args.baseline)
        for mode in envs:
            pairs = zip(rows[mode], rows["baseline_" + mode], strict=True)  # the same block, side by side
            ratios = [r["overhead_s"] / b["overhead_s"] for r, b in pairs]
            out[f"{mode}_over_baseline_overhead"] = round(statistics.median(ratios), 3)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
