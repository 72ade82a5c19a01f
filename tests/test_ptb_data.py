"""PTB reader, vocabulary and producer batching reproduce the TensorFlow tutorial; bad data and
bad configs stop on the driver with one-line errors."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import QUICK_COMMAND_S, REPO

from lstm import config as cfg
from lstm.data import ptb
from lstm.errors import UserError
from lstm.tasks.ptb import PTBTask
from lstm.tasks.ptb_config import PRESETS, PTBConfig

TRAIN = " the cat sat on the mat \n the dog sat \n a cat ran \n"
VALID = " the cat ran \n a zebra sat \n"
TEST = " the dog ran \n"


def write_corpus(folder: Path, train: str = TRAIN, valid: str = VALID, test: str = TEST) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for split, text in (("train", train), ("valid", valid), ("test", test)):
        (folder / f"ptb.{split}.txt").write_text(text)
    return folder


# --------------------------------------------------------------------------- the tutorial, literally


def tutorial_read_words(text: str) -> list[str]:
    return text.replace("\n", "<eos>").split()  # reader._read_words


def tutorial_build_vocab(words: list[str]) -> dict[str, int]:  # reader._build_vocab
    count_pairs = sorted(Counter(words).items(), key=lambda x: (-x[1], x[0]))
    return {w: i for i, (w, _) in enumerate(count_pairs)}


def tutorial_producer(raw: np.ndarray, batch_size: int, num_steps: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """reader.ptb_producer without TensorFlow: the batches of one epoch, in order."""
    data_len = len(raw)
    batch_len = data_len // batch_size
    data = np.reshape(raw[0 : batch_size * batch_len], [batch_size, batch_len])
    epoch_size = (batch_len - 1) // num_steps
    return [
        (data[:, i * num_steps : (i + 1) * num_steps], data[:, i * num_steps + 1 : (i + 1) * num_steps + 1])
        for i in range(epoch_size)
    ]


# --------------------------------------------------------------------------- reader and vocabulary


def test_newlines_become_eos_and_words_split_on_whitespace():
    assert ptb.tokenize(" a  b\tc \n d \n") == ["a", "b", "c", "<eos>", "d", "<eos>"]


def test_vocabulary_is_ordered_by_count_then_word(tmp_path):
    corpus = ptb.load_corpus(write_corpus(tmp_path))
    words = ptb.tokenize(TRAIN)
    assert corpus.vocab.ids == tutorial_build_vocab(words)
    # counts: <eos> 3, the 3, cat 2, sat 2, then singletons alphabetically
    assert corpus.vocab.tokens == ("<eos>", "the", "cat", "sat", "a", "dog", "mat", "on", "ran")
    assert corpus.train.tolist() == [corpus.vocab.ids[w] for w in words]
    # valid/test use the training vocabulary; a word it lacks ("zebra") is dropped, as in the tutorial
    assert corpus.vocab.decode(corpus.valid) == ["the", "cat", "ran", "<eos>", "a", "sat", "<eos>"]
    assert corpus.test.dtype == np.int64


def test_ptb_files_read_exactly_as_the_tutorial(ptb_dir):
    texts = {s: (ptb_dir / f"ptb.{s}.txt").read_text() for s in ptb.SPLITS}
    for text in texts.values():
        assert ptb.tokenize(text) == tutorial_read_words(text)
    corpus = ptb.load_corpus(ptb_dir)
    word_to_id = tutorial_build_vocab(tutorial_read_words(texts["train"]))
    assert corpus.vocab.ids == word_to_id
    assert len(corpus.vocab) == 10000 and corpus.vocab.tokens[:3] == ("the", "<unk>", "<eos>")
    assert (len(corpus.train), len(corpus.valid), len(corpus.test)) == (929589, 73760, 82430)
    assert corpus.train[:10].tolist() == [9970, 9971, 9972, 9974, 9975, 9976, 9980, 9981, 9982, 9983]
    assert corpus.valid.tolist() == [word_to_id[w] for w in tutorial_read_words(texts["valid"])]


# --------------------------------------------------------------------------- producer batching


def test_batchify_and_iterate_match_the_docstring_example():
    alphabet = np.arange(26)
    rows = ptb.batchify(alphabet, 4)
    assert rows.tolist() == [list(range(0, 6)), list(range(6, 12)), list(range(12, 18)), list(range(18, 24))]
    steps = list(ptb.iterate(rows, 2))
    assert len(steps) == ptb.epoch_size(26, 4, 2) == 2
    x1, y1 = steps[1]
    assert x1.tolist() == [[2, 3], [8, 9], [14, 15], [20, 21]]
    assert y1.tolist() == [[3, 4], [9, 10], [15, 16], [21, 22]]


@pytest.mark.parametrize(
    "n,batch_size,num_steps", [(1000, 20, 20), (1001, 7, 3), (99, 4, 5), (120, 20, 5), (41, 20, 1)]
)
def test_producer_matches_the_tutorial(n, batch_size, num_steps):
    raw = np.random.default_rng(n).integers(0, 50, n)
    expected = tutorial_producer(raw, batch_size, num_steps)
    got = list(ptb.iterate(ptb.batchify(raw, batch_size), num_steps))
    assert ptb.epoch_size(n, batch_size, num_steps) == ((n // batch_size) - 1) // num_steps == len(expected)
    assert len(got) == len(expected)
    for (x, y), (ex, ey) in zip(got, expected, strict=True):
        np.testing.assert_array_equal(x, ex)
        np.testing.assert_array_equal(y, ey)


def test_worker_shards_are_contiguous_row_blocks_that_rebuild_the_batch():
    rows = ptb.batchify(np.arange(20 * 11), 20)
    shards = [ptb.shard_rows(rows, k, 4) for k in range(4)]
    np.testing.assert_array_equal(np.concatenate(shards), rows)
    assert all(s.shape == (5, 11) for s in shards)
    with pytest.raises(UserError, match="not divisible by 3 workers"):
        ptb.shard_rows(rows, 0, 3)


def test_train_fraction_is_a_prefix():
    ids = np.arange(1000)
    np.testing.assert_array_equal(ptb.prefix(ids, 0.25), np.arange(250))
    assert ptb.prefix(ids, 1.0) is ids


# --------------------------------------------------------------------------- configs


def test_presets_are_the_tutorials_table():
    small = cfg.resolve(PTBConfig, PRESETS, preset="small")
    assert (small.hidden_size, small.num_steps, small.max_max_epoch, small.keep_prob, small.lr_decay) == (
        200,
        20,
        13,
        1.0,
        0.5,
    )
    large = cfg.resolve(PTBConfig, PRESETS, preset="large")
    assert (large.init_scale, large.max_grad_norm, large.hidden_size, large.keep_prob) == (0.04, 10, 1500, 0.35)
    assert large.lr_decay == pytest.approx(1 / 1.15)
    assert cfg.resolve(PTBConfig, PRESETS, preset="medium", overrides={"lr_decay": "1/1.15"}).lr_decay == pytest.approx(
        1 / 1.15
    )
    test = cfg.resolve(PTBConfig, PRESETS, preset="test")
    assert (test.num_layers, test.hidden_size, test.num_steps, test.max_grad_norm) == (1, 2, 2, 1)
    assert PTBConfig() == small  # the dataclass defaults are the small config


def test_learning_rate_schedule():
    small = PTBTask(PTBConfig())
    assert [small.learning_rate(i) for i in range(7)] == [1, 1, 1, 1, 0.5, 0.25, 0.125]
    large = PTBTask(PTBConfig(**PRESETS["large"]))
    assert large.learning_rate(13) == 1.0
    assert large.learning_rate(14) == pytest.approx(1 / 1.15)
    assert large.learning_rate(54) == pytest.approx(1.15**-41)


@pytest.mark.parametrize("keep_prob", ["0", "-0.5", "1.01"])
def test_keep_prob_outside_zero_one_is_a_one_line_error(keep_prob):
    with pytest.raises(UserError, match=r"--keep-prob must be in \(0, 1\]"):
        cfg.resolve(PTBConfig, PRESETS, preset="small", overrides={"keep_prob": keep_prob})


def test_unknown_config_name_is_a_one_line_error_from_the_job():
    command = [sys.executable, str(REPO / "jobs" / "ptb.py"), "--config", "huge"]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=QUICK_COMMAND_S)
    assert proc.returncode == 2
    assert (
        proc.stderr.strip() == "error: unknown config 'huge'; choose one of: small, medium, large, test, awd, small-reg"
    )


# --------------------------------------------------------------------------- bad data, on the driver


def check(folder: Path, **overrides) -> None:
    config = PTBConfig(
        **{
            **PRESETS["test"],
            "vocab_size": 100,
            "batch_size": 2,
            "num_steps": 2,
            "eval_batch_size": 1,
            "eval_num_steps": 1,
            **overrides,
        }
    )
    PTBTask.check(config, PTBTask.read_data(config, str(folder)), 1)


def test_a_good_small_corpus_passes(tmp_path):
    check(write_corpus(tmp_path))


def test_missing_data_file(tmp_path):
    folder = write_corpus(tmp_path)
    (folder / "ptb.valid.txt").unlink()
    with pytest.raises(UserError, match=r"lacks ptb.valid.txt .*--data-dir"):
        check(folder)


@pytest.mark.parametrize("split", ["train", "test"])
def test_empty_data_file(tmp_path, split):
    folder = write_corpus(tmp_path)
    (folder / f"ptb.{split}.txt").write_text(" \n")
    with pytest.raises(UserError, match=f"ptb.{split}.txt is empty"):
        check(folder)


def test_training_file_without_newline(tmp_path):
    folder = write_corpus(tmp_path, train="the cat sat on the mat the dog sat a cat ran")
    with pytest.raises(UserError, match="has no newline"):
        check(folder)


def test_batch_or_num_steps_larger_than_the_data(tmp_path):
    folder = write_corpus(tmp_path)  # 15 training words
    check(folder, batch_size=5, num_steps=2)  # 5 rows of 3: one step of 2
    with pytest.raises(UserError, match="too short for --batch-size 5 x --num-steps 3"):
        check(folder, batch_size=5, num_steps=3)
    with pytest.raises(UserError, match="too short for --batch-size 16"):
        check(folder, batch_size=16, num_steps=1)
    with pytest.raises(UserError, match="raise --train-fraction"):
        check(folder, batch_size=2, num_steps=2, train_fraction=0.3)
    with pytest.raises(UserError, match=r"the test data \(4 words\) is too short for an evaluation batch of 2 x 2"):
        check(folder, batch_size=2, num_steps=2, eval_batch_size=0, eval_num_steps=0)
    check(folder, batch_size=2, num_steps=2, eval_batch_size=1, eval_num_steps=1)


def test_vocabulary_larger_than_vocab_size(tmp_path):
    with pytest.raises(UserError, match="has 9 distinct words .* more than --vocab-size 5; pass --vocab-size 9"):
        check(write_corpus(tmp_path), vocab_size=5)


def test_errors_are_one_line(tmp_path):
    folder = write_corpus(tmp_path, train="no newline here")
    with pytest.raises(UserError) as info:
        check(folder)
    assert "\n" not in str(info.value)
