"""A trained char run, used: its model loaded from a checkpoint, text sampled from it."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from lstm import checkpoint as ckpt
from lstm.data.vocab import Vocabulary
from lstm.errors import UserError
from lstm.models.char import CharLSTM
from lstm.tasks.char import CharConfig, CharTask


@dataclass
class TrainedCharLM:
    """A char run's model, loaded to sample from."""

    model: CharLSTM
    vocab: Vocabulary
    config: CharConfig


def load_trained(location: str | os.PathLike) -> TrainedCharLM:
    """The model of a char checkpoint (:func:`lstm.checkpoint.load`); one-line UserError for anything else."""
    return trained_from(ckpt.load(location, label=CharTask.name))


def trained_from(contents: ckpt.Contents) -> TrainedCharLM:
    """:func:`load_trained` of a checkpoint already read."""
    config = ckpt.task_config(contents, CharTask)
    vocab = ckpt.vocabulary(contents, CharTask.name)
    model = CharLSTM(len(vocab), config.hidden_size)
    ckpt.load_model(model, contents)
    return TrainedCharLM(model.eval(), vocab, config)


def check_sampling(seed_text: str, temperature: float, length: int) -> None:
    if not (temperature > 0 and math.isfinite(temperature)):
        raise UserError(f"--temperature must be positive (got {temperature})")
    if length <= 0:
        raise UserError(f"--length must be positive (got {length})")
    if not seed_text:
        raise UserError("--seed-text is empty; pass some text for the model to continue")


def sample_from_checkpoint(
    location: str | os.PathLike, seed_text: str, *, temperature: float = 0.5, length: int = 400, seed: int = 0
) -> str:
    """``length`` characters continuing ``seed_text``, from a run folder or checkpoint
    (:func:`lstm.checkpoint.load`); UserError for another task's checkpoint, a bad
    temperature or length, or characters the vocabulary lacks."""
    check_sampling(seed_text, temperature, length)
    return sample(load_trained(location), seed_text, temperature=temperature, length=length, seed=seed)


def sample(
    trained: TrainedCharLM, seed_text: str, *, temperature: float = 0.5, length: int = 400, seed: int = 0
) -> str:
    """:func:`sample_from_checkpoint` with a model already loaded."""
    check_sampling(seed_text, temperature, length)
    config, vocab = trained.config, trained.vocab
    text = seed_text.lower() if config.lowercase else seed_text
    codes = torch.from_numpy(vocab.encode(list(text), what="--seed-text", unit="character"))
    gen = torch.Generator().manual_seed(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one window at a time: extra threads only contend (100x slower on a busy CPU)
    try:
        out = trained.model.generate(codes[None], [temperature], length, window=config.window, generator=gen)
    finally:
        torch.set_num_threads(threads)
    return "".join(vocab.decode(out[0].tolist()))
