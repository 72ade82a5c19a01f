"""Dynamic evaluation of a word language model (Krause, Kahembwe, Murray & Renals 2018,
"Dynamic Evaluation of Neural Sequence Models"): ``jobs/ptb.py score --dynamic``.

The text is scored as the static ``score`` does (batch 1, the state carried), in segments of
``segment_length`` words. After scoring a segment, the weights take one step on that segment's
gradient (the mean cross entropy per word), so each segment is predicted by a model adapted to
the text before it, never to itself. The state is carried over, cut from the graph at each
segment (truncated backpropagation).

Two update rules, both with a decay back toward the trained weights ``w0``:

* ``rms`` (default): the paper's "dynamic evaluation with RMS norm and global prior",
  ``w += lambda * r * (w0 - w) - eta * g / (RMS_g + eps)``. ``RMS_g`` is the root mean square
  of the gradient over the *training* text (batches of ``stats_batch_size`` rows and
  ``segment_length`` words, state carried, the model in evaluation mode), collected once
  before scoring; ``r = RMS_g / mean RMS_g`` (the mean over the parameter tensors of their mean)
  makes weights whose training gradients are large decay fast, clipped at ``1 / lambda`` so
  that no weight overshoots ``w0``. This is the authors' released ``dynamiceval.py``, whose
  defaults for AWD-LSTM on PTB are eta 5e-5, lambda 0.002, eps 2e-5, segments of 5 words and
  batches of 100 rows over the whole training text for the statistics; here the statistics
  cover ``stats_words`` training words (100,000 by default).
* ``sgd``: plain SGD steps with a uniform decay, ``w += lambda * (w0 - w) - eta * g``
  (``lambda = 0``: the paper's plain SGD dynamic evaluation); it needs no training text.

Each segment is scored by the static evaluation's own computation (a forward pass without
gradients: the fused softmax of the gradient pass rounds differently), and a second forward
pass from the same state gives the gradient. The update is written so that ``eta = 0`` leaves
every weight bit for bit at ``w0`` (the decay term is ``lambda * r * (w0 - w)``, zero when
``w == w0``): with ``eta = 0`` and segments as long as the static evaluation's windows the
result is the static ``score``'s, bit for bit; with other lengths it differs only by the
rounding of the float32 sum of each window.

Hyperparameters are chosen on the validation text and the test text is scored once with
them (docs/ptb-regularized.md).
"""

from __future__ import annotations

import argparse
import copy
import math
import os
from dataclasses import dataclass
from typing import Any, Collection, Optional

import numpy as np
import torch
from torch import nn

from lstm import config as cfg
from lstm.data import ptb
from lstm.data.download import locate
from lstm.data.vocab import Vocabulary
from lstm.errors import UserError
from lstm.models.word import detach_state

RULES = ("rms", "sgd")
# Krause et al.'s released defaults are eta 5e-5 and lambda 0.002 for segments of 5 words; their
# grid scales both with the segment length (x N/5). A step's time goes mostly to passes over
# whole weight matrices, whatever the segment's length, so segments of 20 words take about a
# third of the time of 5-word ones (bench/README.md); the defaults are theirs at 20 words.
SEGMENT = 20
DEFAULT_LR = {"rms": 5e-5 * SEGMENT / 5, "sgd": 1.0}  # sgd: see docs/ptb-regularized.md


