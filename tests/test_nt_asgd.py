"""NT-ASGD (lstm/optim.py): SGD until the non-monotone trigger, then a running average of the
weights, which the job evaluates with; the switch and the averages survive a checkpoint."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from test_ptb_errors import train

from lstm import config as cfg
from lstm.data import ptb
from lstm.optim import NTASGD
from lstm.tasks.ptb import evaluate_rows
from lstm.tasks.ptb_config import PTBConfig
from lstm.tasks.ptb_trained import load_trained

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def params(seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(4, 3, generator=g)), torch.nn.Parameter(torch.randn(5, generator=g))]


def run_steps(optimizer: torch.optim.Optimizer, ps: list[torch.nn.Parameter], steps: int, seed: int = 1) -> list:
    """``steps`` steps on a fixed quadratic-ish loss; the parameters after each step."""
    g = torch.Generator().manual_seed(seed)
    seen = []
    for _ in range(steps):
        targets = [torch.randn(p.shape, generator=g) for p in ps]
        loss = sum(((p - t) ** 2).sum() for p, t in zip(ps, targets, strict=True))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        seen.append([p.detach().clone() for p in ps])
    return seen


def test_before_the_switch_it_is_sgd_with_weight_decay():
    a, b = params(), params()
    ours = run_steps(NTASGD(a, 0.1, weight_decay=0.01), a, 5)
    sgd = run_steps(torch.optim.SGD(b, lr=0.1, weight_decay=0.01), b, 5)
    for x, y in zip(ours, sgd, strict=True):
        for p, q in zip(x, y, strict=True):
            assert torch.equal(p, q)


def test_the_non_monotone_trigger():
    """Switch when the loss is worse than every loss but the last ``nonmono`` ones (AWD-LSTM)."""
    optimizer = NTASGD(params(), 0.1, nonmono=2)
    switched = [optimizer.observe(loss) for loss in (5.0, 4.0, 3.0, 3.5, 3.9, 4.5, 9.0)]
    # 3.5 and 3.9 are worse than 3.0 but not than min(5, 4) / min(5, 4, 3) of the older epochs;
    # 4.5 > min(5, 4, 3) = 3 of the epochs before the last two: switch, once
    assert switched == [False, False, False, False, False, True, False]
    assert optimizer.averaging and optimizer.losses == [5.0, 4.0, 3.0, 3.5, 3.9, 4.5, 9.0]
    never = NTASGD(params(), 0.1, nonmono=2)
    assert not any(never.observe(loss) for loss in (5.0, 4.0, 3.0, 2.0, 1.0))


def test_after_the_switch_it_averages_the_weights_and_evaluates_with_the_averages():
    ps = params()
    optimizer = NTASGD(ps, 0.1)
    run_steps(optimizer, ps, 3)
    optimizer.averaging = True  # as observe() sets it
    after = run_steps(optimizer, ps, 4, seed=2)
    current = [p.detach().clone() for p in ps]
    assert optimizer.averaged_steps == 4
    with optimizer.averaged_weights():
        for i, p in enumerate(ps):
            torch.testing.assert_close(p.detach(), torch.stack([step[i] for step in after]).mean(0))
    for p, c in zip(ps, current, strict=True):
        assert torch.equal(p.detach(), c)  # the training weights are back


def test_the_switch_and_the_averages_survive_a_checkpoint():
    ps = params()
    optimizer = NTASGD(ps, 0.1, nonmono=1)
    for loss in (3.0, 2.0, 3.5):  # 3.5 > 3.0, the best before the last epoch: switch
        optimizer.observe(loss)
    assert optimizer.averaging
    run_steps(optimizer, ps, 3)
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    copies = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    restored = NTASGD(copies, 0.1, nonmono=1)
    restored.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
    assert (restored.averaging, restored.averaged_steps, restored.losses) == (True, 3, [3.0, 2.0, 3.5])
    run_steps(optimizer, ps, 2, seed=5)
    run_steps(restored, copies, 2, seed=5)
    with optimizer.averaged_weights(), restored.averaged_weights():
        for p, q in zip(ps, copies, strict=True):
            assert torch.equal(p, q)


@pytest.fixture(scope="module")
def drifting_data(tmp_path_factory) -> Path:
    """Training text that counts up, validation text that counts down: the better a model
    learns the training text, the worse its validation loss, so NT-ASGD must switch."""
    folder = tmp_path_factory.mktemp("drift")
    up = np.arange(3000) % 12
    for split, words in (("train", up), ("valid", up[::-1][:600]), ("test", up[::-1][:600])):
        lines = [" ".join(f"w{w}" for w in words[i : i + 10]) for i in range(0, len(words), 10)]
        (folder / f"ptb.{split}.txt").write_text("".join(f" {line} \n" for line in lines))
    return folder


CONFIG = PTBConfig(
    vocab_size=13,
    hidden_size=8,
    num_layers=1,
    num_steps=10,
    batch_size=4,
    max_epoch=5,
    max_max_epoch=5,
    learning_rate=0.5,
    optimizer="nt-asgd",
    nonmono=1,
    tied=True,
    eval_num_steps=10,
)


def test_the_job_switches_evaluates_with_the_averages_and_resumes_identically(drifting_data, tmp_path):
    reports = train(CONFIG, drifting_data, keep=tmp_path / "full")
    valid = [r["valid_loss"] for r in reports]
    assert valid == sorted(valid)  # worse every epoch
    assert [r["asgd_switched"] for r in reports] == [False, False, True, False, False]
    assert [r["asgd_steps"] > 0 for r in reports] == [False, False, False, True, True]
    # the reported validation loss is the averaged weights', which score/generate also load
    trained = load_trained(tmp_path / "full")
    assert trained.averaged
    rows = torch.from_numpy(ptb.batchify(ptb.load_corpus(drifting_data).valid, 4))
    steps = (rows.shape[1] - 1) // 10
    sums = evaluate_rows(trained.model, rows, 10, steps)
    assert sums["loss_sum"] / sums["words"] == pytest.approx(reports[-1]["valid_loss"], rel=1e-6)
    raw = load_trained(tmp_path / "full")
    raw.model.load_state_dict(torch.load(tmp_path / "full" / "model.pt", weights_only=True))
    raw_sums = evaluate_rows(raw.model, rows, 10, steps)
    assert raw_sums["loss_sum"] != pytest.approx(sums["loss_sum"], rel=1e-4)
    # stopped after epoch 4 (averaging) and resumed: epoch 5 as in the uninterrupted run
    four = cfg.build(PTBConfig, {**cfg.to_dict(CONFIG), "max_max_epoch": 4})
    train(four, drifting_data, keep=tmp_path / "four")
    shutil.copytree(tmp_path / "four", tmp_path / "resume-from")
    (resumed,) = train(CONFIG, drifting_data, checkpoint=tmp_path / "resume-from")
    for key in ("train_loss", "valid_loss", "test_loss", "asgd_steps"):
        assert resumed[key] == reports[-1][key], key
