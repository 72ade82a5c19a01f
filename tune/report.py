"""The report of a search, written into its folder: ``results.csv``/``results.md`` (a row per
trial, best first), ``best_config.json`` (the preset with the best trial's values, at the
preset's own epochs and data, for ``jobs/<task>.py --config-file``), ``best_trial.json``
(what the best trial ran), plots and ``search_summary.json``. ``python -m tune.report
<search folder>`` rewrites them from what is on disk.
"""

from __future__ import annotations

import argparse
import csv
import io
import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from ray.tune import ExperimentAnalysis

from lstm import checkpoint as ckpt
from lstm import config as cfg
from lstm import outputs, plots, storage
from lstm.errors import UserError, run_cli
from tune.schedulers import read_trial_results
from tune.spec import SearchSpec, is_train_run_of, load_spec

STATUS_DONE = "TERMINATED"
STATUS_ERROR = "ERROR"


@dataclass
class TrialRow:
    """One trial of a search, as the table shows it."""

    trial_id: str
    status: str  # TERMINATED | ERROR | RUNNING/PENDING/PAUSED (an interrupted search)
    hparams: dict[str, Any]
    history: list[tuple[int, float]]  # (epoch, metric) as reported
    epochs_planned: Optional[int]
    error: str = ""

    @property
    def epochs_run(self) -> int:
        return max((e for e, _ in self.history), default=0)

    @property
    def final(self) -> Optional[float]:
        return self.history[-1][1] if self.history else None

    def best(self, mode: str) -> Optional[tuple[int, float]]:
        """(epoch, value) of the best finite value, or None."""
        finite = [(e, v) for e, v in self.history if v is not None and math.isfinite(v)]
        if not finite:
            return None
        return (min if mode == "min" else max)(finite, key=lambda ev: ev[1])

    @property
    def stopped_early(self) -> bool:
        """Ended (not errored or interrupted) before its planned epochs: by the scheduler or the time budget."""
        return self.status == STATUS_DONE and self.epochs_planned is not None and self.epochs_run < self.epochs_planned


@dataclass
class SearchReport:
    """What :func:`write_report` wrote, and the rows it wrote them from."""

    rows: list[TrialRow]
    metric: str
    mode: str
    params: list[str]
    best: Optional[TrialRow]
    files: dict[str, str] = field(default_factory=dict)  # what -> path
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def stopped_early(self) -> list[TrialRow]:
        return [r for r in self.rows if r.stopped_early]


# --------------------------------------------------------------------------- reading


def read_rows(spec: SearchSpec) -> list[TrialRow]:
    """The trials of a search, from what Tune saved, read through the search's storage."""
    # A trial that had not reported yet when a search was interrupted has no results; that
    # is expected here, so keep ExperimentAnalysis from warning about it.
    quiet = logging.getLogger("ray.tune.analysis.experiment_analysis")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        analysis = ExperimentAnalysis(spec.experiment_dir)
    finally:
        quiet.setLevel(level)
    rows = []
    for trial in analysis.trials:
        trial_dir = spec.trial_dir(trial.trial_id)
        history, planned = [], None
        for r in read_trial_results(trial_dir):
            if "epoch" in r and isinstance(r.get(spec.metric), (int, float)):
                history.append((int(r["epoch"]), float(r[spec.metric])))
            if isinstance(r.get("epochs"), int):
                planned = r["epochs"]
        rows.append(
            TrialRow(
                trial_id=trial.trial_id,
                status=str(trial.status),
                hparams=dict(trial.config or {}),
                history=_last_per_epoch(history),
                epochs_planned=planned,
                error=_error_line(trial_dir) if trial.status == STATUS_ERROR else "",
            )
        )
    return rows


def _last_per_epoch(history: list[tuple[int, float]]) -> list[tuple[int, float]]:
    """One value per epoch (a resumed trial may report an epoch again): the last one."""
    by_epoch: dict[int, float] = {}
    for e, v in history:
        by_epoch[e] = v
    return sorted(by_epoch.items())


