"""A trained PTB run, used: ``jobs/ptb.py score`` and ``jobs/ptb.py generate``.

:func:`load_trained` rebuilds the model from a checkpoint's config and vocabulary, with
NT-ASGD's averaged weights where the run averaged (those the job evaluates with).
:func:`score_text` is the tutorial's test evaluation of any text: PTB's tokens, unknown words
as ``<unk>``, batch 1 with the state carried through the whole text, every token but the first
predicted; ``batch_size`` B > 1 cuts it into B rows instead (faster; each row starts without
context); with ``dynamic`` settings, the dynamic evaluation of :mod:`lstm.dynamic_eval`.
:func:`generate_text` samples words after a prompt read as a sentence start.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import numpy as np
import torch
from torch import nn

from lstm import checkpoint as ckpt
from lstm import dynamic_eval, storage, user_files
from lstm.data import ptb
from lstm.data.vocab import Vocabulary
from lstm.errors import UserError
from lstm.models.char import sample_with_temperature
from lstm.optim import load_averages
from lstm.task import perplexity
from lstm.tasks.ptb import PTBTask
from lstm.tasks.ptb_config import PTBConfig

UNK = "<unk>"


@dataclass
class TrainedLM:
    model: nn.Module  # in eval mode, with the weights the job evaluates with
    vocab: Vocabulary
    config: PTBConfig
    averaged: bool  # NT-ASGD's averages are in the model
    location: str  # the checkpoint it came from, as a user reads it


def load_trained(location: str | os.PathLike) -> TrainedLM:
    """The model of a PTB checkpoint (:func:`lstm.checkpoint.load`); one-line UserError for anything else."""
    return trained_from(ckpt.load(location, label=PTBTask.name, optimizer=True))


def trained_from(contents: ckpt.Contents) -> TrainedLM:
    """:func:`load_trained` of a checkpoint already read (its optimizer state included)."""
    config = ckpt.task_config(contents, PTBTask)
    vocab = ckpt.vocabulary(contents, PTBTask.name)
    model = PTBTask(config).build_model()
    ckpt.load_model(model, contents)
    averaged = config.optimizer == "nt-asgd" and load_averages(model.parameters(), contents.optimizer)
    return TrainedLM(model.eval(), vocab, config, averaged, contents.location)


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """One intra-op thread: a one-word batch is too small to split, and extra threads wait on each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def read_words(path: str | os.PathLike) -> list[str]:
    """The PTB tokens of a text file (one-line errors for a missing, unreadable or empty file)."""
    text = user_files.read_text(path, what="--text", fix="pass the path of a UTF-8 text file to score")
    return enough_words(ptb.tokenize(text), f"--text {path}")


def enough_words(words: list[str], what: str) -> list[str]:
    if len(words) < 2:
        raise UserError(
            f"{what} has {len(words)} word(s); scoring needs at least 2 (the first is context): pass a longer text"
        )
    return words


def encode_with_unk(vocab: Vocabulary, words: list[str]) -> tuple[np.ndarray, int]:
    """(word ids, how many words became ``<unk>``)."""
    lacking = set(vocab.missing(words))
    if lacking and UNK not in vocab.ids:
        return vocab.encode(words, what="--text", unit="word"), 0  # raises: names the words
    return vocab.encode(words, unknown=UNK if lacking else None), sum(w in lacking for w in words)


@torch.no_grad()
def score_ids(model: nn.Module, ids: np.ndarray, batch_size: int, num_steps: int) -> tuple[float, int]:
    """(summed cross entropy, predicted tokens) over ``ids`` cut into ``batch_size`` rows."""
    rows = torch.from_numpy(ptb.batchify(ids, batch_size))
    total, tokens, state = 0.0, 0, None
    for inputs, targets in ptb.iterate_lengths(rows, ptb.full_lengths(rows.shape[1], num_steps)):
        _, loss_sum, state = model(inputs, targets, state)
        total += float(loss_sum)
        tokens += targets.numel()
    return total, tokens


