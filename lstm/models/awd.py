"""RegularizedLM: the word LM with AWD-LSTM's regularizers (Merity, Keskar & Socher 2017),
weight tying (Press & Wolf 2017; Inan et al. 2017) and variational dropout (Gal & Ghahramani 2016).

    word ids -> embedding (vocab x E), whole words dropped      (embedding_dropout)
             -> locked dropout                                  (locked_dropout_input)
             -> LSTM layer 1 -> locked dropout -> ... -> LSTM layer L   (locked_dropout_hidden)
                each layer's hidden-to-hidden matrix DropConnected      (weight_drop)
             -> locked dropout                                  (locked_dropout_output)
             -> softmax layer (E x vocab), its weight the embedding's   (tied)

The last layer has E = ``embedding_size`` units (0: ``hidden_size``), as in AWD-LSTM, so that
its output can meet the (tied) embedding. Locked dropout draws one mask per sequence and
feature and applies it at every time step. The tutorial's dropout (``keep_prob``, a fresh mask
at every step) is applied at the same three places when no locked rate is set.

Weight drop recomputes the dropped matrix at every forward (one mask per batch; none in eval)
and runs the layer's ``nn.LSTM`` on it through ``torch.func.functional_call``: the fused
LSTM kernel (cuDNN on a GPU) still runs the whole sequence, never a Python loop over steps.

AR and TAR (``ar``, ``tar``) add ``ar * mean(o^2)`` over the last layer's dropped output and
``tar * mean((h_t - h_{t-1})^2)`` over its raw output to the loss, per token: with the
tutorial's loss (summed over time) they are weighted by the number of time steps, so their
strength relative to the cross entropy does not depend on how the loss is averaged.

With every field neutral (see :class:`Regularization`) the model computes what
:class:`lstm.models.word.WordLM` does, with the same initial weights for the same seed; the
PTB task keeps ``WordLM`` for that case all the same.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from lstm.models.linear_ce import linear_cross_entropy

LayerState = tuple[torch.Tensor, torch.Tensor]  # (h, c) of one layer, each (1, batch, units)
State = tuple[LayerState, ...]
INITS = ("uniform", "awd")


@dataclass(frozen=True)
class Regularization:
    """The model's regularization fields; their defaults are neutral (the tutorial's model).
    The PTB config has fields of the same names (:meth:`of` reads them)."""

    tied: bool = False  # the softmax weight is the embedding
    embedding_size: int = 0  # E; 0 = hidden_size
    keep_prob: float = 1.0  # the tutorial's dropout (not a regularizer of this model's own)
    locked_dropout_input: float = 0.0  # on the embedding output
    locked_dropout_hidden: float = 0.0  # between LSTM layers
    locked_dropout_output: float = 0.0  # on the last layer's output
    embedding_dropout: float = 0.0  # drops whole words (rows of the embedding)
    weight_drop: float = 0.0  # DropConnect on each layer's hidden-to-hidden matrix
    ar: float = 0.0  # activation regularization (alpha)
    tar: float = 0.0  # temporal activation regularization (beta)
    init: str = "uniform"  # uniform: every weight U(+-init_scale); awd: AWD-LSTM's init

    @classmethod
    def of(cls, config: Any) -> "Regularization":
        return cls(**{f.name: getattr(config, f.name) for f in dataclasses.fields(cls)})

    def is_neutral(self) -> bool:
        """Whether the tutorial's model (``WordLM``) computes the same thing."""
        return self == Regularization(keep_prob=self.keep_prob)

    @property
    def locked(self) -> tuple[float, float, float]:
        return self.locked_dropout_input, self.locked_dropout_hidden, self.locked_dropout_output


def locked_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """``x`` (time, batch, features) times one dropout mask per (batch, feature), shared by all
    time steps (variational dropout)."""
    if p == 0.0:
        return x
    mask = x.new_empty((1,) + x.shape[1:]).bernoulli_(1.0 - p).div_(1.0 - p)
    return x * mask


def embedding_dropout(embedding: nn.Embedding, words: torch.Tensor, p: float) -> torch.Tensor:
    """The embedding of ``words`` with whole words dropped: each vocabulary entry is zeroed
    with probability ``p`` (everywhere in the batch), the others scaled by 1 / (1 - p). The
    same as AWD-LSTM's masked embedding matrix, without materialising it."""
    vectors = embedding(words)
    if p == 0.0:
        return vectors
    keep = vectors.new_empty(embedding.num_embeddings).bernoulli_(1.0 - p).div_(1.0 - p)
    return vectors * keep[words].unsqueeze(-1)


