"""One-line errors of the PTB task from the worker side of the loop, run in this process
(``lstm.loop.run_training`` without a Ray cluster): a checkpoint from another architecture or
vocabulary, a diverging loss, a batch that does not split over the workers. test_ptb_job.py
checks that such an error also comes out of ``fit()`` as one line."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import ray.train
import torch

from lstm import config as cfg
from lstm.errors import UserError
from lstm.loop import run_training
from lstm.task import WorkerInfo
from lstm.tasks.ptb import PRESETS, PTBConfig, PTBTask

CONFIG = PTBConfig(**{**PRESETS["test"], "train_fraction": 0.005, "eval_batch_size": 20, "eval_num_steps": 35})


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def train(config: PTBConfig, data_dir: Path, checkpoint: Path | None = None, keep: Path | None = None) -> list[dict]:
    """Run the loop for one worker in this process; ``keep`` receives the last checkpoint."""
    reports = []

    def report(metrics, ckpt=None):
        reports.append(metrics)
        if ckpt is not None and keep is not None:
            shutil.rmtree(keep, ignore_errors=True)
            shutil.copytree(ckpt.path, keep)

    settings = cfg.RunSettings(data_dir=str(data_dir))
    run_training(PTBTask(), config, settings, WorkerInfo(), "",
                 get_checkpoint=lambda: ray.train.Checkpoint(str(checkpoint)) if checkpoint else None, report=report)
    return reports


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
    with pytest.raises(UserError, match=r"^the checkpoint was trained on another vocabulary \(10000 words, sha256 \w+\) "
                                        r"than this data's \(10000 words, sha256 \w+\); resume with the --data-dir"):
        train(longer, tmp_path, checkpoint=ckpt)


def test_a_diverging_loss_names_epoch_and_step(trained):
    data, _ = trained
    diverging = cfg.build(PTBConfig, {**cfg.to_dict(CONFIG), "learning_rate": 1e30})
    with pytest.raises(UserError, match=r"^the loss became (NaN|infinite) at epoch 1 step \d+; lower --learning-rate "
                                        r"or set a smaller --max-grad-norm$"):
        train(diverging, data)


def test_a_batch_that_does_not_split_over_the_workers(trained):
    data, _ = trained
    with pytest.raises(UserError, match="batch size 20 is not divisible by 3 workers; pass a --batch-size that is a multiple"):
        PTBTask().load_data(CONFIG, str(data), WorkerInfo(rank=0, world_size=3))
