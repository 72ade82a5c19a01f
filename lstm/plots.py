"""PNG plots, drawn from results dicts (never ``pyplot.show()``: jobs run headless)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import PathPatch  # noqa: E402
from matplotlib.path import Path as MplPath  # noqa: E402

from lstm.storage import atomic_write  # noqa: E402


def save(fig: "plt.Figure", path: Path) -> Path:
    """Save a figure atomically as PNG and close it."""
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110, bbox_inches="tight"))
    plt.close(fig)
    return path


def learning_curves(
    epochs: Sequence[Mapping[str, Any]],
    panels: Sequence[tuple[str, Sequence[str]]],
    path: Path,
    *,
    title: str = "",
    log_y: Iterable[str] = (),
) -> Path:
    """One panel per (ylabel, metric keys) against epoch; missing keys are skipped."""
    log_y = set(log_y)
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for ax, (ylabel, keys) in zip(axes[0], panels, strict=True):
        for key in keys:
            pts = [(e["epoch"], e[key]) for e in epochs if isinstance(e.get(key), (int, float))]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=key)
        ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))  # epochs are whole numbers
        label_axes(ax, "epoch", ylabel, log_y=ylabel in log_y)
    if title:
        fig.suptitle(title)
    return save(fig, path)


def shape_path(points: Sequence[Sequence[float]]) -> MplPath:
    """MOVETO the first point, LINETO the others, CLOSEPOLY -- the chapter's drawing."""
    verts = [tuple(p) for p in points] + [tuple(points[0])]
    codes = [MplPath.MOVETO] + [MplPath.LINETO] * (len(points) - 1) + [MplPath.CLOSEPOLY]
    return MplPath(verts, codes)


def draw_shape(
    ax: "plt.Axes",
    points: Sequence[Sequence[float]],
    limits: tuple[float, float, float, float],
    color: str = "tab:blue",
) -> None:
    ax.add_patch(PathPatch(shape_path(points), facecolor="none", edgecolor=color, lw=1.6))
    ax.scatter([p[0] for p in points], [p[1] for p in points], s=8, color=color, zorder=3)
    ax.set_xlim(limits[0], limits[1])
    ax.set_ylim(limits[2], limits[3])
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])


def shape_grid(
    rows: Sequence[tuple[str, Sequence[Sequence[Sequence[float]]]]],
    path: Path,
    limits: tuple[float, float, float, float],
    *,
    title: str = "",
    max_cols: int = 6,
) -> Path:
    """A grid: one row per (label, list of shapes)."""
    cols = max(1, min(max_cols, max((len(s) for _, s in rows), default=1)))
    fig, axes = plt.subplots(len(rows), cols, figsize=(1.9 * cols + 1.2, 1.9 * len(rows)), squeeze=False)
    for r, (label, shapes) in enumerate(rows):
        for c in range(cols):
            ax = axes[r][c]
            if c < len(shapes):
                draw_shape(ax, shapes[c], limits)
            else:
                ax.axis("off")
        axes[r][0].set_ylabel(label, fontsize=9)
    if title:
        fig.suptitle(title)
    return save(fig, path)


def shape_series(
    items: Sequence[tuple[str, Sequence[Sequence[float]]]],
    path: Path,
    limits: tuple[float, float, float, float],
    *,
    title: str = "",
) -> Path:
    """One row of shapes, each titled (e.g. the one shape a deterministic model draws after N examples)."""
    fig, axes = plt.subplots(1, len(items), figsize=(2.0 * len(items), 2.5), squeeze=False)
    for ax, (label, points) in zip(axes[0], items, strict=True):
        draw_shape(ax, points, limits)
        ax.set_title(label, fontsize=9)
    if title:
        fig.suptitle(title)
    return save(fig, path)


def xy_curve(
    series: Mapping[str, Sequence[tuple[float, float]]],
    path: Path,
    *,
    xlabel: str,
    ylabel: str,
    title: str = "",
    log_x: bool = False,
    log_y: bool = False,
    extra: Optional[Mapping[str, Any]] = None,
) -> Path:
    """Curves of (x, y) points, one per label."""
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for label, pts in series.items():
        if pts:
            ax.plot(*zip(*pts, strict=True), marker=".", label=label)
    label_axes(ax, xlabel, ylabel, log_x=log_x, log_y=log_y)
    if title:
        ax.set_title(title)
    return save(fig, path)


def label_axes(ax: Any, xlabel: str, ylabel: str, *, log_x: bool = False, log_y: bool = False) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if log_x:
        ax.set_xscale("log")
    if log_y:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
