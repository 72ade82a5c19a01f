"""RegularizedLM: the word LM with AWD-LSTM's regularizers (Merity et al. 2017): embedding
dropout, locked (variational) dropout on the input, between layers and on the output,
DropConnect on each hidden-to-hidden matrix, a softmax tied to the embedding (the last layer
has ``embedding_size`` units to meet it), AR/TAR per token. Weight drop runs each layer's fused
``nn.LSTM`` on the dropped matrix through ``functional_call``, never a loop over time steps.
It reads its fields from PTB's config (:class:`lstm.tasks.ptb_config.PTBConfig`); with every
regularizer off it computes what :class:`lstm.models.word.WordLM` does.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from lstm.models.linear_ce import linear_cross_entropy
from lstm.tasks.ptb_config import PTBConfig

LayerState = tuple[torch.Tensor, torch.Tensor]  # (h, c) of one layer, each (1, batch, units)
State = tuple[LayerState, ...]


def locked_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """``x`` (time, batch, features) times one mask per (batch, feature), shared over time (variational dropout)."""
    if p == 0.0:
        return x
    mask = x.new_empty((1,) + x.shape[1:]).bernoulli_(1.0 - p).div_(1.0 - p)
    return x * mask


def embedding_dropout(embedding: nn.Embedding, words: torch.Tensor, p: float) -> torch.Tensor:
    """The embedding of ``words`` with whole vocabulary entries zeroed (p) and the others scaled, unmaterialised."""
    vectors = embedding(words)
    if p == 0.0:
        return vectors
    keep = vectors.new_empty(embedding.num_embeddings).bernoulli_(1.0 - p).div_(1.0 - p)
    return vectors * keep[words].unsqueeze(-1)


def run_layer(layer: nn.LSTM, x: torch.Tensor, state: Optional[LayerState], weight_drop: float):
    """One fused LSTM layer over the sequence, its hidden-to-hidden matrix DropConnected while training."""
    if weight_drop == 0.0 or not layer.training:
        return layer(x, state)
    dropped = F.dropout(layer.weight_hh_l0, weight_drop, training=True)
    return functional_call(layer, {"weight_hh_l0": dropped}, (x, state))


class RegularizedLM(nn.Module):
    """Embedding -> LSTM layers -> softmax, sized and regularized by the config's fields."""

    def __init__(self, config: PTBConfig):
        super().__init__()
        self.config, self.vocab_size, self.num_layers = config, config.vocab_size, config.num_layers
        self.output_size = config.embedding_size or config.hidden_size
        self.embedding = nn.Embedding(config.vocab_size, self.output_size)
        sizes = [self.output_size] + [config.hidden_size] * (config.num_layers - 1) + [self.output_size]
        self.layers = nn.ModuleList(nn.LSTM(sizes[i], sizes[i + 1]) for i in range(config.num_layers))
        self.decoder = nn.Linear(self.output_size, config.vocab_size)
        if config.tied:
            self.decoder.weight = self.embedding.weight
        self._initialize(config.init_scale)

    def _initialize(self, init_scale: float) -> None:
        if self.config.init == "uniform":  # WordLM's: every parameter, in the same order
            for param in self.parameters():
                nn.init.uniform_(param, -init_scale, init_scale)
            return
        # AWD-LSTM: embedding and softmax weights U(+-init_scale), softmax bias 0, and each
        # LSTM PyTorch's default U(+-1/sqrt(units)), which nn.LSTM already drew.
        nn.init.uniform_(self.embedding.weight, -init_scale, init_scale)
        if not self.config.tied:
            nn.init.uniform_(self.decoder.weight, -init_scale, init_scale)
        nn.init.zeros_(self.decoder.bias)

    def _drop(self, x: torch.Tensor, locked_p: float) -> torch.Tensor:
        if not self.training:
            return x
        if self.config.keep_prob < 1.0:
            return F.dropout(x, 1.0 - self.config.keep_prob, training=True)
        return locked_dropout(x, locked_p)

    def run(self, inputs: torch.Tensor, state: Optional[State] = None):
        """(the last layer's dropped output, the final state, its raw output) of (batch, T) word ids."""
        c = self.config
        p_in, p_hidden, p_out = c.locked_dropout_input, c.locked_dropout_hidden, c.locked_dropout_output
        p_words = c.embedding_dropout if self.training else 0.0
        x = self._drop(embedding_dropout(self.embedding, inputs.t(), p_words), p_in)
        new_state = []
        for i, layer in enumerate(self.layers):
            x, layer_state = run_layer(layer, x, None if state is None else state[i], c.weight_drop)
            new_state.append(layer_state)
            raw = x
            x = self._drop(x, p_hidden if i < self.num_layers - 1 else p_out)
        return x, tuple(new_state), raw

    def forward(
        self, inputs: torch.Tensor, targets: torch.Tensor, state: Optional[State] = None, scale: float = 1.0
    ) -> tuple[torch.Tensor, torch.Tensor, State]:
        """``WordLM.forward``'s contract, with AR/TAR added to the first value while training."""
        out, state, raw = self.run(inputs, state)
        h = out.reshape(-1, self.output_size)
        loss, loss_sum = linear_cross_entropy(h, self.decoder.weight, self.decoder.bias, targets.t().reshape(-1), scale)
        if self.training and (self.config.ar or self.config.tar):
            loss = loss + scale * targets.numel() * self.activation_penalty(out, raw)
        return loss, loss_sum, state

    def activation_penalty(self, dropped: torch.Tensor, raw: torch.Tensor) -> torch.Tensor:
        """AR + TAR per token (AWD-LSTM's ``alpha`` and ``beta`` terms)."""
        penalty = dropped.new_zeros(())
        if self.config.ar:
            penalty = penalty + self.config.ar * dropped.pow(2).mean()
        if self.config.tar and raw.shape[0] > 1:
            penalty = penalty + self.config.tar * (raw[1:] - raw[:-1]).pow(2).mean()
        return penalty

    @torch.no_grad()
    def logits(self, inputs: torch.Tensor, state: Optional[State] = None) -> tuple[torch.Tensor, State]:
        """Next-word logits (batch, num_steps, vocab) and the final state."""
        out, state, _ = self.run(inputs, state)
        b, t = inputs.shape
        return self.decoder(out.reshape(-1, self.output_size)).view(t, b, -1).transpose(0, 1), state
