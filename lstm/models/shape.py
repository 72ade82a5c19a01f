"""ShapeLSTM: an LSTM that reads a point and predicts the next one, through the chapter's
``dense`` head (Linear + MAE: from the seed [0, 0] it draws one mean shape) or an ``mdn`` head
(a mixture of bivariate Gaussians, Graves 2013 section 4.1: sampling draws different shapes).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

MIN_LOG_SIGMA = -7.0  # targets like BR.y are exactly 0; a floor on sigma keeps the NLL bounded


class MixtureDensityHead(nn.Module):
    """hidden -> parameters of M bivariate Gaussians (6 numbers each)."""

    def __init__(self, hidden: int, mixtures: int):
        super().__init__()
        self.mixtures = mixtures
        self.proj = nn.Linear(hidden, 6 * mixtures)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.proj(h)

    def split(self, params: torch.Tensor):
        logit_pi, mu_x, mu_y, log_sx, log_sy, pre_rho = params.chunk(6, dim=-1)
        log_sx = log_sx.clamp(min=MIN_LOG_SIGMA)
        log_sy = log_sy.clamp(min=MIN_LOG_SIGMA)
        rho = torch.tanh(pre_rho) * 0.999
        return F.log_softmax(logit_pi, -1), mu_x, mu_y, log_sx, log_sy, rho

    def nll(self, params: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-point negative log likelihood, shape params.shape[:-1]."""
        log_pi, mu_x, mu_y, log_sx, log_sy, rho = self.split(params)
        zx = (target[..., :1] - mu_x) / log_sx.exp()
        zy = (target[..., 1:] - mu_y) / log_sy.exp()
        one_m_rho2 = 1 - rho**2
        log_n = (
            -(zx**2 + zy**2 - 2 * rho * zx * zy) / (2 * one_m_rho2)
            - math.log(2 * math.pi)
            - log_sx
            - log_sy
            - 0.5 * torch.log(one_m_rho2)
        )
        return -torch.logsumexp(log_pi + log_n, dim=-1)

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        log_pi, mu_x, mu_y, *_ = self.split(params)
        pi = log_pi.exp()
        return torch.stack([(pi * mu_x).sum(-1), (pi * mu_y).sum(-1)], -1)

    def sample(self, params: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        log_pi, mu_x, mu_y, log_sx, log_sy, rho = self.split(params)
        flat = log_pi.reshape(-1, self.mixtures).exp()
        k = torch.multinomial(flat, 1, generator=generator).reshape(*log_pi.shape[:-1], 1)
        pick = lambda t: t.gather(-1, k).squeeze(-1)  # noqa: E731
        mx, my, sx, sy, r = pick(mu_x), pick(mu_y), pick(log_sx).exp(), pick(log_sy).exp(), pick(rho)
        e1 = torch.randn(mx.shape, generator=generator, device=mx.device)
        e2 = torch.randn(mx.shape, generator=generator, device=mx.device)
        x = mx + sx * e1
        y = my + sy * (r * e1 + torch.sqrt(1 - r**2) * e2)
        return torch.stack([x, y], -1)


class ShapeLSTM(nn.Module):
    """LSTM(2 -> hidden) with a dense (2 outputs) or MDN head."""

    def __init__(self, hidden_size: int = 10, head: str = "dense", mixtures: int = 5):
        super().__init__()
        self.head_kind = head
        self.lstm = nn.LSTM(2, hidden_size, batch_first=True)
        self.head: nn.Module = (
            nn.Linear(hidden_size, 2) if head == "dense" else MixtureDensityHead(hidden_size, mixtures)
        )

    def forward(self, points: torch.Tensor, state=None):
        """points (B, T, 2) -> head outputs (B, T, 2 or 6M), new state."""
        h, state = self.lstm(points, state)
        return self.head(h), state

    def loss(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-point loss (B, T): MAE for the dense head, NLL for the MDN head."""
        if self.head_kind == "dense":
            return (out - target).abs().mean(-1)
        return self.head.nll(out, target)  # type: ignore[operator]

    def point(self, out: torch.Tensor, sample: bool, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """The next point from head outputs: the prediction (dense), a draw or the mean (MDN)."""
        if self.head_kind == "dense":
            return out
        return self.head.sample(out, generator) if sample else self.head.mean(out)  # type: ignore[operator]

    @torch.no_grad()
    def generate(
        self,
        n: int,
        length: int,
        *,
        sample: bool = True,
        generator: Optional[torch.Generator] = None,
        device: torch.device | str = "cpu",
    ) -> torch.Tensor:
        """Seed with [0, 0] and feed each prediction back: (n, length, 2) points incl. the seed."""
        x = torch.zeros(n, 1, 2, device=device)
        points, state = [x], None
        for _ in range(length - 1):
            out, state = self(x, state)
            x = self.point(out, sample, generator)
            points.append(x)
        return torch.cat(points, 1)
