"""The Python API (lstm.train, tune.search, lstm.load): docs/api.md's examples run as written,
a call joins the caller's Ray and leaves it running, bad input is the command line's line, the
loaded model scores as `jobs/ptb.py score` does, and a search returns what its results.md names."""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import re
import signal
import threading
import time
from pathlib import Path

import pytest
import ray
from conftest import REPO, TEST_CPUS_PER_WORKER, own_lines

import lstm
import tune
from lstm import api
from lstm import config as cfg
from lstm.cli import train_main
from lstm.errors import UserError, run_cli
from lstm.tasks.ptb_config import PRESETS, PTBConfig


def doc_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


@pytest.fixture(scope="module")
def docs_run(ray_session, ptb_dir, tmp_path_factory, one_torch_thread) -> tuple[dict, str, Path, tuple[str, str]]:
    """docs/api.md, block after block in one namespace, as a notebook runs them (the doc's
    `ray.init()` finds the suite's instance already up): (the namespace, what it printed,
    the storage folder, the address of the caller's Ray before and after the blocks)."""
    storage = tmp_path_factory.mktemp("api-docs")
    printed = io.StringIO()
    before = ray.get_runtime_context().gcs_address
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(printed):
        mp.setenv("LSTM_RAY_STORAGE", str(storage))
        mp.setenv("LSTM_DATA_DIR", str(ptb_dir))
        mp.setattr(ray, "init", lambda *a, **k: None)
        # one CPU a worker, as the suite's other runs (conftest.TEST_CPUS_PER_WORKER)
        mp.setattr(lstm, "train", functools.partial(lstm.train, cpus_per_worker=TEST_CPUS_PER_WORKER))
        namespace: dict = {}
        for block in doc_blocks(REPO / "docs" / "api.md"):
            exec(compile(block, "docs/api.md", "exec"), namespace)  # noqa: S102 - the doc's own code
    after = ray.get_runtime_context().gcs_address if ray.is_initialized() else ""
    return namespace, printed.getvalue(), storage, (before, after)


def test_the_docs_examples_run_as_written(docs_run):
    namespace, printed, storage, _ = docs_run
    assert "--gpus-per-worker needs --gpu" in printed
    run, result, model = namespace["run"], namespace["result"], namespace["model"]
    assert run.final == run.history[-1] and run.run_dir == str(storage / "api-ptb")
    assert result.best_config is not None and result.best_trial == result.rows[0]["trial"]
    assert len(namespace["drawings"]) == 2 and namespace["drawings"][0][0] == [0.0, 0.0]
    assert model.score("the company said it expects to report a loss")["tokens"] == 8


def test_train_joins_the_callers_ray_and_leaves_it_running(docs_run):
    """The doc's calls (lstm.train, tune.search) ran on the instance the caller had up, which
    is still up, the same one, after them."""
    namespace, _, _, (before, after) = docs_run
    assert after == before
    run = namespace["shapes"]  # lstm.train("rectangle", ...)
    assert isinstance(run, lstm.Run) and run.checkpoint.startswith(run.run_dir + "/checkpoint_")
    assert json.loads(Path(run.results_path).read_text())["final"] == run.final


def test_every_form_of_config_gives_the_same_config(tmp_path):
    task = api.get_task("ptb")
    file = tmp_path / "best_config.json"
    file.write_text(json.dumps({"task": "ptb", **PRESETS["test"], "hidden_size": 7}))
    forms = ["test", {**PRESETS["test"]}, {"preset": "test"}, cfg.build(PTBConfig, PRESETS["test"]), str(file), file]
    configs = [
        api.resolve_run(
            task,
            **dict(zip(("preset", "config_file", "values"), api.config_source(task, f), strict=True)),
            overrides={"hidden_size": 7},
        )[0]
        for f in forms
    ]
    assert all(c == configs[0] for c in configs) and configs[0].hidden_size == 7


def command_line_error(task: str, argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit):
        run_cli(lambda a: train_main(task, a), argv)
    (line,) = own_lines(capsys.readouterr().err)  # Ray's forwarded lines of other runs' actors aside
    return line.removeprefix("error: ")


