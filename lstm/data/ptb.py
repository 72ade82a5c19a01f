"""Penn Treebank reading and batching, as the TensorFlow PTB tutorial's ``reader.py`` does them:
every newline an ``<eos>`` (padded, which on PTB gives the tutorial's stream exactly), the
vocabulary from the training file by (descending count, word), unknown valid/test words dropped.
:func:`batchify` cuts the stream into ``batch_size`` contiguous rows; step i reads columns
[i*T, (i+1)*T) and their successors as targets, so each row continues where it stopped and its
LSTM state is carried (truncated BPTT). Rank k of N takes rows [k*B/N, (k+1)*B/N).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, TypeVar

import numpy as np

from lstm import user_files
from lstm.data.vocab import Vocabulary
from lstm.errors import UserError

Rows = TypeVar("Rows")  # a numpy array or a torch tensor of shape (rows, row_len)

EOS = "<eos>"
SPLITS = ("train", "valid", "test")


def file_name(split: str) -> str:
    """``ptb.<split>.txt``: the names in Mikolov's simple-examples archive."""
    return f"ptb.{split}.txt"


# --------------------------------------------------------------------------- reading


def read_text(path: str | os.PathLike, *, require_newline: bool = False) -> str:
    """The text of a data file, with one-line errors for a missing, empty or unreadable file."""
    fix = f"pass --data-dir with a folder holding plain-text {', '.join(file_name(s) for s in SPLITS)}"
    text = user_files.read_text(path, what="data file", fix=fix)
    if not text.split():
        raise UserError(f"data file {path} is empty; pass --data-dir with a folder of non-empty PTB files")
    if require_newline and "\n" not in text:
        raise UserError(
            f"training file {path} has no newline: the PTB format has one sentence per line "
            f"(each newline becomes {EOS}); split the text into lines"
        )
    return text


def tokenize(text: str) -> list[str]:
    """Whitespace-split words with every newline turned into ``<eos>``."""
    return text.replace("\n", f" {EOS} ").split()


def read_words(path: str | os.PathLike, *, require_newline: bool = False) -> list[str]:
    """The tokens of a file (see :func:`tokenize`)."""
    return tokenize(read_text(path, require_newline=require_newline))


# --------------------------------------------------------------------------- vocabulary


@dataclass(frozen=True)
class Corpus:
    """The three splits as word-id arrays, and the training vocabulary."""

    vocab: Vocabulary
    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray

    def split(self, name: str) -> np.ndarray:
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}")
        return getattr(self, name)


def load_corpus(folder: str | os.PathLike) -> Corpus:
    """Read ``ptb.{train,valid,test}.txt`` from ``folder`` (vocabulary from train)."""
    folder = Path(folder)
    train = read_words(folder / file_name("train"), require_newline=True)
    vocab = Vocabulary.by_count(train)
    valid = read_words(folder / file_name("valid"))
    test = read_words(folder / file_name("test"))
    return Corpus(vocab, vocab.encode(train), vocab.encode(valid), vocab.encode(test))


def prefix(ids: np.ndarray, fraction: float) -> np.ndarray:
    """The leading ``fraction`` of a token stream (a cheap training set for searches)."""
    if fraction >= 1.0:
        return ids
    return ids[: int(len(ids) * fraction)]


# --------------------------------------------------------------------------- batching


def epoch_size(n_tokens: int, batch_size: int, num_steps: int) -> int:
    """Steps per epoch: ``((n_tokens // batch_size) - 1) // num_steps`` (0 if too little data)."""
    return max(((n_tokens // batch_size) - 1) // num_steps, 0)


def min_tokens(batch_size: int, num_steps: int) -> int:
    """The fewest tokens that give one step: every row needs num_steps inputs + 1 target."""
    return batch_size * (num_steps + 1)


def batchify(ids: np.ndarray, batch_size: int) -> np.ndarray:
    """The token stream as ``batch_size`` contiguous rows, shape (batch_size, len // batch_size)."""
    batch_len = len(ids) // batch_size
    return np.ascontiguousarray(ids[: batch_size * batch_len].reshape(batch_size, batch_len))


def shard_rows(rows: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """Rank ``rank``'s contiguous block of rows: [rank*B/N, (rank+1)*B/N)."""
    batch_size = rows.shape[0]
    if batch_size % world_size:
        raise UserError(
            f"batch size {batch_size} is not divisible by {world_size} workers; "
            f"pass a --batch-size that is a multiple of --num-workers"
        )
    per = batch_size // world_size
    return rows[rank * per : (rank + 1) * per]


def iterate(rows: Rows, num_steps: int, n_steps: int | None = None) -> Iterator[tuple[Rows, Rows]]:
    """(inputs, targets) of shape (rows, num_steps) along the rows; ``n_steps`` defaults to the rows' epoch size."""
    if n_steps is None:
        n_steps = (rows.shape[1] - 1) // num_steps
    for i in range(n_steps):
        start = i * num_steps
        yield rows[:, start : start + num_steps], rows[:, start + 1 : start + num_steps + 1]


# --------------------------------------------------------------------------- variable-length BPTT

MIN_STEPS = 5  # AWD-LSTM's shortest window
STEPS_STD = 5.0  # standard deviation of a window's length
FULL_LENGTH_P = 0.95  # else the mean length is num_steps / 2


def variable_lengths(rng: np.random.Generator, row_len: int, num_steps: int) -> list[int]:
    """AWD-LSTM's variable-length BPTT: windows of ``max(5, int(N(num_steps, 5)))`` (mean
    ``num_steps / 2`` with probability 0.05) covering rows of ``row_len`` tokens, so that over
    the epochs any token may start a window."""
    lengths, start = [], 0
    while start < row_len - 1:
        mean = num_steps if rng.random() < FULL_LENGTH_P else num_steps / 2
        n = min(max(MIN_STEPS, int(rng.normal(mean, STEPS_STD))), row_len - 1 - start)
        lengths.append(n)
        start += n
    return lengths


def full_lengths(row_len: int, num_steps: int) -> list[int]:
    """Windows of ``num_steps`` covering rows of ``row_len`` tokens, the last one shorter if need be."""
    whole, rest = divmod(row_len - 1, num_steps)
    return [num_steps] * whole + ([rest] if rest else [])


def iterate_lengths(rows: Rows, lengths: list[int]) -> Iterator[tuple[Rows, Rows]]:
    """(inputs, targets) of consecutive windows of the given ``lengths`` along the rows."""
    start = 0
    for n in lengths:
        yield rows[:, start : start + n], rows[:, start + 1 : start + n + 1]
        start += n