def _error_line(trial_dir: str) -> str:
    """The one-line cause of a trial's error (the UserError message where there is one)."""
    try:
        text = storage.read_bytes(storage.join(trial_dir, "error.txt")).decode("utf-8", errors="replace")
    except FileNotFoundError:
        return "error (see the trial's folder)"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "UserError:" in ln:
            return ln.split("UserError:", 1)[1].strip()
    return lines[-1] if lines else "error"


def sort_rows(rows: Sequence[TrialRow], mode: str) -> list[TrialRow]:
    """Best first; trials without a finite value last."""

    def key(r: TrialRow) -> tuple[int, float]:
        b = r.best(mode)
        if b is None:
            return (1, 0.0)
        return (0, b[1] if mode == "min" else -b[1])

    return sorted(rows, key=key)


# --------------------------------------------------------------------------- tables


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.{digits}g}"
    return str(v)


def table(rows: Sequence[TrialRow], params: Sequence[str], metric: str, mode: str) -> tuple[list[str], list[list[Any]]]:
    """Header and rows (raw values) of the results table."""
    header = [
        "rank",
        "trial",
        "status",
        *params,
        "epochs run",
        f"best {metric}",
        "best epoch",
        f"final {metric}",
        "stopped early",
        "error",
    ]
    out = []
    for i, r in enumerate(rows, 1):
        b = r.best(mode)
        out.append(
            [
                i,
                r.trial_id,
                r.status,
                *[r.hparams.get(p) for p in params],
                r.epochs_run,
                b[1] if b else None,
                b[0] if b else None,
                r.final,
                r.stopped_early,
                r.error,
            ]
        )
    return header, out


def to_csv(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for row in rows:
        w.writerow(["" if v is None else (repr(v) if isinstance(v, float) else v) for v in row])
    return buf.getvalue()


def to_markdown(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(v: Any) -> str:
        return _fmt(v).replace("|", "\\|")

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- best config


def best_configs(spec: SearchSpec, best: TrialRow) -> tuple[dict[str, Any], dict[str, Any]]:
    """(best_config.json, best_trial.json) contents for the best trial."""
    b = best.best(spec.mode)
    best_config = {"task": spec.task, **cfg.to_dict(spec.best_config(best.hparams))}
    best_trial = {
        "task": spec.task,
        "trial_id": best.trial_id,
        "metric": spec.metric,
        "best": b[1] if b else None,
        "best_epoch": b[0] if b else None,
        "epochs_run": best.epochs_run,
        "hyperparameters": best.hparams,
        "config": cfg.to_dict(spec.trial_config(best.hparams)),
    }
    return best_config, best_trial


# --------------------------------------------------------------------------- plots


def plot_curves(rows: Sequence[TrialRow], metric: str, path: Path, *, title: str = "") -> Path:
    """The metric per epoch, one line per trial; an x marks where a trial was stopped early."""
    plt = plots.plt
    fig, ax = plt.subplots(figsize=(7, 4.2))
    values = []
    for r in rows:
        pts = [(e, v) for e, v in r.history if math.isfinite(v)]
        if not pts:
            continue
        values += [v for _, v in pts]
        (line,) = ax.plot(*zip(*pts, strict=True), marker=".", lw=1.2, label=r.trial_id if len(rows) <= 12 else None)
        if r.stopped_early:
            ax.plot([pts[-1][0]], [pts[-1][1]], marker="x", ms=9, color=line.get_color())
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))  # epochs are whole numbers
    ax.set_ylabel(metric)
    if values and min(values) > 0 and max(values) / min(values) > 20:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if 0 < len(rows) <= 12:
        ax.legend(fontsize=7, ncol=2)
    ax.set_title(title or f"{metric} per epoch (x: stopped early)")
    return plots.save(fig, path)


