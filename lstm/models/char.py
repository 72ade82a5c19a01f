"""CharLSTM: the Keras char-LSTM example's model, and its temperature sampling.

Keras: ``LSTM(128, input_shape=(maxlen, len(chars)))`` then ``Dense(len(chars),
activation='softmax')``, trained with categorical cross-entropy on one-hot windows. Here the
one-hot encoding of a batch is made on the fly from character indices, and the softmax is
folded into the loss (``cross_entropy`` on logits), which is the same function.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn


class CharLSTM(nn.Module):
    """One-hot chars -> LSTM(hidden) -> Linear(vocab) logits of the character after the window."""

    def __init__(self, vocab_size: int, hidden_size: int = 128):
        super().__init__()
        self.vocab_size = vocab_size
        self.lstm = nn.LSTM(vocab_size, hidden_size, batch_first=True)
        self.out = nn.Linear(hidden_size, vocab_size)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        """``codes`` (batch, window) int64 -> logits (batch, vocab) of the next character."""
        x = F.one_hot(codes, self.vocab_size).to(self.out.weight.dtype)
        hidden, _ = self.lstm(x)
        return self.out(hidden[:, -1])

    @torch.no_grad()
    def generate(
        self,
        seeds: torch.Tensor,
        temperatures: Sequence[float],
        length: int,
        *,
        window: int,
        generator: Optional[torch.Generator] = None,
    ) -> torch.Tensor:
        """(batch, length) indices continuing each seed at its temperature, each step from a zero state."""
        if len(temperatures) != seeds.shape[0]:
            raise ValueError("one temperature per seed row")
        was_training = self.training
        self.eval()
        context = seeds.to(self.out.weight.device)
        temps = torch.tensor([float(t) for t in temperatures], dtype=torch.float64)
        out = []
        for _ in range(length):
            logits = self(context[:, -window:])
            nxt = sample_with_temperature(logits, temps, generator)
            out.append(nxt)
            context = torch.cat(
                [context[:, -(window - 1) :] if window > 1 else context[:, :0], nxt.to(context.device)[:, None]], dim=1
            )
        self.train(was_training)
        return torch.stack(out, dim=1) if out else torch.zeros(seeds.shape[0], 0, dtype=torch.int64)


def sample_with_temperature(
    logits: torch.Tensor, temperature: torch.Tensor | float, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """The example's ``sample``: ``log(p) / temperature``, renormalised, one draw per row (float64)."""
    log_probs = F.log_softmax(logits.detach().to("cpu", torch.float64), dim=-1)
    temp = torch.as_tensor(temperature, dtype=torch.float64)
    if temp.dim() == 1:
        temp = temp[:, None]
    probs = F.softmax(log_probs / temp, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)