def score_text(
    location: str | os.PathLike,
    text_path: str | os.PathLike,
    batch_size: int = 1,
    dynamic: Optional[dynamic_eval.DynamicSettings] = None,
) -> dict[str, Any]:
    """Perplexity of a text file under a checkpoint (see :func:`score_words`)."""
    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1 (got {batch_size})")
    words = read_words(text_path)
    scored = score_words(load_trained(location), words, batch_size, text=str(text_path), dynamic=dynamic)
    return {**scored, "checkpoint": storage.display(str(location))}  # as the user named it


def score_words(
    trained: TrainedLM,
    words: list[str],
    batch_size: int = 1,
    *,
    text: str = "",
    dynamic: Optional[dynamic_eval.DynamicSettings] = None,
) -> dict[str, Any]:
    """Perplexity of ``words`` under a trained model: ppl, loss, tokens, unk and where they came
    from; ``dynamic``: the settings of a dynamic evaluation (:mod:`lstm.dynamic_eval`), which join them."""
    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1 (got {batch_size})")
    ids, unk = encode_with_unk(trained.vocab, words)
    if len(ids) // batch_size < 2:
        raise UserError(f"--text {text} has {len(ids)} words, too few for --batch-size {batch_size}; lower it")
    with one_thread() if batch_size == 1 else contextlib.nullcontext():
        if dynamic is None:
            loss_sum, tokens = score_ids(trained.model, ids, batch_size, trained.config.eval_shape[1])
        else:
            loss_sum, tokens = dynamic_eval.score_trained(trained, ids, dynamic)
    return {
        "ppl": perplexity(loss_sum, tokens),
        "loss": loss_sum / tokens,
        "tokens": tokens,
        "words": len(words),
        "unk": unk,
        "batch_size": batch_size,
        "averaged_weights": trained.averaged,
        "text": text,
        "checkpoint": trained.location,
        **({"dynamic": dynamic.describe()} if dynamic is not None else {}),
    }


def check_generation(prompt: str, length: int, temperature: float) -> list[str]:
    """The prompt's words, once the generation's settings are checked."""
    if not (temperature > 0 and math.isfinite(temperature)):
        raise UserError(f"--temperature must be positive (got {temperature})")
    if length <= 0:
        raise UserError(f"--length must be positive (got {length})")
    words = ptb.tokenize(prompt)
    if not words:
        raise UserError("--prompt is empty; pass some words for the model to continue, e.g. --prompt 'the company'")
    return words


def generate_text(
    location: str | os.PathLike, prompt: str, *, length: int, temperature: float = 1.0, seed: int = 0
) -> list[str]:
    """``length`` words sampled after ``prompt`` at ``temperature`` (a generator seeded by ``seed``)."""
    check_generation(prompt, length, temperature)
    return generate_words(load_trained(location), prompt, length=length, temperature=temperature, seed=seed)


def generate_words(
    trained: TrainedLM, prompt: str, *, length: int, temperature: float = 1.0, seed: int = 0
) -> list[str]:
    """:func:`generate_text` with a model already loaded."""
    words = check_generation(prompt, length, temperature)
    ids = trained.vocab.encode([ptb.EOS, *words], what="--prompt", unit="word")
    generator = torch.Generator().manual_seed(seed)
    inputs, state, drawn = torch.from_numpy(ids)[None], None, []
    with one_thread():
        for _ in range(length):
            logits, state = trained.model.logits(inputs, state)
            word = sample_with_temperature(logits[:, -1], temperature, generator)
            drawn.append(int(word))
            inputs = word.view(1, 1)
    return trained.vocab.decode(drawn)


def render(words: list[str]) -> str:
    """Words as text, each ``<eos>`` a line break."""
    lines, line = [], []
    for word in words:
        if word == ptb.EOS:
            lines.append(" ".join(line))
            line = []
        else:
            line.append(word)
    return "\n".join(lines + [" ".join(line)])
