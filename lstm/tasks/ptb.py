"""The PTB word language model as the TensorFlow tutorial trains it (Zaremba et al. 2014):
truncated BPTT over ``num_steps`` words of ``batch_size`` contiguous rows, the state carried
between batches, loss summed over time and averaged over rows, clipped SGD with the tutorial's
decay. ``batch_size`` is global: rank k of N trains rows [k*B/N, (k+1)*B/N), so any worker
count takes the same steps (docs/ptb.md). Its config and presets: :mod:`lstm.tasks.ptb_config`.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

import numpy as np
import torch
from torch import nn

from lstm.data import ptb
from lstm.data.download import locate
from lstm.errors import UserError
from lstm.models.awd import RegularizedLM
from lstm.models.word import WordLM, detach_state
from lstm.optim import NTASGD
from lstm.task import Display, Search, StepOutput, Task, WorkerInfo, perplexity, register
from lstm.tasks.ptb_config import PRESETS, PTBConfig, regularization_label

EVAL_SPLITS = ("valid", "test")
VARIABLE_STEPS_SEED = 4_242  # keeps the window-length generator apart from other seeded streams
LOSS_LIMIT_TIMES_UNIFORM = 10  # a mean loss this many times a uniform guess's (ln vocab) has diverged


@dataclass
class PTBData:
    """One rank's share of the corpus, as tensors on its device."""

    vocab: Any  # lstm.data.vocab.Vocabulary
    train: torch.Tensor  # (batch_size / N, batch_len) rows of the training stream
    epoch_size: int  # steps per epoch (the same on every rank)
    eval_rows: dict[str, torch.Tensor] = field(default_factory=dict)  # split -> this rank's rows (maybe none)
    eval_steps: dict[str, int] = field(default_factory=dict)  # split -> steps of eval_num_steps


def check_sizes(config: PTBConfig, corpus: ptb.Corpus, num_workers: int = 1) -> None:
    """One-line errors when the vocabulary, a split or the worker count does not fit the config."""
    if config.batch_size % num_workers:
        raise UserError(
            f"--batch-size {config.batch_size} is not a multiple of --num-workers {num_workers}; pass a "
            "--batch-size that is (it is the global batch, split over the workers)"
        )
    if len(corpus.vocab) > config.vocab_size:
        raise UserError(
            f"the training file has {len(corpus.vocab)} distinct words (with {ptb.EOS}), more than "
            f"--vocab-size {config.vocab_size}; pass --vocab-size {len(corpus.vocab)} or more"
        )
    n_train = len(ptb.prefix(corpus.train, config.train_fraction))
    if ptb.epoch_size(n_train, config.batch_size, config.num_steps) < 1:
        need = ptb.min_tokens(config.batch_size, config.num_steps)
        raise UserError(
            f"the training data ({n_train} words at --train-fraction {config.train_fraction:g}) is too "
            f"short for --batch-size {config.batch_size} x --num-steps {config.num_steps}: one step needs "
            f"{need} words; lower --batch-size or --num-steps, or raise --train-fraction"
        )
    for split in EVAL_SPLITS:
        batch, steps = config.shape_of(split)
        n = len(corpus.split(split))
        if ptb.epoch_size(n, batch, steps) < 1:
            raise UserError(
                f"the {split} data ({n} words) is too short for an evaluation batch of {batch} x {steps} "
                f"words (needs {ptb.min_tokens(batch, steps)}); lower --eval-batch-size/--eval-num-steps "
                f"(0 = --batch-size/--num-steps)"
            )


def eval_shard(rows: np.ndarray, worker: WorkerInfo) -> np.ndarray:
    """This rank's evaluation rows: a contiguous block when the rows split evenly over the
    workers, else all of them on rank 0 (e.g. the tutorial's batch-1 test) and none elsewhere."""
    if rows.shape[0] % worker.world_size == 0:
        return ptb.shard_rows(rows, worker.rank, worker.world_size)
    return rows if worker.is_chief else rows[:0]


def epoch_line(m: Mapping[str, Any]) -> str:
    parts = [
        f"epoch {m['epoch']:>2}/{m['epochs']}",
        f"lr {m['lr']:.4g}",
        f"train ppl {m['train_ppl']:.2f}",
        f"valid ppl {m['valid_ppl']:.2f}",
    ]
    if "test_ppl" in m:
        parts.append(f"test ppl {m['test_ppl']:.2f}")
    if m.get("asgd_steps"):
        parts.append(f"evaluated with averages of {m['asgd_steps']:,} steps")
    if m.get("asgd_switched"):
        parts.append("NT-ASGD: averaging from now on")
    parts += [f"words/sec {m.get('words_per_sec', 0):,.0f}", f"elapsed {m.get('elapsed_s', 0):.1f}s"]
    return " | ".join(parts)


