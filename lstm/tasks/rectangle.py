"""The generative shape task (Brownlee, "Generative LSTM" chapter, then beyond it).

Each sample is one shape fed point by point (a rectangle: BL=>BR, BR=>TR, TR=>TL), the state
reset per shape; the chapter's LSTM(10) + Dense(2), MAE and Adam over 25,000 shapes, then fed
its own predictions from [0, 0]. An "epoch" is ``examples / epochs`` fresh shapes, so a run
reports, checkpoints and resumes several times. Beyond the teacher-forced ``valid_loss`` it
reports how far generated shapes are from the family (``valid_consistency``) and how diverse
they are (``valid_width_std``/``valid_height_std``: 0 for the dense head, > 0 for the MDN's).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

import numpy as np
import torch
from torch import nn

from lstm.config import TaskConfig, check_fields, positive_finite
from lstm.data import shapes
from lstm.errors import UserError
from lstm.models.shape import ShapeLSTM
from lstm.task import Display, Search, StepOutput, Task, register

VALID_SEED_OFFSET = 1_000_003


@dataclass(frozen=True)
class ShapeConfig(TaskConfig):
    shape: str = "rectangle"  # rectangle | circle | star | cross
    points_per_edge: int = 1  # > 1 adds mid-edge points
    head: str = "dense"  # dense (MAE, the chapter) | mdn (mixture density, Graves 2013)
    mixtures: int = 5
    hidden_size: int = 10
    examples: int = 25_000  # training shapes in the whole run (shared by all workers)
    epochs: int = 5
    batch_size: int = 1  # shapes per step per worker; the chapter trains one at a time
    learning_rate: float = 0.001
    max_grad_norm: Optional[float] = None
    aux_weight: float = 0.0  # weight of the rectangle-consistency auxiliary loss
    valid_examples: int = 1000
    eval_shapes: int = 256  # generated per epoch for consistency/diversity
    snapshot_at: tuple[int, ...] = (100, 500, 1000, 5000, 10000)  # the chapter's figure series
    curve_every: int = 500  # examples between points of the consistency learning curve

    flag_help = {"mixtures": "needs --head mdn: the mixture density head's components"}

    def validate(self) -> None:
        shapes.get_family(self.shape)
        if self.head not in ("dense", "mdn"):
            raise UserError(f"--head must be dense or mdn (got {self.head!r})")
        check_fields(
            self,
            (
                "points_per_edge",
                "mixtures",
                "hidden_size",
                "examples",
                "epochs",
                "batch_size",
                "valid_examples",
                "eval_shapes",
                "curve_every",
            ),
            lambda v: v > 0,
            "positive",
        )
        if self.examples < self.epochs * self.batch_size:
            raise UserError(
                f"--examples {self.examples} is fewer than one batch per epoch "
                f"({self.epochs} epochs x batch {self.batch_size}); raise --examples"
            )
        check_fields(self, ("learning_rate",), positive_finite, "positive")
        check_fields(self, ("aux_weight",), lambda v: v >= 0, ">= 0")
        if self.aux_weight and (self.shape != "rectangle" or self.points_per_edge != 1):
            raise UserError("--aux-weight applies to corner-only rectangles (--shape rectangle --points-per-edge 1)")

    def unused_flags(self) -> dict[str, str]:
        unused = {"data_dir": "has no effect on the rectangle task, which generates its shapes; drop --data-dir"}
        if self.head != "mdn":
            unused["mixtures"] = (
                f"needs --head mdn (the {self.head} head has no mixtures); add --head mdn, or drop --mixtures"
            )
        return unused


@dataclass
class ShapeData:
    family: shapes.ShapeFamily
    length: int  # points per shape
    per_epoch: int  # shapes per epoch on this worker
    valid: torch.Tensor  # (n, length, 2) this worker's share of the held-out shapes


LOSS_LIMIT = 1000.0  # per point: an MAE or NLL no training model of unit-square shapes reaches


def epoch_line(m: Mapping[str, Any]) -> str:
    return (
        f"epoch {m['epoch']:>2}/{m['epochs']} | train_loss {m['train_loss']:.4f} | "
        f"valid_loss {m['valid_loss']:.4f} | consistency {m['valid_consistency']:.4f} | "
        f"width_std {m['valid_width_std']:.3f} height_std {m['valid_height_std']:.3f} | "
        f"shapes/sec {m['shapes_per_sec']:,.0f} | elapsed {m['elapsed_s']:.1f}s"
    )


def plot(results: Mapping[str, Any], out_dir: Path) -> list[Path]:
    from lstm import plots

    config, epochs = results["config"], results["epochs"]
    steps = [s for e in epochs for s in e.get("steps", [])]
    rows = [(f"after {s['snapshot']:,}", s["shapes"]) for s in steps if "snapshot" in s]
    if epochs and epochs[-1].get("extras", {}).get("shapes"):
        rows.append((f"final ({epochs[-1]['samples_seen']:,})", epochs[-1]["extras"]["shapes"]))
    limits = shape_limits(config["shape"])
    made = []
    title = f"{config['shape']} ({config['head']} head): generated from [0, 0]"
    if rows and config["head"] == "dense":  # deterministic: every draw is the same shape
        made.append(
            plots.shape_series([(label, s[0]) for label, s in rows], out_dir / "shapes_grid.png", limits, title=title)
        )
    elif rows:
        made.append(plots.shape_grid(rows, out_dir / "shapes_grid.png", limits, title=title))
    dense = config["head"] == "dense"
    made.append(
        plots.xy_curve(
            {
                "consistency error (64 generated shapes)": [(s["examples"], s["consistency"]) for s in steps],
                "valid consistency (per epoch)": [(e["samples_seen"], e["valid_consistency"]) for e in epochs],
                "train loss": [(e["samples_seen"], e["train_loss"]) for e in epochs] if dense else [],
                "valid loss": [(e["samples_seen"], e["valid_loss"]) for e in epochs] if dense else [],
            },
            out_dir / "learning_curve.png",
            xlabel="training examples",
            ylabel="error",
            title=f"{config['shape']} learning curve",
            log_x=True,
            log_y=True,
        )
    )
    return made


@register
class RectangleTask(Task):
    name = "rectangle"
    config_class = ShapeConfig
    presets = {
        "chapter": {},
        "mdn": {"head": "mdn", "hidden_size": 32, "batch_size": 8, "learning_rate": 0.005},
        "test": {
            "examples": 600,
            "epochs": 2,
            "batch_size": 4,
            "valid_examples": 64,
            "eval_shapes": 32,
            "snapshot_at": (100, 500),
            "curve_every": 100,
        },
    }
    default_preset = "chapter"
    sample_unit = "shapes"
    max_threads = 1  # one shape of a few points at a time: a second thread only adds overhead (65 s -> 49 s)
    # A 10-unit model of a few points: small hidden sizes, and Adam's learning rate around the chapter's.
    search = Search(
        "epochs",
        "valid_consistency",
        space={"hidden_size": "4,8,16,32", "learning_rate": "log:0.0003:0.01"},
        pbt_mutations=("learning_rate",),
    )
    display = Display(epoch_line, plot)
    config: ShapeConfig

    @classmethod
    def check(cls, config: ShapeConfig, data: Any, num_workers: int) -> None:
        if config.examples // config.epochs // num_workers < config.batch_size:
            raise UserError(
                f"{config.examples} examples over {config.epochs} epochs and {num_workers} workers leave "
                f"fewer than one batch of {config.batch_size} per worker; raise --examples"
            )

    # ------------------------------------------------------------------ data
    def setup(self, data: Any) -> None:
        """The held-out shapes (this rank's share); training shapes are drawn fresh each epoch."""
        config, worker = self.config, self.worker
        self.check(config, data, worker.world_size)
        family = shapes.get_family(config.shape)
        length = points_per_shape(config)
        rng = np.random.default_rng([config.seed, VALID_SEED_OFFSET])
        valid = family.outline(family.sample_params(rng, config.valid_examples), config.points_per_edge)
        share = np.array_split(valid, worker.world_size)[worker.rank]
        per_epoch = config.examples // config.epochs // worker.world_size
        self.data = ShapeData(family, length, per_epoch, torch.tensor(share, dtype=torch.float32))

    def num_train_batches(self) -> int:
        return self.data.per_epoch // self.config.batch_size

    def train_batches(self, epoch: int) -> Iterator[torch.Tensor]:
        """Fresh shapes each epoch, from a generator seeded by (seed, epoch, rank)."""
        config, data = self.config, self.data
        rng = np.random.default_rng([config.seed, epoch, self.worker.rank])
        n = self.num_train_batches() * config.batch_size
        pts = torch.tensor(
            data.family.outline(data.family.sample_params(rng, n), config.points_per_edge), dtype=torch.float32
        )
        for i in range(0, n, config.batch_size):
            yield pts[i : i + config.batch_size].to(self.worker.device)

    # ------------------------------------------------------------------ model
    def build_model(self) -> nn.Module:
        return ShapeLSTM(self.config.hidden_size, self.config.head, self.config.mixtures)

    def loss_limit(self) -> float:
        return LOSS_LIMIT

    def train_step(self, model: ShapeLSTM, batch: torch.Tensor, state: Any) -> StepOutput:
        """Inputs are points 0..k-2, targets points 1..k; a fresh state per shape."""
        inputs, targets = batch[:, :-1], batch[:, 1:]
        out, _ = model(inputs)
        per_point = model.loss(out, targets)
        loss = per_point.mean()
        if self.config.aux_weight:
            pred = model.point(out, sample=False)
            with_origin = torch.cat([torch.zeros_like(pred[:, :1]), pred], 1)
            loss = loss + self.config.aux_weight * rectangle_terms_torch(with_origin).abs().mean()
        return StepOutput(
            loss=loss,
            sums={"loss_sum": per_point.detach().sum(), "points": per_point.numel()},
            samples=batch.shape[0],
            mean_loss=per_point.detach().mean(),
        )

    def after_step(self, model: ShapeLSTM, examples_seen: int) -> Optional[dict[str, Any]]:
        """Rank 0: a point of the consistency learning curve every ``curve_every`` examples, and
        generated shapes at the chapter's snapshot counts (100, 500, 1000, 5000, 10000)."""
        config, worker = self.config, self.worker
        if not worker.is_chief:
            return None
        prev = examples_seen - config.batch_size * worker.world_size
        snaps = [s for s in config.snapshot_at if prev < s <= examples_seen]
        on_curve = examples_seen // config.curve_every > prev // config.curve_every or prev == 0
        if not (snaps or on_curve):
            return None
        model.eval()
        gen = torch.Generator().manual_seed(config.seed + examples_seen)
        pts = model.generate(64, self.data.length, sample=True, generator=gen, device=worker.device).cpu().numpy()
        model.train()
        record: dict[str, Any] = {
            "examples": examples_seen,
            "consistency": float(shapes.consistency_error(self.data.family, pts, config.points_per_edge).mean()),
        }
        if snaps:
            record["snapshot"] = snaps[-1]
            record["shapes"] = np.round(pts[:6], 4).tolist()
        return record

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, model: ShapeLSTM, split: str) -> dict[str, float]:
        config, worker, data = self.config, self.worker, self.data
        valid = data.valid.to(worker.device)
        out, _ = model(valid[:, :-1])
        per_point = model.loss(out, valid[:, 1:])
        n_gen = len(np.array_split(np.arange(config.eval_shapes), worker.world_size)[worker.rank])
        gen = torch.Generator().manual_seed(config.seed * 7919 + worker.rank)
        pts = model.generate(n_gen, data.length, sample=True, generator=gen, device=worker.device).cpu().numpy()
        err = shapes.consistency_error(data.family, pts, config.points_per_edge)
        size = shapes.shape_sizes(pts)
        return {
            "loss_sum": float(per_point.sum()),
            "points": float(per_point.numel()),
            "consistency_sum": float(err.sum()),
            "shapes": float(len(pts)),
            "w_sum": float(size[:, 0].sum()),
            "w_sq": float((size[:, 0] ** 2).sum()),
            "h_sum": float(size[:, 1].sum()),
            "h_sq": float((size[:, 1] ** 2).sum()),
        }

    @staticmethod
    def summarize(sums: Mapping[str, float], prefix: str) -> dict[str, float]:
        out = {f"{prefix}loss": sums.get("loss_sum", 0.0) / max(sums.get("points", 0.0), 1.0)}
        n = sums.get("shapes", 0.0)
        if n:
            out[f"{prefix}consistency"] = sums["consistency_sum"] / n
            for key, name in (("w", "width"), ("h", "height")):
                mean = sums[f"{key}_sum"] / n
                out[f"{prefix}{name}_std"] = math.sqrt(max(sums[f"{key}_sq"] / n - mean**2, 0.0))
        return out

    def epoch_extras(self, model: ShapeLSTM, epoch: int) -> dict[str, Any]:
        gen = torch.Generator().manual_seed(self.config.seed + 31 * epoch)
        pts = model.generate(6, self.data.length, sample=True, generator=gen, device=self.worker.device).cpu().numpy()
        return {"shapes": np.round(pts, 4).tolist()}


def rectangle_terms_torch(points: torch.Tensor) -> torch.Tensor:
    """Differentiable :func:`lstm.data.shapes.rectangle_terms` for the auxiliary loss."""
    br, tr, tl = points[:, 1], points[:, 2], points[:, 3]
    return torch.stack([br[:, 1], tl[:, 0], tr[:, 0] - br[:, 0], tl[:, 1] - tr[:, 1]], 1)


def shape_limits(shape: str) -> tuple[float, float, float, float]:
    """Axes for drawing a family: the chapter's -0.1..1.1 for rectangles."""
    if shape == "rectangle":
        return (-0.1, 1.1, -0.1, 1.1)
    if shape == "cross":
        return (-0.6, 0.9, -0.1, 1.3)
    return (-0.6, 0.6, -0.1, 1.1)


def points_per_shape(config: ShapeConfig) -> int:
    """How many points one shape of ``config`` has (its outline, from [0, 0] back to it)."""
    family = shapes.get_family(config.shape)
    return len(family.outline(family.sample_params(np.random.default_rng(0), 1), config.points_per_edge)[0])
