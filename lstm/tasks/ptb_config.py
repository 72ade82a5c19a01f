"""PTB's config and presets, without torch: a reader (and the driver) can use them alone.

AWD-LSTM's regularizers and NT-ASGD follow the tutorial's fields (docs/ptb-regularized.md),
each off by default; with every regularizer off the tutorial's ``WordLM`` trains, else ``RegularizedLM``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping

from lstm.config import TaskConfig, check_fields, flag_name, positive_finite
from lstm.errors import UserError

DROPOUT_FIELDS = (
    "locked_dropout_input",
    "locked_dropout_hidden",
    "locked_dropout_output",
    "embedding_dropout",
    "weight_drop",
)
REGULARIZATION_FIELDS = ("tied", "embedding_size", *DROPOUT_FIELDS, "ar", "tar", "init")  # what RegularizedLM reads
OPTIMIZERS = ("sgd", "nt-asgd")
INITS = ("uniform", "awd")


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

    @property
    def regularized(self) -> bool:
        """Whether a field of the model's regularization is on (else the tutorial's ``WordLM`` trains)."""
        defaults = {f.name: f.default for f in dataclasses.fields(PTBConfig)}
        return any(getattr(self, name) != defaults[name] for name in REGULARIZATION_FIELDS)


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


def regularization_label(c: Mapping[str, Any]) -> str:
    """A config's regularization in a few words, for a plot title."""
    locked = [c.get(f"locked_dropout_{where}", 0.0) for where in ("input", "hidden", "output")]
    parts = ["tied"] if c.get("tied") else []
    if any(locked):
        parts.append("locked dropout " + "/".join(f"{p:g}" for p in locked))
    if c.get("weight_drop"):
        parts.append(f"weight drop {c['weight_drop']:g}")
    return ", ".join(parts) or f"keep_prob {c['keep_prob']:g}"
