"""The training step's factory: a CUDA-graph step where it can be captured, the eager step with
one log line elsewhere. On CPU the captured step's static-buffer body runs eagerly
(``graph=False``) and must train exactly like the eager step; the graph itself is checked
against the eager step where CUDA is available."""

from __future__ import annotations

import logging

import pytest
import torch

from lstm.data import ptb
from lstm.errors import UserError
from lstm.step import (
    CAPTURE_ENV,
    WARMUP_STEPS,
    CapturedStepper,
    DivergenceGuard,
    StepModule,
    Stepper,
    capture_refusal,
    make_graph_safe,
    make_stepper,
)
from lstm.task import WorkerInfo
from lstm.tasks.ptb import PTBTask
from lstm.tasks.ptb_config import PRESETS, PTBConfig

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
TINY = PTBConfig(
    **{**PRESETS["test"], "vocab_size": 50, "hidden_size": 8, "num_layers": 2, "num_steps": 5, "batch_size": 4}
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def build(kind: str = "factory", device: torch.device = CPU, config: PTBConfig = TINY, lr=1.0):
    """(task, stepper) on ``device``. ``kind``: "factory" (make_stepper's choice), "eager"
    (Stepper), "static" (CapturedStepper without a graph) or "graph" (CapturedStepper)."""
    task = PTBTask(config, WorkerInfo(device=device))
    torch.manual_seed(0)
    model = task.build_model().to(device)
    args = (StepModule(task, model), task.build_optimizer(model), list(model.parameters()))
    kwargs = dict(max_grad_norm=config.max_grad_norm, guard=DivergenceGuard(task.loss_limit(), device), device=device)
    if kind == "factory":
        stepper = make_stepper(*args, **kwargs)
    elif kind == "eager":
        stepper = Stepper(*args, **kwargs)
    else:
        stepper = CapturedStepper(*args, graph=kind == "graph", **kwargs)
    stepper.set_lr(lr)
    return task, stepper


def batches(n: int, device: torch.device = CPU, config: PTBConfig = TINY):
    g = torch.Generator().manual_seed(1)
    rows = torch.randint(0, config.vocab_size, (config.batch_size, n * config.num_steps + 1), generator=g)
    return list(ptb.iterate(rows.to(device), config.num_steps, n))


def train(stepper, data, epoch_every: int = 50) -> list[float]:
    """Per-step summed losses; a new "epoch" (state None, lr halved) every ``epoch_every`` steps."""
    losses, state = [], None
    for i, batch in enumerate(data):
        if i and i % epoch_every == 0:
            state = None
            stepper.set_lr(stepper.lr / 2)
        out = stepper.step(batch, state, i % epoch_every, i // epoch_every)
        losses.append(float(out.sums["loss_sum"]))
        state = out.state
    return losses


def test_on_cpu_the_factory_falls_back_to_the_eager_step_with_one_log_line(caplog):
    caplog.set_level(logging.INFO, logger="lstm.step")
    _, stepper = build()
    assert type(stepper) is Stepper
    lines = [r.getMessage() for r in caplog.records if r.name == "lstm.step"]
    assert lines == ["[ptb] eager training step, no CUDA graph: the device is cpu, not CUDA"]


class Unshaped(PTBTask):
    def static_step(self) -> bool:
        return False


def refusal(monkeypatch, device=CUDA, precision="fp32", world_size=1, task_class=PTBTask, optimizer="sgd", env=None):
    if env is not None:
        monkeypatch.setenv(CAPTURE_ENV, env)
    else:
        monkeypatch.delenv(CAPTURE_ENV, raising=False)
    params = [torch.nn.Parameter(torch.zeros(2))]
    opt = torch.optim.SGD(params, lr=1.0) if optimizer == "sgd" else torch.optim.Adam(params)
    return capture_refusal(torch.device(device), precision, world_size, task_class(TINY), opt)


@pytest.mark.parametrize(
    "change,reason",
    [
        ({}, None),
        ({"device": "cpu"}, "the device is cpu, not CUDA"),
        ({"precision": "fp16"}, "fp16's GradScaler"),
        ({"precision": "bf16"}, None),
        ({"world_size": 2}, "2 workers (DDP)"),
        ({"task_class": Unshaped}, "task ptb's step changes shapes or learning-rate scale"),
        ({"optimizer": "adam"}, "Adam is not known to be graph-safe"),
        ({"env": "0"}, f"{CAPTURE_ENV}=0"),
        ({"env": "1"}, None),
    ],
)
def test_the_factory_captures_only_a_static_single_worker_fp32_or_bf16_cuda_step(monkeypatch, change, reason):
    got = refusal(monkeypatch, **change)
    assert got == reason if reason is None else got.startswith(reason), got


def test_the_static_buffer_step_trains_like_the_eager_step():
    """100 steps over two "epochs" (the state reset to None, the lr changed): the captured
    step's body, run eagerly on CPU, gives the eager step's losses and parameters."""
    data = batches(100)
    _, eager = build("eager")
    _, static = build("static")
    want, got = train(eager, data), train(static, data)
    assert static.ready and not static.failed
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-5, atol=1e-5)
    for a, b in zip(static.params, eager.params, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_the_divergence_guard_works_with_the_static_step():
    """A run that diverges once the captured step has taken over stops at the same step with
    the same one-line error as with the eager step."""
    data = batches(20)
    errors = []
    for kind in ("eager", "static"):
        _, stepper = build(kind)
        state = None
        with pytest.raises(UserError) as e:
            for i, batch in enumerate(data):
                if i == WARMUP_STEPS + 2:
                    stepper.set_lr(1e4)
                state = stepper.step(batch, state, i, 0).state
        errors.append(str(e.value))
    assert errors[0] == errors[1] and "too large" in errors[0], errors
    assert int(errors[0].split(" step ")[1].split(";")[0]) > WARMUP_STEPS + 2


def test_a_batch_of_another_shape_falls_back_to_the_eager_step(caplog):
    data = batches(WARMUP_STEPS + 2)
    _, stepper = build("static")
    train(stepper, data)
    x, y = data[0]
    out = stepper.step((x[:, :3], y[:, :3]), None, 0, 0)
    assert stepper.failed and out.sums["words"] == x.shape[0] * 3
    assert any("abandoned" in r.getMessage() for r in caplog.records)


def test_checkpoints_keep_a_float_lr_and_the_optimizers_own_settings():
    params = [torch.nn.Parameter(torch.ones(3))]
    optimizer = torch.optim.SGD(params, lr=0.5)
    lr = make_graph_safe(optimizer, torch.device("cpu"))
    lr.fill_(0.25)
    group = optimizer.state_dict()["param_groups"][0]
    assert group["lr"] == 0.25 and type(group["lr"]) is float
    assert group["fused"] is None and group["foreach"] is None
    assert optimizer.param_groups[0]["lr"] is lr and optimizer.param_groups[0]["fused"]
    torch.optim.SGD([torch.nn.Parameter(torch.ones(3))], lr=1.0).load_state_dict(optimizer.state_dict())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_captured_step_gives_the_eager_steps_losses_on_cuda():
    data = batches(100, CUDA)
    _, eager = build("eager", CUDA)
    _, captured = build("factory", CUDA)
    assert type(captured) is CapturedStepper
    want, got = train(eager, data), train(captured, data)
    assert captured.cuda_graph is not None and not captured.failed
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-4, atol=1e-4)
    for a, b in zip(captured.params, eager.params, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
