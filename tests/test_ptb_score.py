"""``jobs/ptb.py score`` and ``generate``: unknown words become <unk> and are counted; generation
is reproducible with --seed; both read checkpoints in S3; a run folder's damaged newest
checkpoint is skipped with one line; bad input, a damaged or unreadable checkpoint included, is
one line and exit status 2. (That the score of ptb.test.txt equals the job's own batch-1 test
evaluation is test_ptb_perplexity.py's, on the run it checks against plain PyTorch.)"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
from pathlib import Path

import pytest
import ray.train
import torch
from conftest import REPO, own_lines
from test_ptb_errors import train

from lstm import checkpoint as ckpt
from lstm import storage
from lstm.errors import run_cli
from lstm.tasks.ptb_config import PRESETS, PTBConfig
from lstm.tasks.ptb_trained import generate_text, render, score_text

REGULARIZED = dict(
    PRESETS["test"],
    hidden_size=16,
    num_steps=10,
    tied=True,
    locked_dropout_output=0.2,
    weight_drop=0.2,
    embedding_dropout=0.05,
)


def job_main():
    """``main`` of jobs/ptb.py (a script, not a module of the package)."""
    spec = importlib.util.spec_from_file_location("ptb_job", REPO / "jobs" / "ptb.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def run_job(argv: list[str], capsys) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of ``jobs/ptb.py ARGV``, run in this process."""
    with pytest.raises(SystemExit) as info:
        run_cli(job_main(), argv)
    out, err = capsys.readouterr()
    err = "\n".join(own_lines(err))
    return info.value.code, out, err


@pytest.fixture(scope="module")
def checkpoint(ptb_dir, tmp_path_factory) -> Path:
    """A regularized model trained in this process for one epoch on 1% of PTB."""
    keep = tmp_path_factory.mktemp("score") / "checkpoint"
    config = PTBConfig(**{**REGULARIZED, "train_fraction": 0.01, "eval_batch_size": 20, "eval_num_steps": 35})
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(config, ptb_dir, keep=keep)
    finally:
        torch.set_num_threads(before)
    return keep


def test_unknown_words_become_unk_and_are_counted(checkpoint, tmp_path):
    text = tmp_path / "new.txt"
    text.write_text("the zorblax company said qwerty shares rose \n the company said zorblax \n")
    literal = tmp_path / "literal.txt"
    literal.write_text("the <unk> company said <unk> shares rose \n the company said <unk> \n")
    scored, reference = score_text(checkpoint, text), score_text(checkpoint, literal)
    assert (scored["unk"], scored["words"], scored["tokens"]) == (3, 13, 12)
    assert reference["unk"] == 0 and scored["ppl"] == reference["ppl"]


def test_generate_is_reproducible_with_a_seed_and_shows_eos_as_a_line_break(checkpoint, capsys):
    words = generate_text(checkpoint, "the company", length=40, temperature=1.0, seed=3)
    assert len(words) == 40 and words == generate_text(checkpoint, "the company", length=40, seed=3)
    assert words != generate_text(checkpoint, "the company", length=40, seed=4)
    assert render(["a", "b", "<eos>", "c", "<eos>"]) == "a b\nc\n"
    args = ["generate", "--checkpoint", str(checkpoint), "--prompt", "the company", "--length", "40", "--seed", "3"]
    status, out, _ = run_job(args, capsys)
    assert status == 0 and out == render(["the", "company", *words]) + "\n"


def test_both_commands_read_a_checkpoint_in_s3(checkpoint, ptb_dir, tmp_path, monkeypatch, capsys):
    from moto.server import ThreadedMotoServer

    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(key, "testing")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        _, port = server.get_host_and_port()
        query = f"?endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1&allow_bucket_creation=true"
        fs, _ = storage.filesystem("s3://runs" + query)
        fs.create_dir("runs")
        storage.upload_dir(checkpoint, f"s3://runs/ptb-run/checkpoint_000000{query}")
        # a newer checkpoint whose model.pt is cut short: the readers use the one before it
        damaged = shutil.copytree(checkpoint, tmp_path / "damaged")
        (damaged / "model.pt").write_bytes((checkpoint / "model.pt").read_bytes()[:1000])
        storage.upload_dir(damaged, f"s3://runs/ptb-run/checkpoint_000001{query}")
        run = f"s3://runs/ptb-run{query}"
        text = tmp_path / "valid-head.txt"
        text.write_text("\n".join((ptb_dir / "ptb.valid.txt").read_text().splitlines()[:100]) + "\n")
        assert score_text(run, text)["ppl"] == score_text(checkpoint, text)["ppl"]
        assert generate_text(run, "the", length=10, seed=1) == generate_text(checkpoint, "the", length=10, seed=1)
        # a resume in that folder, as the loop's restore makes it, gives way to the same checkpoint
        fs, path = storage.filesystem(f"s3://runs/ptb-run/checkpoint_000001{query}")
        contents, skipped = ckpt.resume_source(ray.train.Checkpoint(path, filesystem=fs), run)
        assert contents.name == "checkpoint_000000" and [name for name, _ in skipped] == ["checkpoint_000001"]
        skips = [line for line in capsys.readouterr().err.splitlines() if line.startswith("[ptb] skipped")]
        assert (
            skips
            == [
                "[ptb] skipped checkpoint_000001: model.pt is 1000 bytes, the manifest says "
                f"{(checkpoint / 'model.pt').stat().st_size}; using checkpoint_000000"
            ]
            * 2
        )
    finally:
        server.stop()


