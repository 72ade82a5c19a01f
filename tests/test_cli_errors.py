"""The command lines refuse what a user can get wrong before anything starts, each with one
line ``error: <what>; <what to do>`` and exit status 2: a file or folder they name that is
missing, the wrong kind, not UTF-8 or the wrong shape, and a flag that would have no effect
with the others. The jobs run in this process; none of these may start Ray."""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
from pathlib import Path

import pytest
from conftest import REPO, own_lines

from lstm import cluster, user_files
from lstm import config as cfg
from lstm.cli import train_main
from lstm.errors import UserError, run_cli
from tune import cli as tune_cli


def load_job(name: str):
    """``main`` of jobs/<name>.py (a script, not a module of the package)."""
    spec = importlib.util.spec_from_file_location(f"{name}_job", REPO / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


JOBS = {
    "ptb": load_job("ptb"),
    "char": load_job("char"),
    "rectangle": lambda argv: train_main("rectangle", argv),
    "tune": tune_cli.main,
}


@pytest.fixture(autouse=True)
def no_ray(monkeypatch):
    """A command that got past its checks would start Ray here: fail at once instead."""

    def refuse(*args, **kwargs):
        raise AssertionError("the command got past its checks and would start Ray")

    monkeypatch.setattr(cluster, "ensure_ray", refuse)


@pytest.fixture
def files(tmp_path: Path) -> Path:
    """A folder of inputs a user might name, good and bad."""
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 cr\xe8me\n".encode("latin-1"))
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.txt").write_text(" \n\n")
    (tmp_path / "short.txt").write_text("too short for a window\n")
    (tmp_path / "text.txt").write_text("the cat sat on the mat\n" * 200)
    (tmp_path / "folder").mkdir()
    for name, content in {
        "list.json": [1, 2],
        "null.json": None,
        "unknown.json": {"colour": "red"},
        "wrong_type.json": {"hidden_size": "big"},
        "number_for_text.json": {"shape": 5},
        "task_list.json": {"task": ["rectangle"], "hidden_size": 4},
        "preset_number.json": {"preset": 2},
        "char_both.json": {"task": "char", "corpus": str(tmp_path / "text.txt"), "corpus_name": "tinyshakespeare"},
    }.items():
        (tmp_path / name).write_text(json.dumps(content))
    (tmp_path / "broken.json").write_text('{"hidden_size": 16,')
    (tmp_path / "latin1.json").write_bytes('{"shape": "r\xe9ctangle"}'.encode("latin-1"))
    for name, train, other in (
        ("ptb_empty", "", "a b\n"),
        ("ptb_latin1", "caf\xe9\n", "a b\n"),
        ("ptb_small", "a b c d\n", "a b\n"),
        ("ptb_one_line", "the cat sat " * 100, "a b\n"),
    ):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "ptb.train.txt").write_bytes(train.encode("latin-1"))
        for split in ("valid", "test"):
            (folder / f"ptb.{split}.txt").write_text(other)
    return tmp_path


def run_job(job: str, argv: list[str], capsys) -> tuple[int, list[str]]:
    """(exit status, the lines this process wrote to stderr) of ``jobs/<job>.py ARGV``."""
    with pytest.raises(SystemExit) as info:
        run_cli(JOBS[job], argv)
    return info.value.code, own_lines(capsys.readouterr().err)


def check_refused(job: str, argv: list[str], expected: str, files: Path, capsys) -> None:
    """``jobs/<job>.py ARGV`` (``{f}`` standing for the inputs' folder) ends with status 2 and
    the one line ``error: <expected>``: the whole line, or a regex matching it whole."""
    argv = [a.format(f=files) for a in argv]
    if job != "ptb" or argv[:1] not in (["score"], ["generate"]):
        argv += ["--storage-path", str(files / "runs")]
    status, lines = run_job(job, argv, capsys)
    assert status == 2
    assert len(lines) == 1, lines
    line, expected = lines[0], "error: " + expected.format(f=files)
    assert line == expected or re.fullmatch(expected, line), line


CONFIG_FIX = r"pass the path of a JSON file such as a search's best_config\.json"

