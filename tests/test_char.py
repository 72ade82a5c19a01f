"""The char task: the Keras example's windows and sampling, vocabulary in checkpoints, bad
input, and a short real run (1 Ray Train worker) that learns."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, SHARED_DATA, own_lines

from lstm import checkpoint as ckpt
from lstm import config as cfg
from lstm.data import text as textdata
from lstm.data.vocab import Vocabulary
from lstm.errors import UserError, run_cli
from lstm.models.char import CharLSTM, sample_with_temperature
from lstm.task import WorkerInfo
from lstm.tasks.char import CharConfig, CharTask
from lstm.tasks.char import corpus_of as char_corpus_of
from lstm.tasks.char_trained import sample_from_checkpoint
from lstm.trainer import fit

# As conftest's char_dir fixture (which is per test; the trained run is shared by a module).
SHARED_CHAR = SHARED_DATA / "char"
SMALL = "the quick brown fox jumps over the lazy dog.\nthe end; or is it?\n" * 3


def keras_windows(text: str, maxlen: int, step: int) -> tuple[list[str], list[str]]:
    """The example's construction, verbatim."""
    sentences, next_chars = [], []
    for i in range(0, len(text) - maxlen, step):
        sentences.append(text[i : i + maxlen])
        next_chars.append(text[i + maxlen])
    return sentences, next_chars


def decoded(vocab: Vocabulary, windows: textdata.Windows) -> tuple[list[str], list[str]]:
    x, y = windows.batch(slice(None))
    return ["".join(vocab.decode(row.tolist())) for row in x], ["".join(vocab.decode([t])) for t in y.tolist()]


# --------------------------------------------------------------------------- windows


@pytest.mark.parametrize("maxlen,step", [(40, 3), (5, 1), (7, 4)])
def test_windows_and_targets_match_the_keras_construction(maxlen, step):
    vocab = Vocabulary.sorted_set(SMALL)
    assert list(vocab.tokens) == sorted(set(SMALL))
    codes = torch.from_numpy(vocab.encode(SMALL))
    windows = textdata.Windows(codes, textdata.window_starts(0, len(SMALL), maxlen, step), maxlen)
    assert decoded(vocab, windows) == keras_windows(SMALL, maxlen, step)


def test_held_out_tail_is_the_last_tenth_and_no_window_crosses_it():
    corpus = textdata.build_corpus(SMALL, window=5, step=2, valid_fraction=0.1)
    split = int(len(SMALL) * 0.9)
    assert corpus.split == split
    assert decoded(corpus.vocab, corpus.train) == keras_windows(SMALL[:split], 5, 2)
    valid_x, valid_y = decoded(corpus.vocab, corpus.valid)
    assert (valid_x, valid_y) == keras_windows(SMALL[split:], 5, 2)
    assert corpus.train.starts.max() + 5 < split <= corpus.valid.starts.min()


def test_epoch_shards_are_equal_disjoint_and_reshuffled():
    shards = [textdata.epoch_shard(100, (0, 1), r, 3) for r in range(3)]
    assert [len(s) for s in shards] == [33, 33, 33]
    assert len(set(np.concatenate(shards))) == 99
    assert not np.array_equal(textdata.epoch_shard(100, (0, 2), 0, 3), shards[0])
    assert np.array_equal(textdata.epoch_shard(100, (0, 1), 0, 3), shards[0])


