"""``--precision`` on a CPU: bf16 trains every task's model and a job records it; fp16 is refused
in one line before anything starts (it needs --gpu); and an fp16 run whose gradients are not
finite at any loss scale stops with one line, exit status 2 (docs/ptb.md, "Precision")."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import own_lines
from test_ptb_errors import InProcess

from lstm import cluster
from lstm import config as cfg
from lstm.cli import build_parser, train_main
from lstm.errors import run_cli
from lstm.loop import run_training
from lstm.models.char import CharLSTM
from lstm.models.shape import ShapeLSTM
from lstm.step import autocast
from lstm.task import StepOutput, get_task
from lstm.tasks.ptb import PTBTask
from lstm.tasks.ptb_config import PRESETS, PTBConfig
from lstm.tasks.rectangle import RectangleTask, ShapeConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CPU = torch.device("cpu")


def ptb_model(**fields):
    return PTBTask(PTBConfig(**{**PRESETS["test"], "vocab_size": 50, "hidden_size": 16, **fields})).build_model()


def losses() -> dict:
    """Each task's model, as a function from a fresh seed to its training loss on a small batch."""
    g = torch.Generator().manual_seed(1)
    points, codes = torch.rand(4, 6, 2, generator=g), torch.randint(0, 20, (4, 8), generator=g)
    words = torch.randint(0, 50, (4, 6), generator=g)

    def shape(head: str):
        model = ShapeLSTM(8, head)
        return model.loss(model(points[:, :-1])[0], points[:, 1:]).mean()

    def char():
        return F.cross_entropy(CharLSTM(20, 16)(codes[:, :-1]).float(), codes[:, -1])

    def ptb(**fields):
        return ptb_model(num_layers=2, **fields)(words[:, :-1], words[:, 1:])[0]

    return {
        "rectangle dense": lambda: shape("dense"),
        "rectangle mdn": lambda: shape("mdn"),
        "char": char,
        "ptb": ptb,
        "ptb regularized": lambda: ptb(tied=True, weight_drop=0.2, locked_dropout_output=0.2, embedding_dropout=0.1),
    }


@pytest.mark.parametrize("name", list(losses()))
def test_bf16_runs_every_tasks_model_forward_and_backward_on_this_cpu(name):
    """What the loop runs under autocast: the forward in bf16, then backward. On a CPU without
    AVX-512 oneDNN has no bf16 LSTM; before autocast turned oneDNN off there, this raised
    "could not create a primitive descriptor for the LSTM forward propagation primitive"."""
    loss_of = losses()[name]
    onednn = torch.backends.mkldnn.enabled
    values = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)  # the same weights and dropout masks
        with autocast(precision, CPU):
            loss = loss_of()
        loss.float().backward()
        values[precision] = float(loss.detach())
    assert math.isfinite(values["bf16"])
    # bf16 took effect (its rounding changed the loss) and kept it close to fp32's
    assert values["bf16"] != values["fp32"]
    assert values["bf16"] == pytest.approx(values["fp32"], rel=0.05)
    assert torch.backends.mkldnn.enabled == onednn  # autocast's switch does not outlive it


def rectangle_flags(*extra: str) -> list[str]:
    """A rectangle job of one short epoch (25 steps of 4 shapes)."""
    return ["--config", "test", "--epochs", "1", "--examples", "100", *extra]


def test_a_bf16_job_trains_on_cpu_and_its_results_say_bf16(ray_session, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        run_cli(
            lambda argv: train_main("rectangle", argv),
            rectangle_flags("--precision", "bf16", "--storage-path", str(tmp_path), "--name", "bf16"),
        )
    assert info.value.code == 0, capsys.readouterr().err[-3000:]
    results = json.loads((tmp_path / "bf16" / "results.json").read_text())
    assert results["precision"] == "bf16"
    (epoch,) = results["epochs"]
    assert math.isfinite(epoch["train_loss"]) and math.isfinite(epoch["valid_consistency"])


def test_fp16_without_gpu_is_one_line_before_anything_starts(tmp_path, capsys, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the command got past its checks and would start Ray")

    monkeypatch.setattr(cluster, "ensure_ray", refuse)
    with pytest.raises(SystemExit) as info:
        run_cli(lambda argv: train_main("rectangle", argv), ["--precision", "fp16", "--storage-path", str(tmp_path)])
    assert info.value.code == 2
    assert own_lines(capsys.readouterr().err) == ["error: --precision fp16 needs --gpu; on CPU use bf16 or fp32"]
    assert list(tmp_path.iterdir()) == []
    # and --help says so before anyone tries
    assert "fp16 (autocast and a loss scaler; needs --gpu)" in " ".join(
        build_parser(get_task("rectangle")).format_help().split()
    )


class NaNGradients(RectangleTask):
    """The rectangle task plus a term whose value is 0 and whose gradient is NaN at any loss
    scale (the derivative of sqrt at 0, times 0): every step's gradients are not finite, as
    those of a model that overflows fp16 at any scale are, while its loss stays finite."""

    def train_step(self, model: ShapeLSTM, batch: torch.Tensor, state) -> StepOutput:
        out = super().train_step(model, batch, state)
        return dataclasses.replace(out, loss=out.loss + torch.sqrt(model.head.weight * 0).sum())


def test_an_fp16_loss_scale_that_collapses_stops_the_run_with_one_line(capsys):
    """The loop's real fp16 step (autocast, GradScaler, the divergence guard) on this CPU, as a
    GPU worker runs it: the scaler skips every step and halves its scale, from 65536 to below
    1e-6 after 36 of the epoch's 75 steps, and the run stops in epoch 1 with one line, before
    any checkpoint. (The job refuses fp16 without --gpu, so the loop runs in this process.)"""
    config = cfg.build(ShapeConfig, {**RectangleTask.presets["test"], "snapshot_at": (), "curve_every": 10**6})
    task = NaNGradients(config)
    task.setup(RectangleTask.read_data(config, None))
    session = InProcess(checkpoint=None, keep=None)
    with pytest.raises(SystemExit) as info:
        run_cli(lambda argv: run_training(task, cfg.RunSettings(precision="fp16"), session))
    assert info.value.code == 2
    assert own_lines(capsys.readouterr().err) == [
        "error: the fp16 loss scale collapsed in epoch 1; use --precision bf16 or fp32, or lower --learning-rate"
    ]
    assert session.reports == []  # no epoch ended: nothing reported, no checkpoint
