"""``jobs/ptb.py score`` and ``generate``: the score of ptb.test.txt equals the job's own batch-1
test evaluation; unknown words become <unk> and are counted; generation is reproducible with
--seed; both read checkpoints in S3; bad input is one line and exit status 2."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import REPO, own_lines, run_settings
from test_ptb_errors import train

from lstm import config as cfg
from lstm import storage
from lstm.errors import run_cli
from lstm.tasks.ptb import PRESETS, PTBConfig
from lstm.tasks.ptb_checkpoint import generate_text, render, score_text

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


def test_score_equals_the_jobs_batch_one_test_evaluation(ray_session, ptb_dir, tmp_path, capsys):
    """A real run testing with batch 1 and the state carried, then ``score --text
    ptb.test.txt`` on its run folder: the same words, the same perplexity. The job tests in
    windows of 31 words, which divide the 82,429 test targets: it predicts every target, as the
    tutorial's batch-1 x 1-step evaluation does (test_ptb_model.py shows the window length does
    not matter with the state carried), at a 31st of the steps."""
    from lstm.trainer import fit

    test_words = len((ptb_dir / "ptb.test.txt").read_text().replace("\n", " <eos> ").split())
    assert (test_words - 1) % 31 == 0
    config = cfg.build(
        PTBConfig,
        {**REGULARIZED, "train_fraction": 0.01, "eval_batch_size": 20, "eval_num_steps": 31, "test_batch_size": 1},
    )
    result = fit("ptb", config, run_settings(tmp_path, "scored", ptb_dir))
    status, out, _ = run_job(["score", "--checkpoint", result.run_dir, "--text", str(ptb_dir / "ptb.test.txt")], capsys)
    scored = json.loads(out.strip().splitlines()[-1])
    assert status == 0 and scored["tokens"] == test_words - 1 and scored["unk"] == 0
    assert abs(scored["ppl"] / result.final["test_ppl"] - 1) < 1e-4  # the issue asks for 0.1%
    status, out, _ = run_job(
        ["score", "--checkpoint", result.run_dir, "--text", str(ptb_dir / "ptb.test.txt"), "--batch-size", "10"], capsys
    )
    batched = json.loads(out.strip().splitlines()[-1])
    assert batched["batch_size"] == 10 and abs(batched["ppl"] / scored["ppl"] - 1) < 0.005


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


def test_both_commands_read_a_checkpoint_in_s3(checkpoint, ptb_dir, tmp_path, monkeypatch):
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
        run = f"s3://runs/ptb-run{query}"
        text = tmp_path / "valid-head.txt"
        text.write_text("\n".join((ptb_dir / "ptb.valid.txt").read_text().splitlines()[:100]) + "\n")
        assert score_text(run, text)["ppl"] == score_text(checkpoint, text)["ppl"]
        assert generate_text(run, "the", length=10, seed=1) == generate_text(checkpoint, "the", length=10, seed=1)
    finally:
        server.stop()


@pytest.mark.parametrize(
    "args,message",
    [
        (["score", "--text", "{text}", "--checkpoint", "{missing}"], r"does not exist; pass a run folder"),
        (["score", "--text", "{text}", "--checkpoint", "{char}"], r"is a checkpoint of task 'char', not 'ptb'"),
        (["score", "--text", "{missing}", "--checkpoint", "{ckpt}"], r"^error: --text \S+ does not exist"),
        (["score", "--text", "{empty}", "--checkpoint", "{ckpt}"], r"^error: --text \S+ has 0 word\(s\)"),
        (["score", "--text", "{text}", "--checkpoint", "{ckpt}", "--batch-size", "0"], r"--batch-size must be >= 1"),
        (["generate", "--checkpoint", "{ckpt}", "--prompt", "the zorblax qwerty"], r"'qwerty' 'zorblax'; remove"),
        (["generate", "--checkpoint", "{ckpt}", "--prompt", "the", "--temperature", "0"], r"--temperature must be"),
        (["generate", "--checkpoint", "{ckpt}", "--prompt", "the", "--length", "0"], r"--length must be positive"),
        (["generate", "--checkpoint", "{ckpt}", "--prompt", " "], r"--prompt is empty"),
    ],
)
def test_bad_input_is_one_line_and_exit_status_2(checkpoint, tmp_path, capsys, args, message):
    (tmp_path / "empty.txt").write_text(" ")
    (tmp_path / "text.txt").write_text("the company said \n")
    char = tmp_path / "char-checkpoint"
    shutil.copytree(checkpoint, char)
    state = json.loads((char / "state.json").read_text())
    (char / "state.json").write_text(json.dumps({**state, "task": "char"}))
    paths = {
        "text": tmp_path / "text.txt",
        "missing": tmp_path / "nope",
        "char": char,
        "empty": tmp_path / "empty.txt",
        "ckpt": checkpoint,
    }
    status, out, err = run_job([a.format(**paths) for a in args], capsys)
    assert status == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    assert re.search(message, err.strip()), err
