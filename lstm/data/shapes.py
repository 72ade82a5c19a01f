"""Shapes drawn point by point from the origin [0, 0], as the Generative LSTM chapter seeds its
model: a family maps a few random parameters to ``k`` outline points in drawing order (a
rectangle: BL [0,0] -> BR [w,0] -> TR [w,h] -> TL [0,h]); ``points_per_edge > 1`` adds points
along the edges. ``consistency_error`` says how far points are from *some* member of the family.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from lstm.errors import UserError


@dataclass(frozen=True)
class ShapeFamily:
    name: str
    param_names: tuple[str, ...]
    param_low: tuple[float, ...]
    param_high: tuple[float, ...]
    vertices: Callable[[np.ndarray], np.ndarray]  # (n, p) params -> (n, v, 2) polygon vertices from [0,0]

    def sample_params(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return rng.uniform(self.param_low, self.param_high, size=(n, len(self.param_names)))

    def outline(self, params: np.ndarray, points_per_edge: int = 1) -> np.ndarray:
        """(n, p) params -> (n, k, 2) points in drawing order, k = vertices * points_per_edge."""
        v = self.vertices(np.atleast_2d(params))
        if points_per_edge == 1:
            return v
        nxt = np.roll(v, -1, axis=1)
        fracs = np.arange(points_per_edge) / points_per_edge
        pts = v[:, :, None, :] + fracs[None, None, :, None] * (nxt - v)[:, :, None, :]
        return pts.reshape(v.shape[0], -1, 2)


def _rectangle(p: np.ndarray) -> np.ndarray:
    w, h = p[:, 0], p[:, 1]
    z = np.zeros_like(w)
    return np.stack([np.stack([z, z], -1), np.stack([w, z], -1), np.stack([w, h], -1), np.stack([z, h], -1)], 1)


def _regular(radius: np.ndarray, k: int, inner: float | None = None) -> np.ndarray:
    """k-gon (or star with inner/outer radii) around (0, r), first vertex at the origin."""
    n_vertices = k * (2 if inner else 1)
    theta = 2 * math.pi * np.arange(n_vertices) / n_vertices
    scale = np.ones(n_vertices)
    if inner:
        scale[1::2] = inner
    r = radius[:, None] * scale[None, :]
    x = r * np.sin(theta)[None, :]
    y = radius[:, None] - r * np.cos(theta)[None, :]
    return np.stack([x, y], -1)


def _cross(p: np.ndarray) -> np.ndarray:
    a, t = p[:, 0], p[:, 1]
    z = np.zeros_like(a)
    pts = [
        (z, z),
        (t, z),
        (t, a),
        (t + a, a),
        (t + a, a + t),
        (t, a + t),
        (t, 2 * a + t),
        (z, 2 * a + t),
        (z, a + t),
        (-a, a + t),
        (-a, a),
        (z, a),
    ]
    return np.stack([np.stack(xy, -1) for xy in pts], 1)


FAMILIES: dict[str, ShapeFamily] = {
    "rectangle": ShapeFamily("rectangle", ("width", "height"), (0.0, 0.0), (1.0, 1.0), _rectangle),
    "circle": ShapeFamily("circle", ("radius",), (0.1,), (0.5,), lambda p: _regular(p[:, 0], 12)),
    "star": ShapeFamily("star", ("radius",), (0.2,), (0.5,), lambda p: _regular(p[:, 0], 5, inner=0.45)),
    "cross": ShapeFamily("cross", ("arm", "thickness"), (0.15, 0.05), (0.45, 0.2), _cross),
}


def get_family(name: str) -> ShapeFamily:
    if name not in FAMILIES:
        raise UserError(f"unknown shape {name!r}; choose one of: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def rectangle_terms(points: np.ndarray) -> np.ndarray:
    """The chapter's checks on generated rectangles [BL, BR, TR, TL] (n, 4, 2):
    BR.y, TL.x, TR.x - BR.x, TL.y - TR.y -- all 0 for an axis-aligned rectangle. Returns (n, 4)."""
    br, tr, tl = points[:, 1], points[:, 2], points[:, 3]
    return np.stack([br[:, 1], tl[:, 0], tr[:, 0] - br[:, 0], tl[:, 1] - tr[:, 1]], axis=1)


def fit_params(family: ShapeFamily, points: np.ndarray, points_per_edge: int = 1) -> np.ndarray:
    """Least-squares family parameters of each outline (n, k, 2), by grid search over a widened range."""
    n_params = len(family.param_names)
    lo, hi = np.array(family.param_low), np.array(family.param_high)
    lo, hi = lo - 0.5 * (hi - lo), hi + 0.5 * (hi - lo)
    size = 400 if n_params == 1 else 100
    axes = [np.linspace(lo[i], hi[i], size) for i in range(n_params)]
    cand = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, n_params)  # (c, p)
    templates = family.outline(cand, points_per_edge)  # (c, k, 2)
    best = np.empty((points.shape[0], n_params))
    for i in range(0, points.shape[0], 32):
        chunk = points[i : i + 32]
        d = ((chunk[:, None] - templates[None]) ** 2).sum(-1).mean(-1)  # (n, c)
        best[i : i + 32] = cand[d.argmin(1)]
    return best


def consistency_error(family: ShapeFamily, points: np.ndarray, points_per_edge: int = 1) -> np.ndarray:
    """Per-shape error (n,): for corner-only rectangles the chapter's measure, the mean absolute
    value of :func:`rectangle_terms`; otherwise the mean distance from each point to the
    corresponding point of the nearest member of the family."""
    if family.name == "rectangle" and points_per_edge == 1:
        return np.abs(rectangle_terms(points)).mean(axis=1)
    params = fit_params(family, points, points_per_edge)
    nearest = family.outline(params, points_per_edge)
    return np.sqrt(((points - nearest) ** 2).sum(-1)).mean(-1)


def shape_sizes(points: np.ndarray) -> np.ndarray:
    """(n, 2) width and height of each outline's bounding box: the 'diversity' statistics."""
    return points.max(axis=1) - points.min(axis=1)