def test_every_rank_gets_the_same_number_of_batches(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text(SMALL * 4)
    config = CharConfig(corpus=str(corpus), window=5, step=1, batch_size=10)
    text = CharTask.read_data(config, None)
    counts, seen = [], []
    for rank in range(3):
        task = CharTask(config, WorkerInfo(rank=rank, world_size=3))
        task.setup(text)
        batches = list(task.train_batches(0))
        assert all(x.shape == (len(y), 5) for x, y in batches)
        assert max(len(y) for _, y in batches) == 10 // 3
        counts.append(len(batches))
        assert counts[-1] == task.num_train_batches()
        seen.append(sum(len(y) for _, y in batches))
    assert len(set(counts)) == 1 and len(set(seen)) == 1
    assert sum(seen) > len(task.data.corpus.train) - 3


# --------------------------------------------------------------------------- sampling


def test_very_low_temperature_returns_the_argmax():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(500, 30, generator=gen) * 2
    drawn = sample_with_temperature(logits, 1e-4, torch.Generator().manual_seed(1))
    assert torch.equal(drawn, logits.argmax(-1))


@pytest.mark.parametrize("temperature", [0.5, 1.0, 1.5])
def test_temperature_sampling_follows_the_examples_formula(temperature):
    """Keras: p' = exp(log(p) / T) / sum(...): the frequencies of many draws match it."""
    probs = torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64)
    n = 20_000
    drawn = sample_with_temperature(probs.log().expand(n, 3), temperature, torch.Generator().manual_seed(0))
    freq = torch.bincount(drawn, minlength=3).double() / n
    expected = probs ** (1 / temperature) / (probs ** (1 / temperature)).sum()
    assert torch.allclose(freq, expected, atol=0.015), (freq, expected)


def test_generate_slides_a_window_and_is_greedy_when_cold():
    torch.manual_seed(0)
    model = CharLSTM(vocab_size=7, hidden_size=16)
    seed = torch.randint(0, 7, (1, 6))
    out = model.generate(seed, [1e-6], 10, window=4, generator=torch.Generator().manual_seed(0))
    context, expected = seed[0].tolist(), []
    with torch.no_grad():
        for _ in range(10):
            nxt = int(model(torch.tensor([context[-4:]])).argmax())
            expected.append(nxt)
            context.append(nxt)
    assert out[0].tolist() == expected


# --------------------------------------------------------------------------- bad input