def plot_vs_params(rows: Sequence[TrialRow], params: Sequence[Any], metric: str, path: Path) -> Optional[Path]:
    """Each trial's final metric against each searched hyperparameter; hollow: stopped early."""
    plt = plots.plt
    if not params:
        return None
    fig, axes = plt.subplots(1, len(params), figsize=(4.2 * len(params), 3.6), squeeze=False)
    for ax, p in zip(axes[0], params, strict=True):
        pts = [
            (r.hparams.get(p.name), r.final, r.stopped_early)
            for r in rows
            if r.final is not None and math.isfinite(r.final) and p.name in r.hparams
        ]
        numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x, _, _ in pts)
        labels: list[Any] = []
        if not numeric:
            labels = sorted({str(x) for x, _, _ in pts})
        for x, y, stopped in pts:
            xv = x if numeric else labels.index(str(x))
            ax.scatter([xv], [y], s=30, facecolors="none" if stopped else "tab:blue", edgecolors="tab:blue")
        if not numeric:
            ax.set_xticks(range(len(labels)), labels)
        elif p.is_log:
            ax.set_xscale("log")
        ys = [y for _, y, _ in pts]
        if ys and min(ys) > 0 and max(ys) / min(ys) > 20:
            ax.set_yscale("log")
        ax.set_xlabel(p.name)
        ax.set_ylabel(f"final {metric}")
        ax.grid(alpha=0.3)
    fig.suptitle(f"final {metric} per trial (hollow: stopped early)")
    return plots.save(fig, path)


# --------------------------------------------------------------------------- writing


def write_report(spec: SearchSpec, *, wall_time_s: Optional[float] = None) -> SearchReport:
    """Write the search's table, best configs, plots, summary and each trial's run outputs."""
    rows = sort_rows(read_rows(spec), spec.mode)
    params = list(spec.space.params)
    out = spec.experiment_dir
    header, body = table(rows, params, spec.metric, spec.mode)
    files = {
        "csv": storage.write_text(storage.join(out, "results.csv"), to_csv(header, body)),
        "markdown": storage.write_text(storage.join(out, "results.md"), _markdown_page(spec, rows, header, body)),
    }
    runs = write_trial_outputs(spec, rows)
    best = next((r for r in rows if r.best(spec.mode) is not None), None)
    if best is not None:
        best_config, best_trial = best_configs(spec, best)
        best_trial["run_dir"] = storage.display(runs[best.trial_id]) if best.trial_id in runs else None
        files["best_config"] = storage.write_json(storage.join(out, "best_config.json"), best_config)
        files["best_trial"] = storage.write_json(storage.join(out, "best_trial.json"), best_trial)
    files.update(write_plots(spec, rows))
    summary = summarize(spec, rows, best, wall_time_s)
    summary["files"] = {k: storage.display(v) for k, v in files.items()}
    files["summary"] = storage.write_json(storage.join(out, "search_summary.json"), summary)
    return SearchReport(
        rows=rows, metric=spec.metric, mode=spec.mode, params=params, best=best, files=files, summary=summary
    )


def write_plots(spec: SearchSpec, rows: Sequence[TrialRow]) -> dict[str, str]:
    """The search's two plots, under ``plots/`` of its folder."""
    if not any(r.history for r in rows):
        return {}
    files = {}
    folder = storage.join(spec.experiment_dir, "plots")
    with storage.staging(folder) as local:
        curves = plot_curves(rows, spec.metric, local / f"{spec.metric}_per_epoch.png")
        files["curves"] = storage.join(folder, curves.name)
        vs = plot_vs_params(
            rows, list(spec.space.params.values()), spec.metric, local / f"final_{spec.metric}_vs_hyperparameters.png"
        )
        if vs is not None:
            files["vs_hyperparameters"] = storage.join(folder, vs.name)
    return files


def summarize(
    spec: SearchSpec, rows: Sequence[TrialRow], best: Optional[TrialRow], wall_time_s: Optional[float]
) -> dict[str, Any]:
    """``search_summary.json``: counts, wall time, the best trial, the space and budget."""
    counts: dict[str, int] = {}
    for r in rows:
        counts[r.status] = counts.get(r.status, 0) + 1
    b = best.best(spec.mode) if best else None
    return {
        "task": spec.task,
        "base": spec.base,
        "scheduler": spec.scheduler,
        "search_alg": spec.search_alg,
        "metric": spec.metric,
        "mode": spec.mode,
        "trials": len(rows),
        "status": counts,
        "stopped_early": sum(r.stopped_early for r in rows),
        "wall_time_s": wall_time_s,
        "search_space": spec.space.describe(),
        "budget": spec.budget,
        "best": None
        if best is None
        else {"trial_id": best.trial_id, spec.metric: b[1], "epoch": b[0], "hyperparameters": best.hparams},
    }