FILE_CASES = {
    # --config-file: jobs/rectangle.py (every job reads it with lstm.config.resolve)
    "config missing": (
        "rectangle",
        ["--config-file", "{f}/nope.json"],
        rf"config file \S+/nope\.json does not exist; {CONFIG_FIX}",
    ),
    "config a folder": (
        "rectangle",
        ["--config-file", "{f}/folder"],
        rf"config file \S+ is a folder, not a file; {CONFIG_FIX}",
    ),
    "config empty path": ("ptb", ["--config-file", ""], rf"config file \. is a folder, not a file; {CONFIG_FIX}"),
    "config not UTF-8": (
        "rectangle",
        ["--config-file", "{f}/latin1.json"],
        rf"config file \S+ is not UTF-8 text \(bad byte at offset 12\); convert it to UTF-8, or {CONFIG_FIX}",
    ),
    "config not JSON": (
        "rectangle",
        ["--config-file", "{f}/broken.json"],
        r"config file \S+ is not valid JSON \(Expecting .* at line 1\); fix or regenerate it",
    ),
    "config a list": (
        "rectangle",
        ["--config-file", "{f}/list.json"],
        rf"config file \S+ holds a list, not a JSON object of field names to values; {CONFIG_FIX}",
    ),
    "config null": (
        "ptb",
        ["--config-file", "{f}/null.json"],
        rf"config file \S+ holds null, not a JSON object of field names to values; {CONFIG_FIX}",
    ),
    "config unknown field": (
        "rectangle",
        ["--config-file", "{f}/unknown.json"],
        r"config file \S+ has unknown field\(s\) colour for ShapeConfig; remove them, or pass the file to the job "
        r"of its task \(known fields: aux_weight, .*\)",
    ),
    "config wrong type": (
        "rectangle",
        ["--config-file", "{f}/wrong_type.json"],
        r"config file \S+: hidden_size must be an int \(got 'big'\); fix the value in the file, or override it "
        r"with --hidden-size",
    ),
    "config number for text": (
        "rectangle",
        ["--config-file", "{f}/number_for_text.json"],
        r"config file \S+: shape must be a str \(got 5\); fix the value in the file, or override it with --shape",
    ),
    "config task not a name": (
        "rectangle",
        ["--config-file", "{f}/task_list.json"],
        r"config file \S+: 'task' must be the name of a task such as 'ptb' \(got \['rectangle'\]\); fix the file",
    ),
    "config preset not a name": (
        "rectangle",
        ["--config-file", "{f}/preset_number.json"],
        r"config file \S+: 'preset' must be the name of a named config such as 'small' \(got 2\); fix the file",
    ),
    # score --text: read before the checkpoint
    "text missing": (
        "ptb",
        ["score", "--checkpoint", "{f}/run", "--text", "{f}/nope.txt"],
        r"--text \S+/nope\.txt does not exist; pass the path of a UTF-8 text file to score",
    ),
    "text a folder": (
        "ptb",
        ["score", "--checkpoint", "{f}/run", "--text", "{f}/folder"],
        r"--text \S+/folder is a folder, not a file; pass the path of a UTF-8 text file to score",
    ),
    "text not UTF-8": (
        "ptb",
        ["score", "--checkpoint", "{f}/run", "--text", "{f}/latin1.txt"],
        r"--text \S+ is not UTF-8 text \(bad byte at offset 3\); convert it to UTF-8, or pass the path of a "
        r"UTF-8 text file to score",
    ),
    "text empty": (
        "ptb",
        ["score", "--checkpoint", "{f}/run", "--text", "{f}/empty.txt"],
        r"--text \S+ has 0 word\(s\); scoring needs at least 2 \(the first is context\): pass a longer text",
    ),
    # PTB --data-dir
    "ptb data-dir missing": (
        "ptb",
        ["--data-dir", "{f}/nope"],
        r"--data-dir \S+/nope does not exist; pass --data-dir with a folder that holds ptb\.train\.txt, "
        r"ptb\.valid\.txt, ptb\.test\.txt, or omit it to download \S+",
    ),
    "ptb data-dir a file": (
        "ptb",
        ["--data-dir", "{f}/text.txt"],
        r"--data-dir \S+/text\.txt is a file, not a folder; pass --data-dir with a folder that holds .*",
    ),
    "ptb data file empty": (
        "ptb",
        ["--data-dir", "{f}/ptb_empty"],
        r"data file \S+/ptb\.train\.txt is empty; pass --data-dir with a folder of non-empty PTB files",
    ),
    "ptb data file not UTF-8": (
        "ptb",
        ["--data-dir", "{f}/ptb_latin1"],
        r"data file \S+/ptb\.train\.txt is not UTF-8 text \(bad byte at offset 3\); convert it to UTF-8, or pass "
        r"--data-dir with a folder holding plain-text ptb\.train\.txt, ptb\.valid\.txt, ptb\.test\.txt",
    ),
    "ptb data one line": (
        "ptb",
        ["--data-dir", "{f}/ptb_one_line"],
        r"training file \S+ has no newline: the PTB format has one sentence per line \(each newline becomes "
        r"<eos>\); split the text into lines",
    ),
    "ptb data too small": (
        "ptb",
        ["--data-dir", "{f}/ptb_small", "--config", "test"],
        r"the training data \(5 words at --train-fraction 1\) is too short for --batch-size 20 x --num-steps 2: "
        r"one step needs 60 words; lower --batch-size or --num-steps, or raise --train-fraction",
    ),
    "tune ptb data-dir missing": (
        "tune",
        ["--data-dir", "{f}/nope"],
        r"--data-dir \S+/nope does not exist; pass --data-dir with a folder that holds ptb\.train\.txt, .*",
    ),
    "tune ptb data file empty": (
        "tune",
        ["--data-dir", "{f}/ptb_empty"],
        r"data file \S+/ptb\.train\.txt is empty; .*",
    ),
    # char: --corpus, or a downloaded corpus under --data-dir
    "corpus missing": (
        "char",
        ["--corpus", "{f}/nope.txt"],
        r"corpus file \S+/nope\.txt does not exist; pass --corpus with a text file \(or omit it to use the "
        r"Nietzsche text\)",
    ),
    "corpus a folder": ("char", ["--corpus", "{f}/folder"], r"corpus file \S+/folder is a folder, not a file; .*"),
    "corpus not UTF-8": (
        "char",
        ["--corpus", "{f}/latin1.txt"],
        r"corpus file \S+ is not UTF-8 text \(bad byte at offset 3\); convert it to UTF-8, or pass --corpus .*",
    ),
    "corpus empty": (
        "char",
        ["--corpus", "{f}/empty.txt"],
        r"corpus file \S+ is empty; pass --corpus with a file that holds some text",
    ),
    "corpus too small": (
        "char",
        ["--corpus", "{f}/short.txt"],
        r"corpus \S+ has 23 characters, fewer than one window of 40 plus its target; use a longer corpus or a "
        r"smaller --window",
    ),
    "corpus too small for the held-out tail": (
        "char",
        ["--corpus", "{f}/text.txt", "--window", "460"],
        r"the held-out tail of corpus \S+ \(460 characters\) is shorter than one window of 460 plus its target; "
        r"use a longer corpus, a smaller --window, or change --valid-fraction",
    ),
    "char data-dir missing": (
        "char",
        ["--data-dir", "{f}/nope"],
        r"--data-dir \S+/nope does not exist; pass --data-dir with a folder that holds nietzsche\.txt, .*",
    ),
    "char data-dir a file": (
        "char",
        ["--data-dir", "{f}/text.txt"],
        r"--data-dir \S+/text\.txt is a file, not a folder; .*",
    ),
    "char data-dir without the corpus": (
        "char",
        ["--data-dir", "{f}/folder"],
        r"\S+/folder lacks nietzsche\.txt \(nietzsche\); pass --data-dir with a folder that holds nietzsche\.txt, .*",
    ),
}


