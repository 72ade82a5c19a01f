"""Character corpora for the char task: reading, vocabulary, and windows by index.

The Keras example builds a one-hot array of every ``maxlen``-character window taken every
``step`` characters; here a window is its start offset into the encoded corpus
(:class:`Windows`) and a batch gathers its characters on the fly. The head ``1 -
valid_fraction`` of the corpus trains, the tail is held out; no window crosses the split.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from lstm import user_files
from lstm.data.download import locate
from lstm.data.vocab import Vocabulary
from lstm.errors import UserError

CORPORA = ("nietzsche", "tinyshakespeare")


# --------------------------------------------------------------------------- reading


def corpus_path(corpus: str, corpus_name: str, data_dir: Optional[str | os.PathLike]) -> Path:
    """``corpus`` if given, else ``<corpus_name>.txt`` found or downloaded by :func:`lstm.data.download.locate`."""
    if corpus:
        return Path(corpus).expanduser()
    if corpus_name not in CORPORA:
        raise UserError(
            f"unknown --corpus-name {corpus_name!r}; choose one of {', '.join(CORPORA)}, "
            "or pass --corpus with a text file"
        )
    return locate(corpus_name, data_dir) / f"{corpus_name}.txt"


def read_corpus(path: str | os.PathLike) -> str:
    """The text of ``path`` (UTF-8, without a BOM). UserError if it is missing, unreadable or empty."""
    text = user_files.read_text(
        path, what="corpus file", fix="pass --corpus with a text file (or omit it to use the Nietzsche text)"
    )
    if not text:
        raise UserError(f"corpus file {path} is empty; pass --corpus with a file that holds some text")
    return text


def prepare(text: str, *, lowercase: bool = True, max_chars: int = 0) -> str:
    """Lower-cased as in the Keras example if asked, cut to the first ``max_chars`` characters if positive."""
    if lowercase:
        text = text.lower()
    return text[:max_chars] if max_chars > 0 else text


# --------------------------------------------------------------------------- windows


def window_starts(begin: int, end: int, window: int, step: int) -> np.ndarray:
    """Starts of the windows in ``[begin, end)`` whose target is inside too (the example's range)."""
    return np.arange(begin, max(end - window, begin), step, dtype=np.int64)


@dataclass
class Windows:
    """Windows of an encoded corpus given by their start offsets; nothing is copied."""

    codes: torch.Tensor  # (n_chars,) int64, the whole encoded corpus
    starts: np.ndarray  # (n_windows,) int64
    window: int

    def __len__(self) -> int:
        return len(self.starts)

    def batch(self, which: np.ndarray | slice) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs ``(b, window)`` and next-char targets ``(b,)`` of the windows ``starts[which]``."""
        starts = torch.from_numpy(np.ascontiguousarray(self.starts[which]))
        offsets = starts[:, None] + torch.arange(self.window)
        return self.codes[offsets], self.codes[starts + self.window]

    def shard(self, rank: int, world_size: int) -> "Windows":
        """A contiguous ``1/world_size`` share (sizes differ by at most one), for evaluation."""
        return Windows(self.codes, np.array_split(self.starts, world_size)[rank], self.window)


@dataclass
class CharCorpus:
    """An encoded corpus, its vocabulary and its train / held-out windows."""

    text: str
    vocab: Vocabulary
    codes: torch.Tensor
    train: Windows
    valid: Windows
    split: int  # first character of the held-out tail


def build_corpus(
    text: str,
    *,
    window: int,
    step: int,
    valid_fraction: float,
    vocab: Optional[Vocabulary] = None,
    source: str = "the corpus",
) -> CharCorpus:
    """The encoded ``text`` with its training head and held-out tail windows; UserError if either is empty."""
    if window <= 0 or step <= 0:
        raise UserError(f"window and step must be positive (got window {window}, step {step})")
    if len(text) <= window:
        raise UserError(
            f"{source} has {len(text)} characters, fewer than one window of {window} plus its "
            f"target; use a longer corpus or a smaller --window"
        )
    vocab = vocab or Vocabulary.sorted_set(text)
    codes = torch.from_numpy(vocab.encode(text))
    split = int(len(text) * (1.0 - valid_fraction))
    train = Windows(codes, window_starts(0, split, window, step), window)
    valid = Windows(codes, window_starts(split, len(text), window, step), window)
    for name, part, chars in (("training head", train, split), ("held-out tail", valid, len(text) - split)):
        if len(part) == 0:
            raise UserError(
                f"the {name} of {source} ({chars} characters) is shorter than one window of "
                f"{window} plus its target; use a longer corpus, a smaller --window, "
                "or change --valid-fraction"
            )
    return CharCorpus(text=text, vocab=vocab, codes=codes, train=train, valid=valid, split=split)


def epoch_shard(n_windows: int, epoch_seed: Sequence[int], rank: int, world_size: int) -> np.ndarray:
    """This rank's window numbers for an epoch: one seeded permutation dealt round-robin, equal shares."""
    order = np.random.default_rng(list(epoch_seed)).permutation(n_windows)
    per_rank = n_windows // world_size
    return order[rank::world_size][:per_rank]
