"""A trained rectangle run, used: its model loaded from a checkpoint, shapes drawn from it."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from lstm import checkpoint as ckpt
from lstm.errors import UserError
from lstm.models.shape import ShapeLSTM
from lstm.tasks.rectangle import RectangleTask, ShapeConfig, points_per_shape


@dataclass
class TrainedShapes:
    """A rectangle run's model, loaded to draw with."""

    model: ShapeLSTM
    config: ShapeConfig


def load_trained(location: str | os.PathLike) -> TrainedShapes:
    """The model of a rectangle checkpoint (:func:`lstm.checkpoint.load`); one-line UserError otherwise."""
    return trained_from(ckpt.load(location, label=RectangleTask.name))


def trained_from(contents: ckpt.Contents) -> TrainedShapes:
    """:func:`load_trained` of a checkpoint already read."""
    config = ckpt.task_config(contents, RectangleTask)
    model = RectangleTask(config).build_model()
    ckpt.load_model(model, contents)
    return TrainedShapes(model.eval(), config)


def draw(trained: TrainedShapes, n: int = 6, *, sample: bool = True, seed: int = 0) -> list[list[list[float]]]:
    """``n`` shapes drawn from [0, 0] as lists of [x, y] (``sample=False``: the head's mean shape)."""
    if n < 1:
        raise UserError(f"n must be >= 1 (got {n})")
    generator = torch.Generator().manual_seed(seed)
    points = trained.model.generate(n, points_per_shape(trained.config), sample=sample, generator=generator)
    return np.round(points.numpy(), 6).tolist()