@dataclass(frozen=True)
class DynamicSettings:
    """How ``score --dynamic`` adapts the weights."""

    rule: str = "rms"
    lr: Optional[float] = None  # eta; None: DEFAULT_LR[rule]
    decay: float = 0.002 * SEGMENT / 5  # lambda
    segment_length: int = SEGMENT
    epsilon: float = 2e-5  # rms only
    stats_batch_size: int = 100  # rms only: rows of the training batches that give RMS_g
    stats_words: int = 100_000  # rms only: training words those batches cover (0: the whole training text)
    data_dir: Optional[str] = None  # rms only: the PTB folder of the training text (as the job's --data-dir)

    @property
    def eta(self) -> float:
        return DEFAULT_LR[self.rule] if self.lr is None else self.lr

    def validate(self) -> None:
        if self.rule not in RULES:
            raise UserError(f"--dynamic-rule must be one of {', '.join(RULES)} (got {self.rule!r})")
        for flag, value in (("--dynamic-lr", self.eta), ("--dynamic-decay", self.decay)):
            if not (math.isfinite(value) and value >= 0):
                raise UserError(f"{flag} must be a finite number >= 0 (got {value})")
        if self.rule == "sgd" and self.decay > 1:
            raise UserError(
                f"--dynamic-decay must be <= 1 with --dynamic-rule sgd (got {self.decay}); above 1 it overshoots"
            )
        if not (math.isfinite(self.epsilon) and self.epsilon > 0):
            raise UserError(f"--dynamic-epsilon must be positive (got {self.epsilon})")
        for flag, count in (("--segment-length", self.segment_length), ("--stats-batch-size", self.stats_batch_size)):
            if count < 1:
                raise UserError(f"{flag} must be >= 1 (got {count})")
        if self.stats_words < 0:
            raise UserError(f"--stats-words must be >= 0 (0: the whole training text; got {self.stats_words})")

    def describe(self) -> dict[str, Any]:
        """The settings as the JSON line reports them."""
        out: dict[str, Any] = {"rule": self.rule, "lr": self.eta, "decay": self.decay}
        out["segment_length"] = self.segment_length
        if self.rule == "rms":
            out.update(epsilon=self.epsilon, stats_batch_size=self.stats_batch_size, stats_words=self.stats_words)
        return out


