"""The char task: the Keras char-LSTM text-generation example, as a Ray Train job.

As the example: the lower-cased corpus in 40-character windows every 3, each predicting the
next character; LSTM(128), softmax, Adam (lr 0.01), batch 128; samples at four diversities
after every epoch. Beyond it: windows are indexed, never one-hot arrays; the tail 10% is held
out (bits per character each epoch); a checkpoint carries its vocabulary, so sampling it
(:mod:`lstm.tasks.char_trained`) needs no corpus. ``batch_size`` is global: each rank takes its
share of one epoch-wide permutation, the same number of steps on every rank.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lstm import config as cfg
from lstm.config import TaskConfig, check_fields, positive_finite
from lstm.data import text as textdata
from lstm.errors import UserError
from lstm.models.char import CharLSTM
from lstm.task import Display, Search, StepOutput, Task, register

LN2 = math.log(2.0)
SAMPLE_SEED_OFFSET = 7_777  # keeps the sampling generators apart from the data-order ones


@dataclass(frozen=True)
class CharConfig(TaskConfig):
    corpus: str = ""  # a UTF-8 text file; '' -> <corpus_name>.txt from --data-dir or the download cache
    corpus_name: str = "nietzsche"  # nietzsche | tinyshakespeare (when --corpus is not given)
    lowercase: bool = True  # the example lower-cases the text
    max_chars: int = 0  # > 0: use only the corpus' first N characters (quick runs)
    window: int = 40  # the example's maxlen
    step: int = 3
    valid_fraction: float = 0.1  # the held-out tail of the corpus
    hidden_size: int = 128
    batch_size: int = 128  # global, split over the workers
    learning_rate: float = 0.01
    max_grad_norm: Optional[float] = None
    epochs: int = 60
    sample_length: int = 400  # characters generated per diversity at each epoch end (0: none)
    diversities: tuple[float, ...] = (0.2, 0.5, 1.0, 1.2)
    eval_batch_size: int = 1024

    flag_help = {
        "corpus": "a UTF-8 text file to train on, instead of --corpus-name (and --data-dir)",
        "corpus_name": "without --corpus: nietzsche or tinyshakespeare, from --data-dir or downloaded once",
        "diversities": "the temperatures of the end-of-epoch samples; needs --sample-length > 0",
    }

    def __post_init__(self) -> None:
        # Ray Train workers run in their own working directory: resolve a relative --corpus
        # here, where the config is first built.
        if self.corpus:
            object.__setattr__(self, "corpus", os.path.abspath(os.path.expanduser(self.corpus)))

    def validate(self) -> None:
        if not self.corpus and self.corpus_name not in textdata.CORPORA:
            raise UserError(
                f"unknown --corpus-name {self.corpus_name!r}; choose one of "
                f"{', '.join(textdata.CORPORA)}, or pass --corpus with a text file"
            )
        check_fields(
            self,
            ("window", "step", "hidden_size", "batch_size", "epochs", "eval_batch_size"),
            lambda v: v > 0,
            "positive",
        )
        check_fields(self, ("max_chars", "sample_length"), lambda v: v >= 0, ">= 0")
        check_fields(self, ("valid_fraction",), lambda v: 0.0 < v < 1.0, "between 0 and 1")
        check_fields(self, ("learning_rate",), positive_finite, "positive")
        if self.max_grad_norm is not None:
            check_fields(self, ("max_grad_norm",), positive_finite, "positive")
        if not self.diversities or not all(d > 0 and math.isfinite(d) for d in self.diversities):
            raise UserError(
                f"--diversities must be positive temperatures, e.g. 0.2,0.5,1.0,1.2 (got {self.diversities})"
            )

    def unused_flags(self) -> dict[str, str]:
        unused = {}
        if self.corpus:
            for name in ("corpus_name", "data_dir"):
                unused[name] = (
                    f"has no effect with --corpus {self.corpus} (the text is that file); drop "
                    f"{cfg.flag_name(name)}, or --corpus to train on a downloaded corpus"
                )
        if self.sample_length == 0:
            unused["diversities"] = (
                "has no effect with --sample-length 0 (no samples are drawn); drop --diversities, "
                "or pass a positive --sample-length"
            )
        return unused


def corpus_of(config: CharConfig, text: str, source: str = "the corpus") -> textdata.CharCorpus:
    """Encode and window the raw ``text`` as ``config`` says (UserError if it is too short)."""
    return textdata.build_corpus(
        textdata.prepare(text, lowercase=config.lowercase, max_chars=config.max_chars),
        window=config.window,
        step=config.step,
        valid_fraction=config.valid_fraction,
        source=source,
    )


@dataclass
class CharData:
    """What a worker holds: the whole corpus (a few MB at most) and its own evaluation share."""

    corpus: textdata.CharCorpus
    valid: textdata.Windows  # this rank's share of the held-out windows
    rank_batch: int  # windows per step on this rank


LOSS_LIMIT_TIMES_UNIFORM = 10  # a mean loss this many times a uniform guess's (ln chars) has diverged


def epoch_line(m: Mapping[str, Any]) -> str:
    return (
        f"epoch {m['epoch']:>3}/{m['epochs']} | train_bpc {m['train_bpc']:.4f} | "
        f"valid_bpc {m['valid_bpc']:.4f} | windows/sec {m.get('windows_per_sec', 0):,.0f} | "
        f"train {m.get('train_s', 0):.1f}s | elapsed {m.get('elapsed_s', 0):.1f}s"
    )


def plot(results: Mapping[str, Any], out_dir: Path) -> list[Path]:
    from lstm import plots

    config = results.get("config", {})
    source = config.get("corpus") or config.get("corpus_name", "")
    return [
        plots.learning_curves(
            results["epochs"],
            [("bits per char", ["train_bpc", "valid_bpc"])],
            out_dir / "learning_curve.png",
            title=f"char LSTM({config.get('hidden_size')}) on {os.path.basename(source)}",
        )
    ]


@register
class CharTask(Task):
    name = "char"
    config_class = CharConfig
    presets = {
        "keras": {},
        "test": {"max_chars": 20_000, "hidden_size": 32, "batch_size": 64, "epochs": 2, "sample_length": 60},
    }
    default_preset = "keras"
    sample_unit = "windows"
    # Around the Keras example's LSTM(128) and Adam at 0.01.
    search = Search(
        "epochs",
        "valid_bpc",
        space={"hidden_size": "64,128,256", "learning_rate": "log:0.002:0.02"},
        pbt_mutations=("learning_rate",),
    )
    display = Display(epoch_line, plot)
    config: CharConfig

    # ------------------------------------------------------------------ driver side
    @classmethod
    def read_data(cls, config: CharConfig, data_dir: Optional[str]) -> str:
        """The corpus text (downloaded once if needed), checked before any worker starts."""
        path = textdata.corpus_path(config.corpus, config.corpus_name, data_dir)
        text = textdata.read_corpus(path)
        corpus_of(config, text, f"corpus {path}")
        return text

    @classmethod
    def check(cls, config: CharConfig, data: str, num_workers: int) -> None:
        if config.batch_size < num_workers:
            raise UserError(
                f"--batch-size {config.batch_size} is smaller than the {num_workers} workers; "
                "raise --batch-size or lower --num-workers"
            )
        windows = len(corpus_of(config, data).train)
        if windows < num_workers:
            raise UserError(
                f"the corpus has {windows} training windows, fewer than the {num_workers} workers; "
                "use a longer corpus or fewer workers"
            )

    # ------------------------------------------------------------------ data
    def setup(self, data: str) -> None:
        config, worker = self.config, self.worker
        self.check(config, data, worker.world_size)
        corpus = corpus_of(config, data)
        self.data = CharData(
            corpus, corpus.valid.shard(worker.rank, worker.world_size), config.batch_size // worker.world_size
        )

    def num_train_batches(self) -> int:
        per_rank = len(self.data.corpus.train) // self.worker.world_size
        return -(-per_rank // self.data.rank_batch)

    def train_batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's share of an epoch's shuffled windows, ``rank_batch`` at a time (equal on every rank)."""
        data, worker = self.data, self.worker
        mine = textdata.epoch_shard(len(data.corpus.train), (self.config.seed, epoch), worker.rank, worker.world_size)
        for i in range(0, len(mine), data.rank_batch):
            x, y = data.corpus.train.batch(mine[i : i + data.rank_batch])
            yield x.to(worker.device), y.to(worker.device)

    # ------------------------------------------------------------------ model
    def build_model(self) -> nn.Module:
        return CharLSTM(len(self.data.corpus.vocab), self.config.hidden_size)

    def loss_limit(self) -> float:
        return LOSS_LIMIT_TIMES_UNIFORM * math.log(max(len(self.data.corpus.vocab), 2))

    def train_step(self, model: CharLSTM, batch: tuple[torch.Tensor, torch.Tensor], state: Any) -> StepOutput:
        x, y = batch
        loss_sum = F.cross_entropy(model(x).float(), y, reduction="sum")
        n = y.numel()
        return StepOutput(
            loss=loss_sum / n,
            sums={"loss_sum": loss_sum.detach(), "chars": n},
            samples=n,
            mean_loss=loss_sum.detach() / n,
        )

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, model: CharLSTM, split: str) -> dict[str, float]:
        """Summed cross-entropy (nats) over this rank's share of the held-out windows."""
        windows, device = self.data.valid, self.worker.device
        loss_sum = 0.0
        for i in range(0, len(windows), self.config.eval_batch_size):
            x, y = windows.batch(slice(i, i + self.config.eval_batch_size))
            loss_sum += float(F.cross_entropy(model(x.to(device)).float(), y.to(device), reduction="sum"))
        return {"loss_sum": loss_sum, "chars": float(len(windows))}

    @staticmethod
    def summarize(sums: Mapping[str, float], prefix: str) -> dict[str, float]:
        nats = sums.get("loss_sum", 0.0) / max(sums.get("chars", 0.0), 1.0)
        return {f"{prefix}loss": nats, f"{prefix}bpc": nats / LN2}

    def epoch_extras(self, model: CharLSTM, epoch: int) -> dict[str, Any]:
        """The example's end-of-epoch samples: one random seed window, each diversity."""
        config, corpus = self.config, self.data.corpus
        if config.sample_length <= 0:
            return {}
        rng = np.random.default_rng([config.seed, epoch, SAMPLE_SEED_OFFSET])
        start = int(rng.integers(0, len(corpus.text) - config.window))
        seed = corpus.codes[start : start + config.window]
        gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
        out = model.generate(
            seed.repeat(len(config.diversities), 1),
            config.diversities,
            config.sample_length,
            window=config.window,
            generator=gen,
        )
        seed_text = "".join(corpus.vocab.decode(seed.tolist()))
        samples = [
            {"diversity": d, "text": "".join(corpus.vocab.decode(row.tolist()))}
            for d, row in zip(config.diversities, out, strict=True)
        ]
        lines = [f'----- Generating with seed: "{seed_text}"']
        for s in samples:
            lines += [f"----- diversity: {s['diversity']}", seed_text + s["text"]]
        return {"print": lines, "seed_text": seed_text, "samples": samples}

    def checkpoint_meta(self) -> dict[str, Any]:
        return {"vocab": list(self.data.corpus.vocab.tokens)}

    def check_checkpoint(self, meta: Mapping[str, Any]) -> None:
        theirs = meta.get("vocab")
        ours = list(self.data.corpus.vocab.tokens)
        if theirs is not None and list(theirs) != ours:
            extra, lacking = sorted(set(ours) - set(theirs)), sorted(set(theirs) - set(ours))
            raise UserError(
                f"the checkpoint's vocabulary ({len(theirs)} chars) differs from this corpus' ({len(ours)} chars; "
                f"new: {''.join(extra)!r}, missing: {''.join(lacking)!r}); resume with the corpus it was "
                "trained on, or start a new run with another --name"
            )
