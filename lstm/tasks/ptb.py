"""The PTB word language model as the TensorFlow tutorial trains it (Zaremba et al. 2014):
truncated BPTT over ``num_steps`` words of ``batch_size`` contiguous rows, the state carried
between batches, loss summed over time and averaged over rows, clipped SGD with the tutorial's
decay. ``batch_size`` is global: rank k of N trains rows [k*B/N, (k+1)*B/N), so any worker
count takes the same steps (docs/ptb.md).

The fields after the tutorial's add AWD-LSTM's regularizers and NT-ASGD (docs/ptb-regularized.md);
each defaults to off, which trains the tutorial's ``WordLM``.
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

from lstm.config import TaskConfig, check_fields, flag_name, positive_finite
from lstm.data import ptb
from lstm.data.download import locate
from lstm.errors import UserError
from lstm.models.awd import INITS, Regularization, RegularizedLM
from lstm.models.word import WordLM, detach_state
from lstm.optim import NTASGD
from lstm.task import StepOutput, Task, WorkerInfo, perplexity, register

EVAL_SPLITS = ("valid", "test")
DROPOUT_FIELDS = (
    "locked_dropout_input",
    "locked_dropout_hidden",
    "locked_dropout_output",
    "embedding_dropout",
    "weight_drop",
)
OPTIMIZERS = ("sgd", "nt-asgd")
VARIABLE_STEPS_SEED = 4_242  # keeps the window-length generator apart from other seeded streams
LOSS_LIMIT_TIMES_UNIFORM = 10  # a mean loss this many times a uniform guess's (ln vocab) has diverged


@dataclass(frozen=True)
class PTBConfig(TaskConfig):
    """The tutorial's fields (defaults: its ``small`` config), the evaluation shape and the regularizers."""

    init_scale: float = 0.1
    learning_rate: float = 1.0
    max_grad_norm: float = 5.0
    num_layers: int = 2
    num_steps: int = 20
    hidden_size: int = 200
    max_epoch: int = 4  # epochs at the initial learning rate
    max_max_epoch: int = 13  # epochs in all
    keep_prob: float = 1.0  # dropout keeps this fraction; 1.0 = no dropout
    lr_decay: float = 0.5
    batch_size: int = 20  # global: split over the workers
    vocab_size: int = 10000  # softmax size; >= the training vocabulary
    train_fraction: float = 1.0  # train on this leading fraction of ptb.train.txt
    eval_batch_size: int = 0  # 0: batch_size (the tutorial's validation); 1: its test
    eval_num_steps: int = 0  # 0: num_steps
    test_batch_size: int = 0  # 0: eval_batch_size (AWD-LSTM validates with 10 rows, tests with 1)
    # ---- regularization (AWD-LSTM's toolkit, lstm/models/awd.py); every default is neutral
    tied: bool = False  # the softmax weight is the embedding matrix
    embedding_size: int = 0  # 0: hidden_size; else the last LSTM layer projects to it
    locked_dropout_input: float = 0.0  # variational dropout on the embedding output
    locked_dropout_hidden: float = 0.0  # ... between LSTM layers
    locked_dropout_output: float = 0.0  # ... on the last layer's output
    embedding_dropout: float = 0.0  # drop whole words
    weight_drop: float = 0.0  # DropConnect on the hidden-to-hidden matrices, one mask per batch
    ar: float = 0.0  # activation regularization: + ar * mean(output^2) per token
    tar: float = 0.0  # temporal activation regularization: + tar * mean((h_t - h_t-1)^2) per token
    init: str = "uniform"  # uniform: all weights U(+-init_scale); awd: AWD-LSTM's initialization
    # ---- optimization
    weight_decay: float = 0.0
    loss_per_token: bool = False  # mean over every token (AWD-LSTM) instead of summed over time, mean over rows
    vary_num_steps: bool = False  # AWD-LSTM's variable-length BPTT around num_steps
    optimizer: str = "sgd"  # sgd | nt-asgd (lstm/optim.py)
    nonmono: int = 5  # nt-asgd: average once valid loss is worse than all but the last nonmono epochs'

    flag_help = {
        "lr_decay": "multiplies the learning rate every epoch after --max-epoch; needs --max-epoch < --max-max-epoch",
        "nonmono": "needs --optimizer nt-asgd: average once the valid loss is worse than all but the last N epochs'",
    }

    def validate(self) -> None:
        if not 0.0 < self.keep_prob <= 1.0:
            raise UserError(f"--keep-prob must be in (0, 1] (got {self.keep_prob}); 1 means no dropout")
        self._validate_regularization()
        check_fields(
            self,
            ("num_layers", "num_steps", "hidden_size", "max_max_epoch", "batch_size", "vocab_size"),
            lambda v: v >= 1,
            ">= 1",
        )
        check_fields(self, ("max_epoch", "eval_batch_size", "eval_num_steps"), lambda v: v >= 0, ">= 0")
        check_fields(
            self, ("init_scale", "learning_rate", "max_grad_norm", "lr_decay"), positive_finite, "a positive number"
        )
        if not 0.0 < self.train_fraction <= 1.0:
            raise UserError(f"{flag_name('train_fraction')} must be in (0, 1] (got {self.train_fraction})")

    def _validate_regularization(self) -> None:
        check_fields(self, ("test_batch_size", "embedding_size"), lambda v: v >= 0, ">= 0")
        check_fields(self, ("nonmono",), lambda v: v >= 1, ">= 1")
        check_fields(self, DROPOUT_FIELDS, lambda v: 0.0 <= v < 1.0, "in [0, 1) (0 = off)")
        check_fields(self, ("ar", "tar", "weight_decay"), lambda v: 0.0 <= v < math.inf, ">= 0 and finite")
        for name, choices in (("optimizer", OPTIMIZERS), ("init", INITS)):
            if getattr(self, name) not in choices:
                raise UserError(f"{flag_name(name)} must be one of {', '.join(choices)} (got {getattr(self, name)!r})")
        locked = [f for f in DROPOUT_FIELDS[:3] if getattr(self, f)]
        if self.keep_prob < 1.0 and locked:
            raise UserError(
                f"--keep-prob {self.keep_prob:g} (the tutorial's dropout) and {flag_name(locked[0])} (locked "
                "dropout) act at the same places; use one kind: --keep-prob 1, or set the locked rates to 0 "
                "(in a search: --space keep_prob=base)"
            )

    def unused_flags(self) -> dict[str, str]:
        unused = {}
        if self.optimizer != "nt-asgd":
            unused["nonmono"] = (
                f"is NT-ASGD's trigger and has no effect with --optimizer {self.optimizer}; add --optimizer "
                "nt-asgd, or drop --nonmono"
            )
        if self.max_epoch >= self.max_max_epoch:
            unused["lr_decay"] = (
                f"has no effect when --max-epoch ({self.max_epoch}) >= --max-max-epoch ({self.max_max_epoch}): "
                "the learning rate never decays; lower --max-epoch, or drop --lr-decay"
            )
        return unused

    @property
    def eval_shape(self) -> tuple[int, int]:
        """(batch, num_steps) of validation (and of test unless ``test_batch_size`` is set)."""
        return self.eval_batch_size or self.batch_size, self.eval_num_steps or self.num_steps

    def shape_of(self, split: str) -> tuple[int, int]:
        """(batch, num_steps) with which ``split`` is evaluated."""
        batch, steps = self.eval_shape
        return (self.test_batch_size or batch, steps) if split == "test" else (batch, steps)


