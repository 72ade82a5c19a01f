"""A run's (or search's) folder: its name stays inside the storage path, and one writer holds
it at a time (lstm.claim), on local disks and on S3."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ptb_base_config, run_settings

from lstm import claim, storage
from lstm.cli import train_main
from lstm.errors import UserError
from lstm.trainer import fit
from tune import cli as tune_cli

REFUSED_NAMES = [
    "../x",
    "../../x",
    "a/b",
    "/tmp/x",
    "..",
    ".",
    ".hidden",
    "-x",
    "x y",
    "x?y",
    "a\\b",
    "s3://bucket/x",
    "é",
    "a" * 101,
]


@pytest.mark.parametrize("name", REFUSED_NAMES)
def test_a_job_name_that_is_not_one_folder_name_is_refused_before_anything_is_written(name, tmp_path, ptb_dir):
    storage_path = tmp_path / "runs" / "deep"
    argv = ["--config", "test", "--data-dir", str(ptb_dir), "--storage-path", str(storage_path), f"--name={name}"]
    with pytest.raises(UserError, match=r"--name .* is not a folder name of letters, digits") as info:
        train_main("ptb", argv)
    assert "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []  # nothing written, above or in the storage path


@pytest.mark.parametrize("name", ["../x", "a/b", ".hidden"])
def test_a_search_name_that_is_not_one_folder_name_is_refused_before_anything_is_written(name, tmp_path):
    where = ["--storage-path", str(tmp_path / "s"), "--name", name]
    for argv in (["--task", "rectangle", *where], [*where, "--resume"]):
        with pytest.raises(UserError, match="is not a folder name"):
            tune_cli.main(argv)
    assert list(tmp_path.iterdir()) == []


def test_names_of_one_folder_are_taken_as_they_are(tmp_path):
    for name in ["run", "ptb-20261205-093125", "a.b_c-1", "A" * 100]:
        assert storage.locate(str(tmp_path), name, "ptb").path == str(tmp_path / name)
    assert storage.locate(str(tmp_path), "", "ptb").name.startswith("ptb-")


# --------------------------------------------------------------------------- one writer


def test_a_second_writer_of_a_run_is_refused_with_one_line_before_it_writes(ray_session, ptb_dir, tmp_path):
    run_dir = tmp_path / "run"
    with claim.held(str(run_dir), "run") as first:
        with pytest.raises(UserError, match=r"the run at .*run is being written by process \d+ on ") as info:
            fit("ptb", ptb_base_config(), run_settings(tmp_path, "run", ptb_dir))
        assert "\n" not in str(info.value) and f"delete {first.location}" in str(info.value)
        assert [p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*")] == [
            ".writers",
            f".writers/{Path(first.location).name}",
        ]
    assert not run_dir.exists() or list(run_dir.iterdir()) == []  # released: the claim is gone


def test_a_second_writer_of_a_search_is_refused(ray_session, tmp_path):
    argv = ["--task", "rectangle", "--base", "test", "--storage-path", str(tmp_path), "--name", "s"]
    argv += ["--num-samples", "1", "--max-epochs", "1"]
    with claim.held(str(tmp_path / "s"), "search"):
        with pytest.raises(UserError, match="the search at .* is being written by process"):
            tune_cli.main(argv)
    assert not any((tmp_path / "s").glob("trial_*"))


def a_gone_process() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_the_claim_of_a_process_that_is_gone_is_removed_with_a_line(tmp_path, capsys):
    stale = storage.join(str(tmp_path), claim.CLAIMS_DIR, "old.json")
    storage.write_json(stale, {**claim.holder(), "pid": a_gone_process()})
    with claim.held(str(tmp_path), "run") as held:
        assert [Path(p).name for p in claim.claims(str(tmp_path))] == [Path(held.location).name]
    assert "[run] removed the claim of process" in capsys.readouterr().out
    assert not (tmp_path / claim.CLAIMS_DIR).exists()


def test_a_claim_from_another_host_is_kept_and_named_in_the_refusal(tmp_path):
    other = storage.join(str(tmp_path), claim.CLAIMS_DIR, "other.json")
    storage.write_json(other, {**claim.holder(), "host": f"not-{socket.gethostname()}", "pid": a_gone_process()})
    with pytest.raises(UserError, match=f"on not-.*if that job is no longer running, delete {other}"):
        claim.claim(str(tmp_path), "run")
    assert [Path(p).name for p in claim.claims(str(tmp_path))] == ["other.json"]


def test_a_process_with_a_reused_id_does_not_hold_a_claim(tmp_path):
    mine = {**claim.holder(), "process_started": "1"}  # this pid, but another process's start
    assert claim.is_gone(mine) and not claim.is_gone(claim.holder())


def test_one_writer_per_run_folder_on_s3(s3, capsys):
    folder = f"s3://{s3}/runs/r"
    with claim.held(folder, "run") as first:
        assert storage.exists(first.location)
        with pytest.raises(UserError, match=f"the run at s3://{s3}/runs/r is being written by process"):
            claim.claim(folder, "run")
        assert list(claim.claims(folder)) == [first.location]  # the refused claim left nothing
    assert storage.list_dir(folder) == []
    with claim.held(folder, "run"):  # free again
        pass