def plot(results: Mapping[str, Any], out_dir: Path) -> list[Path]:
    from lstm import plots

    c = results["config"]
    workers = results["epochs"][-1].get("workers", 1) if results["epochs"] else 1
    title = f"PTB LM: {c['num_layers']}x{c['hidden_size']} LSTM, {regularization_label(c)}, {workers} worker(s)"
    return [
        plots.learning_curves(
            results["epochs"],
            [("perplexity", ["train_ppl", "valid_ppl", "test_ppl"])],
            out_dir / "learning_curve.png",
            title=title,
            log_y=["perplexity"],
        )
    ]


@register
class PTBTask(Task):
    """Word-level language modelling on Penn Treebank."""

    name = "ptb"
    config_class = PTBConfig
    presets = PRESETS
    default_preset = "small"
    sample_unit = "words"
    eval_splits = ("valid",)
    final_splits = ("test",)
    search = Search(
        "max_max_epoch",
        "valid_ppl",
        space={"keep_prob": "0.3:1.0", "hidden_size": "200,400,650,1000,1500", "lr_decay": "0.5:1.0"},
        pbt_mutations=("keep_prob", "learning_rate"),
    )
    display = Display(epoch_line, plot)
    config: PTBConfig

    # ------------------------------------------------------------------ driver side
    @classmethod
    def read_data(cls, config: PTBConfig, data_dir: Optional[str]) -> ptb.Corpus:
        """The whole corpus (downloaded once if needed): ~1M word ids and the vocabulary."""
        return ptb.load_corpus(locate("ptb", data_dir))

    @classmethod
    def check(cls, config: PTBConfig, data: ptb.Corpus, num_workers: int) -> None:
        check_sizes(config, data, num_workers)

    # ------------------------------------------------------------------ data
    def setup(self, corpus: ptb.Corpus) -> None:
        config, worker = self.config, self.worker
        check_sizes(config, corpus, worker.world_size)
        rows = ptb.batchify(ptb.prefix(corpus.train, config.train_fraction), config.batch_size)
        self.data = PTBData(
            vocab=corpus.vocab,
            # copies (torch.tensor): the corpus a worker gets through Ray's object store is read-only
            train=torch.tensor(ptb.shard_rows(rows, worker.rank, worker.world_size), device=worker.device),
            epoch_size=(rows.shape[1] - 1) // config.num_steps,
        )
        for split in EVAL_SPLITS:
            batch, steps = config.shape_of(split)
            all_rows = ptb.batchify(corpus.split(split), batch)
            self.data.eval_rows[split] = torch.tensor(eval_shard(all_rows, worker), device=worker.device)
            self.data.eval_steps[split] = (all_rows.shape[1] - 1) // steps

    def num_train_batches(self) -> int:
        """Steps per epoch (with variable lengths, the expected number)."""
        c = self.config
        if not c.vary_num_steps:
            return self.data.epoch_size
        mean = ptb.FULL_LENGTH_P * c.num_steps + (1 - ptb.FULL_LENGTH_P) * c.num_steps / 2
        return max(1, round((self.data.train.shape[1] - 1) / max(mean, ptb.MIN_STEPS)))

    def train_batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The same batches every epoch, in order (the tutorial's producer does not shuffle);
        with ``vary_num_steps``, windows of lengths drawn from (seed, epoch) alone, so that every
        rank draws the same ones (DDP's lock-step) and a resumed epoch draws them again."""
        c = self.config
        if not c.vary_num_steps:
            return ptb.iterate(self.data.train, c.num_steps, self.data.epoch_size)
        rng = np.random.default_rng([c.seed, epoch, VARIABLE_STEPS_SEED])
        return ptb.iterate_lengths(self.data.train, ptb.variable_lengths(rng, self.data.train.shape[1], c.num_steps))

    # ------------------------------------------------------------------ model and optimisation
    def build_model(self) -> nn.Module:
        """The tutorial's ``WordLM``, or ``RegularizedLM`` when a regularization field is on."""
        c = self.config
        if c.regularized:
            return RegularizedLM(c)
        return WordLM(c.vocab_size, c.hidden_size, c.num_layers, c.keep_prob, c.init_scale)

    def build_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        c = self.config
        if c.optimizer == "nt-asgd":
            return NTASGD(model.parameters(), self.learning_rate(0), nonmono=c.nonmono, weight_decay=c.weight_decay)
        return torch.optim.SGD(model.parameters(), lr=self.learning_rate(0), weight_decay=c.weight_decay)

    def static_step(self) -> bool:
        # Variable lengths change shapes; the regularized model's capture is unverified on a GPU.
        return not self.config.vary_num_steps and not self.config.regularized

    def learning_rate(self, epoch: int) -> float:
        c = self.config
        return c.learning_rate * c.lr_decay ** max(epoch + 1 - c.max_epoch, 0)

    def loss_limit(self) -> float:
        return LOSS_LIMIT_TIMES_UNIFORM * math.log(self.config.vocab_size)

    def train_step(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], state: Any) -> StepOutput:
        """Loss summed over time and averaged over this rank's rows (or over its tokens with
        ``loss_per_token``, whose lr is then scaled by T / num_steps for a window of T steps, as
        AWD-LSTM does); DDP's average over ranks makes it the global batch's."""
        inputs, targets = batch
        words = inputs.numel()
        per_token = self.config.loss_per_token
        loss, loss_sum, state = model(inputs, targets, state, 1.0 / (words if per_token else inputs.shape[0]))
        loss_sum = loss_sum.detach()
        return StepOutput(
            loss=loss,
            sums={"loss_sum": loss_sum, "words": words},
            samples=words,
            mean_loss=loss_sum / words,
            state=detach_state(state),
            lr_scale=inputs.shape[1] / self.config.num_steps if per_token else 1.0,
        )

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, model: nn.Module, split: str) -> dict[str, float]:
        return evaluate_rows(model, self.data.eval_rows[split], self.config.eval_shape[1], self.data.eval_steps[split])

    def evaluation_weights(
        self, model: nn.Module, optimizer: torch.optim.Optimizer
    ) -> contextlib.AbstractContextManager:
        """NT-ASGD's averaged weights once it averages; else the model's own."""
        return optimizer.averaged_weights() if isinstance(optimizer, NTASGD) else contextlib.nullcontext()

    def after_evaluation(self, optimizer: torch.optim.Optimizer, metrics: Mapping[str, Any]) -> dict[str, Any]:
        """NT-ASGD sees the global validation loss (and may switch to averaging)."""
        if not isinstance(optimizer, NTASGD):
            return {}
        switched = optimizer.observe(metrics["valid_loss"])
        return {"asgd_steps": optimizer.averaged_steps, "asgd_switched": switched}

    @staticmethod
    def summarize(sums: Mapping[str, float], prefix: str) -> dict[str, float]:
        words = sums.get("words", 0.0)
        loss_sum = sums.get("loss_sum", 0.0)
        return {f"{prefix}loss": loss_sum / max(words, 1.0), f"{prefix}ppl": perplexity(loss_sum, words)}

    def epoch_extras(self, model: nn.Module, epoch: int) -> dict[str, Any]:
        """Rank 0's peak resident memory so far (kept in results.json's history)."""
        return {"peak_rss_mib": round(peak_rss_mib(), 1)}

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_meta(self) -> dict[str, Any]:
        vocab = self.data.vocab
        return {"vocab_size": len(vocab), "vocab_sha256": vocab.sha256, "vocab": list(vocab.tokens)}

    def check_checkpoint(self, meta: Mapping[str, Any]) -> None:
        vocab = self.data.vocab
        if meta.get("vocab_sha256") != vocab.sha256:
            raise UserError(
                f"the checkpoint was trained on another vocabulary ({meta.get('vocab_size')} words, sha256 "
                f"{str(meta.get('vocab_sha256'))[:12]}) than this data's ({len(vocab)} words, sha256 "
                f"{vocab.sha256[:12]}); resume with the --data-dir it was trained on, or start a new run with "
                "another --name"
            )


def peak_rss_mib() -> float:
    """Peak resident set size of this process, in MiB (Linux reports KiB, macOS bytes)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


@torch.no_grad()
def evaluate_rows(model: nn.Module, rows: torch.Tensor, num_steps: int, n_steps: int) -> dict[str, float]:
    """Summed cross entropy and word count over ``rows``, the state carried across steps (eval mode)."""
    if rows.shape[0] == 0:
        return {"loss_sum": 0.0, "words": 0.0}
    total, words, state = 0.0, 0, None
    for inputs, targets in ptb.iterate(rows, num_steps, n_steps):
        _, loss_sum, state = model(inputs, targets, state)
        total += float(loss_sum)
        words += inputs.numel()
    return {"loss_sum": total, "words": float(words)}