# small-reg: small's 2 x 200 LSTM with the regularizers that help a small model most. Dropout is
# lighter than AWD-LSTM's 1150-unit rates; AR/TAR are AWD's (per token, so the loss scale leaves
# them alone); weight decay is AWD's at its lr 30, i.e. x30 at lr 1; BPTT varies around medium's
# 35 steps; small's SGD schedule decays x0.75 an epoch after 5 to lr 0.02 by epoch 19 (NT-ASGD
# would start averaging too late); 19 epochs fit a 75-minute run on 2 CPU cores.
SMALL_REG: dict[str, Any] = dict(
    num_steps=35,
    max_epoch=5,
    max_max_epoch=19,
    lr_decay=0.75,
    tied=True,
    locked_dropout_input=0.3,
    locked_dropout_hidden=0.2,
    locked_dropout_output=0.3,
    embedding_dropout=0.05,
    weight_drop=0.2,
    ar=2.0,
    tar=1.0,
    weight_decay=3.6e-5,
    vary_num_steps=True,
    test_batch_size=1,  # the tutorial's test: batch 1, the state carried through the split
)

PRESETS: dict[str, dict[str, Any]] = {
    "small": {},  # PTBConfig's defaults
    "medium": dict(
        init_scale=0.05,
        learning_rate=1.0,
        max_grad_norm=5,
        num_layers=2,
        num_steps=35,
        hidden_size=650,
        max_epoch=6,
        max_max_epoch=39,
        keep_prob=0.5,
        lr_decay=0.8,
        batch_size=20,
        vocab_size=10000,
    ),
    "large": dict(
        init_scale=0.04,
        learning_rate=1.0,
        max_grad_norm=10,
        num_layers=2,
        num_steps=35,
        hidden_size=1500,
        max_epoch=14,
        max_max_epoch=55,
        keep_prob=0.35,
        lr_decay=1 / 1.15,
        batch_size=20,
        vocab_size=10000,
    ),
    "test": dict(
        init_scale=0.1,
        learning_rate=1.0,
        max_grad_norm=1,
        num_layers=1,
        num_steps=2,
        hidden_size=2,
        max_epoch=1,
        max_max_epoch=1,
        keep_prob=1.0,
        lr_decay=0.5,
        batch_size=20,
        vocab_size=10000,
    ),
    # AWD-LSTM's PTB command (its README): python main.py --batch_size 20 --data data/penn
    # --dropouti 0.4 --dropouth 0.25 --seed 141 --epoch 500, with main.py's other defaults.
    "awd": dict(
        init="awd",
        init_scale=0.1,
        learning_rate=30.0,
        max_grad_norm=0.25,
        loss_per_token=True,
        num_layers=3,
        hidden_size=1150,
        embedding_size=400,
        tied=True,
        num_steps=70,
        vary_num_steps=True,
        max_epoch=500,  # no decay: the lr stays 30; NT-ASGD averages instead
        max_max_epoch=500,
        keep_prob=1.0,
        lr_decay=1.0,
        batch_size=20,
        vocab_size=10000,
        locked_dropout_input=0.4,
        locked_dropout_hidden=0.25,
        locked_dropout_output=0.4,
        embedding_dropout=0.1,
        weight_drop=0.5,
        ar=2.0,
        tar=1.0,
        weight_decay=1.2e-6,
        optimizer="nt-asgd",
        nonmono=5,
        eval_batch_size=10,
        test_batch_size=1,
        seed=141,
    ),
    "small-reg": SMALL_REG,
}


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
    epochs_field = "max_max_epoch"
    primary_metric = "valid_ppl"
    search_space = {"keep_prob": "0.3:1.0", "hidden_size": "200,400,650,1000,1500", "lr_decay": "0.5:1.0"}
    pbt_mutations = ("keep_prob", "learning_rate")
    config: PTBConfig

    # ------------------------------------------------------------------ driver side
    @classmethod
    def read_data(cls, config: PTBConfig, data_dir: Optional[str]) -> ptb.Corpus:
        """The whole corpus (downloaded once if needed): ~1M word ids and the vocabulary."""
        return ptb.load_corpus(locate("ptb", data_dir))

    @classmethod
    def check(cls, config: PTBConfig, data: ptb.Corpus, num_workers: int) -> None:
        check_sizes(config, data, num_workers)

    @classmethod
    def plot(cls, results: Mapping[str, Any], out_dir: Path) -> list[Path]:
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

    @staticmethod
    def format_epoch_line(m: Mapping[str, Any]) -> str:
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
        reg = Regularization.of(c)
        if reg.is_neutral():
            return WordLM(c.vocab_size, c.hidden_size, c.num_layers, c.keep_prob, c.init_scale)
        return RegularizedLM(c.vocab_size, c.hidden_size, c.num_layers, reg, c.init_scale)

    def build_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        c = self.config
        if c.optimizer == "nt-asgd":
            return NTASGD(model.parameters(), self.learning_rate(0), nonmono=c.nonmono, weight_decay=c.weight_decay)
        return torch.optim.SGD(model.parameters(), lr=self.learning_rate(0), weight_decay=c.weight_decay)

    def static_step(self) -> bool:
        # Variable lengths change shapes; the regularized model's capture is unverified on a GPU.
        return not self.config.vary_num_steps and Regularization.of(self.config).is_neutral()

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


def regularization_label(c: Mapping[str, Any]) -> str:
    """A config's regularization in a few words, for a plot title."""
    locked = [c.get(f"locked_dropout_{where}", 0.0) for where in ("input", "hidden", "output")]
    parts = ["tied"] if c.get("tied") else []
    if any(locked):
        parts.append("locked dropout " + "/".join(f"{p:g}" for p in locked))
    if c.get("weight_drop"):
        parts.append(f"weight drop {c['weight_drop']:g}")
    return ", ".join(parts) or f"keep_prob {c['keep_prob']:g}"


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
