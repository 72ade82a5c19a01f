"""One-line errors of the PTB task from the worker side of the loop, run in this process
(``lstm.loop.run_training`` without a Ray cluster): a checkpoint from another architecture or
vocabulary, a diverging loss, a batch that does not split over the workers. test_ptb_job.py
checks that such an error also comes out of ``fit()`` as one line."""

from __future__ import annotations

import math
import re
import shutil
from pathlib import Path

import pytest
import ray.train

from lstm import config as cfg
from lstm.data import ptb
from lstm.errors import UserError
from lstm.loop import run_training
from lstm.session import Session
from lstm.task import WorkerInfo
from lstm.tasks.ptb import PTBTask
from lstm.tasks.ptb_config import PRESETS, PTBConfig

CONFIG = PTBConfig(**{**PRESETS["test"], "train_fraction": 0.005, "eval_batch_size": 20, "eval_num_steps": 35})


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class InProcess(Session):
    """The loop's session for one worker in this process: reports are kept, the checkpoint of
    each report is copied to ``keep``."""

    worker = WorkerInfo()

    def __init__(self, checkpoint: Path | None, keep: Path | None):
        self.checkpoint, self.keep, self.reports = checkpoint, keep, []

    def get_checkpoint(self):
        return ray.train.Checkpoint(str(self.checkpoint)) if self.checkpoint else None

    def report(self, metrics, checkpoint_dir):
        self.reports.append(metrics)
        if checkpoint_dir is not None and self.keep is not None:
            shutil.rmtree(self.keep, ignore_errors=True)
            shutil.copytree(checkpoint_dir, self.keep)

    def user_error(self, error):
        raise error


def train(config: PTBConfig, data_dir: Path, checkpoint: Path | None = None, keep: Path | None = None) -> list[dict]:
    """Run the loop for one worker in this process; ``keep`` receives the last checkpoint."""
    session = InProcess(checkpoint, keep)
    task = PTBTask(config)
    task.setup(ptb.load_corpus(data_dir))
    run_training(task, cfg.RunSettings(), session)
    return session.reports


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from conftest import SHARED_DATA

    data = SHARED_DATA / "ptb"
    if not (data / "ptb.train.txt").is_file():
        pytest.skip(f"PTB data not found at {data}")
    ckpt = tmp_path_factory.mktemp("ckpt") / "checkpoint"
    reports = train(CONFIG, data, keep=ckpt)
    assert [r["epoch"] for r in reports] == [1]
    return data, ckpt


def test_the_checkpoint_resumes_with_the_same_config(trained):
    data, ckpt = trained
    longer = cfg.build(PTBConfig, {**cfg.to_dict(CONFIG), "max_max_epoch": 2})
    assert [r["epoch"] for r in train(longer, data, checkpoint=ckpt)] == [2]


@pytest.mark.parametrize("change", [{"hidden_size": 3}, {"num_layers": 2}, {"vocab_size": 10001}])
def test_a_checkpoint_of_another_architecture_is_refused(trained, change):
    data, ckpt = trained
    other = cfg.build(PTBConfig, {**cfg.to_dict(CONFIG), **change, "max_max_epoch": 2})
    with pytest.raises(UserError, match="does not match this model's architecture") as info:
        train(other, data, checkpoint=ckpt)
    assert "\n" not in str(info.value)


def test_a_checkpoint_of_another_vocabulary_is_refused(trained, tmp_path):
    data, ckpt = trained
    for split in ("valid", "test"):
        shutil.copy(data / f"ptb.{split}.txt", tmp_path / f"ptb.{split}.txt")
    # the same text with one word spelled differently: another vocabulary of the same size
    text = re.sub(r"(?<=\s)the(?=\s)", "thee", (data / "ptb.train.txt").read_text())
    (tmp_path / "ptb.train.txt").write_text(text)
    longer = cfg.build(PTBConfig, {**cfg.to_dict(CONFIG), "max_max_epoch": 2})
    with pytest.raises(
        UserError,
        match=r"^the checkpoint was trained on another vocabulary \(10000 words, sha256 \w+\) "
        r"than this data's \(10000 words, sha256 \w+\); resume with the --data-dir",
    ):
        train(longer, tmp_path, checkpoint=ckpt)


DIVERGED = r"^the loss became (NaN|infinite|too large \(over [\d.]+ per unit, beyond any training model\)) at epoch "


def test_a_diverging_loss_names_epoch_and_step(trained, tmp_path):
    data, ckpt = trained
    before = (ckpt / "model.pt").read_bytes()
    diverging = cfg.build(PTBConfig, {**cfg.to_dict(CONFIG), "learning_rate": 1e30, "max_max_epoch": 2})
    with pytest.raises(
        UserError,
        match=DIVERGED + r"2 step \d+; lower --learning-rate or set a smaller "
        r"--max-grad-norm$",
    ):
        train(diverging, data, checkpoint=ckpt, keep=tmp_path / "kept")
    assert not (tmp_path / "kept").exists(), "a diverged run reports no checkpoint"
    assert (ckpt / "model.pt").read_bytes() == before  # the last good checkpoint is intact


def test_a_loss_far_above_a_uniform_guess_stops_the_run_while_still_finite(trained):
    """With a softmax saturated on wrong words the loss is huge but finite and the gradient
    p - onehot(y) stays bounded: the loss itself must stop the run."""
    data, _ = trained
    task = PTBTask(CONFIG)
    assert task.loss_limit() == pytest.approx(10 * math.log(10000))
    # logits of +-300 with random targets: about 300 nats a word, far above 10 x ln(10000)
    huge = cfg.build(PTBConfig, {**cfg.to_dict(CONFIG), "init_scale": 100.0, "max_grad_norm": 1e-6})
    with pytest.raises(
        UserError,
        match=r"^the loss became too large \(over 92.1 per unit, beyond any training "
        r"model\) at epoch 1 step 0; ",
    ):
        train(huge, data)


def test_a_batch_that_does_not_split_over_the_workers(trained):
    with pytest.raises(UserError, match=r"^--batch-size 20 is not a multiple of --num-workers 3; pass a --batch-size"):
        PTBTask.check(CONFIG, ptb.load_corpus(trained[0]), 3)