@pytest.mark.parametrize("job, argv, expected", FILE_CASES.values(), ids=FILE_CASES.keys())
def test_a_bad_file_or_folder_is_one_line(job, argv, expected, files, capsys):
    check_refused(job, argv, expected, files, capsys)


def test_lstm_data_dir_is_named_when_it_is_a_file(files, capsys, monkeypatch):
    monkeypatch.setenv("LSTM_DATA_DIR", str(files / "text.txt"))
    check_refused("ptb", [], r"\$LSTM_DATA_DIR \S+/text\.txt is a file, not a folder; .*", files, capsys)


def test_read_text_drops_a_byte_order_mark_and_reports_an_unreadable_file(tmp_path, monkeypatch):
    path = tmp_path / "bom.txt"
    path.write_bytes(b"\xef\xbb\xbfword\r\n")
    assert user_files.read_text(path, what="x", fix="y") == "word\n"

    def denied(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "read_text", denied)
    with pytest.raises(UserError, match=r"^cannot read --text \S+ \(Permission denied\); check its permissions, or y$"):
        user_files.read_text(path, what="--text", fix="y")


GPU_FIX = "needs --gpu (without it the workers use no GPU); add --gpu, or drop --gpus-per-worker"

FLAG_CASES = {
    "gpus-per-worker without gpu": ("rectangle", ["--gpus-per-worker", "0.5"], f"--gpus-per-worker {GPU_FIX}"),
    "rectangle data-dir": (
        "rectangle",
        ["--data-dir", "{f}/folder"],
        "--data-dir has no effect on the rectangle task, which generates its shapes; drop --data-dir",
    ),
    "mixtures without mdn": (
        "rectangle",
        ["--mixtures", "3"],
        "--mixtures needs --head mdn (the dense head has no mixtures); add --head mdn, or drop --mixtures",
    ),
    "resume with print-config": (
        "rectangle",
        ["--resume", "--name", "r", "--print-config"],
        "--resume has no effect with --print-config, which prints the config and exits; drop one of them",
    ),
    "resume without name": ("ptb", ["--resume"], "--resume needs the --name of the run to continue; add --name NAME"),
    "corpus-name with corpus": (
        "char",
        ["--corpus", "{f}/text.txt", "--corpus-name", "tinyshakespeare"],
        "--corpus-name has no effect with --corpus {f}/text.txt (the text is that file); drop --corpus-name, "
        "or --corpus to train on a downloaded corpus",
    ),
    "data-dir with corpus from a file": (
        "char",
        ["--config-file", "{f}/char_both.json", "--data-dir", "{f}/folder"],
        "--data-dir has no effect with --corpus {f}/text.txt (the text is that file); drop --data-dir, "
        "or --corpus to train on a downloaded corpus",
    ),
    "diversities without samples": (
        "char",
        ["--sample-length", "0", "--diversities", "0.5"],
        "--diversities has no effect with --sample-length 0 (no samples are drawn); drop --diversities, "
        "or pass a positive --sample-length",
    ),
    "nonmono with sgd": (
        "ptb",
        ["--nonmono", "3"],
        "--nonmono is NT-ASGD's trigger and has no effect with --optimizer sgd; add --optimizer nt-asgd, "
        "or drop --nonmono",
    ),
    "lr-decay that never decays": (
        "ptb",
        ["--config", "small", "--lr-decay", "0.9", "--max-epoch", "13"],
        "--lr-decay has no effect when --max-epoch (13) >= --max-max-epoch (13): the learning rate never "
        "decays; lower --max-epoch, or drop --lr-decay",
    ),
    "tune resume with a search flag": (
        "tune",
        ["--resume", "--name", "s", "--num-samples", "3"],
        "--resume continues the search --name with the settings it was started with, so --num-samples would "
        "have no effect; drop it (or start a new search without --resume)",
    ),
    "tune resume with several": (
        "tune",
        ["--resume", "--name", "s", "--task", "rectangle", "--gpu", "--max-fail=1"],
        "--resume continues the search --name with the settings it was started with, so --gpu, --max-failures, "
        "--task would have no effect; drop them (or start a new search without --resume)",
    ),
    "tune synch with asha": (
        "tune",
        ["--synch"],
        "--synch is for --scheduler pbt and has no effect with --scheduler asha; add --scheduler pbt, or drop --synch",
    ),
    "tune perturbation-interval with asha": (
        "tune",
        ["--scheduler", "asha", "--perturbation-interval", "2"],
        "--perturbation-interval is for --scheduler pbt and has no effect with --scheduler asha; add --scheduler "
        "pbt, or drop --perturbation-interval",
    ),
    "tune grace-period with pbt": (
        "tune",
        ["--scheduler", "pbt", "--grace-period", "2", "--space", "learning_rate=log:0.1:1"],
        "--grace-period is for --scheduler asha and has no effect with --scheduler pbt; add --scheduler asha, "
        "or drop --grace-period",
    ),
    "tune reduction-factor with pbt": (
        "tune",
        ["--reduction-factor=3", "--scheduler", "pbt"],
        "--reduction-factor is for --scheduler asha and has no effect with --scheduler pbt; add --scheduler asha, "
        "or drop --reduction-factor",
    ),
    "tune gpus-per-worker without gpu": ("tune", ["--gpus-per=0.25"], f"--gpus-per-worker {GPU_FIX}"),
    "tune rectangle data-dir": (
        "tune",
        ["--task", "rectangle", "--data-dir", "{f}/folder"],
        "--data-dir has no effect on the rectangle task, which generates its shapes; drop --data-dir",
    ),
    "tune train-fraction searched too": (
        "tune",
        ["--train-fraction", "0.1", "--space", "train_fraction=0.2:0.5"],
        "--train-fraction has no effect on the trials: --space sets train_fraction too; drop --train-fraction, "
        "or the --space entry of train_fraction",
    ),
    "tune max-epochs pinned otherwise": (
        "tune",
        ["--max-epochs", "2", "--space", "max_max_epoch=3"],
        "--max-epochs has no effect on the trials: --space sets max_max_epoch too; drop --max-epochs, "
        "or the --space entry of max_max_epoch",
    ),
}