def damaged_copies(checkpoint: Path, root: Path) -> dict[str, Path]:
    """Copies of ``checkpoint`` under ``root``, each wrong in one way: "char" (a checkpoint of
    the char task, its manifest rewritten), "truncated" (model.pt cut short), "nottorch" (a
    model.pt that is no torch file), "notjson" and "notutf8" (state.json; no manifest, as
    before manifests), "run" (a run folder of one truncated checkpoint)."""
    copies = {name: root / name for name in ("char", "truncated", "nottorch", "notjson", "notutf8")}
    copies["run"] = root / "run" / "checkpoint_000000"
    for copy in copies.values():
        shutil.copytree(checkpoint, copy)
    state = json.loads((copies["char"] / "state.json").read_text())
    (copies["char"] / "state.json").write_text(json.dumps({**state, "task": "char"}))
    ckpt.write_manifest(copies["char"], state["epoch"])
    for name in ("truncated", "run"):
        model = copies[name] / "model.pt"
        model.write_bytes(model.read_bytes()[:1000])
    (copies["nottorch"] / "model.pt").write_text("weights\n")
    ckpt.write_manifest(copies["nottorch"], state["epoch"])
    (copies["notjson"] / "state.json").write_text('{"task": "ptb",')
    (copies["notutf8"] / "state.json").write_bytes(b"\xff\xfe")
    for name in ("notjson", "notutf8"):
        (copies[name] / "manifest.json").unlink()
    copies["run"] = copies["run"].parent
    return copies


@pytest.mark.parametrize(
    "args,message",
    [
        (["score", "--text", "{text}", "--checkpoint", "{missing}"], r"does not exist; pass a run folder"),
        (["score", "--text", "{text}", "--checkpoint", "{char}"], r"is a checkpoint of task 'char', not 'ptb'"),
        (["score", "--text", "{text}", "--checkpoint", "{truncated}"], r"/truncated is damaged: model\.pt is 1000 "),
        (["score", "--text", "{text}", "--checkpoint", "{nottorch}"], r"model\.pt is not a readable torch file"),
        (["score", "--text", "{text}", "--checkpoint", "{notjson}"], r"/notjson is damaged: state\.json is not JSON"),
        (["generate", "--checkpoint", "{notutf8}", "--prompt", "the"], r"state\.json is not UTF-8 text \(byte 0\)"),
        (["score", "--text", "{text}", "--checkpoint", "{run}"], r"no intact checkpoint \(checkpoint_000000/model\.pt"),
        (["score", "--text", "{text}", "--checkpoint", "{model}"], r"model\.pt is a file, not a folder; pass a run"),
        (["score", "--text", "{text}", "--checkpoint", "{emptydir}"], r"holds no checkpoint; pass a run folder"),
        (["score", "--text", "{missing}", "--checkpoint", "{ckpt}"], r"^error: --text \S+ does not exist"),
        (["score", "--text", "{empty}", "--checkpoint", "{ckpt}"], r"^error: --text \S+ has 0 word\(s\)"),
        (["score", "--text", "{text}", "--checkpoint", "{ckpt}", "--batch-size", "0"], r"--batch-size must be >= 1"),
        (
            ["score", "--text", "{text}", "--checkpoint", "{ckpt}", "--batch-size", "3"],
            r"--text \S+text\.txt has 4 words, too few for --batch-size 3; lower it",
        ),
        (["generate", "--checkpoint", "{ckpt}", "--prompt", "the zorblax qwerty"], r"'qwerty' 'zorblax'; remove"),
        (["generate", "--checkpoint", "{ckpt}", "--prompt", "the", "--temperature", "0"], r"--temperature must be"),
        (["generate", "--checkpoint", "{ckpt}", "--prompt", "the", "--length", "0"], r"--length must be positive"),
        (["generate", "--checkpoint", "{ckpt}", "--prompt", " "], r"--prompt is empty"),
    ],
)
def test_bad_input_is_one_line_and_exit_status_2(checkpoint, tmp_path, capsys, args, message):
    (tmp_path / "empty.txt").write_text(" ")
    (tmp_path / "text.txt").write_text("the company said \n")
    (tmp_path / "emptydir").mkdir()
    paths = {
        **damaged_copies(checkpoint, tmp_path),
        "text": tmp_path / "text.txt",
        "missing": tmp_path / "nope",
        "empty": tmp_path / "empty.txt",
        "emptydir": tmp_path / "emptydir",
        "model": checkpoint / "model.pt",
        "ckpt": checkpoint,
    }
    status, out, err = run_job([a.format(**paths) for a in args], capsys)
    assert status == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    assert re.search(message, err.strip()), err


def test_score_of_a_run_folder_skips_its_damaged_newest_checkpoint_with_one_line(checkpoint, tmp_path, capsys):
    run = tmp_path / "run"
    for name in ("checkpoint_000000", "checkpoint_000001"):  # the same epoch: the later name is the newer
        shutil.copytree(checkpoint, run / name)
    model = run / "checkpoint_000001" / "model.pt"
    size = model.stat().st_size
    model.write_bytes(model.read_bytes()[:1000])
    text = tmp_path / "text.txt"
    text.write_text("the company said \n the shares rose \n")
    status, out, err = run_job(["score", "--checkpoint", str(run), "--text", str(text)], capsys)
    assert status == 0 and json.loads(out.strip().splitlines()[-1])["ppl"] == score_text(checkpoint, text)["ppl"]
    assert err.strip().splitlines() == [
        f"[ptb] skipped checkpoint_000001: model.pt is 1000 bytes, the manifest says {size}; using checkpoint_000000"
    ]
