"""The checkpoint format (lstm/checkpoint.py) on tiny real checkpoints, without Ray: the manifest
written last names each file's size and SHA-256; a damaged file is named; a checkpoint without a
manifest is read as before; a run folder gives way to its newest intact checkpoint, and what a
user passes that is no checkpoint is one line."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
import ray.train
import torch
from conftest import own_lines
from torch import nn

from lstm import checkpoint as ckpt
from lstm.errors import UserError


def write_checkpoint(directory: Path, epoch: int) -> nn.Module:
    """A checkpoint of a 3x2 linear model (weights seeded by ``epoch``) in ``directory``."""
    torch.manual_seed(epoch)
    model = nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()  # a momentum buffer in the optimizer's state
    directory.mkdir(parents=True)
    state = {"task": "ptb", "config": {}, "epoch": epoch, "meta": {}, "history": [{"epoch": epoch}]}
    ckpt.save(directory, model, optimizer, state)
    return model


def truncate(path: Path) -> int:
    """Cut ``path`` to half its size; returns the size it had."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return len(data)


@pytest.fixture
def run(tmp_path) -> Path:
    """A run folder with the checkpoints of epochs 1 and 2 (Tune's folder names)."""
    for epoch in (1, 2):
        write_checkpoint(tmp_path / "run" / f"checkpoint_00000{epoch - 1}", epoch)
    return tmp_path / "run"


def test_the_manifest_names_each_files_size_and_sha256_and_the_checkpoint_reads_back(tmp_path):
    model = write_checkpoint(tmp_path / "c", epoch=3)
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["format"] == 1 and manifest["epoch"] == 3
    assert sorted(manifest["files"]) == ["model.pt", "optimizer.pt", "state.json"]
    for name, entry in manifest["files"].items():
        data = (tmp_path / "c" / name).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    contents = ckpt.read(tmp_path / "c")
    assert contents.state["epoch"] == 3 and contents.optimizer["state"][0]["momentum_buffer"].shape == (2, 3)
    assert torch.equal(contents.model["weight"], model.weight.detach())
    assert ckpt.read(tmp_path / "c", optimizer=False).optimizer is None


def flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda d: truncate(d / "model.pt"), r"^model\.pt is \d+ bytes, the manifest says \d+$"),
        (lambda d: flip_last_byte(d / "optimizer.pt"), r"^optimizer\.pt does not match the manifest's sha256"),
        (lambda d: (d / "state.json").unlink(), r"^state\.json is missing \(the manifest lists it\)$"),
        (lambda d: (d / "manifest.json").write_text('{"files": '), r"^manifest\.json is not JSON \("),
        (lambda d: (d / "manifest.json").write_text("[]"), r"^manifest\.json gives no size and sha256 of model\.pt$"),
    ],
    ids=["size", "checksum", "missing-file", "manifest-not-json", "manifest-without-files"],
)
def test_the_manifest_check_names_the_file_at_fault(tmp_path, damage, message):
    write_checkpoint(tmp_path / "c", epoch=1)
    damage(tmp_path / "c")
    with pytest.raises(ckpt.Damaged, match=message):
        ckpt.check(tmp_path / "c")


def test_a_checkpoint_without_a_manifest_is_intact_unless_a_file_fails_to_load(tmp_path):
    write_checkpoint(tmp_path / "c", epoch=2)
    (tmp_path / "c" / "manifest.json").unlink()  # as written before manifests
    assert ckpt.check(tmp_path / "c") is None and ckpt.read(tmp_path / "c").state["epoch"] == 2
    for name, content, message in [
        ("model.pt", None, r"^model\.pt is not a readable torch file \(.+\)$"),
        ("optimizer.pt", b"not a torch file", r"^optimizer\.pt is not a readable torch file"),
        ("state.json", b"\xff\xfe{}", r"^state\.json is not UTF-8 text \(byte 0\)$"),
        ("state.json", b'{"task": ', r"^state\.json is not JSON \("),
        ("state.json", b'{"task": "ptb"}', r"^state\.json is not a checkpoint's state"),
    ]:
        shutil.rmtree(tmp_path / "c")
        write_checkpoint(tmp_path / "c", epoch=2)
        (tmp_path / "c" / "manifest.json").unlink()
        if content is None:
            truncate(tmp_path / "c" / name)
        else:
            (tmp_path / "c" / name).write_bytes(content)
        with pytest.raises(ckpt.Damaged, match=message):
            ckpt.read(tmp_path / "c")


