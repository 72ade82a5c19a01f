"""The rectangle task learns, and the shared loop reports, checkpoints and resumes on real
Ray Train workers (2 workers, DDP over gloo: conftest's ``rect_base``, resumed here from a copy)."""

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import rect_base_config

from lstm import config as cfg
from lstm.data import shapes
from lstm.errors import UserError
from lstm.models.shape import ShapeLSTM
from lstm.tasks.rectangle import ShapeConfig
from lstm.trainer import fit


def settings(tmp_path: Path, name: str, **kw) -> cfg.RunSettings:
    return cfg.RunSettings(**{"storage_path": str(tmp_path), "name": name, "max_failures": 0, **kw})


def untrained_consistency(seed: int = 0) -> float:
    torch.manual_seed(seed)
    model = ShapeLSTM(10)
    pts = model.generate(64, 4, generator=torch.Generator().manual_seed(seed)).numpy()
    return float(shapes.consistency_error(shapes.FAMILIES["rectangle"], pts).mean())


def test_rectangle_model_learns(ray_session, tmp_path):
    config = ShapeConfig(
        examples=4000,
        epochs=2,
        batch_size=4,
        learning_rate=0.01,
        valid_examples=200,
        eval_shapes=64,
        snapshot_at=(100, 1000),
        curve_every=1000,
    )
    result = fit("rectangle", config, settings(tmp_path, "learns"))
    before = untrained_consistency()
    after = result.final["valid_consistency"]
    # Measured: untrained ~0.1, after 4,000 examples ~0.005; the bound leaves a wide margin.
    assert before > 0.05
    assert after < 0.02 and after < before / 5
    assert result.history[1]["train_loss"] < result.history[0]["train_loss"]
    # Outputs: results.json redraws the plots; PNGs exist; snapshots were taken at 100 and 1000.
    results = json.loads(Path(result.results_path).read_text())
    snapshots = [s["snapshot"] for e in results["epochs"] for s in e.get("steps", []) if "snapshot" in s]
    assert snapshots == list(config.snapshot_at)
    assert {Path(p).name for p in result.plots} == {"shapes_grid.png", "learning_curve.png"}
    assert all(Path(p).stat().st_size > 5000 for p in result.plots)
    assert (Path(result.run_dir) / "tensorboard").is_dir()


def test_mdn_head_draws_diverse_shapes(ray_session, tmp_path):
    config = ShapeConfig(
        head="mdn",
        hidden_size=16,
        examples=3000,
        epochs=1,
        batch_size=8,
        learning_rate=0.005,
        valid_examples=200,
        eval_shapes=128,
        curve_every=3000,
        snapshot_at=(),
    )
    m = fit("rectangle", config, settings(tmp_path, "mdn")).final
    # A deterministic head has 0 spread; the MDN samples widths/heights with a real spread
    # (the data's is 0.29 = std of U[0, 1)).
    assert m["valid_width_std"] > 0.05 and m["valid_height_std"] > 0.05


def shapes_per_epoch(config: ShapeConfig, workers: int) -> int:
    """The shapes an epoch trains on, all workers together: each worker draws its share of
    ``examples / epochs`` in whole batches."""
    return workers * (config.examples // config.epochs // workers // config.batch_size * config.batch_size)


def test_two_workers_report_every_epoch_resume_and_keep_one_checkpoint(rect_base, tmp_path):
    a, storage = rect_base  # conftest's: the test config on 2 workers
    first = rect_base_config()
    assert [e["epoch"] for e in a.history] == [1, 2]
    assert all(e["workers"] == 2 for e in a.history)
    # metrics count both workers' shapes (2 x 148 an epoch: each worker's 150 in whole batches of 4)
    assert [e["samples_seen"] for e in a.history] == [shapes_per_epoch(first, 2) * e for e in (1, 2)]

    # Ask for a third epoch (same examples per epoch) and resume a copy of it: it starts at epoch 3.
    shutil.copytree(storage / "base", tmp_path / "resume")
    run = settings(tmp_path, "resume", num_workers=2, checkpoints_to_keep=1)
    longer = dataclasses.replace(first, examples=first.examples // first.epochs * 3, epochs=3)
    b = fit("rectangle", longer, run, resume=True)
    assert [e["epoch"] for e in b.history] == [1, 2, 3]
    assert b.history[:2] == a.history, "the resumed run keeps the first two epochs as they were"
    assert b.history[-1]["samples_seen"] == a.history[-1]["samples_seen"] + shapes_per_epoch(longer, 2)
    # one checkpoint kept (--checkpoints-to-keep 1): the last epoch's, which results.json names
    kept = [p for p in (tmp_path / "resume").glob("checkpoint_*") if p.is_dir()]
    assert [p.name for p in kept] == [Path(b.checkpoint).name]
    assert json.loads((kept[0] / "state.json").read_text())["epoch"] == 3 == len(b.history)

    with pytest.raises(UserError, match="already exists"):
        fit("rectangle", first, run)
    with pytest.raises(UserError, match="no run to resume"):
        fit("rectangle", first, settings(tmp_path, "never-ran"), resume=True)
    # a resume with another architecture: lstm.checkpoint.load_model refuses it for every task (test_ptb_job.py)