@pytest.mark.parametrize(
    "keywords, argv",
    [
        ({"gpus_per_worker": 0.5}, ["--gpus-per-worker", "0.5"]),
        ({"hidden_size": -1}, ["--hidden-size", "-1"]),
        ({"config": "nope"}, ["--config", "nope"]),
        ({"name": "../x"}, ["--name", "../x"]),
        ({"resume": True}, ["--resume"]),
        ({"precision": "fp8"}, ["--precision", "fp8"]),
    ],
)
def test_bad_input_raises_the_command_lines_line(keywords, argv, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("LSTM_RAY_STORAGE", str(tmp_path))
    with pytest.raises(UserError) as info:
        lstm.train("rectangle", **keywords)
    assert str(info.value) == command_line_error("rectangle", argv, capsys)
    assert list(tmp_path.iterdir()) == []


def test_an_unknown_keyword_names_the_known_ones():
    with pytest.raises(UserError, match=r"unknown option\(s\) colour for task rectangle; .*hidden_size.*num_workers"):
        lstm.train("rectangle", colour="red")
    with pytest.raises(UserError, match=r"unknown option\(s\) colour for tune.search"):
        tune.search("rectangle", colour="red")


def test_a_search_returns_the_best_config_its_results_md_names(docs_run):
    result = docs_run[0]["result"]  # the doc's tune.search over hidden_size and learning_rate, 2 trials
    markdown = Path(result.files["markdown"]).read_text()
    best_row = next(line for line in markdown.splitlines() if line.startswith("| 1 |"))
    assert f"| {result.best_trial} |" in best_row
    assert result.best_config == json.loads(Path(result.files["best_config"]).read_text())
    assert result.best_config["hidden_size"] == result.rows[0]["hidden_size"]
    assert result.best_checkpoint.startswith(result.folder) and "checkpoint_" in result.best_checkpoint
    assert list(result.dataframe()["trial"]) == [row["trial"] for row in result.rows]
    assert len(result.rows) == 2


def test_a_loaded_model_scores_and_generates_as_the_command_line_does(docs_run, tmp_path, capsys):
    from test_ptb_score import run_job

    result = docs_run[0]["run"]
    text = "the company said it expects to report a loss for the third quarter\nshares fell"
    (tmp_path / "text.txt").write_text(text)
    status, out, _ = run_job(["score", "--checkpoint", result.run_dir, "--text", str(tmp_path / "text.txt")], capsys)
    assert status == 0
    command = json.loads(out.strip().splitlines()[-1])
    model = lstm.load(result.run_dir)
    assert isinstance(model, lstm.Model) and model.task == "ptb"
    scored = model.score(text)
    assert {k: scored[k] for k in ("ppl", "loss", "tokens", "words", "unk")} == {
        k: command[k] for k in ("ppl", "loss", "tokens", "words", "unk")
    }
    argv = ["generate", "--checkpoint", result.checkpoint, "--prompt", "the company", "--length", "12", "--seed", "3"]
    status, out, _ = run_job(argv, capsys)
    assert status == 0 and model.generate("the company", length=12, seed=3) in out


def test_load_refuses_what_is_not_a_run_in_one_line(tmp_path):
    with pytest.raises(UserError, match="does not exist; pass a run folder or one of its checkpoint_\\* folders"):
        lstm.load(tmp_path / "nothing")
    with pytest.raises(UserError, match="holds no checkpoint"):
        lstm.load(tmp_path)


def write_run(folder: Path, task: str, config: cfg.TaskConfig, model, meta: dict) -> Path:
    """A run folder with one checkpoint of ``model``, written as the loop writes it (no Ray)."""
    import torch

    from lstm import checkpoint as ckpt

    (folder / "checkpoint_000000").mkdir(parents=True)
    state = {"task": task, "config": cfg.to_dict(config), "epoch": 1, "meta": meta, "history": []}
    ckpt.save(folder / "checkpoint_000000", model, torch.optim.SGD(model.parameters(), lr=0.1), state)
    return folder


def test_a_loaded_rectangle_run_draws_and_a_loaded_char_run_samples_as_their_models_do(tmp_path):
    import torch

    from lstm.data.vocab import Vocabulary
    from lstm.models.char import CharLSTM
    from lstm.tasks import char_trained, rectangle_trained
    from lstm.tasks.char import CharConfig, CharTask
    from lstm.tasks.rectangle import RectangleTask, ShapeConfig, points_per_shape

    shape_config = cfg.build(ShapeConfig, RectangleTask.presets["test"])
    torch.manual_seed(5)  # weights no fresh model of the default seed has
    drawer = RectangleTask(shape_config).build_model().eval()
    shapes = lstm.load(write_run(tmp_path / "shapes", "rectangle", shape_config, drawer, {}))
    assert shapes.task == "rectangle" and shapes.config == shape_config
    mean_shapes = shapes.draw(2, sample=False)
    assert mean_shapes == rectangle_trained.draw(rectangle_trained.TrainedShapes(drawer, shape_config), 2, sample=False)
    assert len(mean_shapes[0]) == points_per_shape(shape_config)

    char_config = cfg.build(CharConfig, {**CharTask.presets["test"], "hidden_size": 8})
    vocab = Vocabulary.sorted_set("abc de")
    torch.manual_seed(5)
    writer = CharLSTM(len(vocab), 8).eval()
    text = lstm.load(write_run(tmp_path / "chars", "char", char_config, writer, {"vocab": list(vocab.tokens)}))
    assert text.task == "char"
    sampled = text.sample("a b", temperature=0.7, length=20, seed=3)
    expected = char_trained.TrainedCharLM(writer, vocab, char_config)
    assert sampled == char_trained.sample(expected, "a b", temperature=0.7, length=20, seed=3)
    assert len(sampled) == 20 and set(sampled) <= set(vocab.tokens)


def test_the_stop_button_ends_the_run_and_it_resumes(ray_session, tmp_path):
    """Ctrl-C (a notebook's stop button sends SIGINT) while the worker waits at epoch 2: the run
    stops with KeyboardInterrupt, releases its folder and leaves Python's own SIGINT handler in
    place; `resume=True` continues it from epoch 1's checkpoint."""
    from hooks import PauseOnce

    from lstm.trainer import fit

    marker = str(tmp_path / "paused")
    settings = cfg.RunSettings(storage_path=str(tmp_path), name="stopped", max_failures=0)
    config = cfg.build(
        api.get_task("rectangle").config_class, {**api.get_task("rectangle").presets["test"], "epochs": 3}
    )

    def press_stop() -> None:  # once the worker waits at epoch 2 (about 15 s in; the limit only ends a hung test)
        deadline = time.monotonic() + 300
        while not Path(marker + ".ready").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        os.kill(os.getpid(), signal.SIGINT)

    before = signal.getsignal(signal.SIGINT)
    threading.Thread(target=press_stop, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        fit("rectangle", config, settings, hooks=[PauseOnce(epoch=2, step=1, marker=marker, rank=0)])
    assert signal.getsignal(signal.SIGINT) is before
    assert not (tmp_path / "stopped" / ".writers").exists()
    run = lstm.train("rectangle", "test", epochs=3, storage_path=str(tmp_path), name="stopped", resume=True)
    assert [e["epoch"] for e in run.history] == [1, 2, 3]