def test_resume_gives_way_to_the_newest_intact_checkpoint_of_the_run_folder(run):
    size = truncate(run / "checkpoint_000001" / "model.pt")
    contents, skipped = ckpt.resume_source(ray.train.Checkpoint(str(run / "checkpoint_000001")), str(run))
    assert contents.name == "checkpoint_000000" and contents.state["epoch"] == 1
    assert skipped == [("checkpoint_000001", f"model.pt is {size // 2} bytes, the manifest says {size}")]
    assert ckpt.describe(skipped) == f"checkpoint_000001: model.pt is {size // 2} bytes, the manifest says {size}"
    # an intact checkpoint is used as it is
    contents, skipped = ckpt.resume_source(ray.train.Checkpoint(str(run / "checkpoint_000000")), str(run))
    assert contents.name == "checkpoint_000000" and skipped == []


def test_resume_with_nothing_intact_is_one_line_naming_each_file(run):
    truncate(run / "checkpoint_000001" / "model.pt")
    newest = ray.train.Checkpoint(str(run / "checkpoint_000001"))
    with pytest.raises(UserError, match=r"^cannot resume: checkpoint \S+/checkpoint_000001 is damaged: model\.pt is"):
        ckpt.resume_source(newest)  # not in a run folder: nothing to fall back on
    (run / "checkpoint_000000" / "state.json").write_text("{}")
    with pytest.raises(UserError) as info:
        ckpt.resume_source(newest, str(run))
    assert re.match(
        rf"^cannot resume: no intact checkpoint left in {re.escape(str(run))} \(checkpoint_000001/model\.pt is \d+ "
        r"bytes, the manifest says \d+; checkpoint_000000/state\.json is \d+ bytes, the manifest says \d+\); "
        r"start a new run with another --name$",
        str(info.value),
    ), info.value


def test_a_run_folder_gives_its_newest_intact_checkpoint_and_says_which_it_skipped(run, capsys):
    assert ckpt.load(run, label="ptb").name == "checkpoint_000001" and own_lines(capsys.readouterr().err) == []
    flip_last_byte(run / "checkpoint_000001" / "model.pt")
    contents = ckpt.load(run, label="ptb")
    assert contents.name == "checkpoint_000000" and contents.optimizer is None
    err = own_lines(capsys.readouterr().err)  # Ray's forwarded lines of other runs aside
    assert err == [
        "[ptb] skipped checkpoint_000001: model.pt does not match the manifest's sha256 (same size, other bytes); "
        "using checkpoint_000000"
    ]


@pytest.mark.parametrize(
    "passed,message",
    [
        ("nope", r"^\S+/nope does not exist; pass a run folder or one of its checkpoint_\* folders$"),
        ("run/checkpoint_000000/model.pt", r"^\S+/model\.pt is a file, not a folder; pass a run folder"),
        ("empty", r"^\S+/empty holds no checkpoint; pass a run folder"),
        ("run/checkpoint_000001", r"^checkpoint \S+/checkpoint_000001 is damaged: model\.pt is \d+ bytes, the "),
        ("broken", r"^\S+/broken holds no intact checkpoint \(checkpoint_000000/state\.json is not UTF-8 text"),
    ],
)
def test_what_a_user_passes_that_is_no_intact_checkpoint_is_one_line(run, passed, message):
    truncate(run / "checkpoint_000001" / "model.pt")
    (run.parent / "empty").mkdir()
    write_checkpoint(run.parent / "broken" / "checkpoint_000000", epoch=1)
    (run.parent / "broken" / "checkpoint_000000" / "state.json").write_bytes(b"\xff")
    (run.parent / "broken" / "checkpoint_000000" / "manifest.json").unlink()
    with pytest.raises(UserError, match=message) as info:
        ckpt.load(run.parent / passed, label="ptb")
    assert "\n" not in str(info.value)