def trial_run_dir(spec: SearchSpec, trial_id: str) -> Optional[str]:
    """The folder holding a trial's latest checkpoint, or None: a one-worker trial's own
    folder, or a Train run of a trial of more workers (with PBT such a trial has one run per
    clone; the latest carries the whole lineage's history)."""
    own = spec.trial_dir(trial_id)
    if spec.workers_per_trial == 1 and ckpt.has_checkpoints(own):
        return own
    best: Optional[tuple[int, str, str]] = None
    for run in storage.list_dir(spec.train_runs_dir):
        if not is_train_run_of(run, trial_id):
            continue
        run_dir = storage.join(spec.train_runs_dir, run)
        try:
            latest = ckpt.latest(run_dir)
            epoch = int(storage.read_json(storage.join(latest, ckpt.STATE_FILE))["epoch"])
        except (UserError, KeyError, ValueError, FileNotFoundError):
            continue
        # ties (a paused trial's run may go on to the same epoch as its clone): the newer
        # checkpoint, by its timestamped folder name
        key = (epoch, storage.parent_and_name(latest)[1], run_dir)
        best = max(best, key) if best else key
    return best[2] if best else None


def write_trial_outputs(spec: SearchSpec, rows: Sequence[TrialRow]) -> dict[str, str]:
    """Write each trial's Train run results.json and plots, as a job does; {trial id: run folder}."""
    written = {}
    for r in rows:
        run_dir = trial_run_dir(spec, r.trial_id) if r.history else None
        if run_dir is None:
            continue
        outputs.collect(spec.task_class, run_dir, ckpt.latest(run_dir))
        written[r.trial_id] = run_dir
    return written


def _markdown_page(
    spec: SearchSpec, rows: Sequence[TrialRow], header: Sequence[str], body: Sequence[Sequence[Any]]
) -> str:
    stopped = sum(r.stopped_early for r in rows)
    intro = [
        f"# Search {spec.name}: task {spec.task}, base {spec.base}, scheduler {spec.scheduler}, "
        f"search algorithm {spec.search_alg}",
        "",
        f"{len(rows)} trials, {stopped} stopped early, sorted by best {spec.metric} ({spec.mode}).",
        "",
        "Searched: " + "; ".join(spec.space.describe()) + ".",
        "",
    ]
    return "\n".join(intro) + to_markdown(header, body)


def print_report(rep: SearchReport, wall_time_s: Optional[float] = None, stream: Any = None) -> None:
    """The table and the output paths, for the end of a search."""
    stream = stream or sys.stdout
    header, body = table(rep.rows, rep.params, rep.metric, rep.mode)
    print(to_markdown(header, body), file=stream)
    parts = [f"{len(rep.rows)} trials", f"{len(rep.stopped_early)} stopped early"]
    if wall_time_s is not None:
        parts.append(f"wall time {wall_time_s:.0f}s")
    print(", ".join(parts), file=stream)
    if rep.best is not None:
        b = rep.best.best(rep.mode)
        hp = ", ".join(f"{k}={_fmt(v)}" for k, v in rep.best.hparams.items())
        print(f"best: trial {rep.best.trial_id} {rep.metric} {_fmt(b[1])} at epoch {b[0]} ({hp})", file=stream)
    for what, path in rep.files.items():
        print(f"  {what + ':':<20}{path}", file=stream)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m tune.report EXPERIMENT_DIR``: rewrite a search's report from disk."""
    p = argparse.ArgumentParser(prog="python -m tune.report", description=main.__doc__)
    p.add_argument("experiment_dir", help="the search's folder: <storage path>/<name> (a folder or a URI)")
    args = p.parse_args(argv)
    print_report(write_report(load_spec(storage.resolve_root(args.experiment_dir))))
    return 0


if __name__ == "__main__":
    run_cli(main)