@pytest.mark.parametrize("job, argv, expected", FLAG_CASES.values(), ids=FLAG_CASES.keys())
def test_a_flag_without_effect_is_refused(job, argv, expected, files, capsys):
    check_refused(job, argv, expected, files, capsys)


@pytest.mark.parametrize(
    "job, argv",
    [
        ("rectangle", ["--config", "mdn", "--mixtures", "3"]),
        ("rectangle", ["--gpu", "--gpus-per-worker", "0.5"]),
        ("ptb", ["--config", "awd", "--nonmono", "3"]),
        ("ptb", ["--config", "small", "--lr-decay", "0.9", "--max-epoch", "12"]),
        ("char", ["--corpus", "{f}/text.txt", "--diversities", "0.5"]),
        # a config file's corpus_name beside its corpus is the file's, not a flag: not refused
        ("char", ["--config-file", "{f}/char_both.json"]),
    ],
)
def test_the_same_flags_where_they_have_an_effect_are_accepted(job, argv, files, capsys):
    status, lines = run_job(job, [a.format(f=files) for a in argv] + ["--print-config"], capsys)
    assert (status, lines) == (0, [])


@pytest.mark.parametrize(
    "argv",
    [
        ["--resume", "--name", "s", "--storage-path", "/somewhere"],
        ["--scheduler", "pbt", "--synch", "--perturbation-interval", "2"],
        ["--grace-period", "2", "--reduction-factor", "3"],
        ["--gpu", "--gpus-per-worker", "0.5"],
    ],
)
def test_search_flags_that_have_an_effect_pass_the_check(argv):
    args, given = tune_cli.parse_args(argv)
    tune_cli.check_given(args, given)


def test_a_pinned_budget_field_equal_to_the_flag_is_accepted(tmp_path):
    argv = ["--max-epochs", "2", "--space", "max_max_epoch=2", "keep_prob=0.3:1", "--storage-path", str(tmp_path)]
    args, given = tune_cli.parse_args(argv)
    assert tune_cli.spec_from_args(args, given).max_epochs == 2


def test_options_given_sees_every_spelling_and_keeps_the_defaults():
    parser = argparse.ArgumentParser()
    parser.add_argument("--grace-period", type=int, default=1)
    parser.add_argument("--synch", action="store_true")
    parser.add_argument("--space", nargs="+", action="extend", default=[])
    assert cfg.options_given(parser, ["--grace=1", "--space", "a=1"]) == {"grace_period", "space"}
    assert cfg.options_given(parser, []) == set()
    assert vars(parser.parse_args([])) == {"grace_period": 1, "synch": False, "space": []}


def test_help_says_what_a_flag_needs(capsys):
    with pytest.raises(SystemExit):
        JOBS["rectangle"](["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--gpus-per-worker FLOAT needs --gpu" in text
    assert "--mixtures INT needs --head mdn" in text