def gradient_rms(model: nn.Module, train_ids: np.ndarray, settings: DynamicSettings) -> list[torch.Tensor]:
    """RMS_g: per parameter, the root mean square of the per-word loss's gradient over
    batches of the training text (``stats_batch_size`` rows, ``segment_length`` words)."""
    batch = min(settings.stats_batch_size, max(1, len(train_ids) // (settings.segment_length + 1)))
    rows = torch.from_numpy(ptb.batchify(train_ids, batch))
    params = list(model.parameters())
    squares = [torch.zeros_like(p) for p in params]
    state, batches = None, 0
    model.eval()
    available = (rows.shape[1] - 1) // settings.segment_length
    wanted = -(-settings.stats_words // (batch * settings.segment_length))  # batches, rounded up
    n_steps = min(available, wanted) if settings.stats_words else available
    for inputs, targets in ptb.iterate(rows, settings.segment_length, n_steps):
        model.zero_grad(set_to_none=False)
        loss, _, state = model(inputs, targets, state, scale=1.0 / targets.numel())
        loss.backward()
        torch._foreach_addcmul_(squares, [p.grad for p in params], [p.grad for p in params])
        state, batches = detach_state(state), batches + 1
    if batches == 0:
        raise UserError(
            f"the training text has {len(train_ids)} words, too few for the gradient statistics of "
            f"--segment-length {settings.segment_length}; lower it or use --dynamic-rule sgd"
        )
    return [torch.sqrt(s / batches) for s in squares]


class Adapter:
    """One update rule's step, its per-parameter factors worked out once."""

    def __init__(self, params: list[torch.Tensor], settings: DynamicSettings, rms: Optional[list[torch.Tensor]]):
        self.params = params
        self.origin = [p.detach().clone() for p in params]  # w0
        eta, lam = settings.eta, settings.decay
        if rms is None:  # sgd: a uniform decay, the plain gradient
            self.decay = [torch.full_like(p, lam) for p in params]
            self.scale = [torch.full_like(p, -eta) for p in params]
            return
        mean_rms = sum(float(r.mean()) for r in rms) / len(rms)
        # r = RMS_g / mean RMS_g, and lambda * r clipped at 1 (Krause et al.'s clip of r at 1/lambda)
        self.decay = [(lam * r / mean_rms).clamp_(max=1.0) if mean_rms > 0 else torch.zeros_like(r) for r in rms]
        self.scale = [-eta / (r + settings.epsilon) for r in rms]

    @torch.no_grad()
    def step(self) -> None:
        """``w += decay * (w0 - w) + scale * g`` for every parameter (a missing gradient is 0)."""
        grads = [dense_grad(p) for p in self.params]
        torch._foreach_lerp_(self.params, self.origin, self.decay)  # w + decay * (w0 - w): w where w == w0
        torch._foreach_addcmul_(self.params, grads, self.scale)


DIVERGED_NATS = 700.0  # a mean loss per word past this overflows the perplexity (lstm.task.perplexity)


def check_finite(total: float, tokens: int, settings: DynamicSettings) -> None:
    """UserError once the adapted weights have diverged (a loss past what a perplexity holds)."""
    if not (math.isfinite(total) and total / tokens < DIVERGED_NATS):
        raise UserError(
            f"dynamic evaluation diverged after {tokens:,} words (--dynamic-lr {settings.eta:g}); lower "
            "--dynamic-lr, or raise --dynamic-decay"
        )


def dense_grad(p: torch.Tensor) -> torch.Tensor:
    """``p``'s gradient as a dense tensor (zeros when it has none)."""
    if p.grad is None:
        return torch.zeros_like(p)
    return p.grad.to_dense() if p.grad.is_sparse else p.grad


def sparse_embeddings(model: nn.Module) -> None:
    """Embedding gradients as sparse rows: a segment of a few words touches a few rows, and a
    dense gradient would fill (and, with tied weights, add) a whole vocabulary-sized matrix
    per segment."""
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            module.sparse = True


def adapter_for(model: nn.Module, settings: DynamicSettings, train_ids: Optional[np.ndarray]) -> Adapter:
    """The rule's adapter of ``model``'s parameters (rms: its gradient statistics on ``train_ids``)."""
    rms = gradient_rms(model, train_ids, settings) if settings.rule == "rms" else None
    model.zero_grad(set_to_none=True)
    return Adapter(list(model.parameters()), settings, rms)


def score_dynamic(
    model: nn.Module, ids: np.ndarray, settings: DynamicSettings, train_ids: Optional[np.ndarray] = None
) -> tuple[float, int]:
    """(summed cross entropy, predicted words) of ``ids`` scored with dynamic evaluation, on a
    copy of ``model`` (the model itself is left as it was)."""
    model = copy.deepcopy(model).eval()  # a tied weight stays one tensor in the copy
    adapter = adapter_for(model, settings, train_ids)
    sparse_embeddings(model)
    rows = torch.from_numpy(ptb.batchify(ids, 1))
    total, tokens, state = 0.0, 0, None
    for inputs, targets in ptb.iterate_lengths(rows, ptb.full_lengths(rows.shape[1], settings.segment_length)):
        with torch.no_grad():  # the score: the static evaluation's own computation
            _, loss_sum, next_state = model(inputs, targets, state)
        total += float(loss_sum)
        tokens += targets.numel()
        check_finite(total, tokens, settings)
        model.zero_grad(set_to_none=True)
        loss, _, _ = model(inputs, targets, state, scale=1.0 / targets.numel())
        loss.backward()
        adapter.step()
        state = next_state
    return total, tokens


def training_ids(vocab: Vocabulary, train_fraction: float, data_dir: Optional[str]) -> np.ndarray:
    """The words the model trained on (the leading ``train_fraction`` of ``ptb.train.txt`` in
    ``data_dir``, ``$LSTM_DATA_DIR`` or the download cache), in the checkpoint's vocabulary."""
    words = ptb.read_words(os.path.join(locate("ptb", data_dir), ptb.file_name("train")))
    lacking = vocab.missing(words)
    if lacking:
        raise UserError(
            f"the training text has {len(lacking)} word(s) the checkpoint's vocabulary lacks "
            f"({', '.join(sorted(lacking)[:3])}, ...): it is not the text this run trained on; pass its --data-dir"
        )
    return ptb.prefix(vocab.encode(words), train_fraction)


def score_trained(trained: Any, ids: np.ndarray, settings: DynamicSettings) -> tuple[float, int]:
    """:func:`score_dynamic` of a loaded checkpoint (``lstm.tasks.ptb_trained.TrainedLM``),
    its training text read for the rms rule."""
    train = None
    if settings.rule == "rms":
        train = training_ids(trained.vocab, trained.config.train_fraction, settings.data_dir)
    return score_dynamic(trained.model, ids, settings, train)


# --------------------------------------------------------------------------- the command line

RMS_ONLY = ("dynamic_epsilon", "stats_batch_size", "stats_words", "data_dir")
FLAGS = ("dynamic_rule", "dynamic_lr", "dynamic_decay", "segment_length", *RMS_ONLY)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``score``'s flags of dynamic evaluation."""
    d = DynamicSettings()
    p.add_argument(
        "--dynamic",
        action="store_true",
        help="dynamic evaluation (Krause et al. 2018): adapt the "
        "weights to each segment once it is scored; tune the settings on the validation text",
    )
    p.add_argument(
        "--dynamic-rule",
        choices=RULES,
        default=d.rule,
        help="rms: RMS-normalised steps, decay "
        "scaled by the training gradients' RMS (needs the training text); sgd: plain steps, uniform decay",
    )
    p.add_argument(
        "--dynamic-lr",
        type=float,
        default=None,
        help=f"eta, the step size (default: {DEFAULT_LR['rms']:g} for rms, {DEFAULT_LR['sgd']:g} for sgd)%(default).0s",
    )
    p.add_argument("--dynamic-decay", type=float, default=d.decay, help="lambda, the decay toward the trained weights")
    p.add_argument("--segment-length", type=int, default=d.segment_length, help="words per adapted segment")
    p.add_argument("--dynamic-epsilon", type=float, default=d.epsilon, help="rms: added to RMS_g")
    p.add_argument(
        "--stats-batch-size",
        type=int,
        default=d.stats_batch_size,
        help="rms: rows of the training batches whose gradients give RMS_g",
    )
    p.add_argument(
        "--stats-words",
        type=int,
        default=d.stats_words,
        help="rms: training words whose gradients give RMS_g (0: the whole training text)",
    )
    p.add_argument(
        "--data-dir",
        default=None,
        help="rms: the PTB folder the run trained on (default: "
        "$LSTM_DATA_DIR or the download cache, as the training job)%(default).0s",
    )


def settings_from(args: argparse.Namespace, given: Collection[str], batch_size: int) -> Optional[DynamicSettings]:
    """The checked settings of ``--dynamic`` (None without it); ``given``: the dests the command
    line names. A flag without effect with the others is a one-line error."""
    if not args.dynamic:
        unused = [f for f in FLAGS if f in given]
        if unused:
            raise UserError(f"{cfg.flag_name(unused[0])} is for dynamic evaluation; add --dynamic, or drop it")
        return None
    if args.dynamic_rule == "sgd":
        unused = [f for f in RMS_ONLY if f in given]
        if unused:
            raise UserError(f"{cfg.flag_name(unused[0])} has no effect with --dynamic-rule sgd; drop it, or use rms")
    if batch_size != 1:
        raise UserError(f"--dynamic scores with batch 1 (one text, the state carried); drop --batch-size {batch_size}")
    settings = DynamicSettings(
        rule=args.dynamic_rule,
        lr=args.dynamic_lr,
        decay=args.dynamic_decay,
        segment_length=args.segment_length,
        epsilon=args.dynamic_epsilon,
        stats_batch_size=args.stats_batch_size,
        stats_words=args.stats_words,
        data_dir=args.data_dir,
    )
    settings.validate()
    return settings
