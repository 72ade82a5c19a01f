"""WordLM: the LSTM language model of Zaremba, Sutskever & Vinyals (2014), as the TensorFlow
PTB tutorial builds it: embedding, dropout, ``num_layers`` LSTMs each followed by dropout, a
softmax layer; all weights uniform in [-init_scale, init_scale], two biases per gate (as
Zaremba's Torch code) and no forget-gate bias. The forward returns the tutorial's loss (summed
over time, averaged over rows) through :func:`linear_cross_entropy`, so the whole step runs
inside the (possibly DDP-wrapped) module.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from lstm.models.linear_ce import linear_cross_entropy

State = tuple[torch.Tensor, torch.Tensor]  # (h, c), each (num_layers, batch, hidden)


class WordLM(nn.Module):
    """Embedding -> stacked LSTM with dropout -> softmax over the vocabulary."""

    def __init__(
        self, vocab_size: int, hidden_size: int, num_layers: int, keep_prob: float = 1.0, init_scale: float = 0.1
    ):
        super().__init__()
        self.vocab_size, self.hidden_size, self.num_layers = vocab_size, hidden_size, num_layers
        self.keep_prob = keep_prob
        p = 1.0 - keep_prob
        self.embedding = nn.Embedding(vocab_size, hidden_size)
        # nn.LSTM's `dropout` acts on the output of every layer but the last ...
        self.lstm = nn.LSTM(hidden_size, hidden_size, num_layers, dropout=p if num_layers > 1 else 0.0)
        # ... so the embedding and the last layer get their own dropout.
        self.drop = nn.Dropout(p) if p > 0 else nn.Identity()
        self.decoder = nn.Linear(hidden_size, vocab_size)
        for param in self.parameters():
            nn.init.uniform_(param, -init_scale, init_scale)

    def zero_state(self, batch_size: int, device: torch.device | str = "cpu") -> State:
        shape = (self.num_layers, batch_size, self.hidden_size)
        return torch.zeros(shape, device=device), torch.zeros(shape, device=device)

    def hidden(self, inputs: torch.Tensor, state: Optional[State] = None) -> tuple[torch.Tensor, State]:
        """(batch, num_steps) word ids -> top-layer outputs (time-major) and the final state."""
        emb = self.drop(self.embedding(inputs.t()))  # time-major (T, B, H): what nn.LSTM runs fastest
        out, state = self.lstm(emb, state)
        out = self.drop(out)
        return out.reshape(-1, self.hidden_size), state

    def forward(
        self, inputs: torch.Tensor, targets: torch.Tensor, state: Optional[State] = None, scale: float = 1.0
    ) -> tuple[torch.Tensor, torch.Tensor, State]:
        """(scale * summed cross entropy, summed cross entropy, final state); the tutorial's scale is 1 / batch."""
        h, state = self.hidden(inputs, state)
        loss, loss_sum = linear_cross_entropy(h, self.decoder.weight, self.decoder.bias, targets.t().reshape(-1), scale)
        return loss, loss_sum, state

    @torch.no_grad()
    def logits(self, inputs: torch.Tensor, state: Optional[State] = None) -> tuple[torch.Tensor, State]:
        """Next-word logits (batch, num_steps, vocab) and the final state."""
        h, state = self.hidden(inputs, state)
        b, t = inputs.shape
        return self.decoder(h).view(t, b, -1).transpose(0, 1), state


def detach_state(state: Any) -> Any:
    """Cut the graph between batches (truncated BPTT), keeping the values of a state (None, tensor, tuple)."""
    if state is None or torch.is_tensor(state):
        return None if state is None else state.detach()
    return tuple(detach_state(s) for s in state)