def load_job():
    """jobs/char.py as a module (to run its CLI in-process, with no interpreter start-up)."""
    spec = importlib.util.spec_from_file_location("char_job", REPO / "jobs" / "char.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write(tmp_path: Path, text: str, name: str = "corpus.txt") -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def run_settings(tmp_path: Path, name: str) -> cfg.RunSettings:
    return cfg.RunSettings(storage_path=str(tmp_path / "runs"), name=name, max_failures=0)


@pytest.mark.parametrize(
    "content,kw,message",
    [
        (None, {}, "does not exist"),
        ("", {}, "is empty"),
        ("too short", {}, "fewer than one window of 40"),
        ("x" * 100, {"window": 20}, "held-out tail"),
        ("x" * 100, {"window": 20, "valid_fraction": 0.95}, "training head"),
    ],
)
def test_unusable_corpus_is_a_one_line_error_before_any_worker_starts(tmp_path, content, kw, message):
    path = str(tmp_path / "missing.txt") if content is None else write(tmp_path, content)
    with pytest.raises(UserError, match=message) as info:
        fit("char", CharConfig(corpus=path, **kw), run_settings(tmp_path, "bad"))
    assert "\n" not in str(info.value)
    assert not (tmp_path / "runs" / "bad").exists() or not any((tmp_path / "runs" / "bad").iterdir())


@pytest.mark.parametrize(
    "field,value",
    [
        ("window", 0),
        ("step", -3),
        ("hidden_size", 0),
        ("batch_size", 0),
        ("epochs", 0),
        ("max_chars", -1),
        ("valid_fraction", 0.0),
        ("learning_rate", -0.01),
        ("diversities", "0.2,0"),
    ],
)
def test_non_positive_sizes_are_refused(field, value):
    flag = "--" + field.replace("_", "-")
    with pytest.raises(UserError, match=flag):
        cfg.build(CharConfig, {field: value})


def test_unknown_corpus_name_and_too_many_workers_are_refused(tmp_path):
    with pytest.raises(UserError, match="choose one of nietzsche, tinyshakespeare"):
        cfg.build(CharConfig, {"corpus_name": "hamlet"})
    config = CharConfig(corpus=write(tmp_path, SMALL * 3), window=5, batch_size=2)
    with pytest.raises(UserError, match="smaller than the 4 workers"):
        CharTask.check(config, CharTask.read_data(config, None), 4)


def test_relative_corpus_path_is_resolved_where_the_config_is_built(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert CharConfig(corpus="a/b.txt").corpus == str(tmp_path / "a" / "b.txt")


def test_job_prints_one_line_error_without_traceback(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(load_job().main, ["--corpus", str(tmp_path / "nope.txt"), "--storage-path", str(tmp_path)])
    assert exit_info.value.code == 2
    err = "\n".join(own_lines(capsys.readouterr().err))  # Ray's forwarded lines of other runs aside
    assert err.startswith("error: corpus file") and "does not exist" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


# --------------------------------------------------------------------------- a real run

LEARN = dict(max_chars=30_000, hidden_size=32, batch_size=32, epochs=3, sample_length=50, seed=0)


@pytest.fixture(scope="module")
def trained(ray_session, tmp_path_factory):
    """One short seeded run on the first 30,000 characters of Nietzsche (1 worker)."""
    char_dir = SHARED_CHAR
    if not (char_dir / "nietzsche.txt").is_file():
        pytest.skip(f"char corpora not found at {char_dir}")
    storage = tmp_path_factory.mktemp("char_runs")
    config = CharConfig(corpus=str(char_dir / "nietzsche.txt"), **LEARN)
    settings = cfg.RunSettings(storage_path=str(storage), name="learn", max_failures=0, cpus_per_worker=1)
    result = fit("char", config, settings)
    return config, result


def unigram_bpc(corpus: textdata.CharCorpus) -> float:
    """Bits per char on the held-out tail of the best context-free model (train frequencies)."""
    counts = Counter(corpus.text[: corpus.split])
    total = sum(counts.values())
    tail = corpus.text[corpus.split + corpus.train.window :]
    return -sum(math.log2(counts[c] / total) for c in tail) / len(tail)


def test_char_model_learns(trained):
    config, result = trained
    corpus = textdata.build_corpus(
        textdata.prepare(textdata.read_corpus(config.corpus), max_chars=config.max_chars),
        window=config.window,
        step=config.step,
        valid_fraction=config.valid_fraction,
    )
    torch.manual_seed(config.seed)
    untrained = CharLSTM(len(corpus.vocab), config.hidden_size)
    with torch.no_grad():
        x, y = corpus.valid.batch(slice(None))
        untrained_bpc = float(torch.nn.functional.cross_entropy(untrained(x), y)) / math.log(2)
    valid = [e["valid_bpc"] for e in result.history]
    # Measured (seed 0): untrained 5.65 (~log2 of 50 chars), unigram 4.36; the run: 3.55, 3.33, 3.20.
    assert untrained_bpc > 5.3
    assert valid[-1] < untrained_bpc - 2.0
    assert valid[-1] < unigram_bpc(corpus) - 0.7, "the model must use context, not only char frequencies"
    assert valid[-1] < valid[0]
    assert [e["epoch"] for e in result.history] == [1, 2, 3]

    # Each epoch printed the example's four samples; results.json and the learning curve exist.
    extras = result.history[-1]["extras"]
    assert [s["diversity"] for s in extras["samples"]] == [0.2, 0.5, 1.0, 1.2]
    assert all(len(s["text"]) == 50 and not corpus.vocab.missing(s["text"]) for s in extras["samples"])
    assert len(extras["seed_text"]) == 40 and extras["seed_text"] in corpus.text
    saved = json.loads(Path(result.results_path).read_text())
    assert saved["epochs"][-1]["valid_bpc"] == pytest.approx(valid[-1])
    assert [Path(p).name for p in result.plots] == ["learning_curve.png"]
    assert Path(result.plots[0]).stat().st_size > 5000


def test_vocabulary_round_trips_through_the_checkpoint(trained):
    config, result = trained
    latest = Path(ckpt.latest(result.run_dir))
    state = json.loads((latest / "state.json").read_text())
    text = textdata.prepare(textdata.read_corpus(config.corpus), max_chars=config.max_chars)
    assert state["meta"]["vocab"] == sorted(set(text))

    # Sampling needs only the checkpoint; a run folder and its checkpoint folder are the same.
    a = sample_from_checkpoint(result.run_dir, "The Meaning of", temperature=0.5, length=60, seed=3)
    b = sample_from_checkpoint(latest, "the meaning of", temperature=0.5, length=60, seed=3)
    assert a == b and len(a) == 60 and set(a) <= set(state["meta"]["vocab"])
    cold = sample_from_checkpoint(latest, "the meaning of", temperature=1e-6, length=30, seed=1)
    assert cold == sample_from_checkpoint(latest, "the meaning of", temperature=1e-6, length=30, seed=2)

    with pytest.raises(UserError, match=r"--seed-text has 2 character\(s\).*'~'.*'é'"):
        sample_from_checkpoint(latest, "café ~", temperature=0.5, length=10)
    with pytest.raises(UserError, match="--temperature must be positive"):
        sample_from_checkpoint(latest, "the", temperature=0.0, length=10)
    with pytest.raises(UserError, match="--length must be positive"):
        sample_from_checkpoint(latest, "the", temperature=0.5, length=0)
    with pytest.raises(UserError, match="does not exist"):
        sample_from_checkpoint(Path(result.run_dir) / "nope", "the")

    # Resuming against another corpus' vocabulary is refused (the loop calls this on resume).
    other = CharConfig(corpus=config.corpus, max_chars=2_000, window=10)
    task = CharTask(other)
    task.setup(CharTask.read_data(other, None))
    with pytest.raises(UserError, match="vocabulary"):
        task.check_checkpoint(state["meta"])
    task.check_checkpoint(task.checkpoint_meta())  # its own vocabulary is fine


def test_sampling_skips_a_damaged_newest_checkpoint_with_one_line(trained, tmp_path, capsys):
    _, result = trained
    run = shutil.copytree(result.run_dir, tmp_path / "run")
    newest, older = sorted((p for p in run.glob("checkpoint_*") if p.is_dir()), reverse=True)
    size = (newest / "model.pt").stat().st_size
    (newest / "model.pt").write_bytes((newest / "model.pt").read_bytes()[:100])
    text = sample_from_checkpoint(run, "the meaning of", temperature=0.5, length=30, seed=3)
    assert text == sample_from_checkpoint(older, "the meaning of", temperature=0.5, length=30, seed=3)
    assert own_lines(capsys.readouterr().err) == [
        f"[char] skipped {newest.name}: model.pt is 100 bytes, the manifest says {size}; using {older.name}"
    ]
    with pytest.raises(UserError, match=rf"^checkpoint \S+/{newest.name} is damaged: model\.pt is 100 bytes, the "):
        sample_from_checkpoint(newest, "the")


def test_sample_command_prints_seed_and_continuation(trained, capsys):
    _, result = trained
    job = load_job()
    args = ["sample", "--checkpoint", result.run_dir]
    assert job.main(args + ["--seed-text", "the will to", "--length", "25", "--temperature", "0.2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("the will to") and len(out.rstrip("\n")) >= len("the will to") + 20
    with pytest.raises(SystemExit) as exit_info:
        run_cli(job.main, args + ["--seed-text", "emoji \U0001f600"])
    assert exit_info.value.code == 2
    err = "\n".join(own_lines(capsys.readouterr().err))
    assert err.startswith("error: --seed-text has 1 character(s)") and "\U0001f600" in err
    assert len(err.strip().splitlines()) == 1


def test_the_corpus_flags_choose_the_text_and_its_case(char_dir, capsys):
    """`--corpus-name` picks the corpus from `--data-dir`; `--no-lowercase` keeps its capitals
    in the vocabulary (the default lower-cases, as the Keras example does). The flags reach the
    task's data as the command line resolves them."""
    from lstm.cli import build_parser, resolve_configs

    def corpus(*flags: str) -> textdata.CharCorpus:
        config, settings = resolve_configs(
            CharTask, build_parser(CharTask).parse_args(["--data-dir", str(char_dir), *flags])
        )
        return char_corpus_of(config, CharTask.read_data(config, settings.data_dir))

    shakespeare = (char_dir / "tinyshakespeare.txt").read_text()
    lowered = corpus("--corpus-name", "tinyshakespeare")
    assert lowered.text == shakespeare.lower()[: len(lowered.text)] and "F" not in lowered.vocab.ids
    kept = corpus("--corpus-name", "tinyshakespeare", "--no-lowercase")
    assert kept.text.startswith("First Citizen") and {"F", "C"} <= set(kept.vocab.ids)
    assert corpus().text.startswith((char_dir / "nietzsche.txt").read_text().lower()[:100])