def run_layer(layer: nn.LSTM, x: torch.Tensor, state: Optional[LayerState], weight_drop: float):
    """One fused LSTM layer over the whole sequence, with its hidden-to-hidden matrix
    DropConnected (a fresh mask per call) while training."""
    if weight_drop == 0.0 or not layer.training:
        return layer(x, state)
    dropped = F.dropout(layer.weight_hh_l0, weight_drop, training=True)
    return functional_call(layer, {"weight_hh_l0": dropped}, (x, state))


class RegularizedLM(nn.Module):
    """Embedding -> LSTM layers -> softmax, regularized as :class:`Regularization` says."""

    def __init__(
        self,
        vocab_size: int,
        hidden_size: int,
        num_layers: int,
        reg: Regularization = Regularization(),
        init_scale: float = 0.1,
    ):
        super().__init__()
        self.vocab_size, self.num_layers, self.reg = vocab_size, num_layers, reg
        self.output_size = reg.embedding_size or hidden_size
        self.embedding = nn.Embedding(vocab_size, self.output_size)
        sizes = [self.output_size] + [hidden_size] * (num_layers - 1) + [self.output_size]
        self.layers = nn.ModuleList(nn.LSTM(sizes[i], sizes[i + 1]) for i in range(num_layers))
        self.decoder = nn.Linear(self.output_size, vocab_size)
        if reg.tied:
            self.decoder.weight = self.embedding.weight
        self._initialize(init_scale)

    def _initialize(self, init_scale: float) -> None:
        if self.reg.init == "uniform":  # WordLM's: every parameter, in the same order
            for param in self.parameters():
                nn.init.uniform_(param, -init_scale, init_scale)
            return
        # AWD-LSTM: embedding and softmax weights U(+-init_scale), softmax bias 0, and each
        # LSTM PyTorch's default U(+-1/sqrt(units)), which nn.LSTM already drew.
        nn.init.uniform_(self.embedding.weight, -init_scale, init_scale)
        if not self.reg.tied:
            nn.init.uniform_(self.decoder.weight, -init_scale, init_scale)
        nn.init.zeros_(self.decoder.bias)

    def _drop(self, x: torch.Tensor, locked_p: float) -> torch.Tensor:
        if not self.training:
            return x
        if self.reg.keep_prob < 1.0:
            return F.dropout(x, 1.0 - self.reg.keep_prob, training=True)
        return locked_dropout(x, locked_p)

    def run(self, inputs: torch.Tensor, state: Optional[State] = None):
        """inputs (batch, T) word ids -> (the last layer's dropped output (T, batch, E), the
        final state, its raw output (T, batch, E)). A None state is the zero state."""
        p_in, p_hidden, p_out = self.reg.locked
        p_words = self.reg.embedding_dropout if self.training else 0.0
        x = self._drop(embedding_dropout(self.embedding, inputs.t(), p_words), p_in)
        new_state = []
        for i, layer in enumerate(self.layers):
            x, layer_state = run_layer(layer, x, None if state is None else state[i], self.reg.weight_drop)
            new_state.append(layer_state)
            raw = x
            x = self._drop(x, p_hidden if i < self.num_layers - 1 else p_out)
        return x, tuple(new_state), raw

    def forward(
        self, inputs: torch.Tensor, targets: torch.Tensor, state: Optional[State] = None, scale: float = 1.0
    ) -> tuple[torch.Tensor, torch.Tensor, State]:
        """(scale * summed cross entropy [+ AR/TAR while training], summed cross entropy,
        final state): the same contract as ``WordLM.forward``."""
        out, state, raw = self.run(inputs, state)
        h = out.reshape(-1, self.output_size)
        loss, loss_sum = linear_cross_entropy(h, self.decoder.weight, self.decoder.bias, targets.t().reshape(-1), scale)
        if self.training and (self.reg.ar or self.reg.tar):
            loss = loss + scale * targets.numel() * self.activation_penalty(out, raw)
        return loss, loss_sum, state

    def activation_penalty(self, dropped: torch.Tensor, raw: torch.Tensor) -> torch.Tensor:
        """AR + TAR per token (AWD-LSTM's ``alpha`` and ``beta`` terms)."""
        penalty = dropped.new_zeros(())
        if self.reg.ar:
            penalty = penalty + self.reg.ar * dropped.pow(2).mean()
        if self.reg.tar and raw.shape[0] > 1:
            penalty = penalty + self.reg.tar * (raw[1:] - raw[:-1]).pow(2).mean()
        return penalty

    @torch.no_grad()
    def logits(self, inputs: torch.Tensor, state: Optional[State] = None) -> tuple[torch.Tensor, State]:
        """Next-word logits (batch, num_steps, vocab) and the final state."""
        out, state, _ = self.run(inputs, state)
        b, t = inputs.shape
        return self.decoder(out.reshape(-1, self.output_size)).view(t, b, -1).transpose(0, 1), state
